"""TarFlow in Flax Linen: causal Transformer blocks as autoregressive affine flows over patches.

Also the iTARFlow family (Iterative TARFlow, apple/ml-itarflow), as options of the same model: per-block
patch sizes, widths and depths, a backbone shared by all blocks, and conditioning on the noise level.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import attention as attention_lib
from tarflow_jax import errors, sharding, xla_cpu
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


def repatchify(x: Array, patch_from: int, patch_to: int, img_size: int) -> Array:
  """Patch tokens (B, T, D) of patch size `patch_from` to those of `patch_to` (B, T', D'): the same image."""
  if patch_from == patch_to:
    return x
  return patchify(unpatchify(x, patch_from, img_size), patch_to)


def flow_dtype(dtype: Dtype) -> Dtype:
  """Dtype of norms, softmax, exp and log-determinants: float32 even for bfloat16 matmuls."""
  return jnp.promote_types(dtype, jnp.float32)


INITIALIZERS = ('reference', 'flax')


PerBlock = Union[int, tuple]  # one value for every block, or one per block (block 0 first)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What every layer of a TarFlow reads: the architecture, and how it runs (see `TarFlow`).

  Built once (`from_config`) and handed to each layer whole; each block gets `block(i)`, its own
  patch size, width and depth. `patch_size`, `channels` and `layers_per_block` are one value for
  every block (TarFlow) or a tuple with one per block (iTARFlow; a list is taken as a tuple, one of
  length 1 as its value). `shared_layers` > 0: the first that many layers of every block are one
  shared backbone (the blocks keep `layers_per_block - shared_layers` of their own).
  `noise_conditioning`: every block adds an embedding of log(noise level) to its tokens.
  """

  in_channels: int
  img_size: int
  patch_size: PerBlock
  channels: PerBlock
  num_blocks: int
  layers_per_block: PerBlock
  head_dim: int = 64
  expansion: int = 4
  nvp: bool = True
  num_classes: int = 0
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = None
  attention_kernel: str = 'auto'  # see attention.causal_attention
  initializer: str = 'reference'
  shared_layers: int = 0
  noise_conditioning: bool = False

  def __post_init__(self):
    for field in PER_BLOCK_FIELDS:
      value = getattr(self, field)
      if isinstance(value, (list, tuple)):
        value = tuple(int(v) for v in value)
        if len(value) not in (1, self.num_blocks):
          raise errors.UserError(f'{field}={list(value)} has {len(value)} entries: give one for every block '
                                 f'(num_blocks={self.num_blocks}) or one for all.')
        object.__setattr__(self, field, value[0] if len(value) == 1 else value)

  def block(self, i: int) -> 'Spec':
    """The spec of block i: its own patch size, width and depth (ints)."""
    return dataclasses.replace(self, **{f: _of_block(getattr(self, f), i) for f in PER_BLOCK_FIELDS})

  @property
  def patch_sizes(self) -> tuple:
    """Patch size of every block, block 0 first."""
    return tuple(_of_block(self.patch_size, i) for i in range(self.num_blocks))

  @property
  def head_layers(self) -> int:
    """Layers a block owns (of a block's spec): those after the shared backbone."""
    return max(0, self.layers_per_block - self.shared_layers)

  @property
  def num_tokens(self) -> int:
    """Tokens of the latent (of the last block; of a block's spec, its own)."""
    return (self.img_size // self.patch_sizes[-1]) ** 2

  @property
  def token_dim(self) -> int:
    """Dimension of a latent token (of the last block; of a block's spec, its own)."""
    return self.in_channels * self.patch_sizes[-1]**2


PER_BLOCK_FIELDS = ('patch_size', 'channels', 'layers_per_block')


def _of_block(value: PerBlock, i: int) -> int:
  return value[i] if isinstance(value, tuple) else value


def _layer_norm(spec: Spec, name: str) -> nn.LayerNorm:
  # At least float32, as the reference's `norm(x.float())`.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=flow_dtype(spec.dtype), use_fast_variance=False, name=name)


def dense(features: int, fan_in: int, spec: Spec, name: str, zero_kernel: bool = False) -> nn.Dense:
  """A Dense layer initialised by rule `spec.initializer` (see `TarFlow`); `fan_in` is its input width.

  'reference' draws weights and biases from U(+-1/sqrt(fan_in)), as torch's `Linear`;
  'flax' draws LeCun-normal weights and zero biases. `zero_kernel` zeroes the weights either way.
  """
  if spec.initializer == 'reference':
    bound = fan_in**-0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel_init, bias_init = uniform, uniform
  elif spec.initializer == 'flax':
    kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros
  else:
    raise errors.UserError(f'Unknown model initializer {spec.initializer!r}: use one of {INITIALIZERS}.')
  if zero_kernel:
    kernel_init = nn.initializers.zeros
  return nn.Dense(features, dtype=spec.dtype, precision=spec.precision, kernel_init=kernel_init,
                  bias_init=bias_init, dot_general=dot_general, name=name)


@xla_cpu.replaced_on_cpu('dense', xla_cpu.dense_dot_general)
def dot_general(x: Array, kernel: Array, dimension_numbers, precision: Any = None) -> Array:
  """The product of every Dense layer: `lax.dot_general`."""
  return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision)


