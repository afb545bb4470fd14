r"""Sampling time side by side: the library's sequential decoder, another checkout of it, and the reference's eager sampler.

  python benchmarks/compare_sampling_speed.py --workload=mnist \
      [--reference_dir=/path/to/ml-tarflow --reference_python=/path/to/venv/bin/python] \
      [--baseline_dir=/path/to/older/checkout [--baseline_malloc=reuse]] [--rounds=5] [--threads=0] \
      [--microbatch=auto] [--malloc=reuse]

Each side runs in its own child process, pinned to the same `--threads` cores, on the same noise
(random weights: the time of exact decoding does not depend on them):
- library: this checkout's `sampling.sample` with `Sequential(chunks, microbatch)`, started as
  `cli.sample` starts on a CPU: JAX on the CPU, glibc's malloc as it is (`--malloc=reuse`: freed
  host memory kept for reuse, `host_memory`, as the other command lines start);
- baseline (`--baseline_dir`): the same workload through another checkout of `tarflow_jax` (e.g. a
  `git worktree` of an older commit, or this one with another `--baseline_malloc`), started the same
  way; its older `sample`
  signature (`guidance=`, `chunks=`, `microbatch=`) is used where it has no `Sequential`;
- reference (`--reference_dir`, a checkout of apple/ml-tarflow, run by `--reference_python`, an
  interpreter with torch): `transformer_flow.Model.reverse` eagerly under `torch.no_grad`, its OpenMP
  threads waiting passively (`OMP_WAIT_POLICY=PASSIVE` unless set) so that a busy machine does not
  stall them.

Workloads:
- `mnist`: `configs/mnist.py`'s architecture (28x28x1, patch 4, width 128, 4 blocks of 4 layers,
  10 classes), 100 samples, guidance 1 (200 rows per step), the decoder's default chunks;
- `imagenet64`: the ImageNet-64 token layout (1,024 tokens of 12: 64x64x3, patch 2), width 256,
  2 blocks of 2 layers, unconditional, 16 samples, 16 chunks, micro-batches of 4.

`--microbatch` overrides the micro-batch ('auto': `Sequential`'s own choice for this machine; 0:
the whole batch); a baseline without `Sequential` keeps the workload's. Every side is called once to
compile and warm up, then the sides are timed in alternating rounds (the order rotating each
round), so that load from other processes falls on all alike; the per-round ratios to the reference
(or to the baseline without one) are what mean most on a shared machine. Prints each side's median
and range, and the median and range of the ratios.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = {
    'mnist': dict(in_channels=1, img_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=4,
                  num_classes=10, batch=100, guidance=1.0, chunks=8, microbatch=None),
    'imagenet64': dict(in_channels=3, img_size=64, patch_size=2, channels=256, num_blocks=2, layers_per_block=2,
                       num_classes=0, batch=16, guidance=0.0, chunks=16, microbatch=4),
}
ARCHITECTURE = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block', 'num_classes')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', choices=sorted(WORKLOADS), default='mnist')
  parser.add_argument('--reference_dir', help='Local checkout of apple/ml-tarflow.')
  parser.add_argument('--reference_python', default=sys.executable, help='Python with torch, for the reference.')
  parser.add_argument('--baseline_dir', help='Another checkout of this repository (e.g. an older commit).')
  parser.add_argument('--rounds', type=int, default=5, help='Alternating rounds.')
  parser.add_argument('--threads', type=int, default=0, help='Cores for every side; 0: all this process may use.')
  parser.add_argument('--microbatch', default=None, type=lambda v: v if v == 'auto' else int(v),
                      help="The library's micro-batch: a number, 0 (whole batch) or 'auto'; default: the workload's.")
  parser.add_argument('--malloc', choices=('plain', 'reuse'), default='plain',
                      help="The library's malloc: glibc's defaults, as `cli.sample` starts (plain), or freed memory "
                           "kept for reuse, as the other command lines start (reuse: host_memory).")
  parser.add_argument('--baseline_malloc', choices=('plain', 'reuse'), default='plain', help="The baseline's malloc.")
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--code_dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.rounds <= 0 or args.threads < 0:
    sys.exit('--rounds must be positive, --threads non-negative.')
  if args.reference_dir and not os.path.isfile(os.path.join(args.reference_dir, 'transformer_flow.py')):
    sys.exit(f'--reference_dir={args.reference_dir!r} holds no transformer_flow.py: give a checkout of apple/ml-tarflow.')
  if args.baseline_dir and not os.path.isfile(os.path.join(args.baseline_dir, 'tarflow_jax', 'sampling.py')):
    sys.exit(f'--baseline_dir={args.baseline_dir!r} holds no tarflow_jax/sampling.py.')
  return args


def noise_and_labels(w: dict):
  """The same (B, T, D) float32 noise and (B,) labels (or None) for every side."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tokens, dim = (w['img_size'] // w['patch_size']) ** 2, w['in_channels'] * w['patch_size'] ** 2
  noise = rng.standard_normal((w['batch'], tokens, dim)).astype(np.float32)
  labels = rng.integers(0, w['num_classes'], w['batch']).astype(np.int32) if w['num_classes'] else None
  return noise, labels


