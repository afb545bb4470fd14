"""PyTorch state dicts as numpy: read from and written to a `.pth` (needs torch) or an `.npz` of the same keys."""

import collections
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from tarflow_jax import errors

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


def is_torchscript(path: str) -> bool:
  """Whether `path` is a TorchScript archive (`torch.jit.save`: a zip that holds the module's code)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as f:
    return any(name.split('/')[1:2] == ['code'] for name in f.namelist())


def load_torch(path: str, alternative: str = '', what: str = 'a PyTorch file') -> Any:
  """What `torch.load` reads from the PyTorch file `path` (tensors only, onto the CPU); for a
  TorchScript archive, its module's state dict (`torch.jit.load`).

  Raises errors.MissingExtra without torch (its message ends with `alternative`, another way than
  installing it) and ValueError, saying the file is not `what`, for a file torch cannot read.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingExtra(f'Reading {path!r} needs PyTorch: pip install "tarflow_jax[torch]"{alternative}.') from e
  try:
    if is_torchscript(path):
      return torch.jit.load(path, map_location='cpu').state_dict()
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch reports a foreign file as several types
    raise errors.UserError(f'{path!r} is not {what} ({type(e).__name__}: {e}).') from e


def read_state_dict(path: str) -> dict:
  """Reads a state dict from a `.pth` or `.pt` (needs torch; a TorchScript archive gives its module's
  state dict) or an `.npz` with the same keys."""
  if not os.path.exists(path):
    raise errors.NotFound(f'No checkpoint at {path!r}.')
  if path.endswith('.npz'):
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files if k.startswith('state/') or not '/' in k}
    except (OSError, ValueError) as e:
      raise errors.UserError(f'{path!r} is not an .npz state dict ({e}).') from e
  state = load_torch(path, ' (or save the state dict as .npz)', what='a PyTorch state dict')
  if not isinstance(state, Mapping):
    raise errors.UserError(f'{path!r} does not hold a state dict (a mapping of names to tensors).')
  return {k: v.detach().float().numpy() for k, v in state.items()}


STATE_DICT_SUFFIXES = ('.pth', '.npz')


def write_state_dict(path: str, state: Mapping[str, np.ndarray], overwrite: bool = False) -> None:
  """Writes `state` as a `.pth` (torch tensors, in `state`'s order; needs torch) or an `.npz` of the same keys.

  The file appears whole or not at all. Raises errors.AlreadyExists if `path` exists, unless `overwrite`.
  """
  if not path.endswith(STATE_DICT_SUFFIXES):
    raise errors.UserError(f'{path!r}: a state dict is written as a .pth or an .npz file; end the name with one.')
  if os.path.exists(path) and not overwrite:
    raise errors.AlreadyExists(f'{path!r} already exists and nothing was written: choose another name, or pass '
                               '--overwrite (overwrite=True) to replace it.')
  arrays = collections.OrderedDict((k, np.array(v)) for k, v in state.items())  # writable, contiguous copies
  if path.endswith('.pth'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.MissingExtra(f'Writing {path!r} needs PyTorch: pip install "tarflow_jax[torch]", or write an '
                                '.npz of the same keys (a name ending .npz).') from e
    save = lambda f: torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items()), f)
  else:
    save = lambda f: np.savez(f, **arrays)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + '.partial'
  try:
    with open(partial, 'wb') as f:
      save(f)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
