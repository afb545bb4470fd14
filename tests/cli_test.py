"""The command lines' user-error boundary: each bad input ends in one `error:` line, exit status 2, and
leaves the workdir as it was; real bugs keep their traceback. Also: libraries define no flags."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tarflow_jax import checkpoint, config_lib, errors
from tarflow_jax import model as model_lib
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'tarflow_jax')
DEMO = f'{REPO}/configs/demo.py:smoke'


def run(module, *args, pythonpath=()):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), REPO]))
  env.pop('TARFLOW_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=600)


def assert_user_error(result, message):
  """Exit status 2, one `error:` line holding `message` (a regex), and no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and re.search(message, lines[0]), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


def snapshot(root) -> dict:
  """Every file under `root` with its bytes."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(pathlib.Path(root).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir of configs/demo.py:smoke with checkpoints at steps 1 and 2."""
  from tarflow_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('trained')
  config = config_lib.load(DEMO)
  config.update(num_train_steps=2, checkpoint_every=1, log_every=1, eval_every=0, sample_every=0)
  train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the trained workdir for one run to (not) change."""
  return pathlib.Path(shutil.copytree(trained, tmp_path / 'run'))


@pytest.mark.parametrize('args, message', [
    (['--config.checkpoint_every=0'], r'config\.checkpoint_every=0 must be positive'),
    (['--config.log_every=0'], r'config\.log_every=0 must be positive'),
    (['--config.batch_size=0'], r'config\.batch_size=0 must be positive'),
    (['--config.batch_size=-16'], r'config\.batch_size=-16 must be positive'),
    (['--config.sample.guidance=-1'], r'config\.sample\.guidance=-1\.0 must be >= 0'),
    (['--config.noise.type=gauss'], r"config\.noise\.type='gauss' is not one of 'gaussian', 'uniform'"),
    (['--config.optim.lrr=0.1'], r"config\.optim has no field 'lrr' \(did you mean --config\.optim\.lr\?\)"),
    (['--config.data.data_dir=/data'], r'data_dir=.*"embedded_mnist".*reads no directory.*:smoke'),
    (['--config.mesh.data=3'], r'Mesh data=3 x fsdp=1 does not use the \d+ devices'),
    (['--config.model.channels=128'], r'another architecture \(channels: checkpoint 64, config 128\)'),
])
def test_train_rejects_bad_config_and_leaves_the_workdir(workdir, args, message):
  before = snapshot(workdir)
  assert_user_error(run('tarflow_jax.main', f'--config={DEMO}', f'--workdir={workdir}', *args), message)
  assert snapshot(workdir) == before


def test_train_with_a_mistyped_config_path_creates_no_workdir(tmp_path):
  result = run('tarflow_jax.main', f'--config={REPO}/configs/dmeo.py', f'--workdir={tmp_path}/run',
               '--config.batch_size=8')
  assert_user_error(result, r"No config file '.*configs/dmeo\.py'")
  assert not (tmp_path / 'run').exists()
  assert_user_error(run('tarflow_jax.main', f'--config={REPO}/configs/demo.py:smok', f'--workdir={tmp_path}/run'),
                    r"Unknown config argument 'smok'.*:cpu_digits")
  assert not (tmp_path / 'run').exists()


def test_smoke_keeps_the_experiments_data_and_its_data_dir(workdir, tmp_path):
  empty = tmp_path / 'no_datasets_here'
  empty.mkdir()
  before = snapshot(workdir)
  result = run('tarflow_jax.main', f'--config={REPO}/configs/mnist.py:smoke', f'--workdir={workdir}',
               f'--config.data.data_dir={empty}')
  assert_user_error(result, rf"'mnist' is not prepared in '{empty}'.*tfds build mnist")
  assert snapshot(workdir) == before


def test_fashion_mnist_without_its_debian_package_or_fid_files_says_what_to_install(tmp_path):
  empty = tmp_path / 'no_datasets_here'
  empty.mkdir()
  result = run('tarflow_jax.main', f'--config={REPO}/configs/fashion_mnist.py:smoke', f'--workdir={tmp_path}/run',
               f'--config.data.data_dir={empty}')
  assert_user_error(result, rf"'fashion_mnist' is not installed: no '{empty}/train-images-idx3-ubyte.gz'\. "
                            r"Install Debian's package dataset-fashion-mnist \(`apt-get update && apt-get install -y "
                            r"dataset-fashion-mnist`\)")
  result = run('tarflow_jax.main', f'--config={REPO}/configs/fashion_mnist.py', f'--workdir={tmp_path}/fid',
               f'--config.fid.inception={empty}/inception.npz')
  assert_user_error(result, rf"config\.fid\.inception='{empty}/inception\.npz': no such file\..*--config\.fid_every=0")
  assert not (tmp_path / 'fid').exists()  # checked before anything is made


def test_train_into_an_unwritable_workdir(tmp_path):
  (tmp_path / 'a_file').write_text('')
  result = run('tarflow_jax.main', f'--config={DEMO}', f'--workdir={tmp_path}/a_file/run')
  assert_user_error(result, r'Cannot write to --workdir=.*a_file/run')
  assert os.listdir(tmp_path) == ['a_file']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A converted-style checkpoint of a small class-conditional model (10 classes)."""
  config = config_lib.cpu_digits(config_lib.default())
  config.model.update(img_size=8, patch_size=4, num_classes=10, channels=32, head_dim=16)
  model = model_lib.from_config(config.model)
  directory = tmp_path_factory.mktemp('ckpt')
  checkpoint.save_model(str(directory), toy.random_variables(model), config)
  return directory


