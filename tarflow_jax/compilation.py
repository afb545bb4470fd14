"""Ahead-of-time compilation for a TPU slice on any host with libtpu: memory, FLOPs, step time, collectives."""

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tarflow_jax import attention, errors, iterative_sampling, sampling, sharding, train
from tarflow_jax import flops as flops_lib
from tarflow_jax import model as model_lib

# Peak dense bf16 FLOP/s of one chip (Cloud TPU system architecture pages), by JAX's device_kind.
PEAK_BF16_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12, 'TPU v5p': 459e12,
                   'TPU v6 lite': 918e12, 'TPU v6e': 918e12}
# Topologies of TensorCore pairs that JAX drives as one device (megacore).
_MEGACORE = ('v4', 'v5p')
_OOM = re.compile(r'memory required for HLO temporaries \((?P<temp>[\d.]+)([KMGT])\) exceeds available HBM '
                  r'\((?P<hbm>[\d.]+)([KMGT])\)')
_COLLECTIVE = re.compile(r'=\s*(?P<shape>\(?[^=]*?\)?)\s+'
                         r'(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(')
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
                'f64': 8, 's64': 8, 'u64': 8}


@dataclasses.dataclass
class Compiled:
  """One compiled program: what it needs per chip and what XLA's cost model says of it."""
  batch: int
  fits: bool
  bytes_per_chip: int  # arguments + temporaries + outputs - aliased (donated) bytes
  memory: dict
  flops_per_chip: float  # model FLOPs (the plain model, no remat), per chip and step
  estimated_step_s: Optional[float]  # XLA's cost model on the compiled program; none for Pallas kernels
  collectives: dict
  error: str = ''


def topology_devices(name: str):
  """The devices of a TPU topology such as 'v5e:2x4' or 'v4:2x2x1', from libtpu; no TPU needed."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if name.startswith(_MEGACORE) else {}
  try:
    return topologies.get_topology_desc(platform='tpu', topology_name=name, **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    raise errors.MissingExtra(f'Cannot describe TPU topology {name!r} ({e}). It needs libtpu (pip install -e ".[tpu]") '
                              'and a name such as v5e:2x4, v4:2x2x1 or v5p:2x2x1.') from e


def hbm_bytes(devices) -> int:
  """Usable HBM of one chip, as the TPU compiler reports it (from a program that cannot fit)."""
  mesh = jax.make_mesh((len(devices),), ('d',), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  too_big = jax.ShapeDtypeStruct((len(devices), 2**40 // 4), jnp.float32,
                                 sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  try:
    jax.jit(lambda x: x * 2).lower(too_big).compile()
  except Exception as e:  # pylint: disable=broad-except
    match = _OOM.search(str(e))
    if match:
      return _bytes(match.group('hbm'), match.group(4))
    raise
  raise RuntimeError('The TPU compiler accepted a 1 TiB program; cannot read the HBM size.')


def train_program(config: ml_collections.ConfigDict, mesh, batch: Optional[int] = None):
  """(jitted train step, abstract args): the step of `train.build`, as `train.train_and_evaluate` runs it."""
  batch = config.batch_size if batch is None else batch
  program = train.build(config, mesh, train.schedule(config, 1000, 100_000))
  m = config.model
  batch_sharding = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, m.img_size, m.img_size, m.in_channels), jnp.uint8, sharding=batch_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
  return program.step, (program.abstract_state, {'image': images, 'label': labels})


def sample_program(config: ml_collections.ConfigDict, mesh, batch: Optional[int] = None):
  """(jitted sampler with the config's guidance, abstract args, decode FLOPs)."""
  batch = config.sample.num if batch is None else batch
  model = model_lib.from_config(config.model)
  variables = model_lib.abstract_variables(model)
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
                           variables)
  batch_sharding = sharding.batch_sharding(mesh)
  noise = jax.ShapeDtypeStruct((batch, model.num_tokens, model.token_dim), jnp.float32, sharding=batch_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding) if model.spec.num_classes else None
  if model.spec.noise_conditioning:  # iTARFlow: decoding at t1, then `steps` rounds of forward and gradient
    guidance, denoising = iterative_sampling.from_config(config)
    fn = jax.jit(lambda v, z, y: iterative_sampling.sample(model, v, z, y, guidance=guidance, denoising=denoising,
                                                           rng=jax.random.key(0)))
    guided = guidance.guided_blocks(model.spec.num_blocks)
    flops = sum(flops_lib.block_decode_flops(model, i, 2 * batch if n < guided else batch)
                for n, i in enumerate(reversed(range(model.spec.num_blocks))))
    flops += denoising.steps * 3 * batch * flops_lib.forward_flops(model)
    return fn, (variables, noise, labels), flops
  guidance = sampling.guidance_from_config(config)
  fn = jax.jit(lambda v, z, y: sampling.sample(model, v, z, y, guidance=guidance))
  flops = flops_lib.decode_flops(model, 2 * batch if guidance.enabled else batch)
  return fn, (variables, noise, labels), flops


def compile_train(config, mesh, batch: Optional[int] = None) -> Compiled:
  """Compiles the training step for `mesh` (of TPU topology devices) at `batch` (default: the config's)."""
  batch = config.batch_size if batch is None else batch
  step, args = train_program(config, mesh, batch)
  flops = 3 * batch * flops_lib.forward_flops(model_lib.from_config(config.model))  # forward, and twice that backward
  with jax.set_mesh(mesh):
    return _compile(step, args, batch, flops / mesh.size)


def compile_sample(config, mesh, batch: Optional[int] = None) -> Compiled:
  """Compiles the sampler (the config's guidance) for `mesh` at `batch` (default: `config.sample.num`)."""
  batch = config.sample.num if batch is None else batch
  fn, args, flops = sample_program(config, mesh, batch)
  with jax.set_mesh(mesh):
    return _compile(fn, args, batch, flops / mesh.size)


