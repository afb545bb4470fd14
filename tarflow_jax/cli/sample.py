r"""Draws samples from a trained or converted TarFlow.

  python -m tarflow_jax.cli.sample --checkpoint=runs/demo --output=runs/demo/generated \
      --num=100 --labels=rows --guidance=1.0 [--decoder=jacobi --jacobi_tol=1e-3]
  python -m tarflow_jax.cli.sample ... --decoder=seq,seq,jacobi:segment=16:tol=1e-3:init=prev,seq
  python -m tarflow_jax.cli.sample ... --decoder=auto [--quality_bound=2 --calibration_samples=8]
  python -m tarflow_jax.cli.sample --checkpoint=runs/itarflow_fashion_mnist ... --denoise_steps=30 --dynamics=sde

Writes `samples.png` (a grid), `samples.npz` (uint8 images NHWC and labels) and prints images/s and
the decoding plan, one entry per block as --decoder takes it (`sampling.parse_plan`).
Guidance, attention temperature and denoising default to the checkpoint config's `sample` fields.
A noise-conditioned (iTARFlow) model decodes at config.itarflow.t1 and is then denoised iteratively
down to t0 (`iterative_sampling`): --denoise_steps, --dynamics, --clip, --guidance_style and
--guide_flows change its settings (default: the config's `itarflow` fields), while --denoise,
--sigma, --denoise_scale and --guide_what are TarFlow's and refused there.
A checkpoint trained with config.ema_decay > 0 samples with the moving average of its parameters;
--raw_weights uses the parameters themselves.
"""

import dataclasses
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import auto_plan, checkpoint, data, errors, images, iterative_sampling, sampling, sharding
from tarflow_jax import storage
from tarflow_jax.cli import _common

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/, or a converted checkpoint.')
flags.DEFINE_string('output', None, 'Directory for samples.png and samples.npz.')
flags.DEFINE_integer('num', 64, 'Number of samples.')
flags.DEFINE_integer('batch_size', 64, 'Samples per compiled call (global, over all devices).')
flags.DEFINE_integer('seed', 0, 'Seed of the latent noise and random labels.')
flags.DEFINE_string('labels', 'random', '"random", "rows" (sample i has class i mod num_classes), "none" '
                    '(no label), or comma-separated class ids repeated over the samples.')
flags.DEFINE_float('guidance', None, 'Guidance weight (default: config.sample.guidance).')
flags.DEFINE_enum('guide_what', None, ['a', 'b', 'ab'], 'Guided affine parameters (default: config).')
flags.DEFINE_float('attn_temp', None, 'Attention temperature of the unguided branch (default: config).')
flags.DEFINE_bool('annealed_guidance', None, 'Ramp the guidance weight over tokens (default: config).')
flags.DEFINE_bool('denoise', None, 'One score step x + s * sigma^2 grad log p(x|y) (default: config, if trained '
                  'with Gaussian noise).')
flags.DEFINE_float('sigma', None, 'Denoising sigma (default: the training noise std).')
flags.DEFINE_float('denoise_scale', None, 'Multiplier of the denoising step (default: config).')
flags.DEFINE_integer('denoise_steps', None, 'iTARFlow: rounds of iterative denoising from t1 down to t0 (1: one '
                     'self-denoising step at t1; default: config.itarflow.steps).')
flags.DEFINE_enum('dynamics', None, list(iterative_sampling.DYNAMICS), 'iTARFlow: how a denoising round moves to the '
                  'next noise level: ode (deterministic) or sde (fresh noise, by --seed) (default: config).')
flags.DEFINE_bool('clip', None, 'iTARFlow: clamp each round\'s denoised estimate to [-1, 1] (default: config).')
flags.DEFINE_enum('guidance_style', None, list(iterative_sampling.STYLES), 'iTARFlow: how guidance mixes the two '
                  'branches (iterative_sampling.Guidance; default: config).')
flags.DEFINE_integer('guide_flows', None, 'iTARFlow: blocks guided, in decoding order (-1: all; default: config).')
flags.DEFINE_string('decoder', 'seq', 'The decoding plan: exact sequential decoding (seq), Jacobi, or one of them per '
                    f'block: {sampling.PLAN_SPELLING}; or auto: the cheapest plan on this machine whose samples stay '
                    'within --quality_bound of exact decoding on --calibration_samples samples (auto_plan.calibrate).')
