"""Evaluation over a dataset split: bits per dim, the Bayes classifier, and FID statistics.

Bits per dim use uniform dequantisation exactly as the reference evaluates them:
`x = ((x_int + u) / 256) * 2 - 1`, `bpd = (-log p(x) / N + log 128) / log 2`, unconditional
(mean class embedding) unless `conditional`. The classifier returns argmax_y log p(x | y).
The command lines are `python -m tarflow_jax.cli.evaluate bpd|classify|fid_stats|fid`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import data, fid, images, inception, likelihood, sharding


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
    stats.update(sharding.fetch(inception.batch_features(inception_variables, batch['image']))[mask])
  return *stats.result(), stats.n


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
