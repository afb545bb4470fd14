r"""Fréchet Inception Distance over FID-Inception features, as pytorch-fid computes it.

  from tarflow_jax import fid, inception
  variables = inception.load_weights('pt_inception-2015-12-05-6726825d.pth')
  mu, sigma = fid.statistics(fid.features(variables, images))  # images: (N, H, W, 1 or 3) uint8
  score = fid.frechet_distance(*fid.load_statistics('stats.npz'), mu, sigma)

The network and its weights are in inception.py. Statistics files are pytorch-fid's (an .npz
with the feature mean `mu` and covariance `sigma`, what `save_statistics` writes) or the
reference's `{dataset}_{img_size}_fid_stats.pth` (the state of torchmetrics'
`FrechetInceptionDistance`: feature sums, read by `load_statistics` as torchmetrics computes
them). The command lines are `python -m tarflow_jax.cli.evaluate fid_stats|fid`.
"""

import os
from typing import Optional

import jax
import numpy as np

from tarflow_jax import data, errors, inception, sharding, state_dict, storage


def features(variables, images: np.ndarray, mesh: Optional[jax.sharding.Mesh] = None, *,
             batch_size: int = 256, pipeline: str = 'pytorch_fid') -> np.ndarray:
  """Features (N, 2048) of (N, H, W, C) uint8 images that every process holds in full.

  `pipeline` is how images reach the network (`inception.PIPELINES`).

  Batches of `batch_size` (at most the number of images, rounded up to a multiple of the device
  count) are split over the mesh's devices (default: all devices, on the batch axis); the last
  batch is padded.
  """
  if not len(images):
    raise errors.UserError('No images to compute features of.')
  mesh = mesh or sharding.default_mesh()
  variables = jax.device_put(variables, sharding.replicated(mesh))
  n_dev, n_proc, proc = mesh.size, jax.process_count(), jax.process_index()
  batch_size = -(-min(batch_size, len(images)) // n_dev) * n_dev
  local = batch_size // n_proc
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    batch = data.pad_batch(chunk, batch_size)
    x = sharding.global_batch(mesh, batch[proc * local:(proc + 1) * local])
    out.append(sharding.fetch(inception.batch_features(variables, x, pipeline))[:len(chunk)])
  return np.concatenate(out)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and covariance (D, D) of (N, D) features, in float64 (covariance with N - 1)."""
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


class RunningStatistics:
  """`statistics` of features seen a batch at a time, for datasets too large to hold their features.

  Sums in float64 about a shift (the first batch's mean), which keeps the covariance
  (sum dd^T - n m m^T) / (n - 1), with m the mean of d = x - shift, free of cancellation.
  """

  def __init__(self):
    self.n, self.shift, self.sum, self.sum_sq = 0, None, 0.0, 0.0

  def update(self, features: np.ndarray) -> None:
    features = np.asarray(features, np.float64)
    if not len(features):
      return
    if self.shift is None:
      self.shift = features.mean(0)
    d = features - self.shift  # (B, D)
    self.n += len(d)
    self.sum = self.sum + d.sum(0)
    self.sum_sq = self.sum_sq + d.T @ d

  def state(self) -> dict:
    """The sums as arrays, to save and resume from (`from_state`)."""
    return dict(n=np.int64(self.n), shift=self.shift, sum=np.asarray(self.sum), sum_sq=np.asarray(self.sum_sq))

  @classmethod
  def from_state(cls, state) -> 'RunningStatistics':
    stats = cls()
    stats.n, stats.shift, stats.sum, stats.sum_sq = (int(state['n']), state['shift'], state['sum'],
                                                     state['sum_sq'])
    return stats

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise errors.UserError(f'A covariance needs at least 2 examples, got {self.n}.')
    m = self.sum / self.n
    return self.shift + m, (self.sum_sq - self.n * np.outer(m, m)) / (self.n - 1)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, pipeline: str = 'pytorch_fid', *,
                    about: Optional[dict] = None, covariance_dtype=np.float64) -> None:
  """pytorch-fid's .npz of `mu` and `sigma`, the input pipeline the features came from, and `about` them.

  `about` (stored as `about/<key>`; `statistics_about` reads it back) says what the statistics are
  of, e.g. the dataset, split and number of images, and `weights`: the `inception.fingerprint` of
  the weights, which `check_weights` compares. A float32 covariance halves the file (FID moves by
  4e-9 relative on Fashion-MNIST's statistics); float16 stores its upper triangle as `sigma_triu`,
  an eighth of the file (4 MB at 2048 features; FID moves by about 1e-4 relative), which only
  `load_statistics` reads.
  """
  extra = {f'about/{k}': v for k, v in (about or {}).items()}
  sigma = np.asarray(sigma)
  if np.dtype(covariance_dtype) == np.float16:
    extra['sigma_triu'] = sigma[np.triu_indices(len(sigma))].astype(np.float16)
  else:
    extra['sigma'] = sigma.astype(covariance_dtype)
  storage.save_npz(path, mu=mu, pipeline=pipeline, **extra)


def _unpack_triangle(triangle: np.ndarray) -> np.ndarray:
  """The symmetric (D, D) float64 matrix whose upper triangle (row by row) is `triangle`."""
  d = int(round((np.sqrt(8 * len(triangle) + 1) - 1) / 2))
  out = np.zeros((d, d))
  out[np.triu_indices(d)] = triangle
  return out + np.triu(out, 1).T


def statistics_about(path: str) -> dict:
  """What `save_statistics` recorded about a statistics file ({} for pytorch-fid's files and the reference's)."""
  if path.endswith('.pth'):
    return {}
  with np.load(path) as f:
    return {k.removeprefix('about/'): f[k].item() for k in f.files if k.startswith('about/')}


def check_weights(path: str, variables, weights_path: str) -> None:
  """Raises errors.UserError if the statistics in `path` record weights other than `variables` (`weights_path`)."""
  recorded = statistics_about(path).get('weights')
  if recorded is None:
    return
  got = inception.fingerprint(variables)
  if not np.isclose(got, recorded, rtol=1e-6, atol=0):
    raise errors.UserError(f'The FID statistics {path!r} were made with other Inception weights than {weights_path!r} '
                           f'(fingerprint {recorded:.6g}, these {got:.6g}): an FID across the two means nothing. Pass '
                           'the weights they were made with, or make statistics with these (evaluate fid_stats).')


def statistics_pipeline(path: str) -> str:
  """The input pipeline (`inception.PIPELINES`) of a statistics file's features.

  'torchmetrics' for the reference's .pth; for an .npz what `save_statistics` recorded, and
  'pytorch_fid' (pytorch-fid's own files) if nothing.
  """
  if path.endswith('.pth'):
    return 'torchmetrics'
  with np.load(path) as f:
    return str(f['pipeline']) if 'pipeline' in f.files else 'pytorch_fid'


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from an .npz with keys `mu` and `sigma` (ours or pytorch-fid's), or from
  the reference's .pth (see `torchmetrics_statistics`)."""
  if not os.path.exists(path):
    raise errors.NotFound(f'No FID statistics file {path!r}: write one with `python -m tarflow_jax.cli.evaluate '
                          'fid_stats`, or give the reference\'s {dataset}_{img_size}_fid_stats.pth.')
  if path.endswith('.pth'):
    return torchmetrics_statistics(path)
  with np.load(path) as f:
    if 'mu' in f.files and 'sigma_triu' in f.files:
      return f['mu'].astype(np.float64), _unpack_triangle(f['sigma_triu'].astype(np.float64))
    if 'mu' not in f.files or 'sigma' not in f.files:
      raise errors.UserError(f'{path!r} is not an FID statistics file: it needs arrays `mu` and `sigma`, '
                             f'it has {f.files}.')
    return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)


TORCHMETRICS_REAL = ('real_features_sum', 'real_features_cov_sum', 'real_features_num_samples')


def torchmetrics_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from a saved state of torchmetrics' `FrechetInceptionDistance`.

  That is what the reference's prepare_fid_stats.py saves (`torch.save(fid.state_dict())`, its
  states registered as buffers): the float64 sum s (D,) and sum of outer products S (D, D) of
  the real images' features and their number n (besides the fake ones, empty, and the Inception
  weights under `inception.`). As torchmetrics' `compute`: mu = s / n,
  sigma = (S - n mu mu^T) / (n - 1).
  """
  state = state_dict.load_torch(path, ' (or convert it once elsewhere to an .npz of `mu` and `sigma` with this '
                                     'function)')
  missing = [k for k in TORCHMETRICS_REAL if not hasattr(state, 'keys') or k not in state]
  if missing:
    raise errors.UserError(f'{path!r} is not an FID statistics file of torchmetrics\' FrechetInceptionDistance (as the '
                           f'reference\'s prepare_fid_stats.py writes): it lacks {missing}.')
  total, outer, n = (state[k].detach().cpu().double().numpy() for k in TORCHMETRICS_REAL)
  n = int(n)
  if n < 2:
    raise errors.UserError(f'{path!r} holds the features of {n} images; a covariance needs at least 2.')
  mu = total / n
  return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

  With any factor sigma1 = L L^T, sigma1 sigma2 is similar to the symmetric PSD matrix
  L^T sigma2 L, so the trace of its square root is the sum of the square roots of that matrix's
  eigenvalues (clipped at 0 against rounding). L is the Cholesky factor, or V diag(w)^(1/2) from
  the eigendecomposition when sigma1 is singular (fewer examples than dimensions). Unlike scipy's
  general `sqrtm`, this needs no complex arithmetic and no regularisation, and it is fastest with
  the full-rank (reference) statistics first.
  """
  mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise errors.UserError(f'Statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / '
                           f'{sigma2.shape}.')
  try:
    factor = np.linalg.cholesky(sigma1)
  except np.linalg.LinAlgError:
    w, v = np.linalg.eigh(sigma1)
    factor = v * np.sqrt(np.clip(w, 0, None))
  m = factor.T @ sigma2 @ factor
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return float(((mu1 - mu2)**2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
