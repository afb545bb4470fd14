"""The command-line tools over a checkpoint: sampling (sequential, Jacobi, from latents), BPD, classifier."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import checkpoint, config_lib, evaluation, likelihood, sampling, sharding
from tarflow_jax import model as model_lib
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config():
  c = config_lib.cpu_digits(config_lib.default())
  c.model.update(img_size=8, patch_size=4, num_classes=10, channels=32, head_dim=16)
  c.noise.std = 0.1
  return c


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A random class-conditional model of the digits' config, saved as a checkpoint."""
  config = digits_config()
  model = model_lib.from_config(config.model)
  variables = toy.random_variables(model)
  directory = str(tmp_path_factory.mktemp('ckpt'))
  checkpoint.save_model(directory, variables, config)
  return directory, model, variables, config


def run_tool(module, *args):
  result = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
  return result


def test_sample_cli_decodes_given_latents_exactly(saved, tmp_path):
  directory, model, variables, _ = saved
  noise = np.asarray(jax.random.normal(jax.random.key(0), (6, model.num_tokens, model.token_dim)))
  labels = np.array([0, 1, 2, 3, 4, -1], np.int32)
  np.savez(tmp_path / 'latents.npz', noise=noise, labels=labels)
  kinds = ('seq', 'jacobi:segment=1:init=prev', 'jacobi:tol=0:init=zeros')
  plan = ','.join(kinds[i % 3] for i in range(model.spec.num_blocks))
  for n, (decoder, extra) in enumerate((('sequential', []), ('sequential', ['--microbatch=2', '--chunks=3']),
                                        ('jacobi', []), (plan, ['--microbatch=2']))):
    out = tmp_path / f'decoded{n}'
    result = run_tool('tarflow_jax.cli.sample', f'--checkpoint={directory}', f'--output={out}',
                      f'--latents={tmp_path}/latents.npz', '--guidance=1.5', '--denoise=false', '--batch_size=4',  # 4 + 2 padded
                      f'--decoder={decoder}', '--jacobi_tol=0', *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'images/s' in result.stdout
    assert ('micro-batch' in result.stdout) == (decoder != 'jacobi'), result.stdout  # Jacobi: the whole batch
    got = np.load(out / 'samples.npz')
    want = sampling.sample(model, variables, jnp.asarray(noise), jnp.asarray(labels),
                           guidance=sampling.Guidance(1.5))
    want = np.clip(np.round((np.asarray(want) + 1) * 127.5), 0, 255)
    assert np.abs(got['images'].astype(int) - want.astype(int)).max() <= 1
    np.testing.assert_array_equal(got['labels'], labels)
    assert os.path.getsize(out / 'samples.png') > 100
    printed = [l for l in result.stdout.splitlines() if l.startswith('Decoding plan (block 0 first): --decoder=')]
    assert len(printed) == 1 and 'Iterations per block' in result.stdout, result.stdout
    spelled = printed[0].split('--decoder=')[1]  # every setting written out: it reads back as itself
    assert sampling.spell(sampling.parse_plan(spelled, model.spec.num_blocks), model.spec.num_blocks,
                          model.num_tokens) == spelled
  assert model.spec.num_blocks == 2 and spelled == 'seq:chunks=1,jacobi:segment=1:iters=1:tol=0:init=prev'
  assert 'micro-batch 2' in result.stdout


def test_sample_cli_auto_plan_stays_within_its_bound(saved, tmp_path):
  directory, model, variables, _ = saved
  noise = np.asarray(jax.random.normal(jax.random.key(1), (4, model.num_tokens, model.token_dim)))
  labels = np.array([0, 1, 2, 3], np.int32)
  np.savez(tmp_path / 'latents.npz', noise=noise, labels=labels)
  result = run_tool('tarflow_jax.cli.sample', f'--checkpoint={directory}', f'--output={tmp_path}/out',
                    f'--latents={tmp_path}/latents.npz', '--guidance=1.5', '--denoise=false', '--decoder=auto',
                    '--calibration_samples=3', '--quality_bound=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Calibrated plan: estimated' in result.stdout and 'block 1: ' in result.stdout, result.stdout
  printed = [l for l in result.stdout.splitlines() if l.startswith('Decoding plan (block 0 first): --decoder=')]
  assert len(printed) == 1, result.stdout
  sampling.parse_plan(printed[0].split('--decoder=')[1], model.spec.num_blocks)  # reads back
  want = sampling.sample(model, variables, jnp.asarray(noise), jnp.asarray(labels), guidance=sampling.Guidance(1.5))
  want = np.clip(np.round((np.asarray(want) + 1) * 127.5), 0, 255)
  got = np.load(tmp_path / 'out' / 'samples.npz')['images']
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_sample_cli_labels_and_denoising(saved, tmp_path):
  directory = saved[0]
  result = run_tool('tarflow_jax.cli.sample', f'--checkpoint={directory}', f'--output={tmp_path}', '--num=16',
                    '--batch_size=8', '--labels=rows', '--denoise')
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / 'samples.npz')
  assert got['images'].shape == (16, 8, 8, 1) and got['images'].dtype == np.uint8
  np.testing.assert_array_equal(got['labels'], np.arange(16) % 10)
  assert 'denoised' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--labels=12'], r'--labels must lie in \[0, 9\]'),
    (['--guide_what=c'], 'guide_what'),
    (['--num=6', '--batch_size=6', '--microbatch=4'], '--microbatch=4 must divide the batch of 6 samples'),
])
def test_sample_cli_bad_input(saved, tmp_path, args, message):
  result = run_tool('tarflow_jax.cli.sample', f'--checkpoint={saved[0]}', f'--output={tmp_path}', '--num=2', *args)
  assert result.returncode != 0 and message.replace('\\', '') in result.stderr.replace('\\', '')


