"""Where a training run starts other than afresh: given weights (config.init_from), a reference run's optimiser.

`load_variables` reads the weights to fine-tune from: a reference state dict (`.pth`, or an
`.npz` of its keys) or one of our checkpoint directories, checked against the config's
architecture. `reference_optimizer_state` reads the optimiser file that apple/ml-tarflow's
train.py saves beside its model (`{dataset}_opt_{name}.pth`: torch AdamW's state dict and the
learning-rate schedule's counter) into our optax state, so that a PyTorch run continues here.
"""

import os
import re
from typing import Mapping

import jax
import ml_collections
import numpy as np
import optax

from tarflow_jax import checkpoint, errors, reference, state_dict
from tarflow_jax import model as model_lib

# The reference model's buffers: in its state dict, absent from `model.parameters()` (the optimiser's order).
_BUFFER = re.compile(r'var|blocks\.\d+\.attn_mask')


def load_variables(config: ml_collections.ConfigDict, path: str, shardings) -> dict:
  """The variables {'params', 'prior'} at `path`, for `config.model`, placed on `shardings`.

  Args:
    config: the training config; its model fields must be the architecture of the weights.
    path: a reference `.pth` / `.npz` state dict, or a checkpoint directory (a training workdir, its
      checkpoints/, a converted checkpoint), whose moving average of the parameters is used where it has one.
    shardings: the shardings of the train state's 'variables'.
  Raises:
    errors.UserError: no such file, or weights of another architecture.
  """
  if os.path.isdir(path) or '://' in path:
    hint = 'Set the config\'s model fields to those of the checkpoint, or give config.init_from another checkpoint.'
    check = lambda saved: checkpoint.check_same_architecture(saved, config, path, hint)
    try:
      return checkpoint.load_model(path, shardings=shardings, check_config=check)[1]
    except FileNotFoundError as e:
      raise errors.UserError(f'config.init_from={path!r}: {e}') from e
  if not os.path.exists(path):
    raise errors.UserError(f'config.init_from={path!r}: no such file or directory; give a reference .pth, an .npz '
                           'of its keys, or a checkpoint directory.')
  try:
    variables = reference.load_reference_checkpoint(model_lib.from_config(config.model), path)
  except reference.ArchitectureMismatch as e:
    first = str(e).splitlines()[0]
    raise errors.UserError(f'config.init_from={path!r}: {first} Set the config\'s model fields to the architecture '
                           'of those weights.') from e
  return jax.device_put(variables, shardings)