class Attention(nn.Module):
  """Multi-head self-attention, causal over a full sequence or one token over a cache."""

  spec: Spec

  def setup(self):
    c = self.spec.channels
    self.num_heads = c // self.spec.head_dim
    self.norm = _layer_norm(self.spec, 'norm')
    self.qkv = dense(3 * c, c, self.spec, 'qkv')
    self.proj = dense(c, c, self.spec, 'proj')

  def _qkv(self, x: Array):
    h = self.norm(x).astype(self.spec.dtype)
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
    out = attention_lib.causal_attention(self._apply_temperature(q, temperature), k, v,
                                         scale=self.spec.head_dim**-0.5, kernel=self.spec.attention_kernel)
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
    out = dot_product_attention(self._apply_temperature(q, temperature), k_cache, v_cache,
                                scale=self.spec.head_dim**-0.5, mask=mask)
    return self._out(out), {'k': k_cache, 'v': v_cache}


@xla_cpu.replaced_on_cpu('gelu', xla_cpu.gelu)
def gelu(x: Array) -> Array:
  """Exact (erf) GELU, `x * Phi(x)`, as torch's default and the reference."""
  return jax.nn.gelu(x, approximate=False)


class MLP(nn.Module):
  """Pre-norm two-layer MLP with exact (erf) GELU."""

  spec: Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.spec.channels
    hidden = c * self.spec.expansion
    h = _layer_norm(self.spec, 'norm')(x).astype(self.spec.dtype)
    h = dense(hidden, c, self.spec, 'fc1')(h)
    h = gelu(sharding.constrain_batch(h))
    return dense(c, hidden, self.spec, 'fc2')(h)


class TransformerLayer(nn.Module):
  """Pre-norm Transformer layer: x + attn(x), then + mlp(x)."""

  spec: Spec

  def setup(self):
    self.attention = Attention(self.spec)
    self.mlp = MLP(self.spec)

  def __call__(self, x: Array, temperature: Optional[Array] = None) -> Array:
    x = sharding.constrain_batch(x + self.attention(sharding.constrain_batch(x), temperature))
    return sharding.constrain_batch(x + self.mlp(x))

  def step(self, x: Array, t: Array, cache: dict, temperature: Optional[Array] = None):
    h, cache = self.attention.step(x, t, cache, temperature)
    x = x + h
    return x + self.mlp(x), cache


def _remat_policy(spec: Spec):
  """What the backward pass keeps of a rematerialised layer: a `jax.checkpoint_policies` name."""
  policy = getattr(jax.checkpoint_policies, spec.remat_policy, None)
  if policy is None or spec.remat_policy.startswith(('save_', 'offload')):
    raise errors.UserError(f'Unknown remat_policy {spec.remat_policy!r}: use a policy of '
                           'jax.checkpoint_policies such as nothing_saveable or dots_with_no_batch_dims_saveable.')
  return policy


