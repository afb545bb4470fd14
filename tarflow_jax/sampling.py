"""Sampling: the TarFlow stack inverted block by block, with guidance, by a chosen decoder; and denoising.

`sample(model, variables, noise, labels, guidance=Guidance(...), decoder=Sequential(...) | Jacobi(...))`.
Each block's inverse step is the model's (`FlowBlock.inverse_step`); this module runs those steps over the
tokens and the blocks, and combines the conditional and unconditional predictions for guidance.
"""

import dataclasses
import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from tarflow_jax import errors, likelihood, platforms, sharding
from tarflow_jax.model import PER_BLOCK_FIELDS, FlowBlock, TarFlow, check_labels, extend_cache, flow_dtype, on_block, unpatchify

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
  of the batch), one after the other in the same compiled call: on a CPU, a
  micro-batch whose key/value cache stays in the last-level cache decodes
  faster than the whole batch. 'auto' (the default) picks it from the cache
  size of the machine at hand (`auto_microbatch`), and the whole batch on
  accelerators; None is always the whole batch.
  """
  chunks: int = 8
  microbatch: Union[int, str, None] = 'auto'


INITIAL_GUESSES = ('latent', 'zeros', 'prev')


@dataclasses.dataclass(frozen=True)
class Jacobi:
  """Parallel (Jacobi / Gauss-Seidel-Jacobi) decoding of each block's inverse.

  A block's tokens 1..T-1 are cut into segments of `segment` tokens, solved in
  order; inside a segment all tokens are updated at once, `x <- z * exp(a(x)) + b(x)`,
  starting from the initial guess `init`, until the largest change is at most
  `tol` or `max_iters` iterations have run; the key/value cache carries the
  earlier segments. `segment=0` is one segment for the whole block (plain
  Jacobi). With `max_iters` equal to the segment length (0 means that) and
  `tol=0` the result is exact, whatever the guess. `segment`, `max_iters` and
  `window` may be tuples, one entry per block (indexed like the blocks, 0 first).

  `window=W` (instead of segments) updates W tokens at a time and, after every
  iteration, slides the window past the tokens that have settled: the first
  token of the window (its inputs are all settled), and after it every token
  up to and including the first that changed by more than `tol`. Settled
  tokens are not computed again, so no iteration is spent on a converged
  prefix (what selective Jacobi decoding, arXiv 2505.24791, avoids), and since
  the window moves by at least one token per iteration, it never takes more
  iterations than sequential decoding. `max_iters` caps the block's iterations
  (0: T - 1, exact at `tol=0`); tokens the window has not reached hold the guess.

  `init`: 'latent' (the segment's own latent tokens), 'zeros', or 'prev' (the
  solution of the segment before, token for token; the latent for the first;
  segments only). The key/value cache of a segment holds the inputs of its last
  iteration: where the iterations stop short of exact (a cap, a tolerance),
  later segments attend to those, not to the segment's final tokens (within
  `tol` of them once it has settled).
  """
  segment: Union[int, tuple] = 0
  max_iters: Union[int, tuple] = 0
  tol: float = 1e-4
  init: str = 'latent'
  window: Union[int, tuple] = 0

  def __post_init__(self):
    if self.init not in INITIAL_GUESSES:
      raise errors.UserError(f'Jacobi init must be one of {", ".join(INITIAL_GUESSES)}, got {self.init!r}.')
    if self.tol < 0:
      raise errors.UserError(f'Jacobi tol must be >= 0, got {self.tol}.')

  def for_block(self, i: int, num_tokens: int) -> tuple[int, int]:
    """(segment length, iteration cap) of block i; with a window, (window length, the block's iteration cap)."""
    window = _setting_of_block(self.window, i)
    if window:
      if _setting_of_block(self.segment, i):
        raise errors.UserError(f'Jacobi block {i}: give segment or window, not both.')
      if self.init == 'prev':
        raise errors.UserError("Jacobi init='prev' starts a segment from the one before: a window takes 'latent' "
                               "or 'zeros'.")
      return min(window, num_tokens - 1), min(_setting_of_block(self.max_iters, i) or num_tokens - 1, num_tokens - 1)
    segment = _setting_of_block(self.segment, i) or num_tokens - 1
    return min(segment, num_tokens - 1), _setting_of_block(self.max_iters, i) or segment

  def slides(self, i: int) -> bool:
    """Whether block i is decoded by a sliding window (else by segments)."""
    return bool(_setting_of_block(self.window, i))

  def spans(self, i: int, num_tokens: int) -> list[tuple[int, int]]:
    """What one iteration of block i computes: (tokens, key/value cache length) per segment in order; a window's
    iteration, its tokens over the whole block's cache."""
    size, _ = self.for_block(i, num_tokens)
    steps = num_tokens - 1
    if self.slides(i):
      return [(size, steps)]
    return [(min(size, steps - start), min(start + size, steps)) for start in range(0, steps, size)]


def _setting_of_block(setting: Union[int, tuple], i: int) -> int:
  """A setting for every block (int) or one per block (tuple): block i's."""
  return setting[i] if isinstance(setting, tuple) else setting


@dataclasses.dataclass(frozen=True)
class Plan:
  """A decoder per block: `blocks[i]` (a `Sequential` or `Jacobi`) inverts block i (block 0 first).

  `microbatch` decodes that many samples at a time, as `Sequential`'s (the
  micro-batch of the entries is not read). `parse_plan` reads one from the
  spelling of the command lines, `spell` writes it back.
  """
  blocks: tuple
  microbatch: Union[int, str, None] = 'auto'

  def __post_init__(self):
    for d in self.blocks:
      if not isinstance(d, (Sequential, Jacobi)):
        raise TypeError(f'A plan\'s entries are Sequential or Jacobi, got {d!r}.')

  def for_block(self, i: int):
    return self.blocks[i]


Decoder = Union[Sequential, Jacobi, Plan]


def decoder_of_block(decoder: Decoder, i: int) -> Union[Sequential, Jacobi]:
  """The decoder of block i: a plan's entry, or the decoder itself."""
  return decoder.for_block(i) if isinstance(decoder, Plan) else decoder


PLAN_SPELLING = ('seq[:chunks=N] or jacobi[:segment=N|:window=N][:iters=N][:tol=X][:init=latent|zeros|prev], one '
                 'for every block or one per block (block 0 first) separated by commas, e.g. '
                 'seq,jacobi:segment=16:iters=8:tol=1e-3:init=prev,jacobi:window=64:tol=1e-3')
_KEYS = {'seq': {'chunks': int},
         'jacobi': {'segment': int, 'window': int, 'iters': int, 'tol': float, 'init': str}}
_KINDS = {'seq': 'seq', 'sequential': 'seq', 'jacobi': 'jacobi'}


def parse_plan(text: str, num_blocks: Optional[int], *, sequential: Sequential = Sequential(),
               jacobi: Jacobi = Jacobi(), setting: str = 'decoder') -> Decoder:
  """The decoder that `text` spells (`PLAN_SPELLING`) for a model of `num_blocks` blocks.

  Settings an entry does not give are those of `sequential` and `jacobi`. One entry is that decoder
  for every block; one per block is a `Plan` (with `sequential`'s micro-batch). Raises
  errors.UserError naming `setting` for anything else. `num_blocks=None` checks the spelling alone.
  """
  fail = lambda problem: errors.UserError(f'{setting}={text!r}: {problem}. Spell a plan as {PLAN_SPELLING}.')
  entries = [_parse_entry(entry, sequential, jacobi, fail) for entry in text.split(',')]
  if len(entries) == 1:
    return entries[0]
  if num_blocks is not None and len(entries) != num_blocks:
    raise fail(f'{len(entries)} entries for a model of {num_blocks} blocks')
  return Plan(tuple(entries), sequential.microbatch)


def _parse_entry(entry: str, sequential: Sequential, jacobi: Jacobi, fail) -> Union[Sequential, Jacobi]:
  """One entry of a plan's spelling: a decoder of one block."""
  kind, *options = entry.strip().split(':')
  if kind not in _KINDS:
    raise fail(f'unknown decoder {kind!r}' if kind else 'an empty entry')
  kind = _KINDS[kind]
  values = {}
  for option in options:
    key, eq, value = option.partition('=')
    if key in _KEYS[kind] and not eq:
      raise fail(f'{key} needs a value ({key}=...)')
    if key not in _KEYS[kind]:
      raise fail(f'{option!r} is not a setting of {kind} (it takes {", ".join(f"{k}=" for k in _KEYS[kind])})')
    if key in values:
      raise fail(f'{key} given twice in {entry!r}')
    try:
      values[key] = _KEYS[kind][key](value)
    except ValueError:
      raise fail(f'{key}={value!r} is not a number') from None
    if key == 'tol' and not math.isfinite(values[key]):
      raise fail(f'tol={value} is not a finite number')
    if key != 'init' and (values[key] < 0 or (key == 'chunks' and values[key] == 0)):
      raise fail(f'{key}={value} must be {"positive" if key == "chunks" else ">= 0"}')
    if key == 'init' and value not in INITIAL_GUESSES:
      raise fail(f'init={value!r} is none of {", ".join(INITIAL_GUESSES)}')
  if kind == 'seq':
    return dataclasses.replace(sequential, **values)
  if values.get('segment') and values.get('window'):
    raise fail(f'{entry!r} gives both segment= and window=: segments are solved in turn, a window slides; give one')
  if values.get('window') and values.get('init') == 'prev':
    raise fail("init=prev starts a segment from the one before; a window takes init=latent or init=zeros")
  if 'window' in values:
    values.setdefault('segment', 0)
  elif 'segment' in values:
    values['window'] = 0
  names = {'segment': 'segment', 'window': 'window', 'iters': 'max_iters', 'tol': 'tol', 'init': 'init'}
  return dataclasses.replace(jacobi, **{names[k]: v for k, v in values.items()})


def spell(decoder: Decoder, num_blocks: int, num_tokens: int) -> str:
  """The plan of `decoder`, one entry per block (block 0 first), every setting written out: `parse_plan` reads it back."""
  entries = []
  for i in range(num_blocks):
    d = decoder_of_block(decoder, i)
    if isinstance(d, Sequential):
      entries.append(f'seq:chunks={len(decode_chunks(num_tokens, d.chunks))}')
    elif d.slides(i):
      window, max_iters = d.for_block(i, num_tokens)
      entries.append(f'jacobi:window={window}:iters={max_iters}:tol={d.tol:g}:init={d.init}')
    else:
      segment, max_iters = d.for_block(i, num_tokens)
      entries.append(f'jacobi:segment={segment}:iters={min(max_iters, segment)}:tol={d.tol:g}:init={d.init}')
  return ','.join(entries)


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
    decoder: `Sequential` (exact, the default), `Jacobi`, or a `Plan` (one of
      them per block).
    return_iterations: also return the iterations each block took.
    return_trajectory: also return the per-block trajectory, as the
      reference's `reverse(..., return_sequence=True)`.
  Returns:
    (B, H, W, C) images on the [-1, 1] scale (not clipped). With
    `return_iterations` or `return_trajectory`, a tuple: the images, then
    the iterations if asked, then the trajectory if asked.
    iterations: a list over blocks (block 0 first) of int arrays with one
    entry per Jacobi segment (in micro-batches, the most of any micro-batch),
    or, for sequential decoding, per chunk (one iteration per token).
    trajectory: a list of num_blocks + 1 arrays (B, H, W, C): the noise as
    given (before the prior's scale), then the images after inverting each
    block, the last block first; its last entry is the images.
  """
  _check_sample_args(model, noise, labels, guidance, decoder)
  args = (model, variables, noise, labels, jnp.float32(guidance.weight), jnp.float32(guidance.attn_temp))
  static = dict(guided=guidance.enabled, guide_what=guidance.guide_what, annealed=guidance.annealed,
                decoder=decoder, trajectory=return_trajectory)
  microbatch = resolve_microbatch(model, decoder, noise.shape[0], guidance.enabled)
  if microbatch is None:
    images, iterations, trajectory = _sample(*args, **static)
  else:
    images, iterations, trajectory = _sample_in_microbatches(*args, microbatch=microbatch, **static)
  extras = ((iterations,) if return_iterations else ()) + ((trajectory,) if return_trajectory else ())
  return (images, *extras) if extras else images


def _check_sample_args(model, noise, labels, guidance, decoder):
  if not isinstance(decoder, (Sequential, Jacobi, Plan)):
    raise TypeError(f'decoder must be Sequential(chunks, microbatch), Jacobi(segment, max_iters, tol, init) or '
                    f'a Plan of them, got {decoder!r}.')
  if model.spec.noise_conditioning or any(isinstance(getattr(model.spec, f), tuple) for f in PER_BLOCK_FIELDS):
    raise errors.UserError('The model is conditioned on the noise level or shaped per block (iTARFlow): sample it '
                           'with iterative_sampling.sample.')
  if isinstance(decoder, Plan) and len(decoder.blocks) != model.spec.num_blocks:
    raise errors.UserError(f'The decoding plan has {len(decoder.blocks)} entries for a model of '
                           f'{model.spec.num_blocks} blocks: give one entry, or one per block.')
  want = (model.num_tokens, model.token_dim)
  if noise.ndim != 3 or tuple(noise.shape[1:]) != want:
    raise errors.UserError(f'Expected noise of shape (batch, {want[0]}, {want[1]}) (tokens, patch dim), '
                           f'got {tuple(noise.shape)}.')
  check_labels(labels, model.spec.num_classes)
  if guidance.enabled and not model.spec.num_classes and guidance.attn_temp == 1.0:
    raise errors.UserError('Guidance on an unconditional model compares the model with itself at attention '
                           'temperature attn_temp; with attn_temp=1.0 it does nothing. Set attn_temp (e.g. 0.5 to 0.9) '
                           'or guidance=0.')


def cache_bytes_per_sample(model: TarFlow, guided: bool) -> int:
  """Bytes of one block's key/value cache for one sample (two rows with guidance), all its tokens."""
  spec = model.spec
  rows = 2 if guided else 1
  return rows * spec.layers_per_block * 2 * model.num_tokens * spec.channels * jnp.dtype(spec.dtype).itemsize


def auto_microbatch(batch: int, sample_bytes: int, cache_bytes: int) -> Optional[int]:
  """The micro-batch for `batch` samples of `sample_bytes` of key/value cache each on a CPU of `cache_bytes`.

  The largest divisor of the batch whose cache takes at most half the last-level cache (the rest
  holds the weights and activations that each step also reads), or None (the whole batch) when the
  batch's cache fits, or when the cache size is unknown (0).
  """
  budget = cache_bytes // 2
  if not cache_bytes or batch * sample_bytes <= budget:
    return None
  return max(m for m in range(1, batch + 1) if batch % m == 0 and (m * sample_bytes <= budget or m == 1))


def resolve_microbatch(model: TarFlow, decoder: Decoder, batch: int, guided: bool) -> Optional[int]:
  """The samples decoded at a time by `decoder` (None: the whole batch); 'auto' by `auto_microbatch` on a CPU."""
  microbatch = None if isinstance(decoder, Jacobi) else decoder.microbatch
  if microbatch == 'auto':
    if platforms.target() != 'cpu':  # the platform traced for (a TPU slice's, ahead of time)
      return None
    microbatch = auto_microbatch(batch, cache_bytes_per_sample(model, guided), platforms.last_level_cache_bytes())
  if microbatch is None or microbatch == batch:
    return None
  if not isinstance(microbatch, int) or isinstance(microbatch, bool):
    raise errors.UserError(f"microbatch must be a number of samples, 'auto' or None, got {microbatch!r}.")
  sharding.check_microbatch(batch, microbatch)
  return microbatch


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
  """(images (B, H, W, C), iterations, trajectory) as `sample` returns them (trajectory None unless asked)."""
  batch = noise.shape[0]
  image = lambda x: unpatchify(x, model.spec.patch_size, model.spec.img_size)  # (B, T, D) -> (B, H, W, C)
  x = noise.astype(flow_dtype(model.spec.dtype))
  steps = [image(x)] if trajectory else None
  x = x * jnp.sqrt(variables['prior']['var'])  # (B, T, D)
  cond = _conditioning(model, labels, batch, weight, attn_temp, guided=guided, guide_what=guide_what,
                       annealed=annealed)
  iterations = [None] * model.spec.num_blocks
  for i in reversed(range(model.spec.num_blocks)):
    x, iterations[i] = _invert_block(model, variables, i, cond, x, decoder_of_block(decoder, i))
    if trajectory:
      steps.append(image(x))
  return image(x), iterations, steps


def _invert_block(model, variables, i: int, cond: _Conditioning, z: Array, decoder: Union[Sequential, Jacobi]):
  """Block i's input from its output z (B, T, D) by `decoder`, and the iterations of its segments or chunks."""
  batch, num_tokens, _ = z.shape
  step = _inverse_step_of_block(model, variables, i, cond)
  cache = model.apply(variables, batch * cond.branches, 0, method=on_block(i, FlowBlock.init_cache))
  if isinstance(decoder, Jacobi) and decoder.slides(i):
    window, max_iters = decoder.for_block(i, num_tokens)
    return _invert_block_by_window(step, _tokens_of_block(model, variables, i), cache, z, window, max_iters,
                                   decoder.tol, decoder.init)
  if isinstance(decoder, Jacobi):
    segment, max_iters = decoder.for_block(i, num_tokens)
    return _invert_block_by_jacobi(step, _tokens_of_block(model, variables, i), cache, z, segment, max_iters,
                                   decoder.tol, decoder.init)
  lengths = [stop - start for start, stop in decode_chunks(num_tokens, decoder.chunks)]
  return _invert_block_sequentially(step, cache, z, decoder.chunks), jnp.asarray(lengths)


@functools.partial(jax.jit, static_argnames=('model', 'block', 'guided', 'guide_what', 'annealed', 'decoder'))
def invert_block(model, variables, block: int, z: Array, labels: Optional[Array], weight, attn_temp, *, guided: bool,
                 guide_what: str, annealed: bool, decoder: Union[Sequential, Jacobi]):
  """Block `block` alone inverted from its output z (B, T, D) (original order): its input and the iterations.

  The guidance is `sample`'s, given as `Guidance`'s fields (weight and attn_temp as arrays).
  """
  cond = _conditioning(model, labels, z.shape[0], weight, attn_temp, guided=guided, guide_what=guide_what,
                       annealed=annealed)
  return _invert_block(model, variables, block, cond, z, decoder)


@functools.partial(jax.jit, static_argnames=_STATIC + ('microbatch',))
def _sample_in_microbatches(model, variables, noise, labels, weight, attn_temp, *, microbatch, **static):
  """`_sample` over micro-batches in turn (`lax.map`); the iterations are the most of any micro-batch."""
  groups = noise.shape[0] // microbatch
  split = lambda a: None if a is None else sharding.split_microbatches(a, groups)  # (groups, microbatch, ...)
  merge = sharding.merge_microbatches

  def decode(group):
    return _sample(model, variables, *group, weight, attn_temp, **static)

  images, iterations, trajectory = jax.lax.map(decode, (split(noise), split(labels)))
  iterations = [its.max(axis=0) for its in iterations]
  return merge(images), iterations, None if trajectory is None else [merge(x) for x in trajectory]


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


def _tokens_of_block(model, variables, i):
  """Block i's reading order: `read(x, t, size)` (B, size, D) and `write(x, tokens, t)` over x (B, T, D)."""
  read = lambda x, t, size: model.apply(variables, x, t, size, method=on_block(i, FlowBlock._read))  # pylint: disable=protected-access
  write = lambda x, tokens, t: model.apply(variables, x, tokens, t, method=on_block(i, FlowBlock._write))  # pylint: disable=protected-access
  return read, write


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


def _invert_block_by_jacobi(step, tokens, cache, z: Array, segment: int, max_iters: int, tol: float, init: str):
  """A block's input from its output z (B, T, D) by Jacobi iterations over segments of tokens.

  `tokens`: the block's (read, write) (`_tokens_of_block`), for the initial guess `init`.
  Returns the input (B, T, D) and the iterations of each segment (n,).
  """
  read, write = tokens
  num_tokens = z.shape[1]
  x, iterations = z, []  # the tokens not solved yet hold their latent
  for start in range(0, num_tokens - 1, segment):  # inputs start..start+size-1 give tokens start+1..start+size
    size = min(segment, num_tokens - 1 - start)
    if init == 'zeros':
      x = write(x, jnp.zeros_like(read(x, start + 1, size)), start + 1)
    elif init == 'prev' and start:
      x = write(x, read(x, start + 1 - segment, size), start + 1)  # the segment before, solved
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


def _invert_block_by_window(step, tokens, cache, z: Array, window: int, max_iters: int, tol: float, init: str):
  """A block's input from its output z (B, T, D) by Jacobi iterations over a window that slides past settled tokens.

  See `Jacobi`. Tokens 1..first-1 have settled (token 0 is its own inverse); each iteration updates
  the `window` tokens from `first` on (from T - window at the end, keeping the settled ones), then
  moves `first` past the first token that changed by more than `tol` (or past the window), for the
  whole batch at once. Returns the input (B, T, D) and the iterations (1,).
  """
  read, write = tokens
  steps = z.shape[1] - 1
  x = write(z, jnp.zeros_like(read(z, 1, steps)), 1) if init == 'zeros' else z
  cache = extend_cache(cache, steps)  # inputs 0..T-2
  offsets = jnp.arange(window)

  def not_done(state):
    count, first, _, _ = state
    return (first <= steps) & (count < max_iters)

  def iterate(state):
    count, first, x, cache = state
    start = jnp.minimum(first - 1, steps - window)  # inputs start..start+window-1 give tokens start+1..
    new, cache = step(x, z, start, cache, window)
    outputs = start + 1 + offsets  # (W,) the window's tokens
    settled = (outputs < first)[None, :, None]
    old = read(x, start + 1, window)  # (B, W, D)
    new = jnp.where(settled, old, read(new, start + 1, window))
    moved = (jnp.max(jnp.abs(new - old), axis=(0, 2)) > tol) & (outputs >= first)  # (W,)
    last = jnp.where(moved.any(), outputs[jnp.argmax(moved)], outputs[-1])  # settled up to here now
    return count + 1, last + 1, write(x, new, start + 1), cache

  count, _, x, _ = jax.lax.while_loop(not_done, iterate, (0, 1, x, cache))
  return x, count[None]


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