@pytest.mark.parametrize('args, message', [
    (['--num=0'], r'--num=0 must be positive'),
    (['--num=-3'], r'--num=-3 must be positive'),
    (['--batch_size=0'], r'--batch_size=0 must be positive'),
    (['--guidance=-1'], r'--guidance=-1\.0 must be >= 0'),
    (['--labels=12'], r'--labels must lie in \[0, 9\]'),
    (['--labels=cats'], r'--labels must be random, rows, none or comma-separated integers'),
    (['--latents=/nonexistent/latents.npz'], r'No such file or directory: /nonexistent/latents\.npz'),
    (['--decoder=warp'], r"--decoder='warp': unknown decoder 'warp'\. Spell a plan as seq\[:chunks=N\] or jacobi"),
    (['--decoder=jacobi:tol=-1'], r"--decoder='jacobi:tol=-1': tol=-1 must be >= 0\. Spell a plan as"),
    (['--decoder=seq,seq,seq,seq,seq'], r"--decoder='seq,seq,seq,seq,seq': 5 entries for a model of \d+ blocks"),
    (['--decoder=auto', '--quality_bound=-1'], r'--quality_bound=-1 must be >= 0'),
    (['--decoder=auto', '--calibration_samples=0'], r'--calibration_samples=0 must be positive'),
    (['--denoise_steps=0'], r'--denoise_steps=0 must be at least 1'),
    (['--dynamics=sde', '--clip'], r'--dynamics, --clip given, but --checkpoint holds a TarFlow model, sampled with '
                                   r'one denoising step \(--denoise, --sigma, --denoise_scale, --guide_what\); leave '
                                   r'them out\.'),
])
def test_sample_rejects_bad_arguments(saved, tmp_path, args, message):
  before = snapshot(saved)
  assert_user_error(run('tarflow_jax.cli.sample', f'--checkpoint={saved}', f'--output={tmp_path}/out', *args),
                    message)
  assert snapshot(saved) == before and not (tmp_path / 'out').exists()


def test_sample_names_a_missing_checkpoint(tmp_path):
  assert_user_error(run('tarflow_jax.cli.sample', f'--checkpoint={tmp_path}/nothing', f'--output={tmp_path}/out'),
                    r'No checkpoint in')


