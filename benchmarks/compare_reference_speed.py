r"""Training-step time side by side: the library's jitted step against the official PyTorch model's eager step.

  python benchmarks/compare_reference_speed.py --reference_dir=/path/to/ml-tarflow \
      [--config=configs/demo.py] [--rounds=9] [--steps=10] [--threads=2]

`--reference_dir` is a local checkout of apple/ml-tarflow; its `transformer_flow.Model` is
imported from there at run time (needs torch). Both sides run the architecture, batch, noise,
label drop and AdamW settings (b1, b2, weight decay; a fixed learning rate) of `--config`, in
float32 on the CPU, on the same uint8 batch:

- library: the step `train.build` compiles for training (`train.train_step` jitted on the
  config's mesh, the state donated): noise and label drop, forward, loss, backward, AdamW; with the
  config's `grad_accum_steps` (the batch's gradient summed over micro-batches, the same update).
- reference: the loop body of the reference's train.py, eagerly: Gaussian noise, label drop,
  `zero_grad`, forward, `get_loss`, backward, `torch.optim.AdamW.step`, over the whole batch at once.

Each side runs as its own training does: the library in this process, started as the command
lines start (`tarflow_jax.cli`: on a CPU-only machine, freed host memory kept for reuse), the
reference in a child process with the allocator's defaults. The two are timed in alternating
rounds (each round `--steps` steps of each side, the side that goes first alternating; the child
runs its steps when told, and times them itself), so that load from other processes on a shared
machine falls on both alike; only the per-round ratio means much there. Both use `--threads`
threads: torch by `torch.set_num_threads`, XLA because the processes are pinned to that many
cores before JAX starts (XLA's CPU thread pool is sized by the schedulable cores).
Prints the per-step medians over rounds and the median of the per-round ratios
(reference time / library time: above 1, the library is faster).
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reference_dir', required=True, help='Local checkout of apple/ml-tarflow.')
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'demo.py'),
                      help='Experiment config (path[:arg]) whose model, batch and optimiser are timed.')
  parser.add_argument('--rounds', type=int, default=9, help='Alternating rounds.')
  parser.add_argument('--steps', type=int, default=10, help='Steps of each side per round.')
  parser.add_argument('--threads', type=int, default=0,
                      help='Cores (and torch threads) for both sides; 0: all cores this process may use.')
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.reference_dir, 'transformer_flow.py')):
    sys.exit(f'--reference_dir={args.reference_dir!r} holds no transformer_flow.py: give a checkout of apple/ml-tarflow.')
  if args.rounds <= 0 or args.steps <= 0 or args.threads < 0:
    sys.exit('--rounds and --steps must be positive, --threads non-negative.')
  return args


def pin_threads(threads: int) -> int:
  """Pins this process to `threads` of its cores (0: all of them); returns the number of cores it may use."""
  cores = sorted(os.sched_getaffinity(0))
  if threads:
    if threads > len(cores):
      sys.exit(f'--threads={threads}: this process may use only {len(cores)} cores.')
    os.sched_setaffinity(0, cores[:threads])
  return len(os.sched_getaffinity(0))


def library_step(config):
  """(step, state, batch): the training program's jitted step, its fresh state and a batch of uint8 digits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from tarflow_jax import sharding, train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  program = train.build(config, mesh, optax.constant_schedule(config.optim.lr))
  state = program.init()
  m = config.model
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (config.batch_size, m.img_size, m.img_size, m.in_channels), np.uint8),
           'label': rng.integers(0, max(m.num_classes, 1), (config.batch_size,), np.int32)}
  return program.step, state, sharding.global_batch(mesh, batch), mesh, batch


def check_comparable(config) -> None:
  """Exits with one line unless the reference Model can run `config`'s training step."""
  m = config.model
  if (not m.nvp or config.noise.type != 'gaussian' or m.dtype != 'float32' or m.head_dim != 64
      or m.expansion != 4 or config.optim.grad_clip > 0):
    sys.exit('The reference Model has head_dim 64 and expansion 4; this comparison covers float32 models with '
             'nvp=True, Gaussian noise and no gradient clipping.')


