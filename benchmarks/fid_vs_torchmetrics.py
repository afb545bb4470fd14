r"""Our FID against the reference's (torchmetrics 1.6 / torch-fidelity 0.3) on the same images.

  pip install --no-deps torchmetrics==1.6.0 torch-fidelity==0.3.0 lightning-utilities
  python benchmarks/fid_vs_torchmetrics.py

The real Inception weights are a download that this machine cannot make, so both sides use the
same random FID-Inception weights (tests/fid_test.py's TorchInception), handed to torch-fidelity
in place of its download. The statistics file is written as the reference's prepare_fid_stats.py
writes it (torchmetrics' state with its metric states persistent), then read by `fid.load_statistics`
and `inception.load_weights`. Prints the largest feature differences for both input pipelines
and the two FIDs.
"""

import os
import sys
import tempfile
import types

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')  # tests/fid_test.py's mesh

# torch-fidelity imports torchvision only for its datasets: a stand-in while it imports.
stub = types.ModuleType('torchvision')
stub.datasets = types.ModuleType('torchvision.datasets')
stub.datasets.CIFAR10 = stub.datasets.STL10 = type('Dataset', (), {})
sys.modules.update({'torchvision': stub, 'torchvision.datasets': stub.datasets})
import torch_fidelity.feature_extractor_inceptionv3 as torch_fidelity_inception  # pylint: disable=g-import-not-at-top
del sys.modules['torchvision'], sys.modules['torchvision.datasets']
from torchmetrics.image.fid import FrechetInceptionDistance  # pylint: disable=g-import-not-at-top

from fid_test import TorchInception  # pylint: disable=g-import-not-at-top
from tarflow_jax import fid, inception  # pylint: disable=g-import-not-at-top


def main():
  folder = tempfile.mkdtemp()
  net = TorchInception()
  with torch.no_grad():
    net.network(torch.zeros(1, 3, 75, 75, dtype=torch.float64))
  weights = {k: v.float() for k, v in net.state.items()}
  weights.update({'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)})
  torch_fidelity_inception.load_state_dict_from_url = lambda url, **kwargs: weights

  metric = FrechetInceptionDistance(reset_real_features=False, normalize=True)
  metric.persistent(True)  # its states in state_dict, as the reference's FID subclass saves them
  rng = np.random.default_rng(0)
  real = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  fake = np.tanh(1.5 * rng.normal(size=(4, 64, 64, 3))).astype(np.float32)  # samples on [-1, 1]
  with torch.no_grad():
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)  # ToTensor, Normalize
    metric.update(0.5 * (x + 1), real=True)
    stats = os.path.join(folder, 'test_64_fid_stats.pth')
    torch.save(metric.state_dict(), stats)
    s = torch.from_numpy(fake).permute(0, 3, 1, 2).clip(-1, 1)
    metric.update(0.5 * (s + 1), real=False)
    reference_fid = metric.compute().item()
    reference_real = metric.inception((0.5 * (x + 1) * 255).byte()).double().numpy()
    reference_fake = metric.inception((0.5 * (s + 1) * 255).byte()).double().numpy()

  variables = inception.load_weights(stats)
  ours = {
      'torchmetrics': (inception.REFERENCE_REAL_PIXELS[real], inception.samples_to_uint8(fake, 'torchmetrics')),
      'pytorch_fid': (real, inception.samples_to_uint8(fake, 'pytorch_fid')),
  }
  print(f'feature scale: max |f| {np.abs(reference_real).max():.3f}, std {reference_real.std():.3f}')
  for pipeline, (r, f) in ours.items():
    fr, ff = (fid.features(variables, a, pipeline=pipeline).astype(np.float64) for a in (r, f))
    print(f'{pipeline} pipeline: max |ours - torchmetrics| real {np.abs(fr - reference_real).max():.2e}, '
          f'samples {np.abs(ff - reference_fake).max():.2e}; FID ours {fid.frechet_distance(*fid.statistics(fr), *fid.statistics(ff)):.4f}')
  mu, sigma = fid.load_statistics(stats)
  print(f'statistics file vs numpy on torchmetrics\' features: mu {np.abs(mu - reference_real.mean(0)).max():.1e}, '
        f'sigma {np.abs(sigma - np.cov(reference_real, rowvar=False)).max():.1e}')
  fake_features = fid.features(variables, ours['torchmetrics'][1], pipeline='torchmetrics')
  print(f'FID: torchmetrics {reference_fid:.4f}, ours from its statistics file {fid.frechet_distance(mu, sigma, *fid.statistics(fake_features)):.4f}')


if __name__ == '__main__':
  main()
