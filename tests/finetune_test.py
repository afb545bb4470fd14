"""Fine-tuning from given weights (config.init_from), continuing a PyTorch run, and the moving average of the parameters."""

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tarflow_jax import checkpoint, config_lib, errors, finetune, likelihood, reference, sharding, train
from tarflow_jax import model as model_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
ARCH_FIELDS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block', 'nvp',
               'num_classes')


def fixture():
  """The recorded reference training case: its json spec and npz arrays."""
  with open(os.path.join(FIXTURES, 'train_small.json')) as f:
    spec = json.load(f)
  with np.load(os.path.join(FIXTURES, 'train_small.npz')) as f:
    return spec, {k: f[k] for k in f.files}


def config_of(spec, **fields):
  """The digits config at the fixture's architecture and AdamW, float32, on a mesh with an FSDP axis."""
  c = config_lib.cpu_digits(config_lib.default())
  c.model.update({k: spec[k] for k in ARCH_FIELDS})
  c.optim.update(b1=spec['b1'], b2=spec['b2'], weight_decay=spec['weight_decay'], grad_clip=0.0)
  c.mesh.update(data=4, fsdp=2)
  c.update(fields)
  return c


def program_of(config, lr=None):
  return train.build(config, sharding.make_mesh(config.mesh), lr or train.schedule(config, 10, 100))


def reference_weights(data, prefix='init/'):
  """A reference state dict from the fixture, with its keys in the reference's order."""
  return {k[len(prefix):]: data[k] for k in data if k.startswith(prefix)}


def perturbed(state, seed=1):
  """The state dict with every tensor moved at random: weights no fresh initialisation has."""
  rng = np.random.default_rng(seed)
  return {k: v if k.endswith('attn_mask') else (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in state.items()}


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_from_a_state_dict_or_a_checkpoint_starts_at_those_weights_with_a_fresh_optimiser(tmp_path):
  spec, data = fixture()
  weights = perturbed(reference_weights(data))
  np.savez(tmp_path / 'weights.npz', **weights)
  config = config_of(spec, ema_decay=0.9)
  model = model_lib.from_config(config.model)
  given = reference.from_reference(model, weights)
  checkpoint.save_model(str(tmp_path / 'converted'), given, config)
  program = program_of(config)
  fresh = program.init()
  for path in (tmp_path / 'weights.npz', tmp_path / 'converted'):
    config.init_from = str(path)
    state = train.initial_state(config, program)
    assert_trees_equal(state['variables'], given)
    assert_trees_equal(state['ema'], given['params'])  # the average starts at the given weights
    assert_trees_equal(state['opt'], fresh['opt'])  # zero moments, counts 0
    assert int(state['step']) == 0
    # On the state's shardings, FSDP-split where the rule splits (the MLP's 64 x 256 kernels over 'fsdp').
    assert jax.tree.map(lambda a: a.sharding, state) == program.state_shardings
    assert state['variables']['params']['block_0']['layer_0']['mlp']['fc1']['kernel'].sharding.spec != ()
  # ...and not trivially: a fresh state has other weights.
  assert not np.allclose(fresh['variables']['params']['block_0']['pos_embed'], given['params']['block_0']['pos_embed'])


def test_init_from_weights_of_another_architecture_or_nothing_is_a_user_error(tmp_path):
  spec, data = fixture()
  np.savez(tmp_path / 'weights.npz', **reference_weights(data))
  config = config_of(spec)
  checkpoint.save_model(str(tmp_path / 'converted'), reference.from_reference(
      model_lib.from_config(config.model), reference_weights(data)), config)
  config.model.channels = 128
  program = program_of(config)
  config.init_from = str(tmp_path / 'weights.npz')
  with pytest.raises(errors.UserError, match=r"init_from=.*weights.npz.*channels=64, the model has channels=128"):
    train.initial_state(config, program)
  config.init_from = str(tmp_path / 'converted')
  with pytest.raises(errors.UserError, match=r'another architecture \(channels: checkpoint 64, config 128\)'):
    train.initial_state(config, program)
  config.init_from = str(tmp_path / 'missing.pth')
  with pytest.raises(errors.UserError, match='missing.pth.*no such file'):
    train.initial_state(config, program)


def test_new_fields_are_validated():
  c = config_lib.cpu_digits(config_lib.default())
  for fields, message in [(dict(ema_decay=1.0), r'ema_decay=1.0 must lie in \[0, 1\)'),
                          (dict(init_optimizer_from='opt.pth'), 'set config.init_from to the model file'),
                          (dict(init_from='m.pth', init_optimizer_from='opt.npz'), "must be the reference's")]:
    bad = c.copy_and_resolve_references()
    bad.update(fields)
    with pytest.raises(errors.UserError, match=message):
      config_lib.validate(bad)
  c.update(init_from='m.pth', init_optimizer_from='o.pth', ema_decay=0.999)
  config_lib.validate(c)


def digits_config(**fields):
  """The smallest training config: the embedded digits, one layer per block."""
  c = config_lib.cpu_digits(config_lib.default())
  c.model.update(layers_per_block=1, channels=32, head_dim=16)
  c.update(dict(eval_every=0, sample_every=0, log_every=1, **fields))
  return c


def digits_batch(seed):
  return {'image': np.random.default_rng(seed).integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
          'label': np.zeros(16, np.int32)}


def test_the_moving_average_follows_the_formula_and_skips_a_non_finite_step():
  d = 0.8
  config = digits_config(ema_decay=d)
  model = model_lib.from_config(config.model)
  lr = optax.constant_schedule(1e-2)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, 0, ema=True)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr))
  params = [jax.device_get(state['variables']['params'])]
  for k in range(3):
    state, _ = step(state, digits_batch(k))
    params.append(jax.device_get(state['variables']['params']))
  # ema_n = d^n p_0 + sum_{i=1..n} (1 - d) d^(n-i) p_i, in float64.
  n = len(params) - 1
  want = jax.tree.map(lambda *p: d**n * np.float64(p[0]) + sum((1 - d) * d**(n - i) * np.float64(p[i])
                                                                for i in range(1, n + 1)), *params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6), state['ema'], want)
  # ...which is neither the first nor the last parameters.
  kernel = lambda p: np.asarray(p['block_0']['proj_in']['kernel'])
  assert min(np.abs(kernel(state['ema']) - kernel(params[i])).max() for i in (0, n)) > 1e-3

  ema = jax.device_get(state['ema'])
  state['opt'] = jax.tree.map(lambda x: x * np.inf if jnp.issubdtype(x.dtype, jnp.floating) else x, state['opt'])
  state, metrics = step(state, digits_batch(3))  # the Adam moments overflow: a non-finite update
  assert float(metrics['finite']) == 0.0
  assert_trees_equal(state['ema'], ema)


