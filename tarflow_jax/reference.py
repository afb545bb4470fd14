"""Official PyTorch TarFlow state dicts (apple/ml-tarflow) to our variables, and back.

The command line `python -m tarflow_jax.cli.convert` (tarflow_jax/cli/convert.py) converts a released
`.pth` into a checkpoint directory, and a checkpoint back into a `.pth` or `.npz`. One table, `_entries`,
maps the reference's keys onto our variables both ways.
"""

import dataclasses
import re
from typing import Callable, Iterator, Mapping, Union

import jax.numpy as jnp
import numpy as np

from tarflow_jax import config_lib, errors
from tarflow_jax.model import TarFlow, abstract_variables
from tarflow_jax.state_dict import read_state_dict, strip_prefixes, write_state_dict


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How one reference tensor maps onto one of our variables."""
  ref_key: str
  path: tuple  # path into our variables, e.g. ('params', 'block_0', 'proj_in', 'kernel')
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_ref: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Buffer:
  """A reference tensor that carries no weights of ours (a causal mask): written as `value` on export."""
  ref_key: str
  value: np.ndarray


_same = lambda a: a
_transpose = lambda a: np.ascontiguousarray(a.T)  # torch Linear (out, in) <-> Flax Dense (in, out)


def _entries(model: TarFlow) -> Iterator[Union[_Rule, _Buffer]]:
  """Every tensor of the reference's state dict for `model`, in its `state_dict()` order.

  torch lists a module's own tensors (parameters, then buffers) before its submodules'.
  """

  def linear(ref, path):
    yield _Rule(ref + '.weight', path + ('kernel',), _transpose, _transpose)
    yield _Rule(ref + '.bias', path + ('bias',), _same, _same)

  def norm(ref, path):
    yield _Rule(ref + '.weight', path + ('scale',), _same, _same)
    yield _Rule(ref + '.bias', path + ('bias',), _same, _same)

  t = model.num_tokens
  yield _Rule('var', ('prior', 'var'), _same, _same)
  for i in range(model.spec.num_blocks):
    ref, ours = f'blocks.{i}', ('params', f'block_{i}')
    yield _Rule(f'{ref}.pos_embed', ours + ('pos_embed',), _same, _same)
    if model.spec.num_classes:  # reference: (classes, 1, channels); ours: (classes, channels)
      yield _Rule(f'{ref}.class_embed', ours + ('class_embed',), lambda a: a[:, 0], lambda a: a[:, None])
    yield _Buffer(f'{ref}.attn_mask', np.tril(np.ones((t, t), np.float32)))  # (T, T) causal mask
    yield from linear(f'{ref}.proj_in', ours + ('proj_in',))
    for l in range(model.spec.layers_per_block):
      lref, lours = f'{ref}.attn_blocks.{l}', ours + (f'layer_{l}',)
      yield from norm(f'{lref}.attention.norm', lours + ('attention', 'norm'))
      yield from linear(f'{lref}.attention.qkv', lours + ('attention', 'qkv'))
      yield from linear(f'{lref}.attention.proj', lours + ('attention', 'proj'))
      yield from norm(f'{lref}.mlp.norm', lours + ('mlp', 'norm'))
      yield from linear(f'{lref}.mlp.main.0', lours + ('mlp', 'fc1'))
      yield from linear(f'{lref}.mlp.main.2', lours + ('mlp', 'fc2'))
    yield from linear(f'{ref}.proj_out', ours + ('proj_out',))


def describe_state_dict(state: Mapping[str, np.ndarray]) -> dict:
  """The architecture a reference state dict implies (what can be read off its shapes).

  Takes what `from_reference` takes: key prefixes of wrappers (`module.`, `_orig_mod.`, ...) are stripped.
  """
  state = strip_prefixes(state)
  blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))})
  layers = {int(m.group(1)) for k in state if (m := re.match(r'blocks\.0\.attn_blocks\.(\d+)\.', k))}
  arch = {'num_blocks': len(blocks), 'layers_per_block': len(layers)}
  if 'blocks.0.pos_embed' in state:
    arch['num_tokens'], arch['channels'] = tuple(state['blocks.0.pos_embed'].shape)
  if 'blocks.0.proj_in.weight' in state:
    arch['token_dim'] = state['blocks.0.proj_in.weight'].shape[1]
  if 'blocks.0.proj_out.weight' in state and 'token_dim' in arch:
    arch['nvp'] = state['blocks.0.proj_out.weight'].shape[0] == 2 * arch['token_dim']
  arch['num_classes'] = state['blocks.0.class_embed'].shape[0] if 'blocks.0.class_embed' in state else 0
  if 'blocks.0.attn_blocks.0.mlp.main.0.weight' in state and arch.get('channels'):
    arch['expansion'] = state['blocks.0.attn_blocks.0.mlp.main.0.weight'].shape[0] // arch['channels']
  return arch


def _describe_model(model: TarFlow) -> dict:
  """The model's architecture fields, and the two that a state dict shows instead of img_size and patch_size."""
  fields = {k: getattr(model.spec, k) for k in config_lib.ARCHITECTURE_FIELDS}
  return {**fields, 'num_tokens': model.num_tokens, 'token_dim': model.token_dim}


