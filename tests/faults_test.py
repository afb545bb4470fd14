"""Faults a long run meets on shared storage: a full disk during a save, the same run started twice on one
workdir, a run that died holding it, and sample / evaluate reading a workdir that a run is writing."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
from PIL import Image
import pytest

from conftest import xla_flags

from tarflow_jax import checkpoint, config_lib, data, storage, train, workdir_lock
from tarflow_jax import model as model_lib
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = f'{REPO}/configs/demo.py:smoke'


def _env():
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(1))
  env.pop('TARFLOW_TRACEBACK', None)
  return env


def _train_command(workdir, *overrides):
  return [sys.executable, '-m', 'tarflow_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
          '--config.eval_every=0', '--config.sample_every=0', *overrides]


def _error_line(stderr: str) -> str:
  """The one `error:` line of a run that ended with a user error; no traceback anywhere."""
  lines = [l for l in stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, stderr[-3000:]
  assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr[-5000:]
  return lines[0]


def _not_logs(stderr: str) -> list:
  """The lines of stderr that are not absl's or TensorFlow's log lines (I/W/E1206 ...) and not the error line."""
  return [l for l in stderr.splitlines() if l.strip() and not re.match(r'^([IWE]\d{4} |WARNING: All log|error: )', l)]


def _steps(directory) -> list:
  return sorted(os.listdir(directory), key=lambda n: (len(n), n)) if os.path.isdir(directory) else []


def _smoke(**overrides):
  c = config_lib.cpu_digits(config_lib.default())
  c.update(dict(eval_every=0, sample_every=0, **overrides))
  return c


# --- a save that storage refuses ---

@pytest.mark.parametrize('error, cause', [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/data_state/6'), 'no space left on device (ENOSPC)'),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "opt.0.mu/0" in OCDBT database at local file "/w/6.orbax-'
                'checkpoint-tmp/": Failed to write 103556 bytes to file 5: No space left on device '
                "[os_error_code='28']"), 'no space left on device (ENOSPC)'),
    (RuntimeError('{{function_node __wrapped__SaveV2}} /w/data_state/6/process_0_temp/part-00000; Disk quota exceeded '
                  '[Op:SaveV2]'), 'disk quota exceeded (EDQUOT)'),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), '/w/checkpoints'), 'permission denied (EACCES)'),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), 'read-only file system (EROFS)'),
    (ValueError('PERMISSION_DENIED: Error writing "model/0" to gs://bucket/run: HTTP 403'),
     'PERMISSION_DENIED: Error writing "model/0" to gs://bucket/run: HTTP 403'),
    (ValueError('Expected a tree of arrays, got shape (3,)'), None),  # a bug, not the storage: keeps its traceback
])
def test_a_refused_write_is_named_by_its_cause(error, cause):
  wrapped = RuntimeError('Save Finalize thread failed')
  wrapped.__cause__ = error
  assert storage.write_failure_cause(error) == cause
  assert storage.write_failure_cause(wrapped) == cause


def test_the_abandoned_writes_of_a_refused_save_are_not_reported_again():
  """When one write fails Orbax abandons the item's others; asyncio reports each when collected ("Future exception
  was never retrieved", TensorStore's error with no Python traceback). Those that storage refused are dropped, a
  bug's stays."""
  script = textwrap.dedent('''
      import asyncio, gc
      from tarflow_jax import storage
      storage.quiet_background_io()
      loop = asyncio.new_event_loop()
      for message in (\'RESOURCE_EXHAUSTED: Error writing "rng/0" in OCDBT database at local file "/w/": Failed to \'
                      "write 26744 bytes to file 7: No space left on device [os_error_code='28']", 'a bug'):
        future = loop.create_future()
        future.set_exception(ValueError(message))
        del future
        gc.collect()
      ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=120, check=True)
  assert 'No space left' not in result.stderr, result.stderr
  assert 'never retrieved' in result.stderr and 'ValueError: a bug' in result.stderr, result.stderr


def test_a_refused_save_stops_the_run_with_one_error_and_keeps_the_older_checkpoints(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  config = _smoke(num_train_steps=8, checkpoint_every=2, log_every=2)
  saves, save = [], data.Batches.save

  def full_at_step_6(self, path):
    saves.append(path)
    if '/6/' in path:  # the data position is written after Orbax has started writing step 6
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    save(self, path)

  monkeypatch.setattr(data.Batches, 'save', full_at_step_6)
  with pytest.raises(checkpoint.CheckpointWriteError) as raised:
    train.train_and_evaluate(config, str(workdir))
  assert re.fullmatch(
      rf'Checkpoint 6 could not be written to --workdir={workdir}: no space left on device \(ENOSPC\) \(the file '
      r'system at \S+: .* free\)\. Training stopped and that step was removed; the last good checkpoint is step 4 '
      rf'\({workdir}/checkpoints/4\), from which rerunning the same command resumes\. Free space on that file system '
      r'.*then rerun\.', str(raised.value)), str(raised.value)
  assert _steps(workdir / 'checkpoints') == ['2', '4'] and _steps(workdir / 'data_state') == ['2', '4']
  assert not (workdir / workdir_lock.LOCK_NAME).exists()

  monkeypatch.undo()
  assert train.train_and_evaluate(config, str(workdir))['step'] == 8
  assert _steps(workdir / 'checkpoints') == ['4', '6', '8']


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs at tmp_path/disk (needs the right to mount: root, or CAP_SYS_ADMIN), unmounted afterwards."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(disk)], capture_output=True,
                           text=True, check=False) if hasattr(os, 'geteuid') else None
  if mounted is None or mounted.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else "no mount"}); the simulated '
                'ENOSPC test covers the same path')
  yield disk
  subprocess.run(['umount', '-l', str(disk)], check=False)


def test_a_full_disk_ends_the_run_in_one_line_and_the_rerun_resumes(small_disk):
  """Training into a 4 MiB tmpfs, a checkpoint (1.1 MiB) every 5 steps and none pruned: the fourth cannot be
  written. The run ends with one line, Orbax's writers quiet; the steps before it load; with more space the
  same command resumes from the last good step."""
  workdir = small_disk / 'run'
  command = _train_command(workdir, '--config.num_train_steps=40', '--config.checkpoint_every=5',
                           '--config.log_every=5', '--config.keep_checkpoints=10')
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600, check=False)
  assert result.returncode == 2, result.stderr[-5000:]
  line = _error_line(result.stderr)  # a checkpoint's, or the TensorBoard metrics' if their write fails first
  match = re.fullmatch(rf'error: (Checkpoint \d+ could not be written|Could not write the [a-z /-]+ of step \d+) to '
                       rf'--workdir={workdir}: no space left on device \(ENOSPC\) \(the file system at {small_disk}: '
                       r'.* free\)\. Training stopped[a-z ]*; the last good checkpoint is step (\d+)\b.*', line)
  assert match, line
  last = int(match.group(2))
  assert last >= 5
  assert len(_not_logs(result.stderr)) <= 3, _not_logs(result.stderr)
  steps = [str(s) for s in range(5, last + 1, 5)]
  assert _steps(workdir / 'checkpoints') == steps, os.listdir(workdir / 'checkpoints')  # no half-written step
  assert _steps(workdir / 'data_state') == steps
  for step in steps:
    _, variables, _ = checkpoint.load_model(str(workdir), step=int(step))
    assert all(np.isfinite(v).all() for v in jax_leaves(variables))

  subprocess.run(['mount', '-o', 'remount,size=64m', str(small_disk)], check=True)
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from step {last} of {workdir}/checkpoints' in result.stderr
  assert result.stdout.startswith('Done: step 40.')


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- one writer per workdir ---

HOLDER = ('import sys, time\n'
          'from tarflow_jax import workdir_lock\n'
          'workdir_lock.acquire(sys.argv[1])\n'
          'print("held", flush=True)\n'
          'time.sleep(600)\n')


def _hold(workdir) -> subprocess.Popen:
  """Another process that takes `workdir` and keeps it until killed."""
  process = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env=_env())
  assert process.stdout.readline().strip() == 'held'
  return process


def test_a_held_workdir_is_refused_before_anything_is_written_and_a_dead_holder_is_taken_over(tmp_path, caplog):
  workdir = tmp_path / 'run'
  holder = _hold(workdir)
  try:
    pattern = (rf'--workdir={workdir} is in use by another training run \(pid {holder.pid} on host '
               rf'{re.escape(socket.gethostname())}, started .* UTC: .*\); nothing was written')
    with pytest.raises(workdir_lock.WorkdirInUseError, match=pattern):
      workdir_lock.acquire(str(workdir))
    with pytest.raises(workdir_lock.WorkdirInUseError, match=pattern):
      train.train_and_evaluate(_smoke(num_train_steps=2, checkpoint_every=1, log_every=1), str(workdir))
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]
  finally:
    holder.kill()  # as kill -9: the lock stays behind
    holder.wait()
  assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())['pid'] == holder.pid
  lock = workdir_lock.acquire(str(workdir))
  assert any(f'Taking over --workdir={workdir} from a run that is no longer running (pid {holder.pid}' in r.getMessage()
             for r in caplog.records)
  assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())['pid'] == os.getpid()
  lock.release()
  assert os.listdir(workdir) == []


def _write_lock(workdir, **fields):
  workdir.mkdir(exist_ok=True)
  me = workdir_lock._this_process()  # pylint: disable=protected-access
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps({**me, 'token': 'theirs', **fields}))


def test_a_lock_from_another_host_is_taken_over_only_with_the_flag(tmp_path, caplog):
  _write_lock(tmp_path, host='node-7', pid=4242)
  with pytest.raises(workdir_lock.WorkdirInUseError,
                     match=r'held by a training run on another host \(pid 4242 on host node-7, .*\), which cannot be '
                           r'checked from here; nothing was written\. If that run is no longer running \(a lost '
                           r'host\), rerun with --take_over_workdir'):
    workdir_lock.acquire(str(tmp_path))
  # Another container on this host has its own process ids: not checked either.
  _write_lock(tmp_path, pid_namespace='pid:[1]')
  with pytest.raises(workdir_lock.WorkdirInUseError, match='--take_over_workdir'):
    workdir_lock.acquire(str(tmp_path))
  lock = workdir_lock.acquire(str(tmp_path), take_over=True)
  assert any('was taken over with --take_over_workdir' in r.getMessage() for r in caplog.records)
  lock.release()


def test_a_live_holder_is_told_from_a_reused_pid_and_a_restarted_host(tmp_path):
  me = workdir_lock._this_process()  # pylint: disable=protected-access
  _write_lock(tmp_path)  # this very process, as another run in it would be
  with pytest.raises(workdir_lock.WorkdirInUseError, match=f'in use by another training run \\(pid {os.getpid()}'):
    workdir_lock.acquire(str(tmp_path))
  for stale in (dict(process_start=me['process_start'] - 1),  # the pid now belongs to a later process
                dict(boot_id='another-boot')):  # the host was restarted since
    _write_lock(tmp_path, **stale)
    workdir_lock.acquire(str(tmp_path)).release()
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_the_same_command_twice_one_trains_and_the_other_stops_at_once(tmp_path):
  workdir = tmp_path / 'run'
  command = _train_command(workdir, '--config.num_train_steps=100000', '--config.checkpoint_every=20',
                           '--config.log_every=20')
  first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
  try:
    while not (workdir / workdir_lock.LOCK_NAME).exists():
      assert first.poll() is None, first.communicate()[1][-3000:]
      time.sleep(0.1)
    started = time.monotonic()
    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300, check=False)
    assert second.returncode == 2 and time.monotonic() - started < 60, second.stderr[-3000:]
    assert re.search(rf'--workdir={workdir} is in use by another training run \(pid {first.pid} on host .*\); nothing '
                     'was written', _error_line(second.stderr))
    assert first.poll() is None  # undisturbed
  finally:
    first.send_signal(signal.SIGTERM)  # stops at a checkpoint
    out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert out.startswith('Done: step ')
  for step in [s for s in _steps(workdir / 'checkpoints')]:
    checkpoint.load_model(str(workdir), step=int(step))
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


# --- readers beside a writer ---

def test_sample_and_evaluate_read_complete_checkpoints_while_a_run_writes_and_prunes(tmp_path):
  """A run checkpoints every other step and keeps two; meanwhile checkpoints are loaded in a loop, and the sample
  and evaluate command lines run. Every read gets a complete step; the outputs appear whole."""
  workdir, out = tmp_path / 'run', tmp_path / 'out'
  run = subprocess.Popen(_train_command(workdir, '--config.num_train_steps=100000', '--config.checkpoint_every=2',
                                        '--config.keep_checkpoints=2', '--config.log_every=50'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
  try:
    deadline = time.monotonic() + 300
    while not [s for s in _steps(workdir / 'checkpoints') if s.isdigit()]:  # a complete step
      assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
      time.sleep(0.2)
    readers = [subprocess.Popen([sys.executable, '-m', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=_env())
               for args in (['tarflow_jax.cli.sample', f'--checkpoint={workdir}', f'--output={out}', '--num=4',
                             '--batch_size=4'],
                            ['tarflow_jax.cli.evaluate', 'bpd', f'--checkpoint={workdir}', '--num_examples=32',
                             '--batch_size=32', f'--output={out}/bpd.npz'])]
    reads = 0
    while any(r.poll() is None for r in readers) or reads < 3:
      _, variables, _ = checkpoint.load_model(str(workdir))
      assert all(np.isfinite(v).all() for v in jax_leaves(variables))
      reads += 1
    results = [r.communicate(timeout=300) + (r.returncode,) for r in readers]
    steps_then = [int(s) for s in _steps(workdir / 'checkpoints') if s.isdigit()]
  finally:
    run.send_signal(signal.SIGTERM)  # stops at a checkpoint
    _, err = run.communicate(timeout=300)
  for stdout, stderr, code in results:
    assert code == 0, stderr[-3000:]
  assert run.returncode == 0, err[-3000:]
  assert steps_then[0] > 2  # the run went on writing and pruning while they read
  with np.load(out / 'samples.npz') as f:
    assert f['images'].shape == (4, 28, 28, 1)
  assert Image.open(out / 'samples.png').size[0] > 28
  with np.load(out / 'bpd.npz') as f:
    assert f['bpd'].shape == (32,) and np.isfinite(f['bpd']).all()
  assert sorted(os.listdir(out)) == ['bpd.npz', 'samples.npz', 'samples.png']  # no temporary files left


def test_a_reader_lists_the_steps_again_when_a_run_prunes_one_as_it_lists_them(tmp_path, monkeypatch):
  """Orbax reads every step it lists: a step pruned between its listing and that read fails with
  FileNotFoundError, or NotADirectoryError where it vanished between Orbax's exists() and is_dir()."""
  config = config_lib.cpu_digits(config_lib.default())
  config.model.update(img_size=8, patch_size=4, channels=32, head_dim=16)
  model = model_lib.from_config(config.model)
  checkpoint.save_model(str(tmp_path / 'run'), toy.random_variables(model), config, step=7)
  pruned = iter([FileNotFoundError('.../checkpoints/5/_CHECKPOINT_METADATA'),
                 NotADirectoryError('Path is not a directory: .../checkpoints/6')])
  real = checkpoint.manager

  def listing_as_a_run_prunes(*args, **kwargs):
    error = next(pruned, None)
    if error is not None:
      raise error
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpoint, 'manager', listing_as_a_run_prunes)
  _, variables, _ = checkpoint.load_model(str(tmp_path / 'run'))
  assert next(pruned, None) is None  # both races were met, and passed over
  assert set(variables) == {'params', 'prior'}


def test_an_output_appears_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'samples.npz'
  storage.save_npz(str(path), images=np.zeros((2, 4, 4, 1), np.uint8))
  before = path.read_bytes()
  with pytest.raises(RuntimeError, match='interrupted'):
    with storage.atomic_output(str(path)) as f:
      f.write(b'PK half an archive')
      raise RuntimeError('interrupted')
  assert path.read_bytes() == before and os.listdir(tmp_path) == ['samples.npz']
  assert storage.save_npz(str(tmp_path / 'bpd'), bpd=np.ones(3)) == str(tmp_path / 'bpd.npz')  # as np.savez names it
  storage.save_json(str(tmp_path / 'fid.json'), {'fid': 1.5})
  assert json.loads((tmp_path / 'fid.json').read_text()) == {'fid': 1.5}
  assert oct(os.stat(tmp_path / 'fid.json').st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask
