"""FID: the Inception network against a plain-torch one on random weights, the distance against scipy,
statistics files, weight-file errors and the `fid` command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from tarflow_jax import fid, inception, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TorchInception:
  """The FID Inception-v3 written out with torch.nn.functional over a state dict.

  A missing conv creates its random weights (input channels from the incoming tensor), so one
  pass builds a state dict with pytorch-fid's key names and shapes. He-scaled convolutions and
  batch norms near the identity keep the activations O(1) through the ~90 layers.
  """

  def __init__(self, state=None):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.F = torch, torch.nn.functional
    self.state = {} if state is None else state
    self.gen = torch.Generator().manual_seed(0)

  def _rand(self, *shape, low=0.0, high=1.0):
    return low + (high - low) * self.torch.rand(*shape, generator=self.gen, dtype=self.torch.float64)

  def conv(self, x, name, out, kernel, stride=1, padding=0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    s = self.state
    if f'{name}.conv.weight' not in s:
      he = (2 / (x.shape[1] * kh * kw))**0.5
      s[f'{name}.conv.weight'] = he * self.torch.randn(out, x.shape[1], kh, kw, generator=self.gen, dtype=x.dtype)
      s[f'{name}.bn.weight'] = self._rand(out, low=0.8, high=1.2)
      s[f'{name}.bn.bias'] = self._rand(out, low=-0.1, high=0.1)
      s[f'{name}.bn.running_mean'] = self._rand(out, low=-0.1, high=0.1)
      s[f'{name}.bn.running_var'] = self._rand(out, low=0.8, high=1.2)
    x = self.F.conv2d(x, s[f'{name}.conv.weight'], stride=stride, padding=padding)
    x = self.F.batch_norm(x, s[f'{name}.bn.running_mean'], s[f'{name}.bn.running_var'], s[f'{name}.bn.weight'],
                          s[f'{name}.bn.bias'], training=False, eps=1e-3)
    return self.F.relu(x)

  def avg(self, x):
    return self.F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(self, x, n, pool_features):
    c = self.conv
    b5 = c(c(x, f'{n}.branch5x5_1', 48, 1), f'{n}.branch5x5_2', 64, 5, padding=2)
    b3 = c(c(x, f'{n}.branch3x3dbl_1', 64, 1), f'{n}.branch3x3dbl_2', 96, 3, padding=1)
    b3 = c(b3, f'{n}.branch3x3dbl_3', 96, 3, padding=1)
    return self.torch.cat([c(x, f'{n}.branch1x1', 64, 1), b5, b3,
                           c(self.avg(x), f'{n}.branch_pool', pool_features, 1)], 1)

  def block_c(self, x, n, c7):
    c = self.conv
    b7 = c(c(x, f'{n}.branch7x7_1', c7, 1), f'{n}.branch7x7_2', c7, (1, 7), padding=(0, 3))
    b7 = c(b7, f'{n}.branch7x7_3', 192, (7, 1), padding=(3, 0))
    bd = c(c(x, f'{n}.branch7x7dbl_1', c7, 1), f'{n}.branch7x7dbl_2', c7, (7, 1), padding=(3, 0))
    bd = c(bd, f'{n}.branch7x7dbl_3', c7, (1, 7), padding=(0, 3))
    bd = c(bd, f'{n}.branch7x7dbl_4', c7, (7, 1), padding=(3, 0))
    bd = c(bd, f'{n}.branch7x7dbl_5', 192, (1, 7), padding=(0, 3))
    return self.torch.cat([c(x, f'{n}.branch1x1', 192, 1), b7, bd, c(self.avg(x), f'{n}.branch_pool', 192, 1)], 1)

  def block_e(self, x, n, pool):
    c = self.conv
    pair = lambda h, name: [c(h, f'{name}a', 384, (1, 3), padding=(0, 1)),
                            c(h, f'{name}b', 384, (3, 1), padding=(1, 0))]
    b3 = pair(c(x, f'{n}.branch3x3_1', 384, 1), f'{n}.branch3x3_2')
    bd = c(c(x, f'{n}.branch3x3dbl_1', 448, 1), f'{n}.branch3x3dbl_2', 384, 3, padding=1)
    return self.torch.cat([c(x, f'{n}.branch1x1', 320, 1), *b3, *pair(bd, f'{n}.branch3x3dbl_3'),
                           c(pool(x), f'{n}.branch_pool', 192, 1)], 1)

  def __call__(self, images_uint8):
    """(N, H, W, C) uint8 numpy to (N, 2048) numpy, as pytorch-fid's InceptionV3 (float64)."""
    x = self.torch.from_numpy(images_uint8).permute(0, 3, 1, 2).double().expand(-1, 3, -1, -1) / 255
    x = 2 * self.F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
    return self.network(x).numpy()

  def network(self, x):
    """(N, 3, H, W) in [-1, 1], H and W at least 75, to (N, 2048)."""
    torch, F, c = self.torch, self.F, self.conv
    x = c(c(x, 'Conv2d_1a_3x3', 32, 3, stride=2), 'Conv2d_2a_3x3', 32, 3)
    x = F.max_pool2d(c(x, 'Conv2d_2b_3x3', 64, 3, padding=1), 3, stride=2)
    x = F.max_pool2d(c(c(x, 'Conv2d_3b_1x1', 80, 1), 'Conv2d_4a_3x3', 192, 3), 3, stride=2)
    for n, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = self.block_a(x, n, pool_features)
    bd = c(c(x, 'Mixed_6a.branch3x3dbl_1', 64, 1), 'Mixed_6a.branch3x3dbl_2', 96, 3, padding=1)
    x = torch.cat([c(x, 'Mixed_6a.branch3x3', 384, 3, stride=2), c(bd, 'Mixed_6a.branch3x3dbl_3', 96, 3, stride=2),
                   F.max_pool2d(x, 3, stride=2)], 1)
    for n, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = self.block_c(x, n, c7)
    b3 = c(c(x, 'Mixed_7a.branch3x3_1', 192, 1), 'Mixed_7a.branch3x3_2', 320, 3, stride=2)
    b7 = c(c(x, 'Mixed_7a.branch7x7x3_1', 192, 1), 'Mixed_7a.branch7x7x3_2', 192, (1, 7), padding=(0, 3))
    b7 = c(c(b7, 'Mixed_7a.branch7x7x3_3', 192, (7, 1), padding=(3, 0)), 'Mixed_7a.branch7x7x3_4', 192, 3, stride=2)
    x = torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)
    x = self.block_e(x, 'Mixed_7b', self.avg)
    x = self.block_e(x, 'Mixed_7c', lambda h: F.max_pool2d(h, 3, stride=1, padding=1))
    return x.mean((2, 3))


