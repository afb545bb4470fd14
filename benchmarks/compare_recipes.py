r"""Equal-budget recipes: several configs trained by the library with the same seeds, and scored alike.

  python benchmarks/compare_recipes.py configs/fashion_mnist.py configs/itarflow_fashion_mnist.py \
      --seeds 0 1 --fid [--fid_samples=10000] [--workdir=DIR] [--set num_train_steps=4]

The question it answers: does iTARFlow's recipe beat TarFlow's at the same training budget?
(configs/itarflow_fashion_mnist.py is configs/fashion_mnist.py with iTARFlow's noise-level
conditioning, t-reweighted loss and iterative denoising, and nothing else changed.) Each config
trains with `python -m tarflow_jax.main --config=CONFIG --config.seed=S` for its own budget (give
configs of one budget), and every run is scored by the commands of
benchmarks/compare_reference_training.py: held-out bits/dim (a noise-conditioned model at its
lowest training level t0) and the Bayes classifier on the evaluation split, and with `--fid` the FID
of `--fid_samples` samples drawn as each config samples (TarFlow: guided, one self-denoising step;
iTARFlow: decoded at t1, then denoised down to t0), the same latents and labels for every run,
against the statistics of the first config's training split with the real FID Inception weights.
Finished runs and scores are reused when the command is run again. Prints a markdown table (each
run, then each recipe's mean and spread over seeds) and writes it with the numbers to
`<workdir>/results.json`.
"""

import argparse
import os
import sys

import compare_reference_training as common  # pylint: disable=g-bad-import-order  # benchmarks/, beside this file


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('configs', nargs='+', help='Config files, one recipe each (the first one\'s data is scored).')
  parser.add_argument('--workdir', default='/tmp/tarflow_recipes', help='Where runs and results go.')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Changes every recipe, as --config.KEY=VALUE would (dotted keys, Python literals).')
  common.add_scoring_arguments(parser)
  args = parser.parse_args()
  args.configs = [os.path.abspath(c) for c in args.configs]
  from tarflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:  # a mistyped key or config path fails here, before any run
    for config in args.configs:
      common.override(config_lib.load(config), args.set)
  except (KeyError, FileNotFoundError) as e:
    sys.exit(e.args[0])
  os.makedirs(args.workdir, exist_ok=True)
  args.config = args.configs[0]  # whose training split the FID statistics are of
  inception, stats = common.fid_files(args) if args.fid else (None, None)
  changes = [f'--config.{assignment}' for assignment in (common.NO_TRAINING_FID, *args.set)]
  results_path, results = common.load_results(args.workdir)
  for seed in args.seeds:
    for config in args.configs:
      recipe = os.path.splitext(os.path.basename(config))[0]
      name = f'{recipe}_seed{seed}'
      workdir = os.path.join(args.workdir, name)
      common.run('tarflow_jax.main', f'--config={config}', f'--workdir={workdir}', f'--config.seed={seed}', *changes)
      results[name] = {'recipe': recipe, 'seed': seed, **common.evaluate(workdir, args.eval_examples)}
      if args.fid:
        results[name].update(common.score_fid(workdir, inception, stats, args.fid_samples, args.fid_batch_size))
      print(name, results[name], flush=True)
      common.save_results(results_path, results)
  print(common.table(results, 'recipe'))


if __name__ == '__main__':
  main()
