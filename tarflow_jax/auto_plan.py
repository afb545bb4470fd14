"""A decoding plan chosen by measurement (`--decoder=auto`): per block, the cheapest decoder that keeps the samples
within a bound of exact decoding.

GS-Jacobi (Liu and Qin, arXiv 2505.12849) picks per block how many Gauss-Seidel segments, how many
Jacobi iterations and which initial guess, from two measurements on a few images: how hard the
block is to converge (CRM) and how close each initial guess is to the answer (IGM). `calibrate`
measures the same on a small batch of the model's own samples, whose exact decoding is the answer:

1. the batch decoded exactly (sequentially), keeping each block's output and input;
2. each block inverted alone from its exact output by each candidate Jacobi setting (`candidates`:
   fixed segments, and windows that slide past settled tokens, each window capped at the iterations
   that would cost as much as sequential decoding at the smallest batch to plan for):
   its iterations and its largest error against the exact input; reported with it, the block's
   convergence (plain Jacobi's iterations per token, CRM-like) and each initial guess's mean
   distance to the answer (IGM-like);
3. the price of a decoding step over S tokens on this machine (`step_costs`): measured for one token
   (a sequential step) and for the whole block (a plain Jacobi iteration) at the batch to decode,
   linear in S between; sequential decoding costs T - 1 one-token steps, a Jacobi segment its
   iterations times a step over the segment, a window its iterations times a step over the window;
4. each block's cheapest candidate whose error is within the bound; then the whole plan decodes the
   batch, and while the largest pixel difference to exact decoding it predicts over the samples to
   decode exceeds the bound (`largest_difference`), the block with the largest error takes its cheapest
   more accurate candidate (at worst sequential decoding). A prediction, because a few calibration
   samples understate the largest difference over many: on the Fashion-MNIST model, plain Jacobi at
   tol 1e-2 was within 1 level on 8 samples and 3 levels off in the worst of 10,000. Each sample's
   largest difference being about log-normal over samples (as there), the prediction is the 1 - 1/N
   quantile of the log-normal fitted to the calibration batch's.

`measure` does steps 1 and 2, which do not depend on the batch to decode; `choose` steps 3 and 4,
for one batch's step costs; `calibrate` both.
"""

import dataclasses
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import errors, images, sampling
from tarflow_jax.model import TarFlow, patchify

TOLERANCES = (1e-2, 1e-3)
SEGMENT_COUNTS = (1, 4, 16)
WINDOW_COUNTS = (4, 16)  # windows of a quarter and a sixteenth of the block


