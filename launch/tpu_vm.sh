#!/usr/bin/env bash
# Cloud TPU VMs: create a slice, install tarflow_jax on every worker, train, follow logs, stop, delete.
#
#   launch/tpu_vm.sh [--dry-run] create|install|train|logs|stop|delete|all
#
# Settings come from the variables below or the environment, e.g.
#   TPU_NAME=tarflow-v4-32 ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh --dry-run all
# Single host: v5litepod-8 or v4-8. Pod slice: v4-32 or v5litepod-64 (the same commands; every
# worker runs the same program and jax.distributed.initialize() finds the others by itself).
set -euo pipefail

PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-tarflow-v4-8}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
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
  on_all_workers "git clone $REPO_URL tarflow_jax || git -C tarflow_jax pull; cd tarflow_jax && pip install -e '.[tpu]'"
}

train() {
  on_all_workers "cd tarflow_jax && TFDS_DATA_DIR=$DATA_DIR nohup python -m tarflow_jax.main --config=$CONFIG \
--workdir=$WORKDIR --config.data.data_dir=$DATA_DIR $EXTRA_FLAGS > train.log 2>&1 &"
}

logs() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=0 \
    --command="tail -f tarflow_jax/train.log"
}

stop() {
  # SIGTERM: every worker writes a checkpoint and exits; `train` again resumes.
  on_all_workers "pkill -TERM -f tarflow_jax.main || true"
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
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  all) create; install; train ;;
  *) echo "usage: $0 [--dry-run] create|install|train|logs|stop|delete|all" >&2; exit 2 ;;
esac
