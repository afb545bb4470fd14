r"""FID of each decoding plan on one trained model: ours, and GS-Jacobi's own sampler, on the same latents and labels.

  python benchmarks/fid_of_plans.py --checkpoint=runs/fashion_mnist --stats=fid_stats/fashion_mnist_train.npz \
      --inception=runs/fid/inception.npz [--num=10000] [--batch_size=100] [--plan jacobi:tol=1e-3]... \
      [--strategy NUM_GS_LIST MAX_JACOBI_LIST GUESS_LIST]... [--gs_jacobi_dir=CHECKOUT] [--no-auto] \
      [--auto_costs ONE BLOCK]... [--features=CACHE.npz] [--json=PATH]

Every row draws --num samples as `evaluate fid --checkpoint --seed` does (`evaluation.fid_samples`: the same
latents and labels from --seed, the config's guidance annealed, its self-denoising, non-finite samples drawn
again), so the `seq` row is the score of `evaluate fid` with the same --batch_size and --seed (the batch
sets the order the latents and labels are drawn in). The rows: our sequential decoding; each
--plan (`sampling.PLAN_SPELLING`); each GS-Jacobi --strategy run by us (`compare_gs_jacobi.our_plan`, their
stopping bound mapped to our tol at --batch_size) and, with --gs_jacobi_dir, by their `Model.reverse` (the model
exported to their code, our self-denoising after it); and `auto` (`auto_plan.calibrate` on --calibration_samples
latents of another seed, for the micro-batch that sequential decoding runs at, as `cli.sample --decoder=auto`);
and `auto` at each --auto_costs: the plan it would choose where steps cost that (`--auto_costs 1 1`: a step over
a whole block as dear as a one-token step, as on an accelerator, so the fewest serial steps within the bound).

Per row: the sampling time of all --num samples after a warm-up batch (decoding and self-denoising), the
decoding steps per block (block 0 first; theirs counted per call, ours returned) averaged over batches, the
largest and mean pixel difference to the sequential row's images (0..255, as fed to Inception), how many images
are identical to it, and the FID.

The Inception features of an image identical to the sequential row's are that row's (the network sees the same
uint8 pixels), so a plan that changes few images costs few feature passes; --features keeps the sequential row's
images and features between runs (refused if they were drawn otherwise). On one CPU core a feature costs about
0.2 s, so the sequential row's 10,000 take about 40 minutes once, and a row whose every image differs (theirs,
with its clamp: compare_gs_jacobi.py's docstring) as long again.
"""

import argparse
import ast
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np

from decoding_models import decode_ours, draw  # pylint: disable=g-import-not-at-top  (puts the repository on the path)
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from tarflow_jax import auto_plan, checkpoint, errors, evaluation, fid, inception, sampling, sharding  # pylint: disable=g-import-not-at-top


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='Training workdir or converted checkpoint (TarFlow).')
  parser.add_argument('--stats', required=True, help='FID statistics of the real images (evaluate fid_stats).')
  parser.add_argument('--inception', required=True, help='FID Inception weights (evaluate inception_weights).')
  parser.add_argument('--num', type=int, default=10_000, help='Samples per row.')
  parser.add_argument('--batch_size', type=int, default=100, help='Samples decoded at a time.')
  parser.add_argument('--feature_batch_size', type=int, default=50, help='Images per Inception batch.')
  parser.add_argument('--seed', type=int, default=0, help='Of the latents and labels, as evaluate fid\'s --seed.')
  parser.add_argument('--plan', action='append', default=[], help='One of our plans (repeatable).')
  parser.add_argument('--strategy', nargs=3, action='append', default=[], type=ast.literal_eval,
                      metavar=('NUM_GS_LIST', 'MAX_JACOBI_LIST', 'GUESS_LIST'),
                      help='A GS-Jacobi strategy, their three lists in decoding order (repeatable).')
  parser.add_argument('--ebound', type=float, default=1e-6, help="GS-Jacobi's stopping bound (their default).")
  parser.add_argument('--gs_jacobi_dir', help='Checkout of Minokori/GS-Jacobi_for_TarFlow: also their sampler.')
  parser.add_argument('--auto', action=argparse.BooleanOptionalAction, default=True, help='The `auto` row.')
  parser.add_argument('--auto_costs', nargs=2, type=float, action='append', default=[], metavar=('ONE', 'BLOCK'),
                      help='Also an `auto` row chosen at these step costs in place of this machine\'s: a step over one '
                           'token, over a whole block (any unit; "1 1" as on an accelerator, where a step costs the '
                           'same at any width) (repeatable).')
  parser.add_argument('--calibration_samples', type=int, default=8, help='auto: as cli.sample\'s.')
  parser.add_argument('--quality_bound', type=int, default=2, help='auto: as cli.sample\'s.')
  parser.add_argument('--features', help='.npz cache of the sequential row\'s images and features.')
  parser.add_argument('--json', help='Write the rows here.')
  args = parser.parse_args()
  if args.num <= 0 or args.batch_size <= 0:
    sys.exit('--num and --batch_size must be positive.')
  if args.gs_jacobi_dir and not os.path.isfile(os.path.join(args.gs_jacobi_dir, 'GS_Jacobi_sampling.py')):
    sys.exit(f'--gs_jacobi_dir={args.gs_jacobi_dir!r} holds no GS_Jacobi_sampling.py: give a checkout of '
             'Minokori/GS-Jacobi_for_TarFlow.')
  return args


