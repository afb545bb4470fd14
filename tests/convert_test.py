"""Reference state dicts to our variables and back, architecture checks, and the conversion CLI."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import checkpoint, reference, state_dict
from tarflow_jax.model import TarFlow
import toy

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'cond_small')
COND_SMALL = dict(in_channels=1, img_size=8, patch_size=2, channels=128, num_blocks=2, layers_per_block=2,
                  nvp=True, num_classes=3)


@pytest.fixture(scope='module')
def state():
  return state_dict.read_state_dict(FIXTURE + '.npz')


def test_round_trip_reproduces_the_reference_state_dict(state):
  model = TarFlow(**COND_SMALL)
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
  model = TarFlow(**COND_SMALL)
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
  reference.from_reference(TarFlow(**COND_SMALL), wrapped)


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
  model = TarFlow(**{**COND_SMALL, **change})
  with pytest.raises(reference.ArchitectureMismatch, match=match):
    reference.from_reference(model, state)


def test_missing_and_unexpected_keys_are_named(state):
  model = TarFlow(**COND_SMALL)
  missing = dict(state)
  del missing['state/blocks.1.attn_blocks.0.mlp.norm.bias']
  with pytest.raises(reference.ArchitectureMismatch, match=r"first 'blocks.1.attn_blocks.0.mlp.norm.bias'"):
    reference.from_reference(model, missing)
  extra = dict(state, **{'state/blocks.0.extra.weight': np.zeros(3)})
  with pytest.raises(reference.ArchitectureMismatch, match=r"does not, first 'blocks.0.extra.weight'"):
    reference.from_reference(model, extra)
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
  assert restored_config.model.channels == 128 and model.num_classes == 3
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
