"""Matmul FLOPs of the flow and of its sequential decoding, counted from the architecture.

XLA's cost analysis counts a scanned layer or a decoding loop body once and a Pallas kernel not
at all, so the benchmark and the ahead-of-time report count model FLOPs here. Blocks of their own
shape (iTARFlow) are counted each with its own; per-image terms (the noise-level embedding) are left out.
"""

from tarflow_jax import sampling
from tarflow_jax import model as model_lib


def _layers(spec: model_lib.Spec, i: int) -> int:
  """Transformer layers block i runs: the shared backbone's and its own."""
  return spec.shared_layers + spec.block(i).head_layers


def forward_flops(model: model_lib.TarFlow) -> float:
  """Matmul FLOPs of one image through the flow.

  Per block: the input and output projections, and per layer the qkv, attention output and MLP
  projections (12 C^2 per token at expansion 4) and causal attention (T (T + 1) / 2 query-key
  pairs, two matmuls).
  """
  spec, total = model.spec, 0
  for i in range(spec.num_blocks):
    block = spec.block(i)
    t, c, d = block.num_tokens, block.channels, block.token_dim
    per_layer = 2 * t * (4 + 2 * spec.expansion) * c * c + 2 * 2 * c * t * (t + 1) // 2
    out_dim = 2 * d if spec.nvp else d
    total += 2 * t * d * c + _layers(spec, i) * per_layer + 2 * t * c * out_dim
  return float(total)


def _token_flops(spec: model_lib.Spec, i: int) -> tuple[int, int, int]:
  """(FLOPs of one token through block i's projections and layers, less attention; its layers; its width)."""
  block = spec.block(i)
  c, d, layers = block.channels, block.token_dim, _layers(spec, i)
  per_layer = 2 * (3 * c * c + c * c + 2 * spec.expansion * c * c)
  return layers * per_layer + 2 * d * c + 2 * c * (2 * d if spec.nvp else d), layers, c


def _steps_flops(spec: model_lib.Spec, i: int, steps) -> int:
  """FLOPs of decoding steps of block i for one row: `steps` is (tokens, cache length, how many times) each."""
  per_token, layers, c = _token_flops(spec, i)
  return sum(n * (size * per_token + layers * 2 * 2 * c * size * length) for size, length, n in steps)


def block_decode_flops(model: model_lib.TarFlow, i: int, batch: int, chunks: int = 8) -> float:
  """Matmul FLOPs of sequential decoding of block i (every token) for `batch` rows.

  Per token and layer the qkv, output, and MLP projections, and attention over the cache as the
  sampler holds it (as long as the end of the token's decoding chunk, masked past the token).
  """
  t = model.spec.block(i).num_tokens
  return float(batch * _steps_flops(model.spec, i, [(1, stop, stop - start)
                                                     for start, stop in sampling.decode_chunks(t, chunks)]))


def decode_flops(model: model_lib.TarFlow, batch: int, chunks: int = 8) -> float:
  """Matmul FLOPs of sequential decoding (every block, every token) for `batch` rows."""
  return sum(block_decode_flops(model, i, batch, chunks) for i in range(model.spec.num_blocks))


def plan_decode_flops(model: model_lib.TarFlow, decoder: sampling.Decoder, iterations, batch: int) -> float:
  """Matmul FLOPs of decoding by `decoder` for `batch` rows, given its iterations per block.

  `iterations` as `sampling.sample(..., return_iterations=True)` returns them (per block: one count
  per Jacobi segment, or the window's). A segment's iteration runs its tokens over the cache up to
  its end, a window's its tokens over the whole block's cache.
  """
  total = 0.0
  for i, its in enumerate(iterations):
    d = sampling.decoder_of_block(decoder, i)
    if isinstance(d, sampling.Sequential):
      total += block_decode_flops(model, i, batch, d.chunks)
      continue
    spans = d.spans(i, model.spec.block(i).num_tokens)
    total += batch * _steps_flops(model.spec, i, [(size, length, int(n)) for (size, length), n in zip(spans, its)])
  return total
