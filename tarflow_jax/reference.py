"""Official PyTorch TarFlow state dicts (apple/ml-tarflow) to our variables, and back; also iTARFlow's
(apple/ml-itarflow), for a model with `noise_conditioning`.

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
from tarflow_jax.model import PER_BLOCK_FIELDS, TarFlow, abstract_variables
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

  torch lists a module's own tensors (parameters, then buffers) before its submodules'. A model with
  `noise_conditioning` is ml-itarflow's: its blocks' layers are `head_blocks` (ml-tarflow's
  `attn_blocks`), each block has a `time_embed`, and the shared backbone (`shared_backbone.j`) is
  listed once by the model and again by every block that holds it (`blocks.i.shared_backbone.j`).
  """

  def linear(ref, path):
    yield _Rule(ref + '.weight', path + ('kernel',), _transpose, _transpose)
    yield _Rule(ref + '.bias', path + ('bias',), _same, _same)

  def norm(ref, path):
    yield _Rule(ref + '.weight', path + ('scale',), _same, _same)
    yield _Rule(ref + '.bias', path + ('bias',), _same, _same)

  def layer(lref, lours):
    yield from norm(f'{lref}.attention.norm', lours + ('attention', 'norm'))
    yield from linear(f'{lref}.attention.qkv', lours + ('attention', 'qkv'))
    yield from linear(f'{lref}.attention.proj', lours + ('attention', 'proj'))
    yield from norm(f'{lref}.mlp.norm', lours + ('mlp', 'norm'))
    yield from linear(f'{lref}.mlp.main.0', lours + ('mlp', 'fc1'))
    yield from linear(f'{lref}.mlp.main.2', lours + ('mlp', 'fc2'))

  def shared_backbone(ref):
    for j in range(spec.shared_layers):
      yield from layer(f'{ref}shared_backbone.{j}', ('params', f'shared_layer_{j}'))

  spec = model.spec
  layers = 'head_blocks' if spec.noise_conditioning else 'attn_blocks'
  yield _Rule('var', ('prior', 'var'), _same, _same)
  yield from shared_backbone('')
  for i in range(spec.num_blocks):
    block = spec.block(i)
    t = block.num_tokens
    ref, ours = f'blocks.{i}', ('params', f'block_{i}')
    yield _Rule(f'{ref}.pos_embed', ours + ('pos_embed',), _same, _same)
    if spec.num_classes:  # reference: (classes, 1, channels); ours: (classes, channels)
      yield _Rule(f'{ref}.class_embed', ours + ('class_embed',), lambda a: a[:, 0], lambda a: a[:, None])
    yield _Buffer(f'{ref}.attn_mask', np.tril(np.ones((t, t), np.float32)))  # (T, T) causal mask
    yield from linear(f'{ref}.proj_in', ours + ('proj_in',))
    yield from shared_backbone(f'{ref}.')
    for l in range(block.head_layers):
      yield from layer(f'{ref}.{layers}.{l}', ours + (f'layer_{l}',))
    yield from linear(f'{ref}.proj_out', ours + ('proj_out',))
    if spec.noise_conditioning:
      yield from linear(f'{ref}.time_embed.mlp.0', ours + ('time_embed', 'fc1'))
      yield from linear(f'{ref}.time_embed.mlp.2', ours + ('time_embed', 'fc2'))


def describe_state_dict(state: Mapping[str, np.ndarray]) -> dict:
  """The architecture a reference state dict implies (what can be read off its shapes).

  Takes what `from_reference` takes: key prefixes of wrappers (`module.`, `_orig_mod.`, ...) are stripped.
  """
  state = strip_prefixes(state)
  blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))})
  shared = len({m.group(1) for k in state if (m := re.match(r'shared_backbone\.(\d+)\.', k))})
  count = lambda pattern: len({m.group(1) for k in state if (m := re.match(pattern, k))})
  layers = [shared + count(rf'blocks\.{i}\.(?:attn|head)_blocks\.(\d+)\.') for i in blocks]
  arch = {'num_blocks': len(blocks), 'layers_per_block': _per_block(layers)}
  pos, proj_in = [state.get(f'blocks.{i}.pos_embed') for i in blocks], [state.get(f'blocks.{i}.proj_in.weight')
                                                                         for i in blocks]
  if pos and all(p is not None for p in pos):
    arch['num_tokens'], arch['channels'] = (_per_block([p.shape[j] for p in pos]) for j in (0, 1))
  if proj_in and all(w is not None for w in proj_in):
    arch['token_dim'] = _per_block([w.shape[1] for w in proj_in])
  if 'blocks.0.proj_out.weight' in state and proj_in and proj_in[0] is not None:
    arch['nvp'] = state['blocks.0.proj_out.weight'].shape[0] == 2 * proj_in[0].shape[1]
  arch['num_classes'] = state['blocks.0.class_embed'].shape[0] if 'blocks.0.class_embed' in state else 0
  fc1 = next((state[k] for k in ('blocks.0.attn_blocks.0.mlp.main.0.weight', 'blocks.0.head_blocks.0.mlp.main.0.weight',
                                 'shared_backbone.0.mlp.main.0.weight') if k in state), None)
  if fc1 is not None:
    arch['expansion'] = fc1.shape[0] // fc1.shape[1]
  if shared:
    arch['shared_layers'] = shared
  if 'blocks.0.time_embed.mlp.0.weight' in state:
    arch['noise_conditioning'] = True
  return arch


