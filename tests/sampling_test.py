"""The compiled sampler against a plain Python-loop inverse, invertibility, and denoising."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tarflow_jax import errors, likelihood, sampling
from tarflow_jax.model import FlowBlock, on_block, patchify, unpatchify
import toy


def loop_inverse(model, variables, noise, y, **guidance):
  """Reference inverse: one full causal pass per token, no cache, guidance as two separate passes."""
  return loop_trajectory(model, variables, noise, y, **guidance)[-1]


def loop_trajectory(model, variables, noise, y, guidance=0.0, guide_what='ab', attn_temp=1.0, annealed=False):
  """`loop_inverse`'s images (B, H, W, C) before the blocks (the noise, unscaled) and after inverting each block."""
  image = lambda x: unpatchify(jnp.asarray(x, jnp.float32), model.spec.patch_size, model.spec.img_size)
  trajectory = [image(noise)]
  x = np.array(noise * np.sqrt(variables['prior']['var']), np.float64)
  batch, num_tokens, _ = x.shape
  y_uncond = None if not model.spec.num_classes else jnp.full((batch,), -1)
  affine = jax.jit(lambda i, h, y, temp: model.apply(variables, jnp.asarray(h, jnp.float32), y, temp,
                                                     method=on_block(i, FlowBlock.affine_params)), static_argnums=0)
  for i in reversed(range(model.spec.num_blocks)):
    h = x[:, ::-1].copy() if i % 2 else x.copy()  # reading order of block i
    for t in range(num_tokens - 1):
      a, b = affine(i, h, y, None)
      a, b = np.asarray(a[:, t + 1], np.float64), np.asarray(b[:, t + 1], np.float64)
      if guidance > 0:
        temp = jnp.full((batch,), attn_temp)
        a_u, b_u = affine(i, h, y_uncond, temp)
        a_u, b_u = np.asarray(a_u[:, t + 1]), np.asarray(b_u[:, t + 1])
        g = guidance * (t + 1) / (num_tokens - 1) if annealed else guidance
        if 'a' in guide_what:
          a = a + g * (a - a_u)
        if 'b' in guide_what:
          b = b + g * (b - b_u)
      h[:, t + 1] = h[:, t + 1] * np.exp(a) + b
    x = h[:, ::-1] if i % 2 else h
    trajectory.append(image(x))
  return trajectory


SETTINGS = [
    dict(num_classes=3, guidance=0.0),
    dict(num_classes=3, guidance=1.5, guide_what='ab'),
    dict(num_classes=3, guidance=2.0, guide_what='a', attn_temp=0.7, annealed=True),
    dict(num_classes=3, guidance=1.0, guide_what='b', attn_temp=0.8, labels=False),  # no labels given
    dict(num_classes=0, guidance=0.0, nvp=False),
    dict(num_classes=0, guidance=1.0, attn_temp=0.6),  # attention-temperature guidance
]


@pytest.mark.parametrize('setting', SETTINGS, ids=lambda s: '-'.join(f'{k}={v}' for k, v in s.items()))
def test_sampler_equals_loop_inverse(setting):
  setting = dict(setting)
  model = toy.tiny_model(num_classes=setting.pop('num_classes'), nvp=setting.pop('nvp', True), img_size=6)
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(5), (3, model.num_tokens, model.token_dim))
  y = jnp.array([0, 2, -1]) if model.spec.num_classes and setting.pop('labels', True) else None
  setting.pop('labels', None)
  annealed = setting.pop('annealed', False)
  guidance = sampling.Guidance(setting['guidance'], setting.get('guide_what', 'ab'), setting.get('attn_temp', 1.0),
                               annealed)
  got = sampling.sample(model, variables, noise, y, guidance=guidance)
  want = loop_inverse(model, variables, noise, y, annealed=annealed, **setting)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # A check that can fail: guidance changes the result.
  if setting['guidance'] > 0:
    plain = sampling.sample(model, variables, noise, y)
    assert float(jnp.abs(plain - got).max()) > 1e-3


