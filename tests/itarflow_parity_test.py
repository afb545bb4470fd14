"""Parity with the official PyTorch iTARFlow (apple/ml-itarflow), recorded as fixtures
(format and conventions: tests/fixtures/itarflow/README.md).

Every case in the directory named by $TARFLOW_ITARFLOW_FIXTURES (default: tests/fixtures/itarflow) is
checked: the forward pass at the recorded noise levels (latent, every block's output, log-determinants,
residuals and norms, the t-reweighted loss) with labels given, dropped and absent; the state dict both
ways; `reverse` in every recorded guidance setting; iterative denoising (ODE, clipped ODE, SDE with the
recorded draws); and the .pth reader where torch is installed.
"""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from recorded import FORWARD_TOL, SAMPLE_TOL, Case, assert_close, check_pth_reader, nchw, nhwc, stems
from tarflow_jax import iterative_sampling, likelihood, reference
from tarflow_jax.model import Spec, TarFlow, patchify, repatchify

FIXTURES = os.environ.get('TARFLOW_ITARFLOW_FIXTURES',
                          os.path.join(os.path.dirname(__file__), 'fixtures', 'itarflow'))
STEMS = stems(FIXTURES)


@pytest.fixture(scope='module', params=STEMS, ids=os.path.basename)
def case(request):
  return Case(request.param, reference.itarflow_model_fields)


def test_fixtures_present():
  assert STEMS, f'No fixture cases (*.json) in {FIXTURES}'


def test_forward(case):
  spec = case.model.spec
  assert case.tags(), 'case records no forward pass'
  for tag in case.tags():
    z, logdets, block_latents = case.model.apply(case.variables, case.x, case.labels(tag), case.t)
    rec = f'forward/{tag}'
    assert_close(z, case.data[f'{rec}/z'], FORWARD_TOL, f'{rec}/z')
    assert_close(logdets, case.data[f'{rec}/logdets'], FORWARD_TOL, f'{rec}/logdets')
    assert_close(likelihood.loss(z, logdets, weights=case.t), case.data[f'{rec}/loss_reweighted_t'], FORWARD_TOL,
                 f'{rec}/loss_reweighted_t')
    assert len(block_latents) == case.spec['num_blocks']
    inputs, residuals, norms = patchify(case.x, spec.patch_sizes[0]), [], []
    for i, out in enumerate(block_latents):
      assert_close(out, case.data[f'{rec}/block{i}'], FORWARD_TOL, f'{rec}/block{i}')
      inputs = repatchify(inputs, spec.patch_sizes[max(i - 1, 0)], spec.patch_sizes[i], spec.img_size)
      residuals.append(jnp.mean((out - inputs)**2, axis=(1, 2)))
      norms.append(jnp.mean(out**2, axis=(1, 2)))
      inputs = out
    assert_close(jnp.stack(residuals, 1), case.data[f'{rec}/residuals'], FORWARD_TOL, f'{rec}/residuals')
    assert_close(jnp.stack(norms, 1), case.data[f'{rec}/norms'], FORWARD_TOL, f'{rec}/norms')


def test_state_dict_both_ways(case):
  state = {k[len('state/'):]: v for k, v in case.data.items() if k.startswith('state/')}
  back = reference.to_reference(case.model, case.variables)
  assert list(back) == list(state), 'keys or their order differ from the reference\'s state_dict()'
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_reference_constructor_arguments(case):
  """What export prints and the benchmarks build ml-itarflow's Model with: the recorded arguments, lists per block."""
  def per_block(v):
    return list(v) * case.spec['num_blocks'] if isinstance(v, list) and len(v) == 1 else v

  recorded = {k: per_block(case.spec[k]) for k in reference.ITARFLOW_MODEL_ARGS if k in case.spec}
  assert reference.reference_model_args(case.model.spec) == {'shared_backbone_layers': 0, **recorded}


def test_architecture_mismatch_is_one_clear_line(case):
  fields = reference.itarflow_model_fields(case.spec)
  wider = dict(fields, channels=[2 * c for c in case.spec['channels']])
  for other, field in ((wider, 'channels'), (dict(fields, noise_conditioning=False), 'noise_conditioning')):
    with pytest.raises(reference.ArchitectureMismatch) as e:
      reference.load_reference_checkpoint(TarFlow(Spec(**other)), case.stem + '.npz')
    first = str(e.value).splitlines()[0]
    assert f'the checkpoint has {field}=' in first and f'the model has {field}=' in first, first


def guidance_of(setting: dict) -> iterative_sampling.Guidance:
  """The reference's `Model.reverse` keywords (its defaults where missing) as our Guidance."""
  return iterative_sampling.Guidance(setting.get('guidance', 0.0), style=setting.get('lerp_style', 'tarflow'),
                                     attn_temp=setting.get('attn_temp', 1.0),
                                     annealed=setting.get('annealed_guidance', False),
                                     flows=setting.get('guide_flows', -1), first_image_s=True)


def test_reverse_every_guidance_setting(case):
  noise = jnp.asarray(case.data['sample/noise'])
  assert case.spec['guidance'], 'case records no samples'
  for j, setting in enumerate(case.spec['guidance']):
    x = iterative_sampling.reverse(case.model, case.variables, noise, case.y, noise_level=case.spec['t1'],
                                   guidance=guidance_of(setting))
    assert_close(nchw(x), case.data[f'sample/{j}/x'], SAMPLE_TOL, f'sample/{j}/x with {setting}')


def test_starflow_per_image_agrees_on_the_first_image(case):
  """Our default 'starflow' (each image its own s) is the reference's on image 0, whose s the reference uses."""
  noise = jnp.asarray(case.data['sample/noise'])
  for j, setting in enumerate(case.spec['guidance']):
    if setting.get('lerp_style') != 'starflow' or not setting.get('guidance'):
      continue
    guidance = dataclasses.replace(guidance_of(setting), first_image_s=False)
    x = nchw(iterative_sampling.reverse(case.model, case.variables, noise, case.y, noise_level=case.spec['t1'],
                                        guidance=guidance))
    assert_close(x[:1], case.data[f'sample/{j}/x'][:1], SAMPLE_TOL, f'sample/{j}/x image 0, per-image s')


@pytest.mark.parametrize('run, dynamics, clip', [('ode', 'ode', False), ('ode_clip', 'ode', True),
                                                 ('sde_vanilla', 'sde', False)])
def test_iterative_denoising(case, run, dynamics, clip):
  if f'itd/{run}/x' not in case.data:
    pytest.skip(f'{run} not recorded')
  denoising = iterative_sampling.IterativeDenoising(t0=case.spec['t0'], t1=case.spec['t1'], steps=case.spec['steps'],
                                                    dynamics=dynamics, clip=clip)
  draws = None
  if dynamics == 'sde':
    draws = jnp.stack([nhwc(case.data[f'itd/{run}/eps{i}']) for i in range(denoising.steps - 1)])
  x = iterative_sampling.iterative_denoise(case.model, case.variables, nhwc(case.data['sample/0/x']), case.y,
                                           denoising=denoising, draws=draws)
  assert_close(nchw(x), case.data[f'itd/{run}/x'], SAMPLE_TOL, f'itd/{run}/x')


@pytest.mark.extras
def test_pth_reader_matches_npz(case):
  check_pth_reader(case)
