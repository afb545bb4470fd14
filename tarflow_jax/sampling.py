"""Sampling: the TarFlow stack inverted block by block, with guidance, by a chosen decoder; and denoising.

`sample(model, variables, noise, labels, guidance=Guidance(...), decoder=Sequential(...) | Jacobi(...))`.
Each block's inverse step is the model's (`FlowBlock.inverse_step`); this module runs those steps over the
tokens and the blocks, and combines the conditional and unconditional predictions for guidance.
"""

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from tarflow_jax import errors, likelihood, sharding
from tarflow_jax.model import FlowBlock, TarFlow, check_labels, extend_cache, flow_dtype, on_block, unpatchify

Array = jax.Array

GUIDE_WHAT = ('a', 'b', 'ab')


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance of the affine parameters.

  With `weight` g > 0 the conditional and the unconditional branch (label -1,
  the mean class embedding; attention temperature `attn_temp`) run as one batch
  of 2B, and `a` and/or `b` (`guide_what`: 'a', 'b' or 'ab') are extrapolated
  away from the unconditional prediction: `a + g * (a - a_u)`. `annealed` ramps
  the weight linearly over tokens, `g (t + 1) / (T - 1)`. On an unconditional
  model the branches differ only in attention temperature. g = 0 disables
  guidance.

  Changing `weight` or `attn_temp` does not recompile the sampler; changing
  whether guidance is on, `guide_what` or `annealed` does.
  """
  weight: float = 0.0
  guide_what: str = 'ab'
  attn_temp: float = 1.0
  annealed: bool = False

  def __post_init__(self):
    if self.guide_what not in GUIDE_WHAT:
      raise errors.UserError(f'guide_what must be one of {GUIDE_WHAT}, got {self.guide_what!r}.')
    if self.weight < 0:
      raise errors.UserError(f'guidance must be >= 0, got {self.weight}.')

  @property
  def enabled(self) -> bool:
    return bool(self.weight > 0)


def guidance_from_config(config, **overrides) -> Guidance:
  """The guidance of a config's `sample` fields, with `overrides` (`Guidance` fields) in place of some.

  A weight from the config is dropped (0) for an unconditional model at
  attention temperature 1, where the two branches would be the same model; a
  weight in `overrides` is kept (and `sample` refuses it there).
  """
  s = config.sample
  fields = dict(weight=s.guidance, guide_what=s.guide_what, attn_temp=s.attn_temp, annealed=s.annealed_guidance)
  fields.update(overrides)
  if 'weight' not in overrides and not config.model.num_classes and fields['attn_temp'] == 1.0:
    fields['weight'] = 0.0
  return Guidance(**fields)


@dataclasses.dataclass(frozen=True)
class Denoising:
  """One score step after sampling (see `denoise`): on when `enabled`, with the training noise's `sigma`."""
  enabled: bool = False
  sigma: float = 0.0
  step_scale: float = 1.0


def denoising_from_config(config, **overrides) -> Denoising:
  """The denoising of a config, with `overrides` (`Denoising` fields) in place of some.

  On when `sample.denoise` is set and the model trained with Gaussian noise;
  sigma is the training noise's std, `step_scale` is `sample.denoise_scale`.
  """
  gaussian = config.noise.type == 'gaussian' and config.noise.std > 0
  denoising = Denoising(enabled=bool(config.sample.denoise and gaussian), sigma=config.noise.std,
                        step_scale=config.sample.denoise_scale)
  return dataclasses.replace(denoising, **overrides)


@dataclasses.dataclass(frozen=True)
class Sequential:
  """Exact decoding, token after token: one `lax.scan` per chunk of each block's tokens.

  Each of the `chunks` chunks (`decode_chunks`) attends over a key/value cache
  as long as the tokens up to its end, not the whole sequence: decoding reads
  the cache at every token, so more chunks read less, for one compiled loop
  body per chunk. `microbatch` decodes that many samples at a time (a divisor
  of the batch), one after the other in the same compiled call; on a CPU, a
  micro-batch whose cache fits the last-level cache decodes faster than the
  whole batch. On accelerators, decode the whole batch (None).
  """
  chunks: int = 8
  microbatch: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Jacobi:
  """Parallel (Jacobi / Gauss-Seidel-Jacobi) decoding of each block's inverse.

  A block's tokens 1..T-1 are cut into segments of `segment` tokens, solved in
  order; inside a segment all tokens are updated at once, `x <- z * exp(a(x)) + b(x)`,
  starting from the latent, until the largest change is at most `tol` or
  `max_iters` iterations have run; the key/value cache carries the earlier
  segments. `segment=0` is one segment for the whole block (plain Jacobi). With
  `max_iters` equal to the segment length (0 means that) and `tol=0` the result
  is exact. `segment` and `max_iters` may be tuples, one entry per block
  (indexed like the blocks, 0 first).
  """
  segment: Union[int, tuple] = 0
  max_iters: Union[int, tuple] = 0
  tol: float = 1e-4

  def for_block(self, i: int, num_tokens: int) -> tuple[int, int]:
    """(segment length, iteration cap) of block i."""
    segment = _setting_of_block(self.segment, i) or num_tokens - 1
    return min(segment, num_tokens - 1), _setting_of_block(self.max_iters, i) or segment


