r"""Trains a TarFlow: `python -m tarflow_jax.main --config=configs/<experiment>.py --workdir=DIR`.

Fields of the config can be overridden on the command line, e.g. `--config.batch_size=128`;
`--config=configs/imagenet64.py:smoke` shrinks any experiment to a CPU-sized run.
"""

import logging as py_logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data only; its C++ start-up notes are noise

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from tarflow_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples; a run resumes from it.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Starts multi-process JAX when the environment describes several processes; no-op otherwise.

  TPU pod slices (TPU_WORKER_HOSTNAMES with several hosts) and SLURM jobs with several tasks
  are detected by `jax.distributed.initialize()` itself; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
  """
  tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  explicit = 'JAX_COORDINATOR_ADDRESS' in os.environ
  if len(tpu_hosts) > 1 or slurm_tasks > 1 or explicit:
    kwargs = {}
    if explicit and 'JAX_NUM_PROCESSES' in os.environ:
      kwargs = dict(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                    process_id=int(os.environ['JAX_PROCESS_ID']))
    jax.distributed.initialize(**kwargs)
    logging.info('Process %d of %d, %d local devices of %d.', jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


class _QuietLibraries(py_logging.Filter):
  """Drops the per-save INFO chatter of Orbax so that the training log stays readable."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  logging.info('JAX %s on %s: %d devices.', jax.__version__, jax.default_backend(), jax.device_count())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
