r"""Evaluation: bits per dim over a dataset split, the Bayes classifier, and FID.

  python -m tarflow_jax.evaluate bpd --checkpoint=runs/demo [--split=test] [--output=bpd.npz]
  python -m tarflow_jax.evaluate classify --checkpoint=runs/demo [--split=test]
  python -m tarflow_jax.evaluate fid_stats --config=configs/imagenet64.py --inception=pt_inception.pth \
      --output=imagenet64_train_stats.npz [--split=train] [--num_examples=N]
  python -m tarflow_jax.evaluate fid --samples=runs/samples --stats=imagenet64_train_stats.npz \
      --inception=pt_inception.pth [--output=fid.json]

Bits per dim use uniform dequantisation exactly as the reference evaluates them:
`x = ((x_int + u) / 256) * 2 - 1`, `bpd = (-log p(x) / N + log 128) / log 2`, unconditional
(mean class embedding) unless --conditional. The classifier returns argmax_y log p(x | y).
FID (fid.py) compares the FID-Inception statistics of samples (`samples.npz` from
`tarflow_jax.sample`) with those of a dataset split, saved once by `fid_stats` in pytorch-fid's
format (pytorch-fid's own statistics files work too). --inception is pytorch-fid's weight file,
`fid.WEIGHTS_URL`.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import data, fid, images, likelihood, sharding


def split_bits_per_dim(model, variables, config, mesh, split: str, *, num_examples: int = -1,
                       batch_size: int = 256, seed: int = 0, conditional: bool = False) -> np.ndarray:
  """Bits per dim of every image of a split (all processes' shares, gathered on every process)."""
  variables = jax.device_put(variables, sharding.replicated(mesh))
  fn = _bpd_fn(model, conditional and bool(model.num_classes))
  rng = jax.random.PRNGKey(seed)
  out = []
  with jax.set_mesh(mesh):  # attention kernels split over the mesh (attention.causal_attention)
    for i, (batch, mask) in enumerate(_global_batches(config, mesh, split, batch_size, num_examples)):
      out.append(sharding.fetch(fn(variables, batch, jax.random.fold_in(rng, i)))[mask])
  return np.concatenate(out)


def _global_batches(config, mesh, split: str, batch_size: int, num_examples: int):
  """One pass over a split: (global batch, mask of its real examples as numpy) per batch."""
  for batch in data.get_split(config, split, batch_size, train=False, limit=num_examples).batches:
    g = sharding.global_batch(mesh, batch)
    yield g, sharding.fetch(g['mask'])


@functools.lru_cache()
def _bpd_fn(model, conditional: bool):
  @jax.jit
  def fn(variables, batch, rng):
    x_int = batch['image'].astype(jnp.float32)
    y = batch['label'].astype(jnp.int32) if conditional else None
    return likelihood.bits_per_dim(model, variables, x_int, jax.random.uniform(rng, x_int.shape), y)
  return fn


def classify_split(model, variables, config, mesh, split: str, *, num_examples: int = -1,
                   batch_size: int = 256, noise_std: float = 0.0, seed: int = 0):
  """Bayes classifier argmax_y log p(x | y) over a split; returns (predictions, labels)."""
  if not model.num_classes:
    raise ValueError('The Bayes classifier needs a class-conditional model (num_classes > 0); this one has none.')
  variables = jax.device_put(variables, sharding.replicated(mesh))
  scores = _class_scores_fn(model)
  rng = jax.random.PRNGKey(seed)
  preds, labels = [], []
  with jax.set_mesh(mesh):
    for i, (batch, mask) in enumerate(_global_batches(config, mesh, split, batch_size, num_examples)):
      x = images.from_uint8(batch['image'])
      if noise_std > 0:
        x = x + noise_std * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      s = np.stack([sharding.fetch(scores(variables, x, jnp.full((x.shape[0],), k, jnp.int32)))
                    for k in range(model.num_classes)], axis=1)  # (B, K)
      preds.append(s.argmax(1)[mask])
      labels.append(sharding.fetch(batch['label'])[mask])
  return np.concatenate(preds), np.concatenate(labels)


@functools.lru_cache()
def _class_scores_fn(model):
  return jax.jit(lambda variables, x, y: likelihood.log_prob(model, variables, x, y))


def split_fid_statistics(inception_variables, config, mesh, split: str, *, num_examples: int = -1,
                         batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
  """FID-Inception feature mean and covariance of a split, and its number of images."""
  inception_variables = jax.device_put(inception_variables, sharding.replicated(mesh))
  stats = fid.RunningStatistics()
  for batch, mask in _global_batches(config, mesh, split, batch_size, num_examples):
    stats.update(sharding.fetch(fid.batch_features(inception_variables, batch['image']))[mask])
  return *stats.result(), stats.n


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def main(argv):
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  from tarflow_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if len(argv) != 2 or argv[1] not in ('bpd', 'classify', 'fid_stats', 'fid'):
    raise app.UsageError('Usage: python -m tarflow_jax.evaluate {bpd|classify} --checkpoint=DIR [flags], '
                         'or fid_stats / fid (see the module docstring)')
  if argv[1] in ('fid_stats', 'fid'):
    return fid_main(argv[1])
  if not FLAGS.checkpoint:
    raise app.UsageError(f'{argv[1]} needs --checkpoint.')
  model, variables, config = checkpoint.load_model(FLAGS.checkpoint)
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  split = FLAGS.split or config.data.eval_split
  mesh = sharding.make_mesh(config.mesh)
  kwargs = dict(num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  if argv[1] == 'bpd':
    bpd = split_bits_per_dim(model, variables, config, mesh, split, conditional=FLAGS.conditional, **kwargs)
    mean, stderr = mean_and_stderr(bpd)
    print(f'bits/dim on {config.data.name}:{split} ({len(bpd)} images): {mean:.4f} +- {stderr:.4f} (standard error)')
    if FLAGS.output:
      np.savez(FLAGS.output, bpd=bpd)
      logging.info('Per-image bits/dim written to %s', FLAGS.output)
  else:
    preds, labels = classify_split(model, variables, config, mesh, split, noise_std=FLAGS.noise_std, **kwargs)
    print(f'Bayes classifier accuracy on {config.data.name}:{split} ({len(labels)} images): '
          f'{100 * np.mean(preds == labels):.2f}%')


def fid_main(command: str):
  """The fid_stats and fid subcommands."""
  from absl import app  # pylint: disable=g-import-not-at-top
  needed = dict(fid_stats=('config', 'inception', 'output'), fid=('samples', 'stats', 'inception'))[command]
  missing = [f'--{name}' for name in needed if FLAGS[name].value is None]
  if missing:
    raise app.UsageError(f'{command} needs {", ".join(missing)}.')
  inception = fid.load_weights(FLAGS.inception)
  if command == 'fid_stats':
    config = FLAGS.config
    if FLAGS.data_dir:
      config.data.data_dir = FLAGS.data_dir
    split = FLAGS.split or config.data.train_split
    mu, sigma, n = split_fid_statistics(inception, config, sharding.make_mesh(config.mesh), split,
                                        num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size)
    if jax.process_index() == 0:
      fid.save_statistics(FLAGS.output, mu, sigma)
    print(f'FID statistics of {config.data.name}:{split} ({n} images) written to {FLAGS.output}')
    return
  path = os.path.join(FLAGS.samples, 'samples.npz') if os.path.isdir(FLAGS.samples) else FLAGS.samples
  with np.load(path) as f:
    samples = f['images'][:FLAGS.num_examples] if FLAGS.num_examples > 0 else f['images']
  mu, sigma = fid.statistics(fid.features(inception, samples, batch_size=FLAGS.batch_size))
  score = fid.frechet_distance(*fid.load_statistics(FLAGS.stats), mu, sigma)
  print(f'FID of {len(samples)} samples ({path}) against {FLAGS.stats}: {score:.4f}')
  if FLAGS.output and jax.process_index() == 0:
    with open(FLAGS.output, 'w') as f:
      json.dump(dict(fid=score, num_samples=len(samples), samples=path, stats=FLAGS.stats), f, indent=2)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

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
  flags.DEFINE_string('inception', None, f'fid_stats, fid: FID Inception weights (.pth or .npz), {fid.WEIGHTS_URL}')
  flags.DEFINE_string('samples', None, 'fid: samples.npz (key `images`, uint8 NHWC) or the directory holding it.')
  flags.DEFINE_string('stats', None, 'fid: .npz of the reference statistics `mu`, `sigma` (from fid_stats).')
  flags.DEFINE_string('output', None, 'bpd: .npz file for the per-image values; fid_stats: the statistics .npz '
                      '(required); fid: a JSON file for the score.')
  app.run(main)
