"""PyTorch state dicts as numpy: read from a `.pth` (needs torch) or an `.npz` of the same keys."""

import os
from typing import Mapping

import numpy as np

# Prefixes that wrappers add to state-dict keys: our .npz fixtures, DDP, torch.compile.
_PREFIXES = ('state/', 'module.', '_orig_mod.')


def strip_prefixes(state: Mapping[str, np.ndarray]) -> dict:
  """Drops the key prefixes that .npz recordings, DDP and torch.compile add."""
  out = {}
  for k, v in state.items():
    for p in _PREFIXES:
      if k.startswith(p):
        k = k[len(p):]
    out[k] = v
  return out


def read_state_dict(path: str) -> dict:
  """Reads a state dict from a `.pth` (needs torch) or an `.npz` with the same keys."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path!r}.')
  if path.endswith('.npz'):
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files if k.startswith('state/') or not '/' in k}
    except (OSError, ValueError) as e:
      raise ValueError(f'{path!r} is not an .npz state dict ({e}).') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path!r} needs PyTorch: pip install "tarflow_jax[torch]" '
                      '(or save the state dict as .npz).') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch reports a foreign file as several types
    raise ValueError(f'{path!r} is not a PyTorch state dict ({type(e).__name__}: {e}).') from e
  if not isinstance(state, Mapping):
    raise ValueError(f'{path!r} does not hold a state dict (a mapping of names to tensors).')
  return {k: v.detach().float().numpy() for k, v in state.items()}
