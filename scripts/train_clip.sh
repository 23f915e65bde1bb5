#!/usr/bin/env bash
# Launch an mmalign CLIP run (CLIP-Refine, ZSCL, CLIP or SigLIP fine-tuning): picks the accelerate config for the
# hardware, prints the command, runs it.
#
#   scripts/train_clip.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   CONFIG     a run config, e.g. configs/clip/vitb32_coco_clip_refine.yaml
#   NUM_GPUS   GPUs on this machine (default 1). 1 GPU with DDP runs `python -m mmalign train` directly;
#              more run `accelerate launch --num_processes N` (features are all-gathered across the processes,
#              so the contrastive batch is NUM_GPUS × run.batch_size).
#   cpu        2 CPU processes (DDP over gloo), configs/accelerate/cpu_2proc.yaml; for laptops and tests.
#   key=value  overrides of the run config (clip.pretrained=/path/ViT-B-32.pt data.train=[captions.json] ...).
#
# Environment:
#   MMALIGN_DIST        ddp (default) | fsdp | zero2 | zero3  -> configs/accelerate/{ddp,fsdp,deepspeed_zero2,
#                       deepspeed_zero3}.yaml
#   ACCELERATE_CONFIG   any accelerate config file (overrides MMALIGN_DIST)
#   ACCELERATE_ARGS     extra `accelerate launch` flags
#   PYTHON              interpreter (default: .venv/bin/python of this checkout if present, else python3)
#   DRY_RUN=1           print the command and exit
#
# Examples:
#   scripts/train_clip.sh configs/clip/tiny_clip_refine.yaml cpu
#   scripts/train_clip.sh configs/clip/vitb32_coco_clip_refine.yaml 1 clip.pretrained=/models/ViT-B-32-openai.pt
#   scripts/train_clip.sh configs/clip/vitl14_coco_zscl.yaml 4 clip.ref_images=[/data/imagenet/train_subset]
set -euo pipefail
# Same launcher as text runs (accelerate config choice, CPU gloo, dry run); only this header differs.
MMALIGN_USAGE_FILE="$0" exec bash "$(dirname "${BASH_SOURCE[0]}")/train_text.sh" "$@"
