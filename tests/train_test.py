"""Training end to end on the embedded digits: learning, checkpoints, resume, preemption, bad input."""

import functools
import glob
import json
import logging
import os
import shutil
import signal
import threading
import time

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tarflow_jax import checkpoint, config_lib, data, errors, likelihood, sharding, train, xla_cpu
from tarflow_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
  c = config_lib.cpu_digits(config_lib.default())
  c.model.num_classes = 10
  c.label_drop = 0.1
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_training_lowers_held_out_bits_per_dim(tmp_path, monkeypatch):
  config = smoke_config(num_train_steps=40, eval_every=40, sample_every=40, checkpoint_every=20, log_every=10)
  config.optim.lr = 3e-3
  released = []

  class Stream(data.Batches):  # the training stream, recording which thread lets it go
    def __del__(self):
      released.append(threading.current_thread())

  get_split = data.get_split

  def training_split(*args, train, **kwargs):
    split = get_split(*args, train=train, **kwargs)
    if train:
      split.batches.__class__ = Stream
    return split

  monkeypatch.setattr(data, 'get_split', training_split)
  out = train.train_and_evaluate(config, str(tmp_path))
  for _ in range(100):  # the training stream is torn down by another thread, not on the caller's
    if released:
      break
    time.sleep(0.1)
  assert released and released[0] is not threading.main_thread() and released[0].name == 'release training data'
  start, end = out['eval'][0], out['eval'][40]
  assert end < start - 1.0, f'held-out bits/dim {start:.3f} -> {end:.3f}'
  assert np.isfinite(out['train']['loss'])
  assert os.path.exists(tmp_path / 'samples' / 'step_0000040.png')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20', '40']
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  model, variables, saved = checkpoint.load_model(str(tmp_path / 'checkpoints'))
  assert saved.model.to_dict() == config.model.to_dict() and model.spec.num_classes == 10
  assert set(variables) == {'params', 'prior'}


def _params(workdir):
  return checkpoint.load_model(os.path.join(workdir, 'checkpoints'))[1]['params']


def test_sigterm_stops_at_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  config = smoke_config(num_train_steps=8, checkpoint_every=100, eval_every=0, sample_every=0, log_every=2)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  # A real SIGTERM to this process while the fourth batch is placed on the devices (before its step).
  placed, place = [], sharding.global_batch
  def global_batch(mesh, batch):
    placed.append(len(placed))
    if len(placed) == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return place(mesh, batch)
  monkeypatch.setattr(sharding, 'global_batch', global_batch)
  previous = signal.getsignal(signal.SIGTERM)
  out = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert out['step'] == 4 and sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['4']
  assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the caller's again
  assert any('Stopped at step 4 after a preemption notice (SIGTERM); rerun the same command to resume'
             in r.getMessage() for r in caplog.records)

  # The same command again resumes there and ends where the uninterrupted run ended.
  monkeypatch.undo()
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert any('Resumed from step 4' in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['4', '8']
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               _params(tmp_path / 'resumed'), _params(tmp_path / 'straight'))
  # ...and not trivially: training moved the parameters.
  fresh = model_lib.init_variables(model_lib.from_config(config.model), jax.random.key(0))['params']
  assert jnp.abs(fresh['block_0']['proj_out']['kernel'] - _params(tmp_path / 'straight')['block_0']['proj_out']['kernel']).max() > 1e-4


def test_every_config_builds_its_model():
  paths = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
  assert len(paths) >= 7
  for path in paths:
    for arg in (None, 'smoke', 'cpu_digits'):
      config = config_lib.load(path + (f':{arg}' if arg else ''))
      abstract = model_lib.abstract_variables(model_lib.from_config(config.model))
      assert abstract['params'], path


def test_config_load_names_a_missing_file_and_an_unknown_argument(tmp_path):
  with pytest.raises(FileNotFoundError, match='No config file'):
    config_lib.load(str(tmp_path / 'imagenet65.py'))
  with pytest.raises(ValueError, match=':smoke.*:cpu_digits'):
    config_lib.load(os.path.join(REPO, 'configs', 'demo.py:tiny'))
  assert config_lib.load(os.path.join(REPO, 'configs', 'demo.py:smoke')).num_train_steps == 6


