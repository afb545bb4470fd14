r"""The batch size below which the automatic decoding plan beats sequential decoding, with and without windows.

  python benchmarks/decoding_crossover.py (--checkpoint=runs/demo | --layout=demo|imagenet64) \
      [--batches 1 2 4 8 16 32 64] [--rounds=3] [--plan=SPELLING]... [--json=PATH]

Per batch size, on the same noise and labels: exact sequential decoding (`seq`, its default
micro-batch), `auto` planned for that batch as `cli.sample --decoder=auto` plans (every candidate),
`auto, segments` planned from the candidates with fixed segments only (the plan as it was before
sliding windows; `auto`'s own where it has no window), and each `--plan` as spelled. The candidates
are measured once on the calibration samples (`auto_plan.measure`, windows capped at the smallest
batch's step costs); each batch's plans are chosen from that at its own step costs
(`auto_plan.choose`), as calibrating for it alone would choose. Each decoder is called once
(warm-up, compilation) and then timed over --rounds rounds in rotating order.

Columns: median seconds and speed against seq; iterations per block (block 0 first, summed over
segments); serial steps, the loop trips run one after another (seq: T - 1 per block; Jacobi: its
iterations), which bound the time where a step costs the same at any width, as on an accelerator;
matmul FLOPs against seq's (`flops.plan_decode_flops`); and the largest and mean pixel difference
(0..255) to seq. The crossover of each `auto` is the largest batch at which its plan decodes a block by
Jacobi and is faster than seq (an all-sequential plan is seq).
"""

import argparse
import dataclasses
import sys

import numpy as np

from decoding_models import add_model_args, decode_ours, draw, load, median, pixel_difference, report, timed_rounds  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from tarflow_jax import auto_plan, errors, flops, sampling  # pylint: disable=g-import-not-at-top


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_model_args(parser)
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32, 64])
  parser.add_argument('--rounds', type=int, default=3, help='Timed rounds, after one warm-up call each.')
  parser.add_argument('--plan', action='append', default=[], help='A plan to time too, spelled as --decoder.')
  parser.add_argument('--json', help='Write the rows here.')
  args = parser.parse_args()
  if args.rounds <= 0 or min(args.batches) <= 0:
    sys.exit('--rounds and --batches must be positive.')
  return args


def rows_decoded(model, batch: int, guidance) -> int:
  """The samples a batch decodes at a time (its sequential micro-batch), at which the step costs are measured."""
  return sampling.resolve_microbatch(model, sampling.Sequential(), batch, guidance.enabled) or batch


def measure(args, model, variables, guidance) -> auto_plan.Measurement:
  """Every candidate on the calibration samples, once for all batches (windows capped at the smallest batch's costs)."""
  noise, labels = draw(model, args.calibration_samples, np.random.default_rng(args.seed))
  costs = auto_plan.step_costs(model, variables, rows_decoded(model, min(args.batches), guidance), guidance)
  return auto_plan.measure(model, variables, jnp.asarray(noise), None if labels is None else jnp.asarray(labels),
                           guidance=guidance, costs=costs)


def rows_at(batch: int, args, model, variables, guidance, measured: auto_plan.Measurement) -> list:
  """Each decoder's row at one batch size."""
  noise, labels = draw(model, batch, np.random.default_rng(args.seed + batch))
  n, steps = model.spec.num_blocks, model.num_tokens - 1
  costs = auto_plan.step_costs(model, variables, rows_decoded(model, batch, guidance), guidance)
  segments = dataclasses.replace(measured, trials=[[t for t in trials if not t.decoder.window]
                                                   for trials in measured.trials])
  auto = auto_plan.choose(model, variables, measured, costs, args.quality_bound).plan
  slides = any(isinstance(d, sampling.Jacobi) and d.slides(i) for i, d in enumerate(auto.blocks))
  runs = [('seq', sampling.Sequential()), ('auto', auto),
          ('auto, segments', auto_plan.choose(model, variables, segments, costs, args.quality_bound).plan
           if slides else auto)]
  runs += [(f'plan {i}', sampling.parse_plan(p, n, setting='--plan')) for i, p in enumerate(args.plan)]
  decode = lambda decoder: lambda: decode_ours(model, variables, noise, labels, guidance, decoder)
  results, times = timed_rounds([decode(d) for _, d in runs], args.rounds)
  exact, seq_s = results[0][0], median(times[0])
  rows_run = batch * (2 if guidance.enabled else 1)
  seq_flops = flops.decode_flops(model, rows_run)
  out = []
  for (name, decoder), (x, iterations), t in zip(runs, results, times):
    largest, mean, nonfinite = pixel_difference(x, exact)
    serial = sum(
        steps if isinstance(sampling.decoder_of_block(decoder, i), sampling.Sequential) else int(its.sum())
        for i, its in enumerate(iterations))
    out.append(dict(batch=batch, decoder=name, setting=sampling.spell(decoder, n, model.num_tokens),
                    median_s=median(t), times_s=t, speedup=seq_s / median(t),
                    iterations=[int(its.sum()) for its in iterations], serial_steps=serial,
                    flops_ratio=flops.plan_decode_flops(model, decoder, iterations, rows_run) / seq_flops,
                    max_pixel_difference=largest, mean_pixel_difference=mean, nonfinite_samples=nonfinite))
  return out


def table(rows: list, sequential_steps: int) -> str:
  lines = [f'| batch | decoder | median s | speed vs seq | iterations per block | serial steps (seq {sequential_steps}) '
           '| FLOPs vs seq | max px diff | mean px diff |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["batch"]} | {r["decoder"]} | {r["median_s"]:.4f} | {r["speedup"]:.2f}x | '
                 f'{"/".join(map(str, r["iterations"]))} | {r["serial_steps"]} | {r["flops_ratio"]:.2f} | '
                 f'{r["max_pixel_difference"]}{f" ({k} not finite)" if (k := r["nonfinite_samples"]) else ""} | '
                 f'{r["mean_pixel_difference"]:.3f} |')
  lines += ['', 'Crossover (the largest batch at which the plan decodes a block by Jacobi and beats seq):']
  for name in ('auto', 'auto, segments'):
    jacobi = [r for r in rows if r['decoder'] == name and 'jacobi' in r['setting']]
    wins = [r['batch'] for r in jacobi if r['speedup'] > 1]
    tried = ', '.join(f'{r["batch"]}: {r["speedup"]:.2f}x' for r in jacobi) or 'none'
    lines.append(f'- {name}: {max(wins) if wins else "none"} (batches with Jacobi in the plan, {tried})')
  settings = {}
  for r in rows:
    settings.setdefault((r['decoder'], r['setting']), []).append(str(r['batch']))
  lines += ['', 'Plans (block 0 first):']
  lines += [f'- {name} (batch {", ".join(b)}): {setting}' for (name, setting), b in settings.items()]
  return '\n'.join(lines)


def main():
  args = parse_args()
  try:
    model, variables, guidance = load(args)
    for p in args.plan:
      sampling.parse_plan(p, model.spec.num_blocks, setting='--plan')  # refused before any decoding
    measured = measure(args, model, variables, guidance)
    rows = [r for b in args.batches for r in rows_at(b, args, model, variables, guidance, measured)]
  except errors.UserError as e:
    sys.exit(str(e))
  report(args, model, guidance, table(rows, model.spec.num_blocks * (model.num_tokens - 1)), rows)


if __name__ == '__main__':
  main()