flags.DEFINE_integer('calibration_samples', 8, '--decoder=auto: samples of the calibration batch (fresh noise, seed '
                     '--seed + 1).')
flags.DEFINE_integer('quality_bound', 2, '--decoder=auto: the largest pixel difference (of 255) to exact decoding '
                     'allowed over the samples decoded (predicted from the calibration batch: '
                     'auto_plan.largest_difference).')
flags.DEFINE_integer('chunks', 8, 'Sequential decoding: chunks per block, each attending over the cache up to its '
                     'end (more chunks read less, and compile longer); the default of seq entries.')
flags.DEFINE_integer('microbatch', None, 'Samples decoded at a time within a batch (0: the whole batch; default: on a '
                     'CPU, as many as the last-level cache holds the key/value cache of, sampling.auto_microbatch).')
flags.DEFINE_integer('jacobi_segment', 0, 'Jacobi: tokens per segment (0: the whole block); the default of jacobi '
                     'entries, as the next two.')
flags.DEFINE_integer('jacobi_max_iters', 0, 'Jacobi: iteration cap per segment (0: the segment length).')
flags.DEFINE_float('jacobi_tol', 1e-3, 'Jacobi: stop a segment when no value changes by more than this.')
flags.DEFINE_string('latents', None, '.npz with `noise` (N, T, D) (and optionally `labels`) to decode instead of '
                    'fresh noise, for exact comparisons.')
flags.DEFINE_bool('raw_weights', False, 'Sample with the trained parameters, not their moving average (where the '
                  'checkpoint has one: config.ema_decay > 0).')
flags.mark_flags_as_required(['checkpoint', 'output'])


def labels_for(spec: str, num: int, num_classes: int, rng: np.random.Generator):
  """Labels (num,) from the --labels spec, or None for an unconditional model."""
  if not num_classes:
    if spec not in ('random', 'none'):
      raise errors.UserError(f'--labels={spec} given, but the model is unconditional.')
    return None
  if spec == 'random':
    return rng.integers(0, num_classes, num).astype(np.int32)
  if spec == 'rows':
    return (np.arange(num) % num_classes).astype(np.int32)
  if spec == 'none':
    return np.full(num, -1, np.int32)
  try:
    ids = np.array([int(v) for v in spec.split(',')], np.int32)
  except ValueError as e:
    raise errors.UserError(f'--labels must be random, rows, none or comma-separated integers, got {spec!r}.') from e
  if ids.min() < 0 or ids.max() >= num_classes:
    raise errors.UserError(f'--labels must lie in [0, {num_classes - 1}], got {spec!r}.')
  return np.resize(ids, num)


def check_flags() -> None:
  """Raises errors.UserError for flag values that cannot work, before the checkpoint is read."""
  positive = ['batch_size', 'chunks', 'calibration_samples'] + ([] if FLAGS.latents else ['num'])
  for name in positive:
    if FLAGS[name].value <= 0:
      raise errors.UserError(f'--{name}={FLAGS[name].value} must be positive.')
  for name in ('microbatch', 'jacobi_segment', 'jacobi_max_iters', 'jacobi_tol', 'guidance', 'sigma',
               'denoise_scale', 'quality_bound'):
    if FLAGS[name].value is not None and FLAGS[name].value < 0:
      raise errors.UserError(f'--{name}={FLAGS[name].value} must be >= 0.')
  if FLAGS.denoise_steps is not None and FLAGS.denoise_steps < 1:
    raise errors.UserError(f'--denoise_steps={FLAGS.denoise_steps} must be at least 1.')
  if FLAGS.attn_temp is not None and FLAGS.attn_temp <= 0:
    raise errors.UserError(f'--attn_temp={FLAGS.attn_temp} must be positive.')
  if FLAGS.decoder != 'auto':
    sampling.parse_plan(FLAGS.decoder, None, setting='--decoder')  # the spelling; the blocks once the model is read


