"""The benchmark runs on a smoke config and reports every field (a check that it works, not a timing)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from tarflow_jax import benchmark, config_lib, flops, sampling
from tarflow_jax import model as model_lib
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('compile_s', 'median_s', 'min_s', 'max_s', 'flops', 'flops_per_s', 'images_per_s', 'utilisation', 'batch',
          'memory_bytes')


def test_bench_cli_writes_every_field(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.bench', f'--config={REPO}/configs/demo.py:smoke',
                           '--repeats=2', '--sample_batch=8', '--microbatch=4', '--config.mesh.data=-1', f'--json={out}'],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'matmul yardstick' in result.stdout
  r = json.loads(out.read_text())
  assert r['matmul_flops_per_s'] > 0 and r['peak_memory_bytes'] > 0
  for name in ('train', 'eval', 'sample', 'sample_guided', 'jacobi'):
    assert set(FIELDS) <= set(r[name]), name
    assert r[name]['images_per_s'] > 0 and r[name]['flops'] > 0 and r[name]['memory_bytes'] > 0, name
  assert r['sample_guided']['flops'] == 2 * r['sample']['flops']
  assert r['decoding'] == {'chunks': 8, 'microbatch': 4}


def test_decode_flops_match_xla_cost_of_one_step_times_the_steps():
  model = toy.tiny_model(channels=128, head_dim=64, num_blocks=3, layers_per_block=2, img_size=8)
  variables = toy.random_variables(model)
  batch = 4
  cache = model.apply(variables, batch, method=model_lib.on_block(0, model_lib.FlowBlock.init_cache))
  x = jnp.zeros((batch, 1, model.token_dim))
  step = jax.jit(lambda v, x, c: model.apply(v, x, 0, None, c,
                                             method=model_lib.on_block(0, model_lib.FlowBlock.affine_step)))
  cost = step.lower(variables, x, cache).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = cost['flops'] * model.spec.num_blocks * (model.num_tokens - 1)
  assert abs(flops.decode_flops(model, batch) - xla) / xla < 0.15  # XLA also counts elementwise work


def test_flops_of_a_jacobi_plan_match_xla_cost_of_its_steps():
  model = toy.tiny_model(channels=128, head_dim=64, num_blocks=2, layers_per_block=2, img_size=8)  # 16 tokens
  variables = toy.random_variables(model)
  batch, steps = 4, model.num_tokens - 1

  def xla(size, length):  # one step over `size` tokens with a cache of `length`
    cache = model_lib.extend_cache(model.apply(variables, batch, 0, method=model_lib.on_block(
        0, model_lib.FlowBlock.init_cache)), length)
    x = jnp.zeros((batch, size, model.token_dim))
    step = jax.jit(lambda v, x, c: model.apply(v, x, 0, None, c,
                                               method=model_lib.on_block(0, model_lib.FlowBlock.affine_step)))
    cost = step.lower(variables, x, cache).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  plan = sampling.Plan((sampling.Jacobi(window=4), sampling.Jacobi(segment=8)))
  iterations = [jnp.array([6]), jnp.array([3, 2])]  # block 1: segments of 8 and 7 tokens
  want = 6 * xla(4, steps) + 3 * xla(8, 8) + 2 * xla(7, steps)
  got = flops.plan_decode_flops(model, plan, iterations, batch)
  assert abs(got - want) / want < 0.15  # XLA also counts elementwise work
  # Sequential entries count as sequential decoding does.
  seq = sampling.Plan((sampling.Sequential(), sampling.Sequential()))
  assert flops.plan_decode_flops(model, seq, iterations, batch) == flops.decode_flops(model, batch)


def test_flops_of_a_scanned_model_are_counted_unrolled():
  scanned = toy.tiny_model(channels=64, layers_per_block=4, scan_layers=True, remat=True)
  unrolled = scanned.clone(spec=dataclasses.replace(scanned.spec, scan_layers=False, remat=False))
  variables = toy.random_variables(unrolled)
  x = jax.random.uniform(jax.random.key(0), (8, 4, 4, 2), minval=-1.0, maxval=1.0)
  fn = lambda m: lambda v, x: m.apply(v, x)[0].sum()
  looped = benchmark.timed(fn(scanned), variables, x, repeats=1)
  want = benchmark.timed(fn(unrolled), variables, x, repeats=1)['flops']
  assert looped['flops'] < 0.5 * want  # XLA counts the scanned layers once per block
  got = benchmark.recount(looped, fn(unrolled), variables, x)
  assert abs(got['flops'] - want) / want < 0.02
  assert got['flops_per_s'] == got['flops'] / looped['median_s']


def test_flops_of_an_accumulated_or_scanned_training_step_are_those_of_the_plain_step_per_device():
  # On the conftest's 8 devices, batch 16: XLA's compiled count is one device's share of the step.
  config = config_lib.load(f'{REPO}/configs/demo.py:smoke')
  assert jax.device_count() > 1 and config.mesh.data == -1
  config.model.layers_per_block = 2
  flops_of = {}
  for k, scan in ((1, False), (2, False), (1, True)):
    config.grad_accum_steps, config.model.scan_layers = k, scan
    flops_of[k, scan] = benchmark.run(config, ('train',), repeats=1, sample_batch=2)['train']['flops']
  # The recount shares the whole step's FLOPs over the devices; the compiled count also holds the
  # optimiser's update, which every device repeats on its replica (12% of this tiny model's step).
  plain = flops_of[1, False]
  assert abs(flops_of[2, False] - plain) / plain < 0.15  # XLA alone: half, one micro-batch; before: 7x
  assert abs(flops_of[1, True] - plain) / plain < 0.15
