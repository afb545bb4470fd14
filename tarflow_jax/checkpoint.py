"""Orbax checkpoints: the model's variables, the training state and the config, per step.

A checkpoint directory is an Orbax `CheckpointManager` directory whose steps
hold up to three items:
  'model':  {'params', 'prior'}, everything needed to sample or evaluate;
  'train':  optimiser state, step and RNG (absent in converted checkpoints);
  'config': the experiment's config as JSON.
Tools that only sample or evaluate restore 'model' and 'config'.
"""

import json
import os
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from tarflow_jax import model as model_lib


def manager(directory: str, max_to_keep: Optional[int] = None, **options) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with the items above."""
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, **options),
      item_names=('model', 'train', 'config'))


def save_model(directory: str, variables, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Writes variables {'params', 'prior'} and the config as checkpoint `step` of `directory`."""
  mngr = manager(directory)
  mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables),
                                          config=ocp.args.JsonSave(json.loads(config.to_json()))))
  mngr.wait_until_finished()
  mngr.close()


def load_config(directory: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config stored with checkpoint `step` (the latest by default)."""
  mngr = _existing(directory)
  step = mngr.latest_step() if step is None else step
  config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  return ml_collections.ConfigDict(config)


def load_model(directory: str, step: Optional[int] = None):
  """Restores (model, variables, config) from a checkpoint directory (latest step by default)."""
  mngr = _existing(directory)
  step = mngr.latest_step() if step is None else step
  config = ml_collections.ConfigDict(
      mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
  model = model_lib.from_config(config.model)
  abstract = model_lib.abstract_variables(model)
  restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
  return model, restored.model, config


def _existing(directory: str) -> ocp.CheckpointManager:
  mngr = manager(directory) if os.path.isdir(directory) else None
  if mngr is None or mngr.latest_step() is None:
    raise FileNotFoundError(
        f'No checkpoint in {directory!r}: expected a training workdir\'s checkpoints/ or the output of '
        '`python -m tarflow_jax.convert`.')
  return mngr