def test_an_old_checkpoint_resumes_with_the_average_which_is_saved_and_used_by_default(tmp_path, caplog):
  config = digits_config(num_train_steps=3, checkpoint_every=3)
  workdir = str(tmp_path / 'run')
  program = program_of(config)
  old = program.init()  # a state without the average, saved as step 2
  ckpt = checkpoint.TrainCheckpointer(workdir, keep=3)
  ckpt.save(2, old, config)
  ckpt.close()
  before = jax.device_get(old['variables'])

  config.update(ema_decay=0.25, init_from=str(tmp_path / 'unused.npz'))
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, workdir)  # resumes at 2, one step, saves 3
  messages = [r.getMessage() for r in caplog.records]
  assert any('holds no moving average' in m and 'starts at its parameters' in m for m in messages), messages
  assert any('init_from=' in m and 'is not used: the run resumes from its own checkpoint' in m for m in messages)

  _, averaged, saved = checkpoint.load_model(workdir)
  _, raw, _ = checkpoint.load_model(workdir, raw_weights=True)
  assert saved.ema_decay == 0.25
  # One step of the average from step 2's parameters: 0.25 * p_2 + 0.75 * p_3.
  want = jax.tree.map(lambda p2, p3: 0.25 * np.float64(p2) + 0.75 * np.float64(p3), before['params'], raw['params'])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-7), averaged['params'], want)
  assert_trees_equal(averaged['prior'], raw['prior'])
  ckpt = checkpoint.TrainCheckpointer(workdir, keep=3)
  state = ckpt.restore(3, program_of(config).abstract_state)  # the next resume restores the average
  ckpt.close()
  assert_trees_equal(state['ema'], averaged['params'])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), raw['params'], before['params'])
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step moved the weights