@pytest.mark.parametrize('chunks', [3, 5])  # not the default 8: a fresh trace sees MIN_CHUNK=1
def test_chunked_decoding_equals_loop_inverse(chunks, monkeypatch):
  monkeypatch.setattr(sampling, 'MIN_CHUNK', 1)
  model = toy.tiny_model(num_classes=3, img_size=6)  # 9 tokens: 8 decoding steps
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(6), (2, model.num_tokens, model.token_dim))
  y = jnp.array([1, -1])
  got = sampling.sample(model, variables, noise, y, guidance=sampling.Guidance(1.0),
                        decoder=sampling.Sequential(chunks=chunks))
  np.testing.assert_allclose(got, loop_inverse(model, variables, noise, y, guidance=1.0), atol=2e-5, rtol=0)
  bounds = sampling.decode_chunks(model.num_tokens, chunks)
  assert len(bounds) == chunks and bounds[0][0] == 0 and bounds[-1][1] == 8
  assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))


@pytest.mark.parametrize('num_classes, guidance', [(3, 1.0), (0, 0.0)])
def test_microbatches_decode_each_sample_as_the_whole_batch(num_classes, guidance):
  model = toy.tiny_model(num_classes=num_classes, img_size=6)
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(7), (6, model.num_tokens, model.token_dim))
  y = jnp.array([0, 1, 2, -1, 1, 0]) if num_classes else None
  want = loop_inverse(model, variables, noise, y, guidance=guidance)
  for microbatch in (1, 2, 3):
    got = sampling.sample(model, variables, noise, y, guidance=sampling.Guidance(guidance),
                          decoder=sampling.Sequential(microbatch=microbatch))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Over a batch split between devices, too.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('data',))
  spread = jax.device_put(noise, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  got = sampling.sample(model, variables, spread, y, guidance=sampling.Guidance(guidance),
                        decoder=sampling.Sequential(microbatch=3))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match='microbatch=4 must divide the batch of 6 samples'):
    sampling.sample(model, variables, noise, y, decoder=sampling.Sequential(microbatch=4))


def test_decode_chunks_are_at_least_min_chunk_long():
  assert sampling.decode_chunks(49, 8) == [(0, 16), (16, 32), (32, 48)]
  assert sampling.decode_chunks(10, 8) == [(0, 9)]
  assert len(sampling.decode_chunks(1024, 8)) == 8


@pytest.mark.parametrize('nvp, num_classes', [(True, 0), (False, 0), (True, 4)])
def test_sample_inverts_forward(nvp, num_classes):
  model = toy.tiny_model(nvp=nvp, num_classes=num_classes, num_blocks=3)
  variables = toy.random_variables(model)
  x = toy.images(model)
  y = jnp.array([1, 3, -1]) if num_classes else None
  z, _, _ = model.apply(variables, x, y)
  noise = z / jnp.sqrt(variables['prior']['var'])
  np.testing.assert_allclose(sampling.sample(model, variables, noise, y), x, atol=1e-5)
  assert float(jnp.abs(z - patchify(x, model.spec.patch_size)).max()) > 1e-2  # the flow is not the identity


def test_second_call_does_not_recompile():
  model = toy.tiny_model(num_classes=2)
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(0), (2, model.num_tokens, model.token_dim))
  y = jnp.array([0, 1])
  sampling.sample(model, variables, noise, y, guidance=sampling.Guidance(1.0))
  compiled = sampling._sample._cache_size()  # pylint: disable=protected-access
  sampling.sample(model, variables, noise + 1.0, y + 0, guidance=sampling.Guidance(2.5, attn_temp=0.8))
  assert sampling._sample._cache_size() == compiled  # pylint: disable=protected-access