@pytest.mark.parametrize('args, message', [
    (['bpd', '--batch_size=0'], r'--batch_size=0 must be positive'),
    (['bpd', '--num_examples=0'], r'--num_examples=0 must be positive, or -1 for all'),
    (['classify', '--split=valid'], r'splits "train" and "test", not \'valid\''),
    (['bpd', '--data_dir=/data'], r'reads no directory'),
    (['perplexity'], r'give one command: .*bpd\|classify\|fid_stats\|fid.*--helpshort'),
    (['fid', '--stats=s.npz', '--inception=i.npz', '--decoder=jacobi:init=noise'],
     r"--decoder='jacobi:init=noise': init='noise' is none of latent, zeros, prev\."),
    (['fid', '--stats=s.npz', '--inception=i.npz', '--decoder=auto', '--quality_bound=-1'],
     r'--quality_bound=-1 must be >= 0'),
    (['fid', '--stats=s.npz', '--inception=i.npz', '--decoder=auto', '--calibration_samples=0'],
     r'--calibration_samples=0 must be positive'),
])
def test_evaluate_rejects_bad_arguments(saved, args, message):
  before = snapshot(saved)
  assert_user_error(run('tarflow_jax.cli.evaluate', *args, f'--checkpoint={saved}'), message)
  assert snapshot(saved) == before


@pytest.fixture(scope='module')
def small_config(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'small.py'
  path.write_text('import ml_collections\n'
                  'def get_config():\n'
                  '  return ml_collections.ConfigDict({"model": dict(in_channels=1, img_size=8, patch_size=4, '
                  'channels=32, num_blocks=2, layers_per_block=1, head_dim=16, num_classes=0)})\n')
  return path


def test_convert_names_a_file_that_is_not_a_checkpoint(small_config, tmp_path):
  (tmp_path / 'notes.npz').write_text('not a state dict')
  result = run('tarflow_jax.cli.convert', f'--config={small_config}', f'--checkpoint={tmp_path}/notes.npz',
               f'--output={tmp_path}/out')
  assert_user_error(result, rf"'{tmp_path}/notes.npz' is not an \.npz state dict")
  assert_user_error(run('tarflow_jax.cli.convert', f'--config={small_config}', f'--checkpoint={tmp_path}/none.pth',
                        f'--output={tmp_path}/out'), r"No checkpoint at '.*none\.pth'")
  assert not (tmp_path / 'out').exists()


@pytest.mark.extras
def test_convert_names_a_pth_file_that_is_not_a_checkpoint(small_config, tmp_path):
  pytest.importorskip('torch', reason='reading a .pth needs torch (pip install -e ".[torch]")')
  (tmp_path / 'notes.pth').write_text('not a state dict')
  result = run('tarflow_jax.cli.convert', f'--config={small_config}', f'--checkpoint={tmp_path}/notes.pth',
               f'--output={tmp_path}/out')
  assert_user_error(result, rf"'{tmp_path}/notes.pth' is not a PyTorch state dict")
  assert not (tmp_path / 'out').exists()


def test_convert_without_torch_says_how_to_read_a_pth(small_config, tmp_path):
  """Where torch is missing (here made so, whether or not it is installed), a .pth gets a line saying what to do."""
  no_torch = tmp_path / 'no_torch'
  (no_torch / 'torch').mkdir(parents=True)
  (no_torch / 'torch' / '__init__.py').write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  (tmp_path / 'model.pth').write_text('a .pth')
  result = run('tarflow_jax.cli.convert', f'--config={small_config}', f'--checkpoint={tmp_path}/model.pth',
               f'--output={tmp_path}/out', pythonpath=[no_torch])
  assert_user_error(result, rf"Reading '{tmp_path}/model.pth' needs PyTorch: pip install \"tarflow_jax\[torch\]\" "
                    r"\(or save the state dict as \.npz\)")
  assert not (tmp_path / 'out').exists()


def test_convert_refuses_another_architecture(small_config, tmp_path):
  model = model_lib.TarFlow(model_lib.Spec(in_channels=1, img_size=8, patch_size=4, channels=64, num_blocks=2,
                                           layers_per_block=1, head_dim=16))
  from tarflow_jax import reference  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / 'wide.npz', **reference.to_reference(model, toy.random_variables(model)))
  result = run('tarflow_jax.cli.convert', f'--config={small_config}', f'--checkpoint={tmp_path}/wide.npz',
               f'--output={tmp_path}/out')
  assert_user_error(result, r'the checkpoint has channels=64, the model has channels=32')
  assert not (tmp_path / 'out').exists()


