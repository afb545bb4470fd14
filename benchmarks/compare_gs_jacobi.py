r"""GS-Jacobi's own PyTorch sampler against ours, on the same model, latents and labels.

  python benchmarks/compare_gs_jacobi.py --gs_jacobi_dir=/path/to/GS-Jacobi_for_TarFlow \
      (--checkpoint=runs/demo | --layout=demo|imagenet64) [--batches 1 16 64] [--rounds=5] \
      [--strategy NUM_GS_LIST MAX_JACOBI_LIST GUESS_LIST]... [--ebound=1e-6] \
      [--guidance=G --guide_what=ab --attn_temp=T --annealed_guidance] [--json=PATH]

GS-Jacobi (Liu and Qin, arXiv 2505.12849; github.com/Minokori/GS-Jacobi_for_TarFlow) samples with
`GS_Jacobi_sampling.Model.reverse`, ml-tarflow's model with a per-block strategy of three lists, as
its command lines spell them (`--strategy [1,8,1,1] [10,32,10,10] [0,1,0,0]`, repeatable; default:
plain Jacobi of at most 10 iterations from the latent in every block). The model (a checkpoint, or
random weights, every one perturbed, in a layout: configs/demo.py's, or compare_sampling_speed's
imagenet64) is exported by `reference.export_reference_checkpoint` and loaded strictly into theirs.
Rows, per batch size: their sequential decoding (`num_GS_list` of zeros), ours (`seq`), each
strategy on both sides (ours as the `sampling.Plan` below), and ours `auto` (`auto_plan.calibrate`,
as `cli.sample --decoder=auto` calibrates). Each is called once (warm-up, compilation), then timed
over --rounds rounds in rotating order; pixel differences (0..255, `images.to_uint8`) are to our
exact sequential decoding; iterations per block (block 0 first): ours returned, theirs counted
(calls of a block's step, per branch). Their Model takes no nvp: its blocks are always affine;
float32 on the CPU here (their scripts use bf16 autocast on CUDA). Random weights time the decoders,
but only a trained model says how fast Jacobi converges.

How a strategy maps, and where the two differ (read from their GS_Jacobi_sampling.py):
- Order: their list entry k inverts the k-th block decoded, our block n-1-k (ours: block 0 first).
- Segments: num_GS 0 (or T) is sequential; 1 plain Jacobi over the block; 1 < n < T cuts tokens
  1..T-1 into segments of T//n (the last one token short), as our `Jacobi(segment=T//n)`. An n that
  does not divide T leaves tokens undecoded in theirs, and is refused. Guess 0 starts from the
  latent, 1 from zeros: our init=latent|zeros.
- Iterations: their max_jacobi per segment; ours is capped at the segment length (exact there),
  where theirs runs one more, to see the change vanish. Their 0 runs no iteration (ours would mean
  the segment length): refused. Capped short of convergence, both stop at the same iterate.
- Stopping: theirs stops a segment when ||dx|| / (B * C) <= ebound, the norm over the whole
  (B, S, C) segment (C the token dim, S = T//n, token 0 counted in plain Jacobi); ours when
  max |dx| <= tol. We set tol = ebound * sqrt(B * C / S): since ||dx|| <= sqrt(B * S * C) max |dx|,
  ours then never stops before theirs, and the two agree when the change is spread evenly over the
  segment. Their bound on the RMS change loosens as sqrt(B), so our tol is set per batch size.
- Clamp: their Jacobi iterates (every token, token 0 included) are clamped to [-3, 3], their
  sequential decoding is not; where a block's exact input leaves [-3, 3] their Jacobi converges to
  another answer. Ours does not clamp.
- incre1: the 8th block decoded (forward block 0 of an 8-block model) with 1 < num_GS < T decodes
  its first segment by a token loop that reads the segment index, not the token: it decodes token
  1 segment-length times, leaves the rest of the segment at its guess and caches token 0's keys in
  their place, so the block is off however many iterations run (0.24 on the [-1, 1] scale on a
  random 8-block model). That loop's annealed guidance weight is g / (T - 1) for every token. Ours
  runs the strategy as written.
- Guidance: elsewhere their annealed weights are ours, g (t + 1) / (T - 1) for token t + 1; their
  guide_what 'ac' is our 'ab'. Their reverse has no "no label" (-1 indexes the last class), so
  labels are drawn from the classes.
"""

import argparse
import ast
import importlib.util
import math
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # torch's threads sleep, not spin, on a shared machine
import torch  # pylint: disable=g-import-not-at-top

