"""A real two-process run on this machine: jax.distributed over a loopback coordinator, CPU collectives."""

import json
import os
import socket
import subprocess
import sys
import textwrap

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
