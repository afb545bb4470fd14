r"""Converts between official PyTorch TarFlow state dicts (apple/ml-tarflow) and our checkpoints, both ways.

Import: a reference `.pth` / `.npz` into a checkpoint directory, for a config of the same architecture:

  python -m tarflow_jax.cli.convert --config=configs/afhq256.py \
      --checkpoint=afhq_model_8_768_8_8_0.07.pth --output=/tmp/afhq256

Export: a checkpoint (a training workdir, its checkpoints/, or a converted checkpoint) into a state dict
that the reference's `Model.load_state_dict(..., strict=True)` takes; an --output ending in .pth or
.npz is an export, and the checkpoint carries its own architecture (no --config):

  python -m tarflow_jax.cli.convert --checkpoint=runs/demo --output=demo.pth

A checkpoint trained with a moving average of its parameters (config.ema_decay > 0) exports the
average, as sampling and evaluation use it; --raw_weights exports the trained parameters.

The import's output (Orbax checkpoint plus its config) is what the sampling and evaluation command
lines read. Every key and shape is checked against the config's architecture (reference.from_reference).
"""

import os

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from tarflow_jax import checkpoint, errors, reference, state_dict
from tarflow_jax import model as model_lib
from tarflow_jax.cli import _common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Import: config file whose `model` fields match the checkpoint.',
                                lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Import: a reference state dict (.pth or .npz). Export: a training workdir, '
                    'its checkpoints/, or a converted checkpoint.')
flags.DEFINE_string('output', None, 'Import: the checkpoint directory to write. Export: the .pth or .npz to write.')
flags.DEFINE_bool('overwrite', False, 'Replace the checkpoint or file that --output already holds.')
flags.DEFINE_bool('raw_weights', False, 'Export: the trained parameters, not their moving average (where the '
                  'checkpoint has one: config.ema_decay > 0).')
flags.mark_flags_as_required(['checkpoint', 'output'])


def _is_state_dict_file(path: str) -> bool:
  return path.endswith(state_dict.STATE_DICT_SUFFIXES)


def import_state_dict() -> None:
  """--checkpoint (.pth / .npz) into the checkpoint directory --output, for --config's architecture."""
  if FLAGS.config is None:
    raise errors.UserError(f'--config is needed to import {FLAGS.checkpoint!r}: a config file whose model fields '
                           'match the checkpoint (or, to export a checkpoint directory, an --output ending .pth '
                           'or .npz).')
  config = FLAGS.config
  model = model_lib.from_config(config.model)
  variables = reference.load_reference_checkpoint(model, FLAGS.checkpoint)
  checkpoint.save_model(FLAGS.output, variables, config, overwrite=FLAGS.overwrite)
  print(f'Wrote {FLAGS.output}: {sum(np.size(v) for v in jax.tree.leaves(variables["params"])):,} parameters.')


def export_checkpoint() -> None:
  """The checkpoint directory --checkpoint into the reference state dict --output (.pth / .npz)."""
  if FLAGS.config is not None:
    raise errors.UserError('--config is not used to export: the checkpoint directory carries its architecture. '
                           'Drop --config.')
  if _is_state_dict_file(FLAGS.checkpoint) or os.path.isfile(FLAGS.checkpoint):
    raise errors.UserError(f'--checkpoint={FLAGS.checkpoint} is a file; exporting (an --output ending .pth or .npz) '
                           'reads a checkpoint directory: a training workdir, its checkpoints/, or a converted one.')
  model, variables, _ = checkpoint.load_model(FLAGS.checkpoint, raw_weights=FLAGS.raw_weights)
  state = reference.export_reference_checkpoint(model, variables, FLAGS.output, overwrite=FLAGS.overwrite)
  args = ', '.join(f'{k}={v!r}' for k, v in reference.reference_model_args(model.spec).items())
  print(f'Wrote {FLAGS.output}: {len(state)} tensors, {sum(np.size(v) for v in state.values()):,} values, for the '
        f'reference\'s Model({args}).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _is_state_dict_file(FLAGS.output):
    export_checkpoint()
  elif os.path.isdir(FLAGS.checkpoint):
    raise errors.UserError(f'--checkpoint={FLAGS.checkpoint} is a directory: to export it, end --output with .pth or '
                           '.npz; to import, --checkpoint is a reference .pth or .npz file.')
  else:
    import_state_dict()


def run():
  _common.run(main)


if __name__ == '__main__':
  run()
