"""Exact likelihood of a TarFlow: training loss, log-density, bits per dim."""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from tarflow_jax.model import TarFlow

Array = jax.Array

# Width of one 8-bit pixel bin on the [-1, 1] scale is 2 / 256 = 1 / 128.
LOG_BIN_WIDTH = -math.log(128.0)
# Per-dim constant of the standard normal's log-density, in nats: what `loss` leaves out of -log p(x) / N.
GAUSS_CONST = 0.5 * math.log(2 * math.pi)


def loss(z: Array, logdets: Array, weights: Optional[Array] = None) -> Array:
  """The training objective, per dimension: `0.5 * mean(z**2) - mean(logdets)` (-log p(x) / N - GAUSS_CONST).

  With `weights` (B,), the mean over images of each one's objective times its weight (iTARFlow's
  reweighting by noise level): `mean((0.5 * mean(z_i**2) - logdets_i) * w_i)`.
  """
  if weights is None:
    return 0.5 * jnp.mean(z**2) - jnp.mean(logdets)
  per_image = 0.5 * jnp.mean(z**2, axis=(1, 2)) - logdets  # (B,)
  return jnp.mean(per_image * weights)


def log_prob_from_latent(z: Array, logdets: Array) -> Array:
  """Per-image log p(x) (B,) in nats, from z (B, T, D) and the per-dim logdets (B,).

  The prior is a standard normal, as in the reference's loss and evaluation
  (the learned variance of `nvp=False` models only scales the sampling noise).
  """
  z = z.reshape(z.shape[0], -1)
  n = z.shape[1]
  return jnp.sum(-0.5 * (z**2 + math.log(2 * math.pi)), axis=1) + n * logdets


def log_prob(model: TarFlow, variables, x: Array, y: Optional[Array] = None,
             noise_level: Optional[Array] = None) -> Array:
  """Per-image log-density (B,) of images x (B, H, W, C) on the [-1, 1] scale (at `noise_level` (B,), for a
  noise-conditioned model)."""
  z, logdets, _ = model.apply(variables, x, y, noise_level)
  return log_prob_from_latent(z, logdets)


def dequantize(x_int: Array, u: Array) -> Array:
  """Integer pixels 0..255 plus uniform noise in [0, 1) to the [-1, 1] scale."""
  return (x_int + u) / 256.0 * 2.0 - 1.0


def to_bits_per_dim(nll: Array) -> Array:
  """-log p(x) / N in nats, of dequantised images on [-1, 1], to bits per dimension of the 8-bit images.

  `(nll - log(1/128)) / log 2`: each dimension's 8-bit bin is 1/128 wide on the [-1, 1] scale.
  """
  return (nll - LOG_BIN_WIDTH) / math.log(2.0)


def bits_per_dim(model: TarFlow, variables, x_int: Array, u: Array, y: Optional[Array] = None,
                 noise_level: Optional[float] = None) -> Array:
  """Bits per dimension (B,) of 8-bit images under uniform dequantisation (a noise-conditioned model's at
  `noise_level`).

  Args:
    x_int: (B, H, W, C) integer pixel values 0..255 (any numeric dtype).
    u: (B, H, W, C) uniform noise in [0, 1).
  Returns:
    `to_bits_per_dim(-log p(x) / N)` per image, N = H * W * C.
  """
  x = dequantize(x_int.astype(jnp.float32), u.astype(jnp.float32))
  n = math.prod(x.shape[1:])
  level = None if noise_level is None else jnp.full((x.shape[0],), noise_level)
  return to_bits_per_dim(-log_prob(model, variables, x, y, level) / n)
