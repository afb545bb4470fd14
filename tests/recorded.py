"""Cases recorded from the official PyTorch implementations, as the parity tests read them.

A case is STEM.json (the reference's constructor arguments and sampling settings) beside STEM.npz
(its weights under `state/`, inputs under `inputs/`, recorded outputs, images NCHW). Formats:
tests/fixtures/README.md (TarFlow) and tests/fixtures/itarflow/README.md (iTARFlow).
"""

import glob
import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import reference
from tarflow_jax.model import Spec, TarFlow

# Recomputing the reference in float32 by another code path stays under 7e-6;
# tanh-GELU moves z by 7e-5 and LayerNorm eps 1e-6 by 2.4e-5 on the shared case.
FORWARD_TOL = 1e-5
SAMPLE_TOL = 2e-5


def stems(directory: str, skip_prefix: str = '') -> list[str]:
  """The cases in `directory` (paths without extension), but those whose name starts with `skip_prefix`."""
  names = glob.glob(os.path.join(directory, '*.json'))
  return sorted(os.path.splitext(p)[0] for p in names
                if not (skip_prefix and os.path.basename(p).startswith(skip_prefix)))


def nhwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


class Case:
  """One recorded case: its spec, its arrays, our model of it with the recorded weights, and its inputs."""

  def __init__(self, stem: str, model_fields: Callable[[dict], dict]):
    with open(stem + '.json') as f:
      self.spec = json.load(f)
    with np.load(stem + '.npz') as f:
      self.data = {k: f[k] for k in f.files}
    self.stem = stem
    self.model = TarFlow(Spec(**model_fields(self.spec)))
    self.variables = reference.load_reference_checkpoint(self.model, stem + '.npz')
    self.x = nhwc(self.data['inputs/x'])  # (B, H, W, C)
    self.y = jnp.asarray(self.data['inputs/y']) if 'inputs/y' in self.data else None  # (B,)
    self.t = jnp.asarray(self.data['inputs/t'])[:, 0] if 'inputs/t' in self.data else None  # (B,) noise levels

  def tags(self) -> list[str]:
    """The label settings whose forward pass is recorded: 'y', 'y_dropped', 'y_none'."""
    return sorted({k.split('/')[1] for k in self.data if k.startswith('forward/')})

  def labels(self, tag: str):
    y = {'y': self.y, 'y_dropped': self.data.get('inputs/y_dropped'), 'y_none': None}[tag]
    return None if y is None else jnp.asarray(y)


def assert_close(actual, expected, tol: float, what: str) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f'{what}: shape {actual.shape}, recorded {expected.shape}'
  err = float(np.max(np.abs(actual - expected)))
  assert err <= tol, f'{what}: max abs error {err:.3g} > {tol:.1g}'


def check_pth_reader(case: Case) -> None:
  """The reference's .pth beside a case, read by `reference.load_reference_checkpoint`, gives the recorded latent."""
  pytest.importorskip('torch')
  pth = case.stem + '.pth'
  if not os.path.exists(pth):
    pytest.skip(f'{pth} not recorded')
  variables = reference.load_reference_checkpoint(case.model, pth)
  z, _, _ = case.model.apply(variables, case.x, case.y, case.t)
  assert_close(z, case.data['forward/y_none/z' if case.y is None else 'forward/y/z'], FORWARD_TOL, '.pth forward z')