from decoding_models import add_model_args, decode_ours, draw, load, median, pixel_difference, report, timed_rounds  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from tarflow_jax import auto_plan, errors, reference, sampling  # pylint: disable=g-import-not-at-top
from tarflow_jax import model as model_lib  # pylint: disable=g-import-not-at-top


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gs_jacobi_dir', required=True, help='Checkout of Minokori/GS-Jacobi_for_TarFlow.')
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 16, 64])
  parser.add_argument('--rounds', type=int, default=5, help='Timed rounds, after one warm-up call each.')
  parser.add_argument('--strategy', nargs=3, action='append', type=ast.literal_eval,
                      metavar=('NUM_GS_LIST', 'MAX_JACOBI_LIST', 'GUESS_LIST'),
                      help='Their three lists, decoding order (entry 0: the last block of the forward pass).')
  parser.add_argument('--ebound', type=float, default=1e-6, help="Their stopping bound (default: their reverse's).")
  add_model_args(parser)
  parser.add_argument('--json', help='Write the rows here.')
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.gs_jacobi_dir, 'GS_Jacobi_sampling.py')):
    sys.exit(f'--gs_jacobi_dir={args.gs_jacobi_dir!r} holds no GS_Jacobi_sampling.py: give a checkout of '
             'Minokori/GS-Jacobi_for_TarFlow.')
  if args.rounds <= 0 or min(args.batches) <= 0:
    sys.exit('--rounds and --batches must be positive.')
  return args


def unsupported(spec) -> str:
  """Why their Model cannot compute `spec`'s model, or ''."""
  if spec.noise_conditioning or spec.shared_layers or any(
      isinstance(getattr(spec, f), tuple) for f in model_lib.PER_BLOCK_FIELDS):
    return 'GS-Jacobi\'s Model is ml-tarflow\'s: it has no noise conditioning, shared layers or per-block shapes.'
  if not spec.nvp:
    return ('GS-Jacobi\'s Model takes no nvp: its blocks are always affine (nvp=True); this model is volume '
            'preserving (nvp=False).')
  if (spec.head_dim, spec.expansion) != (reference.REFERENCE_HEAD_DIM, reference.REFERENCE_EXPANSION):
    return (f'GS-Jacobi\'s Model has head_dim={reference.REFERENCE_HEAD_DIM} and expansion='
            f'{reference.REFERENCE_EXPANSION} built in; this model has {spec.head_dim} and {spec.expansion}.')
  return ''


def their_model(gs_jacobi_dir: str, model, variables, directory: str):
  """GS_Jacobi_sampling.Model holding `variables` (loaded strictly); each block's step counts its calls in `.calls`."""
  source = os.path.join(gs_jacobi_dir, 'GS_Jacobi_sampling.py')
  spec = importlib.util.spec_from_file_location('GS_Jacobi_sampling', source)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  path = os.path.join(directory, 'model.pth')
  reference.export_reference_checkpoint(model, variables, path)
  args = {k: v for k, v in reference.reference_model_args(model.spec).items() if k != 'nvp'}
  theirs = module.Model(**args).eval()
  theirs.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), strict=True)
  theirs.calls = [0] * model.spec.num_blocks

  def counted(i, step):
    def call(*a, **k):
      theirs.calls[i] += 1
      return step(*a, **k)
    return call

  for i, block in enumerate(theirs.blocks):
    block.reverse_substep = counted(i, block.reverse_substep)
  return theirs


