"""Training: noise augmentation, the jitted step over a device mesh, checkpoints, metrics and samples."""

import contextlib
import functools
import glob
import os
import signal
import threading
from typing import Callable, NamedTuple, Optional

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from tarflow_jax import checkpoint, config_lib, data, errors, evaluation, finetune, images, iterative_sampling
from tarflow_jax import likelihood, noise_levels, sampling, sharding, storage, workdir_lock, xla_cpu
from tarflow_jax import model as model_lib


def schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from min_lr over `warmup_epochs`, then cosine decay to min_lr at `total_steps`."""
  o = config.optim
  warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(o.min_lr, o.lr, warmup, total_steps, end_value=o.min_lr)


def optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """AdamW as the reference (torch defaults: eps 1e-8, decay on every parameter), optional clipping."""
  o = config.optim
  adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw


def init_state(model: model_lib.TarFlow, tx: optax.GradientTransformation, seed: int, ema: bool = False,
               variables: dict | None = None) -> dict:
  """The train state, a plain dict of arrays: {'variables': {'params', 'prior'}, 'opt', 'step', 'rng'[, 'ema']}.

  'variables' is what the model applies and checkpoint item 'model' holds; 'opt', 'step' and
  'rng' are checkpoint item 'train'; 'ema', the moving average of the parameters (with `ema`,
  starting at them), is item 'ema' (`checkpoint.TrainCheckpointer`).

  Args:
    model, tx, seed: the model, the optimiser, the seed of the initialisation and of the training noise.
    ema: whether the state keeps a moving average of the parameters.
    variables: start from these variables (fine-tuning) instead of freshly initialised ones.
  """
  rng = jax.random.PRNGKey(seed)
  if variables is None:
    variables = model_lib.init_variables(model, jax.random.fold_in(rng, 0))
  state = {'variables': variables, 'opt': tx.init(variables['params']),
           'step': jnp.zeros((), jnp.int32), 'rng': jax.random.fold_in(rng, 1)}
  if ema:
    state['ema'] = jax.tree.map(jnp.copy, variables['params'])
  return state


def sampling_variables(state: dict) -> dict:
  """The variables that sampling and evaluation use: the moving average of the parameters where the state has one."""
  if 'ema' not in state:
    return state['variables']
  return {**state['variables'], 'params': state['ema']}


def model_inputs(batch: dict, rng: jax.Array, config: ml_collections.ConfigDict, train: bool = True):
  """uint8 images (B, H, W, C) to the flow's inputs on [-1, 1] with the training noise; labels.

  Gaussian noise of std `noise.std` (or, with `noise.type == 'uniform'`, uniform
  dequantisation); a fraction `label_drop` of labels replaced by -1.
  """
  noise_rng, drop_rng = jax.random.split(rng)
  shape = batch['image'].shape
  if config.noise.type == 'uniform':
    x = likelihood.dequantize(batch['image'].astype(jnp.float32), jax.random.uniform(noise_rng, shape))
  elif config.noise.type == 'gaussian':
    x = images.from_uint8(batch['image']) + config.noise.std * jax.random.normal(noise_rng, shape)
  else:
    raise errors.UserError(f'Unknown noise.type {config.noise.type!r}: use "gaussian" or "uniform".')
  return x, _labels(batch, drop_rng, config, train)


def _labels(batch: dict, rng: jax.Array, config: ml_collections.ConfigDict, train: bool):
  """Labels (B,) with a fraction `label_drop` replaced by -1 in training; None for an unconditional model."""
  if not config.model.num_classes:
    return None
  y = batch['label'].astype(jnp.int32)
  if train and config.label_drop > 0:
    y = jnp.where(jax.random.uniform(rng, y.shape) < config.label_drop, -1, y)
  return y


def noise_conditioned_inputs(batch: dict, rng: jax.Array, config: ml_collections.ConfigDict):
  """iTARFlow's training inputs from uint8 images (B, H, W, C): (x + t eps, labels, t (B,), loss weights (B,)).

  t is drawn per image in [t0, t1] (`noise_levels.draw`, `config.itarflow`); labels as `model_inputs`.
  """
  level_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  s = config.itarflow
  x = images.from_uint8(batch['image'])
  t = noise_levels.draw(level_rng, x.shape[0], s.t0, s.t1, s.t_sample)  # (B,)
  x = x + t[:, None, None, None] * jax.random.normal(noise_rng, x.shape)
  return x, _labels(batch, drop_rng, config, True), t, noise_levels.loss_weights(t, s.t0, s.t1, s.reweight)


def train_step(state: dict, batch: dict, *, model, tx, config, lr: optax.Schedule, augment: bool = True):
  """One optimiser step; a step with a non-finite loss, gradient or new state leaves the state unchanged.

  A state with 'ema' updates the moving average of the parameters with the new parameters,
  ema <- d * ema + (1 - d) * params at d = config.ema_decay. The average is not debiased: it starts
  at the initial (or fine-tuned-from) parameters, which keep the weight d**n after n steps. Debiasing
  (dividing by 1 - d**n, as Adam does its moments) would drop them, which is wrong for fine-tuning,
  and differs from the plain average only over the first few 1 / (1 - d) steps.

  With `config.grad_accum_steps = k > 1` the batch's gradient is accumulated over k micro-batches
  of B / k examples, one after the other (activation memory of one micro-batch): the same update
  as one step over the whole batch.

  Args:
    state: the train state (`init_state`).
    batch: {'image': (B, H, W, C), 'label': (B,)}; with `config.model.noise_conditioning` and not
      `augment`, also 'noise_level' (B,) and 'loss_weight' (B,).
    augment: True: 'image' holds uint8 pixels, turned into the model's input by `model_inputs`
      (training noise, label drop; iTARFlow's `noise_conditioned_inputs` for a noise-conditioned model). False: 'image' is the model's float input on [-1, 1] exactly
      as given (NHWC) and 'label' the labels as given (-1 = dropped); no noise or label drop, and
      the state's rng is not used (to replay recorded inputs).
    model, tx, config, lr: the model, optimiser, config and learning-rate schedule.
  Returns:
    The new state and scalar metrics.
  """
  rng = jax.random.fold_in(state['rng'], state['step'])
  t = weights = None  # noise levels and loss weights (B,), for a noise-conditioned model
  if augment and config.model.noise_conditioning:
    x, y, t, weights = noise_conditioned_inputs(batch, rng, config)
  elif augment:
    x, y = model_inputs(batch, rng, config)
  else:
    x = batch['image']
    y = batch['label'].astype(jnp.int32) if config.model.num_classes else None
    if config.model.noise_conditioning:
      t, weights = batch['noise_level'], batch['loss_weight']

  prior = state['variables']['prior']

  def loss_fn(params, x, y, t, weights):
    z, logdets, outputs = model.apply({'params': params, 'prior': prior}, x, y, t)
    stats = {'z2': jnp.mean(jax.lax.stop_gradient(z) ** 2, axis=0), 'logdet': jnp.mean(logdets),
             'latent_norms': [jnp.mean(o**2) for o in outputs]}
    return likelihood.loss(z, logdets, weights), stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  k = config.get('grad_accum_steps', 1)
  params = state['variables']['params']
  if k == 1:
    (loss, stats), grads = grad_fn(params, x, y, t, weights)
  else:
    (loss, stats), grads = _accumulate(grad_fn, params, (x, y, t, weights), k)
  updates, opt = tx.update(grads, state['opt'], params)
  params = optax.apply_updates(params, updates)
  if not config.model.nvp:  # running average of E[z^2] per token and dim, as the reference
    prior = {'var': prior['var'] + config.prior_var_lr * (stats['z2'] - prior['var'])}
  grad_norm = optax.tree.norm(grads)
  new = {'variables': {'params': params, 'prior': prior}, 'opt': opt, 'step': state['step'] + 1,
         'rng': state['rng']}
  if 'ema' in state:
    d = config.ema_decay
    new['ema'] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state['ema'], params)
  # A finite gradient can still overflow in the update (a huge learning rate, an Adam moment past
  # float32's range): such a step must not reach the state, or the next checkpoint holds it.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & checkpoint.all_finite(new)
  new = keep_if_finite(finite, new, {**state, 'step': state['step'] + 1})
  metrics = {
      'loss': loss, 'loss/mse_z': 0.5 * jnp.mean(stats['z2']), 'loss/logdet': stats['logdet'],
      'grad_norm': grad_norm, 'lr': lr(state['step']), 'finite': finite.astype(jnp.float32),
      **{f'latent_norm/block{i}': n for i, n in enumerate(stats['latent_norms'])},
  }
  if config.noise.type == 'uniform':  # the loss is then a bound on the bits/dim of the 8-bit data
    metrics['bits_per_dim'] = likelihood.to_bits_per_dim(loss + likelihood.GAUSS_CONST)
  return new, metrics


@xla_cpu.replaced_on_cpu('finite_guard', xla_cpu.keep_if_finite)
def keep_if_finite(finite: jax.Array, new: dict, keep: dict) -> dict:
  """`new` where the scalar `finite` is true, else `keep` (two trees of the same structure), leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, keep)


