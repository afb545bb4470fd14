"""Pixels between uint8 and the model's [-1, 1] scale."""

import numpy as np

from tarflow_jax import images


def test_from_uint8_and_to_uint8_are_inverses():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = np.asarray(images.from_uint8(pixels))
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(images.to_uint8(x), pixels)
  np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, 3.0])), [0, 255])  # clipped