def decode_theirs(theirs, noise, labels, guidance: sampling.Guidance, strategy, ebound: float):
  """Their `Model.reverse` of noise (B, T, C): images (B, H, W, C) and each block's steps (block 0 first)."""
  theirs.calls[:] = [0] * len(theirs.calls)
  num_gs, max_jacobi, guesses = strategy
  with torch.inference_mode():
    x = theirs.reverse(torch.from_numpy(np.asarray(noise)), None if labels is None else torch.from_numpy(
        np.asarray(labels)).long(), guidance.weight, guidance.guide_what.replace('b', 'c'), guidance.attn_temp,
                       guidance.annealed, num_GS_list=list(num_gs), max_jacobi_list=list(max_jacobi),
                       guess_list=list(guesses), ebound=ebound)
  branches = 2 if guidance.enabled else 1
  return x.numpy().transpose(0, 2, 3, 1), [c // branches for c in theirs.calls]


def our_plan(strategy, model, batch: int, ebound: float) -> sampling.Plan:
  """Their strategy (three lists, decoding order) as our plan (block 0 first), their ebound as our tol (docstring)."""
  n, num_tokens = model.spec.num_blocks, model.num_tokens
  if not all(isinstance(entries, (list, tuple)) and len(entries) == n for entries in strategy):
    raise errors.UserError(f'Strategy {strategy}: three lists (num_GS, max_jacobi, guess) of {n} entries, one per '
                           'block, expected.')
  num_gs, max_jacobi, guesses = strategy
  entries = []
  for k in reversed(range(n)):  # their entry k is our block n-1-k
    segments, iters = num_gs[k], max_jacobi[k]
    if segments < 1 or segments == num_tokens:
      entries.append(sampling.Sequential())
      continue
    if segments > num_tokens or num_tokens % segments:
      raise errors.UserError(f'Strategy {strategy}: num_GS={segments} does not divide the {num_tokens} tokens '
                             '(their segments would leave tokens undecoded).')
    if iters < 1:
      raise errors.UserError(f'Strategy {strategy}: max_jacobi={iters} runs no iteration.')
    size = num_tokens // segments  # num_GS=1: T, which our Jacobi clips to the T - 1 tokens to decode
    tol = ebound * math.sqrt(batch * model.token_dim / size)
    entries.append(sampling.Jacobi(segment=size, max_iters=iters, tol=tol, init='zeros' if guesses[k] else 'latent'))
  return sampling.Plan(tuple(entries))


def compare_at(batch: int, args, model, variables, theirs, guidance, strategies) -> list:
  """The rows at one batch size: each decoder's times, iterations and pixel differences to our sequential decoding."""
  rng = np.random.default_rng(args.seed + batch)
  noise, labels = draw(model, batch, rng)
  calibration_noise, calibration_labels = draw(model, args.calibration_samples, rng)
  rows = sampling.resolve_microbatch(model, sampling.Sequential(), batch, guidance.enabled) or batch
  auto = auto_plan.calibrate(model, variables, jnp.asarray(calibration_noise), None if calibration_labels is None else
                             jnp.asarray(calibration_labels), guidance=guidance, bound=args.quality_bound, batch=rows)
  n, spell = model.spec.num_blocks, lambda d: sampling.spell(d, n, model.num_tokens)
  sequential = ([0] * n, [1] * n, [0] * n)
  runs = [('sequential', 'theirs', str(sequential), sequential), ('seq', 'ours', spell(sampling.Sequential()),
                                                                 sampling.Sequential())]
  for i, s in enumerate(strategies):
    plan = our_plan(s, model, batch, args.ebound)
    runs += [(f'strategy {i}', 'theirs', str(s), s), (f'strategy {i}', 'ours', spell(plan), plan)]
  runs.append(('auto', 'ours', spell(auto.plan), auto.plan))

  def call(side, decoder):
    if side == 'theirs':
      return lambda: decode_theirs(theirs, noise, labels, guidance, decoder, args.ebound)
    return lambda: decode_ours(model, variables, noise, labels, guidance, decoder)

  results, times = timed_rounds([call(side, decoder) for _, side, _, decoder in runs], args.rounds)
  exact = results[1][0]  # ours, seq
  out = []
  for (name, side, spelled, _), (x, iterations), t in zip(runs, results, times):
    largest, mean, nonfinite = pixel_difference(x, exact)
    out.append(dict(batch=batch, decoder=name, side=side, setting=spelled, median_s=median(t), times_s=t,
                    iterations=[int(np.sum(i)) for i in iterations], max_pixel_difference=largest,
                    mean_pixel_difference=mean, nonfinite_samples=nonfinite))
  return out


def table(rows: list) -> str:
  lines = ['| batch | decoder | side | median s | iterations per block (block 0 first) | max px diff | mean px diff |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["batch"]} | {r["decoder"]} | {r["side"]} | {r["median_s"]:.3f} | '
                 f'{"/".join(map(str, r["iterations"]))} | {r["max_pixel_difference"]}'
                 f'{f" ({n} samples not finite)" if (n := r["nonfinite_samples"]) else ""} | '
                 f'{r["mean_pixel_difference"]:.3f} |')
  settings = {}  # (decoder, side, setting) -> the batches it ran at (our tol depends on the batch)
  for r in rows:
    settings.setdefault((r['decoder'], r['side'], r['setting']), []).append(str(r['batch']))
  lines += ['', 'Settings (theirs: num_GS, max_jacobi and guess lists, decoding order; ours: the plan, block 0 first):']
  lines += [f'- {name}, {side} (batch {", ".join(b)}): {setting}' for (name, side, setting), b in settings.items()]
  return '\n'.join(lines)


def main():
  args = parse_args()
  try:
    model, variables, guidance = load(args)
    problem = unsupported(model.spec)
    if problem:
      sys.exit(problem)
    n = model.spec.num_blocks
    strategies = args.strategy or [([1] * n, [10] * n, [0] * n)]
    for s in strategies:
      our_plan(s, model, 1, args.ebound)  # refuses a strategy before any decoding
    with tempfile.TemporaryDirectory() as directory:
      theirs = their_model(args.gs_jacobi_dir, model, variables, directory)
    rows = [r for b in args.batches for r in compare_at(b, args, model, variables, theirs, guidance, strategies)]
  except errors.UserError as e:
    sys.exit(str(e))
  report(args, model, guidance, table(rows), rows, ebound=args.ebound, torch=f'{torch.__version__} cpu')


if __name__ == '__main__':
  main()