def test_traceback_flag_and_variable_show_the_traceback_of_a_user_error(saved, tmp_path):
  args = ('tarflow_jax.cli.sample', f'--checkpoint={saved}', f'--output={tmp_path}', '--num=0')
  result = run(*args, '--traceback')
  assert result.returncode == 1 and 'Traceback' in result.stderr and 'UserError: --num=0' in result.stderr
  env = dict(os.environ, PYTHONPATH=REPO, TARFLOW_TRACEBACK='1')
  result = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, cwd=REPO, env=env)
  assert result.returncode == 1 and 'Traceback' in result.stderr


def test_only_user_errors_lose_their_traceback():
  from tarflow_jax.cli import _common  # pylint: disable=g-import-not-at-top
  assert _common.user_error_message(errors.UserError('bad --num')) == 'bad --num'
  assert _common.user_error_message(FileNotFoundError(2, 'No such file or directory', '/x.npz')) == \
      'No such file or directory: /x.npz'
  assert _common.user_error_message(ZeroDivisionError('division by zero')) is None
  assert _common.user_error_message(ValueError('bad value')) is None  # untyped: a bug, whoever raised it
  assert _common.user_error_message(RuntimeError('bad state')) is None
  from tarflow_jax import data, reference  # pylint: disable=g-import-not-at-top
  for typed in (errors.NotFound, errors.AlreadyExists, errors.NotWritable, errors.MissingExtra, errors.NonFinite,
                data.DatasetNotFoundError, checkpoint.DamagedCheckpointError, reference.ArchitectureMismatch):
    assert _common.user_error_message(typed('do this instead')) == 'do this instead', typed
  bad = config_lib.cpu_digits(config_lib.default())
  bad.log_every = 0
  with pytest.raises(errors.UserError) as raised:
    config_lib.validate(bad)
  assert _common.user_error_message(raised.value) == 'config.log_every=0 must be positive.'


def test_a_bug_in_library_code_keeps_its_traceback(tmp_path):
  """A ValueError raised inside the library on valid input (a sample grid handed images without their batch
  axis, as a bug upstream would) is no user error: the command line shows its traceback and exits 1."""
  script = ('import numpy as np\n'
            'from tarflow_jax import images\n'
            'from tarflow_jax.cli import _common\n'
            f'_common.run(lambda argv: images.save_png({str(tmp_path / "grid.png")!r}, '
            'images.grid(np.zeros((8, 8, 1), np.uint8))))\n')
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('TARFLOW_TRACEBACK', None)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' in result.stderr and 'error: ' not in result.stderr
  assert re.search(r'tarflow_jax/images\.py", line \d+, in grid\n(.*\n)*ValueError: not enough values to unpack',
                   result.stderr), result.stderr[-3000:]


def test_libraries_define_no_flags_and_read_no_argv():
  offenders = []
  for path in pathlib.Path(PACKAGE).rglob('*.py'):
    relative = path.relative_to(PACKAGE).as_posix()
    if relative.startswith('cli/') or relative == 'main.py':
      continue
    source = path.read_text()
    if re.search(r'flags\.DEFINE|config_flags\.DEFINE|sys\.argv|app\.run\(|FLAGS\b', source):
      offenders.append(relative)
  assert not offenders, f'flags or argv outside tarflow_jax/cli/: {offenders}'
  for path in pathlib.Path(PACKAGE, 'cli').glob('[!_]*.py'):
    assert re.search(r'_common\.run\(main[,)]', path.read_text()), path  # every command line goes through the boundary


@pytest.mark.parametrize('command', ['train', 'sample', 'evaluate', 'convert', 'bench', 'aot'])
def test_importing_a_command_line_changes_nothing_in_the_process(command):
  # JAX's platform and malloc's settings are chosen in `_common.run`, not on import; TensorFlow is
  # imported by the command's `main` only.
  script = ('import os, sys\n'
            'from tarflow_jax import host_memory\n'
            'host_memory.reuse_freed_memory = lambda: sys.exit("malloc changed on import")\n'
            f'from tarflow_jax.cli import {command}\n'
            'import jax\n'
            'print(os.environ.get("JAX_PLATFORMS"), jax.config.jax_platforms, "tensorflow" in sys.modules)\n')
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('JAX_PLATFORMS', None)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['None', 'None', 'False'], result.stdout


NOISE = ('oneDNN', 'cpu_feature_guard', 'InitializeLog', "Unable to initialize backend", 'host bounds',
         'TPU_ACCELERATOR_TYPE', 'InitGoogle', '_NonBlockingMetadataStore', 'Sharding callback duration')
