r"""Fréchet Inception Distance with the FID Inception-v3, as pytorch-fid computes it.

  from tarflow_jax import fid
  inception = fid.load_weights('pt_inception-2015-12-05-6726825d.pth')
  mu, sigma = fid.statistics(fid.features(inception, images))  # images: (N, H, W, 1 or 3) uint8
  score = fid.frechet_distance(*fid.load_statistics('stats.npz'), mu, sigma)

The network is the 2015-12-05 TensorFlow Inception graph that defines FID, as pytorch-fid ports
it: torchvision's Inception-v3 with average pools that leave the padding out of the mean, and a
max pool in the pool branch of Mixed_7c. Images are resized to 299x299 (bilinear, half-pixel
centres, no antialiasing: torch's `F.interpolate(align_corners=False)`), scaled to [-1, 1], and
the features are the 2048 channels of the final average pool (float32, convolutions at the
highest precision, so no TF32 / bfloat16 passes on accelerators). The weights are pytorch-fid's
state dict (`WEIGHTS_URL`); without PyTorch, convert it once elsewhere to an .npz of the same keys:

  np.savez('inception.npz', **{k: v.numpy() for k, v in torch.load(pth, map_location='cpu').items()})

Statistics files are pytorch-fid's: an .npz with the feature mean `mu` and covariance `sigma`.
The command lines are `python -m tarflow_jax.evaluate fid_stats|fid` (see evaluate.py).
"""

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import convert, data, sharding

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d


class ConvBN(nn.Module):
  """Convolution without bias, inference batch norm, ReLU: torchvision's BasicConv2d."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # (rows, columns), on both sides
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    (ph, pw), s = self.padding, self.strides
    x = nn.Conv(self.features, self.kernel, (s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x))


def _avg_pool(x):
  """3x3, stride 1, padding 1, the padding left out of the mean (TensorFlow's 'SAME' average)."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Base of the Inception blocks: `conv(name, features, kernel, ...)` makes a named ConvBN."""

  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel, strides: int = 1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return ConvBN(features, kernel, strides, padding, self.precision, name=name)


class InceptionA(_Block):
  """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches; 224 + pool_features channels."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 64, 1)(x)
    b5 = self.conv('branch5x5_2', 64, 5, padding=2)(self.conv('branch5x5_1', 48, 1)(x))
    b3 = self.conv('branch3x3dbl_1', 64, 1)(x)
    b3 = self.conv('branch3x3dbl_3', 96, 3, padding=1)(self.conv('branch3x3dbl_2', 96, 3, padding=1)(b3))
    bp = self.conv('branch_pool', self.pool_features, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(_Block):
  """35x35 to 17x17: strided 3x3, strided double 3x3 and max-pool branches; 480 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3', 384, 3, strides=2)(x)
    bd = self.conv('branch3x3dbl_1', 64, 1)(x)
    bd = self.conv('branch3x3dbl_3', 96, 3, strides=2)(self.conv('branch3x3dbl_2', 96, 3, padding=1)(bd))
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 branches of c7 channels; 768 channels out."""

  c7: int = 128

  @nn.compact
  def __call__(self, x):
    c7, row, col = self.c7, dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = self.conv('branch1x1', 192, 1)(x)
    b7 = self.conv('branch7x7_1', c7, 1)(x)
    b7 = self.conv('branch7x7_3', 192, **col)(self.conv('branch7x7_2', c7, **row)(b7))
    bd = self.conv('branch7x7dbl_1', c7, 1)(x)
    bd = self.conv('branch7x7dbl_3', c7, **row)(self.conv('branch7x7dbl_2', c7, **col)(bd))
    bd = self.conv('branch7x7dbl_5', 192, **row)(self.conv('branch7x7dbl_4', c7, **col)(bd))
    bp = self.conv('branch_pool', 192, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(_Block):
  """17x17 to 8x8: strided 3x3, 7x7-then-strided-3x3 and max-pool branches; 512 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3_2', 320, 3, strides=2)(self.conv('branch3x3_1', 192, 1)(x))
    b7 = self.conv('branch7x7x3_1', 192, 1)(x)
    b7 = self.conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7x3_4', 192, 3, strides=2)(self.conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7))
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(_Block):
  """8x8 block with 1x3 / 3x1 splits; 2048 channels out. Mixed_7c pools with a max, not a mean."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    split = lambda name, h: jnp.concatenate([self.conv(f'{name}a', 384, (1, 3), padding=(0, 1))(h),
                                             self.conv(f'{name}b', 384, (3, 1), padding=(1, 0))(h)], -1)
    b1 = self.conv('branch1x1', 320, 1)(x)
    b3 = split('branch3x3_2', self.conv('branch3x3_1', 384, 1)(x))
    bd = self.conv('branch3x3dbl_2', 384, 3, padding=1)(self.conv('branch3x3dbl_1', 448, 1)(x))
    bd = split('branch3x3dbl_3', bd)
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
    bp = self.conv('branch_pool', 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(_Block):
  """The FID Inception-v3: (B, 299, 299, 3) images in [-1, 1] to (B, 2048) pool3 features."""

  @nn.compact
  def __call__(self, x):
    p = dict(precision=self.precision)
    x = self.conv('Conv2d_1a_3x3', 32, 3, strides=2)(x)  # (B, 149, 149, 32)
    x = self.conv('Conv2d_2a_3x3', 32, 3)(x)  # (B, 147, 147, 32)
    x = _max_pool(self.conv('Conv2d_2b_3x3', 64, 3, padding=1)(x))  # (B, 73, 73, 64)
    x = self.conv('Conv2d_3b_1x1', 80, 1)(x)  # (B, 73, 73, 80)
    x = _max_pool(self.conv('Conv2d_4a_3x3', 192, 3)(x))  # (B, 35, 35, 192)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features=pool_features, name=name, **p)(x)  # (B, 35, 35, 256 / 288 / 288)
    x = InceptionB(name='Mixed_6a', **p)(x)  # (B, 17, 17, 768)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7=c7, name=name, **p)(x)  # (B, 17, 17, 768)
    x = InceptionD(name='Mixed_7a', **p)(x)  # (B, 8, 8, 1280)
    x = InceptionE(name='Mixed_7b', **p)(x)  # (B, 8, 8, 2048)
    x = InceptionE(max_pool=True, name='Mixed_7c', **p)(x)  # (B, 8, 8, 2048)
    return x.mean((1, 2))  # (B, 2048)


@jax.jit
def preprocess(images):
  """(B, H, W, 1 or 3) images on the 0..255 scale to (B, 299, 299, 3) in [-1, 1], as pytorch-fid."""
  b, _, _, c = images.shape
  if c not in (1, 3):
    raise ValueError(f'FID needs RGB or grayscale images, got {c} channels.')
  x = jax.image.resize(images.astype(jnp.float32) / 255, (b, INPUT_SIZE, INPUT_SIZE, c), 'bilinear',
                       antialias=False)
  return jnp.broadcast_to(x, (b, INPUT_SIZE, INPUT_SIZE, 3)) * 2 - 1


_network = jax.jit(InceptionV3().apply)


def batch_features(variables, images):
  """(B, H, W, C) images (0..255, any sharding) to (B, 2048) float32 features.

  Two compiled functions, so that the network compiles once per batch size, whatever the image size.
  """
  return _network(variables, preprocess(images))


def features(variables, images: np.ndarray, mesh: Optional[jax.sharding.Mesh] = None, *,
             batch_size: int = 256) -> np.ndarray:
  """Features (N, 2048) of (N, H, W, C) uint8 images that every process holds in full.

  Batches of `batch_size` (at most the number of images, rounded up to a multiple of the device
  count) are split over the mesh's devices (default: all devices, on the batch axis); the last
  batch is padded.
  """
  if not len(images):
    raise ValueError('No images to compute features of.')
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
    out.append(sharding.fetch(batch_features(variables, x))[:len(chunk)])
  return np.concatenate(out)


def load_weights(path: str) -> dict:
  """Flax variables of `InceptionV3` from pytorch-fid's state dict (.pth, needs torch, or .npz)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No FID Inception weights at {path!r}. They are pytorch-fid\'s port of the '
                            f'2015-12-05 TensorFlow Inception: download {WEIGHTS_URL} (or pass an .npz '
                            'of the same state dict).')
  return variables_from_state_dict(convert.read_state_dict(path), path)