def _setting_of_block(setting: Union[int, tuple], i: int) -> int:
  """A setting for every block (int) or one per block (tuple): block i's."""
  return setting[i] if isinstance(setting, tuple) else setting


Decoder = Union[Sequential, Jacobi]


def sample(model: TarFlow, variables, noise: Array, labels: Optional[Array] = None, *,
           guidance: Guidance = Guidance(), decoder: Decoder = Sequential(), return_iterations: bool = False,
           return_trajectory: bool = False):
  """Draws images from Gaussian noise by inverting every block, last to first.

  Args:
    model: the TarFlow module.
    variables: its variables ({'params', 'prior'}).
    noise: (B, T, D) standard normal latent, patch layout; scaled by the
      prior's standard deviation here.
    labels: (B,) labels of a class-conditional model, -1 for "no label", or None.
    guidance: see `Guidance`; the default is none.
    decoder: `Sequential` (exact, the default) or `Jacobi`.
    return_iterations: also return the iterations each block took.
    return_trajectory: also return the per-block trajectory, as the
      reference's `reverse(..., return_sequence=True)`.
  Returns:
    (B, H, W, C) images on the [-1, 1] scale (not clipped). With
    `return_iterations` or `return_trajectory`, a tuple: the images, then
    the iterations if asked, then the trajectory if asked.
    iterations: a list over blocks (block 0 first) of int arrays with one
    entry per Jacobi segment, or, for `Sequential`, per chunk (one iteration
    per token).
    trajectory: a list of num_blocks + 1 arrays (B, H, W, C): the noise as
    given (before the prior's scale), then the images after inverting each
    block, the last block first; its last entry is the images.
  """
  _check_sample_args(model, noise, labels, guidance, decoder)
  args = (model, variables, noise, labels, jnp.float32(guidance.weight), jnp.float32(guidance.attn_temp))
  static = dict(guided=guidance.enabled, guide_what=guidance.guide_what, annealed=guidance.annealed,
                decoder=decoder, trajectory=return_trajectory)
  if isinstance(decoder, Jacobi):
    images, iterations, trajectory = _sample(*args, **static)
  else:
    images, trajectory = _sample_sequentially(*args, **static)
    if return_iterations:
      chunk_lengths = jnp.asarray([stop - start for start, stop in decode_chunks(model.num_tokens, decoder.chunks)])
      iterations = [chunk_lengths] * model.spec.num_blocks
  extras = ((iterations,) if return_iterations else ()) + ((trajectory,) if return_trajectory else ())
  return (images, *extras) if extras else images


def _check_sample_args(model, noise, labels, guidance, decoder):
  if not isinstance(decoder, (Sequential, Jacobi)):
    raise TypeError(f'decoder must be Sequential(chunks, microbatch) or Jacobi(segment, max_iters, tol), '
                    f'got {decoder!r}.')
  if model.spec.noise_conditioning:
    raise errors.UserError('The model is conditioned on the noise level (iTARFlow): sample it with '
                           'iterative_sampling.sample.')
  want = (model.num_tokens, model.token_dim)
  if noise.ndim != 3 or tuple(noise.shape[1:]) != want:
    raise errors.UserError(f'Expected noise of shape (batch, {want[0]}, {want[1]}) (tokens, patch dim), '
                           f'got {tuple(noise.shape)}.')
  check_labels(labels, model.spec.num_classes)
  if guidance.enabled and not model.spec.num_classes and guidance.attn_temp == 1.0:
    raise errors.UserError('Guidance on an unconditional model compares the model with itself at attention '
                           'temperature attn_temp; with attn_temp=1.0 it does nothing. Set attn_temp (e.g. 0.5 to 0.9) '
                           'or guidance=0.')