def test_sample_cli_missing_checkpoint(tmp_path):
  result = run_tool('tarflow_jax.cli.sample', f'--checkpoint={tmp_path}/nothing', f'--output={tmp_path}')
  assert result.returncode != 0 and 'No checkpoint in' in result.stderr


def test_split_bits_per_dim_is_the_reference_formula_per_image(saved):
  _, model, variables, config = saved
  mesh = sharding.make_mesh(config.mesh)
  bpd = evaluation.split_bits_per_dim(model, variables, config, mesh, 'test', batch_size=64, seed=3)
  assert bpd.shape == (500,)
  from tarflow_jax import data  # pylint: disable=g-import-not-at-top
  first = next(data.get_split(config, 'test', 64, train=False).batches)
  x_int = jnp.asarray(first['image'], jnp.float32)
  u = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), 0), x_int.shape)
  x = ((x_int + u) / 256) * 2 - 1
  z, logdets, _ = model.apply(variables, x)
  n = x[0].size
  log_normal = -0.5 * (z**2 + np.log(2 * np.pi))
  want = (-(log_normal.reshape(64, -1).sum(1) - np.log(128) * n) / n - logdets) / np.log(2)
  np.testing.assert_allclose(bpd[:64], want, rtol=1e-5)
  mean, stderr = evaluation.mean_and_stderr(bpd)
  assert mean == pytest.approx(bpd.mean()) and stderr == pytest.approx(bpd.std(ddof=1) / np.sqrt(500))


def test_bpd_cli_writes_per_image_values(saved, tmp_path):
  result = run_tool('tarflow_jax.cli.evaluate', 'bpd', f'--checkpoint={saved[0]}', '--num_examples=128',
                    '--batch_size=64', f'--output={tmp_path}/bpd.npz')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'bits/dim on mnist_5k:test (128 images)' in result.stdout and '+-' in result.stdout
  assert np.load(tmp_path / 'bpd.npz')['bpd'].shape == (128,)


def test_classifier_is_argmax_of_class_conditional_likelihood(saved):
  _, model, variables, config = saved
  mesh = sharding.make_mesh(config.mesh)
  preds, labels = evaluation.classify_split(model, variables, config, mesh, 'test', num_examples=64, batch_size=64)
  from tarflow_jax import data  # pylint: disable=g-import-not-at-top
  batch = next(data.get_split(config, 'test', 64, train=False, limit=64).batches)
  x = jnp.asarray(batch['image'], jnp.float32) / 127.5 - 1
  scores = np.stack([likelihood.log_prob(model, variables, x, jnp.full((64,), k)) for k in range(10)], 1)
  np.testing.assert_array_equal(preds, scores.argmax(1))
  np.testing.assert_array_equal(labels, batch['label'])


def test_classifier_refuses_an_unconditional_model(saved):
  _, _, _, config = saved
  model = toy.tiny_model()
  with pytest.raises(ValueError, match='class-conditional'):
    evaluation.classify_split(model, toy.random_variables(model), config, sharding.make_mesh(config.mesh), 'test')