def library_sampler(code_dir: str, w: dict, microbatch, reuse_freed_memory: bool = True):
  """A function running one call of `sampling.sample` of the checkout at `code_dir`, and its settings."""
  # `cli.sample`'s start-up for every checkout alike: the CPU (JAX_PLATFORMS, set by the parent), and malloc
  # as it is or (`reuse_freed_memory`) `host_memory`'s settings.
  spec = importlib.util.spec_from_file_location('host_memory', os.path.join(REPO, 'tarflow_jax', 'host_memory.py'))
  host_memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(host_memory)
  if reuse_freed_memory:
    host_memory.reuse_freed_memory()
  sys.path.insert(0, code_dir)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tarflow_jax import model as model_lib, sampling  # pylint: disable=g-import-not-at-top

  fields = {k: w[k] for k in ARCHITECTURE}
  model = model_lib.TarFlow(model_lib.Spec(**fields)) if hasattr(model_lib, 'Spec') else model_lib.TarFlow(**fields)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  noise, labels = noise_and_labels(w)
  noise, labels = jnp.asarray(noise), None if labels is None else jnp.asarray(labels)
  if hasattr(sampling, 'Sequential'):
    decoder = sampling.Sequential(w['chunks'], w['microbatch'] if microbatch is None else microbatch or None)
    run = lambda: sampling.sample(model, variables, noise, labels, guidance=sampling.Guidance(weight=w['guidance']),
                                  decoder=decoder)
    resolved = sampling.resolve_microbatch(model, decoder, w['batch'], w['guidance'] > 0) if hasattr(
        sampling, 'resolve_microbatch') else decoder.microbatch
    setting = f'{decoder}, micro-batch {resolved or w["batch"]}'
  else:
    run = lambda: sampling.sample(model, variables, noise, labels, guidance=w['guidance'], chunks=w['chunks'],
                                  microbatch=w['microbatch'])
    setting = f'chunks={w["chunks"]}, microbatch={w["microbatch"]}'
  return lambda: jax.block_until_ready(run()), f'jax {jax.__version__}, {setting}'