def test_score_matches_finite_differences():
  with jax.enable_x64(True):
    model = toy.tiny_model(num_classes=2, dtype=jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), toy.random_variables(model))
    x = toy.images(model, batch=2).astype(jnp.float64)
    y = jnp.array([1, 0])
    grad = np.asarray(sampling.score(model, variables, x, y))
    eps = 1e-6
    rng = np.random.default_rng(0)
    log_prob = jax.jit(lambda x: likelihood.log_prob(model, variables, x, y))
    for _ in range(5):
      idx = tuple(rng.integers(0, s) for s in x.shape)
      e = jnp.zeros_like(x).at[idx].set(eps)
      fd = (log_prob(x + e) - log_prob(x - e)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd[idx[0]], rtol=1e-6, atol=1e-8)
      other = 1 - idx[0]  # images are independent: no gradient across the batch
      np.testing.assert_allclose(fd[other], 0.0, atol=1e-8)


def test_denoise_step_size():
  model = toy.tiny_model()
  variables = toy.random_variables(model)
  x = toy.images(model)
  score = sampling.score(model, variables, x)
  np.testing.assert_allclose(sampling.denoise(model, variables, x, sigma=0.1, step_scale=1.2),
                             x + 1.2 * 0.01 * score, rtol=1e-6, atol=1e-7)


def test_bad_sampler_input_is_refused():
  model = toy.tiny_model(num_classes=2)
  variables = toy.random_variables(model)
  noise = jnp.zeros((2, model.num_tokens, model.token_dim))
  with pytest.raises(ValueError, match=r'Expected noise of shape \(batch, 4, 8\)'):
    sampling.sample(model, variables, jnp.zeros((2, 4, 4)))
  with pytest.raises(TypeError, match='decoder must be Sequential'):
    sampling.sample(model, variables, noise, decoder=8)  # the former chunks argument
  with pytest.raises(ValueError, match=r'Labels must lie in \[0, 1\]'):
    sampling.sample(model, variables, noise, jnp.array([0, 2]))
  uncond = toy.tiny_model()
  with pytest.raises(ValueError, match='attn_temp'):
    sampling.sample(uncond, toy.random_variables(uncond), noise, guidance=sampling.Guidance(1.0))


