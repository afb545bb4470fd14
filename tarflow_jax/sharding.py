"""Device mesh from the config, shardings of the train state and batches, global batches, micro-batches."""

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tarflow_jax import errors

BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over all devices; one axis may be -1, meaning the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise errors.UserError(f'At most one mesh axis may be -1, got data={sizes[0]}, fsdp={sizes[1]}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise errors.UserError(f'{n} devices cannot be split into mesh data={sizes[0]}, fsdp={sizes[1]}.')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise errors.UserError(f'Mesh data={sizes[0]} x fsdp={sizes[1]} does not use the {n} devices; use -1 for one axis.')
  return jax.make_mesh(tuple(sizes), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def default_mesh(devices=None) -> jax.sharding.Mesh:
  """Every device on the 'data' axis (the default config's mesh), for tools without an experiment config."""
  return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)


# Arrays smaller than this stay replicated: sharding them saves little memory and costs collectives.
MIN_FSDP_SIZE = 2**14


def param_spec(shape: tuple, fsdp: int) -> P:
  """FSDP rule: split the largest dimension divisible by the 'fsdp' axis size; small arrays replicated."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[('fsdp' if d == dim else None) for d in range(len(shape))])
  return P()


def state_shardings(abstract_state, mesh):
  """Shardings of every leaf of a train state (params, optimiser moments, ...) by `param_spec`."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(a.shape, fsdp)), abstract_state)


def context_batch_axes() -> tuple[tuple[str, ...], int]:
  """The batch axes of the mesh set by `jax.set_mesh` (none without one) and how many shards they make."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def constrain_batch(x: jax.Array) -> jax.Array:
  """x split along its leading (batch) axis over the context mesh's batch axes; as it is without a mesh.

  Activations pinned to the batch axes make XLA gather FSDP-sharded weights for each matmul rather
  than re-shard the activations along their features (collective permutes and full-batch copies).
  """
  axes, shards = context_batch_axes()
  if not axes or x.shape[0] % shards:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(mesh, local_batch: dict) -> dict:
  """This process's slice of a batch (numpy) to global arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_microbatch(batch_size: int, microbatch: int, setting: str = 'microbatch') -> None:
  """Raises errors.UserError naming `setting` unless micro-batches of `microbatch` examples make up the batch."""
  if microbatch <= 0 or batch_size % microbatch:
    raise errors.UserError(f'{setting}={microbatch} must divide the batch of {batch_size} samples.')


def split_microbatches(a: jax.Array, n: int) -> jax.Array:
  """A batch (B, ...) as n micro-batches (n, B / n, ...), micro-batch i holding examples i, i + n, ...

  A batch split over devices stays split in every micro-batch, with no data moved between them.
  """
  return a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """Micro-batches (n, B / n, ...) back to the batch (B, ...); the inverse of `split_microbatches`."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def fetch(x) -> np.ndarray:
  """A global array (possibly spanning several processes) as numpy, the same on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