def _accumulate(grad_fn, params, inputs: tuple, k: int):
  """The mean over k micro-batches of `grad_fn(params, *inputs_i)`: ((loss, stats), grads).

  `inputs` are arrays (B, ...) or None. Micro-batch i holds examples i, i + k, ...
  (`sharding.split_microbatches`). Every output of `grad_fn` is a mean over its examples, so the
  mean over equal micro-batches is the value of the whole batch.
  """
  micro = tuple(None if a is None else sharding.split_microbatches(a, k) for a in inputs)  # (k, B / k, ...)
  first = jax.eval_shape(grad_fn, params, *(None if a is None else a[0] for a in micro))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)

  def add(total, inputs_i):
    return jax.tree.map(jnp.add, total, grad_fn(params, *inputs_i)), None

  total, _ = jax.lax.scan(add, zeros, micro)
  return jax.tree.map(lambda t: t / k, total)


class Program(NamedTuple):
  """What a training run compiles, from `build`: training and the ahead-of-time compile share it."""
  model: model_lib.TarFlow
  abstract_state: dict  # ShapeDtypeStructs of `init_state`, with their shardings
  state_shardings: dict
  init: Callable[[], dict]  # jitted: a fresh state, on its shardings
  step: Callable[[dict, dict], tuple[dict, dict]]  # jitted `train_step` on the mesh; donates the state
  start_from: Callable[[dict], dict]  # jitted: a state from given variables (on their shardings), fresh optimiser


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, lr: optax.Schedule) -> Program:
  """The model, state shardings (FSDP rule) and the jitted init and step of `config` on `mesh` (AdamW at `lr`)."""
  model = model_lib.from_config(config.model)
  tx = optimizer(config, lr)
  init = functools.partial(init_state, model, tx, config.seed, config.ema_decay > 0)
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config, lr=lr),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  start_from = jax.jit(lambda variables: init(variables=variables), in_shardings=(shardings['variables'],),
                       out_shardings=shardings)
  return Program(model, abstract, shardings, jax.jit(init, out_shardings=shardings), step, start_from)


