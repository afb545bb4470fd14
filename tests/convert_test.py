"""Reference state dicts to our variables and back, architecture checks, and the conversion CLI both ways.

With TARFLOW_REFERENCE_DIR pointing at a checkout of apple/ml-tarflow (its transformer_flow.py) and
torch installed, an exported .pth is also loaded into the reference's own Model and run; with
TARFLOW_ITARFLOW_REFERENCE_DIR at a checkout of apple/ml-itarflow, an exported iTARFlow into its Model.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tarflow_jax import checkpoint, reference, sampling, state_dict
from tarflow_jax.model import Spec, TarFlow, abstract_variables, patchify
import toy

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'cond_small')
COND_SMALL = dict(in_channels=1, img_size=8, patch_size=2, channels=128, num_blocks=2, layers_per_block=2,
                  nvp=True, num_classes=3)


@pytest.fixture(scope='module')
def state():
  return state_dict.read_state_dict(FIXTURE + '.npz')


def test_round_trip_reproduces_the_reference_state_dict(state):
  model = TarFlow(Spec(**COND_SMALL))
  back = reference.to_reference(model, reference.from_reference(model, state))
  want = state_dict.strip_prefixes(state)
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


@pytest.mark.parametrize('nvp, num_classes', [(True, 0), (False, 5)])
def test_round_trip_from_our_variables(nvp, num_classes):
  model = toy.tiny_model(nvp=nvp, num_classes=num_classes)
  variables = toy.random_variables(model)
  again = reference.from_reference(model, reference.to_reference(model, variables))
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_prefixes_of_wrappers_are_stripped(state):
  model = TarFlow(Spec(**COND_SMALL))
  wrapped = {'module._orig_mod.' + k[len('state/'):]: v for k, v in state.items()}
  jax.tree.map(np.testing.assert_array_equal, reference.from_reference(model, wrapped),
               reference.from_reference(model, state))


@pytest.mark.parametrize('prefix', ['', 'module.', '_orig_mod.', 'module._orig_mod.'])
def test_describe_state_dict_takes_what_from_reference_takes(state, prefix):
  want = {'num_blocks': 2, 'layers_per_block': 2, 'num_tokens': 16, 'channels': 128, 'token_dim': 4, 'nvp': True,
          'num_classes': 3, 'expansion': 4}
  wrapped = {prefix + k[len('state/'):]: v for k, v in state.items()}
  assert reference.describe_state_dict(wrapped) == want
  assert reference.describe_state_dict(state) == want  # the fixture's own 'state/' prefix
  reference.from_reference(TarFlow(Spec(**COND_SMALL)), wrapped)


@pytest.mark.parametrize('change, match', [
    (dict(channels=64), r'checkpoint has channels=128, the model has channels=64'),
    (dict(patch_size=4), r'num_tokens=16, the model has num_tokens=4 \(\(img_size / patch_size\)\*\*2'),
    (dict(in_channels=3), r'token_dim=4, the model has token_dim=12'),
    (dict(num_classes=0), r'num_classes=3, the model has num_classes=0'),
    (dict(num_classes=10), r'num_classes=3, the model has num_classes=10'),
    (dict(num_blocks=4), r'num_blocks=2, the model has num_blocks=4'),
    (dict(layers_per_block=1), r'layers_per_block=2, the model has layers_per_block=1'),
    (dict(nvp=False), r'nvp=True, the model has nvp=False'),
])
def test_checkpoint_of_another_architecture_is_refused(state, change, match):
  model = TarFlow(Spec(**{**COND_SMALL, **change}))
  with pytest.raises(reference.ArchitectureMismatch, match=match):
    reference.from_reference(model, state)


def test_missing_and_unexpected_keys_are_named(state):
  model = TarFlow(Spec(**COND_SMALL))
  missing = dict(state)
  del missing['state/blocks.1.attn_blocks.0.mlp.norm.bias']
  with pytest.raises(reference.ArchitectureMismatch, match=r"first 'blocks.1.attn_blocks.0.mlp.norm.bias'"):
    reference.from_reference(model, missing)
  extra = dict(state, **{'state/blocks.0.extra.weight': np.zeros(3)})
  with pytest.raises(reference.ArchitectureMismatch, match=r"does not, first 'blocks.0.extra.weight'"):
    reference.from_reference(model, extra)
  no_masks = {k: v for k, v in state.items() if not k.endswith('.attn_mask')}  # constants: not needed
  jax.tree.map(np.testing.assert_array_equal, reference.from_reference(model, no_masks),
               reference.from_reference(model, state))
  bad_shape = dict(state, **{'state/blocks.0.attn_blocks.1.attention.qkv.bias': np.zeros(383)})
  with pytest.raises(reference.ArchitectureMismatch, match=r'attention.qkv.bias: checkpoint shape \(383,\)'):
    reference.from_reference(model, bad_shape)


def test_missing_file_is_a_clear_error():
  with pytest.raises(FileNotFoundError, match='No checkpoint at'):
    state_dict.read_state_dict('/nonexistent/model.pth')


def _files(root) -> dict:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), 'rb') as fh:
        out[os.path.join(d, f)] = fh.read()
  return out


def test_cli_writes_a_checkpoint_the_tools_can_load(tmp_path):
  config = tmp_path / 'cond_small.py'
  config.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({{'model': {COND_SMALL!r}}})
  '''))
  out = tmp_path / 'converted'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
  result = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.convert', f'--config={config}',
                           f'--checkpoint={FIXTURE}.npz', f'--output={out}'], capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'parameters' in result.stdout
  assert len((result.stdout + result.stderr).splitlines()) == 1, result.stdout + result.stderr  # Orbax's INFO hidden
  model, variables, restored_config = checkpoint.load_model(str(out))
  assert restored_config.model.channels == 128 and model.spec.num_classes == 3
  with np.load(FIXTURE + '.npz') as data:
    x = jnp.asarray(data['inputs/x']).transpose(0, 2, 3, 1)
    z, _, _ = model.apply(variables, x, jnp.asarray(data['inputs/y']))
    np.testing.assert_allclose(z, data['forward/y/z'], atol=1e-5)

  # Other weights onto the same --output: refused, and the directory keeps the first ones...
  other = {k: v * 1.5 for k, v in state_dict.read_state_dict(FIXTURE + '.npz').items()}
  np.savez(tmp_path / 'other.npz', **other)
  before = _files(out)
  again = [sys.executable, '-m', 'tarflow_jax.cli.convert', f'--config={config}', f'--checkpoint={tmp_path}/other.npz',
           f'--output={out}']
  result = subprocess.run(again, capture_output=True, text=True, env=env)
  assert result.returncode == 2 and 'error: ' in result.stderr and 'Traceback' not in result.stderr
  assert 'already holds a checkpoint (steps [0]) and nothing was written' in result.stderr
  assert '--overwrite' in result.stderr and 'Wrote' not in result.stdout
  assert _files(out) == before
  # ...unless --overwrite, which replaces them.
  result = subprocess.run(again + ['--overwrite'], capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  _, replaced, _ = checkpoint.load_model(str(out))
  np.testing.assert_array_equal(replaced['params']['block_0']['proj_in']['bias'],
                                other['state/blocks.0.proj_in.bias'])


def test_load_model_from_an_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    checkpoint.load_model(str(tmp_path / 'nothing_here'))


def _read_exported(path) -> dict:
  """An exported state dict as numpy, in the file's order; a .pth through torch.load as the reference loads it."""
  if path.endswith('.npz'):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  torch = pytest.importorskip('torch')
  state = torch.load(path, map_location='cpu', weights_only=True)
  assert all(v.dtype == torch.float32 for v in state.values())
  return {k: v.numpy() for k, v in state.items()}


