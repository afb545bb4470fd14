"""Evaluation: bits per dim, the Bayes classifier and FID statistics over a dataset split; FID of a model.

Bits per dim use uniform dequantisation exactly as the reference evaluates them:
`x = ((x_int + u) / 256) * 2 - 1`, `bpd = (-log p(x) / N + log 128) / log 2`, unconditional
(mean class embedding) unless `conditional`; a noise-conditioned model (iTARFlow) is evaluated at its
lowest training noise level, `config.itarflow.t0`. The classifier returns argmax_y log p(x | y).
FID of a model draws samples as the reference's evaluate_fid.py (`FidProtocol`, `fid_samples`)
and scores them with fid.py; `TrainingFid` does so on fixed noise during training.
The command lines are `python -m tarflow_jax.cli.evaluate bpd|classify|fid_stats|fid`.
"""

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Union

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import data, errors, fid, images, inception, iterative_sampling, likelihood, sampling, sharding
from tarflow_jax import storage


def split_bits_per_dim(model, variables, config, mesh, split: str, *, num_examples: int = -1,
                       batch_size: int = 256, seed: int = 0, conditional: bool = False) -> np.ndarray:
  """Bits per dim of every image of a split (all processes' shares, gathered on every process)."""
  variables = jax.device_put(variables, sharding.replicated(mesh))
  fn = _bpd_fn(model, conditional and bool(model.spec.num_classes),
               config.itarflow.t0 if model.spec.noise_conditioning else None)
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
def _bpd_fn(model, conditional: bool, noise_level=None):
  @jax.jit
  def fn(variables, batch, rng):
    x_int = batch['image'].astype(jnp.float32)
    y = batch['label'].astype(jnp.int32) if conditional else None
    return likelihood.bits_per_dim(model, variables, x_int, jax.random.uniform(rng, x_int.shape), y, noise_level)
  return fn


def classify_split(model, variables, config, mesh, split: str, *, num_examples: int = -1,
                   batch_size: int = 256, noise_std: float = 0.0, seed: int = 0):
  """Bayes classifier argmax_y log p(x | y) over a split; returns (predictions, labels).

  A noise-conditioned model (iTARFlow) scores the images at their noise level: `noise_std`, or the
  lowest training level `config.itarflow.t0` for images without noise (as bits/dim).
  """
  if not model.spec.num_classes:
    raise errors.UserError('The Bayes classifier needs a class-conditional model (num_classes > 0); this one has none.')
  variables = jax.device_put(variables, sharding.replicated(mesh))
  scores = _class_scores_fn(model)
  level = (noise_std or config.itarflow.t0) if model.spec.noise_conditioning else None
  rng = jax.random.PRNGKey(seed)
  preds, labels = [], []
  with jax.set_mesh(mesh):
    for i, (batch, mask) in enumerate(_global_batches(config, mesh, split, batch_size, num_examples)):
      x = images.from_uint8(batch['image'])
      if noise_std > 0:
        x = x + noise_std * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      t = None if level is None else jnp.full((x.shape[0],), level)
      s = np.stack([sharding.fetch(scores(variables, x, jnp.full((x.shape[0],), k, jnp.int32), t))
                    for k in range(model.spec.num_classes)], axis=1)  # (B, K)
      preds.append(s.argmax(1)[mask])
      labels.append(sharding.fetch(batch['label'])[mask])
  return np.concatenate(preds), np.concatenate(labels)


@functools.lru_cache()
def _class_scores_fn(model):
  return jax.jit(lambda variables, x, y, t: likelihood.log_prob(model, variables, x, y, t))


