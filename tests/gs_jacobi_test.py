"""GS-Jacobi's own sampler against ours (benchmarks/compare_gs_jacobi.py) on a tiny random model: their sequential
decoding is ours, and a strategy run to convergence gives the sequential answer on both sides. Runs where
$TARFLOW_GS_JACOBI_DIR names a checkout of Minokori/GS-Jacobi_for_TarFlow and torch is installed (marker `extras`)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import errors, sampling
from tarflow_jax.model import unpatchify
import toy

pytestmark = pytest.mark.extras


@pytest.fixture(scope='module')
def compare():
  """benchmarks/compare_gs_jacobi.py and the checkout, where both can run."""
  directory = os.environ.get('TARFLOW_GS_JACOBI_DIR', '')
  if not directory or not os.path.isfile(os.path.join(directory, 'GS_Jacobi_sampling.py')):
    pytest.skip('TARFLOW_GS_JACOBI_DIR does not point at a checkout of Minokori/GS-Jacobi_for_TarFlow')
  pytest.importorskip('torch')
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
  try:
    import compare_gs_jacobi  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return compare_gs_jacobi, directory


def test_their_decoders_agree_with_ours(compare, tmp_path):
  script, directory = compare
  model = toy.tiny_model(channels=64, head_dim=64, img_size=8, num_classes=3)  # 2 blocks, 16 tokens of 8
  variables = toy.random_variables(model)
  theirs = script.their_model(directory, model, variables, str(tmp_path))
  steps = model.num_tokens - 1
  noise = 0.5 * np.random.default_rng(0).standard_normal((3, model.num_tokens, model.token_dim)).astype(np.float32)
  labels = np.array([0, 1, 2], np.int32)
  guidance = sampling.Guidance(weight=1.0, guide_what='ab', attn_temp=0.8, annealed=True)
  exact, trajectory = sampling.sample(model, variables, jnp.asarray(noise), jnp.asarray(labels), guidance=guidance,
                                      return_trajectory=True)
  assert max(float(jnp.abs(x).max()) for x in trajectory) < 3  # their Jacobi clamps every block's input to [-3, 3]
  assert float(jnp.abs(exact - unpatchify(jnp.asarray(noise), 2, 8)).max()) > 0.1  # not the identity

  got, calls = script.decode_theirs(theirs, noise, labels, guidance, ([0, 0], [1, 1], [0, 0]), 1e-6)
  np.testing.assert_allclose(got, exact, atol=1e-4)
  assert calls == [steps, steps]

  # Decoding order: their entry 0 is our block 1. One segment per block, and four of 4 tokens, converged.
  for strategy in (([1, 1], [32, 32], [0, 1]), ([4, 1], [8, 32], [1, 0])):
    plan = script.our_plan(strategy, model, 3, 1e-9)
    ours, iterations = script.decode_ours(model, variables, noise, labels, guidance, plan)
    iterations = [int(i.sum()) for i in iterations]  # per block, summed over segments
    got, calls = script.decode_theirs(theirs, noise, labels, guidance, strategy, 1e-9)
    np.testing.assert_allclose(ours, exact, atol=1e-4)
    np.testing.assert_allclose(got, exact, atol=1e-4)
    assert all(1 < i <= steps for i in iterations) and all(1 < c <= steps + 4 for c in calls), (iterations, calls)
  assert plan.blocks[1] == sampling.Jacobi(segment=4, max_iters=8, tol=plan.blocks[1].tol, init='zeros')
  assert script.our_plan(([0, 16], [1, 1], [0, 0]), model, 1, 1e-6).blocks == (sampling.Sequential(),) * 2

  # Capped short of convergence, both sides stop at the same iterate.
  strategy = ([1, 1], [3, 3], [0, 0])
  plan = script.our_plan(strategy, model, 3, 1e-6)
  ours, iterations = script.decode_ours(model, variables, noise, labels, guidance, plan)
  got, calls = script.decode_theirs(theirs, noise, labels, guidance, strategy, 1e-6)
  assert float(np.abs(ours - exact).max()) > 1e-3 and [int(i.sum()) for i in iterations] == calls == [3, 3]
  np.testing.assert_allclose(got, ours, atol=1e-5)


def test_refuses_what_their_model_cannot_compute(compare):
  script, _ = compare
  assert 'nvp' in script.unsupported(toy.tiny_model(nvp=False, head_dim=64, channels=64).spec)
  assert 'head_dim' in script.unsupported(toy.tiny_model().spec)
  assert not script.unsupported(toy.tiny_model(head_dim=64, channels=64).spec)
  model = toy.tiny_model(head_dim=64, channels=64, img_size=8)  # 16 tokens
  with pytest.raises(errors.UserError, match='does not divide'):
    script.our_plan(([3, 1], [4, 4], [0, 0]), model, 1, 1e-6)
  with pytest.raises(errors.UserError, match='runs no iteration'):
    script.our_plan(([1, 1], [0, 4], [0, 0]), model, 1, 1e-6)
  with pytest.raises(errors.UserError, match='of 2 entries'):
    script.our_plan(([1, 1, 1], [4, 4, 4], [0, 0, 0]), model, 1, 1e-6)
