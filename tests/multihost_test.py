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
import numpy as np

from tarflow_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=process_id)
    import numpy as np
    from tarflow_jax import checkpoint, config_lib, data, train
    c = config_lib.smoke(config_lib.default())
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
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
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


def launch_main(workdir, port, steps, logs, num_processes=2):
  """`python -m tarflow_jax.main` as process i of `num_processes`, told so by the JAX_* variables."""
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
               JAX_COMPILATION_CACHE_DIR=str(workdir.parent / 'jax_cache'))
    cmd = [sys.executable, '-m', 'tarflow_jax.main', f'--config={REPO}/configs/demo.py:smoke', f'--workdir={workdir}',
           f'--config.num_train_steps={steps}', '--config.checkpoint_every=100000', '--config.log_every=1',
           '--config.eval_every=0', '--config.sample_every=0']
    with open(logs[i], 'w') as log:
      procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
  return procs


def finish(procs, logs):
  texts = []
  for p, log in zip(procs, logs):
    try:
      p.wait(timeout=300)
    finally:
      p.kill()  # no-op once it has exited; never leaves a process behind when a test fails
    texts.append(open(log).read())
    assert p.returncode == 0, texts[-1][-3000:]
  return texts


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_the_rerun_resumes(tmp_path):
  workdir, logs = tmp_path / 'run', [tmp_path / f'process_{i}.log' for i in range(2)]
  rerun_logs = [tmp_path / f'process_{i}_rerun.log' for i in range(2)]
  procs = launch_main(workdir, free_port(), 100000, logs)
  try:
    # Only process 1 (not the coordinator) is signalled, once it has trained a step.
    deadline = time.time() + 300
    while not re.search(r'\[\d+\] train/', open(logs[1]).read()):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, open(logs[1]).read()[-3000:]
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    texts = finish(procs, logs)
  stops = [re.findall(r'Stopped at step (\d+) after a preemption notice', t) for t in texts]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0] == stops[1], stops
  step = int(stops[0][0])
  assert 0 < step < 100000 and os.listdir(workdir / 'checkpoints') == [str(step)]

  procs = launch_main(workdir, free_port(), step + 2, rerun_logs)
  texts = finish(procs, rerun_logs)
  assert all(f'Resumed from step {step}' in t for t in texts)
  assert sorted(os.listdir(workdir / 'checkpoints')) == sorted([str(step), str(step + 2)])

