"""The workarounds for XLA's CPU backend compute what the plain functions they replace compute, derivatives included."""

import contextlib
import functools
import io
import os
import re

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import attention, xla_cpu
from tarflow_jax import model as model_lib


def qkv(shape, dtype, seed=0):
  return tuple(jax.random.normal(jax.random.key(seed + i), shape, dtype) for i in range(3))


def test_the_switch_is_on_for_the_cpu_only_and_can_turn_each_workaround_off():
  assert all(xla_cpu.active(name) for name in xla_cpu.WORKAROUNDS)  # the tests run on the CPU
  with xla_cpu.turned_off('gelu', 'dense'):
    assert [xla_cpu.active(name) for name in xla_cpu.WORKAROUNDS] == [False, True, False, True]
  assert all(xla_cpu.active(name) for name in xla_cpu.WORKAROUNDS)
  with pytest.raises(ValueError, match='No such workarounds'):
    with xla_cpu.turned_off('fusion'):
      pass


def plain_causal_attention(q, k, v, scale):
  """Causal softmax attention over (B, T, H, hd), written out in float64 for the checks below."""
  logits = jnp.einsum('bshd,bthd->bhst', q, k) * scale
  t = q.shape[1]
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  weights = jnp.exp(logits - logits.max(-1, keepdims=True))
  return jnp.einsum('bhst,bthd->bshd', weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize('workaround', [True, False])
def test_cpu_attention_and_its_written_out_derivatives_equal_a_float64_recomputation(workaround):
  # On a CPU the einsum path's tangent map is written by hand (xla_cpu._causal_core): its value,
  # its reverse-mode gradient (the backward pass of training), its forward-mode Jacobian (the
  # log-determinant checks) and a second derivative against plain attention differentiated by JAX.
  with jax.enable_x64(True), xla_cpu.turned_off(*() if workaround else ('attention',)):
    q, k, v = qkv((3, 7, 2, 4), jnp.float64)
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float64)
    attend = lambda q, k, v: attention.causal_attention(q, k, v, scale=0.5, kernel='einsum')
    plain = functools.partial(plain_causal_attention, scale=0.5)
    f32 = lambda *arrays: tuple(a.astype(jnp.float32) for a in arrays)
    for fn, args, tol in ((attend, f32(q, k, v), 2e-6), (attend, (q, k, v), 1e-12)):
      np.testing.assert_allclose(fn(*args), plain(q, k, v), atol=tol, rtol=tol)
      loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights.astype(a[0].dtype))
      for got, want in zip(jax.grad(loss(fn), argnums=(0, 1, 2))(*args), jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
      for arg in range(3):
        np.testing.assert_allclose(jax.jacfwd(fn, argnums=arg)(*args), jax.jacfwd(plain, argnums=arg)(q, k, v),
                                   atol=tol, rtol=tol)
    curvature = lambda fn: jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2))(q) * weights))
    np.testing.assert_allclose(curvature(attend)(q), curvature(plain)(q), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('workaround', [True, False])
def test_gelu_is_exact_gelu_with_its_derivative(workaround):
  with jax.enable_x64(), xla_cpu.turned_off(*() if workaround else ('gelu',)):
    x = jnp.linspace(-8.0, 8.0, 2001, dtype=jnp.float64)
    want = jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(model_lib.gelu(x), want, rtol=1e-12, atol=1e-14)
    want_grad = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(jax.vmap(jax.grad(model_lib.gelu))(x), want_grad, rtol=1e-10, atol=1e-12)
    # Against finite differences too, independently of jax.nn.
    h = 1e-6
    fd = (model_lib.gelu(x + h) - model_lib.gelu(x - h)) / (2 * h)
    np.testing.assert_allclose(jax.vmap(jax.grad(model_lib.gelu))(x), fd, atol=1e-8)


def test_gelu_saves_only_its_input_for_the_backward_pass():
  # What the backward pass reads besides the cotangent: x alone, not erf(x) or the slope.
  x = jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(model_lib.gelu, x)
  assert printed.getvalue().strip().splitlines() == ['f32[3,4] from the argument x'], printed.getvalue()


@pytest.mark.parametrize('features_in, features_out', [(4, 5), (5, 4)])
def test_dense_products_and_their_derivatives_are_those_of_a_matmul(features_in, features_out):
  # The CPU variant of every Dense layer (an explicit transpose in the kernel's tangent map: of x when
  # it is the narrower, of the output's cotangent otherwise) against numpy.
  assert xla_cpu.active('dense')
  with jax.enable_x64():
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(2, 3, features_in)), rng.normal(size=(features_in, features_out))
    dy = rng.normal(size=(2, 3, features_out))
    dx_in, dk_in = rng.normal(size=x.shape), rng.normal(size=kernel.shape)
    f = lambda x, k: model_lib.dot_general(x, k, (((2,), (0,)), ((), ())))
    np.testing.assert_allclose(f(x, kernel), x @ kernel, rtol=1e-12)
    gx, gk = jax.grad(lambda x, k: jnp.sum(f(x, k) * dy), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(gx, dy @ kernel.T, rtol=1e-12)
    np.testing.assert_allclose(gk, np.einsum('bti,bto->io', x, dy), rtol=1e-12)
    _, tangent = jax.jvp(f, (x, kernel), (dx_in, dk_in))
    np.testing.assert_allclose(tangent, dx_in @ kernel + x @ dk_in, rtol=1e-12)
  # Its transpose whichever way the conditional goes (x[0, 0] NaN makes its predicate false).
  swap = jax.jit(lambda a: xla_cpu.materialized_swap(a, a[0, 0] == a[0, 0]))
  for a in (np.arange(6.0).reshape(2, 3), np.array([[np.nan, 1.0, 2.0], [3.0, 4.0, np.inf]])):
    np.testing.assert_array_equal(swap(a), a.T)


def test_the_model_attention_and_training_step_leave_the_cpu_to_this_module():
  # The CPU's workarounds are decided in xla_cpu.active alone: no platform checks elsewhere.
  package = os.path.dirname(xla_cpu.__file__)
  for name in ('model.py', 'attention.py', 'train.py'):
    with open(os.path.join(package, name)) as f:
      source = f.read()
    assert not re.search(r"""default_backend|['"]cpu['"]|\.platform\b""", source), name
