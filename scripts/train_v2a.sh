#!/usr/bin/env bash
# Train a video-to-audio generator: flow matching (sft), flow DPO, AVP-RPO rounds (avp_rpo), KTO, Plackett-Luce.
#
#   bash scripts/train_v2a.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   bash scripts/train_v2a.sh configs/v2a/tiny_flow.yaml cpu                   # laptop CPU, seconds
#   bash scripts/train_v2a.sh configs/v2a/mmaudio_small_avp_rpo.yaml 8 model.name_or_path=runs/v2a_sft/final
#
# NUM_GPUS > 1 launches one process per GPU with `accelerate launch` (DDP; pass --config_file through
# ACCELERATE_CONFIG for DeepSpeed/FSDP); 1 or cpu runs a single process. Overrides follow the config's schema
# (`mmalign train --help-config`); later ones win.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0"
  exit 2
fi
CONFIG="$1"; shift
DEVICES=1
if [[ $# -ge 1 && ( "$1" == "cpu" || "$1" =~ ^[0-9]+$ ) ]]; then DEVICES="$1"; shift; fi
if [[ ! -f "$CONFIG" ]]; then
  echo "config not found: $CONFIG" >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"

if [[ "$DEVICES" == "cpu" ]]; then
  # A few threads are faster than many for tiny models on shared machines.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  exec env CUDA_VISIBLE_DEVICES="" "$PYTHON" -m mmalign train "$CONFIG" "$@"
elif [[ "$DEVICES" -lt 1 ]]; then
  echo "NUM_GPUS must be >= 1 or 'cpu', got '$DEVICES'" >&2
  exit 2
elif [[ "$DEVICES" -eq 1 ]]; then
  exec "$PYTHON" -m mmalign train "$CONFIG" "$@"
else
  exec "$PYTHON" -m accelerate.commands.launch ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} \
    --num_processes "$DEVICES" --multi_gpu -m mmalign train "$CONFIG" "$@"
fi