def initial_state(config: ml_collections.ConfigDict, program: Program) -> dict:
  """The state of a run that has no checkpoint yet, on the program's shardings.

  Fresh, or with config.init_from the weights there at step 0 with a fresh optimiser (and the
  moving average, if any, starting at them); with config.init_optimizer_from also the reference
  run's AdamW state, at its step (`finetune.reference_optimizer_state`).
  """
  if not config.init_from:
    return program.init()
  variables = finetune.load_variables(config, config.init_from, program.state_shardings['variables'])
  state = program.start_from(variables)
  if not config.init_optimizer_from:
    logging.info('Fine-tuning from %s with a fresh optimiser.', config.init_from)
    return state
  opt, step = finetune.reference_optimizer_state(config, config.init_optimizer_from, variables, state['opt'])
  logging.info('Continuing the reference run of %s and %s from its step %d.', config.init_from,
               config.init_optimizer_from, step)
  return {**state, 'opt': jax.device_put(opt, program.state_shardings['opt']),
          'step': jax.device_put(jnp.int32(step), program.state_shardings['step'])}


class _Preemption:
  """Picks the step at which training stops after a preemption notice (SIGTERM), the same on every process.

  One process: a SIGTERM handler sets a flag that the loop polls. Several processes: the preemption
  sync manager that `jax.distributed.initialize()` starts owns SIGTERM (its C++ notifier installs
  the process's handler), tells every process through the coordination service, and
  `reached_preemption_sync_point` turns True on all of them at the same step, so a signal to any
  one process stops them all there. A Python handler would replace JAX's, so none is installed then.
  """

  def __init__(self):
    self.requested = False
    self._coordinated = jax.process_count() > 1
    if self._coordinated and not jax.distributed.is_initialized():
      logging.warning('%d processes without jax.distributed: SIGTERM will not stop them at a common step. '
                      'Call jax.distributed.initialize() first (python -m tarflow_jax.main does).',
                      jax.process_count())
    self._previous = None if self._coordinated else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._coordinated:  # must be asked at every step, with the same steps on every process
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._coordinated:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(history: list, writer) -> None:
  """Raises at the first step whose loss, gradient or updated state was not finite."""
  for step, m in history:
    if not m['finite']:
      writer.flush()
      if np.isfinite(m['loss']) and np.isfinite(m['grad_norm']):
        what, hint = 'parameters or optimiser state after the update', 'lower optim.lr or set optim.grad_clip'
      else:
        what, hint = 'loss or gradient', 'check the data for NaN/Inf, or lower optim.lr / set optim.grad_clip'
      raise errors.NonFinite(
          f'Non-finite {what} at step {step} (loss={m["loss"]}, grad_norm={m["grad_norm"]}). Training stopped; '
          f'that step was not applied and the checkpoints on disk are as they were: {hint}.')


