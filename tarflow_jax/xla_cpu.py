"""Workarounds for XLA's CPU backend, all in one place, behind one switch (`active`).

Each is a drop-in variant of a plain function of the model or the training step: the same values
and the same derivatives, written so that XLA:CPU compiles or runs it faster. The plain function
is decorated with `replaced_on_cpu(name, variant)`; while a program is traced for a CPU
(`platforms.target()`), the variant runs instead. docs/benchmarks.md ("CPU workarounds") shows
what each buys, measured on and off side by side (benchmarks/cpu_workarounds.py); one that stops
paying goes.

- 'dense': every Dense product, whose kernel gradient multiplies an explicit transpose.
- 'attention': causal einsum attention with its derivative written out.
- 'gelu': exact GELU with its derivative written out, saving only its input.
- 'finite_guard': the training step's "keep the old state if not finite" as one conditional.
"""

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import platforms

WORKAROUNDS = ('dense', 'attention', 'gelu', 'finite_guard')
_turned_off = set()


def active(name: str) -> bool:
  """Whether workaround `name` applies to the program traced now: on a CPU, unless `turned_off`."""
  return name not in _turned_off and platforms.target() == 'cpu'


@contextlib.contextmanager
def turned_off(*names: str):
  """Programs traced inside run without the workarounds `names` (to measure what they buy)."""
  unknown = set(names) - set(WORKAROUNDS)
  if unknown:
    raise ValueError(f'No such workarounds {sorted(unknown)}; they are {WORKAROUNDS}.')
  before = set(_turned_off)
  _turned_off.update(names)
  try:
    yield
  finally:
    _turned_off.clear()
    _turned_off.update(before)


def replaced_on_cpu(name: str, variant: Callable) -> Callable:
  """A decorator: the function as written, except while `active(name)`, when `variant(plain, *args)` runs.

  `variant` gets the plain function first, to fall back on where it does not apply.
  """
  def decorate(plain):
    @functools.wraps(plain)
    def dispatch(*args, **kwargs):
      if active(name):
        return variant(plain, *args, **kwargs)
      return plain(*args, **kwargs)
    return dispatch
  return decorate


def materialized_swap(x: jax.Array, runtime_true: jax.Array) -> jax.Array:
  """x (..., M, N) as (..., N, M) in memory, whatever XLA would fold or fuse.

  XLA's CPU backend fuses the elementwise ops that produce x (a bias, a GELU, a residual sum)
  into a transpose, and runs that fusion as a strided loop several times slower than the copy of
  a stored array; it also drops optimisation barriers before fusing. A conditional is a fusion
  boundary that it keeps; its two branches are the same swap, so the predicate (true, but
  computed at run time so that it is never constant-folded) changes nothing.
  """
  swap = lambda a: a.swapaxes(-1, -2)
  return jax.lax.cond(runtime_true, swap, swap, x)


# 'dense' -------------------------------------------------------------------------------------------


