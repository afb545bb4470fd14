"""iTARFlow's training and sampling: noise levels and loss weights, the train step, a tiny run end to end."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import checkpoint, config_lib, data, evaluation, iterative_sampling, likelihood, noise_levels, sharding
from tarflow_jax import errors, images, sampling, train
from tarflow_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def itarflow_config(**itarflow):
  """The embedded digits (16x16, 10 classes) on a tiny iTARFlow: patch sizes 4 then 2, widths 64 then 128."""
  c = config_lib.cpu_digits(config_lib.default())
  config_lib.set_fields(c.model, num_classes=10, patch_size=(4, 2), channels=(64, 128), layers_per_block=(1, 2),
                        noise_conditioning=True)
  c.label_drop = 0.1
  c.sample.update(guidance=1.0, annealed_guidance=True)
  c.itarflow.update({'t0': 0.05, 't1': 0.3, 'reweight': 't', 'steps': 3, **itarflow})
  return c


def test_noise_levels_lie_in_their_range_with_the_chosen_law():
  t0, t1, n = 0.01, 0.3, 200_000
  uniform = np.asarray(noise_levels.draw(jax.random.key(0), n, t0, t1, 'uniform'))
  square = np.asarray(noise_levels.draw(jax.random.key(1), n, t0, t1, 'square_uniform'))
  for t in (uniform, square):
    assert t.min() >= t0 and t.max() <= t1
  assert abs(uniform.mean() - (t0 + t1) / 2) < 2e-3
  assert abs((square**2).mean() - (t0**2 + t1**2) / 2) < 5e-4  # t^2 uniform on [t0^2, t1^2]


def test_loss_weights_are_the_references():
  t, t0, t1 = jnp.array([0.1, 0.2]), 0.05, 0.35
  want = {'none': [1, 1], 't': [0.1, 0.2], 't_norm': [0.25, 0.5], 't_squared': [0.01, 0.04],
          't_squared_norm': [0.01 / 0.125, 0.04 / 0.125]}
  for reweight, w in want.items():
    np.testing.assert_allclose(noise_levels.loss_weights(t, t0, t1, reweight), w, rtol=1e-6, err_msg=reweight)
  with pytest.raises(Exception, match='reweight'):
    config_lib.validate(itarflow_config(reweight='sqrt'))


def test_noise_conditioned_inputs_add_noise_of_each_images_level():
  config = itarflow_config(t0=0.05, t1=0.5)
  pixels = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 1)).astype(np.uint8)
  batch = {'image': jnp.asarray(pixels), 'label': jnp.zeros((64,), jnp.int32)}
  x, y, t, weights = train.noise_conditioned_inputs(batch, jax.random.key(3), config)
  noise = np.asarray(x) - np.asarray(model_lib_from_uint8(pixels))
  std = noise.reshape(64, -1).std(axis=1)
  np.testing.assert_allclose(std, np.asarray(t), rtol=0.2)  # 256 draws per image
  np.testing.assert_allclose(weights, t)  # reweight='t'
  assert y.shape == (64,) and ((y == -1) | (y == 0)).all()


def model_lib_from_uint8(pixels):
  return pixels.astype(np.float32) / 127.5 - 1.0


def test_train_step_minimises_the_reweighted_loss_at_the_given_levels():
  config = itarflow_config()
  model = model_lib.from_config(config.model)
  tx = train.optimizer(config, lambda step: 1e-3)
  state = train.init_state(model, tx, config.seed)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 1)), jnp.float32)
  y = jnp.arange(8) % 10
  t = jnp.linspace(0.05, 0.3, 8)
  weights = 2.0 * t
  batch = {'image': x, 'label': y, 'noise_level': t, 'loss_weight': weights}
  _, metrics = train.train_step(state, batch, model=model, tx=tx, config=config, lr=lambda step: 1e-3, augment=False)
  z, logdets, _ = model.apply(state['variables'], x, y, t)
  per_image = 0.5 * np.mean(np.asarray(z, np.float64)**2, axis=(1, 2)) - np.asarray(logdets, np.float64)
  np.testing.assert_allclose(metrics['loss'], np.mean(per_image * np.asarray(weights)), rtol=1e-5)


def test_a_tiny_itarflow_trains_and_samples_by_iterative_denoising(tmp_path):
  config = itarflow_config(dynamics='sde', clip=True)
  config.update(num_train_steps=4, eval_every=4, sample_every=4, checkpoint_every=4, log_every=2)
  config_lib.validate(config)
  out = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(out['train']['loss']) and np.isfinite(out['eval'][4])
  assert os.path.exists(tmp_path / 'samples' / 'step_0000004.png')
  model, variables, saved = checkpoint.load_model(str(tmp_path / 'checkpoints'))
  assert model.spec.patch_sizes == (4, 2) and model.spec.noise_conditioning
  assert config_lib.architecture(saved.model) == config_lib.architecture(config.model)

  # Sampling as `evaluate fid` and the sample grids do: decoded at t1, then 3 rounds of SDE to t0 and 0.
  protocol = evaluation.fid_protocol(saved, num_samples=8)
  assert protocol.iterative and 'iteratively denoised' in protocol.describe()
  mesh = sharding.make_mesh(saved.mesh)
  draw = evaluation.model_sampler(model, variables, mesh, protocol)
  noise = np.random.default_rng(0).standard_normal((8, model.num_tokens, model.token_dim)).astype(np.float32)
  labels = np.arange(8, dtype=np.int32)
  x = draw(noise, labels)
  assert x.shape == (8, 16, 16, 1) and np.isfinite(x).all() and np.abs(x).max() <= 1 + 0.3 * 3
  # The SDE rounds' fresh noise follows the seed (`evaluate fid --seed`): the same seed, the same samples.
  np.testing.assert_array_equal(evaluation.model_sampler(model, variables, mesh, protocol)(noise, labels), x)
  assert np.abs(evaluation.model_sampler(model, variables, mesh, protocol, seed=1)(noise, labels) - x).max() > 1e-3

  # The compiled denoiser on a batch split over the mesh computes what it computes on one device.
  guidance, denoising = iterative_sampling.from_config(saved, dynamics='ode')
  start = iterative_sampling.reverse(model, variables, jnp.asarray(noise), jnp.asarray(labels),
                                     noise_level=denoising.t1, guidance=guidance)
  whole = iterative_sampling.iterative_denoise(model, variables, start, jnp.asarray(labels), denoising=denoising)
  with jax.set_mesh(mesh):
    split = iterative_sampling.iterative_denoise(
        model, variables, jax.device_put(start, sharding.batch_sharding(mesh)),
        jax.device_put(jnp.asarray(labels), sharding.batch_sharding(mesh)), denoising=denoising)
  assert len(split.sharding.device_set) == mesh.size
  np.testing.assert_allclose(np.asarray(split), np.asarray(whole), atol=1e-5)

  # Each round's self-denoising step is Tweedie's: x0 = x + t^2 grad log p(x | t). One round, ODE, to 0:
  one = iterative_sampling.IterativeDenoising(t0=0.2, t1=0.2, steps=1)
  score = jax.grad(lambda v: likelihood.log_prob(model, variables, v, jnp.asarray(labels),
                                                 jnp.full((8,), 0.2)).sum())(start)
  np.testing.assert_allclose(
      iterative_sampling.iterative_denoise(model, variables, start, jnp.asarray(labels), denoising=one),
      start + 0.04 * score, atol=1e-5)
  assert math.isfinite(float(out['eval'][4]))

  # The Bayes classifier scores clean images at t0, as bits/dim does.
  preds, truth = evaluation.classify_split(model, variables, saved, mesh, saved.data.eval_split, num_examples=8)
  x = images.from_uint8(next(data.get_split(saved, saved.data.eval_split, 8, train=False, limit=8).batches)['image'])
  at_t0 = jnp.stack([likelihood.log_prob(model, variables, x, jnp.full((8,), k), jnp.full((8,), saved.itarflow.t0))
                     for k in range(10)], 1)  # (8, 10)
  np.testing.assert_array_equal(preds, np.asarray(at_t0.argmax(1))[:len(preds)])
  assert len(preds) == len(truth) == 8

  # The command line samples it the same way (decoded at t1, iterative denoising from the config).
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.sample', f'--checkpoint={tmp_path}',
                         f'--output={tmp_path}/cli', '--num=4', '--batch_size=4'], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(tmp_path / 'cli' / 'samples.npz') as f:
    assert f['images'].shape == (4, 16, 16, 1) and f['images'].dtype == np.uint8
  # Its iterative sampling settings from flags: what the library draws with them, from the same noise and key.
  proc = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.sample', f'--checkpoint={tmp_path}',
                         f'--output={tmp_path}/flags', '--num=4', '--batch_size=4', '--labels=rows', '--seed=3',
                         '--denoise_steps=2', '--dynamics=sde', '--clip', '--guidance_style=starflow'],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'decoded at t=0.3, then 2 sde denoising rounds down to 0.05' in proc.stdout, proc.stdout
  guidance, denoising = iterative_sampling.from_config(saved, steps=2, dynamics='sde', clip=True, style='starflow')
  noise = np.random.default_rng(3).standard_normal((4, model.num_tokens, model.token_dim), np.float32)
  expected = iterative_sampling.sample(model, variables, jnp.asarray(noise), jnp.arange(4), guidance=guidance,
                                       denoising=denoising, rng=jax.random.key(3))
  with np.load(tmp_path / 'flags' / 'samples.npz') as f:
    assert np.abs(f['images'].astype(int) - images.to_uint8(np.asarray(expected)).astype(int)).max() <= 1
  proc = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.sample', f'--checkpoint={tmp_path}',
                         f'--output={tmp_path}/tarflow', '--num=4', '--denoise_scale=0.5'], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 2 and '--denoise_scale given, but --checkpoint holds a noise-conditioned (iTARFlow) model' \
      in proc.stderr, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.sample', f'--checkpoint={tmp_path}',
                         f'--output={tmp_path}/jacobi', '--num=4', '--decoder=jacobi'], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 2 and 'decodes sequentially' in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize('options', [dict(noise_conditioning=True), dict(patch_size=(2, 4)), dict(channels=(16, 32))])
def test_tarflows_sampler_refuses_itarflows_options(options):
  spec = model_lib.Spec(**{**dict(in_channels=1, img_size=8, patch_size=4, channels=32, num_blocks=2,
                                  layers_per_block=1, head_dim=16), **options})
  model = model_lib.TarFlow(spec)
  with pytest.raises(errors.UserError, match=r'shaped per block \(iTARFlow\): sample it with iterative_sampling'):
    sampling.sample(model, {}, jnp.zeros((1, model.num_tokens, model.token_dim)))