def transformer_layer(spec: Spec, name: str) -> nn.Module:
  """A `TransformerLayer`; with `spec.remat`, one whose backward pass recomputes it from its input."""
  layer = nn.remat(TransformerLayer, policy=_remat_policy(spec)) if spec.remat else TransformerLayer
  return layer(spec, name=name)


class NoiseLevelEmbedding(nn.Module):
  """iTARFlow's noise-level conditioning: Fourier features of log t through a two-layer MLP.

  `channels // 2` frequencies `exp(-log(10000) k / (channels // 2))`, sin then cos, then
  Dense(channels -> 4 channels), exact GELU, Dense(4 channels -> channels).
  """

  spec: Spec
  max_period: float = 10000.0

  @nn.compact
  def __call__(self, log_t: Array) -> Array:
    """log t (B,) -> (B, C)."""
    c = self.spec.channels
    half = c // 2
    freqs = jnp.exp(-math.log(self.max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # (C/2,)
    args = log_t.astype(jnp.float32)[:, None] * freqs[None]  # (B, C/2)
    features = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # (B, 2 (C/2))
    features = jnp.pad(features, ((0, 0), (0, c - 2 * half)))  # (B, C)
    h = dense(4 * c, c, self.spec, 'fc1')(features.astype(self.spec.dtype))  # (B, 4C)
    return dense(c, 4 * c, self.spec, 'fc2')(gelu(h))  # (B, C)


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

  `spec` is the block's own (`Spec.block`). `shared` are the layers of a shared backbone
  (iTARFlow), owned by the stack and run before the block's own `spec.head_layers` layers.
  With `spec.noise_conditioning` every method takes `log_level` (B,), the log of each
  row's noise level, and the tokens get its embedding (`NoiseLevelEmbedding`).
  """

  spec: Spec
  flip: bool = False
  shared: Sequence[nn.Module] = ()

  def setup(self):
    spec = self.spec
    self.proj_in = dense(spec.channels, spec.token_dim, spec, 'proj_in')
    self.pos_embed = self.param('pos_embed', nn.initializers.normal(1e-2), (spec.num_tokens, spec.channels))
    if spec.num_classes:
      self.class_embed = self.param('class_embed', nn.initializers.normal(1e-2), (spec.num_classes, spec.channels))
    if spec.noise_conditioning:
      self.time_embed = NoiseLevelEmbedding(spec, name='time_embed')
    self.layers = [transformer_layer(spec, f'layer_{i}') for i in range(spec.head_layers)]
    out_dim = 2 * spec.token_dim if spec.nvp else spec.token_dim
    # Zero weights: a fresh block is an affine map of each token by its bias, the same for every input.
    self.proj_out = dense(out_dim, spec.channels, spec, 'proj_out', zero_kernel=True)

  def _reading_order(self, x: Array, axis: int = 1) -> Array:
    """x in the block's reading order; applied again, back in the original order."""
    return jnp.flip(x, axis) if self.flip else x

  def _read(self, x: Array, t: Array, size: int) -> Array:
    """Tokens t..t+size-1 of the reading order of x (B, T, D), in that order: (B, size, D)."""
    if not self.flip:
      return jax.lax.dynamic_slice_in_dim(x, t, size, axis=1)
    return jnp.flip(jax.lax.dynamic_slice_in_dim(x, self.spec.num_tokens - t - size, size, axis=1), 1)

  def _write(self, x: Array, tokens: Array, t: Array) -> Array:
    """x (B, T, D) with tokens t..t+S-1 of the reading order replaced by `tokens` (B, S, D)."""
    if not self.flip:
      return jax.lax.dynamic_update_slice_in_dim(x, tokens, t, axis=1)
    start = self.spec.num_tokens - t - tokens.shape[1]
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.flip(tokens, 1), start, axis=1)

  def _class_embedding(self, y: Optional[Array]) -> Array:
    """(B, C) class embedding; label -1 or no labels means the mean embedding."""
    table = self.class_embed
    mean = table.mean(axis=0)
    if y is None:
      return mean[None]
    return jnp.where((y < 0)[:, None], mean[None], table[jnp.maximum(y, 0)])

  def _affine(self, out: Array):
    """Splits the output projection (..., 2D | D) into log-scale a and shift b."""
    out = out.astype(flow_dtype(self.spec.dtype))
    if self.spec.nvp:
      return out[..., :self.spec.token_dim], out[..., self.spec.token_dim:]
    return jnp.zeros_like(out), out

  def _embed(self, x: Array, pos: Array, y: Optional[Array], log_level: Optional[Array]) -> Array:
    """Tokens x (B, S, D) to the Transformer's width, with their position embeddings pos (S, C),
    the noise level's embedding and the class embedding: (B, S, C)."""
    h = self.proj_in(x.astype(self.spec.dtype)) + pos  # (B, S, C)
    if self.spec.noise_conditioning:
      h = h + self.time_embed(log_level)[:, None].astype(h.dtype)
    if self.spec.num_classes:
      h = h + self._class_embedding(y)[:, None]
    return h

  def affine_params(self, x: Array, y: Optional[Array] = None, temperature: Optional[Array] = None,
                    log_level: Optional[Array] = None):
    """Log-scales and shifts for all tokens of x (B, T, D), in reading order.

    Returns (a, b) in `flow_dtype`, each (B, T, D); row t depends only on rows < t.
    """
    h = self._embed(x, self._reading_order(self.pos_embed, 0), y, log_level)  # (B, T, C)
    for layer in self.shared:
      h = layer(h, temperature)
    if self.spec.scan_layers and not self.is_initializing():
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
    layers = [params[f'layer_{i}'] for i in range(self.spec.head_layers)]
    if not layers:
      return h
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *layers)
    layer = TransformerLayer(self.spec, parent=None)
    body = lambda h, p: (layer.apply({'params': p}, h, temperature), None)
    if self.spec.remat:
      body = jax.checkpoint(body, prevent_cse=False, policy=_remat_policy(self.spec))
    h, _ = jax.lax.scan(body, h, stacked)
    return h

  def __call__(self, x: Array, y: Optional[Array] = None, log_level: Optional[Array] = None):
    """Forward: x (B, T, D) in the original order -> (z (B, T, D), logdet (B,)).

    logdet is the mean of -a over tokens and dims, as in the reference; the
    log-determinant of the block is `T * D * logdet`.
    """
    x = self._reading_order(x).astype(flow_dtype(self.spec.dtype))
    a, b = self.affine_params(x, y, log_level=log_level)
    z = (x - b) * jnp.exp(-a)
    return self._reading_order(z), -a.mean(axis=(1, 2))

  def affine_step(self, x: Array, t: Array, y: Optional[Array], cache: Sequence[dict],
                  temperature: Optional[Array] = None, log_level: Optional[Array] = None):
    """(a, b) for tokens t+1..t+S from tokens t..t+S-1, x (B, S, D), of the reading order, over a cache.

    Args:
      x: (B, S, D) tokens at reading positions t..t+S-1, already inverted (or an
        iterate of them, for Jacobi decoding).
      t: scalar int, position in reading order.
      y: (B,) labels or None.
      cache: per layer {'k', 'v'} of shape (B, H, L, hd), L >= t+S, holding tokens < t.
      temperature: (B,) attention temperature or None.
      log_level: (B,) log noise level (with `noise_conditioning`) or None.
    Returns:
      (a, b) each (B, S, D) in `flow_dtype`, and the cache with tokens < t+S.
    """
    pos = self._read(self.pos_embed[None], t, x.shape[1])[0]  # (S, C)
    h = self._embed(x, pos, y, log_level)  # (B, S, C)
    new_cache = []
    for layer, layer_cache in zip([*self.shared, *self.layers], cache):
      h, layer_cache = layer.step(h, t, layer_cache, temperature)
      new_cache.append(layer_cache)
    return self._affine(self.proj_out(h)), new_cache

  def inverse_step(self, x: Array, z: Array, t: Array, cache: Sequence[dict], y: Optional[Array] = None,
                   temperature: Optional[Array] = None, guide: Optional[Callable] = None, size: int = 1,
                   log_level: Optional[Array] = None):
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
      log_level: (R,) log noise level of each row (with `noise_conditioning`) or None.
    Returns:
      x with tokens t+1..t+size of the reading order replaced, and the cache
      with tokens < t+size.
    """
    inputs = self._read(x, t, size)  # (B, S, D)
    if guide is not None:
      inputs = jnp.concatenate([inputs, inputs])  # (2B, S, D)
    (a, b), cache = self.affine_step(inputs, t, y, cache, temperature, log_level)
    if guide is not None:
      a, b = guide(a, b, t)
    tokens = self._read(z, t + 1, size) * jnp.exp(a) + b  # (B, S, D)
    return self._write(x, tokens.astype(x.dtype), t + 1), cache

  def init_cache(self, batch: int, length: Optional[int] = None) -> list:
    """Zeroed key/value cache for `batch` sequences of `length` tokens (default: all of them)."""
    length = self.spec.num_tokens if length is None else length
    shape = (batch, self.spec.channels // self.spec.head_dim, length, self.spec.head_dim)  # (B, H, length, hd)
    return [{'k': jnp.zeros(shape, self.spec.dtype), 'v': jnp.zeros(shape, self.spec.dtype)}
            for _ in range(len(self.shared) + self.spec.head_layers)]


def extend_cache(cache: Sequence[dict], length: int) -> list:
  """A block's key/value cache (see `FlowBlock.init_cache`) padded with zeros to `length` positions."""
  pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0)))  # (B, H, L, hd)
  return jax.tree.map(pad, cache)