def _sample_sequentially(model, variables, noise, labels, weight, attn_temp, *, decoder, **static):
  """`_sample` with a `Sequential` decoder, the whole batch at once or in micro-batches: (images, trajectory)."""
  batch, microbatch = noise.shape[0], decoder.microbatch
  if microbatch is not None:
    sharding.check_microbatch(batch, microbatch)
  args = (model, variables, noise, labels, weight, attn_temp)
  if microbatch is None or microbatch == batch:
    images, _, trajectory = _sample(*args, decoder=decoder, **static)
    return images, trajectory
  return _sample_in_microbatches(*args, decoder=decoder, **static)


@dataclasses.dataclass(frozen=True)
class _Conditioning:
  """What every decoding step of every block shares: the rows the model runs and how guidance combines them."""
  labels: Optional[Array]  # (B,), or guided (2B,): the conditional rows, then the unconditional
  temperature: Optional[Array]  # guided: (2B,) attention temperature of each row; else None
  weights: Array  # (T - 1,) guidance weight of each step (input token t gives token t + 1)
  guided: bool
  guide_what: str

  @property
  def branches(self) -> int:
    """Rows the model runs per sample: 2 with guidance (conditional and unconditional), else 1."""
    return 2 if self.guided else 1

  def combine(self, a: Array, b: Array, t: Array):
    """Guided (a, b) (B, S, D) for tokens t+1..t+S from both branches' (2B, S, D)."""
    g = jax.lax.dynamic_slice_in_dim(self.weights, t, a.shape[1])[None, :, None]  # (1, S, 1)
    (a, a_u), (b, b_u) = jnp.split(a, 2), jnp.split(b, 2)
    if 'a' in self.guide_what:
      a = a + g * (a - a_u)
    if 'b' in self.guide_what:
      b = b + g * (b - b_u)
    return a, b


def _conditioning(model, labels, batch, weight, attn_temp, *, guided, guide_what, annealed) -> _Conditioning:
  """The rows to run for `batch` samples with labels (B,) or None, and the guidance weight of each token."""
  temperature = None
  if guided:
    if model.spec.num_classes:
      cond = labels if labels is not None else jnp.full((batch,), -1, jnp.int32)
      labels = jnp.concatenate([cond, jnp.full((batch,), -1, cond.dtype)])  # (2B,)
    temperature = jnp.concatenate([jnp.ones((batch,)), jnp.full((batch,), attn_temp)])  # (2B,)
  steps = jnp.arange(model.num_tokens - 1)
  weights = weight * (steps + 1) / (model.num_tokens - 1) if annealed else jnp.full(steps.shape, weight)
  return _Conditioning(labels, temperature, weights, guided, guide_what)


_STATIC = ('model', 'guided', 'guide_what', 'annealed', 'decoder', 'trajectory')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample(model, variables, noise, labels, weight, attn_temp, *, guided, guide_what, annealed, decoder,
            trajectory):
  """(images (B, H, W, C), iterations, trajectory) as `sample` returns them.

  iterations: per block, Jacobi's; None for each block with `Sequential`. trajectory: None unless `trajectory`.
  """
  batch, num_tokens, _ = noise.shape
  image = lambda x: unpatchify(x, model.spec.patch_size, model.spec.img_size)  # (B, T, D) -> (B, H, W, C)
  x = noise.astype(flow_dtype(model.spec.dtype))
  steps = [image(x)] if trajectory else None
  x = x * jnp.sqrt(variables['prior']['var'])  # (B, T, D)
  cond = _conditioning(model, labels, batch, weight, attn_temp, guided=guided, guide_what=guide_what,
                       annealed=annealed)
  iterations = [None] * model.spec.num_blocks
  for i in reversed(range(model.spec.num_blocks)):
    step = _inverse_step_of_block(model, variables, i, cond)
    cache = model.apply(variables, batch * cond.branches, 0, method=on_block(i, FlowBlock.init_cache))
    if isinstance(decoder, Jacobi):
      x, iterations[i] = _invert_block_by_jacobi(step, cache, x, *decoder.for_block(i, num_tokens), decoder.tol)
    else:
      x = _invert_block_sequentially(step, cache, x, decoder.chunks)
    if trajectory:
      steps.append(image(x))
  return image(x), iterations, steps


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_in_microbatches(model, variables, noise, labels, weight, attn_temp, *, decoder, **static):
  """`_sample` over micro-batches in turn (`lax.map`): the images (B, H, W, C) and the trajectory (or None)."""
  batch, microbatch = noise.shape[0], decoder.microbatch
  groups = batch // microbatch
  split = lambda a: None if a is None else sharding.split_microbatches(a, groups)  # (groups, microbatch, ...)
  merge = sharding.merge_microbatches

  def decode(group):
    images, _, trajectory = _sample(model, variables, *group, weight, attn_temp, decoder=decoder, **static)
    return images, trajectory

  images, trajectory = jax.lax.map(decode, (split(noise), split(labels)))
  return merge(images), None if trajectory is None else [merge(x) for x in trajectory]


