"""Orbax checkpoints: the model's variables, the training state and the config, per step.

A checkpoint directory is an Orbax `CheckpointManager` directory whose steps
hold up to four items:
  'model':  {'params', 'prior'}, everything needed to sample or evaluate (the train state's 'variables');
  'train':  {'opt', 'step', 'rng'}, the rest of the train state (absent in converted checkpoints);
  'ema':    the moving average of 'params' (the train state's 'ema'; only with config.ema_decay > 0);
  'config': the experiment's config as JSON.
Tools that only sample or evaluate restore 'model' (its 'params' replaced by 'ema' where there is
one, unless asked for the raw weights) and 'config'.
"""

import contextlib
import json
import os
from typing import Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from tarflow_jax import config_lib, errors, sharding, storage
from tarflow_jax import model as model_lib


def absolute(path: str) -> str:
  """An absolute local path; remote paths (gs://...) as they are."""
  return path if '://' in path else os.path.abspath(path)


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that leaves preemption to the training loop (`train._Preemption`).

  Orbax asks JAX's preemption sync point about a step again when a save finishes, from a
  background thread and with the saved (older) step; JAX remembers only the last step asked,
  so a preemption notice in that window would make this process report a stale step and miss
  the step at which the others stop.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def manager(directory: str, max_to_keep: Optional[int] = None, create: bool = True,
            **options) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with the items above."""
  return _Manager(
      absolute(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, **options),
      item_names=('model', 'train', 'ema', 'config'))


class DamagedCheckpointError(errors.UserError):
  """A checkpoint step whose files cannot be read; the message names its directory."""


class CheckpointWriteError(storage.WriteError):
  """A checkpoint that the file system refused (no space, quota, permission, a vanished mount); the message
  names the workdir, the step, the cause and the last good checkpoint."""


def all_finite(tree) -> jax.Array:
  """True iff every floating-point leaf of `tree` is finite (one reduction on the devices)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


_all_finite = jax.jit(all_finite)


def save_model(directory: str, variables, config: ml_collections.ConfigDict, step: int = 0,
               overwrite: bool = False) -> None:
  """Writes variables {'params', 'prior'} and the config as checkpoint `step` of `directory`.

  Raises errors.AlreadyExists if `directory` already holds checkpoints, unless `overwrite`, which
  deletes them first.
  """
  mngr = manager(directory)
  try:
    existing = list(mngr.all_steps())
    if existing and not overwrite:
      raise errors.AlreadyExists(f'{directory!r} already holds a checkpoint (steps {existing}) and nothing was '
                                 'written: choose another directory, or pass --overwrite (overwrite=True) to '
                                 'replace it.')
    for s in existing:
      mngr.delete(s)
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables),
                                            config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()


def load_model(directory: str, step: Optional[int] = None, raw_weights: bool = False, shardings=None,
               check_config=None):
  """Restores (model, variables, config) from a checkpoint directory (latest step by default).

  Args:
    directory: a training workdir, its `checkpoints/`, or the output of `python -m tarflow_jax.convert`.
    step: the step to restore (default: the latest).
    raw_weights: use the trained parameters even where the checkpoint holds their moving average
      (item 'ema', config.ema_decay > 0), which is used by default.
    shardings: shardings of the variables {'params', 'prior'} (default: replicated on every device).
    check_config: called with the saved config before the weights are read; raises to refuse them.
  """
  if (epath.Path(directory) / 'checkpoints').is_dir():
    directory = os.path.join(directory, 'checkpoints')
  mngr = _existing(directory)
  if step is not None:
    return _load_step(mngr, step, raw_weights, shardings, check_config)
  # A run training in this workdir writes new steps (Orbax lists a step once it is complete) and
  # prunes old ones, perhaps the one being read: a step that fails to read while a newer one has
  # appeared is passed over for the newest; the newest failing is damage.
  for attempt in range(_READ_ATTEMPTS):
    step = mngr.latest_step()
    try:
      return _load_step(mngr, step, raw_weights, shardings, check_config)
    except DamagedCheckpointError:
      mngr = _existing(directory)
      if attempt == _READ_ATTEMPTS - 1 or (mngr.latest_step() or -1) <= step:
        raise
      logging.info('Checkpoint %s was pruned by the run training there while it was read: reading step %d.',
                   _step_dir(mngr, step), mngr.latest_step())
  raise AssertionError('unreachable')


_READ_ATTEMPTS = 20