class TarFlow(nn.Module):
  """The TarFlow stack: `spec.num_blocks` flow blocks alternating token order.

  The fields named below are those of its `Spec`. Variables: 'params' (trainable) and 'prior' {'var': (T, D)}, the prior
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

  iTARFlow (all off by default): blocks of their own patch size, width and depth, the
  tokens re-patchified between blocks of different patch sizes (the latent and the prior
  have the last block's layout); `shared_layers` layers of one backbone run first in
  every block ('shared_layer_j', beside the blocks); `noise_conditioning` makes the
  model a function of the noise level t of its input, `__call__(x, y, noise_level=t)`.
  """

  spec: Spec

  @property
  def num_tokens(self) -> int:
    return self.spec.num_tokens

  @property
  def token_dim(self) -> int:
    return self.spec.token_dim

  def setup(self):
    spec = self.spec
    specs = [spec.block(i) for i in range(spec.num_blocks)]
    for s in specs:
      if spec.img_size % s.patch_size:
        raise errors.UserError(f'img_size={spec.img_size} is not a multiple of patch_size={s.patch_size}.')
      if s.channels % spec.head_dim:
        raise errors.UserError(f'channels={s.channels} is not a multiple of head_dim={spec.head_dim}.')
    if spec.shared_layers and len({s.channels for s in specs}) > 1:
      raise errors.UserError(f'A shared backbone (shared_layers={spec.shared_layers}) needs one width for every '
                             f'block, got channels={spec.channels}.')
    # Owned here, run inside every block before its own layers.
    self.shared = [transformer_layer(specs[0], f'shared_layer_{j}') for j in range(spec.shared_layers)]
    self.blocks = [FlowBlock(s, flip=bool(i % 2), shared=tuple(self.shared), name=f'block_{i}')
                   for i, s in enumerate(specs)]
    # Created here, read outside the module: sampling scales its noise by variables['prior']['var'].
    self.variable('prior', 'var', jnp.ones, (self.num_tokens, self.token_dim))

  def __call__(self, x: Array, y: Optional[Array] = None, noise_level: Optional[Array] = None):
    """Images (B, H, W, C) in [-1, 1] (and labels (B,); with `noise_conditioning`, their noise level t) to the latent.

    Returns:
      z: (B, T, D) latent in patch layout (the last block's).
      logdets: (B,) sum over blocks of each block's mean of -a.
      block_latents: list of (B, T_i, D_i), the output of every block in its patch layout, block 0 first.
    """
    check_images(x, self.spec.img_size, self.spec.in_channels)
    check_labels(y, self.spec.num_classes)
    log_level = log_noise_level(noise_level, x.shape[0], self.spec)
    patch_sizes = self.spec.patch_sizes
    h = patchify(x.astype(flow_dtype(self.spec.dtype)), patch_sizes[0])
    logdets = jnp.zeros(h.shape[0], h.dtype)
    block_latents = []
    for i, block in enumerate(self.blocks):
      h = repatchify(h, patch_sizes[max(i - 1, 0)], patch_sizes[i], self.spec.img_size)  # (B, T_i, D_i)
      h, logdet = block(h, y, log_level)
      logdets = logdets + logdet
      block_latents.append(h)
    return h, logdets, block_latents


