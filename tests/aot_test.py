"""Ahead-of-time compilation for real TPU slices (libtpu on this host): memory, FLOPs, shardings."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tarflow_jax import compilation, config_lib
from tarflow_jax import flops as flops_lib
from tarflow_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where libtpu is installed outside the test environment (.ci/run puts it there), if it is.
LIBTPU_DIR = os.environ.get('TARFLOW_LIBTPU_DIR', '')

needs_libtpu = pytest.mark.skipif(
    not (LIBTPU_DIR and os.path.isdir(os.path.join(LIBTPU_DIR, 'libtpu'))) and importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed (pip install -e ".[tpu]", or set TARFLOW_LIBTPU_DIR to a --target install of it)')


def aot(tmp_path, *args) -> dict:
  """Runs `python -m tarflow_jax.cli.aot ... --json` and returns the JSON."""
  out = tmp_path / 'aot.json'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (LIBTPU_DIR, REPO) if p))
  proc = subprocess.run([sys.executable, '-m', 'tarflow_jax.cli.aot', *args, f'--json={out}'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.extras
@needs_libtpu
@pytest.mark.parametrize('fsdp', [1, 8])
def test_small_model_compiles_for_a_v5e_slice_with_the_intended_shardings(tmp_path, fsdp):
  # Width 128: the attention and MLP matrices are large enough to be sharded (sharding.MIN_FSDP_SIZE).
  r = aot(tmp_path, '--config=configs/demo.py:smoke', '--topology=v5e:2x4', '--config.model.channels=128',
          f'--config.mesh.data={8 // fsdp}', f'--config.mesh.fsdp={fsdp}')
  assert (r['chips'], r['device_kind'], r['mesh']) == (8, 'TPU v5 lite', {'data': 8 // fsdp, 'fsdp': fsdp})
  assert 15 * 2**30 < r['hbm_bytes_per_chip'] <= 16 * 2**30
  train, sample = r['train'], r['sample']
  assert train['fits'] and sample['fits'] and train['batch'] == 16 and sample['batch'] == 8
  assert 0 < train['bytes_per_chip'] < 2**30
  config = config_lib.load('configs/demo.py:smoke')
  config.model.channels = 128
  flops = 3 * 16 * flops_lib.forward_flops(model_lib.from_config(config.model)) / 8
  assert train['flops_per_chip'] == pytest.approx(flops)
  assert train['estimated_step_s'] > 0
  # Data parallel: gradients are all-reduced, parameters never gathered. FSDP: parameters gathered.
  assert train['collectives']['all-reduce']['count'] > 0
  weights_moved = {k: v for k, v in train['collectives'].items() if k in ('all-gather', 'collective-permute')}
  assert bool(weights_moved) == (fsdp > 1), train['collectives']


@pytest.mark.extras
@needs_libtpu
@pytest.mark.skipif(not os.environ.get('TARFLOW_AOT_PAPER_CONFIGS'),
                    reason='minutes of compiling: set TARFLOW_AOT_PAPER_CONFIGS=1 (.ci/run does, after the suite)')
def test_imagenet64_fits_a_v5litepod_8_at_the_paper_batch(tmp_path):
  r = aot(tmp_path, '--config=configs/imagenet64.py', '--topology=v5e:2x4', '--what=train')
  train = r['train']
  assert train['batch'] == 256 and train['fits'], train
  assert train['bytes_per_chip'] <= r['hbm_bytes_per_chip']
  assert r['attention_kernel'] == 'splash' and r['mesh'] == {'data': 1, 'fsdp': 8}
  assert train['collectives']['all-gather']['count'] > 0  # parameters gathered layer by layer
  assert train['flops_per_chip'] > 90e12  # 6 x 460M parameters x 256 x 1,024 tokens / 8, and attention


def test_collectives_are_counted_from_compiled_text():
  hlo = '\n'.join([
      '%ag = bf16[8,768]{1,0} all-gather(bf16[1,768]{1,0} %p), dimensions={0}',
      '%ags = (f32[96]{0}, f32[768]{0}) all-gather-start(f32[96]{0} %q), dimensions={0}',
      '%agd = f32[768]{0} all-gather-done((f32[96]{0}, f32[768]{0}) %ags)',
      '%ar = f32[] all-reduce(f32[] %x), to_apply=%add',
      '%rs = f32[96,4]{1,0} reduce-scatter(f32[768,4]{1,0} %g), dimensions={0}',
      '%cp = (bf16[768,1,288]{0,2,1}, bf16[768,1,288]{0,2,1}, u32[]{:S(2)}, u32[]{:S(2)}) '
      'collective-permute-start(%w), channel_id=3, source_target_pairs={{0,7},{1,0}}',
      '%cpd = bf16[768,1,288]{0,2,1} collective-permute-done(%cp)',
  ])
  assert compilation.collectives(hlo) == {
      'all-gather': {'count': 2, 'bytes': 8 * 768 * 2 + 768 * 4},
      'all-reduce': {'count': 1, 'bytes': 4},
      'reduce-scatter': {'count': 1, 'bytes': 96 * 4 * 4},
      'collective-permute': {'count': 1, 'bytes': 768 * 288 * 2}}


def test_forward_flops_count_the_matmuls_of_the_architecture():
  model = model_lib.TarFlow(model_lib.Spec(in_channels=3, img_size=8, patch_size=2, channels=64, num_blocks=2,
                                           layers_per_block=3, expansion=4))
  t, c, d = 16, 64, 12
  layer = 2 * t * (3 * c * c + c * c + 2 * 4 * c * c) + 2 * 2 * c * (t * (t + 1) // 2)
  assert flops_lib.forward_flops(model) == 2 * (2 * t * d * c + 3 * layer + 2 * t * c * 2 * d)


def test_flops_of_blocks_of_their_own_shape_add_up_block_by_block():
  # iTARFlow: each block counted with its own patch size, width and depth (shared layers included).
  kw = dict(in_channels=3, img_size=8, num_blocks=2, expansion=4)
  model = model_lib.TarFlow(model_lib.Spec(**kw, patch_size=(2, 4), channels=(64, 128), layers_per_block=(3, 2),
                                           noise_conditioning=True))
  alone = [model_lib.TarFlow(model_lib.Spec(**dict(kw, num_blocks=1), patch_size=p, channels=c, layers_per_block=n))
           for p, c, n in ((2, 64, 3), (4, 128, 2))]
  assert flops_lib.forward_flops(model) == sum(flops_lib.forward_flops(m) for m in alone)
  assert flops_lib.decode_flops(model, 4) == sum(flops_lib.decode_flops(m, 4) for m in alone)


@pytest.mark.extras
@needs_libtpu
@pytest.mark.skipif(not os.environ.get('TARFLOW_AOT_PAPER_CONFIGS'),
                    reason='minutes of compiling: set TARFLOW_AOT_PAPER_CONFIGS=1 (.ci/run does, after the suite)')
@pytest.mark.parametrize('name, topology', [('itarflow_imagenet64', 'v5e:2x4'), ('itarflow_imagenet128', 'v4:2x2x4'),
                                            ('itarflow_imagenet256', 'v4:2x2x4')])
def test_itarflow_configs_fit_their_slices_at_the_reference_batch(tmp_path, name, topology):
  r = aot(tmp_path, f'--config=configs/{name}.py', f'--topology={topology}', '--what=train')
  train = r['train']
  assert train['batch'] == 512 and train['fits'] and train['bytes_per_chip'] <= r['hbm_bytes_per_chip'], train
