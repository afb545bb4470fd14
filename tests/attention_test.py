"""Every attention kernel computes the einsum path's function: cuDNN's layout, splash (Pallas, interpreted)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import attention
from tarflow_jax.model import Spec, TarFlow
import toy


def mesh(n):
  return jax.make_mesh((n, 1), ('data', 'fsdp'), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,) * 2)


def qkv(shape, dtype, seed=0):
  return tuple(jax.random.normal(jax.random.key(seed + i), shape, dtype) for i in range(3))


def weighted_sum(kernel, temperature, q, k, v):
  """A scalar of the attention output with every element weighted differently (so gradients are too)."""
  out = attention.causal_attention(q / temperature[:, None, None, None], k, v, scale=q.shape[-1] ** -0.5,
                                   kernel=kernel).astype(jnp.float32)
  return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cudnn_layout_mask_and_scale_equal_the_einsum_path(dtype):
  # 'cudnn' is jax.nn.dot_product_attention; off a GPU it runs jax.nn's XLA implementation.
  q, k, v = qkv((3, 7, 2, 16), dtype)
  einsum = attention.causal_attention(q, k, v, scale=0.25, kernel='einsum')
  cudnn = attention.causal_attention(q, k, v, scale=0.25, kernel='cudnn')
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(einsum, np.float32), atol=tol, rtol=tol)
  # A check that can fail: the first token sees only itself.
  np.testing.assert_allclose(np.asarray(cudnn[:, 0], np.float32), np.asarray(v[:, 0], np.float32), atol=tol)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_splash_equals_the_einsum_path_forward_and_gradient(dtype):
  # Pallas splash attention in interpret mode, split over a 2-device mesh as in training, with a
  # per-example attention temperature.
  q, k, v = qkv((2, 128, 2, 64), dtype)
  temperature = jnp.array([0.7, 1.3], dtype)
  value_and_grad = lambda kernel: jax.value_and_grad(functools.partial(weighted_sum, kernel, temperature),
                                                     argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh(2)):
    splash = value_and_grad('splash')
  einsum = value_and_grad('einsum')
  with jax.enable_x64(True):  # both against float64 einsums
    exact = jax.value_and_grad(functools.partial(weighted_sum, 'einsum', temperature.astype(jnp.float64)),
                               argnums=(0, 1, 2))(*(x.astype(jnp.float64) for x in (q, k, v)))
  for got, ref in zip(jax.tree.leaves(splash), jax.tree.leaves(exact)):
    ref = np.asarray(ref)
    if dtype == jnp.float32:
      np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * max(1.0, np.abs(ref).max()))
  # In bfloat16 splash is as close to float64 as the einsum path is (inputs and outputs are rounded).
  for got, base, ref in zip(jax.tree.leaves(splash), jax.tree.leaves(einsum), jax.tree.leaves(exact)):
    ref = np.asarray(ref, np.float64)
    err = lambda a: np.abs(np.asarray(a, np.float64) - ref).max()
    assert err(got) <= 2 * err(base) + 1e-6 * np.abs(ref).max(), (err(got), err(base))


def test_splash_falls_back_to_einsums_where_it_does_not_apply():
  # 49 tokens (not a multiple of 128): splash leaves them to the einsums, with the same result.
  q, k, v = qkv((2, 49, 2, 64), jnp.float32)
  with jax.set_mesh(mesh(2)):
    program = str(jax.make_jaxpr(lambda: attention.causal_attention(q, k, v, scale=0.125, kernel='splash'))())
  assert 'pallas_call' not in program
  for tokens in (256, 384):  # any multiple of 128 (384: tiles of 128)
    with jax.set_mesh(mesh(2)):
      program = str(jax.make_jaxpr(lambda: attention.causal_attention(
          *qkv((2, tokens, 2, 64), jnp.float32), scale=0.125, kernel='splash'))())
    assert 'pallas_call' in program


def test_auto_picks_the_kernel_of_the_target_platform():
  assert attention.resolve('auto', 'tpu') == 'splash'
  assert attention.resolve('auto', 'gpu') == 'cudnn'
  assert attention.resolve('auto', 'cpu') == 'einsum'
  assert attention.resolve('einsum', 'tpu') == 'einsum'
  with pytest.raises(ValueError, match='Unknown attention kernel'):
    attention.resolve('flash', 'tpu')


def test_a_model_with_splash_attention_trains_like_the_einsum_model():
  # 256 tokens (32x32, patch 2): the smallest square grid that splash takes. One train step on 2 devices.
  model = TarFlow(Spec(in_channels=1, img_size=32, patch_size=2, channels=64, num_blocks=2, layers_per_block=1,
                       num_classes=0, attention_kernel='splash'))
  variables = toy.random_variables(model)
  x = toy.images(model, batch=2)

  def loss(kernel, params):
    with_kernel = model.clone(spec=dataclasses.replace(model.spec, attention_kernel=kernel))
    z, logdets, _ = with_kernel.apply({'params': params, 'prior': variables['prior']}, x)
    return 0.5 * jnp.mean(z**2) - jnp.mean(logdets)

  with jax.set_mesh(mesh(2)):
    splash = jax.value_and_grad(functools.partial(loss, 'splash'))(variables['params'])
  einsum = jax.value_and_grad(functools.partial(loss, 'einsum'))(variables['params'])
  np.testing.assert_allclose(splash[0], einsum[0], rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), splash[1], einsum[1])
