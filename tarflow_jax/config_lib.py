"""Every config field with its default, the `smoke` shrink that any experiment accepts, and `load`."""

import importlib.util
import os

import ml_collections
from ml_collections import config_dict


def default() -> ml_collections.ConfigDict:
  """The fields every experiment config has; experiments override some of them."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The flow (see tarflow_jax.model.TarFlow). dtype is the matmul dtype; parameters,
  # norms, softmax, exp and log-determinants stay float32. remat recomputes each layer in the
  # backward pass (activation memory of one layer per block instead of all, ~1/3 more compute);
  # scan_layers compiles one layer per block instead of all (compile time of deep blocks). remat saves
  # memory on XLA's CPU backend only together with scan_layers (its scheduler moves the recomputation
  # of unrolled layers early); configs/mnist.py turns both on. initializer: how fresh parameters are drawn,
  # 'reference' (torch's defaults, as the official model) or 'flax' (LeCun-normal weights, zero biases).
  c.model = ml_collections.ConfigDict(dict(
      in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
      head_dim=64, expansion=4, nvp=True, num_classes=0, remat=False, remat_policy='nothing_saveable',
      scan_layers=False, dtype='bfloat16', attention_kernel='auto', initializer='reference'))

  # Input pipeline (see tarflow_jax.data). source: 'tfds', 'folder' or 'embedded_mnist'.
  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet_resized/64x64', data_dir=config_dict.placeholder(str),
      train_split='train', eval_split='validation', flip=True, shuffle_buffer=10_000,
      num_eval_examples=10_000))

  # Training-time input noise: 'gaussian' (std) for sample quality, 'uniform' dequantisation for BPD.
  c.noise = ml_collections.ConfigDict(dict(type='gaussian', std=0.05))
  c.label_drop = 0.0  # fraction of labels replaced by "no label" (-1), for guidance

  # AdamW with one epoch of linear warm-up from min_lr, then cosine decay to min_lr.
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, min_lr=1e-6, warmup_epochs=1.0, b1=0.9, b2=0.95, weight_decay=1e-4, grad_clip=0.0))
  c.batch_size = 256  # global, over all devices and processes
  c.grad_accum_steps = 1  # the batch in this many micro-batches, one update (activation memory / k)
  c.num_epochs = 200.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.prior_var_lr = 0.1  # running-average rate of the prior variance (nvp=False)

  # Sample grids written while training (fixed noise) and sampling defaults.
  c.sample = ml_collections.ConfigDict(dict(
      num=64, guidance=0.0, guide_what='ab', attn_temp=1.0, annealed_guidance=False,
      denoise=True, denoise_scale=1.0))

  c.eval_batch_size = 256
  c.log_every = 100
  c.eval_every = 5_000
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3

  # Device mesh: sizes of the 'data' and 'fsdp' axes; -1 means the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return c


# Fields of config.model that fix the variables' shapes (dtype, remat, scan_layers and the kernel do not).
ARCHITECTURE_FIELDS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block',
                       'head_dim', 'expansion', 'nvp', 'num_classes')


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to a CPU-sized run of a few steps on the embedded digits."""
  c.model.update(in_channels=1, img_size=16, patch_size=4, channels=64, num_blocks=2, layers_per_block=1,
                 dtype='float32', num_classes=min(c.model.num_classes, 10))
  c.data.update(source='embedded_mnist', name='mnist_5k', train_split='train', eval_split='test',
                num_eval_examples=64, shuffle_buffer=512)
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_train_steps = 6
  c.optim.update(warmup_epochs=0.0)
  c.optim.lr = 1e-3
  c.sample.update(num=8)
  c.log_every = c.eval_every = c.sample_every = c.checkpoint_every = 3
  return c


def finalize(c: ml_collections.ConfigDict, arg=None) -> ml_collections.ConfigDict:
  """Applies the config-file argument: `configs/x.py:smoke` shrinks the run."""
  if arg in (None, ''):
    return c
  if arg == 'smoke':
    return smoke(c)
  raise ValueError(f'Unknown config argument {arg!r}; the only one is "smoke" (configs/<name>.py:smoke).')


def load(spec: str) -> ml_collections.ConfigDict:
  """`configs/<name>.py[:arg]` to its ConfigDict, as `--config=` loads it (for notebooks and scripts).

  >>> config = load('configs/demo.py:smoke')
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file {path!r}: give a path to configs/<name>.py, optionally with '
                            f'":smoke" (the configs are in the repository, not in the installed package).')
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
