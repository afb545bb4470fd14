"""The flow itself: patch layout, the fresh flow, exact log-determinant, autoregressive structure."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import model as model_lib
from tarflow_jax import sampling
from tarflow_jax.model import TarFlow, patchify, unpatchify
import toy


def test_patchify_matches_unfold_layout():
  # (channel, row-in-patch, col-in-patch) per token, channel slowest; tokens row-major.
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)  # NHWC, not square on purpose
  p = 2
  tokens = np.asarray(patchify(jnp.asarray(x), p))
  want = np.stack([
      np.stack([x[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :].transpose(2, 0, 1).reshape(-1)
                for i in range(2) for j in range(3)]) for b in range(2)])
  np.testing.assert_array_equal(tokens, want)


def test_unpatchify_inverts_patchify():
  x = toy.images(toy.tiny_model(in_channels=3, img_size=8, patch_size=4))
  np.testing.assert_array_equal(unpatchify(patchify(x, 4), 4, 8), x)


def test_fresh_model_is_elementwise_affine():
  # proj_out's zero weights: every block's (a, b) is its bias, whatever the input and the label.
  model = toy.tiny_model(num_classes=3)
  variables = model_lib.init_variables(model, jax.random.key(0))
  x = toy.images(model)
  f = lambda x, y: model.apply(variables, x, jnp.array(y))[:2]
  (z0, l0), (z1, l1), (z2, l2) = f(0 * x, [0, 1, 2]), f(x, [2, 0, -1]), f(2 * x, [1, 2, 0])
  np.testing.assert_allclose(z2 - z0, 2 * (z1 - z0), atol=1e-5)
  np.testing.assert_array_equal(l1, l0)
  np.testing.assert_array_equal(l2, l0)
  assert float(jnp.abs(z1 - patchify(x, model.spec.patch_size)).max()) > 1e-3  # the biases are not zero


def test_fresh_model_with_flax_init_is_identity():
  model = toy.tiny_model(num_classes=3, initializer='flax')
  variables = model_lib.init_variables(model, jax.random.key(0))
  x = toy.images(model)
  z, logdets, _ = model.apply(variables, x, jnp.array([0, 1, 2]))
  np.testing.assert_array_equal(z, patchify(x, model.spec.patch_size))
  np.testing.assert_array_equal(logdets, 0.0)


@pytest.mark.parametrize('nvp', [True, False])
def test_log_determinant_equals_slogdet_of_jacobian(nvp):
  with jax.enable_x64(True):
    model = toy.tiny_model(nvp=nvp, num_classes=2, num_blocks=3, dtype=jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), toy.random_variables(model))
    x = toy.images(model, batch=1).astype(jnp.float64)
    y = jnp.array([1])

    def flow(flat):
      z, _, _ = model.apply(variables, flat.reshape(x.shape), y)
      return z.reshape(-1)

    jac = jax.jacfwd(flow)(x.reshape(-1))
    sign, logabsdet = np.linalg.slogdet(np.asarray(jac))
    _, logdets, _ = model.apply(variables, x, y)
    n = x.size
    assert sign != 0
    np.testing.assert_allclose(n * float(logdets[0]), logabsdet, rtol=0, atol=1e-10)
    if not nvp:
      assert abs(logabsdet) < 1e-10  # volume preserving
    else:
      assert abs(logabsdet) > 1e-3  # a meaningful check: the random flow changes volume


def test_each_block_is_autoregressive_in_its_reading_order():
  model = toy.tiny_model(img_size=6, num_blocks=2)  # 9 tokens
  variables = toy.random_variables(model)
  x = patchify(toy.images(model, batch=1), model.spec.patch_size)[0]  # (T, D)
  t, d = x.shape
  for i in range(model.spec.num_blocks):
    block = lambda h: model.apply(variables, i, h[None], method=_block_forward)[0]
    jac = np.asarray(jax.jacfwd(block)(x))  # (T, D, T, D) in the original order
    if i % 2:  # reading order of odd blocks is reversed
      jac = jac[::-1, :, ::-1, :]
    for out_t in range(t):
      for in_t in range(t):
        sub = jac[out_t, :, in_t, :]
        if in_t > out_t:
          np.testing.assert_array_equal(sub, 0.0, err_msg=f'block {i}: token {out_t} depends on later {in_t}')
        elif in_t == out_t:
          np.testing.assert_array_equal(sub - np.diag(np.diag(sub)), 0.0)
    strictly_lower = np.abs(jac[1:, :, 0, :]).max()
    assert strictly_lower > 1e-3, 'random block should depend on earlier tokens'


def _block_forward(module: TarFlow, i, h):
  return module.blocks[i](h)[0]


@pytest.mark.parametrize('size', [1, 8])  # sequential steps; one Jacobi segment of all 8 decoded tokens
def test_block_inverse_steps_undo_its_forward_in_either_order(size):
  model = toy.tiny_model(img_size=6, num_blocks=2)  # 9 tokens; block 1 reads them reversed
  variables = toy.random_variables(model)
  x = patchify(toy.images(model, batch=2), model.spec.patch_size)  # (B, T, D)
  for i in range(model.spec.num_blocks):
    z, _ = model.apply(variables, x, method=model_lib.on_block(i, model_lib.FlowBlock.__call__))
    cache = model.apply(variables, 2, method=model_lib.on_block(i, model_lib.FlowBlock.init_cache))
    inverse_step = model_lib.on_block(i, model_lib.FlowBlock.inverse_step)
    got = z
    for t in range(0, model.num_tokens - 1, size):
      for _ in range(size):  # a segment of `size` tokens is exact after `size` iterations
        got, new_cache = model.apply(variables, got, z, t, cache, size=size, method=inverse_step)
      cache = new_cache
    np.testing.assert_allclose(got, x, atol=1e-5, err_msg=f'block {i}')
    assert float(jnp.abs(z - x).max()) > 1e-2


def test_bfloat16_matmuls_keep_float32_flow_arithmetic():
  model = toy.tiny_model(num_classes=2)
  variables = toy.random_variables(model)
  x, y = toy.images(model), jnp.array([0, 1, -1])
  z32, ld32, _ = model.apply(variables, x, y)
  bf16 = toy.tiny_model(num_classes=2, dtype=jnp.bfloat16)
  z16, ld16, _ = bf16.apply(variables, x, y)
  assert z16.dtype == jnp.float32 and ld16.dtype == jnp.float32
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  np.testing.assert_allclose(z16, z32, atol=0.1)
  np.testing.assert_allclose(ld16, ld32, atol=0.02)
  assert float(jnp.abs(z16 - z32).max()) > 0  # really ran in bfloat16


@pytest.mark.parametrize('remat, scan_layers, policy', [
    (True, False, 'nothing_saveable'), (False, True, 'nothing_saveable'), (True, True, 'nothing_saveable'),
    (True, True, 'dots_with_no_batch_dims_saveable'), (True, False, 'dots_saveable')])
def test_remat_and_scan_change_neither_the_function_nor_its_gradient(remat, scan_layers, policy):
  model = toy.tiny_model(num_classes=2, layers_per_block=3)
  variables = toy.random_variables(model)
  x, y = toy.images(model), jnp.array([0, 1, -1])

  def grads(m):
    def loss(params):
      z, logdets, _ = m.apply({'params': params, 'prior': variables['prior']}, x, y)
      return 0.5 * jnp.mean(z**2) - logdets.mean()
    return jax.value_and_grad(loss)(variables['params'])

  other = toy.tiny_model(num_classes=2, layers_per_block=3, remat=remat, scan_layers=scan_layers, remat_policy=policy)
  assert jax.tree.structure(model_lib.init_variables(other, jax.random.key(0))) == jax.tree.structure(variables)
  (l0, g0), (l1, g1) = grads(model), grads(other)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)  # float32 order
  # The program really differs: layers checkpointed with the policy for remat (GELU's own checkpoint
  # has none), one scan per block for scan_layers.
  program = str(jax.make_jaxpr(lambda: grads(other))())
  shown = {'dots_saveable': 'DotsSaveable(only_if_no_batch_dims=False)',
           'dots_with_no_batch_dims_saveable': 'DotsSaveable(only_if_no_batch_dims=True)'}
  recomputed = program.count(f'policy={shown.get(policy, "<function " + policy)}')
  assert recomputed == (model.spec.num_blocks * (1 if scan_layers else model.spec.layers_per_block) if remat else 0)
  assert (program.count('scan[') > 0) == scan_layers
  # Sampling (the cached step) is unaffected.
  noise = jax.random.normal(jax.random.key(3), (3, model.num_tokens, model.token_dim))
  np.testing.assert_allclose(sampling.sample(other, variables, noise, y), sampling.sample(model, variables, noise, y),
                             atol=1e-6)


def test_unknown_remat_policy_is_refused():
  model = toy.tiny_model(remat=True, remat_policy='dots_only')
  with pytest.raises(ValueError, match="Unknown remat_policy 'dots_only'"):
    model_lib.init_variables(model, jax.random.key(0))


def test_from_config():
  model = model_lib.from_config({'in_channels': 3, 'img_size': 8, 'patch_size': 2, 'channels': 64,
                                 'num_blocks': 2, 'layers_per_block': 1, 'dtype': 'bfloat16'})
  assert model.spec.dtype == jnp.bfloat16 and model.num_tokens == 16 and model.token_dim == 12


@pytest.mark.parametrize('shape, match', [
    ((2, 8, 8, 2), r'Expected images of shape \(batch, 4, 4, 2\)'),  # wrong size
    ((2, 4, 4, 3), r'Expected images of shape \(batch, 4, 4, 2\)'),  # wrong channel count
    ((2, 2, 4, 4), r'NHWC'),  # NCHW by mistake
])
def test_wrong_images_are_refused(shape, match):
  model = toy.tiny_model()
  variables = toy.random_variables(model)
  with pytest.raises(ValueError, match=match):
    model.apply(variables, jnp.zeros(shape))


@pytest.mark.parametrize('labels, match', [
    ([0, 3], r'Labels must lie in \[0, 2\]'),
    ([-2, 0], r'Labels must lie in \[0, 2\]'),
    ([[0, 1]], r'shape \(batch,\)'),
])
def test_bad_labels_are_refused(labels, match):
  model = toy.tiny_model(num_classes=3)
  variables = toy.random_variables(model)
  with pytest.raises(ValueError, match=match):
    model.apply(variables, toy.images(model, batch=2), jnp.asarray(labels))


def test_labels_for_unconditional_model_are_refused():
  model = toy.tiny_model()
  with pytest.raises(ValueError, match='unconditional'):
    model.apply(toy.random_variables(model), toy.images(model, batch=2), jnp.array([0, 1]))


def test_inconsistent_architecture_is_refused():
  with pytest.raises(ValueError, match='not a multiple of head_dim'):
    model_lib.init_variables(toy.tiny_model(channels=40), jax.random.key(0))
  with pytest.raises(ValueError, match='not a multiple of patch_size'):
    model_lib.init_variables(toy.tiny_model(img_size=5), jax.random.key(0))