@pytest.mark.parametrize('jacobi, guidance', [
    (sampling.Jacobi(segment=0, tol=0.0), 0.0),  # plain Jacobi over the whole block
    (sampling.Jacobi(segment=3, tol=0.0), 1.5),  # Gauss-Seidel-Jacobi, last segment shorter
    (sampling.Jacobi(segment=(2, 8), max_iters=(2, 0), tol=0.0), 1.0),  # per-block settings
    (sampling.Jacobi(window=3, tol=0.0), 1.5),  # a sliding window
    (sampling.Jacobi(segment=(0, 3), window=(4, 0), tol=0.0, init='zeros'), 1.0),  # a window, then segments
])
def test_exact_jacobi_equals_the_sequential_sampler(jacobi, guidance):
  model = toy.tiny_model(num_classes=3, img_size=6)  # 9 tokens
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(7), (3, model.num_tokens, model.token_dim))
  y = jnp.array([0, 1, 2])
  guidance = sampling.Guidance(guidance, annealed=True)
  want = sampling.sample(model, variables, noise, y, guidance=guidance)
  got, iterations = sampling.sample(model, variables, noise, y, guidance=guidance, decoder=jacobi,
                                    return_iterations=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  for i, its in enumerate(iterations):
    segment, _ = jacobi.for_block(i, model.num_tokens)
    if jacobi.slides(i):  # one count for the block, never more than sequential decoding's steps
      assert len(its) == 1 and int(its[0]) <= model.num_tokens - 1
    else:
      assert len(its) == -(-(model.num_tokens - 1) // segment)
      assert int(its.max()) <= segment


def test_jacobi_with_a_tolerance_stops_early():
  model = toy.tiny_model(img_size=8)  # 16 tokens
  variables = toy.random_variables(model, scale=0.01)
  noise = jax.random.normal(jax.random.key(8), (2, model.num_tokens, model.token_dim))
  exact = sampling.sample(model, variables, noise)
  got, iterations = sampling.sample(model, variables, noise, decoder=sampling.Jacobi(tol=1e-5), return_iterations=True)
  assert all(int(its[0]) < model.num_tokens - 1 for its in iterations), iterations
  np.testing.assert_allclose(got, exact, atol=1e-4)
  # A cap of one iteration is not exact: the iterations matter.
  capped = sampling.sample(model, variables, noise, decoder=sampling.Jacobi(max_iters=1, tol=0.0))
  assert float(jnp.abs(capped - exact).max()) > 1e-2


def loop_window(model, variables, z, window, iterations, tol, init='latent', block=0):
  """The sliding-window Jacobi inverse of one block from z, each iteration one full causal pass (no cache).

  As the sampler's key/value cache, inputs the window has passed are seen as they were in the last
  iteration that computed from them. Returns the block's input (B, T, D) in the original order and the
  iterations run.
  """
  affine = jax.jit(lambda h: model.apply(variables, h, method=on_block(block, FlowBlock.affine_params)))
  z = np.asarray(z, np.float64)
  z = z[:, ::-1].copy() if block % 2 else z  # reading order
  x = z.copy()
  if init == 'zeros':
    x[:, 1:] = 0
  seen = x.copy()
  steps, first, count = z.shape[1] - 1, 1, 0
  while first <= steps and count < iterations:
    start = min(first - 1, steps - window)
    h = np.concatenate([seen[:, :start], x[:, start:]], axis=1)
    a, b = (np.asarray(v, np.float64) for v in affine(jnp.asarray(h, jnp.float32)))
    seen[:, start:start + window] = x[:, start:start + window]
    moved = None
    for j in range(max(first, start + 1), start + window + 1):
      new = z[:, j] * np.exp(a[:, j]) + b[:, j]
      if moved is None and np.abs(new - x[:, j]).max() > tol:
        moved = j
      x[:, j] = new
    first = (start + window if moved is None else moved) + 1
    count += 1
  return (x[:, ::-1] if block % 2 else x), count


@pytest.mark.parametrize('window, iterations, tol, init', [
    (3, 2, 0.0, 'latent'),  # capped: the tokens it has not reached keep their latent
    (4, 3, 0.0, 'zeros'),
    (8, 100, 0.0, 'latent'),  # the whole block: exact
    (3, 100, 1e-3, 'latent'),  # settled within the tolerance
])
@pytest.mark.parametrize('block', [0, 1])
def test_a_sliding_window_equals_its_loop_without_a_cache(window, iterations, tol, init, block):
  model = toy.tiny_model(img_size=6, num_blocks=2)  # 9 tokens; block 1 reads them in reverse
  variables = toy.random_variables(model, scale=0.05)
  z = jax.random.normal(jax.random.key(15), (2, model.num_tokens, model.token_dim))
  decoder = sampling.Jacobi(window=window, max_iters=iterations, tol=tol, init=init)
  got, count = sampling.invert_block(model, variables, block, z, None, 0.0, 1.0, guided=False, guide_what='ab',
                                     annealed=False, decoder=decoder)
  want, want_count = loop_window(model, variables, z, window, iterations, tol, init, block)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert count.tolist() == [want_count]


def test_a_sliding_window_skips_settled_tokens():
  model = toy.tiny_model(img_size=8)  # 16 tokens; small weights: Jacobi converges in a few iterations
  variables = toy.random_variables(model, scale=0.01)
  noise = jax.random.normal(jax.random.key(8), (2, model.num_tokens, model.token_dim))
  exact = sampling.sample(model, variables, noise)
  work = {}
  for name, decoder in [('plain', sampling.Jacobi(tol=1e-5)), ('window', sampling.Jacobi(window=4, tol=1e-5))]:
    got, iterations = sampling.sample(model, variables, noise, decoder=decoder, return_iterations=True)
    np.testing.assert_allclose(got, exact, atol=1e-4)
    size, _ = decoder.for_block(0, model.num_tokens)
    work[name] = sum(int(its.sum()) for its in iterations) * size  # tokens computed
  assert work['window'] < work['plain'] / 1.5, work


def test_guidance_is_validated():
  with pytest.raises(ValueError, match='guide_what must be one of'):
    sampling.Guidance(1.0, guide_what='c')
  with pytest.raises(ValueError, match='guidance must be >= 0, got -0.5'):
    sampling.Guidance(-0.5)
  assert not sampling.Guidance().enabled and sampling.Guidance(0.5).enabled


def _config(num_classes, **sample):
  return ml_collections.ConfigDict(dict(
      model=dict(num_classes=num_classes),
      noise=dict(type='gaussian', std=0.1),
      sample=dict(dict(guidance=1.5, guide_what='a', attn_temp=1.0, annealed_guidance=True, denoise=True,
                       denoise_scale=1.2), **sample)))


def test_guidance_from_config():
  assert sampling.guidance_from_config(_config(10)) == sampling.Guidance(1.5, 'a', 1.0, annealed=True)
  # An unconditional model guides only by attention temperature: at 1.0 guidance is off.
  assert sampling.guidance_from_config(_config(0)) == sampling.Guidance(0.0, 'a', 1.0, annealed=True)
  assert sampling.guidance_from_config(_config(0, attn_temp=0.7)).weight == 1.5
  # Overrides (the sample command's flags) take part: a temperature turns the config's weight on...
  assert sampling.guidance_from_config(_config(0), attn_temp=0.8) == sampling.Guidance(1.5, 'a', 0.8, annealed=True)
  # ...and a weight given explicitly is kept, for `sample` to refuse.
  assert sampling.guidance_from_config(_config(0), weight=2.0).weight == 2.0
  assert sampling.guidance_from_config(_config(10), weight=0.0, guide_what='b').guide_what == 'b'


def test_denoising_from_config():
  assert sampling.denoising_from_config(_config(10)) == sampling.Denoising(True, 0.1, 1.2)
  assert not sampling.denoising_from_config(_config(10, denoise=False)).enabled
  uniform = _config(10)
  uniform.noise.type = 'uniform'
  assert not sampling.denoising_from_config(uniform).enabled
  assert sampling.denoising_from_config(uniform, enabled=True, sigma=0.2) == sampling.Denoising(True, 0.2, 1.2)


def test_sequential_decoding_reports_one_iteration_per_token():
  model = toy.tiny_model(img_size=6)  # 9 tokens
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(9), (2, model.num_tokens, model.token_dim))
  images, iterations = sampling.sample(model, variables, noise, return_iterations=True)
  np.testing.assert_array_equal(images, sampling.sample(model, variables, noise))
  assert [its.tolist() for its in iterations] == [[model.num_tokens - 1]] * model.spec.num_blocks


@pytest.fixture(scope='module')
def conditional_vp():
  """A class-conditional model with a learned prior variance (nvp=False): the noise is scaled after its entry 0."""
  model = toy.tiny_model(num_classes=3, nvp=False)
  return model, toy.random_variables(model)


DECODERS = {'sequential': sampling.Sequential(), 'jacobi': sampling.Jacobi(tol=0.0)}


@pytest.mark.parametrize('decoder', DECODERS.values(), ids=DECODERS.keys())
def test_trajectory_is_the_forward_pass_backwards(conditional_vp, decoder):
  model, variables = conditional_vp
  x, y = toy.images(model, batch=2), jnp.array([2, -1])
  z, _, block_latents = model.apply(variables, x, y)
  noise = z / jnp.sqrt(variables['prior']['var'])
  images, trajectory = sampling.sample(model, variables, noise, y, decoder=decoder, return_trajectory=True)
  image = lambda h: unpatchify(h, model.spec.patch_size, model.spec.img_size)
  # The noise, then each block's input (the output of the block before it), the last block first; the images last.
  want = [image(noise)] + [image(h) for h in block_latents[-2::-1]] + [x]
  assert len(trajectory) == model.spec.num_blocks + 1
  np.testing.assert_array_equal(trajectory[-1], images)
  for i, (got, expected) in enumerate(zip(trajectory, want)):
    np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f'entry {i}')
  assert all(float(jnp.abs(a - b).max()) > 1e-2 for a, b in zip(want, want[1:]))  # each step changes the images