def split_fid_statistics(inception_variables, config, mesh, split: str, *, num_examples: int = -1,
                         batch_size: int = 256, pipeline: str = 'pytorch_fid', progress: Optional[str] = None,
                         progress_every_s: float = 300.0) -> tuple[np.ndarray, np.ndarray, int]:
  """FID-Inception feature mean and covariance of a split, and its number of images.

  With the 'torchmetrics' pipeline the pixels first take the reference's float round trip
  (`inception.REFERENCE_REAL_PIXELS`). With `progress` (an .npz path) the running sums are saved
  there every `progress_every_s` seconds, and a pass started again with the same arguments goes
  on from them: a whole training split on a CPU takes hours. The caller removes the file once
  the statistics are saved.
  """
  inception.check_pipeline(pipeline)
  inception_variables = jax.device_put(inception_variables, sharding.replicated(mesh))
  pixels = jnp.asarray(inception.REFERENCE_REAL_PIXELS)
  what = dict(dataset=config.data.name, split=split, num_examples=num_examples, batch_size=batch_size,
              pipeline=pipeline, weights=inception.fingerprint(inception_variables))
  stats, done = _resumed_statistics(progress, what)
  saved = time.monotonic()
  for i, (batch, mask) in enumerate(_global_batches(config, mesh, split, batch_size, num_examples)):
    if i < done:
      continue
    x = pixels[batch['image']] if pipeline == 'torchmetrics' else batch['image']
    stats.update(sharding.fetch(inception.batch_features(inception_variables, x, pipeline))[mask])
    if progress and time.monotonic() - saved >= progress_every_s:
      if jax.process_index() == 0:
        storage.save_npz(progress, batches=np.int64(i + 1), **stats.state(), **{f'what/{k}': v for k, v in what.items()})
        logging.info('FID statistics: %d images so far, saved to %s.', stats.n, progress)
      saved = time.monotonic()
  return *stats.result(), stats.n


def _resumed_statistics(progress: Optional[str], what: dict) -> tuple[fid.RunningStatistics, int]:
  """The running sums and the number of batches done, from `progress` if it is a pass with `what`'s arguments."""
  if not progress or not epath.Path(progress).exists():
    return fid.RunningStatistics(), 0
  with epath.Path(progress).open('rb') as f, np.load(f) as saved:
    differs = [f'{k} {saved[f"what/{k}"].item()!r} (now {v!r})' for k, v in what.items()
               if f'what/{k}' not in saved.files or saved[f'what/{k}'].item() != v]
    if differs:
      raise errors.AlreadyExists(f'{progress!r} holds part of another FID statistics pass ({"; ".join(differs)}): '
                                 'give the arguments it was started with to finish it, or delete it to start anew.')
    stats = fid.RunningStatistics.from_state({k: saved[k] for k in ('n', 'shift', 'sum', 'sum_sq')})
    done = int(saved['batches'])
  logging.info('FID statistics: going on from %s (%d images done).', progress, stats.n)
  return stats, done


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class FidProtocol:
  """How samples are drawn for FID: the reference's evaluate_fid.py.

  `num_samples` (50,000 there) images from standard normal noise, each class label drawn
  uniformly at random (conditional models), with guidance at the config's weight, always
  annealed, and the config's self-denoising; samples that come out non-finite are drawn again
  (`fid_samples`). A noise-conditioned model (iTARFlow) samples as ml-itarflow's evaluate_fid.py:
  `iterative_sampling.Guidance` and `iterative_sampling.IterativeDenoising`.
  """
  num_samples: int
  guidance: Union[sampling.Guidance, iterative_sampling.Guidance]
  denoising: Union[sampling.Denoising, iterative_sampling.IterativeDenoising]

  @property
  def iterative(self) -> bool:
    return isinstance(self.denoising, iterative_sampling.IterativeDenoising)

  def describe(self) -> str:
    g, d = self.guidance, self.denoising
    if self.iterative:
      blocks = 'the first block' if g.style == 'starflow' else 'all blocks' if g.flows < 0 else f'{g.flows} blocks'
      guided = (f'{g.style} guidance {g.weight:g}{" annealed" if g.annealed else ""} on {blocks} (attention '
                f'temperature {g.attn_temp:g})' if g.enabled else 'no guidance')
      return (f'{self.num_samples} samples at noise level {d.t1:g}, {guided}, iteratively denoised to {d.t0:g} in '
              f'{d.steps} steps ({d.dynamics}{", clipped" if d.clip else ""})')
    guided = (f'guidance {g.weight:g} annealed (guiding {g.guide_what}, attention temperature {g.attn_temp:g})'
              if g.enabled else 'no guidance')
    denoised = f'self-denoised (sigma {d.sigma:g}, step scale {d.step_scale:g})' if d.enabled else 'not denoised'
    return f'{self.num_samples} samples, {guided}, {denoised}'