def _load_step(mngr: ocp.CheckpointManager, step: int, raw_weights: bool, shardings, check_config):
  """`load_model` of one step."""
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(mngr, step, e) from e
  config = _merged(config_lib.default(), {k: v for k, v in saved.items() if k != 'model'})
  config.model = ml_collections.ConfigDict(saved['model'])  # as saved: the model's own defaults fill the rest
  if check_config is not None:
    check_config(config)
  model = model_lib.from_config(config.model)
  if shardings is None:  # replicated over all devices, whatever mesh the checkpoint was written from
    shardings = jax.tree.map(lambda _: sharding.replicated(sharding.default_mesh()),
                             model_lib.abstract_variables(model))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          model_lib.abstract_variables(model), shardings)
  items = {'model': ocp.args.StandardRestore(abstract)}
  use_ema = not raw_weights and has_ema(mngr, step)
  if use_ema:
    items['ema'] = ocp.args.StandardRestore(abstract['params'])
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(mngr, step, e) from e
  variables = restored.model
  if use_ema:
    logging.info('Using the moving average of the parameters (ema_decay=%g) in %s; raw_weights=True (--raw_weights) '
                 'uses the parameters.', config.get('ema_decay', 0.0), _step_dir(mngr, step))
    variables = {**variables, 'params': restored.ema}
  return model, variables, config