GUIDED_DECODERS = {'sequential-microbatch': sampling.Sequential(microbatch=1),
                   'gauss-seidel-jacobi': sampling.Jacobi(segment=2, tol=0.0)}


@pytest.mark.parametrize('decoder', GUIDED_DECODERS.values(), ids=GUIDED_DECODERS.keys())
def test_guided_trajectory_equals_the_loop_inverse_block_by_block(conditional_vp, decoder):
  model, variables = conditional_vp
  noise = jax.random.normal(jax.random.key(10), (2, model.num_tokens, model.token_dim))
  y = jnp.array([2, -1])
  guidance = sampling.Guidance(1.5, attn_temp=0.7, annealed=True)
  images, iterations, trajectory = sampling.sample(model, variables, noise, y, guidance=guidance, decoder=decoder,
                                                   return_iterations=True, return_trajectory=True)
  want = loop_trajectory(model, variables, noise, y, guidance=1.5, attn_temp=0.7, annealed=True)
  assert len(trajectory) == len(want) == model.spec.num_blocks + 1 and len(iterations) == model.spec.num_blocks
  np.testing.assert_array_equal(trajectory[-1], images)
  for i, (got, expected) in enumerate(zip(trajectory, want)):
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0, err_msg=f'entry {i}')


PLANS = {
    # Every entry exact (tolerance 0, the iteration cap the segment length), whatever the guess.
    'mixed': 'jacobi:segment=3:tol=0:init=prev,seq,jacobi:segment=2:tol=0:init=zeros',
    'all-jacobi-latent': 'jacobi:segment=5:tol=0',
    'all-seq': 'seq:chunks=2',
}