def on_block(i: int, method: Callable) -> Callable:
  """A `FlowBlock` method (unbound) of block i, for `TarFlow.apply(variables, ..., method=on_block(i, ...))`."""
  return lambda model, *args, **kwargs: method(model.blocks[i], *args, **kwargs)


def log_noise_level(noise_level: Optional[Array], batch: int, spec: Spec) -> Optional[Array]:
  """log t (B,) of a noise-conditioned model's noise level (a scalar, (B,) or (B, 1)); None for other models."""
  if not spec.noise_conditioning:
    if noise_level is not None:
      raise errors.UserError('A noise level was given, but the model is not conditioned on one '
                             '(noise_conditioning=False); pass noise_level=None.')
    return None
  if noise_level is None:
    raise errors.UserError('The model is conditioned on the noise level of its input (noise_conditioning=True): '
                           'pass noise_level, the std t of the Gaussian noise added to the images (t > 0).')
  return jnp.log(jnp.broadcast_to(jnp.reshape(noise_level, (-1,)), (batch,)))


def check_images(x, img_size: int, in_channels: int) -> None:
  """Raises a clear error unless x is a batch of (H, W, C) images of the model's size."""
  want = (img_size, img_size, in_channels)
  if x.ndim != 4 or tuple(x.shape[1:]) != want:
    raise errors.UserError(
        f'Expected images of shape (batch, {img_size}, {img_size}, {in_channels}) (NHWC), got {tuple(x.shape)}. '
        'Images are NHWC in [-1, 1]; convert NCHW arrays with x.transpose(0, 2, 3, 1).')