REFERENCE_NUM_SAMPLES = 50_000
MAX_REDRAWS = 10


def fid_protocol(config, num_samples: int = REFERENCE_NUM_SAMPLES) -> FidProtocol:
  """The reference's protocol with a config's guidance weight, attention temperature and denoising."""
  if config.model.noise_conditioning:
    return FidProtocol(num_samples, *iterative_sampling.from_config(config, annealed=True))
  return FidProtocol(num_samples, sampling.guidance_from_config(config, annealed=True),
                     sampling.denoising_from_config(config))


class NonFiniteSamplesError(errors.NonFinite):
  """The model keeps producing NaN or infinite samples."""


def fid_samples(draw: Callable, num_samples: int, batch_size: int, noise_shape: tuple, num_classes: int,
                rng: np.random.Generator, *, pipeline: str = 'pytorch_fid', max_redraws: int = MAX_REDRAWS):
  """uint8 samples (N, H, W, C), their labels (N,) (None if unconditional), and how many were redrawn.

  As the reference, a batch's labels stay and its non-finite samples are drawn again from fresh
  noise (the reference redraws the whole batch when any sample has a NaN; the samples being
  independent given their labels, redrawing only those is the same distribution).

  Args:
    draw: `(noise (B, *noise_shape), labels (B,) or None) -> images (B, H, W, C)` on [-1, 1], numpy.
    num_samples: N; the last batch is drawn in full and cut.
    batch_size: B.
    noise_shape: (T, D) of one latent.
    num_classes: labels are drawn uniformly from [0, num_classes) if positive.
    rng: the source of every label and latent, in order: per batch its labels, its noise, then
      the fresh noise of each redraw. The same seed gives the same samples of the same model.
    pipeline: the FID input pipeline, which says how samples become uint8 (`inception.samples_to_uint8`).
    max_redraws: how often one batch may be drawn again before NonFiniteSamplesError.
  """
  finite = lambda x: np.isfinite(x).reshape(batch_size, -1).all(1)  # (B,)
  noise = lambda: rng.standard_normal((batch_size, *noise_shape), np.float32)
  out, out_labels, redrawn = [], [], 0
  for start in range(0, num_samples, batch_size):
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32) if num_classes else None
    x = np.array(draw(noise(), labels))  # (B, H, W, C), writable
    bad = ~finite(x)
    for _ in range(max_redraws):
      if not bad.any():
        break
      redrawn += int(bad.sum())
      fresh = np.asarray(draw(noise(), labels))
      x[bad] = fresh[bad]
      bad &= ~finite(fresh)
    if bad.any():
      raise NonFiniteSamplesError(f'{int(bad.sum())} of a batch of {batch_size} samples stayed non-finite (NaN or '
                                  f'inf) after {max_redraws} redraws from fresh noise: the model is broken (a '
                                  'diverged training run?).')
    keep = min(batch_size, num_samples - start)
    out.append(inception.samples_to_uint8(x[:keep], pipeline))
    if labels is not None:
      out_labels.append(labels[:keep])
  return np.concatenate(out), (np.concatenate(out_labels) if num_classes else None), redrawn