@pytest.mark.parametrize('spelling', PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize('microbatch', [None, 1])
def test_a_plan_with_tolerance_zero_equals_exact_sequential_decoding(spelling, microbatch):
  model = toy.tiny_model(num_classes=3, img_size=6, num_blocks=3)  # 9 tokens; blocks 1 flipped
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(11), (2, model.num_tokens, model.token_dim))
  y = jnp.array([2, -1])
  guidance = sampling.Guidance(1.5, annealed=True)
  plan = sampling.parse_plan(spelling, model.spec.num_blocks, sequential=sampling.Sequential(microbatch=microbatch))
  got, iterations = sampling.sample(model, variables, noise, y, guidance=guidance, decoder=plan,
                                    return_iterations=True)
  want = loop_inverse(model, variables, noise, y, guidance=1.5, annealed=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert all(int(its.sum()) <= model.num_tokens - 1 for its in iterations)
  # The plan printed back reads back as the same decoding.
  again = sampling.parse_plan(sampling.spell(plan, 3, model.num_tokens), 3)
  np.testing.assert_allclose(sampling.sample(model, variables, noise, y, guidance=guidance, decoder=again), got,
                             atol=1e-6, rtol=0)


def loop_jacobi(model, variables, z, segment, iterations, init, block=0):
  """Gauss-Seidel-Jacobi inverse of one block from its output z, each iteration one full causal pass (no cache).

  As the sampler's key/value cache, the earlier segments are seen as the inputs of their last iteration.
  Returns the block's input (B, T, D) in the original order.
  """
  affine = jax.jit(lambda h: model.apply(variables, h, method=on_block(block, FlowBlock.affine_params)))
  z = np.asarray(z, np.float64)
  z = z[:, ::-1].copy() if block % 2 else z  # reading order
  x, seen = z.copy(), z.copy()  # seen: the inputs each position's keys and values were last computed from
  num_tokens = z.shape[1]
  for start in range(0, num_tokens - 1, segment):
    stop = min(start + 1 + segment, num_tokens)  # tokens start+1..stop-1 from inputs start..stop-2
    if init == 'zeros':
      x[:, start + 1:stop] = 0
    elif init == 'prev' and start:
      x[:, start + 1:stop] = x[:, start + 1 - segment:stop - segment]
    for _ in range(iterations):
      h = np.concatenate([seen[:, :start], x[:, start:]], axis=1)
      a, b = (np.asarray(v, np.float64) for v in affine(jnp.asarray(h, jnp.float32)))
      seen[:, start:stop - 1] = x[:, start:stop - 1]
      x[:, start + 1:stop] = z[:, start + 1:stop] * np.exp(a[:, start + 1:stop]) + b[:, start + 1:stop]
  return x[:, ::-1] if block % 2 else x


@pytest.mark.parametrize('init', sampling.INITIAL_GUESSES)
def test_capped_jacobi_starts_from_its_initial_guess(init):
  model = toy.tiny_model(img_size=6, num_blocks=1)  # 9 tokens, one block read in order
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(12), (2, model.num_tokens, model.token_dim))
  image = lambda x: unpatchify(jnp.asarray(x, jnp.float32), model.spec.patch_size, model.spec.img_size)
  results = {}
  for its in (1, 2):
    decoder = sampling.Jacobi(segment=3, max_iters=its, tol=0.0, init=init)
    got = sampling.sample(model, variables, noise, decoder=decoder)
    np.testing.assert_allclose(got, image(loop_jacobi(model, variables, noise, 3, its, init)), atol=2e-5, rtol=0)
    results[its] = got
  assert float(jnp.abs(results[1] - results[2]).max()) > 1e-3  # capped short of exact: the guess shows


