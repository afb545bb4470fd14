"""iTARFlow's sampling (apple/ml-itarflow): the stack inverted at a noise level, then iterative denoising.

`reverse(model, variables, noise, labels, noise_level=t1, guidance=Guidance(...))` decodes every block
of a noise-conditioned model (`Spec.noise_conditioning`) at the noise level t1, with iTARFlow's two
guidance styles; `iterative_denoise(model, variables, x, labels, denoising=IterativeDenoising(...))`
then walks the images from t1 down to 0 (`IterativeDenoising`). `sample` is both, as the reference's
evaluation samples. Each block's inverse step is the model's (`FlowBlock.inverse_step`), run token
after token by `sampling`'s sequential decoder.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from tarflow_jax import errors, likelihood, sampling
from tarflow_jax.model import FlowBlock, TarFlow, check_labels, flow_dtype, on_block, repatchify, unpatchify

Array = jax.Array

STYLES = ('tarflow', 'starflow')


@dataclasses.dataclass(frozen=True)
class Guidance:
  """iTARFlow's classifier-free guidance of the scale `sigma = exp(a)` and the shift `mu = b` of each token.

  With `weight` w > 0 the conditional and the unconditional branch (label -1, the mean class
  embedding; attention temperature `attn_temp`) run as one batch of 2B. `style`:
  'tarflow': `sigma = sigma_c + w (sigma_c - sigma_u)`, `mu = mu_c + w (mu_c - mu_u)`;
  'starflow': with `s = min(sigma_c / sigma_u, 1)^2`, `sigma = sigma_c / sqrt(1 + w - w s)` and
  `mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)` (the product of the two Gaussians, the
  conditional's to the power 1 + w, the unconditional's to -w), on the first block decoded only.
  `flows`: how many blocks are guided, in decoding order (the last block first); -1 all of them.
  `annealed` ramps the weight over each block's tokens, `w (t + 1) / (T - 1)`.

  `first_image_s`: 'starflow' as ml-itarflow's code computes it, where a broadcast of (B, D) against
  (B, 1, D) makes every image's `mu` mix with the first image's `s` (its `sigma` keeps its own);
  the same for a batch of one. Off (the default), each image uses its own `s`, the formula above.
  """
  weight: float = 0.0
  style: str = 'tarflow'
  attn_temp: float = 1.0
  annealed: bool = False
  flows: int = -1
  first_image_s: bool = False

  def __post_init__(self):
    if self.style not in STYLES:
      raise errors.UserError(f'guidance style must be one of {STYLES}, got {self.style!r}.')
    if self.weight < 0:
      raise errors.UserError(f'guidance must be >= 0, got {self.weight}.')

  @property
  def enabled(self) -> bool:
    return bool(self.weight > 0)

  def guided_blocks(self, num_blocks: int) -> int:
    """How many blocks, in decoding order, are guided."""
    if not self.enabled:
      return 0
    if self.style == 'starflow':
      return 1
    return num_blocks if self.flows < 0 else min(self.flows, num_blocks)


def _combine(a: Array, b: Array, t: Array, *, weights: Array, style: str, first_image_s: bool):
  """Guided (a, b) (B, S, D) for tokens t+1..t+S from both branches' (2B, S, D); weights (T - 1,) per token."""
  w = jax.lax.dynamic_slice_in_dim(weights, t, a.shape[1])[None, :, None]  # (1, S, 1)
  (a, a_u), (mu, mu_u) = jnp.split(a, 2), jnp.split(b, 2)
  sigma, sigma_u = jnp.exp(a), jnp.exp(a_u)
  if style == 'tarflow':
    sigma = sigma + w * (sigma - sigma_u)
    mu = mu + w * (mu - mu_u)
  else:
    s = jnp.square(jnp.minimum(sigma / sigma_u, 1.0))  # (B, S, D)
    sigma = sigma / jnp.sqrt(1 + w - w * s)
    if first_image_s:  # as the reference's broadcast: every mean mixes with the first image's s
      s = s[:1]
    mu = ((1 + w) * mu - w * s * mu_u) / (1 + w - w * s)
  return jnp.log(sigma), mu  # a non-positive guided sigma ('tarflow', w large) gives NaN


def reverse(model: TarFlow, variables, noise: Array, labels: Optional[Array] = None, *, noise_level: float,
            guidance: Guidance = Guidance(), chunks: int = 8) -> Array:
  """Images (B, H, W, C) from Gaussian noise (B, T, D) (the last block's patch layout), at `noise_level`.

  The reference's `Model.reverse(noise, y, t=full(noise_level), ...)`: the noise is scaled by the
  prior's standard deviation, and every block is inverted token after token (`sampling.Sequential`
  with `chunks`), last to first, re-patchified between blocks of different patch sizes. Labels
  (B,) as `sampling.sample`'s.
  """
  _check_args(model, noise, labels, guidance)
  return _reverse(model, variables, noise, labels, jnp.float32(noise_level), jnp.float32(guidance.weight),
                  jnp.float32(guidance.attn_temp), style=guidance.style, first_image_s=guidance.first_image_s,
                  annealed=guidance.annealed,
                  guided_blocks=guidance.guided_blocks(model.spec.num_blocks), chunks=chunks)


