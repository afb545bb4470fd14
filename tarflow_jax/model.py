"""TarFlow in Flax Linen: causal Transformer blocks as autoregressive affine flows over patches."""

import functools
from typing import Any, Callable, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import attention as attention_lib
from tarflow_jax import sharding
from tarflow_jax.attention import dot_product_attention

Array = jax.Array
Dtype = Any

LN_EPS = 1e-5  # as torch.nn.LayerNorm, which the reference uses.


def patchify(x: Array, patch_size: int) -> Array:
  """Images (B, H, W, C) to patch tokens (B, T, C*p*p).

  Tokens are row-major over the patch grid and each token is (channel,
  row-in-patch, col-in-patch) with channel slowest, as torch's `unfold` in the
  reference, so that latents and converted weights line up with it.
  """
  return einops.rearrange(x, 'b (h p) (w q) c -> b (h w) (c p q)', p=patch_size, q=patch_size)


def unpatchify(x: Array, patch_size: int, img_size: int) -> Array:
  """Patch tokens (B, T, C*p*p) to images (B, H, W, C); inverse of `patchify`."""
  grid = img_size // patch_size
  return einops.rearrange(x, 'b (h w) (c p q) -> b (h p) (w q) c', h=grid, p=patch_size, q=patch_size)


def flow_dtype(dtype: Dtype) -> Dtype:
  """Dtype of norms, softmax, exp and log-determinants: float32 even for bfloat16 matmuls."""
  return jnp.promote_types(dtype, jnp.float32)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  # At least float32, as the reference's `norm(x.float())`.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=flow_dtype(dtype), use_fast_variance=False, name=name)


INITIALIZERS = ('reference', 'flax')


def dense(features: int, fan_in: int, initializer: str, dtype: Dtype, precision: Any, name: str,
          zero_kernel: bool = False) -> nn.Dense:
  """A Dense layer initialised by rule `initializer` (see `TarFlow`); `fan_in` is its input width.

  'reference' draws weights and biases from U(+-1/sqrt(fan_in)), as torch's `Linear`;
  'flax' draws LeCun-normal weights and zero biases. `zero_kernel` zeroes the weights either way.
  """
  if initializer == 'reference':
    bound = fan_in**-0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel_init, bias_init = uniform, uniform
  elif initializer == 'flax':
    kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros
  else:
    raise ValueError(f'Unknown model initializer {initializer!r}: use one of {INITIALIZERS}.')
  if zero_kernel:
    kernel_init = nn.initializers.zeros
  return nn.Dense(features, dtype=dtype, precision=precision, kernel_init=kernel_init, bias_init=bias_init,
                  dot_general=dense_dot_general, name=name)


