r"""Trains a TarFlow: `python -m tarflow_jax.main --config=configs/<experiment>.py --workdir=DIR`.

Fields of the config can be overridden on the command line, e.g. `--config.batch_size=128`;
`--config=configs/<experiment>.py:smoke` shrinks an experiment to a CPU-sized run (see
config_lib.smoke). The config is checked before anything is created or compiled.
"""

import shlex
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from tarflow_jax import config_lib, distributed
from tarflow_jax.cli import _common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples; a run resumes from it.')
flags.DEFINE_bool('take_over_workdir', False, 'Take --workdir over from the run on another host that holds it '
                  '(its writer.lock), for a run known to be dead (a lost host). Dead runs on this host are taken '
                  'over without it.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_lib.validate(FLAGS.config)  # what needs no devices, before JAX starts
  distributed.initialize_distributed()
  logging.info('JAX %s on %s: %d devices.', jax.__version__, jax.default_backend(), jax.device_count())
  from tarflow_jax import train  # pylint: disable=g-import-not-at-top  # TensorFlow: after the flags are checked
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, take_over_workdir=FLAGS.take_over_workdir)
  if jax.process_index() == 0:
    command = ' '.join(shlex.quote(a) for a in ['python', '-m', 'tarflow_jax.main', *sys.argv[1:]])
    print(train.summary(FLAGS.workdir, result, command), flush=True)


def run():
  _common.run(main, exit_at_once=True)  # a finished run ends with its summary, not a wait for native teardown


if __name__ == '__main__':
  run()