def dense_dot_general(plain: Callable, x: jax.Array, kernel: jax.Array, dimension_numbers,
                      precision: Any = None) -> jax.Array:
  """A Dense layer's `lax.dot_general`, x (..., I) by kernel (I, O), through `_matmul`."""
  if kernel.ndim != 2 or dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    return plain(x, kernel, dimension_numbers, precision=precision)
  return _matmul(x, kernel, precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  """x (..., I) @ kernel (I, O), whose kernel gradient multiplies an explicit transpose.

  Reverse mode computes the kernel gradient `x^T @ dy` from x (N, I) and dy (N, O) as stored:
  XLA's CPU backend runs such a product, contracting both operands over their first axis, in
  its own loops instead of in YNNPACK. Here the tangent map is written so that its transpose
  swaps the narrower of the two in memory (`materialized_swap`) and multiplies without a
  transposed operand: x^T (I, N) @ dy (N, O) when I <= O, otherwise dy^T (O, N) @ x (N, I),
  then the small (O, I) result swapped. The value and the derivatives are those of `x @ kernel`.
  """
  return jnp.matmul(x, kernel, precision=precision)


@_matmul.defjvp
def _matmul_jvp(precision, primals, tangents):
  (x, kernel), (dx, dkernel) = primals, tangents
  out = jnp.matmul(x, kernel, precision=precision)
  x2 = x.reshape(-1, x.shape[-1])  # (N, I)
  if kernel.shape[0] <= kernel.shape[1]:
    x_t = materialized_swap(x2, x2[0, 0] == x2[0, 0])  # (I, N), of the primal: a residual of the backward pass
    dkernel_term = jax.lax.dot_general(x_t, dkernel, (((0,), (0,)), ((), ())), precision=precision)  # (N, O)
  else:
    # (O, I) by (N, I) -> (O, N), swapped: the backward pass swaps dy (N, O) instead. The swap of
    # dkernel is a conditional too, or XLA folds its transpose into the (O, N) @ (N, I) product.
    # The predicate reads the kernel: read from x, it is a second consumer of x's producer, and XLA
    # then stores that producer's intermediates (a GELU's erf) instead of fusing them into x.
    runtime_true = kernel[0, 0] == kernel[0, 0]
    dkernel_t = materialized_swap(dkernel, runtime_true)  # (O, I)
    term_t = jax.lax.dot_general(dkernel_t, x2, (((1,), (1,)), ((), ())), precision=precision)  # (O, N)
    dkernel_term = materialized_swap(term_t, runtime_true)  # (N, O)
  return out, jnp.matmul(dx, kernel, precision=precision) + dkernel_term.reshape(out.shape)


# 'attention' ---------------------------------------------------------------------------------------


def causal_attention(plain: Callable, q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """Causal einsum attention over (B, T, H, hd), in float32 or float64 through `_causal_core`."""
  if q.dtype not in (jnp.float32, jnp.float64):
    return plain(q, k, v, scale)
  head_major = lambda x: x.swapaxes(1, 2)  # (B, T, H, hd) -> (B, H, T, hd)
  return _causal_core(head_major(q), head_major(k), head_major(v), scale).swapaxes(1, 2)


def _causal_weights_and_out(qs, k, v):
  """Attention weights (B, H, S, T) and output (B, H, S, hd) of head-major pre-scaled queries qs, keys k, values v."""
  logits = jnp.einsum('bhsd,bhtd->bhst', qs, k)
  t = logits.shape[-1]
  weights = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf), axis=-1)
  return weights, jnp.einsum('bhst,bhtd->bhsd', weights, v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _causal_core(q, k, v, scale: float):
  """Causal attention of head-major q, k, v (B, H, T, hd); returns (B, H, T, hd)."""
  return _causal_weights_and_out(q * scale, k, v)[1]


@_causal_core.defjvp
def _causal_core_jvp(scale, primals, tangents):
  """The tangent map written so that its transpose (the backward pass) has only plain products.

  XLA's CPU backend runs a batched product in YNNPACK when neither operand is contracted over its
  second-to-last axis; the gradients of the keys and values, `dS^T Q` and `P^T dO`, are such
  products. Here they transpose to products of the gradients of the logits and of the output
  swapped in memory first (`materialized_swap`): `(dS^T) Q` and `(dO^T) P`.
  """
  (q, k, v), (dq, dk, dv) = primals, tangents
  qs = q * scale
  weights, out = _causal_weights_and_out(qs, k, v)
  runtime_true = weights[0, 0, 0, 0] == weights[0, 0, 0, 0]  # of the primal: the backward pass has it
  d_logits = (jnp.einsum('bhsd,bhtd->bhst', dq * scale, k)
              + materialized_swap(jnp.einsum('bhtd,bhsd->bhts', dk, qs), runtime_true))
  d_weights = weights * (d_logits - jnp.sum(weights * d_logits, axis=-1, keepdims=True))
  d_out = (jnp.einsum('bhst,bhtd->bhsd', d_weights, v)
           + materialized_swap(jnp.einsum('bhtd,bhst->bhds', dv, weights), runtime_true))
  return out, d_out


# 'gelu' --------------------------------------------------------------------------------------------


def gelu(plain: Callable, x: jax.Array) -> jax.Array:  # pylint: disable=unused-argument
  """Exact (erf) GELU, `x * Phi(x)`, with its derivative `Phi(x) + x * phi(x)` written out (`_gelu_jvp`).

  The derivative is recomputed from x in the backward pass (`jax.checkpoint`): the forward pass is
  one elementwise pass that saves only its input, and the backward pass one pass over x and the
  cotangent, instead of autodiff through erf and a stored erf(x).
  """
  return jax.checkpoint(_gelu)(x)


@jax.custom_jvp
def _gelu(x: jax.Array) -> jax.Array:
  return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.5**0.5, x.dtype)))


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * np.asarray((2 * np.pi) ** -0.5, x.dtype)
  return x * cdf, (cdf + x * pdf) * dx


# 'finite_guard' ------------------------------------------------------------------------------------


def keep_if_finite(plain: Callable, finite: jax.Array, new: dict, keep: dict) -> dict:  # pylint: disable=unused-argument
  """`new` where the scalar `finite` is true, else `keep`, chosen by one conditional.

  XLA's CPU backend fuses the flag (a reduction over every leaf of the state) into each of a
  per-leaf select's kernels, and its fusion pass then takes most of the training step's compile
  time. (On a TPU the conditional costs memory: there the plain per-leaf select runs.)
  """
  return jax.lax.cond(finite, lambda: new, lambda: keep)