def reference_sampler(reference_dir: str, w: dict, threads: int):
  """A function running one eager `Model.reverse` of the reference, and its settings."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(reference_dir))
  import transformer_flow  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = transformer_flow.Model(nvp=True, **{k: w[k] for k in ARCHITECTURE}).eval()
  noise, labels = noise_and_labels(w)
  noise = torch.from_numpy(noise)
  labels = None if labels is None else torch.from_numpy(labels).long()

  def run():
    with torch.no_grad():
      model.reverse(noise.clone(), labels, guidance=w['guidance'])

  return run, f'torch {torch.__version__}'


def worker(args):
  """A child: builds its side, says it is ready, then answers each line from the parent with the seconds of a call."""
  w = WORKLOADS[args.workload]
  threads = len(os.sched_getaffinity(0))
  if args.worker == 'reference':
    run, about = reference_sampler(args.code_dir, w, threads)
  else:
    run, about = library_sampler(args.code_dir, w, args.microbatch, args.malloc == 'reuse')
    about += f', malloc {args.malloc}'
  start = time.perf_counter()
  run()  # compile, allocate, warm the caches
  print(json.dumps({'about': about, 'first_call_s': time.perf_counter() - start}), flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    run()
    print(json.dumps(time.perf_counter() - start), flush=True)


def main():
  args = parse_args()
  if args.worker:
    return worker(args)
  cores = sorted(os.sched_getaffinity(0))
  if args.threads > len(cores):
    sys.exit(f'--threads={args.threads}: this process may use only {len(cores)} cores.')
  os.sched_setaffinity(0, cores[:args.threads or len(cores)])  # inherited by the children
  sides = {}
  common = [__file__, f'--workload={args.workload}']
  if args.microbatch is not None:
    common.append(f'--microbatch={args.microbatch}')
  if args.reference_dir:
    sides['reference'] = [args.reference_python, *common, '--worker=reference', f'--code_dir={args.reference_dir}']
  if args.baseline_dir:
    sides['baseline'] = [sys.executable, *common, f'--malloc={args.baseline_malloc}', '--worker=baseline',
                         f'--code_dir={args.baseline_dir}']
  sides['library'] = [sys.executable, *common, f'--malloc={args.malloc}', '--worker=library', f'--code_dir={REPO}']
  env = dict(os.environ, PYTHONPATH='', JAX_PLATFORMS='cpu')
  # torch's OpenMP threads wait by spinning: on a machine shared with other processes a spinning
  # thread holds a core that a busy one needs, and torch slows down many times over. Passive waiting
  # (the threads sleep) leaves the reference's times those of its work.
  env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  procs = {}

  def receive(name):
    line = procs[name].stdout.readline()
    if not line:
      sys.exit(f'The {name} process ended (exit code {procs[name].wait()}); its error is printed above.')
    return json.loads(line)

  about = {}
  for name, cmd in sides.items():  # one at a time: a start-up does not overlap another's
    procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    about[name] = receive(name)
  times = {name: [] for name in sides}
  names = list(sides)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      procs[name].stdin.write('go\n')
      procs[name].stdin.flush()
      times[name].append(receive(name))
  for p in procs.values():
    p.stdin.close()
    p.wait()
  w = WORKLOADS[args.workload]
  print(f'{args.workload}: {w["batch"]} samples, guidance {w["guidance"]}; {len(os.sched_getaffinity(0))} threads each; '
        f'{args.rounds} alternating rounds')
  for name, t in times.items():
    print(f'  {name:<9} median {statistics.median(t):7.3f} s  (rounds {min(t):.3f}-{max(t):.3f}; first call '
          f'{about[name]["first_call_s"]:.1f} s; {about[name]["about"]})')
  yardstick = 'reference' if 'reference' in times else 'baseline' if 'baseline' in times else None
  for name in times:
    if yardstick and name != yardstick:
      ratios = [y / t for y, t in zip(times[yardstick], times[name])]
      print(f'  {yardstick} / {name}: median {statistics.median(ratios):.2f}x  '
            f'(rounds {min(ratios):.2f}-{max(ratios):.2f}x)')
  if 'baseline' in times and yardstick != 'baseline':
    ratios = [b / t for b, t in zip(times['baseline'], times['library'])]
    print(f'  baseline / library: median {statistics.median(ratios):.2f}x  (rounds {min(ratios):.2f}-{max(ratios):.2f}x)')


if __name__ == '__main__':
  main()
