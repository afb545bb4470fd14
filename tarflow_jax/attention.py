"""Softmax attention kernels: einsums (any backend), cuDNN (GPU) and Pallas splash attention (TPU)."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tarflow_jax import errors, platforms, sharding, xla_cpu

KERNELS = ('auto', 'einsum', 'cudnn', 'splash')
# Splash attention tiles the sequence in blocks of the largest of these that divides it.
SPLASH_BLOCKS = (512, 256, 128)


def resolve(kernel: str, target: str) -> str:
  """The kernel that `kernel` ('auto' or a name) means on the platform `target`."""
  if kernel not in KERNELS:
    raise errors.UserError(f'Unknown attention kernel {kernel!r}; use one of {", ".join(KERNELS)}.')
  if kernel != 'auto':
    return kernel
  return {'tpu': 'splash', 'gpu': 'cudnn', 'cuda': 'cudnn'}.get(target, 'einsum')


def dot_product_attention(q, k, v, *, scale: float, mask=None):
  """Softmax attention of queries q (B, S, H, hd) over keys and values k, v (B, H, T, hd).

  k and v are head-major, the layout of the decoding cache, so that a decoding
  step reads the cache without transposing it. The logits and the softmax are
  at least float32 (float64 for float64 models). `mask` broadcasts to
  (B, H, S, T); every query must see at least one key.
  """
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum('bsnh,bnth->bnst', q * jnp.asarray(scale, q.dtype), k, preferred_element_type=acc)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, H, S, T)
  return jnp.einsum('bnst,bnth->bsnh', weights, v)


def causal_attention(q, k, v, *, scale: float, kernel: str = 'auto'):
  """Causal softmax attention over (B, T, H, hd) arrays; returns (B, T, H, hd).

  Every kernel computes the same function, with float32 logits and softmax for
  bfloat16 inputs; they differ in memory and speed:
  - 'einsum': two einsums, materialising the (B, H, T, T) logits; the
    fastest on a CPU, and the only one for float64 models.
  - 'cudnn': `jax.nn.dot_product_attention` (cuDNN's fused kernels on GPU).
  - 'splash': Pallas splash attention (TPU), blockwise with an online softmax:
    memory linear in T. Needs T a multiple of 128 and a head dimension of at
    least 64; other shapes take the einsums. Each device attends over its own
    examples along the batch axes of the mesh set by `jax.set_mesh`; without
    one, on several devices, the einsums run instead. Outside a TPU it runs in
    Pallas' interpret mode (for tests).
  - 'auto': splash on TPU, cuDNN on GPU, einsums elsewhere.
  """
  target = platforms.target()
  kernel = resolve(kernel, target)
  if q.dtype == jnp.float64:
    kernel = 'einsum'
  if kernel == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
  if kernel == 'splash' and _splash_fits(q.shape):
    axes, shards = sharding.context_batch_axes()
    if q.shape[0] % shards == 0 and (axes or jax.device_count() == 1):
      return _splash_causal(q, k, v, scale=scale, axes=axes, interpret=target != 'tpu')
  return _einsum_causal_attention(q, k, v, scale)


@xla_cpu.replaced_on_cpu('attention', xla_cpu.causal_attention)
def _einsum_causal_attention(q, k, v, scale: float):
  """Causal `dot_product_attention` over (B, T, H, hd) arrays; returns (B, T, H, hd)."""
  t = q.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))  # (S, T)
  return dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), scale=scale, mask=causal)


def _splash_block(length: int) -> int:
  """The splash tile for `length` tokens; 0 if no lane-aligned tile divides it."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), 0)


def _splash_fits(shape) -> bool:
  _, t, _, hd = shape
  return bool(_splash_block(t)) and hd >= 64


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
  """Causal splash kernel over (H, T, hd) queries, keys and values of one example."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  block = _splash_block(length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(num_heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_causal(q, k, v, *, scale: float, axes: tuple[str, ...], interpret: bool):
  """Splash attention over (B, T, H, hd), each device over its examples along the mesh `axes`."""
  _, t, h, _ = q.shape
  kernel = _splash_kernel(h, t, interpret)
  # (B, T, H, hd) -> (B, H, T, hd); the kernel takes pre-scaled queries.
  q, k, v = (x.swapaxes(1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))

  def attend(q, k, v):
    return jax.vmap(kernel)(q, k, v)

  if axes:
    # XLA does not partition a Pallas call: each device attends over its own examples.
    spec = P(axes)
    attend = jax.shard_map(attend, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec, spec, spec),
                           out_specs=spec, check_vma=False)
  return attend(q, k, v).swapaxes(1, 2)