@pytest.mark.extras
def test_a_reference_run_continues_with_its_adamw_state(tmp_path):
  """Two steps of torch's AdamW, saved as train.py saves them; our third step equals torch's third."""
  torch = pytest.importorskip('torch')
  spec, data = fixture()
  config = config_of(spec, num_train_steps=100)
  model = model_lib.from_config(config.model)
  init = perturbed(reference_weights(data))
  # The reference registers `var` and each block's `attn_mask` as buffers; its parameters are the other
  # state-dict entries, in state-dict order (the fixture's), which is the order AdamW numbers them.
  names = [k for k in init if k != 'var' and not k.endswith('attn_mask')]
  params = [torch.nn.Parameter(torch.tensor(init[k])) for k in names]
  adamw = torch.optim.AdamW(params, lr=spec['lr'], betas=(spec['b1'], spec['b2']), eps=1e-8,
                            weight_decay=spec['weight_decay'])

  def current():
    return {**init, **{k: p.detach().numpy().copy() for k, p in zip(names, params)}}

  @jax.jit
  def grad(variables, x, y):  # the loss's gradient, from our model (its parity is tests/reference_*_test.py)
    loss = lambda p: likelihood.loss(*model.apply({'params': p, 'prior': variables['prior']}, x, y)[:2])
    return {'params': jax.grad(loss)(variables['params']), 'prior': variables['prior']}

  def grads_of(weights, k):
    x = jnp.asarray(data['inputs/x'][k]).transpose(0, 2, 3, 1)
    return reference.to_reference(model, grad(reference.from_reference(model, weights), x, data['inputs/y'][k]))

  for k in range(3):
    if k == 2:  # what the reference's train.py writes after two steps
      np.savez(tmp_path / 'run_model_small.npz', **current())
      torch.save({'optimizer': adamw.state_dict(), 'lr_schedule': {'counter': torch.tensor(2.0)}},
                 tmp_path / 'run_opt_small.pth')
    grads = grads_of(current(), k)
    for name, p in zip(names, params):
      p.grad = torch.tensor(grads[name])
    adamw.step()
  want = reference.from_reference(model, current())['params']

  config.update(init_from=str(tmp_path / 'run_model_small.npz'), init_optimizer_from=str(tmp_path / 'run_opt_small.pth'))
  lr = optax.constant_schedule(spec['lr'])
  program = program_of(config, lr)
  state = train.initial_state(config, program)
  assert int(state['step']) == 2
  step = jax.jit(functools.partial(train.train_step, model=model, tx=train.optimizer(config, lr), config=config,
                                   lr=lr, augment=False))
  batch = {'image': jnp.asarray(data['inputs/x'][2]).transpose(0, 2, 3, 1), 'label': jnp.asarray(data['inputs/y'][2])}
  fresh = program.start_from(jax.tree.map(jnp.copy, state['variables']))
  ours, _ = step(state, batch)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-5), ours['variables']['params'], want)
  # ...and not trivially: from a fresh optimiser the third step lands elsewhere.
  other, _ = step(fresh, batch)
  gap = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(other['variables']['params']),
                                                                    jax.tree.leaves(want)))
  assert gap > 1e-4


@pytest.mark.extras
def test_an_optimiser_file_of_other_hyperparameters_or_another_model_is_a_user_error(tmp_path):
  torch = pytest.importorskip('torch')
  spec, data = fixture()
  config = config_of(spec)
  model = model_lib.from_config(config.model)
  variables = reference.from_reference(model, reference_weights(data))
  abstract_opt = program_of(config).abstract_state['opt']
  params = [torch.nn.Parameter(torch.zeros(3))]
  adamw = torch.optim.AdamW(params, betas=(spec['b1'], spec['b2']), weight_decay=spec['weight_decay'])
  params[0].grad = torch.ones(3)
  adamw.step()
  torch.save({'optimizer': adamw.state_dict()}, tmp_path / 'opt.pth')
  with pytest.raises(errors.UserError, match=r'state of 1 parameters; the model has 60: the optimiser file of another model'):
    finetune.reference_optimizer_state(config, str(tmp_path / 'opt.pth'), variables, abstract_opt)
  config.optim.b2 = 0.999
  with pytest.raises(errors.UserError, match=r'betas=\(0.9, 0.95\), the config has \(0.9, 0.999\)'):
    finetune.reference_optimizer_state(config, str(tmp_path / 'opt.pth'), variables, abstract_opt)


def test_raw_weights_flag_exports_the_parameters_and_its_absence_the_average(tmp_path):
  """`convert --raw_weights` writes the trained parameters of a checkpoint with an average; without it, the average."""
  config = digits_config(ema_decay=0.5)
  config.model.update(channels=64, head_dim=64)  # exportable: the reference's head_dim
  program = program_of(config)
  state = program.init()
  state['ema'] = jax.tree.map(lambda p: p + 0.25, state['variables']['params'])
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / 'run'), keep=1)
  ckpt.save(1, state, config)
  ckpt.close()
  model = model_lib.from_config(config.model)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
  prior = state['variables']['prior']
  for flag, params in (([], state['ema']), (['--raw_weights'], state['variables']['params'])):
    path = str(tmp_path / f'export{len(flag)}.npz')
    result = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.convert', f'--checkpoint={tmp_path}/run',
                             f'--output={path}', *flag], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    want = reference.to_reference(model, {'params': jax.device_get(params), 'prior': jax.device_get(prior)})
    with np.load(path) as got:
      assert sorted(got.files) == sorted(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