@pytest.mark.parametrize('suffix', [pytest.param('.pth', marks=pytest.mark.extras), '.npz'])
def test_export_writes_the_recorded_state_dict(state, tmp_path, suffix):
  if suffix == '.pth':
    pytest.importorskip('torch', reason='writing a .pth needs torch (pip install -e ".[torch]")')
  model = TarFlow(Spec(**COND_SMALL))
  path = str(tmp_path / f'model{suffix}')
  reference.export_reference_checkpoint(model, reference.from_reference(model, state), path)
  got, want = _read_exported(path), state_dict.strip_prefixes(state)
  assert list(got) == list(want)  # the reference's keys, masks and `var` included, in its state_dict() order
  for k in want:
    assert got[k].dtype == np.float32, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if suffix == '.pth':  # the recorded .pth has the same keys in the same order
    assert list(got) == list(_read_exported(FIXTURE + '.pth'))


def test_export_refuses_what_the_reference_cannot_load(state, tmp_path, monkeypatch):
  model = TarFlow(Spec(**COND_SMALL))
  variables = reference.from_reference(model, state)
  narrow = TarFlow(Spec(**COND_SMALL, head_dim=32))  # the reference's heads are 64 wide: same shapes, another function
  with pytest.raises(reference.ArchitectureMismatch, match='head_dim=64 and expansion=4 built in; this model has '
                     'head_dim=32'):
    reference.export_reference_checkpoint(narrow, variables, str(tmp_path / 'narrow.npz'))
  path = str(tmp_path / 'model.npz')
  reference.export_reference_checkpoint(model, variables, path)
  before = _files(tmp_path)
  doubled = jax.tree.map(lambda a: 2 * np.asarray(a), variables)
  with pytest.raises(FileExistsError, match=r"model.npz' already exists and nothing was written.*--overwrite"):
    reference.export_reference_checkpoint(model, doubled, path)
  assert _files(tmp_path) == before
  reference.export_reference_checkpoint(model, doubled, path, overwrite=True)
  assert _files(tmp_path) != before and sorted(os.listdir(tmp_path)) == ['model.npz']
  with pytest.raises(ValueError, match=r"'model.pt': a state dict is written as a .pth or an .npz file"):
    reference.export_reference_checkpoint(model, variables, 'model.pt')
  monkeypatch.setitem(sys.modules, 'torch', None)  # torch not installed
  with pytest.raises(ImportError, match=r'Writing .* needs PyTorch: .* or write an .npz of the same keys'):
    reference.export_reference_checkpoint(model, variables, str(tmp_path / 'model.pth'))
  assert sorted(os.listdir(tmp_path)) == ['model.npz']