GLOG_INFO = re.compile(r'^I\d{4} [\d:.]+ +\d+ ', re.M)  # a C++ INFO record (TensorFlow, XLA)


def test_native_start_up_notices_are_filtered_and_the_rest_kept(tmp_path):
  """A module that prints as TensorFlow does while it loads: its INFO records and absl's preamble go, the rest stays."""
  (tmp_path / 'noisy.py').write_text(
      'import os, sys\n'
      'sys.stderr.write("a Python warning\\n"); sys.stderr.flush()\n'
      'os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n"\n'
      '            b"I0000 00:00:1796574559.364036    7121 port.cc:153] oneDNN custom operations are on.\\n"\n'
      '            b"I0000 00:00:1796574559.511993    7121 cpu_feature_guard.cc:227] This binary is optimized.\\n"\n'
      '            b"To enable the following instructions: AVX2 FMA, rebuild.\\n"\n'
      '            b"W0000 00:00:1796574560.100000    7121 loader.cc:9] a warning that stays\\n"\n'
      '            b"E0000 00:00:1796574560.200000    7121 loader.cc:10] an error that stays\\n")\n')
  script = ('from tarflow_jax.cli import _quiet_import; _quiet_import.install(("noisy",)); '
            'import importlib.util; assert importlib.util.find_spec("noisy")  # a library probing for it first\n'
            'import noisy, sys; sys.stderr.write("after\\n")')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO])))
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == [
      'a Python warning',
      'W0000 00:00:1796574560.100000    7121 loader.cc:9] a warning that stays',
      'E0000 00:00:1796574560.200000    7121 loader.cc:10] an error that stays',
      'after'], result.stderr


def test_tensorflow_loads_quietly_under_the_command_lines_even_at_log_level_zero():
  """TF_CPP_MIN_LOG_LEVEL=0 shows TensorFlow's start-up INFO notes here as on CPUs where they come before its
  logging reads the variable; importing the command lines first keeps them off the screen."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='0')
  script = 'import tarflow_jax.cli, tensorflow, tensorflow_datasets; print("loaded")'
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
  assert result.returncode == 0 and result.stdout == 'loaded\n', result.stderr
  assert not GLOG_INFO.search(result.stderr) and not [n for n in NOISE if n in result.stderr], result.stderr


def test_training_run_is_quiet_ends_with_a_summary_and_exits_at_once(tmp_path):
  """A shortened demo: no start-up noise, a closing summary whose paths exist, and exit right after it."""
  import time  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('JAX_PLATFORMS', None)  # as a user's shell has it: the command line itself keeps a CPU machine quiet
  workdir = tmp_path / 'run'
  args = [sys.executable, '-u', '-m', 'tarflow_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
          '--config.num_train_steps=2', '--config.checkpoint_every=1', '--config.eval_every=2',
          '--config.sample_every=2', '--config.log_every=1']
  process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
  lines, last = [], time.monotonic()
  for line in process.stdout:
    lines.append(line.rstrip('\n'))
    last = time.monotonic()
  process.wait(timeout=300)
  waited = time.monotonic() - last
  output = '\n'.join(lines)
  assert process.returncode == 0, output[-3000:]
  assert waited < 5, f'the process lived {waited:.1f} s after its last line'
  assert not [n for n in NOISE if n in output], output[:3000]  # (its own INFO lines are absl's: glog's format too)
  done = next(i for i, l in enumerate(lines) if l.startswith('Done: step 2; held-out bits/dim '))
  summary = '\n'.join(lines[done:])
  paths = re.findall(r'^  (?:samples|checkpoints): +(\S+)$', summary, re.M)
  assert len(paths) == 2 and all(os.path.exists(p) for p in paths), summary
  assert paths[0].endswith('step_0000002.png')
  assert re.search(rf'tensorboard --logdir={re.escape(str(workdir))}$', summary, re.M), summary
  assert 'Rerunning the same command resumes' in summary and f'--workdir={workdir}' in summary
  assert f'python -m tarflow_jax.cli.sample --checkpoint={workdir}' in summary
  assert f'python -m tarflow_jax.cli.evaluate bpd --checkpoint={workdir}' in summary