def test_smoke_keeps_the_experiments_data_and_cpu_digits_replaces_it():
  full = config_lib.load(os.path.join(REPO, 'configs', 'imagenet64.py'))
  smoke = config_lib.load(os.path.join(REPO, 'configs', 'imagenet64.py:smoke'))
  assert smoke.data.to_dict() == {**full.data.to_dict(), 'num_eval_examples': 64, 'shuffle_buffer': 512}
  assert (smoke.model.img_size, smoke.model.in_channels, smoke.model.patch_size) == (64, 3, 16)
  assert smoke.num_train_steps == 6 and smoke.model.channels == 64
  digits = config_lib.load(os.path.join(REPO, 'configs', 'imagenet64.py:cpu_digits'))
  assert (digits.data.source, digits.model.img_size, digits.model.in_channels) == ('embedded_mnist', 16, 1)
  assert digits.noise.to_dict() == full.noise.to_dict() and digits.sample.attn_temp == full.sample.attn_temp


def reference_parameter_count(in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
                              num_classes, nvp=True, expansion=4, **unused):
  """Parameters of apple/ml-tarflow's Model, from its module definitions."""
  t, d, c = (img_size // patch_size) ** 2, in_channels * patch_size**2, channels
  linear = lambda i, o: i * o + o
  layer = 2 * c + linear(c, 3 * c) + linear(c, c) + 2 * c + linear(c, expansion * c) + linear(expansion * c, c)
  block = linear(d, c) + t * c + num_classes * c + layers_per_block * layer + linear(c, 2 * d if nvp else d)
  return num_blocks * block


def test_imagenet64_parameter_count_matches_the_reference_architecture():
  config = config_lib.load(os.path.join(REPO, 'configs', 'imagenet64.py'))
  abstract = model_lib.abstract_variables(model_lib.from_config(config.model))
  ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract['params']))
  assert ours == reference_parameter_count(**config.model)
  assert 450e6 < ours < 470e6  # the paper's ImageNet-64 model is about 460M parameters


def test_missing_dataset_says_how_to_get_it(tmp_path):
  config = smoke_config()
  config.data.update(source='tfds', name='mnist', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match=r"not prepared in .*tfds build mnist"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.data.update(source='folder', name='afhq', data_dir=str(tmp_path / 'afhq'))
  with pytest.raises(data.DatasetNotFoundError, match=r'No image folder'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(errors.UserError, match='Cannot write to --workdir'):
    train.train_and_evaluate(smoke_config(), str(blocker / 'run'))


def test_nan_in_a_batch_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  config = smoke_config(num_train_steps=8, checkpoint_every=2, eval_every=0, sample_every=0, log_every=1)
  real = data.get_split

  class Poisoned:
    """The real batches as float32, with a NaN in the third."""

    def __init__(self, batches):
      self.batches, self.count = batches, 0

    def __iter__(self):
      return self

    def __next__(self):
      b, self.count = next(self.batches), self.count + 1
      image = b['image'].astype(np.float32)
      if self.count == 3:
        image[0, 0, 0, 0] = np.nan
      return dict(b, image=image)

    def save(self, path):
      self.batches.save(path)

  def poisoned(*args, **kwargs):
    split = real(*args, **kwargs)
    split.batches = Poisoned(split.batches)
    return split

  monkeypatch.setattr(data, 'get_split', poisoned)
  with pytest.raises(FloatingPointError, match='Non-finite loss or gradient at step 3'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  params = _params(tmp_path)
  assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
  config = smoke_config(num_train_steps=2, checkpoint_every=2, eval_every=0, sample_every=0, log_every=1)
  train.train_and_evaluate(config, str(tmp_path))
  config.model.channels = 128
  config.num_train_steps = 4
  with pytest.raises(ValueError, match=r'another architecture \(channels: checkpoint 64, config 128\)'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_volume_preserving_model_learns_its_prior_variance():
  config = smoke_config()
  config.model.nvp = False
  model = model_lib.from_config(config.model)
  lr = train.schedule(config, 10, 100)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, 0)
  variables = state['variables']
  variables['params'] = jax.tree.map(lambda p: p + 0.05, variables['params'])  # not the identity
  batch = {'image': np.random.default_rng(0).integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
           'label': np.arange(16, dtype=np.int32) % 10}
  new, _ = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr))(state, batch)
  x, y = train.model_inputs(batch, jax.random.fold_in(state['rng'], 0), config)
  z, _, _ = model.apply(variables, x, y)
  want = 0.9 * 1.0 + 0.1 * jnp.mean(z**2, axis=0)
  np.testing.assert_allclose(new['variables']['prior']['var'], want, rtol=1e-5)
  assert float(jnp.abs(want - 1.0).max()) > 1e-2


@pytest.mark.parametrize('nvp', [True, False])
def test_gradient_accumulation_gives_the_update_of_one_batch(nvp):
  # The batch of 16 in 4 micro-batches of 4, with label dropping and (nvp=False) the prior's running variance.
  config = smoke_config(**{'model.nvp': nvp})
  model = model_lib.from_config(config.model)
  lr = train.schedule(config, 10, 100)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, 0)
  variables = state['variables']
  variables['params'] = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(p.size), p.shape),
                                     variables['params'])  # no block is the identity
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,), dtype=np.int32)}

  def step(k):
    config.grad_accum_steps = k
    return jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr))(state, batch)

  (one, one_metrics), (acc, acc_metrics) = step(1), step(4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), acc_metrics, one_metrics)
  # Adam's moments hold the gradient (and its square): equal up to float32 summation order.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
  jax.tree.map(close, acc['opt'], one['opt'])
  acc, one = acc['variables'], one['variables']
  jax.tree.map(close, acc['prior'], one['prior'])
  # Adam's first update is about lr * sign(gradient): where a gradient is ~0, its rounding shows (lr = 1e-3).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=2e-5), acc['params'], one['params'])
  assert float(jnp.abs(acc['params']['block_0']['proj_out']['kernel']).max()) > 0  # the step really updated
  if not nvp:
    assert float(jnp.abs(acc['prior']['var'] - 1).max()) > 1e-3