def _inverse_step_of_block(model, variables, i, cond: _Conditioning):
  """Block i's `FlowBlock.inverse_step` with the shared conditioning: `(x, z, t, cache, size) -> (x, cache)`."""
  method = on_block(i, FlowBlock.inverse_step)
  guide = cond.combine if cond.guided else None

  def step(x, z, t, cache, size=1):
    return model.apply(variables, x, z, t, cache, cond.labels, cond.temperature, guide, size, method=method)

  return step


MIN_CHUNK = 16  # tokens: shorter chunks save little reading and cost compile time.


def decode_chunks(num_tokens: int, chunks: int) -> list[tuple[int, int]]:
  """[start, stop) of `chunks` near-equal decoding chunks of at least MIN_CHUNK tokens (or one).

  Inputs start..stop-1 of a chunk give tokens start+1..stop.
  """
  steps = num_tokens - 1
  n = max(1, min(chunks, steps // MIN_CHUNK))
  bounds = [round(steps * j / n) for j in range(n + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _invert_block_sequentially(step, cache, z: Array, chunks: int) -> Array:
  """A block's input from its output z (B, T, D), token after token; both in the original order.

  One `lax.scan` over the tokens of each chunk of `decode_chunks`, with the
  cache extended to the chunk's end before it.
  """
  x = z  # token 0 (in the block's order) is its own inverse; the others are overwritten in turn

  def decode(carry, t):
    x, cache = carry
    return step(x, z, t, cache), None

  for start, stop in decode_chunks(z.shape[1], chunks):
    (x, cache), _ = jax.lax.scan(decode, (x, extend_cache(cache, stop)), jnp.arange(start, stop))
  return x


def _invert_block_by_jacobi(step, cache, z: Array, segment: int, max_iters: int, tol: float):
  """A block's input from its output z (B, T, D) by Jacobi iterations over segments of tokens.

  Returns the input (B, T, D) and the iterations of each segment (n,).
  """
  num_tokens = z.shape[1]
  x, iterations = z, []  # every segment starts from its latent
  for start in range(0, num_tokens - 1, segment):  # inputs start..start+size-1 give tokens start+1..start+size
    size = min(segment, num_tokens - 1 - start)
    cache = extend_cache(cache, start + size)  # each segment attends over the tokens before its end only
    x, cache, count = _solve_segment(step, x, z, cache, start, size, min(max_iters, size), tol)
    iterations.append(count)
  return x, jnp.stack(iterations)


def _solve_segment(step, x, z, cache, start: int, size: int, max_iters: int, tol: float):
  """Jacobi iterations on tokens start+1..start+size until none changes by more than `tol`, or `max_iters`.

  Returns x with the segment solved, the cache, and the iterations run.
  """

  def not_done(state):
    count, _, change, _ = state
    return (count < max_iters) & (change > tol)

  def iterate(state):
    count, x, _, cache = state
    new, cache = step(x, z, start, cache, size)
    return count + 1, new, jnp.max(jnp.abs(new - x)), cache  # only the segment changes

  count, x, _, cache = jax.lax.while_loop(not_done, iterate, (0, x, jnp.inf, cache))
  return x, cache, count


def score(model: TarFlow, variables, x: Array, y: Optional[Array] = None) -> Array:
  """grad_x log p(x | y) per image, (B, H, W, C)."""
  return _score(model, variables, x, y)


@functools.partial(jax.jit, static_argnames=('model',))
def _score(model, variables, x, y):
  return jax.grad(lambda x: likelihood.log_prob(model, variables, x, y).sum())(x)


def denoise(model: TarFlow, variables, x: Array, y: Optional[Array] = None, *,
            sigma: float, step_scale: float = 1.0) -> Array:
  """One score step (Tweedie): `x + step_scale * sigma**2 * grad_x log p(x | y)`.

  `sigma` is the standard deviation of the training noise; `step_scale`
  tunes the step (the reference uses values around 0.9 to 1.4 per dataset).
  """
  check_labels(y, model.spec.num_classes)
  return x + (step_scale * sigma**2) * score(model, variables, x, y)