def _due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (every `every` steps, and at the last step) runs after `step`; never if every <= 0."""
  return every > 0 and (step % every == 0 or step == total)


def _steps(config, num_train_examples: int):
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
  return steps_per_epoch, total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, take_over_workdir: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  The run holds the workdir for itself (`workdir_lock`) from before its first write to its end.

  Args:
    config: the experiment.
    workdir: where checkpoints, logs and samples go.
    take_over_workdir: take the workdir from a run on another host that holds it (known to be dead).
  Returns:
    {'step': the step reached, 'train': the last logged training metrics, 'eval': {step: held-out
    bits/dim}} of this run.
  """
  config_lib.validate(config, jax.devices(), jax.process_count())
  lock = workdir_lock.acquire(workdir, take_over=take_over_workdir)
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  # The training stream's one reference, which `_teardown` lets go of on another thread.
  stream = [data.get_split(config, config.data.train_split, config.batch_size, train=True, seed=config.seed)]
  steps_per_epoch, total_steps = _steps(config, stream[0].num_examples)
  program = build(config, mesh, schedule(config, steps_per_epoch, total_steps))
  ckpt = checkpoint.TrainCheckpointer(workdir, config.keep_checkpoints)
  writer, preemption = None, _Preemption()
  try:
    state, start, resumed = _restore_or_init(config, program, ckpt, stream[0].batches, total_steps)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
    if not resumed:
      writer.write_hparams(_flat_hparams(config))
      params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state['variables']['params']))
      logging.info('Model: %s parameters; %d steps (%d per epoch), global batch %d on %d devices.',
                   f'{params:,}', total_steps, steps_per_epoch, config.batch_size, jax.device_count())
    actions = _Periodic(config, workdir, program.model, mesh, total_steps, ckpt, writer)
    if not resumed and config.eval_every > 0:
      actions.evaluate(start, state)
    step = _loop(state, start, program, mesh, stream[0].batches, total_steps, actions, preemption)
  except BaseException:
    _teardown(preemption, ckpt, writer, stream, raise_errors=False)  # the first error is the one to report
    raise
  _teardown(preemption, ckpt, writer, stream, raise_errors=True)
  return {'step': step, 'train': actions.last, 'eval': actions.evals}


def _restore_or_init(config, program: Program, ckpt: checkpoint.TrainCheckpointer, batches,
                     total_steps: int) -> tuple[dict, int, bool]:
  """The state to start from and its step: (state, step, resumed), from the newest intact checkpoint (the step
  its name gives), else `initial_state`."""
  start, state = ckpt.restore_latest(
      program.abstract_state, batches,
      check_config=lambda saved: checkpoint.check_same_architecture(saved, config, ckpt.directory))
  if start is not None:
    logging.info('Resumed from step %d of %s.', start, ckpt.directory)
    if config.init_from:
      logging.info('config.init_from=%s is not used: the run resumes from its own checkpoint.', config.init_from)
    return state, start, True
  state = initial_state(config, program)
  start = int(state['step'])
  if start >= total_steps:
    raise errors.UserError(f'The run given by config.init_optimizer_from is at step {start}, past this config\'s '
                           f'{total_steps} steps: set config.num_train_steps (or num_epochs) to the run\'s total.')
  return state, start, False


def _loop(state: dict, step: int, program: Program, mesh, batches, total_steps: int, actions: '_Periodic',
          preemption: '_Preemption') -> int:
  """Steps from `step` to `total_steps` (or a preemption notice), with the periodic actions.

  Returns:
    The step reached.
  """
  logging.info('Training from step %d to %d.', step, total_steps)
  while step < total_steps:
    batch = sharding.global_batch(mesh, next(batches))
    with jax.set_mesh(mesh):  # attention kernels split over the mesh (attention.causal_attention)
      state, metrics = program.step(state, batch)
    step += 1
    stop = preemption.reached(step)
    actions.after_step(step, state, metrics, batches, stop)
    if stop:
      logging.warning('Stopped at step %d after a preemption notice (SIGTERM); rerun the same command to resume.',
                      step)
      break
  return step