def test_the_bits_per_dim_metric_is_the_likelihood_of_the_step_inputs():
  config = smoke_config(**{'noise.type': 'uniform', 'label_drop': 0.0})
  model = model_lib.from_config(config.model)
  lr = train.schedule(config, 10, 100)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, 0)
  batch = {'image': np.random.default_rng(0).integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
           'label': np.arange(16, dtype=np.int32) % 10}
  _, metrics = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr))(state, batch)
  x, y = train.model_inputs(batch, jax.random.fold_in(state['rng'], 0), config)
  u = (x + 1.0) * 128.0 - batch['image']  # the step's dequantisation noise
  bpd = likelihood.bits_per_dim(model, state['variables'], batch['image'], u, y)
  np.testing.assert_allclose(metrics['bits_per_dim'], jnp.mean(bpd), rtol=1e-5)


def test_a_periodic_action_is_due_every_n_steps_and_at_the_last():
  assert [s for s in range(1, 11) if train._due(s, 4, 10)] == [4, 8, 10]  # pylint: disable=protected-access
  assert [s for s in range(1, 11) if train._due(s, 0, 10)] == []  # pylint: disable=protected-access


def test_gradient_accumulation_must_divide_the_batch_over_the_devices():
  config = smoke_config(grad_accum_steps=3)
  with pytest.raises(ValueError, match='grad_accum_steps=3 does not fit config.batch_size=16 on 8 devices'):
    data.check_batch_sizes(config, 8)
  config.grad_accum_steps = 2
  data.check_batch_sizes(config, 8)


