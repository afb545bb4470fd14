#!/usr/bin/env bash
# Cloud TPU VMs: create a slice, install tarflow_jax on every worker and check it, train, follow logs, stop, delete.
#
#   launch/tpu_vm.sh [--dry-run] create|install|check|train|logs|stop|delete|all
#
# Settings come from the variables below or the environment, e.g.
#   TPU_NAME=tarflow-v4-32 ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh --dry-run all
# Single host: v5litepod-8 or v4-8. Pod slice: v4-32 or v5litepod-64 (the same commands; every
# worker runs the same program, and python -m tarflow_jax.main starts jax.distributed, which finds
# the other workers through the VM's metadata server).
#
# The TPU runtimes are Ubuntu 22.04, whose Python 3.10 is older than this package needs (3.11), so
# `install` puts uv (from PyPI) on each worker, lets it fetch a standalone CPython 3.11 into a
# virtualenv, and installs there; `check` then runs JAX on every worker and compares the device count.
set -euo pipefail

PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-tarflow-v4-8}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
GENERATION="${ACCELERATOR_TYPE%%-*}"  # v4, v5litepod, v5p, v6e
# The runtime Google lists for JAX on each TPU generation.
case "$GENERATION" in
  v5litepod) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
# JAX devices of the slice: v4 and v5p names count TensorCores (two per chip, one device), others chips.
case "$GENERATION" in
  v4|v5p) DEVICES=$(( ${ACCELERATOR_TYPE##*-} / 2 )) ;;
  *) DEVICES=${ACCELERATOR_TYPE##*-} ;;
esac
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
QUEUED="${QUEUED:-0}"  # 1: ask through a queued resource (spot/reserved capacity)
REPO_URL="${REPO_URL:-https://github.com/your-org/tarflow_jax.git}"
CONFIG="${CONFIG:-configs/imagenet64.py}"
WORKDIR="${WORKDIR:-gs://my-bucket/tarflow/imagenet64}"
DATA_DIR="${DATA_DIR:-gs://my-bucket/tensorflow_datasets}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"  # e.g. "--config.mesh.fsdp=4"

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
ACTION="${1:-}"

run() {
  # Prints the command; runs it unless --dry-run.
  echo "+ $*"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

require() {
  if [[ "$DRY_RUN" == 0 ]] && ! command -v "$1" >/dev/null 2>&1; then
    echo "error: '$1' is not installed; install the Google Cloud CLI (gcloud) first." >&2
    exit 1
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all --command="$1"
}

create() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
  fi
}

install() {
  on_all_workers "set -e; (git clone $REPO_URL tarflow_jax || git -C tarflow_jax pull); cd tarflow_jax; \
python3 -m pip install --user -q uv; [ -x .venv/bin/python ] || ~/.local/bin/uv venv -q --python $PYTHON_VERSION .venv; \
~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]'"
}

check() {
  # Every worker at once, as in training: each must start jax.distributed and see the whole slice.
  on_all_workers "cd tarflow_jax && .venv/bin/python -c \"from tarflow_jax import distributed; distributed.initialize_distributed(); \
import jax, sys; n = jax.device_count(); print(f'worker {jax.process_index()}/{jax.process_count()}: Python \
{sys.version.split()[0]}, {n} {jax.default_backend()} devices'); assert jax.default_backend() == 'tpu' and n == $DEVICES, \
'expected $DEVICES TPU devices'\""
}

train() {
  on_all_workers "cd tarflow_jax && TFDS_DATA_DIR=$DATA_DIR nohup .venv/bin/python -m tarflow_jax.main --config=$CONFIG \
--workdir=$WORKDIR --config.data.data_dir=$DATA_DIR $EXTRA_FLAGS > train.log 2>&1 &"
}

logs() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=0 \
    --command="tail -f tarflow_jax/train.log"
}

stop() {
  # SIGTERM: the workers agree on a step, write one checkpoint there and exit; `train` again resumes.
  # [t]: the pattern must not match the command line of the shell that runs pkill.
  on_all_workers "pkill -TERM -f '[t]arflow_jax[.]main' || true"
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
  fi
}

require gcloud
case "$ACTION" in
  create) create ;;
  install) install ;;
  check) check ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  all) create; install; check; train ;;
  *) echo "usage: $0 [--dry-run] create|install|check|train|logs|stop|delete|all" >&2; exit 2 ;;
esac
