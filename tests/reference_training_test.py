"""Training parity with the official PyTorch TarFlow: recorded AdamW trajectories (tests/fixtures/README.md).

Every `train_*` case in $TARFLOW_FIXTURES (default: tests/fixtures) is replayed from its
recorded initial weights with the library's own `train.train_step` and `train.optimizer`, fed the
recorded inputs (augmentation off), and must give the recorded losses and parameters.
"""

import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tarflow_jax import config_lib, reference, train
from tarflow_jax.model import Spec, TarFlow

FIXTURES = os.environ.get('TARFLOW_FIXTURES', os.path.join(os.path.dirname(__file__), 'fixtures'))
STEMS = sorted(os.path.splitext(p)[0] for p in glob.glob(os.path.join(FIXTURES, 'train_*.json')))

LOSS_TOL = 1e-5
PARAM_TOL = 1e-4

ARCH_FIELDS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block', 'nvp',
               'num_classes')


def recorded_variables(model, data, prefix):
  """The reference state dict stored under `prefix/` in the .npz, as our variables."""
  return reference.from_reference(model, {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)})


def assert_trees_close(actual, expected, tol, what):
  errors = jax.tree.map(lambda a, e: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)))),
                        actual, expected)
  worst = max(jax.tree.leaves_with_path(errors), key=lambda kv: kv[1])
  assert worst[1] <= tol, f'{what}: max abs error {worst[1]:.3g} > {tol:.1g} at {jax.tree_util.keystr(worst[0])}'


def test_trajectories_present():
  assert STEMS, f'No training trajectories (train_*.json) in {FIXTURES}'


@pytest.mark.parametrize('stem', STEMS, ids=os.path.basename)
def test_train_step_reproduces_reference_trajectory(stem):
  with open(stem + '.json') as f:
    spec = json.load(f)
  with np.load(stem + '.npz') as f:
    data = {k: f[k] for k in f.files}
  model = TarFlow(Spec(**{k: spec[k] for k in ARCH_FIELDS}))
  config = config_lib.default()
  config.model.update({k: spec[k] for k in ARCH_FIELDS})
  config.optim.update(b1=spec['b1'], b2=spec['b2'], weight_decay=spec['weight_decay'], grad_clip=0.0)
  # train.optimizer is torch's AdamW: eps 1e-8 and decay on every parameter.
  assert spec['eps'] == 1e-8, f'{stem}: recorded with eps={spec["eps"]}, train.optimizer uses 1e-8'
  lr = optax.constant_schedule(spec['lr'])
  tx = train.optimizer(config, lr)

  variables = recorded_variables(model, data, 'init/')
  state = {'variables': variables, 'opt': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32),
           'rng': jax.random.PRNGKey(0)}
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr, augment=False))
  steps = spec['steps']
  xs = jnp.asarray(data['inputs/x']).transpose(0, 1, 3, 4, 2)  # (K, B, C, H, W) -> (K, B, H, W, C)
  ys = data.get('inputs/y', np.zeros(xs.shape[:2], np.int32))  # (K, B)
  for k in range(steps):
    state, metrics = step_fn(state, {'image': xs[k], 'label': jnp.asarray(ys[k])})
    loss, want = float(metrics['loss']), float(data[f'loss/{k}'])
    assert abs(loss - want) <= LOSS_TOL, f'{stem} step {k}: loss {loss:.7g}, reference {want:.7g}'
    if k in (0, steps - 1):
      expected = recorded_variables(model, data, f'step{k}/')
      variables = state['variables']
      assert_trees_close(variables['params'], expected['params'], PARAM_TOL, f'{stem} parameters after step {k}')
      assert_trees_close(variables['prior'], expected['prior'], PARAM_TOL, f'{stem} prior after step {k}')


def test_optimizer_is_torch_adamw():
  # First step of torch's AdamW on gradient g: p - lr * (g / (|g| + eps) + weight_decay * p). A gradient of
  # 1e-8 = eps gives exactly half a step, so eps is checked too; decay must reach every parameter.
  config = config_lib.default()
  config.optim.update(weight_decay=0.1, grad_clip=0.0)
  lr = 1e-2
  tx = train.optimizer(config, optax.constant_schedule(lr))
  params = {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full((2,), -1.0), 'norm': {'scale': jnp.ones(2)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-8), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(lambda u, p: np.testing.assert_allclose(u, -lr * (0.5 + 0.1 * p), rtol=1e-6), updates, params)