def dense_dot_general(x: Array, kernel: Array, dimension_numbers, precision: Any = None) -> Array:
  """`lax.dot_general` of a Dense layer, x (..., I) by kernel (I, O); on a CPU, through `_cpu_matmul`."""
  if attention_lib.platform() != 'cpu' or kernel.ndim != 2 or dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision)
  return _cpu_matmul(x, kernel, precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _cpu_matmul(x: Array, kernel: Array, precision: Any) -> Array:
  """x (..., I) @ kernel (I, O), whose kernel gradient multiplies an explicit transpose.

  Reverse mode computes the kernel gradient `x^T @ dy` from x (N, I) and dy (N, O) as stored:
  XLA's CPU backend runs such a product, contracting both operands over their first axis, in
  its own loops instead of in YNNPACK (docs/benchmarks.md). Here the tangent map is written so
  that its transpose swaps the narrower of the two in memory (`materialized_transpose`) and
  multiplies without a transposed operand: x^T (I, N) @ dy (N, O) when I <= O, otherwise
  dy^T (O, N) @ x (N, I), then the small (O, I) result swapped. The value and the derivatives
  are those of `x @ kernel`.
  """
  return jnp.matmul(x, kernel, precision=precision)


@_cpu_matmul.defjvp
def _cpu_matmul_jvp(precision, primals, tangents):
  (x, kernel), (dx, dkernel) = primals, tangents
  out = jnp.matmul(x, kernel, precision=precision)
  x2 = x.reshape(-1, x.shape[-1])  # (N, I)
  if kernel.shape[0] <= kernel.shape[1]:
    x_t = materialized_transpose(x2)  # (I, N), of the primal: a residual of the backward pass
    dkernel_term = jax.lax.dot_general(x_t, dkernel, (((0,), (0,)), ((), ())), precision=precision)  # (N, O)
  else:
    # (O, I) by (N, I) -> (O, N), swapped: the backward pass swaps dy (N, O) instead. The swap of
    # dkernel is a conditional too, or XLA folds its transpose into the (O, N) @ (N, I) product.
    # The predicate reads the kernel: read from x, it is a second consumer of x's producer, and XLA
    # then stores that producer's intermediates (a GELU's erf) instead of fusing them into x.
    runtime_true = kernel[0, 0] == kernel[0, 0]
    dkernel_t = attention_lib.materialized_swap(dkernel, runtime_true)  # (O, I)
    term_t = jax.lax.dot_general(dkernel_t, x2, (((1,), (1,)), ((), ())), precision=precision)  # (O, N)
    dkernel_term = attention_lib.materialized_swap(term_t, runtime_true)  # (N, O)
  return out, jnp.matmul(dx, kernel, precision=precision) + dkernel_term.reshape(out.shape)


def materialized_transpose(x: Array) -> Array:
  """x (M, N) transposed to (N, M) in memory by a plain copy of x as computed.

  XLA's CPU backend fuses the elementwise ops that produce x (a bias, a GELU, a residual
  sum) into the transpose, and runs that fusion as a strided loop several times slower
  than the copy of a stored array; it also drops optimisation barriers before fusing. A
  conditional is a fusion boundary that it keeps (`attention.materialized_swap`).
  """
  return attention_lib.materialized_swap(x, x[0, 0] == x[0, 0])


class Attention(nn.Module):
  """Multi-head self-attention, causal over a full sequence or one token over a cache."""

  channels: int
  head_dim: int = 64
  dtype: Dtype = jnp.float32
  precision: Any = None
  kernel: str = 'auto'  # see attention.causal_attention
  initializer: str = 'reference'

  def setup(self):
    self.num_heads = self.channels // self.head_dim
    self.norm = _layer_norm(self.dtype, 'norm')
    self.qkv = dense(3 * self.channels, self.channels, self.initializer, self.dtype, self.precision, 'qkv')
    self.proj = dense(self.channels, self.channels, self.initializer, self.dtype, self.precision, 'proj')

  def _qkv(self, x: Array):
    h = self.norm(x).astype(self.dtype)
    qkv = sharding.constrain_batch(self.qkv(h))  # (B, T, 3C): all query heads, then all keys, then all values.
    split_heads = lambda a: einops.rearrange(a, 'b t (h d) -> b t h d', h=self.num_heads)
    return tuple(split_heads(a) for a in jnp.split(qkv, 3, axis=-1))  # q, k, v, each (B, T, H, hd)

  def _apply_temperature(self, q: Array, temperature: Optional[Array]) -> Array:
    """Queries (B, S, H, hd) divided by the per-example attention temperature (B,), if given."""
    return q if temperature is None else q / temperature.astype(q.dtype)[:, None, None, None]

  def _out(self, out: Array) -> Array:
    return self.proj(einops.rearrange(out, 'b s h d -> b s (h d)'))  # (B, S, C)

  def __call__(self, x: Array, temperature: Optional[Array] = None) -> Array:
    """Causal attention over x (B, T, C); returns (B, T, C)."""
    q, k, v = self._qkv(x)
    out = attention_lib.causal_attention(self._apply_temperature(q, temperature), k, v, scale=self.head_dim**-0.5,
                                         kernel=self.kernel)
    return self._out(out)

  def step(self, x: Array, t: Array, cache: dict, temperature: Optional[Array] = None):
    """Attention of the S tokens at positions t..t+S-1, x (B, S, C), over the cache and themselves.

    `cache` holds preallocated 'k' and 'v' of shape (B, H, L, hd) with the
    tokens before t; these tokens' keys and values are written in place at
    [t, t+S). S is 1 for sequential decoding, more for Jacobi segments. The
    cache may be shorter than the sequence (L >= t+S): attention reads all L.
    """
    q, k, v = self._qkv(x)
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.swapaxes(1, 2).astype(c.dtype), t, axis=2)
    k_cache, v_cache = write(cache['k'], k), write(cache['v'], v)
    positions = t + jnp.arange(x.shape[1])
    mask = jnp.arange(k_cache.shape[2])[None, :] <= positions[:, None]  # (S, T)
    out = dot_product_attention(self._apply_temperature(q, temperature), k_cache, v_cache, scale=self.head_dim**-0.5,
                                mask=mask)
    return self._out(out), {'k': k_cache, 'v': v_cache}


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, `x * Phi(x)`, as torch's default and the reference.

  Its derivative `Phi(x) + x * phi(x)` is written out (`_gelu_jvp`) and recomputed
  from x in the backward pass (`jax.checkpoint`): the forward pass is one elementwise
  pass that saves only its input, and the backward pass one pass over x and the
  cotangent, instead of autodiff through erf and a stored erf(x).
  """
  return jax.checkpoint(_gelu)(x)


@jax.custom_jvp
def _gelu(x: Array) -> Array:
  return x * _normal_cdf(x)


def _normal_cdf(x: Array) -> Array:
  return 0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.5**0.5, x.dtype)))


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * np.asarray((2 * np.pi) ** -0.5, x.dtype)
  return x * cdf, (cdf + x * pdf) * dx


class MLP(nn.Module):
  """Pre-norm two-layer MLP with exact (erf) GELU."""

  channels: int
  expansion: int = 4
  dtype: Dtype = jnp.float32
  precision: Any = None
  initializer: str = 'reference'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    hidden = self.channels * self.expansion
    h = _layer_norm(self.dtype, 'norm')(x).astype(self.dtype)
    h = dense(hidden, self.channels, self.initializer, self.dtype, self.precision, 'fc1')(h)
    h = gelu(sharding.constrain_batch(h))
    return dense(self.channels, hidden, self.initializer, self.dtype, self.precision, 'fc2')(h)


class TransformerLayer(nn.Module):
  """Pre-norm Transformer layer: x + attn(x), then + mlp(x)."""

  channels: int
  head_dim: int = 64
  expansion: int = 4
  dtype: Dtype = jnp.float32
  precision: Any = None
  attention_kernel: str = 'auto'
  initializer: str = 'reference'

  def setup(self):
    self.attention = Attention(self.channels, self.head_dim, self.dtype, self.precision,
                               kernel=self.attention_kernel, initializer=self.initializer)
    self.mlp = MLP(self.channels, self.expansion, self.dtype, self.precision, self.initializer)

  def __call__(self, x: Array, temperature: Optional[Array] = None) -> Array:
    x = sharding.constrain_batch(x + self.attention(sharding.constrain_batch(x), temperature))
    return sharding.constrain_batch(x + self.mlp(x))

  def step(self, x: Array, t: Array, cache: dict, temperature: Optional[Array] = None):
    h, cache = self.attention.step(x, t, cache, temperature)
    x = x + h
    return x + self.mlp(x), cache


class FlowBlock(nn.Module):
  """One autoregressive affine flow over patch tokens.

  Reads the tokens in their order (`flip=False`) or reversed (`flip=True`).
  In that order, token t is mapped by `z_t = (x_t - b_t) * exp(-a_t)`, where
  `(a_t, b_t)` come from a causal Transformer over tokens `< t` (token 0 gets
  `a = b = 0`). Parameters (`pos_embed`, ...) are stored in the original token
  order and flipped with the tokens.

  `__call__` is the forward map over all tokens at once; `inverse_step` inverts
  one token (sequential decoding) or one segment (a Jacobi iteration) over the
  key/value cache of `init_cache`. Both take and return tokens in the original
  order: the flip stays inside the block.
  """

  num_tokens: int
  token_dim: int
  channels: int
  num_layers: int
  head_dim: int = 64
  expansion: int = 4
  nvp: bool = True
  num_classes: int = 0
  flip: bool = False
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = None
  attention_kernel: str = 'auto'
  initializer: str = 'reference'

  def setup(self):
    self.proj_in = dense(self.channels, self.token_dim, self.initializer, self.dtype, self.precision, 'proj_in')
    self.pos_embed = self.param('pos_embed', nn.initializers.normal(1e-2), (self.num_tokens, self.channels))
    if self.num_classes:
      self.class_embed = self.param('class_embed', nn.initializers.normal(1e-2), (self.num_classes, self.channels))
    # remat: the backward pass recomputes each layer from its input instead of storing its activations.
    layer = nn.remat(TransformerLayer, policy=self._policy()) if self.remat else TransformerLayer
    self.layers = [
        layer(self.channels, self.head_dim, self.expansion, self.dtype, self.precision,
              attention_kernel=self.attention_kernel, initializer=self.initializer,
              name=f'layer_{i}')
        for i in range(self.num_layers)
    ]
    out_dim = 2 * self.token_dim if self.nvp else self.token_dim
    # Zero weights: a fresh block is an affine map of each token by its bias, the same for every input.
    self.proj_out = dense(out_dim, self.channels, self.initializer, self.dtype, self.precision, 'proj_out',
                          zero_kernel=True)

  def _reading_order(self, x: Array, axis: int = 1) -> Array:
    """x in the block's reading order; applied again, back in the original order."""
    return jnp.flip(x, axis) if self.flip else x

  def _read(self, x: Array, t: Array, size: int) -> Array:
    """Tokens t..t+size-1 of the reading order of x (B, T, D), in that order: (B, size, D)."""
    if not self.flip:
      return jax.lax.dynamic_slice_in_dim(x, t, size, axis=1)
    return jnp.flip(jax.lax.dynamic_slice_in_dim(x, self.num_tokens - t - size, size, axis=1), 1)

  def _write(self, x: Array, tokens: Array, t: Array) -> Array:
    """x (B, T, D) with tokens t..t+S-1 of the reading order replaced by `tokens` (B, S, D)."""
    if not self.flip:
      return jax.lax.dynamic_update_slice_in_dim(x, tokens, t, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.flip(tokens, 1), self.num_tokens - t - tokens.shape[1], axis=1)

  def _class_embedding(self, y: Optional[Array]) -> Array:
    """(B, C) class embedding; label -1 or no labels means the mean embedding."""
    table = self.class_embed
    mean = table.mean(axis=0)
    if y is None:
      return mean[None]
    return jnp.where((y < 0)[:, None], mean[None], table[jnp.maximum(y, 0)])

  def _affine(self, out: Array):
    """Splits the output projection (..., 2D | D) into log-scale a and shift b."""
    out = out.astype(flow_dtype(self.dtype))
    if self.nvp:
      return out[..., :self.token_dim], out[..., self.token_dim:]
    return jnp.zeros_like(out), out

  def affine_params(self, x: Array, y: Optional[Array] = None, temperature: Optional[Array] = None):
    """Log-scales and shifts for all tokens of x (B, T, D), in reading order.

    Returns (a, b) in `flow_dtype`, each (B, T, D); row t depends only on rows < t.
    """
    h = self.proj_in(x.astype(self.dtype)) + self._reading_order(self.pos_embed, 0)  # (B, T, C)
    if self.num_classes:
      h = h + self._class_embedding(y)[:, None]
    if self.scan_layers and not self.is_initializing():
      h = self._scanned_layers(h, temperature)
    else:
      for layer in self.layers:
        h = layer(h, temperature)
    out = self.proj_out(h)  # (B, T, 2D | D)
    out = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)  # shift one token later
    return self._affine(out)

  def _scanned_layers(self, h: Array, temperature: Optional[Array]) -> Array:
    """The layers as one `lax.scan` over their stacked parameters: one layer is compiled, not L.

    The parameters stay stored per layer (`layer_i`), so checkpoints and conversion do not
    depend on `scan_layers`; gradients flow back through the stacking.
    """
    params = self.variables['params']
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[f'layer_{i}'] for i in range(self.num_layers)])
    layer = TransformerLayer(self.channels, self.head_dim, self.expansion, self.dtype, self.precision,
                             attention_kernel=self.attention_kernel, initializer=self.initializer, parent=None)
    body = lambda h, p: (layer.apply({'params': p}, h, temperature), None)
    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False, policy=self._policy())
    h, _ = jax.lax.scan(body, h, stacked)
    return h

  def _policy(self):
    """What the backward pass keeps of a rematerialised layer: a `jax.checkpoint_policies` name."""
    policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
    if policy is None or self.remat_policy.startswith(('save_', 'offload')):
      raise ValueError(f'Unknown remat_policy {self.remat_policy!r}: use a policy of jax.checkpoint_policies '
                       'such as nothing_saveable or dots_with_no_batch_dims_saveable.')
    return policy

  def __call__(self, x: Array, y: Optional[Array] = None):
    """Forward: x (B, T, D) in the original order -> (z (B, T, D), logdet (B,)).

    logdet is the mean of -a over tokens and dims, as in the reference; the
    log-determinant of the block is `T * D * logdet`.
    """
    x = self._reading_order(x).astype(flow_dtype(self.dtype))
    a, b = self.affine_params(x, y)
    z = (x - b) * jnp.exp(-a)
    return self._reading_order(z), -a.mean(axis=(1, 2))

  def affine_step(self, x: Array, t: Array, y: Optional[Array], cache: Sequence[dict],
                  temperature: Optional[Array] = None):
    """(a, b) for tokens t+1..t+S from tokens t..t+S-1, x (B, S, D), of the reading order, over a cache.

    Args:
      x: (B, S, D) tokens at reading positions t..t+S-1, already inverted (or an
        iterate of them, for Jacobi decoding).
      t: scalar int, position in reading order.
      y: (B,) labels or None.
      cache: per layer {'k', 'v'} of shape (B, H, L, hd), L >= t+S, holding tokens < t.
      temperature: (B,) attention temperature or None.
    Returns:
      (a, b) each (B, S, D) in `flow_dtype`, and the cache with tokens < t+S.
    """
    pos = self._read(self.pos_embed[None], t, x.shape[1])[0]  # (S, C)
    h = self.proj_in(x.astype(self.dtype)) + pos  # (B, S, C)
    if self.num_classes:
      h = h + self._class_embedding(y)[:, None]
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      h, layer_cache = layer.step(h, t, layer_cache, temperature)
      new_cache.append(layer_cache)
    return self._affine(self.proj_out(h)), new_cache

  def inverse_step(self, x: Array, z: Array, t: Array, cache: Sequence[dict], y: Optional[Array] = None,
                   temperature: Optional[Array] = None, guide: Optional[Callable] = None, size: int = 1):
    """Inverts tokens t+1..t+size of the reading order from tokens t..t+size-1 of x: `x = z * exp(a) + b`.

    The inverse of `__call__`, a step at a time: sequential decoding calls it
    with size 1 for t = 0, 1, ..., T-2 (exact); a Jacobi iteration calls it on
    a segment, x holding the current iterate of the segment's tokens, until the
    iterate settles. x and z are in the original token order; the block reads
    them in its own.

    Args:
      x: (B, T, D) the block's input so far: tokens up to reading position t
        inverted (the rest are overwritten; token 0 is its own inverse).
      z: (B, T, D) the block's output, the latent to invert.
      t: scalar int, reading position of the first input token.
      cache: per layer {'k', 'v'} (R, H, L, hd), L >= t+size, holding tokens < t
        of the R rows that run (R = B, or 2B with `guide`).
      y: (R,) labels or None.
      temperature: (R,) attention temperature or None.
      guide: None, or a function `(a, b, t) -> (a, b)` that maps the affine
        parameters (2B, size, D) of the tokens run twice, as rows [x; x], to
        those (B, size, D) to invert with (e.g. classifier-free guidance).
      size: tokens inverted in this step.
    Returns:
      x with tokens t+1..t+size of the reading order replaced, and the cache
      with tokens < t+size.
    """
    inputs = self._read(x, t, size)  # (B, S, D)
    if guide is not None:
      inputs = jnp.concatenate([inputs, inputs])  # (2B, S, D)
    (a, b), cache = self.affine_step(inputs, t, y, cache, temperature)
    if guide is not None:
      a, b = guide(a, b, t)
    tokens = self._read(z, t + 1, size) * jnp.exp(a) + b  # (B, S, D)
    return self._write(x, tokens.astype(x.dtype), t + 1), cache

  def init_cache(self, batch: int, length: Optional[int] = None) -> list:
    """Zeroed key/value cache for `batch` sequences of `length` tokens (default: all of them)."""
    length = self.num_tokens if length is None else length
    shape = (batch, self.channels // self.head_dim, length, self.head_dim)  # (B, H, length, hd)
    return [{'k': jnp.zeros(shape, self.dtype), 'v': jnp.zeros(shape, self.dtype)}
            for _ in range(self.num_layers)]


def extend_cache(cache: Sequence[dict], length: int) -> list:
  """A block's key/value cache (see `FlowBlock.init_cache`) padded with zeros to `length` positions."""
  pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0)))  # (B, H, L, hd)
  return jax.tree.map(pad, cache)


