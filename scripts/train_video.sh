#!/usr/bin/env bash
# Launch an mmalign video-LLM run (modality: vlm; TEMPLE, arXiv 2503.16929): DeepSpeed ZeRO-2 by default, as the
# released TEMPLE scripts train Qwen2.5-VL-7B (configs/accelerate/deepspeed_zero2.yaml).
#
#   scripts/train_video.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   CONFIG     a configs/vlm/*.yaml file (its opening comment says what it trains)
#   NUM_GPUS   GPUs on this machine (default 1: one process, no launcher); N > 1: `accelerate launch
#              --num_processes N` with the config chosen by MMALIGN_DIST (default here: zero2)
#   cpu        2 CPU processes (DDP over gloo), to check a tiny config end to end
#   key=value  overrides of the config (mmalign train --help-config lists every key)
#
# Environment: MMALIGN_DIST (zero2 default | ddp | fsdp | zero3), ACCELERATE_CONFIG, ACCELERATE_ARGS, PYTHON,
# DRY_RUN=1 (print the command and exit), as in scripts/train_text.sh, which this script runs.
#
# Examples:
#   scripts/train_video.sh configs/vlm/tiny_temple.yaml cpu
#   scripts/train_video.sh configs/vlm/qwen2.5-vl-7b_temple_lora.yaml 8 model.name_or_path=/ckpt/Qwen2.5-VL-7B-Instruct
#   DRY_RUN=1 scripts/train_video.sh configs/vlm/qwen2.5-vl-7b_temple_lora.yaml 8
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -ge 1 && "$1" != -* && -f "$1" ]] && ! grep -Eq '^modality:[[:space:]]*vlm' "$1"; then
    echo "warning: $1 does not say 'modality: vlm'" >&2
fi
export MMALIGN_DIST="${MMALIGN_DIST:-zero2}" MMALIGN_USAGE_FILE="${BASH_SOURCE[0]}"
exec "$here/train_text.sh" "$@"
