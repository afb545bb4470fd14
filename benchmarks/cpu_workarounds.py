r"""What each workaround for XLA's CPU backend (tarflow_jax/xla_cpu.py) buys: the training step with and without it.

  python benchmarks/cpu_workarounds.py [--config=configs/demo.py] [--rounds=21] [--steps=5]

In one process, the training step of `--config` (`train.build`'s jitted step, the state donated,
on the config's batch of random digits) is compiled once with every workaround on and once with
each one turned off (`xla_cpu.turned_off`), then timed in alternating rounds (`--steps` steps of
each variant per round, the order reversed every other round), so that load from other processes
on a shared machine falls on all variants alike. Prints each variant's compile time (with its
first step), its median step time, and the median and range of its per-round ratio to the step
with every workaround on (above 1: the workaround pays). The process starts as the command lines
do (`tarflow_jax.cli`: freed host memory kept for reuse).
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'demo.py'),
                      help='Experiment config (path[:arg]) whose training step is timed.')
  parser.add_argument('--rounds', type=int, default=21, help='Alternating rounds.')
  parser.add_argument('--steps', type=int, default=5, help='Steps of each variant per round.')
  args = parser.parse_args()
  if args.rounds <= 0 or args.steps <= 0:
    sys.exit('--rounds and --steps must be positive.')
  return args


def main():
  args = parse_args()
  sys.path.insert(0, REPO)
  from tarflow_jax.cli import _common  # pylint: disable=g-import-not-at-top
  _common.prepare_process()  # as the command lines start
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from tarflow_jax import config_lib, sharding, train, xla_cpu  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config)
  mesh = sharding.make_mesh(config.mesh)
  m = config.model
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(mesh, {
      'image': rng.integers(0, 256, (config.batch_size, m.img_size, m.img_size, m.in_channels), np.uint8),
      'label': rng.integers(0, max(m.num_classes, 1), (config.batch_size,), np.int32)})
  variants = {'all on': ()} | {f'{name} off': (name,) for name in xla_cpu.WORKAROUNDS}
  steps, states, compile_s = {}, {}, {}
  for name, off in variants.items():
    with xla_cpu.turned_off(*off):  # traced (at the first call) without the workarounds `off`
      program = train.build(config, mesh, optax.constant_schedule(config.optim.lr))
      state = program.init()
      start = time.perf_counter()
      with jax.set_mesh(mesh):
        state, _ = program.step(state, batch)
      jax.block_until_ready(state)
    compile_s[name] = time.perf_counter() - start
    steps[name], states[name] = program.step, state
    print(f'{name}: compiled, with its first step, in {compile_s[name]:.1f} s', flush=True)

  times = {name: [] for name in variants}
  for r in range(args.rounds):
    for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
      state = states[name]
      start = time.perf_counter()
      with jax.set_mesh(mesh):
        for _ in range(args.steps):
          state, metrics = steps[name](state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - start) / args.steps)
      states[name] = state
    print(f'round {r}: ' + ', '.join(f'{n} {t[-1] * 1e3:.0f} ms' for n, t in times.items()), flush=True)

  print(f'\n{args.config}, {args.rounds} rounds of {args.steps} steps, {jax.device_count()} devices')
  print(f'{"variant":18s} {"compile s":>9s} {"step ms":>8s} {"ratio to all on: median [min, max]":>36s}')
  for name, t in times.items():
    ratios = [a / b for a, b in zip(t, times['all on'])]
    print(f'{name:18s} {compile_s[name]:9.1f} {statistics.median(t) * 1e3:8.1f} '
          f'{statistics.median(ratios):20.3f} [{min(ratios):.3f}, {max(ratios):.3f}]')


if __name__ == '__main__':
  main()