def _check_args(model, noise, labels, guidance):
  if not model.spec.noise_conditioning:
    raise errors.UserError('iterative_sampling is for models conditioned on the noise level (noise_conditioning=True); '
                           'sample a TarFlow with sampling.sample.')
  want = (model.num_tokens, model.token_dim)
  if noise.ndim != 3 or tuple(noise.shape[1:]) != want:
    raise errors.UserError(f'Expected noise of shape (batch, {want[0]}, {want[1]}) (tokens, patch dim of the last '
                           f'block), got {tuple(noise.shape)}.')
  check_labels(labels, model.spec.num_classes)
  if guidance.enabled and not model.spec.num_classes and guidance.attn_temp == 1.0:
    raise errors.UserError('Guidance on an unconditional model compares the model with itself at attention '
                           'temperature attn_temp; with attn_temp=1.0 it does nothing. Set attn_temp or guidance=0.')


@functools.partial(jax.jit, static_argnames=('model', 'style', 'first_image_s', 'annealed', 'guided_blocks', 'chunks'))
def _reverse(model, variables, noise, labels, noise_level, weight, attn_temp, *, style, first_image_s, annealed,
             guided_blocks, chunks):
  spec = model.spec
  batch = noise.shape[0]
  patch_sizes = spec.patch_sizes
  log_level = jnp.full((batch,), jnp.log(noise_level))  # (B,)
  x = noise.astype(flow_dtype(spec.dtype)) * jnp.sqrt(variables['prior']['var'])  # (B, T, D)
  for n, i in enumerate(reversed(range(spec.num_blocks))):  # n: blocks decoded before block i
    x = repatchify(x, patch_sizes[min(i + 1, spec.num_blocks - 1)], patch_sizes[i], spec.img_size)  # (B, T_i, D_i)
    num_tokens = spec.block(i).num_tokens
    rows, temperature, guide = labels, None, None
    row_levels = log_level
    if n < guided_blocks:
      cond = labels if labels is not None else jnp.full((batch,), -1, jnp.int32)
      rows = jnp.concatenate([cond, jnp.full((batch,), -1, cond.dtype)]) if spec.num_classes else None  # (2B,)
      temperature = jnp.concatenate([jnp.ones((batch,)), jnp.full((batch,), attn_temp)])  # (2B,)
      row_levels = jnp.concatenate([log_level, log_level])  # (2B,)
      steps = jnp.arange(num_tokens - 1)
      weights = weight * (steps + 1) / (num_tokens - 1) if annealed else jnp.full(steps.shape, weight)  # (T_i - 1,)
      guide = functools.partial(_combine, weights=weights, style=style, first_image_s=first_image_s)
    method = on_block(i, FlowBlock.inverse_step)

    def step(x, z, t, cache, size=1, *, rows=rows, temperature=temperature, guide=guide, row_levels=row_levels,
             method=method):
      return model.apply(variables, x, z, t, cache, rows, temperature, guide, size, row_levels, method=method)

    cache = model.apply(variables, batch * (2 if guide else 1), 0, method=on_block(i, FlowBlock.init_cache))
    x = sampling._invert_block_sequentially(step, cache, x, chunks)  # pylint: disable=protected-access
  return unpatchify(x, patch_sizes[0], spec.img_size)


DYNAMICS = ('ode', 'sde')


@dataclasses.dataclass(frozen=True)
class IterativeDenoising:
  """iTARFlow's iterative denoising: `steps` rounds at noise levels `linspace(t1, t0, steps)`, then 0.

  At each level t: one self-denoising step `x0 = x + t^2 grad_x log p(x | t)` (Tweedie, with the
  model at level t; `clip` clamps x0 to [-1, 1]), `v = (x - x0) / t`, then to the next level t':
  'ode' `x - v (t - t')`; 'sde' (the reference's 'sde_vanilla') `x0 + t' v'` with
  `v' = sqrt(a) v + sqrt(1 - a) eps`, `a = (t' / t)^2`, eps fresh Gaussian noise. The last round
  always ends at x0. An image whose values turn non-finite keeps them and stops there.
  """
  t0: float = 1e-2
  t1: float = 3e-1
  steps: int = 10
  dynamics: str = 'ode'
  clip: bool = False

  def __post_init__(self):
    if self.dynamics not in DYNAMICS:
      raise errors.UserError(f'iterative denoising dynamics must be one of {DYNAMICS}, got {self.dynamics!r}.')
    if not 0 < self.t0 <= self.t1:
      raise errors.UserError(f'iterative denoising needs 0 < t0 <= t1, got t0={self.t0}, t1={self.t1}.')
    if self.steps < 1:
      raise errors.UserError(f'iterative denoising needs steps >= 1, got {self.steps}.')

  @property
  def enabled(self) -> bool:
    """Always: the samples of a noise-conditioned model are denoised (as `sampling.Denoising.enabled`)."""
    return True

  def levels(self) -> Array:
    """The noise levels (steps + 1,): linspace(t1, t0, steps), then 0."""
    return jnp.concatenate([jnp.linspace(self.t1, self.t0, self.steps, dtype=jnp.float32), jnp.zeros((1,))])