@pytest.mark.parametrize('block', [0, 1])
def test_a_block_alone_by_capped_jacobi_from_the_previous_segment(block):
  model = toy.tiny_model(img_size=6, num_blocks=2)  # block 1 reads its tokens in reverse
  variables = toy.random_variables(model)
  z = jax.random.normal(jax.random.key(14), (2, model.num_tokens, model.token_dim))
  decoder = sampling.Jacobi(segment=2, max_iters=1, tol=0.0, init='prev')
  got, iterations = sampling.invert_block(model, variables, block, z, None, 0.0, 1.0, guided=False, guide_what='ab',
                                          annealed=False, decoder=decoder)
  np.testing.assert_allclose(got, loop_jacobi(model, variables, z, 2, 1, 'prev', block), atol=2e-5, rtol=0)
  assert iterations.tolist() == [1, 1, 1, 1]


def test_initial_guesses_differ():
  model = toy.tiny_model(img_size=6, num_blocks=1)
  variables = toy.random_variables(model)
  noise = jax.random.normal(jax.random.key(13), (2, model.num_tokens, model.token_dim))
  capped = {init: sampling.sample(model, variables, noise, decoder=sampling.Jacobi(3, 1, 0.0, init))
            for init in sampling.INITIAL_GUESSES}
  assert min(float(jnp.abs(capped[a] - capped[b]).max()) for a, b in [('latent', 'zeros'), ('latent', 'prev'),
                                                                         ('zeros', 'prev')]) > 1e-3