class TarFlow(nn.Module):
  """The TarFlow stack: `num_blocks` flow blocks alternating token order.

  Variables: 'params' (trainable) and 'prior' {'var': (T, D)}, the prior
  variance that the volume-preserving variant (`nvp=False`) learns as a
  running average outside the optimiser (all ones otherwise). `remat`
  recomputes each Transformer layer in the backward pass instead of storing
  its activations; `scan_layers` runs each block's layers as one `lax.scan`
  (compile time independent of the depth). Both change memory and speed, not
  the function or the parameters. `initializer` picks how fresh parameters are drawn:
  'reference' as the official PyTorch model (every Linear's weights and biases
  U(+-1/sqrt(fan_in)), LayerNorm 1 and 0, position and class embeddings
  N(0, 0.01^2), output projections' weights zero) or 'flax' (LeCun-normal
  weights, zero biases, the embeddings and zero output weights as before).
  """

  in_channels: int
  img_size: int
  patch_size: int
  channels: int
  num_blocks: int
  layers_per_block: int
  head_dim: int = 64
  expansion: int = 4
  nvp: bool = True
  num_classes: int = 0
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = None
  attention_kernel: str = 'auto'
  initializer: str = 'reference'

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def token_dim(self) -> int:
    return self.in_channels * self.patch_size**2

  def setup(self):
    if self.img_size % self.patch_size:
      raise ValueError(f'img_size={self.img_size} is not a multiple of patch_size={self.patch_size}.')
    if self.channels % self.head_dim:
      raise ValueError(f'channels={self.channels} is not a multiple of head_dim={self.head_dim}.')
    self.blocks = [
        FlowBlock(self.num_tokens, self.token_dim, self.channels, self.layers_per_block,
                  self.head_dim, self.expansion, self.nvp, self.num_classes, flip=bool(i % 2),
                  remat=self.remat, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                  dtype=self.dtype, precision=self.precision, attention_kernel=self.attention_kernel,
                  initializer=self.initializer, name=f'block_{i}')
        for i in range(self.num_blocks)
    ]
    # Created here, read outside the module: sampling scales its noise by variables['prior']['var'].
    self.variable('prior', 'var', jnp.ones, (self.num_tokens, self.token_dim))

  def __call__(self, x: Array, y: Optional[Array] = None):
    """Images (B, H, W, C) in [-1, 1] (and labels (B,)) to the latent.

    Returns:
      z: (B, T, D) latent in patch layout.
      logdets: (B,) sum over blocks of each block's mean of -a.
      block_latents: list of (B, T, D), the output of every block, block 0 first.
    """
    check_images(x, self.img_size, self.in_channels)
    check_labels(y, self.num_classes)
    h = patchify(x.astype(flow_dtype(self.dtype)), self.patch_size)
    logdets = jnp.zeros(h.shape[0], h.dtype)
    block_latents = []
    for block in self.blocks:
      h, logdet = block(h, y)
      logdets = logdets + logdet
      block_latents.append(h)
    return h, logdets, block_latents


