r"""Compiles training and sampling for a TPU slice ahead of time, on any machine with libtpu.

  python -m tarflow_jax.cli.aot --config=configs/imagenet64.py --topology=v5e:2x4 [--what=train,sample]
      [--config.<field>=<value> ...] [--max_batch] [--json=FILE]

Prints per-chip memory against the chip's HBM (and whether it fits), model FLOPs per chip and
step, XLA's estimated step time and the utilisation of the bf16 peak it implies, and the
collectives of the compiled program. Needs libtpu (`pip install -e ".[tpu]"`), not a TPU.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from tarflow_jax.cli import _common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py[:arg]).', lock_config=True)
flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:2x4 (v5litepod-8), v4:2x2x1 (v4-8), v4:2x2x4 (v4-32).')
flags.DEFINE_list('what', ['train', 'sample'], 'Programs to compile: train, sample.')
flags.DEFINE_bool('max_batch', False, 'Also find the largest global batch that fits (several compiles).')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _common.check_choices('what', FLAGS.what, ('train', 'sample'))
  from tarflow_jax import compilation  # pylint: disable=g-import-not-at-top  # TensorFlow: after start-up
  result = compilation.report(FLAGS.config, FLAGS.topology, FLAGS.what, FLAGS.max_batch)
  _common.report(compilation.table(result), result, FLAGS.json)


def run():
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # describing a topology claims no TPU
  _common.run(main, platform='cpu')  # compile for the named topology; run nothing here


if __name__ == '__main__':
  run()