def model_sampler(model, variables, mesh, protocol: FidProtocol,
                  decoder: sampling.Decoder = sampling.Sequential(), seed: int = 0,
                  decode: Callable | None = None) -> Callable:
  """`draw` of `fid_samples`: the model's samples with the protocol's guidance and denoising.

  A batch that the mesh's devices divide is split over them. `seed` seeds the fresh noise of the
  iterative denoiser's SDE rounds (iTARFlow), one key per call. `decode(noise, labels) -> x`, if
  given, inverts the flow of a TarFlow model in place of `sampling.sample` with `decoder` and the
  protocol's guidance (another sampler, as benchmarks compare); the protocol's self-denoising
  follows either.
  """
  variables = jax.device_put(variables, sharding.replicated(mesh))
  d = protocol.denoising
  calls = iter(range(2**31))  # the iterative denoiser's fresh noise, one key per batch

  def draw(noise, labels):
    if decode is None and len(noise) % mesh.size == 0:  # another sampler takes the host's arrays
      noise = jax.device_put(noise, sharding.batch_sharding(mesh))
    y = None if labels is None else jnp.asarray(labels)
    if protocol.iterative:
      with jax.set_mesh(mesh):
        x = iterative_sampling.sample(model, variables, jnp.asarray(noise), y, guidance=protocol.guidance,
                                      denoising=d, rng=jax.random.fold_in(jax.random.key(seed), next(calls)))
      return sharding.fetch(x)
    x = (decode(noise, labels) if decode else
         sampling.sample(model, variables, jnp.asarray(noise), y, guidance=protocol.guidance, decoder=decoder))
    if d.enabled:
      with jax.set_mesh(mesh):
        x = sampling.denoise(model, variables, jnp.asarray(x), y, sigma=d.sigma, step_scale=d.step_scale)
    return sharding.fetch(x)

  return draw


def sample_batch_size(batch_size: int, num_samples: int, mesh) -> int:
  """`batch_size`, at most `num_samples`, rounded up to a multiple of the mesh's devices."""
  return -(-min(batch_size, num_samples) // mesh.size) * mesh.size


def model_fid(model, variables, mesh, protocol: FidProtocol, inception_variables, reference, *, batch_size: int,
              pipeline: str, seed: int = 0, decoder: sampling.Decoder = sampling.Sequential()):
  """FID of the model's samples against `reference` (mu, sigma) under `protocol`.

  `pipeline` (`inception.PIPELINES`) must be the one the reference statistics were computed with.
  Returns (FID, samples uint8 (N, H, W, C), labels (N,) or None, number redrawn).
  """
  batch = sample_batch_size(batch_size, protocol.num_samples, mesh)
  samples, labels, redrawn = fid_samples(
      model_sampler(model, variables, mesh, protocol, decoder, seed), protocol.num_samples, batch,
      (model.num_tokens, model.token_dim), model.spec.num_classes, np.random.default_rng(seed), pipeline=pipeline)
  features = fid.features(inception_variables, samples, mesh, batch_size=batch_size, pipeline=pipeline)
  return fid.frechet_distance(*reference, *fid.statistics(features)), samples, labels, redrawn


def training_fid(config, model, mesh) -> Callable:
  """`variables -> FID` for `config.fid_every`: `model_fid` on the same noise and labels at every call.

  Samples `config.fid.num_samples` under the evaluation protocol (`fid_protocol`), against the
  statistics `config.fid.stats` (in their input pipeline, `fid.statistics_pipeline`) with the
  Inception weights `config.fid.inception`, both read here.
  """
  inception_variables = inception.load_weights(config.fid.inception)
  reference = fid.load_statistics(config.fid.stats)
  fid.check_weights(config.fid.stats, inception_variables, config.fid.inception)
  pipeline = fid.statistics_pipeline(config.fid.stats)
  protocol = fid_protocol(config, config.fid.num_samples)

  def score(variables) -> float:
    return model_fid(model, variables, mesh, protocol, inception_variables, reference,
                     batch_size=config.fid.batch_size, pipeline=pipeline, seed=config.seed + 3)[0]

  return score
