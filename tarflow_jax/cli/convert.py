r"""Converts an official PyTorch TarFlow checkpoint (apple/ml-tarflow) into a checkpoint directory.

  python -m tarflow_jax.cli.convert --config=configs/afhq256.py \
      --checkpoint=afhq_model_8_768_8_8_0.07.pth --output=/tmp/afhq256

The output (Orbax checkpoint plus its config) is what the sampling and evaluation command lines
read. Every key and shape is checked against the config's architecture (reference.from_reference).
"""

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from tarflow_jax import checkpoint, reference
from tarflow_jax import model as model_lib
from tarflow_jax.cli import _common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file whose `model` fields match the checkpoint.',
                                lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Reference state dict (.pth or .npz).')
flags.DEFINE_string('output', None, 'Directory to write the converted checkpoint to.')
flags.DEFINE_bool('overwrite', False, 'Replace the checkpoint that --output already holds.')
flags.mark_flags_as_required(['config', 'checkpoint', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  model = model_lib.from_config(config.model)
  variables = reference.load_reference_checkpoint(model, FLAGS.checkpoint)
  checkpoint.save_model(FLAGS.output, variables, config, overwrite=FLAGS.overwrite)
  print(f'Wrote {FLAGS.output}: {sum(np.size(v) for v in jax.tree.leaves(variables["params"])):,} parameters.')


def run():
  _common.run(main)


if __name__ == '__main__':
  run()
