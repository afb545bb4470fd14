"""Tiny random TarFlows for tests: every weight drawn at random, so no block is the identity."""

import jax
import jax.numpy as jnp

from tarflow_jax.model import Spec, TarFlow, init_variables


def tiny_model(**overrides) -> TarFlow:
  fields = dict(in_channels=2, img_size=4, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                layers_per_block=2, nvp=True, num_classes=0)
  fields.update(overrides)
  return TarFlow(Spec(**fields))


def random_variables(model: TarFlow, seed: int = 0, scale: float = 0.03) -> dict:
  """Initial variables with every parameter perturbed (the zero-initialised proj_out too)."""
  variables = init_variables(model, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
  var = jnp.exp(0.3 * jax.random.normal(jax.random.key(seed + 2), variables['prior']['var'].shape))
  prior = var if not model.spec.nvp else variables['prior']['var']
  return {'params': jax.tree.unflatten(treedef, leaves), 'prior': {'var': prior}}


def images(model: TarFlow, batch: int = 3, seed: int = 3) -> jax.Array:
  shape = (batch, model.spec.img_size, model.spec.img_size, model.spec.in_channels)
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)
