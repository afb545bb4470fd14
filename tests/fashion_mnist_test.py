"""configs/fashion_mnist.py on the real files of Debian's dataset-fashion-mnist (skipped where it is absent)."""

import glob
import os

import numpy as np
import pytest

from tarflow_jax import config_lib, data

pytestmark = pytest.mark.extras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = data.IDX_PACKAGES['fashion_mnist'][1]

if not os.path.isfile(os.path.join(FOLDER, 'train-images-idx3-ubyte.gz')):
  pytest.skip(f'Fashion-MNIST is not in {FOLDER}: apt-get install dataset-fashion-mnist', allow_module_level=True)


def load(arg=''):
  return config_lib.load(os.path.join(REPO, 'configs', 'fashion_mnist.py') + (f':{arg}' if arg else ''))


def test_the_installed_files_are_fashion_mnist():
  c = load()
  for split, n in (('train', 60_000), ('test', 10_000)):
    images, labels = data.idx_split(c.data, split)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, n // 10))  # 10 classes of equal size
  assert 60 < images.mean() < 90 and images.max() == 255  # garments on black: mean 73 (the dataset's paper)


def test_smoke_run_trains_evaluates_and_samples(tmp_path):
  from tarflow_jax import train  # pylint: disable=g-import-not-at-top
  c = load('smoke')
  assert (c.data.source, c.data.name, c.model.num_classes, c.fid_every) == ('idx', 'fashion_mnist', 10, 0)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  assert result['step'] == 6 and all(np.isfinite(v) and v > 0 for v in result['eval'].values()), result
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '6'
  assert glob.glob(os.path.join(workdir, 'samples', '*.png'))