def has_ema(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds item 'ema', the moving average of the parameters."""
  return (epath.Path(_step_dir(mngr, step)) / 'ema').is_dir()


def _damaged(mngr: ocp.CheckpointManager, step: int, error: Exception) -> DamagedCheckpointError:
  return DamagedCheckpointError(
      f'Checkpoint {_step_dir(mngr, step)} cannot be read ({_reason(error)}): move that step directory out of '
      f'{str(mngr.directory)!r} to use the one before it, or write it again.')


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return str(epath.Path(mngr.directory) / str(step))


def first_line(error: BaseException) -> str:
  """`error`'s type and the first line of its message."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def _reason(error: BaseException) -> str:
  """The first line of the innermost error: TensorStore's outer message is a page of its spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else ''
  return f'{type(error).__name__}: {line[:300]}{"..." if len(line) > 300 else ""}'


def _merged(config: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  """The defaults overridden by a saved config (a converted checkpoint may hold little but `model`)."""
  for k, v in saved.items():
    if isinstance(v, dict) and isinstance(config.get(k), ml_collections.ConfigDict):
      _merged(config[k], v)
    else:
      with config.unlocked():
        config[k] = v
  return config


def _existing(directory: str) -> ocp.CheckpointManager:
  """A manager of `directory` that only reads: it creates nothing and cleans nothing up beside a run writing there.

  (Orbax's read_only option does the same, with a warning at every start.)
  """
  storage.quiet_background_io()  # a read of a step that a run prunes meanwhile fails in Orbax's threads
  mngr = None
  for attempt in range(_READ_ATTEMPTS):
    try:
      mngr = manager(directory, create=False) if epath.Path(directory).is_dir() else None
      break
    except (FileNotFoundError, NotADirectoryError):  # Orbax reads each listed step: a run pruned one meanwhile
      if attempt == _READ_ATTEMPTS - 1:
        raise
  if mngr is None or mngr.latest_step() is None:
    raise errors.NotFound(
        f'No checkpoint in {directory!r}: expected a training workdir\'s checkpoints/ or the output of '
        '`python -m tarflow_jax.convert`.')
  return mngr


def check_same_architecture(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                            directory: str, hint: str = 'Use a new --workdir for this config, or the config the '
                            'checkpoint was trained with.') -> None:
  """Raises errors.UserError unless the checkpoint's model has the architecture of `config.model`."""
  theirs, ours = config_lib.architecture(saved.model), config_lib.architecture(config.model)
  diffs = [f'{k}: checkpoint {theirs[k]!r}, config {ours[k]!r}' for k in config_lib.ARCHITECTURE_FIELDS
           if theirs[k] != ours[k]]
  if diffs:
    raise errors.UserError(f'The checkpoint in {directory!r} is of another architecture ({"; ".join(diffs)}). '
                           f'{hint}')


def _items(state: dict) -> dict:
  """A train state {'variables', 'opt', 'step', 'rng'[, 'ema']} as the checkpoint items 'model', 'train'[, 'ema']."""
  items = {'model': state['variables'], 'train': {k: state[k] for k in ('opt', 'step', 'rng')}}
  if 'ema' in state:
    items['ema'] = state['ema']
  return items


class TrainCheckpointer:
  """Checkpoints of a training run in `{workdir}/checkpoints`, with the data iterators' positions."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(absolute(workdir), 'checkpoints')
    self._data_dir = epath.Path(absolute(workdir)) / 'data_state'
    self._damaged_dir = epath.Path(absolute(workdir)) / 'damaged_checkpoints'
    self._remove_half_written()
    self.mngr = manager(self.directory, max_to_keep=keep)
    self._last_good = self.mngr.latest_step()  # the newest step known to be written in full
    self._in_flight = None  # the step whose asynchronous save has not been seen to finish
    self._failed = False
    storage.quiet_background_io()

  def latest_step(self) -> Optional[int]:
    return self.mngr.latest_step()

  @property
  def last_good(self) -> Optional[int]:
    """The newest step known to be written in full (None before the first)."""
    return self._last_good

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        self.mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)

  def save(self, step: int, state: dict, config: ml_collections.ConfigDict, batches=None) -> None:
    """Saves the train state (`train.init_state`) asynchronously, and the data position.

    Raises errors.NonFinite, writing and pruning nothing, if the state is not finite; and
    CheckpointWriteError if the file system refuses this step or the one still being written
    (whose files are then removed; older steps stay as they are).
    """
    if not bool(_all_finite(state)):
      raise errors.NonFinite(f'Checkpoint {step} was not written: its parameters or optimiser state are not '
                             f'finite. The checkpoints in {self.directory!r} are as they were.')
    self._finish_in_flight()
    items = {name: ocp.args.StandardSave(item) for name, item in _items(state).items()}
    with self._writing(step):
      self.mngr.save(step, args=ocp.args.Composite(**items, config=ocp.args.JsonSave(json.loads(config.to_json()))),
                     force=True)
      self._in_flight = step
      if batches is not None:
        batches.save(self._data_path(step))
    self._prune_data_states(keep=step)

  def restore(self, step: int, abstract_state: dict, batches=None) -> dict:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings).

    A state with 'ema' from a checkpoint without one (saved with config.ema_decay = 0) starts the
    average at the restored parameters; a checkpoint's 'ema' that the state has no place for is not read.
    """
    items = _items(abstract_state)
    start_ema = 'ema' in items and not has_ema(self.mngr, step)
    if start_ema:
      del items['ema']
    restored = self.mngr.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(item) for name, item in items.items()}))
    state = {'variables': restored.model, **restored.train}
    if 'ema' in items:
      state['ema'] = restored.ema
    elif start_ema:
      logging.warning('Checkpoint %d holds no moving average of the parameters (it was saved with ema_decay=0): '
                      'the average starts at its parameters.', step)
      copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=jax.tree.map(
          lambda a: a.sharding, abstract_state['ema']))
      state['ema'] = copy(state['variables']['params'])
    if batches is not None:
      if epath.Path(self._data_path(step) + '.index').exists():
        batches.restore(self._data_path(step))
      else:
        logging.warning('No input position saved for step %d (%s is missing): the input pipeline starts afresh, '
                        'so this run sees other batches, in another order, than an uninterrupted run would; the '
                        'model and optimiser state are restored exactly.', step, self._data_path(step))
    return state

  def restore_latest(self, abstract_state: dict, batches=None,
                     check_config=None) -> tuple[Optional[int], Optional[dict]]:
    """Restores the newest checkpoint that can be read: (step, state), or (None, None) if there is none.

    Newer steps that cannot be read (truncated or missing files) are moved, with a warning naming each,
    to `{workdir}/damaged_checkpoints/`, never deleted: left in place they would collide with this run's
    saves and outlive the intact steps when old checkpoints are pruned. A step counts as damaged only
    once an older one restores onto the same target; if none does, raises DamagedCheckpointError
    naming the newest and changes nothing.

    Args:
      abstract_state: as for `restore`.
      batches: the training data iterator, restored to the step's position.
      check_config: called with each candidate's saved config; raises to refuse it (another architecture).
    """
    damaged = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      # Orbax and TensorStore report unreadable files as Exception, ValueError, KeyError or JSON
      # errors alike; the older step restoring below is what tells damage from a wrong target.
      try:
        saved = self.saved_config(step)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        continue
      if check_config is not None:
        check_config(saved)
      try:
        state = self.restore(step, abstract_state, batches)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        continue
      for bad, error in damaged:
        self._set_aside(bad, error, resume_step=step)
      if damaged:
        self.mngr.reload()
      self._last_good = step
      return step, state
    if damaged:
      step, error = damaged[0]
      raise DamagedCheckpointError(
          f'Cannot resume: checkpoint {_step_dir(self.mngr, step)} cannot be read ({_reason(error)}), nor can any '
          f'older one. Nothing was changed; restore those files, or move {self.directory!r} away to train from '
          'step 0.') from error
    return None, None

  def _set_aside(self, step: int, error: Exception, resume_step: int) -> None:
    """Moves a damaged step (and its data position) to `damaged_checkpoints/`, on process 0."""
    source = epath.Path(_step_dir(self.mngr, step))
    target = self._damaged_dir / str(step)
    n = 1
    while target.exists():
      n += 1
      target = self._damaged_dir / f'{step}.{n}'
    logging.warning('Checkpoint %s cannot be read (%s): moved to %s, and resuming from step %d, the newest intact '
                    'checkpoint.', source, _reason(error), target, resume_step)
    if jax.process_index() == 0:
      self._damaged_dir.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      if (self._data_dir / str(step)).exists():
        (self._data_dir / str(step)).rename(target.parent / f'{target.name}.data_state')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'damaged checkpoint {step} moved')

  def wait(self) -> None:
    """Waits for the asynchronous save; raises CheckpointWriteError if it failed."""
    self._finish_in_flight()

  def close(self) -> None:
    """Waits for the last save (raising CheckpointWriteError if it failed) and closes the manager."""
    self._finish_in_flight()
    if not self._failed:  # after a failed save Orbax's close would raise it again; its writers are done
      self.mngr.close()

  def _finish_in_flight(self) -> None:
    if self._in_flight is None:
      return
    with self._writing(self._in_flight):
      self.mngr.wait_until_finished()
    self._last_good, self._in_flight = self._in_flight, None

  @contextlib.contextmanager
  def _writing(self, step: int):
    """Turns a failed write of `step` into CheckpointWriteError, once its half-written files are gone.

    Whatever the cause, Orbax's writer threads are waited for and the step's files removed, so that
    no write is left running and older steps stay as they are; a cause that is not the file
    system's (a bug) keeps its own exception.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      cause = storage.write_failure_cause(e)
      message = cause and self._failure_message(step, cause)  # the free space before the step's files go
      self._abandon(step)
      if cause is None:
        raise
      raise CheckpointWriteError(message) from e

  def _abandon(self, step: int) -> None:
    """After a failed save of `step`: waits for Orbax's writers, then removes what they wrote of `step`."""
    self._failed, self._in_flight = True, None
    try:
      self.mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # the failure being reported
      pass
    storage.join_background_writers()
    if jax.process_index() == 0:
      directory = epath.Path(self.directory)
      for path in [directory / str(step), *directory.glob(f'{step}{ocp.path.atomicity.TMP_DIR_SUFFIX}*'),
                   self._data_dir / str(step)]:
        with contextlib.suppress(OSError):
          path.rmtree(missing_ok=True)

  def _failure_message(self, step: int, cause: str) -> str:
    workdir = os.path.dirname(self.directory)
    if self._last_good is None:
      last = 'no checkpoint had been written yet, so rerunning starts from the beginning'
    else:
      last = (f'the last good checkpoint is step {self._last_good} ({_step_dir(self.mngr, self._last_good)}), '
              f'from which rerunning the same command resumes')
    space = storage.free_space(workdir)
    return (f'Checkpoint {step} could not be written to --workdir={workdir}: {cause}{f" ({space})" if space else ""}. '
            f'Training stopped and that step was removed; {last}. {storage.what_to_do(cause)}')

  def _remove_half_written(self) -> None:
    """Deletes the `<step>.orbax-checkpoint-tmp-*` directories that a killed run left, on process 0.

    Orbax's own `cleanup_tmp_directories` runs in a background thread that only a save waits for;
    this is done before the run starts. Finished steps are never touched.
    """
    directory = epath.Path(self.directory)
    if jax.process_index() != 0 or not directory.is_dir():
      return
    for path in directory.glob(f'*{ocp.path.atomicity.TMP_DIR_SUFFIX}*'):
      logging.info('Removing %s, a checkpoint that an interrupted run left half-written.', path)
      path.rmtree()

  def _data_path(self, step: int) -> str:
    return str(self._data_dir / str(step) / f'process_{jax.process_index()}')

  def _prune_data_states(self, keep: int) -> None:
    """Drops the data positions of checkpoints that Orbax no longer keeps."""
    if not self._data_dir.is_dir():
      return
    kept = {str(s) for s in self.mngr.all_steps()} | {str(keep)}
    for path in self._data_dir.iterdir():
      if path.name not in kept:
        path.rmtree(missing_ok=True)
