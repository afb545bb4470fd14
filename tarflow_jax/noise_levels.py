"""iTARFlow's training noise: a noise level t per image, and the weight its loss gets.

Training draws t in [t0, t1] for every image, adds Gaussian noise of std t, conditions the model on t
(`Spec.noise_conditioning`) and weights each image's loss by a function of t (apple/ml-itarflow's
train.py: `--t_sample`, `--reweight`).
"""

import jax
import jax.numpy as jnp

from tarflow_jax import errors

Array = jax.Array

# 'uniform': t uniform in [t0, t1] (the reference's 'uni'); 'square_uniform': t^2 uniform in [t0^2, t1^2] ('linear').
T_SAMPLES = ('uniform', 'square_uniform')
# The weight of an image's loss: 1, t, t / (t0 + t1), t^2, t^2 / (t0^2 + t1^2) (the reference's 'ones', 't',
# 't_norm', 'sqr_t', 'sqr_t_norm').
REWEIGHTS = ('none', 't', 't_norm', 't_squared', 't_squared_norm')


def check(t0: float, t1: float, t_sample: str, reweight: str) -> None:
  """Raises errors.UserError for settings `draw` and `loss_weights` cannot take."""
  if not 0 < t0 <= t1:
    raise errors.UserError(f'Noise levels need 0 < t0 <= t1, got t0={t0}, t1={t1}.')
  if t_sample not in T_SAMPLES:
    raise errors.UserError(f't_sample={t_sample!r} is not one of {T_SAMPLES}.')
  if reweight not in REWEIGHTS:
    raise errors.UserError(f'reweight={reweight!r} is not one of {REWEIGHTS}.')


def draw(rng: Array, batch: int, t0: float, t1: float, t_sample: str) -> Array:
  """Noise levels (B,) in [t0, t1]: uniform, or with t^2 uniform ('square_uniform')."""
  u = jax.random.uniform(rng, (batch,))
  if t_sample == 'uniform':
    return t0 + u * (t1 - t0)
  return jnp.sqrt(t0**2 + u * (t1**2 - t0**2))


def loss_weights(t: Array, t0: float, t1: float, reweight: str) -> Array:
  """The weight (B,) of each image's loss at its noise level t (B,)."""
  return {
      'none': lambda: jnp.ones_like(t),
      't': lambda: t,
      't_norm': lambda: t / (t0 + t1),
      't_squared': lambda: t**2,
      't_squared_norm': lambda: t**2 / (t0**2 + t1**2),
  }[reweight]()