def check_labels(y, num_classes: int) -> None:
  """Raises a clear error for labels the model cannot take (checked only on concrete values)."""
  if y is None:
    return
  if not num_classes:
    raise errors.UserError('Labels were given, but the model is unconditional (num_classes=0); pass y=None.')
  if jnp.ndim(y) != 1:
    raise errors.UserError(f'Labels must have shape (batch,), got {tuple(jnp.shape(y))}.')
  if isinstance(y, jax.core.Tracer) or not jnp.size(y):
    return
  y = np.asarray(y)
  lo, hi = int(y.min()), int(y.max())
  if lo < -1 or hi >= num_classes:
    raise errors.UserError(f'Labels must lie in [0, {num_classes - 1}] (or -1 for "no label"), '
                           f'got values in [{lo}, {hi}].')


def init_variables(model: TarFlow, rng: Array) -> dict:
  """Fresh variables {'params', 'prior'} for `model`."""
  spec = model.spec
  noise_level = jnp.ones((1,)) if spec.noise_conditioning else None
  return model.init(rng, jnp.zeros((1, spec.img_size, spec.img_size, spec.in_channels)), noise_level=noise_level)


def abstract_variables(model: TarFlow) -> dict:
  """Shapes and dtypes of the variables, without allocating them."""
  return jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))


def from_config(config, **overrides) -> TarFlow:
  """Builds `TarFlow` from a config's `model` fields (an ml_collections ConfigDict or dict)."""
  fields = dict(config)
  fields.update(overrides)
  dtype = fields.pop('dtype', 'float32')
  precision = fields.pop('precision', None)
  return TarFlow(Spec(dtype=jnp.dtype(dtype), precision=precision, **fields))
