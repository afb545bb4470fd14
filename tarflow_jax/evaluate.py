r"""Likelihood evaluation: bits per dim over a dataset split, and the Bayes classifier.

  python -m tarflow_jax.evaluate bpd --checkpoint=runs/demo [--split=test] [--output=bpd.npz]
  python -m tarflow_jax.evaluate classify --checkpoint=runs/demo [--split=test]

Bits per dim use uniform dequantisation exactly as the reference evaluates them:
`x = ((x_int + u) / 256) * 2 - 1`, `bpd = (-log p(x) / N + log 128) / log 2`, unconditional
(mean class embedding) unless --conditional. The classifier returns argmax_y log p(x | y).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import data, likelihood, sharding


def split_bits_per_dim(model, variables, config, mesh, split: str, *, num_examples: int = -1,
                       batch_size: int = 256, seed: int = 0, conditional: bool = False) -> np.ndarray:
  """Bits per dim of every image of a split (all processes' shares, gathered on every process)."""
  variables = jax.device_put(variables, sharding.replicated(mesh))
  fn = _bpd_fn(model, conditional and bool(model.num_classes))
  rng = jax.random.PRNGKey(seed)
  out = []
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
  for i, (batch, mask) in enumerate(_global_batches(config, mesh, split, batch_size, num_examples)):
    x = batch['image'].astype(jnp.float32) / 127.5 - 1.0
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


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def main(argv):
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  from tarflow_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if len(argv) != 2 or argv[1] not in ('bpd', 'classify'):
    raise app.UsageError('Usage: python -m tarflow_jax.evaluate {bpd|classify} --checkpoint=DIR [flags]')
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


if __name__ == '__main__':
  import os  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/, or a converted checkpoint.')
  flags.DEFINE_string('split', None, 'Dataset split (default: the config\'s eval split).')
  flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir.')
  flags.DEFINE_integer('num_examples', -1, 'Use only the first N examples (-1: all).')
  flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
  flags.DEFINE_integer('seed', 0, 'Seed of the dequantisation (bpd) or input noise (classify).')
  flags.DEFINE_bool('conditional', False, 'bpd: log p(x | y) with the true labels instead of the unconditional p(x).')
  flags.DEFINE_float('noise_std', 0.0, 'classify: Gaussian noise added to the images first.')
  flags.DEFINE_string('output', None, 'bpd: .npz file for the per-image values.')
  flags.mark_flag_as_required('checkpoint')
  app.run(main)