def images(n, size, channels, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope='module')
def torch_weights(tmp_path_factory):
  """Random FID-Inception weights as a float32 torch state dict (with the unused fc) and its .pth file."""
  torch = pytest.importorskip('torch')
  net = TorchInception()
  with torch.no_grad():
    net.network(torch.zeros(1, 3, 75, 75, dtype=torch.float64))  # builds the state dict
  state = {k: v.float() for k, v in net.state.items()}
  state.update({'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)})
  path = str(tmp_path_factory.mktemp('inception') / 'pt_inception.pth')
  torch.save(state, path)
  return state, path


@pytest.fixture(scope='module')
def rgb(torch_weights):
  """Two RGB images and their features, over a 2-device mesh."""
  x = images(2, 48, 3, 1)
  return x, fid.features(inception.load_weights(torch_weights[1]), x, MESH2)


MESH2 = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1)), jax.devices()[:2])


def test_features_match_plain_torch_on_rgb_and_grayscale(torch_weights, rgb):
  import torch  # pylint: disable=g-import-not-at-top
  state, path = torch_weights
  assert len(state) == 472  # 94 conv + batch-norm layers and the fc, as pytorch-fid's file
  reference = TorchInception({k: v.double() for k, v in state.items()})
  gray = images(1, 32, 1, 2)  # also pads the batch to the 2 devices
  for x, got in (rgb, (gray, fid.features(inception.load_weights(path), gray, MESH2))):
    with torch.no_grad():
      want = reference(x)
    assert got.shape == (len(x), 2048) and got.dtype == np.float32
    assert want.std() > 0.1 and np.abs(want).max() < 100
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_resize_is_torch_bilinear_without_antialiasing():
  """Up- and downsampling as pytorch-fid's float32 `F.interpolate` (both are 4e-5 off float64 at 400 px)."""
  torch = pytest.importorskip('torch')
  for shape in ((2, 37, 64, 3), (1, 400, 350, 1)):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    got = np.asarray(inception.preprocess(x))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255
    want = 2 * torch.nn.functional.interpolate(t, size=(299, 299), mode='bilinear', align_corners=False) - 1
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.fixture(scope='module')
def numpy_state():
  """Random weights under pytorch-fid's key names and shapes, from the network's variables (no torch)."""
  abstract = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
  torch_name = dict(kernel='weight', scale='weight', bias='bias', mean='running_mean', var='running_var')
  rng, state = np.random.default_rng(0), {'fc.weight': np.zeros((1008, 2048)), 'fc.bias': np.zeros(1008)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    names = [k.key for k in path]
    shape = (leaf.shape[3], leaf.shape[2], *leaf.shape[:2]) if names[-1] == 'kernel' else leaf.shape  # OIHW
    state['.'.join(names[1:-1] + [torch_name[names[-1]]])] = rng.normal(size=shape).astype(np.float32)
  return state


def test_npz_weights(numpy_state, tmp_path):
  np.savez(tmp_path / 'inception.npz', **numpy_state, **{'Conv2d_1a_3x3.bn.num_batches_tracked': np.zeros(())})
  variables = inception.load_weights(str(tmp_path / 'inception.npz'))
  conv = variables['params']['Mixed_6b']['branch7x7_2']  # a (1, 7) kernel: OIHW -> HWIO
  np.testing.assert_array_equal(conv['conv']['kernel'],
                                numpy_state['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0))
  assert conv['conv']['kernel'].shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(conv['bn']['scale'], numpy_state['Mixed_6b.branch7x7_2.bn.weight'])
  np.testing.assert_array_equal(variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
                                numpy_state['Mixed_7c.branch_pool.bn.running_var'])


def test_weight_file_errors(numpy_state, tmp_path):
  with pytest.raises(FileNotFoundError, match='pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05'):
    inception.load_weights(str(tmp_path / 'missing.pth'))
  wrong = dict(numpy_state)
  wrong['Mixed_6b.branch7x7_2.conv.weight'] = wrong['Mixed_6b.branch7x7_2.conv.weight'].transpose(0, 1, 3, 2)
  np.savez(tmp_path / 'wrong_shape.npz', **wrong)
  with pytest.raises(ValueError, match=r'Mixed_6b.branch7x7_2.conv.weight has shape \(128, 128, 7, 1\)'):
    inception.load_weights(str(tmp_path / 'wrong_shape.npz'))
  np.savez(tmp_path / 'other.npz', **{'conv.weight': np.zeros((3, 3, 1, 1))})
  with pytest.raises(ValueError, match='not the FID Inception state dict'):
    inception.load_weights(str(tmp_path / 'other.npz'))


def random_statistics(rng, dim, n):
  x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
  return fid.statistics(x)


def test_frechet_distance_is_the_scipy_formula():
  rng = np.random.default_rng(0)
  (mu1, sigma1), (mu2, sigma2) = random_statistics(rng, 64, 200), random_statistics(rng, 64, 300)
  want = ((mu1 - mu2)**2).sum() + np.trace(sigma1 + sigma2) - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
  assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-6)
  assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-8 * np.trace(sigma1)
  singular = random_statistics(rng, 64, 20)  # rank 19: the eigendecomposition instead of Cholesky
  want = np.trace(singular[1] + sigma2) - 2 * np.trace(scipy.linalg.sqrtm(singular[1] @ sigma2).real)
  assert fid.frechet_distance(*singular, singular[0], sigma2) == pytest.approx(want, rel=1e-6)
  with pytest.raises(ValueError, match='do not match'):
    fid.frechet_distance(mu1[:10], sigma1, mu2, sigma2)


def test_statistics_running_and_round_trip(tmp_path):
  x = np.random.default_rng(1).normal(3.0, 0.5, size=(100, 16)).astype(np.float32)
  mu, sigma = fid.statistics(x)
  running = fid.RunningStatistics()
  for chunk in [x[:0], *np.array_split(x, 7)]:  # an empty batch (all padding) first
    running.update(chunk)
  for got, want in zip(running.result(), (mu, sigma)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  fid.save_statistics(str(tmp_path / 'stats.npz'), mu, sigma)
  loaded = fid.load_statistics(str(tmp_path / 'stats.npz'))
  assert all(np.array_equal(a, b) and a.dtype == np.float64 for a, b in zip(loaded, (mu, sigma)))
  np.savez(tmp_path / 'bad.npz', mean=mu)
  with pytest.raises(ValueError, match='needs arrays `mu` and `sigma`'):
    fid.load_statistics(str(tmp_path / 'bad.npz'))


def test_fid_cli(torch_weights, rgb, tmp_path):
  """On all 8 devices (the batch padded from 2 to 8), against statistics (mu_ref, I): two samples
  have a covariance of rank 1, whose eigenvalue is l = |f1 - f2|^2 / 2, so
  FID = |mu - mu_ref|^2 + l + 2048 - 2 sqrt(l)."""
  samples, features = rgb
  np.savez(tmp_path / 'samples.npz', images=samples, labels=np.zeros(len(samples), np.int32))
  mu_ref = np.random.default_rng(0).normal(size=2048)
  fid.save_statistics(str(tmp_path / 'stats.npz'), mu_ref, np.eye(2048))
  result = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.evaluate', 'fid', f'--samples={tmp_path}',
                           f'--stats={tmp_path}/stats.npz', f'--inception={torch_weights[1]}',
                           f'--output={tmp_path}/fid.json'],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO, OPENBLAS_NUM_THREADS='1'))  # a busy 2-core CI box
  assert result.returncode == 0, result.stderr[-3000:]
  f = features.astype(np.float64)
  l = ((f[0] - f[1])**2).sum() / 2
  got = json.loads((tmp_path / 'fid.json').read_text())
  assert got['fid'] == pytest.approx(((f.mean(0) - mu_ref)**2).sum() + l + 2048 - 2 * np.sqrt(l), rel=1e-5)
  assert got['num_samples'] == 2 and 'FID of 2 samples' in result.stdout
