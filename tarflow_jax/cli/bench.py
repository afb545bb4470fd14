r"""Benchmark of training, sampling and likelihood evaluation for any config (benchmark.py).

  python -m tarflow_jax.cli.bench --config=configs/mnist.py [--what=train,sample,jacobi,eval] [--json=out.json]
"""

from absl import app, flags
from ml_collections import config_flags

from tarflow_jax import errors
from tarflow_jax.cli import _common

WHAT = ('train', 'sample', 'jacobi', 'eval')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py[:smoke]).', lock_config=True)
flags.DEFINE_list('what', list(WHAT), 'Comma-separated: train, sample, jacobi, eval.')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (after one warm-up call).')
flags.DEFINE_integer('sample_batch', 16, 'Samples per sampling call.')
flags.DEFINE_integer('chunks', 8, 'Sequential decoding chunks per block (sampling.sample).')
flags.DEFINE_integer('microbatch', 0, 'Samples decoded at a time within a sampling call (0: all).')
flags.mark_flag_as_required('config')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _common.check_choices('what', FLAGS.what, WHAT)
  for name in ('repeats', 'sample_batch', 'chunks'):
    if FLAGS[name].value <= 0:
      raise errors.UserError(f'--{name}={FLAGS[name].value} must be positive.')
  from tarflow_jax import benchmark  # pylint: disable=g-import-not-at-top  # TensorFlow: after start-up
  result = benchmark.run(FLAGS.config, set(FLAGS.what), FLAGS.repeats, FLAGS.sample_batch, FLAGS.chunks,
                         FLAGS.microbatch or None)
  _common.report(benchmark.table(result), result, FLAGS.json)


def run():
  _common.run(main)


if __name__ == '__main__':
  run()
