"""Parity with the official PyTorch TarFlow, recorded as fixtures (format: tests/fixtures/README.md).

Every case in the directory named by $TARFLOW_FIXTURES (default: tests/fixtures)
is checked: forward latents, per-block outputs, log-determinants and loss with
labels given, dropped and absent; bits per dim; every recorded guidance setting
of the sampler; the denoising step; and the .pth reader where torch is installed.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from recorded import FORWARD_TOL, SAMPLE_TOL, Case, assert_close, check_pth_reader, nchw, nhwc, stems
from tarflow_jax import likelihood, reference, sampling

FIXTURES = os.environ.get('TARFLOW_FIXTURES', os.path.join(os.path.dirname(__file__), 'fixtures'))
STEMS = stems(FIXTURES, skip_prefix='train_')  # train_* stems are training trajectories (reference_training_test.py)
ARCH_FIELDS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block', 'nvp',
               'num_classes')


@pytest.fixture(scope='module', params=STEMS, ids=os.path.basename)
def case(request):
  return Case(request.param, lambda spec: {k: spec[k] for k in ARCH_FIELDS})


def test_fixtures_present():
  assert STEMS, f'No fixture cases (*.json) in {FIXTURES}'


def test_forward(case):
  assert case.tags(), 'case records no forward pass'
  for tag in case.tags():
    y = case.labels(tag)
    z, logdets, block_latents = case.model.apply(case.variables, case.x, y)
    rec = f'forward/{tag}'
    assert_close(z, case.data[f'{rec}/z'], FORWARD_TOL, f'{rec}/z')
    assert_close(logdets, case.data[f'{rec}/logdets'], FORWARD_TOL, f'{rec}/logdets')
    assert_close(likelihood.loss(z, logdets), case.data[f'{rec}/loss'], FORWARD_TOL, f'{rec}/loss')
    assert len(block_latents) == case.spec['num_blocks']
    for i, out in enumerate(block_latents):
      assert_close(out, case.data[f'{rec}/block{i}'], FORWARD_TOL, f'{rec}/block{i}')


def test_reference_constructor_arguments(case):
  assert reference.reference_model_args(case.model.spec) == {k: case.spec[k] for k in ARCH_FIELDS}


def test_bits_per_dim(case):
  bpd = likelihood.bits_per_dim(case.model, case.variables, nhwc(case.data['bpd/x_int']), nhwc(case.data['bpd/u']))
  assert_close(bpd, case.data['bpd/bpd'], FORWARD_TOL, 'bpd/bpd')


def test_sampler_every_guidance_setting(case):
  noise = jnp.asarray(case.data['sample/noise'])
  assert case.spec['guidance'], 'case records no samples'
  for j, setting in enumerate(case.spec['guidance']):
    guidance = sampling.Guidance(setting['guidance'], guide_what=setting.get('guide_what', 'ab'),
                                 attn_temp=setting.get('attn_temp', 1.0),
                                 annealed=setting.get('annealed_guidance', False))
    x = sampling.sample(case.model, case.variables, noise, case.y, guidance=guidance)
    assert_close(nchw(x), case.data[f'sample/{j}/x'], SAMPLE_TOL, f'sample/{j}/x with {setting}')


def test_denoise(case):
  x = sampling.denoise(case.model, case.variables, nhwc(case.data['sample/0/x']), case.y,
                       sigma=float(case.data['denoise/sigma']))
  assert_close(nchw(x), case.data['denoise/x'], SAMPLE_TOL, 'denoise/x')


@pytest.mark.extras
def test_pth_reader_matches_npz(case):
  check_pth_reader(case)