def iterative_denoise(model: TarFlow, variables, x: Array, labels: Optional[Array] = None, *,
                      denoising: IterativeDenoising, rng: Optional[Array] = None,
                      draws: Optional[Array] = None) -> Array:
  """Images x (B, H, W, C) at noise level `denoising.t1` walked down to clean images (see `IterativeDenoising`).

  'sde' takes its Gaussian noise from `draws` (steps - 1, B, H, W, C), one per round but the last, or
  draws it from `rng`.
  """
  if not model.spec.noise_conditioning:
    raise errors.UserError('Iterative denoising needs a model conditioned on the noise level (noise_conditioning=True).')
  check_labels(labels, model.spec.num_classes)
  rounds = denoising.steps
  if denoising.dynamics == 'sde':
    if draws is None:
      if rng is None:
        raise errors.UserError('Iterative denoising with dynamics="sde" needs rng (or the draws).')
      draws = jax.random.normal(rng, (rounds - 1, *x.shape), flow_dtype(model.spec.dtype))
    if draws.shape != (rounds - 1, *x.shape):
      raise errors.UserError(f'Expected draws of shape {(rounds - 1, *x.shape)} (steps - 1 rounds of images), '
                             f'got {tuple(draws.shape)}.')
    draws = jnp.concatenate([draws, jnp.zeros((1, *x.shape), draws.dtype)])  # (steps, B, H, W, C); last unused
  return _iterate(model, variables, x, labels, denoising.levels(), draws, dynamics=denoising.dynamics,
                  clip=denoising.clip)


@functools.partial(jax.jit, static_argnames=('model', 'dynamics', 'clip'))
def _iterate(model, variables, x, labels, levels, draws, *, dynamics, clip):
  """`iterative_denoise`: one `lax.scan` over the rounds; levels (steps + 1,), draws (steps, B, H, W, C) or None."""
  rounds = levels.shape[0] - 1
  log_density = lambda x, t: likelihood.log_prob(model, variables, x, labels, jnp.full((x.shape[0],), t)).sum()

  def one_round(carry, inputs):
    x, stopped = carry  # (B, H, W, C), (B,)
    i, t, t_next, eps = inputs
    x0 = x + t**2 * jax.grad(log_density)(x, t)  # self-denoising at level t
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    v = (x - x0) / t
    if dynamics == 'sde':
      alpha = (t_next / t)**2
      stochastic = x0 + t_next * (jnp.sqrt(alpha) * v + jnp.sqrt(1 - alpha) * eps)
      new = jnp.where(i < rounds - 1, stochastic, x - v * (t - t_next))
    else:
      new = x - v * (t - t_next)
    new = jnp.where(stopped[:, None, None, None], x, new)
    stopped = stopped | ~jnp.all(jnp.isfinite(new), axis=(1, 2, 3))
    return (new, stopped), None

  eps = draws if draws is not None else jnp.zeros((rounds, 1, 1, 1, 1), x.dtype)
  inputs = (jnp.arange(rounds), levels[:-1], levels[1:], eps)
  (x, _), _ = jax.lax.scan(one_round, (x, jnp.zeros((x.shape[0],), bool)), inputs)
  return x


def from_config(config, **overrides) -> tuple[Guidance, IterativeDenoising]:
  """The guidance and iterative denoising of a config (`sample` and `itarflow` fields); `overrides` of
  either's fields (by name) in place of some."""
  s, it = config.sample, config.itarflow
  weight = s.guidance if config.model.num_classes or s.attn_temp != 1.0 else 0.0  # as sampling.guidance_from_config
  guidance = dict(weight=weight, style=it.guidance_style, attn_temp=s.attn_temp, annealed=s.annealed_guidance,
                  flows=it.guide_flows)
  denoising = dict(t0=it.t0, t1=it.t1, steps=it.steps, dynamics=it.dynamics, clip=it.clip)
  unknown = set(overrides) - set(guidance) - set(denoising)
  if unknown:
    raise TypeError(f'Unknown iterative sampling settings {sorted(unknown)}.')
  guidance.update({k: v for k, v in overrides.items() if k in guidance})
  denoising.update({k: v for k, v in overrides.items() if k in denoising})
  return Guidance(**guidance), IterativeDenoising(**denoising)


def sample(model: TarFlow, variables, noise: Array, labels: Optional[Array] = None, *,
           guidance: Guidance = Guidance(), denoising: IterativeDenoising = IterativeDenoising(),
           rng: Optional[Array] = None, chunks: int = 8) -> Array:
  """iTARFlow's samples, as its evaluation draws them: `reverse` at noise level t1, then `iterative_denoise`."""
  x = reverse(model, variables, noise, labels, noise_level=denoising.t1, guidance=guidance, chunks=chunks)
  return iterative_denoise(model, variables, x, labels, denoising=denoising, rng=rng)