_TARFLOW_ONLY = ('denoise', 'sigma', 'denoise_scale', 'guide_what')
_ITARFLOW_ONLY = ('denoise_steps', 'dynamics', 'clip', 'guidance_style', 'guide_flows')


def check_family_flags(noise_conditioned: bool) -> None:
  """Refuses the flags of the other sampler: TarFlow's one denoising step, or iTARFlow's iterative denoising."""
  foreign = _TARFLOW_ONLY if noise_conditioned else _ITARFLOW_ONLY
  given = [f'--{name}' for name in foreign if FLAGS[name].value is not None]
  if given:
    model, sampler = (('a noise-conditioned (iTARFlow) model', 'iterative denoising (--denoise_steps, --dynamics, '
                       '--clip, --guidance_style, --guide_flows)') if noise_conditioned else
                      ('a TarFlow model', 'one denoising step (--denoise, --sigma, --denoise_scale, --guide_what)'))
    raise errors.UserError(f'{", ".join(given)} given, but --checkpoint holds {model}, sampled with {sampler}; '
                           'leave them out.')


def decoder_from_flags(model, variables, guidance, batch_size: int, num: int) -> sampling.Decoder:
  """The decoder of --decoder, with --chunks, --microbatch and --jacobi_* as the settings its entries leave out."""
  microbatch = 'auto' if FLAGS.microbatch is None else (min(FLAGS.microbatch, batch_size) or None)
  if microbatch not in ('auto', None):
    sharding.check_microbatch(batch_size, microbatch, '--microbatch')
  if FLAGS.decoder == 'auto':
    start = time.perf_counter()
    calibration = auto_plan.calibrate_fresh(
        model, variables, guidance=guidance, batch=batch_size, samples=num,
        calibration_samples=FLAGS.calibration_samples, seed=FLAGS.seed + 1, bound=FLAGS.quality_bound,
        microbatch=microbatch)
    print(f'Calibrated on {FLAGS.calibration_samples} samples in {time.perf_counter() - start:.1f} s (with '
          'compilation).')
    print(calibration.describe(model.num_tokens))
    return dataclasses.replace(calibration.plan, microbatch=microbatch)
  return sampling.parse_plan(
      FLAGS.decoder, model.spec.num_blocks, sequential=sampling.Sequential(FLAGS.chunks, microbatch),
      jacobi=sampling.Jacobi(FLAGS.jacobi_segment, FLAGS.jacobi_max_iters, FLAGS.jacobi_tol), setting='--decoder')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  check_flags()
  model, variables, config = checkpoint.load_model(FLAGS.checkpoint, raw_weights=FLAGS.raw_weights)
  given = lambda **flags: {k: v for k, v in flags.items() if v is not None}
  check_family_flags(model.spec.noise_conditioning)
  if model.spec.noise_conditioning:  # iTARFlow: decoded at t1, then denoised iteratively (config.itarflow)
    if FLAGS.decoder not in ('seq', 'sequential'):
      raise errors.UserError(f'--decoder={FLAGS.decoder}: a noise-conditioned (iTARFlow) model decodes sequentially.')
    guidance, denoising = iterative_sampling.from_config(config, **given(
        weight=FLAGS.guidance, attn_temp=FLAGS.attn_temp, annealed=FLAGS.annealed_guidance,
        style=FLAGS.guidance_style, flows=FLAGS.guide_flows, steps=FLAGS.denoise_steps, dynamics=FLAGS.dynamics,
        clip=FLAGS.clip))
  else:
    guidance = sampling.guidance_from_config(config, **given(
        weight=FLAGS.guidance, guide_what=FLAGS.guide_what, attn_temp=FLAGS.attn_temp,
        annealed=FLAGS.annealed_guidance))
    denoising = sampling.denoising_from_config(config, **given(
        enabled=FLAGS.denoise, sigma=FLAGS.sigma, step_scale=FLAGS.denoise_scale))
    if denoising.enabled and not denoising.sigma:
      raise errors.UserError('--denoise needs --sigma (the model was not trained with Gaussian noise).')

  rng = np.random.default_rng(FLAGS.seed)
  if FLAGS.latents:
    with np.load(FLAGS.latents) as f:
      noise = f['noise'].astype(np.float32)
      labels = f['labels'].astype(np.int32) if 'labels' in f.files else None
    num = noise.shape[0]
  else:
    num = FLAGS.num
    noise = rng.standard_normal((num, model.num_tokens, model.token_dim), np.float32)
    labels = None
  if labels is None:
    labels = labels_for(FLAGS.labels, num, model.spec.num_classes, rng)

  mesh = sharding.make_mesh(config.mesh)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  batch_size = min(FLAGS.batch_size, num)
  decoder = decoder_from_flags(model, variables, guidance, batch_size, num)
  out, iterations, seconds = [], [], []
  for start in range(0, num, batch_size):
    # The last batch is padded to the batch size: one compiled shape for every batch.
    z = data.pad_batch(noise[start:start + batch_size], batch_size)
    y = None if labels is None else jnp.asarray(data.pad_batch(labels[start:start + batch_size], batch_size, -1))
    real = min(batch_size, num - start)
    if batch_size % mesh.size == 0:
      z = jax.device_put(z, sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    if model.spec.noise_conditioning:
      with jax.set_mesh(mesh):
        x = iterative_sampling.sample(model, variables, jnp.asarray(z), y, guidance=guidance, denoising=denoising,
                                      rng=jax.random.key(FLAGS.seed + start), chunks=FLAGS.chunks)
    else:
      x, its = sampling.sample(model, variables, jnp.asarray(z), y, guidance=guidance, decoder=decoder,
                               return_iterations=True)
      iterations.append([np.asarray(i) for i in its])
      if denoising.enabled:
        x = sampling.denoise(model, variables, x, y, sigma=denoising.sigma, step_scale=denoising.step_scale)
    x = jax.block_until_ready(x)
    seconds.append(time.perf_counter() - t0)
    out.append(images.to_uint8(sharding.fetch(x))[:real])
  samples = np.concatenate(out)

  timed = seconds[1:] or seconds  # the first batch includes compilation
  rate = sum(len(o) for o in out[-len(timed):]) / sum(timed)
  note = 'after compilation' if len(seconds) > 1 else 'including compilation (one batch)'
  logging.info('%d samples in %.1f s (first batch %.1f s, with compilation).', num, sum(seconds), seconds[0])
  details = [f'guidance {guidance.weight:g}'] if guidance.enabled else []
  if model.spec.noise_conditioning:
    details.append(f'decoded at t={denoising.t1:g}, then {denoising.steps} {denoising.dynamics} denoising round'
                   f'{"s" if denoising.steps > 1 else ""} down to {denoising.t0:g}')
  elif denoising.enabled:
    details.append('denoised')
  if iterations and not isinstance(decoder, sampling.Jacobi):  # sequential steps (Jacobi decodes the whole batch)
    microbatch = sampling.resolve_microbatch(model, decoder, batch_size, guidance.enabled) or batch_size
    details.append(f'micro-batch {microbatch}')
  print(f'{num} samples, {rate:.2f} images/s {note} ({", ".join(details)}).')
  if iterations:
    print(f'Decoding plan (block 0 first): --decoder={sampling.spell(decoder, model.spec.num_blocks, model.num_tokens)}')
    per_block = [int(its.sum()) for its in iterations[0]]
    print(f'Iterations per block (block 0 first, summed over segments, first batch): {per_block} '
          f'(sequential decoding takes {model.num_tokens - 1} per block).')
  if jax.process_index() == 0:
    os.makedirs(FLAGS.output, exist_ok=True)
    columns = model.spec.num_classes if FLAGS.labels == 'rows' and 0 < model.spec.num_classes <= 32 else 0
    images.save_png(os.path.join(FLAGS.output, 'samples.png'), images.grid(samples, columns))
    storage.save_npz(os.path.join(FLAGS.output, 'samples.npz'), images=samples,
                     labels=labels if labels is not None else np.full(num, -1, np.int32))
    print(f'Wrote {FLAGS.output}/samples.png and samples.npz')


def run():
  # Decoding runs faster with glibc's malloc as it is than with host_memory's (docs/benchmarks.md).
  _common.run(main, reuse_freed_memory=False)


if __name__ == '__main__':
  run()
