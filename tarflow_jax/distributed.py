"""Multi-process JAX: which cluster this process belongs to, and starting `jax.distributed` there."""

import os

from absl import logging
import jax

from tarflow_jax import errors

_EXPLICIT = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def cluster_environment() -> tuple[str, int]:
  """Names the multi-process environment that `jax.distributed.initialize()` would join, and its size.

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, when set, win; otherwise JAX's own
  cluster detection decides, in its own order (JAX 0.10): Open MPI, SLURM, Cloud TPU VM (metadata
  server), GKE TPU, Kubernetes. JAX asks the metadata server only on a VM with TPU chips attached
  and libtpu installed, so elsewhere this reads environment variables alone.

  Returns:
    (name, number of processes); ('', 1) when no such environment is found.
  """
  if 'JAX_NUM_PROCESSES' in os.environ:
    missing = [v for v in _EXPLICIT if v not in os.environ]
    if missing:
      raise errors.UserError(f'JAX_NUM_PROCESSES is set but {", ".join(missing)} is not: set all of '
                             f'{", ".join(_EXPLICIT)} on every process, or none of them inside a cluster that JAX '
                             'detects.')
    return 'JAX_NUM_PROCESSES', int(os.environ['JAX_NUM_PROCESSES'])
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # JAX has no public detection API

  env = next((e for e in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
              if not e.opt_in_only_method and e.is_env_present()), None)
  if env is None:
    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
      raise errors.UserError('JAX_COORDINATOR_ADDRESS is set but no cluster was detected: also set JAX_NUM_PROCESSES '
                             'and JAX_PROCESS_ID on every process.')
    return '', 1
  return env.__name__, env.get_process_count()


def initialize_distributed() -> None:
  """Starts `jax.distributed` when this is one of several processes (see `cluster_environment`)."""
  name, num_processes = cluster_environment()
  if num_processes < 2:
    logging.info('Single process%s.', f' ({name} with one process)' if name else '')
    return
  logging.info('Multi-process environment: %s, %d processes; starting jax.distributed.', name, num_processes)
  kwargs = {}
  if name == 'JAX_NUM_PROCESSES':  # jax.distributed reads JAX_COORDINATOR_ADDRESS itself, but not these
    kwargs = dict(num_processes=num_processes, process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d, %d local devices of %d.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