def on_block(i: int, method: Callable) -> Callable:
  """A `FlowBlock` method (unbound) of block i, for `TarFlow.apply(variables, ..., method=on_block(i, ...))`."""
  return lambda model, *args, **kwargs: method(model.blocks[i], *args, **kwargs)


def check_images(x, img_size: int, in_channels: int) -> None:
  """Raises a clear error unless x is a batch of (H, W, C) images of the model's size."""
  want = (img_size, img_size, in_channels)
  if x.ndim != 4 or tuple(x.shape[1:]) != want:
    raise ValueError(
        f'Expected images of shape (batch, {img_size}, {img_size}, {in_channels}) (NHWC), got {tuple(x.shape)}. '
        'Images are NHWC in [-1, 1]; convert NCHW arrays with x.transpose(0, 2, 3, 1).')


def check_labels(y, num_classes: int) -> None:
  """Raises a clear error for labels the model cannot take (checked only on concrete values)."""
  if y is None:
    return
  if not num_classes:
    raise ValueError('Labels were given, but the model is unconditional (num_classes=0); pass y=None.')
  if jnp.ndim(y) != 1:
    raise ValueError(f'Labels must have shape (batch,), got {tuple(jnp.shape(y))}.')
  if isinstance(y, jax.core.Tracer) or not jnp.size(y):
    return
  y = np.asarray(y)
  lo, hi = int(y.min()), int(y.max())
  if lo < -1 or hi >= num_classes:
    raise ValueError(f'Labels must lie in [0, {num_classes - 1}] (or -1 for "no label"), got values in [{lo}, {hi}].')


def init_variables(model: TarFlow, rng: Array) -> dict:
  """Fresh variables {'params', 'prior'} for `model`."""
  return model.init(rng, jnp.zeros((1, model.img_size, model.img_size, model.in_channels)))


def abstract_variables(model: TarFlow) -> dict:
  """Shapes and dtypes of the variables, without allocating them."""
  return jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))


def from_config(config, **overrides) -> TarFlow:
  """Builds `TarFlow` from a config's `model` fields (an ml_collections ConfigDict or dict)."""
  fields = dict(config)
  fields.update(overrides)
  dtype = fields.pop('dtype', 'float32')
  precision = fields.pop('precision', None)
  return TarFlow(dtype=jnp.dtype(dtype), precision=precision, **fields)