def ours(model, variables, guidance, decoder):
  def decode(noise, labels):
    x, iterations = decode_ours(model, variables, noise, labels, guidance, decoder)
    return x, [int(np.sum(i)) for i in iterations]
  return decode


def theirs(gs_jacobi, their_model, guidance, strategy, ebound):
  return lambda noise, labels: gs_jacobi.decode_theirs(their_model, noise, labels, guidance, strategy, ebound)


def draw_all(decode, args, model, variables, mesh, protocol, pipeline: str) -> tuple[np.ndarray, float, np.ndarray]:
  """--num uint8 samples as evaluate fid draws them, `decode(noise, labels) -> (x, steps per block)` inverting the
  flow (the protocol's self-denoising after it); the seconds they took after a warm-up batch, and the decoding steps
  per block (block 0 first) averaged over batches."""
  steps = []

  def counting(noise, labels):
    x, s = decode(noise, labels)
    steps.append(s)
    return x

  draw = evaluation.model_sampler(model, variables, mesh, protocol, decode=counting)
  shape, num_classes = (model.num_tokens, model.token_dim), model.spec.num_classes
  evaluation.fid_samples(draw, args.batch_size, args.batch_size, shape, num_classes,
                         np.random.default_rng(args.seed + 1), pipeline=pipeline)  # compiles
  steps.clear()
  start = time.perf_counter()
  samples, _, _ = evaluation.fid_samples(draw, args.num, args.batch_size, shape, num_classes,
                                         np.random.default_rng(args.seed), pipeline=pipeline)
  return samples, time.perf_counter() - start, np.mean(steps, axis=0)


def features_reusing(weights, samples: np.ndarray, known: np.ndarray, known_features: np.ndarray, args,
                     pipeline: str) -> tuple[np.ndarray, int]:
  """Features (N, 2048) of `samples`, those of images equal to `known`'s (same index) taken from `known_features`;
  and how many were equal."""
  same = (samples == known).reshape(len(samples), -1).all(axis=1)
  out = known_features.copy()
  if not same.all():
    out[~same] = fid.features(weights, samples[~same], batch_size=args.feature_batch_size, pipeline=pipeline)
  return out, int(same.sum())


def sequential_features(weights, samples: np.ndarray, args, pipeline: str) -> np.ndarray:
  """The sequential row's features, from --features if it holds these very images."""
  if args.features and os.path.exists(args.features):
    with np.load(args.features) as f:
      if f['images'].shape == samples.shape and (f['images'] == samples).all():
        return f['features']
    sys.exit(f'--features={args.features} holds other images than this sequential row\'s (another checkpoint, '
             '--num or --seed?): give another path.')
  features = fid.features(weights, samples, batch_size=args.feature_batch_size, pipeline=pipeline)
  if args.features:
    np.savez(args.features, images=samples, features=features)
  return features


