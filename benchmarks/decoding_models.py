"""What the decoding benchmarks share: the model they decode (a checkpoint, or random weights in a layout), the
arguments that choose it, pixel differences to exact decoding, and timing in rotating rounds."""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from compare_sampling_speed import ARCHITECTURE, WORKLOADS  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from tarflow_jax import checkpoint, config_lib, images, sampling  # pylint: disable=g-import-not-at-top
from tarflow_jax import model as model_lib  # pylint: disable=g-import-not-at-top

# Random weights: every parameter perturbed by this much. The samples of configs/demo.py's layout then stay within the
# noise's range (largest |x| 3.9 on 4 samples), as a trained model's do; toy's default 0.03 takes them to 30.
RANDOM_SCALE = 0.01


def add_model_args(parser: argparse.ArgumentParser) -> None:
  """--checkpoint or --layout, the guidance overrides, the calibration of `auto`, and --seed."""
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument('--checkpoint', help='Training workdir or converted checkpoint.')
  model.add_argument('--layout', choices=('demo', 'imagenet64'), help='Random weights in this architecture.')
  parser.add_argument('--guidance', type=float, help='Guidance weight (default: the config\'s; none for imagenet64).')
  parser.add_argument('--guide_what', choices=sampling.GUIDE_WHAT)
  parser.add_argument('--attn_temp', type=float)
  parser.add_argument('--annealed_guidance', action=argparse.BooleanOptionalAction, default=None)
  parser.add_argument('--calibration_samples', type=int, default=8, help='auto: as cli.sample\'s.')
  parser.add_argument('--quality_bound', type=int, default=2, help='auto: as cli.sample\'s.')
  parser.add_argument('--seed', type=int, default=0)


def load(args):
  """(model, variables, guidance) of --checkpoint or --layout."""
  given = {k: v for k, v in dict(weight=args.guidance, guide_what=args.guide_what, attn_temp=args.attn_temp,
                                 annealed=args.annealed_guidance).items() if v is not None}
  if args.checkpoint:
    model, variables, config = checkpoint.load_model(args.checkpoint)
    return model, variables, sampling.guidance_from_config(config, **given)
  if args.layout == 'demo':
    config = config_lib.load(os.path.join(REPO, 'configs', 'demo.py'))
    model, guidance = model_lib.from_config(config.model), sampling.guidance_from_config(config, **given)
  else:
    model = model_lib.TarFlow(model_lib.Spec(**{k: WORKLOADS[args.layout][k] for k in ARCHITECTURE}))
    guidance = sampling.Guidance(**given)
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  import toy  # pylint: disable=g-import-not-at-top
  return model, toy.random_variables(model, args.seed, RANDOM_SCALE), guidance


def draw(model, batch: int, rng: np.random.Generator) -> tuple:
  """Noise (B, T, C) and labels (B,) drawn from the classes (None for an unconditional model)."""
  noise = rng.standard_normal((batch, model.num_tokens, model.token_dim), np.float32)
  num_classes = model.spec.num_classes
  return noise, rng.integers(0, num_classes, batch).astype(np.int32) if num_classes else None


def decode_ours(model, variables, noise, labels, guidance: sampling.Guidance, decoder):
  """Our `sampling.sample`: images (B, H, W, C) and each block's iterations (block 0 first, summed over segments)."""
  x, iterations = sampling.sample(model, variables, jnp.asarray(noise), None if labels is None else jnp.asarray(labels),
                                  guidance=guidance, decoder=decoder, return_iterations=True)
  return np.asarray(x), [np.asarray(i) for i in iterations]


def pixel_difference(x, exact) -> tuple:
  """Largest and mean difference of images x to `exact` (0..255), a non-finite pixel counting as 255; the samples
  with one."""
  finite = np.isfinite(x)
  d = np.abs(images.to_uint8(np.where(finite, x, 0)).astype(np.int32) - images.to_uint8(exact).astype(np.int32))
  d = np.where(finite, d, 255)
  return int(d.max()), float(d.mean()), int((~finite).reshape(len(x), -1).any(axis=1).sum())


def timed_rounds(calls: list, rounds: int) -> tuple[list, list]:
  """Each call's result (its warm-up call) and its times over `rounds` rounds, the order rotating each round."""
  results = [call() for call in calls]
  times = [[] for _ in calls]
  for r in range(rounds):
    for j in [*range(r % len(calls), len(calls)), *range(r % len(calls))]:
      start = time.perf_counter()
      calls[j]()
      times[j].append(time.perf_counter() - start)
  return results, times


def median(times: list) -> float:
  return statistics.median(times)


def report(args, model, guidance, table: str, rows: list, **about) -> None:
  """Prints what ran (the model, guidance, rounds, versions; `about`) and the table; writes both to --json if given."""
  about = dict(model=args.checkpoint or args.layout, tokens=model.num_tokens, token_dim=model.token_dim,
               num_blocks=model.spec.num_blocks, guidance=str(guidance), rounds=args.rounds,
               jax=f'{jax.__version__} {jax.devices()[0].platform}', **about)
  print(f'{about}\n\n{table}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(about=about, rows=rows), f, indent=1)
