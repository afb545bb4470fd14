"""Fresh parameters are drawn as the official PyTorch model draws them (torch's defaults), by default."""

import collections

import jax
import numpy as np

from tarflow_jax.model import Spec, TarFlow, init_variables

# Wide enough that every role pools thousands of draws, small enough to initialise in a second.
MODEL = dict(in_channels=3, img_size=16, patch_size=4, channels=128, num_blocks=2, layers_per_block=2,
             num_classes=10)
Z = 5.0  # sampling-error bound, in standard errors


def reference_rule(role, fan_in):
  """(law, scale) of the reference for a parameter role: 'uniform' bound, 'normal' std, or 'const' value."""
  if role == 'proj_out/kernel':
    return 'const', 0.0
  if role.endswith(('/kernel', '/bias')) and not role.startswith('norm'):
    return 'uniform', fan_in**-0.5
  return {'norm/scale': ('const', 1.0), 'norm/bias': ('const', 0.0), 'pos_embed': ('normal', 1e-2),
          'class_embed': ('normal', 1e-2)}[role]


def pooled_draws(params):
  """Parameters grouped by role and fan-in: {(role, fan_in): 1-d array of all their values}."""
  pooled = collections.defaultdict(list)
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in path]
    layer, leaf = names[-2], names[-1]
    if leaf in ('pos_embed', 'class_embed'):
      role, fan_in = leaf, None
    else:
      role = f'{"norm" if layer == "norm" else layer}/{leaf}'
      fan_in = None if layer == 'norm' else _get(params, names[:-1])['kernel'].shape[0]  # Dense kernel (in, out)
    pooled[(role, fan_in)].append(np.asarray(value, np.float64).ravel())
  return {k: np.concatenate(v) for k, v in pooled.items()}


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def distribution_errors(params):
  """Every role whose mean, std or range falls outside the reference's law, with the numbers."""
  errors = []
  for (role, fan_in), x in sorted(pooled_draws(params).items(), key=str):
    law, scale = reference_rule(role, fan_in)
    n, mean, std, top = x.size, x.mean(), x.std(), np.abs(x).max()
    if law == 'const':
      ok = np.all(x == scale)
      want = f'all {scale}'
    else:
      sd = scale / np.sqrt(3) if law == 'uniform' else scale
      # Standard error of the sample std: sqrt(mu4 - sd^4) / (2 sd sqrt(n)); mu4 = 9/5 sd^4 (uniform), 3 sd^4 (normal).
      std_se = sd * np.sqrt((1.8 if law == 'uniform' else 3.0) - 1) / (2 * np.sqrt(n))
      limit = scale if law == 'uniform' else 6 * scale
      ok = abs(mean) <= Z * sd / np.sqrt(n) and abs(std - sd) <= Z * std_se and top <= limit
      want = f'{law} {scale:.4g}: mean 0, std {sd:.4g}, |x| <= {limit:.4g}'
    if not ok:
      errors.append(f'{role} (fan_in {fan_in}, {n} values): mean {mean:.3g}, std {std:.4g}, max |x| {top:.4g}; '
                    f'expected {want}')
  return errors


def params_of(initializer, seed=0):
  return init_variables(TarFlow(Spec(**MODEL, initializer=initializer)), jax.random.PRNGKey(seed))['params']


def test_default_init_draws_every_parameter_as_the_reference():
  params = params_of('reference')
  roles = {role for role, _ in pooled_draws(params)}
  assert roles == {'proj_in/kernel', 'proj_in/bias', 'qkv/kernel', 'qkv/bias', 'proj/kernel', 'proj/bias',
                   'fc1/kernel', 'fc1/bias', 'fc2/kernel', 'fc2/bias', 'proj_out/kernel', 'proj_out/bias',
                   'norm/scale', 'norm/bias', 'pos_embed', 'class_embed'}
  assert not distribution_errors(params), '\n'.join(distribution_errors(params))
  assert Spec(**MODEL).initializer == 'reference'


def test_flax_init_fails_the_reference_check():
  errors = distribution_errors(params_of('flax'))
  failed = {e.split(' ')[0] for e in errors}
  # LeCun-normal weights (std sqrt(3) too large, beyond the bound) and zero biases.
  assert {'proj_in/kernel', 'qkv/kernel', 'fc2/kernel', 'proj_in/bias', 'qkv/bias', 'proj_out/bias'} <= failed, errors


def test_fresh_blocks_are_independent_draws():
  params = params_of('reference')
  a, b = params['block_0']['layer_0']['mlp']['fc1']['bias'], params['block_1']['layer_0']['mlp']['fc1']['bias']
  assert not np.allclose(a, b)
