#!/usr/bin/env bash
# Train an LVLM with PRIOR token weighting (modality: prior, arXiv 2505.08971) through mmalign's one loop.
#
#   scripts/train_prior.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   CONFIG     a configs/prior/*.yaml file (its opening comment says what it trains)
#   NUM_GPUS   1 (default): one process; N > 1: `accelerate launch --multi_gpu`, one process per GPU (DDP;
#              DeepSpeed/FSDP: ACCELERATE_CONFIG=configs/accelerate/<file>.yaml is passed as --config_file)
#   cpu        2 CPU processes (DDP over gloo), e.g. to check a tiny config end to end on a laptop
#   key=value  overrides of the config (mmalign train --help-config lists every key)
#
# Examples:
#   scripts/train_prior.sh configs/prior/tiny_prior_patch.yaml
#   scripts/train_prior.sh configs/prior/tiny_prior_llava.yaml cpu prior.enabled=false
#   scripts/train_prior.sh configs/prior/llava15_7b_lora_prior.yaml 8 model.name_or_path=/ckpt/llava-1.5-7b-hf
#
# Step 1 of the recipe (the text-only reference LM, trained on the captions) runs inside the same launch, on the
# same processes; to train it separately, run `mmalign train` with modality=text loss.name=sft on the captions and
# pass prior.reference_path=<its final/ dir>. PYTHON overrides the interpreter (default: .venv/bin/python if
# present, else python3).
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
CONFIG=$1; shift
[[ -f "$CONFIG" ]] || { echo "error: config file '$CONFIG' not found" >&2; usage; }
grep -Eq '^modality:[[:space:]]*prior' "$CONFIG" || echo "warning: $CONFIG does not say 'modality: prior'" >&2

PROCS=1; DEVICE=gpu
if [[ $# -ge 1 && "$1" != *=* ]]; then
  case "$1" in
    cpu) PROCS=2; DEVICE=cpu ;;
    ''|*[!0-9]*) echo "error: second argument must be a GPU count or 'cpu', got '$1'" >&2; usage ;;
    *) PROCS=$1 ;;
  esac
  shift
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if [[ "$DEVICE" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$PROCS" -m mmalign train "$CONFIG" "$@"
fi
if [[ "$PROCS" -lt 1 ]]; then
  echo "error: NUM_GPUS must be >= 1 or 'cpu', got '$PROCS'" >&2; exit 2
fi
if [[ "$PROCS" -eq 1 && -z "${ACCELERATE_CONFIG:-}" ]]; then
  exec "$PYTHON" -m mmalign train "$CONFIG" "$@"
fi
exec "$PYTHON" -m accelerate.commands.launch ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} \
  --num_processes "$PROCS" $([[ "$PROCS" -gt 1 ]] && echo --multi_gpu) -m mmalign train "$CONFIG" "$@"