def _torch_key(path: tuple) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  names = dict(kernel='weight', scale='weight', bias='bias', mean='running_mean', var='running_var')
  return '.'.join(path[1:-1] + (names[path[-1]],))


def variables_from_state_dict(state: dict, source: str = 'the state dict') -> dict:
  """pytorch-fid's state dict (numpy arrays) to our variables; checks every key and shape."""
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
  leaves = {tuple(k.key for k in path): a for path, a in jax.tree_util.tree_leaves_with_path(abstract)}
  expected = {_torch_key(path): path for path in leaves}
  unused = {k for k in state if k.startswith('fc.') or k.endswith('.num_batches_tracked')}
  missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected) - unused)
  if missing or unexpected:
    raise ValueError(f'{source} is not the FID Inception state dict ({WEIGHTS_URL}): missing keys '
                     f'{missing[:5]}{"..." if len(missing) > 5 else ""}, unexpected keys {unexpected[:5]}'
                     f'{"..." if len(unexpected) > 5 else ""}.')
  flat = {}
  for key, path in expected.items():
    value = np.asarray(state[key], np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # torch OIHW -> HWIO
    if value.shape != leaves[path].shape:
      raise ValueError(f'{source} is not the FID Inception state dict: {key} has shape '
                       f'{np.shape(state[key])}, the network needs {leaves[path].shape} (after OIHW -> HWIO).')
    flat[path] = value
  return jax.tree_util.tree_map_with_path(lambda path, _: flat[tuple(k.key for k in path)], abstract)


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

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f'A covariance needs at least 2 examples, got {self.n}.')
    m = self.sum / self.n
    return self.shift + m, (self.sum_sq - self.n * np.outer(m, m)) / (self.n - 1)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz with keys `mu` and `sigma` (ours or pytorch-fid's)."""
  with np.load(path) as f:
    if 'mu' not in f.files or 'sigma' not in f.files:
      raise ValueError(f'{path!r} is not an FID statistics file: it needs arrays `mu` and `sigma`, '
                       f'it has {f.files}.')
    return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)


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
    raise ValueError(f'Statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / '
                     f'{sigma2.shape}.')
  try:
    factor = np.linalg.cholesky(sigma1)
  except np.linalg.LinAlgError:
    w, v = np.linalg.eigh(sigma1)
    factor = v * np.sqrt(np.clip(w, 0, None))
  m = factor.T @ sigma2 @ factor
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return float(((mu1 - mu2)**2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