class _Periodic:
  """What a run does between steps when due (`_due`): metrics, checkpoints, sample grids, held-out bits/dim, FID.

  A write that storage refuses (a full disk) stops the run with storage.WriteError, which names the
  last good checkpoint.
  """

  def __init__(self, config, workdir: str, model, mesh, total_steps: int, ckpt: checkpoint.TrainCheckpointer,
               writer):
    self.config, self.workdir, self.model, self.mesh, self.total = config, workdir, model, mesh, total_steps
    self.ckpt, self.writer = ckpt, writer
    self.progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                    every_steps=config.log_every)
    self.sample_noise = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                                          (config.sample.num, model.num_tokens, model.token_dim))
    self.fid_of = evaluation.training_fid(config, model, mesh) if config.fid_every > 0 else None
    self.history, self.last, self.evals = [], {}, {}

  def after_step(self, step: int, state: dict, metrics: dict, batches: data.Batches, stop: bool) -> None:
    """After `step`; `batches`: the training stream, whose position a checkpoint holds; `stop`: a preemption
    notice, which logs and checkpoints now and skips the rest."""
    c = self.config
    self.history.append((step, metrics))
    with self._writing('the training metrics', step):
      self.progress(step)
    if stop or _due(step, c.log_every, self.total):
      self.log_metrics(step)
    if stop or _due(step, c.checkpoint_every, self.total):
      _check_finite([(s, jax.device_get(m)) for s, m in self.history], self.writer)
      self.ckpt.save(step, state, c, batches)
    if stop:
      return
    if _due(step, c.sample_every, self.total):
      self.write_samples(step, state)
    if _due(step, c.eval_every, self.total):
      self.evaluate(step, state)
    if _due(step, c.fid_every, self.total):
      with self.progress.timed('fid'):
        fid = self.fid_of(sampling_variables(state))
      with self._writing('the FID', step):
        self.writer.write_scalars(step, {'eval/fid': fid})

  def log_metrics(self, step: int) -> None:
    history = [(s, jax.device_get(m)) for s, m in self.history]
    _check_finite(history, self.writer)
    self.last = {k: float(np.mean([m[k] for _, m in history])) for k in history[-1][1] if k != 'finite'}
    with self._writing('the training metrics', step):
      self.writer.write_scalars(step, {f'train/{k}': v for k, v in self.last.items()})
    self.history = []

  def evaluate(self, step: int, state: dict) -> None:
    c = self.config
    with self.progress.timed('eval'):
      self.evals[step] = float(np.mean(evaluation.split_bits_per_dim(
          self.model, sampling_variables(state), c, self.mesh, c.data.eval_split,
          num_examples=c.data.num_eval_examples, batch_size=c.eval_batch_size, seed=c.seed + 2)))
      with self._writing('the held-out bits/dim', step):
        self.writer.write_scalars(step, {'eval/bits_per_dim': self.evals[step]})

  def write_samples(self, step: int, state: dict) -> None:
    with self.progress.timed('sample'):
      grid = images.grid(images.to_uint8(generate(self.model, state, self.config, self.sample_noise, self.mesh)))
      with self._writing('the sample grid', step):
        if jax.process_index() == 0:
          images.save_png(os.path.join(self.workdir, 'samples', f'step_{step:07d}.png'), grid)
        self.writer.write_images(step, {'samples': grid[None]})

  @contextlib.contextmanager
  def _writing(self, what: str, step: int):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if storage.write_failure_cause(e) is not None:
        self.ckpt.wait()  # the message names the last good checkpoint; a save failing too is the error to report
      raise _write_error(e, what, step, self.workdir, self.ckpt) from e


def _write_error(error: Exception, what: str, step: Optional[int], workdir: str, ckpt) -> Exception:
  """storage.WriteError for a write that storage refused, naming the last good checkpoint; else `error` itself."""
  cause = storage.write_failure_cause(error)
  if cause is None or isinstance(error, errors.UserError):
    return error
  last = ('no checkpoint was written yet' if ckpt.last_good is None else
          f'the last good checkpoint is step {ckpt.last_good}, from which rerunning the same command resumes')
  space = storage.free_space(workdir)
  return storage.WriteError(
      f'Could not write {what}{"" if step is None else f" of step {step}"} to --workdir={workdir}: {cause}'
      f'{f" ({space})" if space else ""}. Training stopped; {last}. {storage.what_to_do(cause)}')


