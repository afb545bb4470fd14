"""The notebooks run top to bottom in a real Jupyter kernel (SMOKE mode) and produce what they promise.

Each notebook's parameters are overridden papermill-style: a cell tagged `injected-parameters` is inserted
after the one tagged `parameters`. The kernel is ipykernel's `python3`, which must be this interpreter.
"""

import glob
import json
import os
import sys

import numpy as np
import pytest

from conftest import xla_flags

nbformat = pytest.importorskip('nbformat', reason='needs nbformat (pip install -e ".[dev]")')
nbclient = pytest.importorskip('nbclient', reason='needs nbclient (pip install -e ".[dev]")')
pytest.importorskip('ipykernel', reason='needs ipykernel for the python3 kernel (pip install -e ".[dev]")')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, 'notebooks')


def run_notebook(name, parameters, cwd, monkeypatch, timeout=600):
  """Executes notebooks/<name> with `parameters` injected; returns the executed notebook."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name}: expected one cell tagged "parameters", found {len(tagged)}'
  source = '# Parameters injected by tests/notebook_test.py\n' + '\n'.join(f'{k} = {v!r}' for k, v in parameters.items())
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']}))
  # The kernel is a child process: it must import this checkout's package from any working directory,
  # and sees one CPU device as a Colab CPU runtime would (not the eight fake devices of conftest.py).
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(p for p in [REPO, os.environ.get('PYTHONPATH')] if p))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', xla_flags(1))
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=timeout,
                                   resources={'metadata': {'path': str(cwd)}})
  client.execute()
  return nb


def printed(nb) -> str:
  """Everything the notebook printed to stdout."""
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
                 if o.output_type == 'stream' and o.name == 'stdout')


def images_shown(nb) -> int:
  return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'official_checkpoint.ipynb'])
def test_notebook_is_saved_clean_with_a_parameters_cell_first(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert 'parameters' in code[0].metadata.get('tags', []), 'the first code cell must be tagged "parameters"'
  assert 'SMOKE = False' in code[0].source
  for c in code:
    assert not c.outputs and c.execution_count is None, f'{name}: saved with outputs (clear them before saving)'
  assert nb.metadata.kernelspec.name == 'python3'


def test_quickstart_smoke_trains_samples_and_evaluates(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  nb = run_notebook('quickstart.ipynb', {'SMOKE': True, 'WORKDIR': str(workdir)}, tmp_path, monkeypatch)
  results = json.loads((workdir / 'results.json').read_text())

  # The kernel ran this interpreter.
  assert (results['python'], results['prefix']) == (sys.executable, sys.prefix), (
      f'The python3 kernel ran {results["python"]}, not this interpreter {sys.executable}: another python3 '
      'kernel spec shadows this environment\'s (see `jupyter kernelspec list`).')

  # configs/demo.py:smoke trains 6 steps and writes a grid every 3.
  assert results['smoke'] and results['steps'] == 6
  assert results['sample_grids'] == ['step_0000003.png', 'step_0000006.png']
  for png in results['sample_grids']:
    assert (workdir / 'samples' / png).stat().st_size > 100

  # Bits/dim and accuracy on the smoke config's 64 held-out digits, printed and saved.
  assert results['num_eval_images'] == 64
  assert 4.0 < results['bits_per_dim'] < 10.0 and results['bits_per_dim_stderr'] > 0
  assert 0.0 <= results['accuracy'] <= 1.0
  text = printed(nb)
  assert f'bits/dim on 64 held-out digits: {results["bits_per_dim"]:.3f}' in text
  assert f'Bayes classifier accuracy on 64 held-out digits: {100 * results["accuracy"]:.1f}%' in text
  assert 'Training took' in text and 'RMS error to the clean digits' in text
  # Loss curve, training grids, samples without/with guidance, denoised samples and digits.
  assert images_shown(nb) >= 5


def test_official_checkpoint_smoke_converts_and_samples(tmp_path, monkeypatch):
  params = {'SMOKE': True, 'DOWNLOAD': False, 'OUTPUT_DIR': str(tmp_path / 'out'),
            'CONVERTED_DIR': str(tmp_path / 'converted'), 'NUM_SAMPLES': 6}
  nb = run_notebook('official_checkpoint.ipynb', params, tmp_path, monkeypatch)
  text = printed(nb)
  assert 'Runtime: CPU' in text
  assert glob.glob(str(tmp_path / 'out' / 'smoke_reference.*'))  # the stand-in checkpoint, in the official format
  assert 'largest difference 0.0' in text
  with np.load(tmp_path / 'out' / 'samples.npz') as f:
    assert f['images'].shape == (6, 16, 16, 1) and f['images'].dtype == np.uint8  # afhq256.py:cpu_digits
    np.testing.assert_array_equal(f['labels'], np.arange(6) % 3)
  assert (tmp_path / 'out' / 'samples.png').stat().st_size > 100
  assert images_shown(nb) == 2

  # The converted checkpoint is one the command-line tools read.
  from tarflow_jax import checkpoint  # pylint: disable=g-import-not-at-top
  model, variables, config = checkpoint.load_model(str(tmp_path / 'converted'))
  assert model.spec.num_classes == 3 and config.noise.std == 0.07 and set(variables) == {'params', 'prior'}


def test_official_checkpoint_says_where_to_get_a_missing_checkpoint(tmp_path, monkeypatch):
  params = {'DOWNLOAD': False, 'CHECKPOINT_PATH': str(tmp_path / 'absent.pth'), 'OUTPUT_DIR': str(tmp_path / 'out')}
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    run_notebook('official_checkpoint.ipynb', params, tmp_path, monkeypatch)
  message = str(error.value)
  assert 'FileNotFoundError' in message and 'absent.pth' in message
  assert 'https://ml-site.cdn-apple.com/models/tarflow/afhq256/afhq_model_8_768_8_8_0.07.pth' in message