def _reference_module(variable: str = 'TARFLOW_REFERENCE_DIR', repository: str = 'apple/ml-tarflow'):
  """The transformer_flow module of a checkout of `repository` named by $`variable` (skips without it or torch)."""
  directory = os.environ.get(variable, '')
  path = os.path.join(directory, 'transformer_flow.py')
  if not directory or not os.path.exists(path):
    pytest.skip(f'{variable} does not point at a checkout of {repository}')
  pytest.importorskip('torch')
  spec = importlib.util.spec_from_file_location(f'transformer_flow_{repository.replace("/", "_").replace("-", "_")}',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.extras
@pytest.mark.parametrize('nvp, num_classes', [(True, 3), (False, 0)])
def test_exported_pth_loads_into_the_reference_model_and_computes_our_forward(tmp_path, nvp, num_classes):
  transformer_flow = _reference_module()
  import torch  # pylint: disable=g-import-not-at-top
  model = toy.tiny_model(channels=64, head_dim=64, img_size=8, nvp=nvp, num_classes=num_classes)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(np.float32), abstract_variables(model))
  variables['prior']['var'] = np.exp(rng.normal(0.0, 0.3, variables['prior']['var'].shape)).astype(np.float32)
  path = str(tmp_path / 'model.pth')
  reference.export_reference_checkpoint(model, variables, path)
  theirs = transformer_flow.Model(**reference.reference_model_args(model.spec))
  theirs.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), strict=True)
  x = toy.images(model)
  y = jnp.array([0, 2, -1]) if num_classes else None
  z, logdets, _ = model.apply(variables, x, y)
  with torch.no_grad():
    tz, _, tlogdets = theirs(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                             None if y is None else torch.tensor(np.asarray(y)))
  np.testing.assert_allclose(tz.numpy(), z, atol=1e-5)
  np.testing.assert_allclose(tlogdets.numpy(), logdets, atol=1e-6)
  assert float(jnp.abs(z - patchify(x, model.spec.patch_size)).max()) > 1e-2  # not the identity
  # Sampling: the reference's prior variance came along (random for nvp=False).
  noise = jax.random.normal(jax.random.key(4), (2, model.num_tokens, model.token_dim))
  with torch.no_grad():
    tx = theirs.reverse(torch.from_numpy(np.array(noise)), None if y is None else torch.tensor(np.asarray(y[:2])))
  ours = sampling.sample(model, variables, noise, None if y is None else y[:2])
  np.testing.assert_allclose(tx.numpy().transpose(0, 2, 3, 1), ours, atol=1e-4)


