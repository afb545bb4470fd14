r"""Evaluation: bits per dim over a dataset split, the Bayes classifier, and FID.

  python -m tarflow_jax.cli.evaluate bpd --checkpoint=runs/demo [--split=test] [--output=bpd.npz]
  python -m tarflow_jax.cli.evaluate classify --checkpoint=runs/demo [--split=test]
  python -m tarflow_jax.cli.evaluate fid_stats --config=configs/imagenet64.py --inception=pt_inception.pth \
      --output=imagenet64_train_stats.npz [--split=train] [--num_examples=N]
  python -m tarflow_jax.cli.evaluate fid --samples=runs/samples --stats=imagenet64_train_stats.npz \
      --inception=pt_inception.pth [--output=fid.json]

bpd and classify are evaluation.split_bits_per_dim and evaluation.classify_split, with the moving
average of the parameters where the checkpoint has one (--raw_weights: the parameters). FID compares
the FID-Inception statistics of samples (`samples.npz` from `tarflow_jax.cli.sample`) with those
of a dataset split, saved once by `fid_stats` in pytorch-fid's format (pytorch-fid's own
statistics files work too). --inception is pytorch-fid's weight file, `inception.WEIGHTS_URL`.
"""

import json
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from tarflow_jax import checkpoint, config_lib, errors, evaluation, fid, inception, sharding
from tarflow_jax.cli import _common

COMMANDS = ('bpd', 'classify', 'fid_stats', 'fid')

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'bpd, classify: training workdir, its checkpoints/, or a converted '
                    'checkpoint.')
config_flags.DEFINE_config_file('config', None, 'fid_stats: experiment config file (configs/*.py) of the data.')
flags.DEFINE_string('split', None, 'Dataset split (default: the config\'s eval split; fid_stats: its train split).')
flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir.')
flags.DEFINE_integer('num_examples', -1, 'Use only the first N examples (fid: samples) (-1: all).')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_integer('seed', 0, 'Seed of the dequantisation (bpd) or input noise (classify).')
flags.DEFINE_bool('conditional', False, 'bpd: log p(x | y) with the true labels instead of the unconditional p(x).')
flags.DEFINE_float('noise_std', 0.0, 'classify: Gaussian noise added to the images first.')
flags.DEFINE_string('inception', None, f'fid_stats, fid: FID Inception weights (.pth or .npz), {inception.WEIGHTS_URL}')
flags.DEFINE_string('samples', None, 'fid: samples.npz (key `images`, uint8 NHWC) or the directory holding it.')
flags.DEFINE_string('stats', None, 'fid: .npz of the reference statistics `mu`, `sigma` (from fid_stats).')
flags.DEFINE_bool('raw_weights', False, 'bpd, classify: the trained parameters, not their moving average (where the '
                  'checkpoint has one: config.ema_decay > 0).')
flags.DEFINE_string('output', None, 'bpd: .npz file for the per-image values; fid_stats: the statistics .npz '
                    '(required); fid: a JSON file for the score.')

_NEEDED = dict(bpd=('checkpoint',), classify=('checkpoint',), fid_stats=('config', 'inception', 'output'),
               fid=('samples', 'stats', 'inception'))


def check_flags(command: str) -> None:
  """Raises app.UsageError or errors.UserError for flags that cannot work, before anything is read."""
  missing = [f'--{name}' for name in _NEEDED[command] if not FLAGS[name].present]
  if missing:
    raise app.UsageError(f'{command} needs {", ".join(missing)}.')
  if FLAGS.batch_size <= 0:
    raise errors.UserError(f'--batch_size={FLAGS.batch_size} must be positive.')
  if FLAGS.num_examples == 0 or FLAGS.num_examples < -1:
    raise errors.UserError(f'--num_examples={FLAGS.num_examples} must be positive, or -1 for all.')
  if FLAGS.noise_std < 0:
    raise errors.UserError(f'--noise_std={FLAGS.noise_std} must be >= 0.')


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError('give one command: python -m tarflow_jax.cli.evaluate {bpd|classify|fid_stats|fid} [flags]')
  command = argv[1]
  check_flags(command)
  if command == 'fid_stats':
    return fid_stats()
  if command == 'fid':
    return fid_score()
  model, variables, config = checkpoint.load_model(FLAGS.checkpoint, raw_weights=FLAGS.raw_weights)
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  config_lib.validate_data(config)
  split = FLAGS.split or config.data.eval_split
  mesh = sharding.make_mesh(config.mesh)
  kwargs = dict(num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  if command == 'bpd':
    bpd = evaluation.split_bits_per_dim(model, variables, config, mesh, split, conditional=FLAGS.conditional,
                                        **kwargs)
    mean, stderr = evaluation.mean_and_stderr(bpd)
    print(f'bits/dim on {config.data.name}:{split} ({len(bpd)} images): {mean:.4f} +- {stderr:.4f} (standard error)')
    if FLAGS.output:
      np.savez(FLAGS.output, bpd=bpd)
      logging.info('Per-image bits/dim written to %s', FLAGS.output)
  else:
    preds, labels = evaluation.classify_split(model, variables, config, mesh, split, noise_std=FLAGS.noise_std,
                                              **kwargs)
    print(f'Bayes classifier accuracy on {config.data.name}:{split} ({len(labels)} images): '
          f'{100 * np.mean(preds == labels):.2f}%')


def fid_stats():
  """FID statistics of a dataset split, written to --output."""
  config = FLAGS.config
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  config_lib.validate_data(config)
  split = FLAGS.split or config.data.train_split
  weights = inception.load_weights(FLAGS.inception)
  mu, sigma, n = evaluation.split_fid_statistics(weights, config, sharding.make_mesh(config.mesh), split,
                                                 num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size)
  if jax.process_index() == 0:
    fid.save_statistics(FLAGS.output, mu, sigma)
  print(f'FID statistics of {config.data.name}:{split} ({n} images) written to {FLAGS.output}')


def fid_score():
  """FID of --samples against the statistics in --stats."""
  path = os.path.join(FLAGS.samples, 'samples.npz') if os.path.isdir(FLAGS.samples) else FLAGS.samples
  with np.load(path) as f:
    samples = f['images'][:FLAGS.num_examples] if FLAGS.num_examples > 0 else f['images']
  reference = fid.load_statistics(FLAGS.stats)
  mu, sigma = fid.statistics(fid.features(inception.load_weights(FLAGS.inception), samples,
                                          batch_size=FLAGS.batch_size))
  score = fid.frechet_distance(*reference, mu, sigma)
  print(f'FID of {len(samples)} samples ({path}) against {FLAGS.stats}: {score:.4f}')
  if FLAGS.output and jax.process_index() == 0:
    with open(FLAGS.output, 'w') as f:
      json.dump(dict(fid=score, num_samples=len(samples), samples=path, stats=FLAGS.stats), f, indent=2)


def run():
  _common.run(main)


if __name__ == '__main__':
  run()