def max_batch(compile_fn, config, mesh, start: int) -> int:
  """The largest global batch (a multiple of the device count) whose program fits; 0 if none does."""
  unit = mesh.size
  fits = lambda b: compile_fn(config, mesh, b).fits
  lo, hi = 0, max(unit, start // unit * unit)
  while fits(hi):  # grow until it does not fit
    lo, hi = hi, 2 * hi
  while hi - lo > unit:  # lo fits (or is 0), hi does not
    mid = (lo + hi) // 2 // unit * unit
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def _compile(fn, args, batch: int, flops_per_chip: float) -> Compiled:
  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    match = _OOM.search(str(e))
    if not match:
      raise
    temp = _bytes(match.group('temp'), match.group(2))
    return Compiled(batch, False, temp, {'temp': temp}, flops_per_chip, None, {}, error=str(e).splitlines()[0])
  m = compiled.memory_analysis()
  memory = {'arguments': m.argument_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
            'outputs': m.output_size_in_bytes, 'aliased': m.alias_size_in_bytes}
  total = memory['arguments'] + memory['temporaries'] + memory['outputs'] - memory['aliased']
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  seconds = cost.get('optimal_seconds')
  return Compiled(batch, True, int(total), memory, flops_per_chip,
                  float(seconds) if seconds and seconds > 0 else None, collectives(compiled.as_text()))


def collectives(hlo: str) -> dict:
  """Count and result bytes of each collective in compiled HLO text (a loop body counted once).

  On TPU, XLA may split the all-gather of a weight into a ring of collective permutes overlapped
  with its matmul, so FSDP shows up as all-gathers, collective permutes or both.
  """
  out = {}
  for match in _COLLECTIVE.finditer(hlo):
    shapes = _ARRAY.findall(match.group('shape'))
    if match.group(0).rstrip('(').endswith('-start') and len(shapes) > 1:
      shapes = [s for s in shapes if s[1]] or shapes  # a permute's start also holds two u32[] contexts
      shapes = shapes[len(shapes) // 2:]  # async start: (operands, results)
    size = sum(_DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
               for dtype, dims in shapes)
    entry = out.setdefault(match.group('op'), {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += int(size)
  return out


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * 1024 ** ('KMGT'.index(unit) + 1))


def report(config: ml_collections.ConfigDict, topology: str, what=('train', 'sample'),
           find_max_batch: bool = False) -> dict:
  """Compiles `what` for `topology` and returns the figures (see `python -m tarflow_jax.aot`)."""
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  kind = devices[0].device_kind
  hbm = hbm_bytes(devices)
  peak = PEAK_BF16_FLOPS.get(kind)
  out: dict[str, Any] = {'topology': topology, 'chips': len(devices), 'device_kind': kind,
                         'hbm_bytes_per_chip': hbm, 'peak_bf16_flops_per_chip': peak,
                         'mesh': dict(mesh.shape), 'attention_kernel': attention.resolve(
                             config.model.get('attention_kernel', 'auto'), 'tpu')}
  programs = {'train': (compile_train, config.batch_size), 'sample': (compile_sample, config.sample.num)}
  for name in what:
    compile_fn, batch = programs[name]
    result = dataclasses.asdict(compile_fn(config, mesh))
    result['fits'] = result['fits'] and result['bytes_per_chip'] <= hbm
    if peak:  # a floor: the model's FLOPs at the chip's bf16 peak
      result['step_s_at_peak'] = result['flops_per_chip'] / peak
    seconds = result['estimated_step_s']
    if seconds:
      result['images_per_s'] = result['batch'] / seconds
      if peak:
        result['estimated_utilisation'] = result['flops_per_chip'] / seconds / peak
    if find_max_batch:
      result['max_batch'] = max_batch(compile_fn, config, mesh, batch)
    out[name] = result
  return out


def table(result: dict) -> str:
  """The report as a few lines for a terminal."""
  gib = 2**30
  lines = [f'{result["topology"]}: {result["chips"]} x {result["device_kind"]}, '
           f'{result["hbm_bytes_per_chip"] / gib:.2f} GiB HBM per chip, mesh {result["mesh"]}, '
           f'attention {result["attention_kernel"]}']
  for name in ('train', 'sample'):
    if name not in result:
      continue
    r = result[name]
    line = (f'  {name}: batch {r["batch"]}, {r["bytes_per_chip"] / gib:.2f} GiB per chip '
            f'({"fits" if r["fits"] else "DOES NOT FIT"}), {r["flops_per_chip"] / 1e12:.2f} TFLOP per chip')
    if 'step_s_at_peak' in r:
      line += f', {r["step_s_at_peak"]:.3f} s per step at bf16 peak'
    if r['estimated_step_s']:
      line += f', estimated {r["estimated_step_s"]:.3f} s per step ({r["images_per_s"]:.0f} images/s'
      line += f', {r["estimated_utilisation"]:.0%} of bf16 peak, XLA cost model)' if 'estimated_utilisation' in r \
          else ')'
    if 'max_batch' in r:
      line += f'; largest batch that fits: {r["max_batch"]}'
    lines.append(line)
    if r['memory'] and r['fits']:
      lines.append('    ' + ', '.join(f'{k} {v / gib:.2f} GiB' for k, v in r['memory'].items()))
    if r['collectives']:
      lines.append('    collectives: ' + ', '.join(f'{k} x{v["count"]} ({v["bytes"] / 2**20:.0f} MiB)'
                                                    for k, v in sorted(r['collectives'].items())))
    if r['error']:
      lines.append(f'    compiler: {r["error"]}')
  return '\n'.join(lines)