def reference_optimizer_state(config: ml_collections.ConfigDict, path: str, variables, abstract_opt):
  """A reference run's optimiser file as our optimiser state and step: (opt, step).

  The file is what apple/ml-tarflow's train.py saves: {'optimizer': torch AdamW state dict,
  'lr_schedule': {'counter'}} (a bare AdamW state dict is read too; its step then counts the
  schedule's steps). Torch's `exp_avg` / `exp_avg_sq` of the i-th parameter of `model.parameters()`
  become optax's `mu` / `nu` (converted as the weights are, so transposed for Dense kernels), torch's
  per-parameter `step` the Adam count (bias correction), and the schedule's counter the schedule's
  count and the train state's step. The config's schedule must be the run's (warm-up, total steps)
  for the learning rate to go on as it would have.

  Args:
    config: the training config; its AdamW betas and weight decay must be the file's.
    path: the optimiser file (`.pth`, needs torch).
    variables: the run's model weights (`load_variables` of its model file), numpy or jax arrays.
    abstract_opt: the optimiser state's structure (the train state's 'opt', abstract or concrete).
  Returns:
    (opt, step): the optimiser state as numpy arrays with the structure of `abstract_opt`, and the step.
  Raises:
    errors.UserError: no file, not an AdamW state of this model, or other optimiser hyperparameters.
  """
  saved = _read_torch(path)
  adamw = saved.get('optimizer', saved)
  if not isinstance(adamw, Mapping) or 'state' not in adamw or 'param_groups' not in adamw:
    raise errors.UserError(f'config.init_optimizer_from={path!r} holds no optimiser state dict (keys "state" and '
                           '"param_groups"); give the reference\'s *_opt_*.pth.')
  group = _one_group(adamw, config, path)
  model = model_lib.from_config(config.model)
  ref = reference.to_reference(model, variables)  # in the reference's order: its parameters and buffers
  keys = [k for k in ref if not _BUFFER.fullmatch(k)]  # model.parameters(), the optimiser's indices
  if sorted(group['params']) != list(range(len(keys))):
    raise errors.UserError(f'config.init_optimizer_from={path!r} holds the state of {len(group["params"])} '
                           f'parameters; the model has {len(keys)}: the optimiser file of another model.')
  moments, steps = {'exp_avg': {}, 'exp_avg_sq': {}}, set()
  for i, key in enumerate(keys):
    state = adamw['state'].get(i)
    if state is None:
      raise errors.UserError(f'config.init_optimizer_from={path!r} has no state for parameter {i} ({key}): '
                             'a run continues only from a file saved after its first step.')
    for name, values in moments.items():
      values[key] = _numpy(state[name])
      if values[key].shape != ref[key].shape:
        raise errors.UserError(f'config.init_optimizer_from={path!r}: {name} of parameter {i} ({key}) has shape '
                               f'{values[key].shape}, the weights {ref[key].shape}: the optimiser file of another '
                               'model.')
    steps.add(int(_numpy(state['step'])))
  if len(steps) != 1:
    raise errors.UserError(f'config.init_optimizer_from={path!r}: its parameters were updated different numbers '
                           f'of times ({sorted(steps)}); one AdamW step count is needed.')
  adam_count = steps.pop()
  schedule_count = int(_numpy(saved['lr_schedule']['counter'])) if 'lr_schedule' in saved else adam_count
  mu, nu = (reference.from_reference(model, {**ref, **values})['params'] for values in moments.values())
  return _with_adam(abstract_opt, mu, nu, adam_count, schedule_count), schedule_count


def _read_torch(path: str) -> Mapping:
  if not os.path.exists(path):
    raise errors.UserError(f'config.init_optimizer_from={path!r}: no such file.')
  try:
    saved = state_dict.load_torch(path)
  except ValueError as e:
    raise errors.UserError(f'config.init_optimizer_from: {e}') from e
  if not isinstance(saved, Mapping):
    raise errors.UserError(f'config.init_optimizer_from={path!r} does not hold a dict; give the reference\'s '
                           '*_opt_*.pth.')
  return saved


def _one_group(adamw: Mapping, config: ml_collections.ConfigDict, path: str) -> Mapping:
  """The state dict's one parameter group, after checking its hyperparameters against the config's AdamW."""
  groups = adamw['param_groups']
  if len(groups) != 1:
    raise errors.UserError(f'config.init_optimizer_from={path!r} has {len(groups)} parameter groups; the '
                           'reference trains every parameter in one.')
  group = groups[0]
  if group.get('amsgrad'):
    raise errors.UserError(f'config.init_optimizer_from={path!r} is an AMSGrad state; train.optimizer is AdamW.')
  o = config.optim
  ours = {'betas': (o.b1, o.b2), 'eps': 1e-8, 'weight_decay': o.weight_decay}
  for name, want in ours.items():
    got = tuple(group[name]) if name == 'betas' else group[name]
    if not np.allclose(got, want, rtol=1e-6, atol=0):
      raise errors.UserError(f'config.init_optimizer_from={path!r} was trained with {name}={got}, the config has '
                             f'{want}: set config.optim to the run\'s AdamW (b1, b2, weight_decay) to continue it.')
  return group


def _numpy(value) -> np.ndarray:
  return value.detach().float().numpy() if hasattr(value, 'detach') else np.asarray(value, np.float32)


def _with_adam(opt, mu, nu, adam_count: int, schedule_count: int):
  """`opt` with its Adam moments and count, and its schedule's count, replaced."""
  found = []

  def replace(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node)
      return node._replace(count=np.int32(adam_count), mu=mu, nu=nu)
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=np.int32(schedule_count))
    return node

  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
  opt = jax.tree.map(replace, opt, is_leaf=lambda n: isinstance(n, kinds))
  assert len(found) == 1, f'train.optimizer has {len(found)} Adam states, expected one'
  return opt