def _per_block(values: list):
  """One value for every block, or a tuple of them where they differ."""
  return values[0] if len(set(values)) == 1 else tuple(values)


def _describe_model(model: TarFlow) -> dict:
  """The model's architecture fields as `describe_state_dict` gives them, and the two that a state dict shows
  instead of img_size and patch_size."""
  spec = model.spec
  blocks = [spec.block(i) for i in range(spec.num_blocks)]
  fields = {k: getattr(spec, k) for k in config_lib.ARCHITECTURE_FIELDS}
  per_block = {'num_tokens': [b.num_tokens for b in blocks], 'token_dim': [b.token_dim for b in blocks],
               'layers_per_block': [spec.shared_layers + b.head_layers for b in blocks]}
  return {**fields, **{k: _per_block(v) for k, v in per_block.items()}}


_FIELD_HINTS = {
    'num_tokens': '(img_size / patch_size)**2: check img_size and patch_size',
    'token_dim': 'in_channels * patch_size**2: check in_channels and patch_size',
    'channels': 'the Transformer width',
    'num_classes': 'the number of classes (0 for an unconditional model)',
    'noise_conditioning': 'apple/ml-itarflow\'s models are conditioned on the noise level (noise_conditioning=True), '
                          'apple/ml-tarflow\'s are not',
    'shared_layers': 'the layers of the shared backbone (ml-itarflow\'s shared_backbone_layers)',
}


class ArchitectureMismatch(errors.UserError):
  """A checkpoint whose weights do not fit the model's architecture."""


def _check_architecture(model: TarFlow, state: Mapping[str, np.ndarray]) -> None:
  ours, theirs = _describe_model(model), describe_state_dict(state)
  theirs.setdefault('shared_layers', 0)
  theirs.setdefault('noise_conditioning', False)
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
  first_key = {}  # path -> the first reference key read into it (a shared backbone is listed once per block)
  for r in rules:
    value = r.to_ours(state[r.ref_key])
    want = shapes[r.path]
    if value.shape != want:
      raise ArchitectureMismatch(f'{r.ref_key}: checkpoint shape {state[r.ref_key].shape} does not fit the model '
                                 f'(expects {r.to_ref(np.zeros(want)).shape}).')
    if r.path in first_key:
      if not np.array_equal(value, np.asarray(_get(variables, r.path))):
        raise ArchitectureMismatch(f'{r.ref_key} differs from {first_key[r.path]}, which is the same shared weight.')
      continue
    first_key[r.path] = r.ref_key
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


# ml-itarflow's Model(...) arguments that are ours under another name.
_ITARFLOW_RENAMES = {'patch_sizes': 'patch_size', 'shared_backbone_layers': 'shared_layers'}
ITARFLOW_MODEL_ARGS = ('in_channels', 'img_size', 'patch_sizes', 'channels', 'num_blocks', 'layers_per_block', 'nvp',
                       'num_classes', 'shared_backbone_layers')


def itarflow_model_fields(args: Mapping) -> dict:
  """Our model fields for ml-itarflow's `Model(**args)` (per-block lists as tuples; noise conditioning on)."""
  fields = {_ITARFLOW_RENAMES.get(k, k): args[k] for k in ITARFLOW_MODEL_ARGS if k in args}
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
  return {**fields, 'noise_conditioning': True}


def reference_model_args(spec) -> dict:
  """The arguments of the reference's `Model(...)` for our spec: ml-itarflow's for a noise-conditioned model
  (per-block fields as lists, block 0 first), else ml-tarflow's."""
  if not spec.noise_conditioning:
    return {f: getattr(spec, f) for f in REFERENCE_MODEL_ARGS}

  def value(field):
    if field in PER_BLOCK_FIELDS:
      return [getattr(spec.block(i), field) for i in range(spec.num_blocks)]
    return getattr(spec, field)

  return {theirs: value(_ITARFLOW_RENAMES.get(theirs, theirs)) for theirs in ITARFLOW_MODEL_ARGS}


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
