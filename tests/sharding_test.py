"""Meshes from the config, FSDP partitioning, sharded steps equal to one device, restores across meshes."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tarflow_jax import checkpoint, compilation, config_lib, sharding, train
from tarflow_jax import model as model_lib


def mesh_of(**axes):
  c = config_lib.default().mesh
  c.update(axes)
  return sharding.make_mesh(c)


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  assert sharding.param_spec((768, 2304), 4) == P(None, 'fsdp')
  assert sharding.param_spec((2304, 768), 4) == P('fsdp', None)
  assert sharding.param_spec((1023, 768), 4) == P(None, 'fsdp')  # 1023 is not divisible by 4
  assert sharding.param_spec((1023, 767), 4) == P()  # nothing divisible: replicated
  assert sharding.param_spec((768,), 4) == P()  # small: replicated
  assert sharding.param_spec((768, 2304), 1) == P()  # no fsdp axis


def test_mesh_sizes_from_config():
  assert dict(mesh_of(data=-1, fsdp=1).shape) == {'data': 8, 'fsdp': 1}
  assert dict(mesh_of(data=2, fsdp=-1).shape) == {'data': 2, 'fsdp': 4}
  with pytest.raises(ValueError, match='At most one mesh axis may be -1'):
    mesh_of(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match='does not use the 8 devices'):
    mesh_of(data=2, fsdp=2)
  with pytest.raises(ValueError, match='cannot be split'):
    mesh_of(data=3, fsdp=-1)


def test_default_mesh_is_the_default_config_mesh():
  assert dict(sharding.default_mesh().shape) == {'data': 8, 'fsdp': 1}
  assert dict(sharding.default_mesh(jax.devices()[:2]).shape) == {'data': 2, 'fsdp': 1}
  assert dict(sharding.default_mesh().shape) == dict(sharding.make_mesh(config_lib.default().mesh).shape)


def test_a_micro_batch_that_does_not_divide_the_batch_names_the_setting():
  sharding.check_microbatch(6, 3)
  with pytest.raises(ValueError, match='--microbatch=4 must divide the batch of 6 samples'):
    sharding.check_microbatch(6, 4, '--microbatch')
  with pytest.raises(ValueError, match='microbatch=0 must divide'):
    sharding.check_microbatch(6, 0)


def test_micro_batch_i_holds_every_nth_example_and_merging_restores_the_batch():
  batch = np.arange(12 * 2).reshape(12, 2)
  micro = np.asarray(sharding.split_microbatches(batch, 3))  # (3, 4, 2)
  assert micro.shape == (3, 4, 2)
  for i in range(3):
    np.testing.assert_array_equal(micro[i], batch[i::3])
  np.testing.assert_array_equal(sharding.merge_microbatches(micro), batch)


def test_the_compiled_program_is_the_training_program():
  # Width 128: the attention and MLP matrices are large enough to be sharded (sharding.MIN_FSDP_SIZE).
  config, *_, batch = _setup()
  mesh = mesh_of(data=2, fsdp=4)
  program = train.build(config, mesh, train.schedule(config, 1000, 100_000))
  state = program.init()
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f'{a.sharding} != {s}'),
               state, program.state_shardings)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                          program.abstract_state)
  step, (abstract, abstract_batch) = compilation.train_program(config, mesh)
  assert abstract == program.abstract_state
  assert abstract_batch['image'].shape == (config.batch_size,) + batch['image'].shape[1:]
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, abstract_batch).as_text()
    assert compiled == program.step.lower(abstract, abstract_batch).as_text()


def _setup():
  config = config_lib.cpu_digits(config_lib.default())
  config.model.update(channels=128, num_classes=10)
  config.label_drop = 0.1
  model = model_lib.from_config(config.model)
  lr = train.schedule(config, 10, 100)
  tx = train.optimizer(config, lr)
  state = train.init_state(model, tx, 0)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,), dtype=np.int32)}
  return config, model, tx, lr, state, batch


def _run_step(mesh, config, model, tx, lr, state, batch):
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=config, lr=lr),
               in_shardings=(shardings, sharding.batch_sharding(mesh)),
               out_shardings=(shardings, sharding.replicated(mesh)))
  return fn(jax.device_put(state, shardings), sharding.global_batch(mesh, batch))


@pytest.mark.parametrize('axes', [dict(data=8, fsdp=1), dict(data=2, fsdp=4), dict(data=1, fsdp=8)])
def test_sharded_step_equals_one_device(axes):
  assert jax.device_count() == 8, 'tests run with 8 fake CPU devices (tests/conftest.py)'
  setup = _setup()
  one_state, one_metrics = _run_step(sharding.make_mesh(config_lib.default().mesh, jax.devices()[:1]), *setup)
  mesh = mesh_of(**axes)
  state, metrics = _run_step(mesh, *setup)
  np.testing.assert_allclose(metrics['loss'], one_metrics['loss'], rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), state, one_state)
  qkv = state['variables']['params']['block_0']['layer_0']['attention']['qkv']['kernel']  # (128, 384)
  mu = state['opt'][0].mu['block_0']['layer_0']['attention']['qkv']['kernel']
  if axes['fsdp'] > 1:  # really sharded, parameters and optimiser moments alike
    assert qkv.sharding.spec == P(None, 'fsdp') and mu.sharding.spec == P(None, 'fsdp')
    assert qkv.addressable_shards[0].data.shape == (128, 384 // axes['fsdp'])
  else:
    assert qkv.sharding.is_fully_replicated


@pytest.mark.parametrize('written_on', ['data=8', 'one device'])
def test_checkpoint_restores_onto_another_mesh(tmp_path, written_on):
  config, model, tx, lr, state, batch = _setup()
  one = sharding.make_mesh(config_lib.default().mesh, jax.devices()[:1])
  state, _ = _run_step(mesh_of(data=8, fsdp=1) if written_on == 'data=8' else one, config, model, tx, lr, state, batch)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=2)
  ckpt.save(1, state, config)
  ckpt.wait()
  abstract = jax.eval_shape(lambda: state)
  for mesh in (mesh_of(data=2, fsdp=4), mesh_of(data=1, fsdp=8), mesh_of(data=8, fsdp=1), one):
    shardings = sharding.state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = ckpt.restore(1, target)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    jax.tree.map(lambda r, s: r.sharding.is_equivalent_to(s, r.ndim) or pytest.fail(f'{r.sharding} != {s}'),
                 restored, shardings)
  ckpt.close()
