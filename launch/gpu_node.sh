#!/usr/bin/env bash
# One machine with several GPUs: one process sees every local GPU; the mesh spans them all.
#
#   launch/gpu_node.sh [--dry-run]
#
# Settings from the variables below or the environment, e.g.
#   CONFIG=configs/imagenet64_cond.py EXTRA_FLAGS="--config.mesh.fsdp=8" launch/gpu_node.sh
set -euo pipefail

CONFIG="${CONFIG:-configs/imagenet64.py}"
WORKDIR="${WORKDIR:-runs/imagenet64}"
DATA_DIR="${DATA_DIR:-$HOME/tensorflow_datasets}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi

if [[ "$DRY_RUN" == 0 ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || { echo "error: nvidia-smi not found: no NVIDIA driver here." >&2; exit 1; }
  python -c "import tarflow_jax" 2>/dev/null || { echo "error: tarflow_jax is not installed: pip install -e '.[cuda]'" >&2; exit 1; }
fi

# Let XLA preallocate most of the GPU memory.
cmd=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TFDS_DATA_DIR="$DATA_DIR"
     python -m tarflow_jax.main --config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR")
# shellcheck disable=SC2206
cmd+=($EXTRA_FLAGS)
echo "+ ${cmd[*]}"
if [[ "$DRY_RUN" == 0 ]]; then exec "${cmd[@]}"; fi