def reference_step(reference_dir: str, config, batch):
  """A function running one eager training step of the reference Model, as its train.py's loop body."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(reference_dir))
  import transformer_flow  # pylint: disable=g-import-not-at-top

  m, o = config.model, config.optim
  torch.manual_seed(0)
  model = transformer_flow.Model(in_channels=m.in_channels, img_size=m.img_size, patch_size=m.patch_size,
                                 channels=m.channels, num_blocks=m.num_blocks, layers_per_block=m.layers_per_block,
                                 nvp=m.nvp, num_classes=m.num_classes)
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), weight_decay=o.weight_decay)
  images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).float() / 127.5 - 1  # NCHW on [-1, 1]
  labels = torch.from_numpy(batch['label']).long() if m.num_classes else None

  def step():
    x = images + config.noise.std * torch.randn_like(images)
    y = labels
    if y is not None:
      drop = (torch.rand(y.shape) < config.label_drop).long()
      y = (1 - drop) * y - drop
    opt.zero_grad()
    z, _, logdets = model(x, y)
    loss = model.get_loss(z, logdets)
    loss.backward()
    opt.step()
    return loss

  return step


def reference_worker(connection, reference_dir: str, config_path: str, host_batch: dict, threads: int):
  """The child process: builds the reference's step, then runs n steps per request and answers their time."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from tarflow_jax import config_lib  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  step = reference_step(reference_dir, config_lib.load(config_path), host_batch)
  connection.send(torch.__version__)
  while (n := connection.recv()) > 0:
    start = time.perf_counter()
    for _ in range(n):
      loss = step()
    loss.item()
    connection.send(time.perf_counter() - start)


def main():
  args = parse_args()
  threads = pin_threads(args.threads)
  sys.path.insert(0, REPO)
  import tarflow_jax.cli  # pylint: disable=g-import-not-at-top,unused-import  # the command lines' start-up
  import jax  # pylint: disable=g-import-not-at-top
  from tarflow_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config)
  check_comparable(config)
  step, state, batch, mesh, host_batch = library_step(config)
  spawn = multiprocessing.get_context('spawn')
  connection, child_end = spawn.Pipe()
  child = spawn.Process(
      target=reference_worker, args=(child_end, args.reference_dir, args.config, host_batch, threads), daemon=True)
  child.start()
  child_end.close()  # the child holds the only other end: its exit ends the parent's wait (EOFError)

  def receive():
    try:
      return connection.recv()
    except EOFError:
      sys.exit(f'The reference process ended (exit code {child.exitcode}); its error is printed above.')

  torch_version = receive()

  def time_library(n):
    nonlocal state
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      for _ in range(n):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start

  def time_reference(n):
    connection.send(n)
    return receive()

  sides = {'library': time_library, 'reference': time_reference}
  for run in sides.values():  # compile, allocate, warm the caches
    run(2)
  times = {name: [] for name in sides}
  for r in range(args.rounds):
    for name in (('library', 'reference') if r % 2 == 0 else ('reference', 'library')):
      times[name].append(sides[name](args.steps) / args.steps)
  connection.send(0)
  child.join()
  ratios = [ref_s / lib_s for ref_s, lib_s in zip(times['reference'], times['library'])]
  m = config.model
  k = config.get('grad_accum_steps', 1)
  micro = f' (the library in {k} micro-batches)' if k > 1 else ''
  print(f'{os.path.basename(args.config)}: batch {config.batch_size}{micro}, {(m.img_size // m.patch_size) ** 2} tokens, '
        f'width {m.channels}, {m.num_blocks} blocks x {m.layers_per_block} layers; {threads} threads each '
        f'(torch {torch_version}, jax {jax.__version__}); {args.rounds} alternating rounds of {args.steps} steps')
  for name, t in times.items():
    print(f'  {name:<10} median {1e3 * statistics.median(t):7.1f} ms/step  (rounds {1e3 * min(t):.1f}-{1e3 * max(t):.1f})')
  print(f'  reference / library: median {statistics.median(ratios):.2f}x  (rounds {min(ratios):.2f}-{max(ratios):.2f}x)')


if __name__ == '__main__':
  main()