def test_plan_spelling_reads_and_writes_back():
  plan = sampling.parse_plan('seq, jacobi:segment=16:iters=8:tol=1e-3:init=prev', 2,
                             sequential=sampling.Sequential(4, microbatch=2), jacobi=sampling.Jacobi(tol=0.5))
  assert plan == sampling.Plan((sampling.Sequential(4, 2), sampling.Jacobi(16, 8, 1e-3, 'prev')), microbatch=2)
  assert sampling.spell(plan, 2, 1024) == 'seq:chunks=4,jacobi:segment=16:iters=8:tol=0.001:init=prev'
  # One entry is that decoder for every block, with the defaults given for what it leaves out.
  assert sampling.parse_plan('jacobi:init=zeros', 4, jacobi=sampling.Jacobi(tol=0.5)) == sampling.Jacobi(
      tol=0.5, init='zeros')
  assert sampling.parse_plan('sequential', 4) == sampling.Sequential()
  assert sampling.spell(sampling.Jacobi(), 2, 9) == ','.join(['jacobi:segment=8:iters=8:tol=0.0001:init=latent'] * 2)
  # A window instead of segments, from the defaults' segment or not.
  plan = sampling.parse_plan('jacobi:window=4:tol=1e-3:init=zeros,jacobi:segment=2', 2,
                             jacobi=sampling.Jacobi(segment=3, window=0))
  assert plan.blocks == (sampling.Jacobi(window=4, tol=1e-3, init='zeros'), sampling.Jacobi(segment=2))
  assert sampling.spell(plan, 2, 9) == ('jacobi:window=4:iters=8:tol=0.001:init=zeros,'
                                        'jacobi:segment=2:iters=2:tol=0.0001:init=latent')
  assert sampling.parse_plan(sampling.spell(plan, 2, 9), 2).blocks[0] == sampling.Jacobi(window=4, max_iters=8,
                                                                                          tol=1e-3, init='zeros')


@pytest.mark.parametrize('spelling, message', [
    ('warp', "unknown decoder 'warp'"),
    ('', 'an empty entry'),
    ('seq,,seq', 'an empty entry'),
    ('seq,seq,seq', '3 entries for a model of 2 blocks'),
    ('jacobi:segments=4', r"'segments=4' is not a setting of jacobi \(it takes segment=, window=, iters=, tol=, "
                          r"init=\)"),
    ('seq:tol=1e-3', r"'tol=1e-3' is not a setting of seq \(it takes chunks=\)"),
    ('jacobi:tol', r'tol needs a value \(tol=\.\.\.\)'),
    ('jacobi:tol=x', "tol='x' is not a number"),
    ('jacobi:tol=nan', 'tol=nan is not a finite number'),
    ('jacobi:iters=-1', 'iters=-1 must be >= 0'),
    ('seq:chunks=0', 'chunks=0 must be positive'),
    ('jacobi:init=noise', "init='noise' is none of latent, zeros, prev"),
    ('jacobi:tol=1:tol=2', "tol given twice in 'jacobi:tol=1:tol=2'"),
    ('jacobi:segment=4:window=8', "gives both segment= and window=: segments are solved in turn, a window slides"),
    ('jacobi:window=8:init=prev', 'a window takes init=latent or init=zeros'),
])
def test_bad_plan_spellings_say_what_is_wrong(spelling, message):
  with pytest.raises(errors.UserError, match=message) as e:
    sampling.parse_plan(spelling, 2, setting='--decoder')
  assert str(e.value).startswith(f'--decoder={spelling!r}: ') and 'Spell a plan as seq' in str(e.value)
  assert '\n' not in str(e.value)


def test_auto_microbatch_follows_the_cache():
  mib = 1 << 20
  # The ImageNet-64 layout of the sampling benchmark: 4 MiB of cache per sample.
  assert sampling.auto_microbatch(16, 4 * mib, 32 * mib) == 4
  assert sampling.auto_microbatch(16, 4 * mib, 8 * mib) == 1
  assert sampling.auto_microbatch(16, 4 * mib, 256 * mib) is None  # the batch fits
  assert sampling.auto_microbatch(100, 400_000, 32 * mib) == 25  # the largest divisor that fits
  assert sampling.auto_microbatch(16, 4 * mib, 0) is None  # cache size unknown
  model = toy.tiny_model()
  spec = model.spec
  assert sampling.cache_bytes_per_sample(model, guided=True) == 2 * spec.layers_per_block * 2 * 4 * spec.channels * 4
  assert sampling.resolve_microbatch(model, sampling.Sequential(), 8, guided=False) is None  # a tiny cache fits
  assert sampling.resolve_microbatch(model, sampling.Sequential(microbatch=2), 8, guided=False) == 2
