"""Benchmark of training, sampling and likelihood evaluation for any config.

Times each compiled function after warm-up over repeated runs (median and spread) and relates
achieved FLOP/s (XLA's cost analysis of the compiled function) to a large matmul timed in the
same process, a utilisation ratio that survives noisy shared machines. The command line is
`python -m tarflow_jax.cli.bench`.
"""

import dataclasses
import functools
import resource
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import flops as flops_lib
from tarflow_jax import images, likelihood, platforms, sampling, sharding, train
from tarflow_jax import model as model_lib


def timed(fn, *args, repeats: int) -> dict:
  """Compile time, then median/min/max seconds of `repeats` calls after one warm-up call."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))
  memory = compiled.memory_analysis()  # XLA's buffer assignment: the device memory this function needs
  memory = sum(getattr(memory, f'{k}_size_in_bytes', 0) for k in ('argument', 'output', 'temp')) if memory else 0
  median = float(np.median(times))
  return {'compile_s': compile_s, 'median_s': median, 'min_s': float(np.min(times)), 'max_s': float(np.max(times)),
          'flops': flops, 'flops_per_s': flops / median if median else 0.0, 'memory_bytes': int(memory)}


def recount(result: dict, fn, *args, devices: int = 1) -> dict:
  """`result` with FLOPs per device from XLA's cost analysis of `fn` lowered (not compiled) on `args`.

  The lowered program is the whole computation, over `devices` devices (the compiled one, which
  `timed` counts, is one device's share).

  For models with `scan_layers` or `remat`, and training steps with gradient accumulation: XLA
  counts a loop body once and counts the recomputation, so the model FLOPs come from the same
  model unrolled and without remat, over the whole batch at once (same parameters, same result).
  """
  cost = jax.jit(fn).lower(*args).cost_analysis()
  flops = float(cost.get('flops', 0.0)) / devices
  return {**result, 'flops': flops, 'flops_per_s': flops / result['median_s'] if result['median_s'] else 0.0}


def matmul_rate(dtype, repeats: int, n: int = 2048) -> float:
  """FLOP/s of an n x n x n matmul in this process: the yardstick for utilisation."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  r = timed(lambda a, b: a @ b, a, a, repeats=repeats)
  return 2 * n**3 / r['median_s']


def peak_memory_bytes() -> int:
  """Peak device memory where the backend reports it, else the process's peak resident set."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(config, what, repeats: int, sample_batch: int, chunks: int = 8, microbatch: Optional[int] = None) -> dict:
  model = model_lib.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  backend = platforms.target()
  peak = matmul_rate(jnp.float32 if backend == 'cpu' else jnp.bfloat16, repeats)
  out = {'backend': backend, 'devices': jax.device_count(), 'matmul_flops_per_s': peak,
         'decoding': {'chunks': chunks, 'microbatch': microbatch or sample_batch},
         'config': {k: config.model[k] for k in config.model}}
  lr = train.schedule(config, 100, 1000)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, config.seed)
  variables = state['variables']
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = sharding.global_batch(mesh, {
      'image': rng.integers(0, 256, (b, config.model.img_size, config.model.img_size, config.model.in_channels),
                            dtype=np.uint8),
      'label': rng.integers(0, max(config.model.num_classes, 1), (b,), dtype=np.int32)})
  plain = model.clone(spec=dataclasses.replace(model.spec, scan_layers=False, remat=False,
                                                attention_kernel='einsum'))  # model FLOPs: `recount`

  def measure(fn, plain_fn, *args, looped: bool = model.spec.scan_layers or model.spec.remat):
    """`timed(fn, *args)`; where XLA counts a loop body once (`looped`), the FLOPs of `plain_fn` (`recount`)."""
    with jax.set_mesh(mesh):  # attention kernels split over the mesh, as in training
      r = timed(fn, *args, repeats=repeats)
    return recount(r, plain_fn, *args, devices=mesh.size) if looped else r

  if 'train' in what:
    whole_batch = config.copy_and_resolve_references()
    whole_batch.grad_accum_steps = 1  # XLA counts the accumulation loop's body, one micro-batch, once
    step = lambda m, c: functools.partial(train.train_step, model=m, tx=tx, config=c, lr=lr)
    r = measure(step(model, config), step(plain, whole_batch), state, batch,
                looped=model.spec.scan_layers or model.spec.remat or config.grad_accum_steps > 1)
    out['train'] = {**r, 'batch': b, 'images_per_s': b / r['median_s'], 'utilisation': r['flops_per_s'] / peak}
  if 'eval' in what:
    log_prob = lambda m: lambda v, x: likelihood.log_prob(m, v, images.from_uint8(x))
    r = measure(log_prob(model), log_prob(plain), variables, batch['image'])
    out['eval'] = {**r, 'batch': b, 'images_per_s': b / r['median_s'], 'utilisation': r['flops_per_s'] / peak}
  noise = jax.random.normal(jax.random.key(1), (sample_batch, model.num_tokens, model.token_dim))
  y = jnp.arange(sample_batch) % model.spec.num_classes if model.spec.num_classes else None
  guidance = sampling.guidance_from_config(config)
  if not guidance.enabled:  # guided decoding is timed even where the experiment samples without it
    guidance = sampling.Guidance(weight=1.0, attn_temp=1.0 if model.spec.num_classes else 0.7)
  decoders = {}
  if 'sample' in what:
    sequential = sampling.Sequential(chunks=chunks, microbatch=microbatch)
    decoders['sample'] = lambda v, z: sampling.sample(model, v, z, y, decoder=sequential)
    decoders['sample_guided'] = lambda v, z: sampling.sample(model, v, z, y, guidance=guidance, decoder=sequential)
  if 'jacobi' in what:
    decoders['jacobi'] = lambda v, z: sampling.sample(model, v, z, y, decoder=sampling.Jacobi(tol=1e-3))
  for name, fn in decoders.items():
    r = timed(fn, variables, noise, repeats=max(1, repeats // 2))
    # Utilisation against the sequential decode's FLOPs (2B rows with guidance), for Jacobi too.
    flops = flops_lib.decode_flops(model, 2 * sample_batch if name == 'sample_guided' else sample_batch, chunks)
    r.update(flops=flops, flops_per_s=flops / r['median_s'])
    out[name] = {**r, 'batch': sample_batch, 'images_per_s': sample_batch / r['median_s'],
                 'utilisation': r['flops_per_s'] / peak}
  out['peak_memory_bytes'] = peak_memory_bytes()
  return out


def table(result: dict) -> str:
  rows = [f'{"what":<14}{"images/s":>12}{"median s":>11}{"spread s":>18}{"compile s":>11}{"GFLOP":>10}{"util":>8}'
          f'{"MiB":>8}']
  for name in ('train', 'eval', 'sample', 'sample_guided', 'jacobi'):
    if name in result:
      r = result[name]
      rows.append(f'{name:<14}{r["images_per_s"]:>12.2f}{r["median_s"]:>11.4f}'
                  f'{r["min_s"]:>9.4f}-{r["max_s"]:<8.4f}{r["compile_s"]:>11.1f}{r["flops"] / 1e9:>10.2f}'
                  f'{r["utilisation"]:>8.1%}{r["memory_bytes"] / 2**20:>8.0f}')
  rows.append(f'matmul yardstick {result["matmul_flops_per_s"] / 1e9:.1f} GFLOP/s on {result["devices"]} '
              f'{result["backend"]} device(s); MiB: XLA buffers per call; process peak '
              f'{result["peak_memory_bytes"] / 2**20:.0f} MiB')
  return '\n'.join(rows)
