#!/usr/bin/env bash
# Train a video-to-audio generator: flow matching (sft), flow DPO, AVP-RPO rounds (avp_rpo), KTO, Plackett-Luce.
#
#   bash scripts/train_v2a.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   bash scripts/train_v2a.sh configs/v2a/tiny_flow.yaml cpu                   # laptop CPU, seconds
#   bash scripts/train_v2a.sh configs/v2a/mmaudio_small_avp_rpo.yaml 8 model.name_or_path=runs/v2a_sft/final
#
# The launch is the diffusion launcher's (scripts/train_diffusion.sh, which this runs): NUM_GPUS > 1 launches one
# process per GPU with `accelerate launch` (DDP; ACCELERATE_CONFIG for DeepSpeed/FSDP); 1 or cpu runs one process.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 ]]; then
  sed -n '2,9p' "$0"
  exit 2
fi
if [[ -f "$1" ]] && ! grep -Eq '^modality:[[:space:]]*v2a' "$1"; then
  echo "warning: $1 does not say 'modality: v2a'" >&2
fi
exec "$here/train_diffusion.sh" "$@"