def _snapshot(root) -> dict:
  """Every file under `root`: its path relative to `root` and its bytes."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def _checkpointed_config(**overrides):
  return smoke_config(**{**dict(num_train_steps=6, checkpoint_every=2, eval_every=0, sample_every=0, log_every=2,
                                keep_checkpoints=3), **overrides})


@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory):
  """A workdir with checkpoints 2, 4 and 6 of `_checkpointed_config()`; tests change copies of it."""
  workdir = tmp_path_factory.mktemp('checkpointed')
  train.train_and_evaluate(_checkpointed_config(), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['2', '4', '6']
  return workdir


@pytest.fixture
def workdir(checkpointed, tmp_path):
  shutil.copytree(checkpointed, tmp_path / 'run')
  return tmp_path / 'run'


def test_an_overflowing_update_is_not_applied_and_nothing_is_checkpointed_or_pruned(workdir):
  # Loss and gradient are finite, but an infinite learning rate makes the new parameters NaN.
  before = _snapshot(workdir / 'checkpoints'), _snapshot(workdir / 'data_state')
  config = _checkpointed_config(num_train_steps=10, checkpoint_every=1)
  config.optim.lr = float('inf')
  with pytest.raises(FloatingPointError, match='Non-finite parameters or optimiser state after the update at step 7'):
    train.train_and_evaluate(config, str(workdir))
  assert (_snapshot(workdir / 'checkpoints'), _snapshot(workdir / 'data_state')) == before

  # The guard before every save: a non-finite state is never written, and nothing is pruned for it.
  model = model_lib.from_config(config.model)
  state = train.init_state(model, train.optimizer(config, train.schedule(config, 10, 10)), 0)
  state['opt'] = jax.tree.map(lambda x: x * np.inf if jnp.issubdtype(x.dtype, jnp.floating) else x, state['opt'])
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  with pytest.raises(FloatingPointError, match='Checkpoint 7 was not written'):
    ckpt.save(7, state, config)
  ckpt.close()
  assert (_snapshot(workdir / 'checkpoints'), _snapshot(workdir / 'data_state')) == before


@pytest.mark.parametrize('workaround', [True, False])
def test_the_finiteness_guard_keeps_the_old_state_in_either_form(workaround):
  # The CPU's conditional (xla_cpu) and the other platforms' per-leaf select, both run here on the CPU.
  config = _checkpointed_config()
  model = model_lib.from_config(config.model)
  keep = train.init_state(model, train.optimizer(config, train.schedule(config, 10, 10)), 0, ema=True)
  new = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.integer) else x * np.nan, keep)
  guard = jax.jit(lambda *args: train.keep_if_finite(*args))  # a fresh function: traced in this form
  for finite, expected in ((True, new), (False, keep)):
    with xla_cpu.turned_off(*() if workaround else ('finite_guard',)):
      chosen = guard(jnp.asarray(finite), new, keep)
    assert jax.tree.structure(chosen) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, chosen, expected)


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path, size=100):
  with open(path, 'r+b') as f:
    f.truncate(size)


def test_resume_skips_a_damaged_checkpoint_and_keeps_it(workdir, checkpointed, caplog):
  _truncate(_largest_file(workdir / 'checkpoints' / '6' / 'model'))
  damaged = _snapshot(workdir / 'checkpoints' / '6')
  train.train_and_evaluate(_checkpointed_config(), str(workdir))
  warning = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warning) == 1 and f'{workdir}/checkpoints/6 cannot be read' in warning[0], warning
  assert 'resuming from step 4' in warning[0] and 'OUT_OF_RANGE' in warning[0]
  # Set aside, not deleted; the resumed run wrote step 6 again, equal to the original one.
  assert _snapshot(workdir / 'damaged_checkpoints' / '6') == damaged
  assert os.listdir(workdir / 'damaged_checkpoints' / '6.data_state') == os.listdir(checkpointed / 'data_state' / '6')
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['2', '4', '6']
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(checkpointed))


def _abstract_state(config):
  return train.build(config, sharding.make_mesh(config.mesh), train.schedule(config, 10, 10)).abstract_state


def test_a_checkpoint_written_with_the_flat_train_state_resumes(tmp_path):
  # Before the state nested its variables it was {'params', 'prior', 'opt', 'step', 'rng'}; its
  # checkpoints were written as the same items 'model' and 'train', which this writes as it did.
  config = _checkpointed_config()
  abstract = _abstract_state(config)
  nested = train.init_state(model_lib.from_config(config.model),
                            train.optimizer(config, train.schedule(config, 10, 10)), config.seed)
  nested['step'] = jnp.asarray(3, jnp.int32)
  flat = {**nested.pop('variables'), **nested}
  old = checkpoint.manager(str(tmp_path / 'checkpoints'))
  old.save(3, args=ocp.args.Composite(
      model=ocp.args.StandardSave({'params': flat['params'], 'prior': flat['prior']}),
      train=ocp.args.StandardSave({'opt': flat['opt'], 'step': flat['step'], 'rng': flat['rng']}),
      config=ocp.args.JsonSave(json.loads(config.to_json()))))
  old.wait_until_finished()
  old.close()

  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=3)
  step, state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 3 and set(state) == {'variables', 'opt', 'step', 'rng'} and int(state['step']) == 3
  jax.tree.map(np.testing.assert_array_equal, state['variables'], {'params': flat['params'], 'prior': flat['prior']})
  jax.tree.map(np.testing.assert_array_equal, state['opt'], flat['opt'])


def test_a_damaged_config_item_is_named_and_skipped(workdir, caplog):
  _truncate(workdir / 'checkpoints' / '6' / 'config' / 'metadata', 50)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=rf'Checkpoint {workdir}/checkpoints/6 cannot be read '
                                                              r'\(JSONDecodeError'):
    checkpoint.load_model(str(workdir))
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  step, state = ckpt.restore_latest(_abstract_state(_checkpointed_config()))
  ckpt.close()
  assert step == 4 and int(state['step']) == 4
  assert any(f'{workdir}/checkpoints/6 cannot be read (JSONDecodeError' in r.getMessage() for r in caplog.records)
  assert os.listdir(workdir / 'damaged_checkpoints') == ['6', '6.data_state']


def test_no_readable_checkpoint_stops_the_run_and_changes_nothing(workdir):
  for step in ('2', '4', '6'):
    _truncate(_largest_file(workdir / 'checkpoints' / step / 'train'))
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=rf'Cannot resume: checkpoint {workdir}/checkpoints/6 cannot be read \(ValueError: '
                           r'OUT_OF_RANGE.*nor can any older one. Nothing was changed'):
    train.train_and_evaluate(_checkpointed_config(num_train_steps=8), str(workdir))
  assert _snapshot(workdir) == before  # no restart from step 0 over the old run, nothing deleted


def test_a_missing_data_position_is_a_warning(workdir, caplog):
  shutil.rmtree(workdir / 'data_state' / '6')
  config = _checkpointed_config()
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  split = data.get_split(config, config.data.train_split, config.batch_size, train=True, seed=config.seed)
  ckpt.restore(6, _abstract_state(config), split.batches)
  ckpt.close()
  assert any('No input position saved for step 6' in r.getMessage() and 'other batches' in r.getMessage()
             for r in caplog.records)


def test_half_written_checkpoints_of_a_killed_run_are_removed(workdir):
  tmp = workdir / 'checkpoints' / '8.orbax-checkpoint-tmp-1795922760123456'
  (tmp / 'model').mkdir(parents=True)
  (tmp / 'model' / 'manifest.ocdbt').write_bytes(b'half')
  before = _snapshot(workdir / 'checkpoints' / '6')
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  ckpt.close()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']
  assert _snapshot(workdir / 'checkpoints' / '6') == before


def _tiny_tfds_dataset(data_dir):
  """Prepares `tiny_images` (8x8 RGB, 2 classes; 48 train, 16 validation) in `data_dir`, as `tfds build` would.

  The builder is not registered: the training run reads the prepared files alone, as it reads a
  data dir copied from another machine.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir.mkdir(parents=True)
  with tfds.core.registered.skip_registration():
    class TinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version('1.0.0')
      pkg_dir_path = epath.Path(data_dir)  # where TFDS looks for the builder's README and checksums (none)

      def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)), 'label': tfds.features.ClassLabel(num_classes=2)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._generate_examples(48, seed=0), 'validation': self._generate_examples(16, seed=1)}

      def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
          yield i, {'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 'label': i % 2}

  TinyImages(data_dir=str(data_dir)).download_and_prepare()
  return [e for _, e in TinyImages._generate_examples(None, 16, seed=1)]  # pylint: disable=protected-access


def test_training_and_evaluation_read_a_prepared_tfds_dataset(tmp_path):
  validation = _tiny_tfds_dataset(tmp_path / 'tfds')
  config = smoke_config(num_train_steps=2, eval_every=2, sample_every=0, checkpoint_every=2, log_every=1)
  config.model.update(in_channels=3, img_size=8, num_classes=2)
  config.data.update(source='tfds', name='tiny_images', data_dir=str(tmp_path / 'tfds'), train_split='train',
                     eval_split='validation', flip=True, shuffle_buffer=64, num_eval_examples=-1)
  config.eval_batch_size = 16
  out = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert sorted(out['eval']) == [0, 2] and all(np.isfinite(v) for v in out['eval'].values())
  assert np.isfinite(out['train']['loss'])
  # The evaluation's batches hold the validation split's examples (in the order TFDS stored them).
  split = data.get_split(config, 'validation', 16, train=False)
  batch = next(split.batches)
  assert split.num_examples == 16 and batch['mask'].all()
  assert (sorted((x.tobytes(), int(y)) for x, y in zip(batch['image'], batch['label']))
          == sorted((e['image'].tobytes(), e['label']) for e in validation))


def test_summary_names_what_exists_and_what_to_run_next(tmp_path):
  (tmp_path / 'samples').mkdir()
  (tmp_path / 'samples' / 'step_0000600.png').write_bytes(b'')
  (tmp_path / 'samples' / 'step_0001200.png').write_bytes(b'')
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'events.out.tfevents.1.host').write_bytes(b'')
  text = train.summary(str(tmp_path), {'step': 1200, 'train': {}, 'eval': {0: 9.0, 1200: 1.23456}}, 'python -m x')
  assert text.splitlines()[0] == 'Done: step 1200; held-out bits/dim 1.2346 (at step 1200).'
  assert f'samples:      {tmp_path}/samples/step_0001200.png' in text
  assert f'checkpoints:  {tmp_path}/checkpoints' in text and f'tensorboard --logdir={tmp_path}' in text
  assert 'resumes from the latest checkpoint: python -m x' in text
  assert f'tarflow_jax.cli.evaluate bpd --checkpoint={tmp_path}' in text
  # Nothing written, nothing evaluated: no paths that do not exist.
  empty = train.summary(str(tmp_path / 'none'), {'step': 3, 'train': {}, 'eval': {}})
  assert empty.splitlines()[0] == 'Done: step 3.' and 'samples:' not in empty and 'checkpoints:' not in empty