@pytest.mark.extras
def test_exported_itarflow_pth_loads_into_ml_itarflow_and_computes_our_forward(tmp_path):
  """Export to ml-itarflow end to end: per-block patch sizes, widths and depths, noise-level conditioning."""
  transformer_flow = _reference_module('TARFLOW_ITARFLOW_REFERENCE_DIR', 'apple/ml-itarflow')
  import torch  # pylint: disable=g-import-not-at-top
  model = toy.tiny_model(img_size=8, patch_size=(2, 4), channels=(64, 128), head_dim=64, layers_per_block=(1, 2),
                         num_classes=3, noise_conditioning=True)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(np.float32), abstract_variables(model))
  path = str(tmp_path / 'model.pth')
  reference.export_reference_checkpoint(model, variables, path)
  theirs = transformer_flow.Model(**reference.reference_model_args(model.spec))
  theirs.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), strict=True)
  x, y, t = toy.images(model), jnp.array([0, 2, -1]), jnp.array([0.05, 0.1, 0.3])
  z, logdets, _ = model.apply(variables, x, y, t)
  with torch.no_grad():
    tz, _, tlogdets, _ = theirs(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                                torch.tensor(np.asarray(y)), torch.tensor(np.asarray(t))[:, None])
  np.testing.assert_allclose(tz.numpy(), z, atol=1e-5)
  np.testing.assert_allclose(tlogdets.numpy(), logdets, atol=1e-5)
  assert float(jnp.abs(z - patchify(x, 4)).max()) > 1e-2  # not the identity


def test_cli_exports_a_checkpoint_directory(tmp_path):
  model = TarFlow(Spec(**COND_SMALL))
  config = ml_collections.ConfigDict({'model': COND_SMALL})
  variables = reference.from_reference(model, state_dict.read_state_dict(FIXTURE + '.npz'))
  checkpoint.save_model(str(tmp_path / 'run'), variables, config)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
  convert = lambda *args: subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.convert', *args],
                                         capture_output=True, text=True, env=env)
  result = convert(f'--checkpoint={tmp_path}/run', f'--output={tmp_path}/model.npz')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith(f'Wrote {tmp_path}/model.npz: 63 tensors') and 'Model(in_channels=1, img_size=8, ' \
      'patch_size=2, channels=128, num_blocks=2, layers_per_block=2, nvp=True, num_classes=3)' in result.stdout
  got, want = _read_exported(str(tmp_path / 'model.npz')), state_dict.strip_prefixes(state_dict.read_state_dict(
      FIXTURE + '.npz'))
  assert list(got) == list(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # A directory with an --output that is no state dict: the error names both directions.
  result = convert(f'--checkpoint={tmp_path}/run', f'--output={tmp_path}/model')
  assert result.returncode == 2 and 'is a directory: to export it, end --output with .pth or .npz' in result.stderr
  assert 'Traceback' not in result.stderr and sorted(os.listdir(tmp_path)) == ['model.npz', 'run']