def candidates(num_tokens: int) -> list:
  """The Jacobi settings tried for each block: segments and windows, tolerances and initial guesses (uncapped)."""
  steps = num_tokens - 1
  lengths = sorted({-(-steps // k) for k in SEGMENT_COUNTS if k <= steps}, reverse=True)
  out = []
  for length in lengths:
    inits = sampling.INITIAL_GUESSES if length < steps else ('latent', 'zeros')
    out += [sampling.Jacobi(segment=length, tol=tol, init=init) for tol in TOLERANCES for init in inits]
  windows = sorted({-(-steps // k) for k in WINDOW_COUNTS if 2 * k <= steps}, reverse=True)  # of 2 tokens or more
  for window in windows:
    out += [sampling.Jacobi(window=window, tol=tol, init=init) for tol in TOLERANCES for init in ('latent', 'zeros')]
  return out


@dataclasses.dataclass(frozen=True)
class BlockReport:
  """What `calibrate` measured and chose for one block."""
  block: int
  entry: str  # the chosen decoder, spelled as in --decoder
  iterations: int  # its iterations on the calibration batch (summed over segments; sequential: T - 1)
  cost: float  # its estimated time, in seconds per batch (see `step_costs`)
  error: float  # largest difference of the block's input to exact decoding's, on the calibration batch
  convergence: float  # plain Jacobi's iterations per token at the tightest tolerance (CRM-like)
  guess_distance: dict  # mean distance of each initial guess to the exact input (IGM-like)


@dataclasses.dataclass(frozen=True)
class Calibration:
  plan: sampling.Plan
  blocks: list  # BlockReport per block, block 0 first
  step_costs: tuple  # seconds of a step over one token and over a whole block, at the batch to decode
  pixel_difference: int  # the plan's largest pixel difference to exact decoding on the calibration batch (of 255)
  predicted_difference: float  # its largest difference predicted over `samples` samples (`largest_difference`)
  samples: int  # the samples to decode, which the bound holds over
  sequential_cost: float  # estimated seconds of exact sequential decoding, per batch

  @property
  def speedup(self) -> float:
    return self.sequential_cost / sum(b.cost for b in self.blocks)

  def describe(self, num_tokens: int) -> str:
    lines = [f'Calibrated plan: estimated {self.speedup:.2f}x the speed of sequential decoding, largest pixel '
             f'difference {self.pixel_difference}/255 on the calibration batch and {self.predicted_difference:.2f}/255 '
             f'predicted over {self.samples} samples; a step costs {self.step_costs[0]:.2e} s '
             f'over one token, {self.step_costs[1]:.2e} s over {num_tokens - 1}.']
    for b in self.blocks:
      guesses = ', '.join(f'{k} {v:.3f}' for k, v in b.guess_distance.items())
      lines.append(f'  block {b.block}: {b.entry}  ({b.iterations} iterations, error {b.error:.1e}; '
                   f'convergence {b.convergence:.2f} iterations per token; guess distance {guesses})')
    return '\n'.join(lines)


def step_costs(model: TarFlow, variables, batch: int, guidance: sampling.Guidance, repeats: int = 3) -> tuple:
  """Seconds of a decoding step over one token and over a whole block (T - 1 tokens), at `batch` samples.

  Timed on block 0: its sequential decoding (T - 1 one-token steps) and two plain Jacobi iterations.
  """
  z = jax.random.normal(jax.random.key(0), (batch, model.num_tokens, model.token_dim))
  labels = jnp.full((batch,), -1, jnp.int32) if model.spec.num_classes else None
  steps = model.num_tokens - 1

  def seconds(decoder, count):
    run = lambda: jax.block_until_ready(_invert(model, variables, 0, z, labels, guidance, decoder))
    run()
    best = np.inf
    for _ in range(repeats):
      start = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - start)
    return best / count

  return (seconds(sampling.Sequential(chunks=8, microbatch=None), steps),
          seconds(sampling.Jacobi(segment=0, max_iters=2, tol=0.0), 2))


def _invert(model, variables, block, z, labels, guidance, decoder):
  return sampling.invert_block(model, variables, block, z, labels, jnp.float32(guidance.weight),
                               jnp.float32(guidance.attn_temp), guided=guidance.enabled,
                               guide_what=guidance.guide_what, annealed=guidance.annealed, decoder=decoder)


def _step_cost(costs: tuple, steps: int):
  """Seconds of a step over `size` tokens: linear between one token and the whole block (`step_costs`)."""
  cost_1, cost_all = costs
  return lambda size: cost_1 + (cost_all - cost_1) * (size - 1) / max(steps - 1, 1)


def _window_cap(costs: tuple, steps: int, window: int) -> int:
  """The iterations of a window that cost as much as sequential decoding of the block (at least 1)."""
  return max(1, int(steps * costs[0] / _step_cost(costs, steps)(window)))


@dataclasses.dataclass(frozen=True)
class Trial:
  """One candidate's inversion of one block from its exact output, on the calibration batch."""
  decoder: sampling.Jacobi  # as run: a window with its iteration cap
  iterations: tuple  # per segment in order (a window: the block's)
  error: float  # largest difference of the block's input to exact decoding's


@dataclasses.dataclass(frozen=True)
class Measurement:
  """What `measure` found on a calibration batch; `choose` makes the plan for a batch to decode from it."""
  noise: jax.Array  # (B, T, D)
  labels: Optional[jax.Array]  # (B,) or None
  guidance: sampling.Guidance
  exact: jax.Array  # (B, H, W, C) exact decoding's samples, on [-1, 1]
  trials: list  # per block, a Trial per candidate
  convergence: list  # per block, plain Jacobi's iterations per token at the tightest tolerance (CRM-like)
  guess_distance: list  # per block, each initial guess's mean distance to the exact input (IGM-like)


def measure(model: TarFlow, variables, noise, labels=None, *, guidance: sampling.Guidance = sampling.Guidance(),
            costs: tuple, tried: Optional[list] = None) -> Measurement:
  """Steps 1 and 2 of the module docstring: every candidate of `tried` (default: `candidates`) on every block.

  `costs`: the step costs (`step_costs`) of the smallest batch that plans will be chosen for; they
  cap the windows' iterations, and a larger batch's cap is no larger.
  """
  num_blocks, steps = model.spec.num_blocks, model.num_tokens - 1
  tried = candidates(model.num_tokens) if tried is None else tried
  exact, trajectory = sampling.sample(model, variables, noise, labels, guidance=guidance,
                                      decoder=sampling.Sequential(microbatch=None), return_trajectory=True)
  latents = [patchify(x, model.spec.patch_size) for x in trajectory]  # noise, then the input of each block, last first
  latents[0] = latents[0] * jnp.sqrt(variables['prior']['var'])
  trials, convergence, guess_distance = [], [], []
  for i in range(num_blocks):
    z, x = latents[num_blocks - 1 - i], latents[num_blocks - i]  # block i's output and input
    mine = []
    for decoder in tried:
      if decoder.slides(i):  # no dearer than sequential decoding: stopped there, it is inexact or exact and as dear
        decoder = dataclasses.replace(decoder, max_iters=_window_cap(costs, steps, decoder.for_block(i, steps + 1)[0]))
      got, iterations = _invert(model, variables, i, z, labels, guidance, decoder)
      mine.append(Trial(decoder, tuple(int(n) for n in np.asarray(iterations)), float(jnp.abs(got - x).max())))
    plain = [t for t in mine if not t.decoder.slides(i) and t.decoder.for_block(i, steps + 1)[0] == steps
             and t.decoder.tol == min(TOLERANCES) and t.decoder.init == 'latent']
    shortest = min([t.decoder.for_block(i, steps + 1)[0] for t in mine if not t.decoder.slides(i)] or [steps])
    distance = {'latent': float(jnp.abs(z - x).mean()), 'zeros': float(jnp.abs(x).mean())}
    if shortest < steps:
      distance['prev'] = float(jnp.abs(x[:, shortest:] - x[:, :-shortest]).mean())
    trials.append(mine)
    convergence.append(sum(plain[0].iterations) / steps if plain else 0.0)
    guess_distance.append(distance)
  return Measurement(noise, labels, guidance, exact, trials, convergence, guess_distance)


def largest_difference(per_sample: np.ndarray, samples: int) -> float:
  """The largest of `samples` samples' differences, predicted from a few (`per_sample` (B,), pixel levels): the
  1 - 1/samples quantile of the log-normal fitted to them (those equal to exact decoding count as 1e-3 levels),
  and no less than the largest of them."""
  logs = np.log(np.maximum(per_sample, 1e-3))
  spread = float(np.std(logs, ddof=1)) if len(logs) > 1 else 0.0
  z = statistics.NormalDist().inv_cdf(1 - 1 / samples) if samples > 1 else 0.0
  return max(float(np.exp(logs.mean() + z * spread)), float(per_sample.max()))


def choose(model: TarFlow, variables, measured: Measurement, costs: tuple, bound: int = 2,
           samples: int = 10_000) -> Calibration:
  """Steps 3 and 4 of the module docstring: the cheapest plan within `bound` pixel levels (of 255) at these step costs.

  The bound is to hold over `samples` samples: their largest difference is predicted from the calibration
  batch's (`largest_difference`) and must stay below `bound` (bound 0: exact pixels on the calibration batch).

  A window takes this batch's cap (no more than the one it was measured at); one whose iterations on
  the calibration batch exceed it is priced above sequential decoding, which is exact, so it is never chosen.
  """
  if bound < 0:
    raise errors.UserError(f'The quality bound must be >= 0 pixel levels, got {bound}.')
  num_blocks, num_tokens, steps = model.spec.num_blocks, model.num_tokens, model.num_tokens - 1
  step_cost = _step_cost(costs, steps)
  sequential = sampling.Sequential(chunks=8, microbatch=None)
  options = []
  for i, trials in enumerate(measured.trials):
    opts = [(sampling.spell(sequential, 1, num_tokens), sequential, steps * costs[0], 0.0, steps)]
    for t in trials:
      decoder = t.decoder
      if decoder.slides(i):
        window, measured_cap = decoder.for_block(i, num_tokens)
        decoder = dataclasses.replace(decoder, max_iters=min(_window_cap(costs, steps, window), measured_cap))
      cost = sum(n * step_cost(size) for n, (size, _) in zip(t.iterations, decoder.spans(i, num_tokens)))
      opts.append((sampling.spell(decoder, 1, num_tokens), decoder, cost, t.error, sum(t.iterations)))
    options.append(sorted(opts, key=lambda m: m[2]))

  level = 2 / 255  # one pixel level on the [-1, 1] scale
  chosen = [next(m for m in opts if m[3] <= bound * level) for opts in options]
  while True:
    plan = sampling.Plan(tuple(m[1] for m in chosen), microbatch='auto')
    got = sampling.sample(model, variables, measured.noise, measured.labels, guidance=measured.guidance,
                          decoder=dataclasses.replace(plan, microbatch=None))
    pixels = [np.asarray(images.to_uint8(x), np.int32) for x in (got, measured.exact)]
    difference = int(np.abs(pixels[0] - pixels[1]).max())
    levels = np.abs(np.asarray(got - measured.exact, np.float64)) * 127.5  # (B, H, W, C): [-1, 1] is 255 levels
    predicted = largest_difference(levels.reshape(len(levels), -1).max(axis=1), samples)
    if (predicted < bound) if bound else (difference == 0):  # below `bound` in floats: within it once rounded
      break
    worst = max(range(num_blocks), key=lambda i: chosen[i][3])
    if chosen[worst][3] == 0:  # every block as exact as sequential decoding on this batch
      chosen = [next(m for m in opts if isinstance(m[1], sampling.Sequential)) for opts in options]
      continue
    chosen[worst] = next(m for m in options[worst] if m[3] < chosen[worst][3])  # sequential (error 0) at worst
  blocks = [BlockReport(i, m[0], m[4], m[2], m[3], measured.convergence[i], measured.guess_distance[i])
            for i, m in enumerate(chosen)]
  return Calibration(plan, blocks, tuple(costs), difference, predicted, samples, num_blocks * steps * costs[0])


def calibrate(model: TarFlow, variables, noise, labels=None, *, guidance: sampling.Guidance = sampling.Guidance(),
              bound: int = 2, batch: Optional[int] = None, costs: Optional[tuple] = None,
              tried: Optional[list] = None, samples: int = 10_000) -> Calibration:
  """The cheapest plan whose samples stay within `bound` pixel levels (of 255) of exact decoding, calibrated on `noise`.

  `noise`: (B, T, D); `samples`: how many samples the plan will decode, which the bound holds over
  (predicted from the B, `largest_difference`); `batch`: the batch the plan will decode, for the step
  costs (default: B); `costs` gives them instead of measuring (`step_costs`); `tried`: the Jacobi
  settings to try (default: `candidates`). `measure` then `choose`; to plan for several batches,
  measure once (at the smallest batch's costs) and choose for each. See the module docstring.
  """
  if bound < 0:
    raise errors.UserError(f'The quality bound must be >= 0 pixel levels, got {bound}.')
  costs = costs or step_costs(model, variables, batch or noise.shape[0], guidance)
  return choose(model, variables, measure(model, variables, noise, labels, guidance=guidance, costs=costs,
                                          tried=tried), costs, bound, samples)


def calibrate_fresh(model: TarFlow, variables, *, guidance: sampling.Guidance, batch: int, samples: int,
                    calibration_samples: int, seed: int, bound: int = 2, microbatch='auto') -> Calibration:
  """`calibrate` for `samples` samples decoded `batch` at a time (in micro-batches of `microbatch`, as
  `sampling.Sequential`'s), on `calibration_samples` fresh latents and, for a class-conditional model, labels
  drawn uniformly, from numpy seed `seed`: `cli.sample`'s and `cli.evaluate fid`'s --decoder=auto."""
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((calibration_samples, model.num_tokens, model.token_dim), np.float32)
  labels = (rng.integers(0, model.spec.num_classes, calibration_samples).astype(np.int32)
            if model.spec.num_classes else None)
  rows = sampling.resolve_microbatch(model, sampling.Sequential(microbatch=microbatch), batch, guidance.enabled)
  return calibrate(model, variables, jnp.asarray(noise), None if labels is None else jnp.asarray(labels),
                   guidance=guidance, bound=bound, batch=rows or batch, samples=samples)
