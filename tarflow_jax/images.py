"""Pixels between uint8 and the model's [-1, 1] scale, grids and PNG files."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tarflow_jax import storage


def from_uint8(x) -> jax.Array:
  """(..., H, W, C) pixels 0..255 (any numeric dtype) to float32 on [-1, 1]; the inverse of `to_uint8`."""
  return jnp.asarray(x).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
  """(..., H, W, C) in [-1, 1] to uint8 0..255 (clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, columns: int = 0, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 to one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, columns)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = im
  return out


def save_png(path: str, image: np.ndarray) -> None:
  """Writes one (H, W, C) uint8 image to a local or remote (gs://) path, whole or not at all, making the folder."""
  with storage.atomic_output(str(path)) as f:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format='PNG')
