r"""Equal-budget training: the official PyTorch TarFlow with its recipe against configs/demo.py, evaluated alike.

  python benchmarks/compare_reference_training.py --reference_dir=/path/to/ml-tarflow \
      [--workdir=/tmp/tarflow_compare] [--seeds 0 1] [--sides reference library] [--set optim.lr=4e-3]

`--reference_dir` is a local checkout of apple/ml-tarflow; its `transformer_flow.Model` is
imported from there at run time (needs torch). Both sides train the architecture of
configs/demo.py for its steps, batch, learning rate, warm-up, noise and label drop, on the same
batches of the 4,500 embedded training digits (the library's input pipeline, same seed):

- reference: `transformer_flow.Model` from its constructor (torch's initialisation), the loop of
  the reference's train.py on the CPU in float32: torch AdamW (b1, b2, weight decay from the
  config), Gaussian noise, labels dropped to -1, the learning rate of its `CosineLRSchedule`
  (linear warm-up from min_lr over one epoch, cosine to min_lr; `train.schedule` is the same
  function). Its weights are converted with `python -m tarflow_jax.cli.convert`.
- library: `python -m tarflow_jax.main --config=configs/demo.py --config.seed=S`.

`--set KEY=VALUE` (repeatable) changes the recipe on both sides, as `--config.KEY=VALUE` would
(give each recipe its own `--workdir`).

Both are then measured by `python -m tarflow_jax.cli.evaluate bpd` and `classify` on the 500
held-out digits. Finished training runs are reused when the command is run again. Prints a
markdown table and writes it with the numbers to `<workdir>/results.json`.
"""

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'demo.py')


def run(*args: str) -> str:
  """Runs `python -m <args>` from the repository root; returns its stdout, raises with its log on failure."""
  cmd = [sys.executable, '-m', *args]
  print('$', ' '.join(cmd), flush=True)
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}')
  return result.stdout


def override(config, assignments: list[str]) -> None:
  """Applies `KEY=VALUE` assignments (dotted keys, Python literals) to `config` in place."""
  for assignment in assignments:
    key, _, value = assignment.partition('=')
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node.get(parent)
      if not isinstance(node, ml_collections.ConfigDict):
        break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(f'--set {assignment}: the config has no field {key!r}.')
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value


def train_reference(reference_dir: str, seed: int, path: str, threads: int, assignments: list[str]) -> None:
  """Trains the reference Model with its recipe for the demo's budget; saves its state dict to `path`."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(reference_dir))
  import transformer_flow  # pylint: disable=g-import-not-at-top
  from tarflow_jax import config_lib, data, train  # pylint: disable=g-import-not-at-top

  config = config_lib.load(CONFIG)
  override(config, assignments)
  m, o = config.model, config.optim
  if not m.nvp or config.noise.type != 'gaussian':
    raise ValueError('This comparison covers the demo recipe: nvp=True and Gaussian noise.')
  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = transformer_flow.Model(in_channels=m.in_channels, img_size=m.img_size, patch_size=m.patch_size,
                                 channels=m.channels, num_blocks=m.num_blocks, layers_per_block=m.layers_per_block,
                                 nvp=m.nvp, num_classes=m.num_classes)
  opt = torch.optim.AdamW(model.parameters(), lr=o.min_lr, betas=(o.b1, o.b2), weight_decay=o.weight_decay)
  split = data.get_split(config, config.data.train_split, config.batch_size, train=True, seed=seed)
  steps_per_epoch, total = train._steps(config, split.num_examples)  # pylint: disable=protected-access
  lr = train.schedule(config, steps_per_epoch, total)
  start = time.time()
  for step in range(total):
    batch = next(split.batches)
    x = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC uint8 -> NCHW [-1, 1]
    x = x + config.noise.std * torch.randn_like(x)
    y = torch.from_numpy(batch['label']).long()
    y = torch.where(torch.rand(y.shape) < config.label_drop, -1, y)
    for group in opt.param_groups:
      group['lr'] = float(lr(step))
    z, _, logdets = model(x, y)
    loss = model.get_loss(z, logdets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % config.log_every == 0:
      print(f'reference seed {seed}: step {step + 1}/{total}, loss {loss.item():.4f}, '
            f'{(step + 1) / (time.time() - start):.2f} steps/s', flush=True)
  torch.save(model.state_dict(), path)


def evaluate(checkpoint: str) -> dict:
  """Held-out bits/dim (with standard error) and Bayes classifier accuracy of a checkpoint."""
  bpd = run('tarflow_jax.cli.evaluate', 'bpd', f'--checkpoint={checkpoint}')
  mean, stderr = map(float, re.search(r': ([\d.]+) \+- ([\d.]+)', bpd).groups())
  accuracy = float(re.search(r': ([\d.]+)%', run('tarflow_jax.cli.evaluate', 'classify', f'--checkpoint={checkpoint}'))
                   .group(1))
  return {'bits_per_dim': mean, 'bits_per_dim_stderr': stderr, 'accuracy': accuracy}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reference_dir', required=True, help='Local checkout of apple/ml-tarflow.')
  parser.add_argument('--workdir', default='/tmp/tarflow_compare', help='Where runs and results go.')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  parser.add_argument('--sides', nargs='+', default=['reference', 'library'], choices=['reference', 'library'])
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='Threads of the reference (0: torch\'s default); 1 on a busy shared CPU, where more spin.')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='A change to the recipe on both sides, e.g. optim.lr=4e-3 (repeatable).')
  args = parser.parse_args()
  if 'reference' in args.sides and not os.path.isfile(os.path.join(args.reference_dir, 'transformer_flow.py')):
    sys.exit(f'--reference_dir={args.reference_dir!r} holds no transformer_flow.py: give a checkout of apple/ml-tarflow.')
  from tarflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:  # a mistyped key fails here, before any run
    override(config_lib.load(CONFIG), args.set)
  except KeyError as e:
    sys.exit(e.args[0])
  os.makedirs(args.workdir, exist_ok=True)
  results_path = os.path.join(args.workdir, 'results.json')
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  for seed in args.seeds:
    for side in args.sides:
      name = f'{side}_seed{seed}'
      checkpoint = os.path.join(args.workdir, name)
      if side == 'reference':
        pth = checkpoint + '.pth'
        if not os.path.exists(pth):
          train_reference(args.reference_dir, seed, pth, args.torch_threads, args.set)
        if not os.path.isdir(checkpoint):
          run('tarflow_jax.cli.convert', f'--config={CONFIG}', f'--checkpoint={pth}', f'--output={checkpoint}')
      else:
        run('tarflow_jax.main', f'--config={CONFIG}', f'--workdir={checkpoint}', f'--config.seed={seed}',
            *(f'--config.{assignment}' for assignment in args.set))
      results[name] = {'side': side, 'seed': seed, **evaluate(checkpoint)}
      print(name, results[name], flush=True)
      with open(results_path, 'w') as f:
        json.dump(results, f, indent=2)
  print('| side | seed | bits/dim | Bayes classifier |\n| --- | --- | --- | --- |')
  for r in sorted(results.values(), key=lambda r: (r['side'], r['seed'])):
    print(f'| {r["side"]} | {r["seed"]} | {r["bits_per_dim"]:.3f} +- {r["bits_per_dim_stderr"]:.3f} | '
          f'{r["accuracy"]:.1f}% |')


if __name__ == '__main__':
  main()
