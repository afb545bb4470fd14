"""Multi-process runs on this machine (jax.distributed over a loopback coordinator, CPU collectives) and how
`python -m tarflow_jax.main` decides to start them."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
from jax._src.clusters import cloud_tpu_cluster
import numpy as np
import pytest

from conftest import xla_flags

from tarflow_jax import checkpoint, distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=process_id)
    import numpy as np
    from tarflow_jax import checkpoint, config_lib, data, train
    c = config_lib.cpu_digits(config_lib.default())
    c.model.num_classes = 10
    c.update(dict(num_train_steps=4, eval_every=4, sample_every=4, checkpoint_every=2, log_every=2))
    out = train.train_and_evaluate(c, workdir)
    first = next(data.get_split(c, 'train', c.batch_size, train=True, seed=c.seed).batches)
    _, variables, _ = checkpoint.load_model(workdir)
    kernel = np.asarray(variables['params']['block_0']['proj_out']['kernel'])
    print('RESULT', json.dumps(dict(processes=jax.process_count(), devices=jax.device_count(),
                                    labels=first['label'].tolist(), checksum=float(np.abs(kernel).sum()),
                                    bpd=out['eval'][4])))
""")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_on_their_own_shards_and_agree(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  port, workdir = free_port(), tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(2))
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(next(l.split(' ', 1)[1] for l in out.splitlines() if l.startswith('RESULT'))))
  first, second = results
  assert first['processes'] == second['processes'] == 2 and first['devices'] == 4
  assert first['labels'] != second['labels']  # each process reads its own shard
  assert first['checksum'] == second['checksum'] and first['bpd'] == second['bpd']  # they agree
  # The checkpoint they wrote together restores in one process.
  _, variables, config = checkpoint.load_model(str(workdir))
  kernel = np.asarray(jax.device_get(variables['params']['block_0']['proj_out']['kernel']))
  np.testing.assert_allclose(np.abs(kernel).sum(), first['checksum'], rtol=1e-6)
  assert config.num_train_steps == 4 and first['checksum'] > 0


def preempt_two_processes(workdir, logs, signalled, after_step):
  """Runs `python -m tarflow_jax.main` as two processes (told so by the JAX_* variables), sends SIGTERM to
  `signalled` alone once it has logged a step after `after_step`, and returns their logs once both exited 0."""
  port, procs = free_port(), []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1),
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
               JAX_COMPILATION_CACHE_DIR=str(workdir.parent / 'jax_cache'))  # the rerun compiles nothing
    cmd = [sys.executable, '-m', 'tarflow_jax.main', f'--config={REPO}/configs/demo.py:smoke', f'--workdir={workdir}',
           '--config.num_train_steps=100000', '--config.checkpoint_every=100000', '--config.log_every=1',
           '--config.eval_every=0', '--config.sample_every=0']
    with open(logs[i], 'w') as log:
      procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
  texts = []
  try:
    deadline = time.time() + 300
    while max(map(int, re.findall(r'\[(\d+)\] train/', open(logs[signalled]).read())), default=-1) <= after_step:
      assert all(p.poll() is None for p in procs) and time.time() < deadline, open(logs[signalled]).read()[-3000:]
      time.sleep(0.1)
    procs[signalled].send_signal(signal.SIGTERM)
    for p, log in zip(procs, logs):
      p.wait(timeout=300)
      texts.append(open(log).read())
      assert p.returncode == 0, texts[-1][-3000:]
  finally:
    for p in procs:
      p.kill()  # no-op once it has exited; never leaves a process behind when a test fails
  return texts


def stop_step(texts) -> int:
  stops = [re.findall(r'Stopped at step (\d+) after a preemption notice', t) for t in texts]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0] == stops[1], stops  # the same step on both
  return int(stops[0][0])


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / 'run'
  # Process 1 alone is signalled: both write one checkpoint, at the same step, and exit 0.
  first = stop_step(preempt_two_processes(workdir, [tmp_path / f'process_{i}.log' for i in range(2)], 1, 0))
  assert first > 0 and os.listdir(workdir / 'checkpoints') == [str(first)]
  # The same command again resumes there; now process 0 (the coordinator) alone is signalled.
  texts = preempt_two_processes(workdir, [tmp_path / f'rerun_{i}.log' for i in range(2)], 0, first)
  assert all(f'Resumed from step {first}' in t for t in texts)
  second = stop_step(texts)
  assert second > first and sorted(os.listdir(workdir / 'checkpoints'), key=int) == [str(first), str(second)]


CLUSTER_VARIABLES = ('OMPI_', 'SLURM_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES',
                     'JAX_PROCESS_ID')


@pytest.fixture
def no_cluster(monkeypatch):
  """A machine outside any cluster, where jax.distributed.initialize is recorded instead of run and no metadata
  server may be asked."""
  for name in list(os.environ):
    if name.startswith(CLUSTER_VARIABLES):
      monkeypatch.delenv(name)

  def no_metadata_server(key):
    raise AssertionError(f'asked the metadata server for {key!r}')

  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', no_metadata_server)
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', False)  # as JAX finds on a VM without TPU chips
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  return calls


def test_a_single_machine_starts_no_distributed_client_and_asks_no_server(no_cluster):
  start = time.time()
  assert distributed.cluster_environment() == ('', 1)
  distributed.initialize_distributed()
  assert no_cluster == [] and time.time() - start < 1


def test_explicit_variables_start_the_client_with_their_count_and_id(no_cluster, monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  distributed.initialize_distributed()
  assert no_cluster == [dict(num_processes=2, process_id=1)]
  monkeypatch.delenv('JAX_PROCESS_ID')
  with pytest.raises(ValueError, match='JAX_PROCESS_ID'):
    distributed.initialize_distributed()
  monkeypatch.delenv('JAX_NUM_PROCESSES')
  with pytest.raises(ValueError, match='no cluster was detected'):
    distributed.initialize_distributed()


@pytest.mark.parametrize('tasks, started', [('4', True), ('1', False)])
def test_slurm_and_open_mpi_jobs_start_the_client_only_with_several_tasks(no_cluster, monkeypatch, tasks, started):
  slurm = dict(SLURM_JOB_ID='77', SLURM_STEP_NODELIST='gpu[001-004]', SLURM_NTASKS=tasks, SLURM_PROCID='0',
               SLURM_LOCALID='0')
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert distributed.cluster_environment() == ('SlurmCluster', int(tasks))
  distributed.initialize_distributed()
  assert no_cluster == ([{}] if started else [])
  for name in slurm:
    monkeypatch.delenv(name)
  monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.96.0.1:34911')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', tasks)
  assert distributed.cluster_environment() == ('OmpiCluster', int(tasks))


@pytest.mark.parametrize('workers', [4, 1])
def test_cloud_tpu_vm_workers_come_from_the_metadata_server(no_cluster, monkeypatch, workers):
  # A VM made by `gcloud compute tpus tpu-vm create`: no TPU_WORKER_HOSTNAMES, the workers are in the metadata.
  metadata = {'agent-worker-number': '0', 'worker-network-endpoints': ','.join(f'10.0.0.{i}' for i in range(workers)),
              'tpu-env': "ACCELERATOR_TYPE: 'v4-32'"}
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', lambda key: (metadata[key], 200))
  assert distributed.cluster_environment() == ('GceTpuCluster', workers)
  distributed.initialize_distributed()
  assert no_cluster == ([{}] if workers > 1 else [])
  # GKE: the metadata server has no worker number; the workers are in the environment.
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', lambda key: ('', 404))
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1')
  assert distributed.cluster_environment() == ('GkeTpuCluster', 2)