def main():
  args = parse_args()
  try:
    model, variables, config = checkpoint.load_model(args.checkpoint)
    if config.model.noise_conditioning:
      sys.exit(f'{args.checkpoint} is noise-conditioned (iTARFlow): it samples by iterative denoising, which takes '
               'no decoding plan.')
    mesh = sharding.make_mesh(config.mesh)
    protocol = evaluation.fid_protocol(config, args.num)
    guidance, n = protocol.guidance, model.spec.num_blocks
    # GS-Jacobi's mapping and sampler import torch: only where a strategy or their sampler is asked for.
    gs_jacobi = importlib.import_module('compare_gs_jacobi') if args.strategy or args.gs_jacobi_dir else None
    decoders = [('seq', 'ours', sampling.parse_plan('seq', n))]  # as evaluate fid's default --decoder
    decoders += [(plan, 'ours', sampling.parse_plan(plan, n, setting='--plan')) for plan in args.plan]
    for i, s in enumerate(args.strategy):
      decoders.append((f'GS-Jacobi strategy {i}', 'ours', gs_jacobi.our_plan(s, model, args.batch_size, args.ebound)))
    autos = ([('auto', None)] if args.auto else []) + [
        (f'auto at step costs {one:g}/{block:g}', (one, block)) for one, block in args.auto_costs]
    if autos:
      rows = sampling.resolve_microbatch(model, sampling.Sequential(), args.batch_size, guidance.enabled)
      calibration = [None if a is None else jnp.asarray(a)
                     for a in draw(model, args.calibration_samples, np.random.default_rng(args.seed + 2))]
      for name, costs in autos:
        auto = auto_plan.calibrate(model, variables, *calibration, guidance=guidance, bound=args.quality_bound,
                                   batch=rows or args.batch_size, costs=costs, samples=args.num)
        decoders.append((name, 'ours', auto.plan))
    their_model = None
    if args.gs_jacobi_dir:
      problem = gs_jacobi.unsupported(model.spec)
      if problem:
        sys.exit(problem)
      with tempfile.TemporaryDirectory() as directory:
        their_model = gs_jacobi.their_model(args.gs_jacobi_dir, model, variables, directory)
      for i, s in enumerate(args.strategy or [([1] * n, [10] * n, [0] * n)]):
        decoders.append((f'GS-Jacobi strategy {i}' if args.strategy else 'their default (plain Jacobi, 10)', 'theirs',
                         s))
    weights = inception.load_weights(args.inception)
    reference = fid.load_statistics(args.stats)
    fid.check_weights(args.stats, weights, args.inception)
    pipeline = fid.statistics_pipeline(args.stats)
  except errors.UserError as e:
    sys.exit(str(e))

  rows, exact, exact_features = [], None, None
  for name, side, decoder in decoders:
    decode = (ours(model, variables, guidance, decoder) if side == 'ours' else
              theirs(gs_jacobi, their_model, guidance, decoder, args.ebound))
    samples, seconds, steps = draw_all(decode, args, model, variables, mesh, protocol, pipeline)
    if exact is None:
      exact, exact_features = samples, sequential_features(weights, samples, args, pipeline)
    features, identical = features_reusing(weights, samples, exact, exact_features, args, pipeline)
    diff = np.abs(samples.astype(np.int32) - exact.astype(np.int32))
    setting = sampling.spell(decoder, n, model.num_tokens) if side == 'ours' else str(decoder)
    rows.append(dict(decoder=name, side=side, setting=setting, seconds=seconds, images_per_s=args.num / seconds,
                     steps_per_block=[round(float(s), 1) for s in steps], max_pixel_difference=int(diff.max()),
                     mean_pixel_difference=float(diff.mean()), identical_to_seq=identical,
                     fid=fid.frechet_distance(*reference, *fid.statistics(features))))
    print(rows[-1], flush=True)
  print(table(rows, args))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(checkpoint=args.checkpoint, num=args.num, batch_size=args.batch_size, seed=args.seed,
                     protocol=protocol.describe(), stats=args.stats, rows=rows), f, indent=1)


def table(rows: list, args) -> str:
  lines = [f'| decoder | side | sampling s ({args.num} at batch {args.batch_size}) | steps per block (block 0 first) '
           '| max px diff | mean px diff | identical to seq | FID |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["decoder"]} | {r["side"]} | {r["seconds"]:.1f} | {"/".join(f"{s:g}" for s in r["steps_per_block"])}'
                 f' | {r["max_pixel_difference"]} | {r["mean_pixel_difference"]:.4f} | {r["identical_to_seq"]} | '
                 f'{r["fid"]:.3f} |')
  lines += ['', 'Settings:'] + [f'- {r["decoder"]}, {r["side"]}: {r["setting"]}' for r in rows]
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
