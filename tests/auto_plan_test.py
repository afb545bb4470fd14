"""The automatic decoding plan: within its quality bound of exact decoding, cheaper where Jacobi iterations are cheap."""

import jax
import numpy as np
import pytest

from tarflow_jax import auto_plan, errors, images, sampling
import toy


@pytest.fixture(scope='module')
def model_and_variables():
  model = toy.tiny_model(num_classes=3, img_size=8, num_blocks=3)  # 16 tokens of 8
  return model, toy.random_variables(model)


def pixels(x):
  return np.asarray(images.to_uint8(x), np.int32)


@pytest.mark.parametrize('guidance', [0.0, 1.0])
def test_the_plan_stays_within_its_bound_on_a_held_out_batch(model_and_variables, guidance):
  model, variables = model_and_variables
  guidance = sampling.Guidance(guidance)
  noise = jax.random.normal(jax.random.key(1), (4, model.num_tokens, model.token_dim))
  labels = jax.numpy.array([0, 1, 2, -1])
  # A Jacobi iteration over the whole block costs two one-token steps: Jacobi pays wherever it converges fast.
  calibration = auto_plan.calibrate(model, variables, noise, labels, guidance=guidance, bound=2, costs=(1.0, 2.0))
  assert calibration.pixel_difference <= 2 and len(calibration.blocks) == model.spec.num_blocks
  assert any(isinstance(d, sampling.Jacobi) for d in calibration.plan.blocks), calibration.describe(16)
  assert calibration.speedup > 1
  held_out = jax.random.normal(jax.random.key(2), (4, model.num_tokens, model.token_dim))
  exact = sampling.sample(model, variables, held_out, labels, guidance=guidance)
  got = sampling.sample(model, variables, held_out, labels, guidance=guidance, decoder=calibration.plan)
  assert np.abs(pixels(got) - pixels(exact)).max() <= 2
  # The report spells each block as --decoder does, and the plan reads back from it.
  spelled = ','.join(b.entry for b in calibration.blocks)
  assert sampling.spell(sampling.parse_plan(spelled, 3), 3, 16) == sampling.spell(calibration.plan, 3, 16)
  for b in calibration.blocks:
    assert 0 < b.convergence <= 1 and set(b.guess_distance) == {'latent', 'zeros', 'prev'}


def test_where_jacobi_iterations_cost_as_much_as_the_tokens_the_plan_is_sequential(model_and_variables):
  model, variables = model_and_variables
  noise = jax.random.normal(jax.random.key(3), (2, model.num_tokens, model.token_dim))
  calibration = auto_plan.calibrate(model, variables, noise, costs=(1.0, 15.0))  # a step costs its tokens
  assert all(isinstance(d, sampling.Sequential) for d in calibration.plan.blocks), calibration.describe(16)
  assert calibration.pixel_difference == 0 and calibration.speedup == pytest.approx(1.0)


def test_a_bound_of_zero_keeps_the_pixels_of_exact_decoding(model_and_variables):
  model, variables = model_and_variables
  noise = jax.random.normal(jax.random.key(4), (2, model.num_tokens, model.token_dim))
  calibration = auto_plan.calibrate(model, variables, noise, bound=0, costs=(1.0, 1.0))
  exact = sampling.sample(model, variables, noise)
  np.testing.assert_array_equal(pixels(sampling.sample(model, variables, noise, decoder=calibration.plan)),
                                pixels(exact))
  with pytest.raises(errors.UserError, match='must be >= 0 pixel levels'):
    auto_plan.calibrate(model, variables, noise, bound=-1, costs=(1.0, 1.0))


def test_largest_difference_predicts_the_worst_of_many_log_normal_samples():
  rng = np.random.default_rng(0)
  draws = lambda n: rng.lognormal(-2.4, 1.0, n)  # per-sample differences as plain Jacobi's at tol 1e-2 (levels)
  # Fitted on many, it is the 1 - 1/N quantile of a million more, computed by numpy.
  predicted = auto_plan.largest_difference(draws(2000), 10_000)
  assert predicted == pytest.approx(np.quantile(draws(10**6), 1 - 1 / 10_000), rel=0.15)
  few = draws(8)
  grows = [auto_plan.largest_difference(few, n) for n in (1, 8, 1000, 10_000)]
  assert grows[0] == few.max() and grows == sorted(grows) and grows[-1] > 3 * few.max()
  assert auto_plan.largest_difference(np.zeros(4), 10_000) == pytest.approx(1e-3)  # exact decoding stays exact


def test_more_samples_to_decode_take_a_tighter_plan_that_holds_on_them(model_and_variables):
  model, variables = model_and_variables
  noise = jax.random.normal(jax.random.key(1), (4, model.num_tokens, model.token_dim))
  tried = [sampling.Jacobi(segment=15, tol=tol) for tol in (0.3, 0.1, 0.03, 1e-3)]
  measured = auto_plan.measure(model, variables, noise, costs=(1.0, 1.0), tried=tried)
  few = auto_plan.choose(model, variables, measured, (1.0, 1.0), bound=1, samples=4)
  many = auto_plan.choose(model, variables, measured, (1.0, 1.0), bound=1, samples=10**8)
  assert few.predicted_difference < 1 and many.predicted_difference < 1
  assert many.speedup < few.speedup, (few.describe(16), many.describe(16))
  held_out = jax.random.normal(jax.random.key(7), (64, model.num_tokens, model.token_dim))
  exact = pixels(sampling.sample(model, variables, held_out))
  assert np.abs(pixels(sampling.sample(model, variables, held_out, decoder=many.plan)) - exact).max() <= 1


def test_step_costs_are_measured(model_and_variables):
  model, variables = model_and_variables
  one, whole = auto_plan.step_costs(model, variables, 2, sampling.Guidance(), repeats=1)
  assert 0 < one and 0 < whole


def test_candidates_cover_segments_tolerances_and_guesses():
  got = auto_plan.candidates(1024)
  assert {d.segment for d in got if not d.window} == {1023, 256, 64}
  assert {d.window for d in got if d.window} == {256, 64}  # windows sliding past settled tokens
  assert {d.init for d in got if d.window} == {'latent', 'zeros'}
  assert {d.init for d in got if d.segment == 64} == set(sampling.INITIAL_GUESSES)
  assert {d.init for d in got if d.segment == 1023} == {'latent', 'zeros'}  # one segment: no segment before
  assert {d.tol for d in got} == set(auto_plan.TOLERANCES)


def test_one_measurement_plans_every_batch_as_calibrating_for_each_would(model_and_variables):
  model, variables = model_and_variables
  noise = jax.random.normal(jax.random.key(5), (2, model.num_tokens, model.token_dim))
  cheap, dear = (1.0, 2.0), (1.0, 12.0)  # a small batch's step costs, and a larger one's (a window's cap is lower)
  measured = auto_plan.measure(model, variables, noise, costs=cheap)
  # Some window ran past the dearer batch's cap (4 iterations of a 4-token window): choose must drop it there.
  assert any(t.decoder.window and sum(t.iterations) > 4 for trials in measured.trials for t in trials)
  for costs in (cheap, dear):
    chosen = auto_plan.choose(model, variables, measured, costs)
    direct = auto_plan.calibrate(model, variables, noise, costs=costs)
    assert sampling.spell(chosen.plan, 3, 16) == sampling.spell(direct.plan, 3, 16)
    assert chosen.blocks == direct.blocks and chosen.pixel_difference == direct.pixel_difference