def _teardown(preemption: '_Preemption', ckpt: checkpoint.TrainCheckpointer, writer, stream: list,
              raise_errors: bool) -> None:
  """Ends a run, finished or failed: waits for the last checkpoint, closes the metric writer, lets go of the
  training stream (`stream`, the split in a list that holds its one reference).

  All three are done whatever fails; then, with `raise_errors`, the first failure is raised
  (storage.WriteError where storage refused the write); otherwise (a run already failing with its
  own error) it is logged.
  """
  preemption.restore()
  failures = []
  for what, close in (('the last checkpoint', ckpt.close), ('the metrics', writer and writer.close)):
    try:
      if close is not None:
        close()
    except Exception as e:  # pylint: disable=broad-except
      failures.append((what, e))
  # Tearing down the training stream's tf.data iterator (its shuffle buffer, its prefetch threads)
  # takes from a second to half a minute, at random: a background thread does it, so that the run
  # ends at once. The command line then ends the process without waiting for it (_common.run).
  threading.Thread(target=stream.clear, name='release training data', daemon=True).start()
  if not failures:
    return
  what, error = failures[0]
  if not raise_errors:
    logging.warning('Also, while stopping, %s could not be written: %s', what,
                    storage.write_failure_cause(error) or checkpoint.first_line(error))
    return
  reported = _write_error(error, what, None, os.path.dirname(ckpt.directory), ckpt)
  if reported is error:
    raise error
  raise reported from error


def summary(workdir: str, result: dict, command: str = '') -> str:
  """The closing words of a training run: where it got to, where its outputs are, what to run next.

  Args:
    workdir: the run's --workdir.
    result: what `train_and_evaluate` returned.
    command: the command line that trained, named as the one that resumes.
  """
  workdir = os.path.abspath(workdir)
  lines = [f'Done: step {result["step"]}.']
  if result.get('eval'):
    step = max(result['eval'])
    lines[0] = f'Done: step {result["step"]}; held-out bits/dim {result["eval"][step]:.4f} (at step {step}).'
  grids = sorted(glob.glob(os.path.join(workdir, 'samples', 'step_*.png')))
  if grids:
    lines.append(f'  samples:      {grids[-1]}')
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoints):
    lines.append(f'  checkpoints:  {checkpoints}')
  if glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    lines.append(f'  TensorBoard:  tensorboard --logdir={workdir}')
  lines.append(f'Rerunning the same command resumes from the latest checkpoint{f": {command}" if command else "."}')
  lines += ['Next:',
            f'  python -m tarflow_jax.cli.sample --checkpoint={workdir} --output={workdir}/more_samples',
            f'  python -m tarflow_jax.cli.evaluate bpd --checkpoint={workdir}']
  return '\n'.join(lines)


def generate(model, state, config, noise, mesh) -> np.ndarray:
  """Samples from fixed noise with the config's guidance and, after Gaussian-noise training, denoises
  (a noise-conditioned model: `iterative_sampling.sample` with the config's `itarflow` settings).

  With a moving average of the parameters in the state, samples with the average.
  """
  y = None
  if model.spec.num_classes:
    y = jnp.arange(noise.shape[0]) % model.spec.num_classes
  variables = sampling_variables(state)
  if noise.shape[0] % mesh.size == 0:
    noise = jax.device_put(noise, sharding.batch_sharding(mesh))
  if model.spec.noise_conditioning:
    guidance, denoising = iterative_sampling.from_config(config)
    with jax.set_mesh(mesh):
      x = iterative_sampling.sample(model, variables, noise, y, guidance=guidance, denoising=denoising,
                                    rng=jax.random.key(config.seed + 2))
    return sharding.fetch(x)
  x = sampling.sample(model, variables, noise, y, guidance=sampling.guidance_from_config(config))
  denoising = sampling.denoising_from_config(config)
  if denoising.enabled:
    with jax.set_mesh(mesh):
      x = sampling.denoise(model, variables, x, y, sigma=denoising.sigma, step_scale=denoising.step_scale)
  return sharding.fetch(x)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  walk(config.to_dict(), '')
  return out