_FIELD_HINTS = {
    'num_tokens': '(img_size / patch_size)**2: check img_size and patch_size',
    'token_dim': 'in_channels * patch_size**2: check in_channels and patch_size',
    'channels': 'the Transformer width',
    'num_classes': 'the number of classes (0 for an unconditional model)',
}


class ArchitectureMismatch(errors.UserError):
  """A checkpoint whose weights do not fit the model's architecture."""


def _check_architecture(model: TarFlow, state: Mapping[str, np.ndarray]) -> None:
  ours, theirs = _describe_model(model), describe_state_dict(state)
  for field, want in ours.items():
    got = theirs.get(field)
    if got is not None and got != want:
      hint = _FIELD_HINTS.get(field, '')
      raise ArchitectureMismatch(
          f'Checkpoint does not match the model: the checkpoint has {field}={got}, the model has '
          f'{field}={want}{" (" + hint + ")" if hint else ""}.\n  checkpoint: {theirs}\n  model:      {ours}\n'
          'Set the config\'s model fields to the checkpoint\'s architecture.')


def from_reference(model: TarFlow, state: Mapping[str, np.ndarray]) -> dict:
  """Converts a reference state dict to our variables {'params', 'prior'}.

  Checks every key and shape against `model` and raises `ArchitectureMismatch`
  naming the first difference.
  """
  state = {k: np.asarray(v, np.float32) for k, v in strip_prefixes(state).items()}
  _check_architecture(model, state)
  entries = list(_entries(model))
  rules = [e for e in entries if isinstance(e, _Rule)]
  expected = {e.ref_key for e in entries}
  missing = [r.ref_key for r in rules if r.ref_key not in state]
  if missing:
    raise ArchitectureMismatch(f'Checkpoint lacks {len(missing)} weights the model needs, first {missing[0]!r}. '
                               f'Checkpoint architecture: {describe_state_dict(state)}.')
  unexpected = [k for k in state if k not in expected]
  if unexpected:
    raise ArchitectureMismatch(f'Checkpoint has {len(unexpected)} weights the model does not, first {unexpected[0]!r}. '
                               f'Checkpoint architecture: {describe_state_dict(state)}.')
  shapes = _variable_shapes(model)
  variables: dict = {}
  for r in rules:
    value = r.to_ours(state[r.ref_key])
    want = shapes[r.path]
    if value.shape != want:
      raise ArchitectureMismatch(f'{r.ref_key}: checkpoint shape {state[r.ref_key].shape} does not fit the model '
                                 f'(expects {r.to_ref(np.zeros(want)).shape}).')
    _set(variables, r.path, jnp.asarray(value))
  for b in entries:
    if isinstance(b, _Buffer) and b.ref_key in state and state[b.ref_key].shape != b.value.shape:
      raise ArchitectureMismatch(f'{b.ref_key}: checkpoint shape {state[b.ref_key].shape}, the model expects '
                                 f'{b.value.shape}.')
  return variables


# Built into the reference's Model: its constructor takes neither, and its state dict does not show head_dim.
REFERENCE_HEAD_DIM = 64
REFERENCE_EXPANSION = 4

# The arguments of the reference's Model(...), all of them fields of ours.
REFERENCE_MODEL_ARGS = ('in_channels', 'img_size', 'patch_size', 'channels', 'num_blocks', 'layers_per_block', 'nvp',
                        'num_classes')


def to_reference(model: TarFlow, variables) -> dict:
  """Our variables to the reference's state dict, float32 numpy arrays in its `state_dict()` order.

  The reference's `Model(**{f: getattr(model.spec, f) for f in REFERENCE_MODEL_ARGS})` takes it with
  `load_state_dict(..., strict=True)` (as torch tensors): the same keys, shapes and dtypes, the
  causal-mask buffers included. It computes the same function only when `model` has the reference's
  head_dim and expansion, which `export_reference_checkpoint` checks.
  """
  return {e.ref_key: e.value if isinstance(e, _Buffer) else e.to_ref(np.asarray(_get(variables, e.path), np.float32))
          for e in _entries(model)}


def export_reference_checkpoint(model: TarFlow, variables, path: str, overwrite: bool = False) -> dict:
  """Writes `variables` as a reference state dict, `.pth` (needs torch) or `.npz`; returns the state dict.

  Raises `ArchitectureMismatch` for a model that the reference's Model cannot compute (head_dim other
  than 64, expansion other than 4), FileExistsError for an existing `path` unless `overwrite`.
  """
  if (model.spec.head_dim, model.spec.expansion) != (REFERENCE_HEAD_DIM, REFERENCE_EXPANSION):
    raise ArchitectureMismatch(
        f'The reference\'s Model has head_dim={REFERENCE_HEAD_DIM} and expansion={REFERENCE_EXPANSION} built in; '
        f'this model has head_dim={model.spec.head_dim} and expansion={model.spec.expansion}, so its weights would '
        'compute another function there (or not load). Only models with those two values can be exported.')
  state = to_reference(model, variables)
  write_state_dict(path, state, overwrite=overwrite)
  return state


def load_reference_checkpoint(model: TarFlow, path: str) -> dict:
  """Reads a reference `.pth` / `.npz` file into variables for `model`."""
  return from_reference(model, read_state_dict(path))


def _variable_shapes(model: TarFlow) -> dict:
  return {path: s.shape for path, s in _flatten(abstract_variables(model))}


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
