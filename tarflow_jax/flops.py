"""Matmul FLOPs of the flow and of its sequential decoding, counted from the architecture.

XLA's cost analysis counts a scanned layer or a decoding loop body once and a Pallas kernel not
at all, so the benchmark and the ahead-of-time report count model FLOPs here.
"""

from tarflow_jax import sampling
from tarflow_jax import model as model_lib


def forward_flops(model: model_lib.TarFlow) -> float:
  """Matmul FLOPs of one image through the flow.

  Per block: the input and output projections, and per layer the qkv, attention output and MLP
  projections (12 C^2 per token at expansion 4) and causal attention (T (T + 1) / 2 query-key
  pairs, two matmuls).
  """
  t, c, d = model.num_tokens, model.spec.channels, model.token_dim
  per_layer = 2 * t * (4 + 2 * model.spec.expansion) * c * c + 2 * 2 * c * t * (t + 1) // 2
  out_dim = 2 * d if model.spec.nvp else d
  return float(model.spec.num_blocks * (2 * t * d * c + model.spec.layers_per_block * per_layer + 2 * t * c * out_dim))


def decode_flops(model: model_lib.TarFlow, batch: int, chunks: int = 8) -> float:
  """Matmul FLOPs of sequential decoding (every block, every token).

  Per token and layer the qkv, output, and MLP projections, and attention over the cache as the
  sampler holds it (as long as the end of the token's decoding chunk, masked past the token).
  """
  c, d = model.spec.channels, model.token_dim
  per_layer = 2 * (3 * c * c + c * c + 2 * model.spec.expansion * c * c)
  per_token = model.spec.layers_per_block * per_layer + 2 * d * c + 2 * c * (2 * d if model.spec.nvp else d)
  bounds = sampling.decode_chunks(model.num_tokens, chunks)
  attention = model.spec.layers_per_block * 2 * 2 * c * sum((stop - start) * stop for start, stop in bounds)
  return float(batch * model.spec.num_blocks * ((model.num_tokens - 1) * per_token + attention))
