#!/usr/bin/env bash
# Launch an mmalign text run: picks the accelerate config for the hardware, prints the command, runs it.
#
#   scripts/train_text.sh CONFIG [NUM_GPUS|cpu] [key=value ...]
#
#   CONFIG     a run config, e.g. configs/text/qwen2.5-1.5b_dpo_lora.yaml
#   NUM_GPUS   GPUs on this machine (default 1). 1 GPU with DDP runs `python -m mmalign train` directly;
#              more run `accelerate launch --num_processes N` with the config chosen by MMALIGN_DIST.
#   cpu        2 CPU processes (DDP over gloo), configs/accelerate/cpu_2proc.yaml; for laptops and tests.
#   key=value  overrides of the run config (model.name_or_path=/path/to/ckpt data.train=[a.jsonl] ...).
#
# Environment:
#   MMALIGN_DIST        ddp (default) | fsdp | zero2 | zero3  -> configs/accelerate/{ddp,fsdp,deepspeed_zero2,
#                       deepspeed_zero3}.yaml
#   ACCELERATE_CONFIG   any accelerate config file (overrides MMALIGN_DIST)
#   ACCELERATE_ARGS     extra `accelerate launch` flags, e.g. "--fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer"
#   PYTHON              interpreter (default: .venv/bin/python of this checkout if present, else python3)
#   DRY_RUN=1           print the command and exit
#
# Examples:
#   scripts/train_text.sh configs/text/tiny_dpo.yaml cpu
#   scripts/train_text.sh configs/text/qwen2.5-0.5b_dpo.yaml 8 model.name_or_path=/models/Qwen2.5-0.5B-Instruct
#   MMALIGN_DIST=zero3 scripts/train_text.sh configs/text/llama3-8b_dpo_lora.yaml 8 lora.enabled=false
set -euo pipefail

usage() {
    # the comment block at the top of this file, without its leading '# '
    # (other modalities' launchers exec this one and name their own file in MMALIGN_USAGE_FILE)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${MMALIGN_USAGE_FILE:-$0}"
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="$1"
shift
if [[ ! -f "$config" ]]; then
    echo "error: config file '$config' does not exist (working directory: $PWD); see configs/text/" >&2
    exit 2
fi

target="1"
if [[ $# -gt 0 && "$1" != *=* ]]; then
    target="$1"
    shift
fi
for arg in "$@"; do
    if [[ "$arg" != *=* ]]; then
        echo "error: '$arg' is not a key=value override (e.g. run.max_steps=10); usage: $0 CONFIG [NUM_GPUS|cpu] [key=value ...]" >&2
        exit 2
    fi
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON="python3"; fi
fi

dist="${MMALIGN_DIST:-ddp}"
case "$dist" in
    ddp) dist_config="$repo/configs/accelerate/ddp.yaml" ;;
    fsdp) dist_config="$repo/configs/accelerate/fsdp.yaml" ;;
    zero2) dist_config="$repo/configs/accelerate/deepspeed_zero2.yaml" ;;
    zero3) dist_config="$repo/configs/accelerate/deepspeed_zero3.yaml" ;;
    *)
        echo "error: MMALIGN_DIST='$dist' is not one of: ddp fsdp zero2 zero3" >&2
        exit 2
        ;;
esac
extra=()
if [[ -n "${ACCELERATE_ARGS:-}" ]]; then
    read -r -a extra <<< "$ACCELERATE_ARGS"
fi

env_prefix=()
if [[ "$target" == "cpu" ]]; then
    # accelerate picks gloo/CPU for torchrun-launched workers only with ACCELERATE_USE_CPU=1 (see cpu_2proc.yaml);
    # one thread per process: two processes on a small machine otherwise oversubscribe its cores.
    env_prefix=(env ACCELERATE_USE_CPU=1 "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
    cmd=("$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$repo/configs/accelerate/cpu_2proc.yaml}"
         "${extra[@]}" -m mmalign train "$config" "$@")
elif [[ "$target" =~ ^[0-9]+$ && "$target" -ge 1 ]]; then
    if [[ "$target" == "1" && "$dist" == "ddp" && -z "${ACCELERATE_CONFIG:-}" ]]; then
        cmd=("$PYTHON" -m mmalign train "$config" "$@")
    else
        cmd=("$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$dist_config}"
             --num_processes "$target" "${extra[@]}" -m mmalign train "$config" "$@")
    fi
else
    echo "error: second argument '$target' must be a number of GPUs (1, 2, 8, ...) or 'cpu'" >&2
    exit 2
fi

full=("${env_prefix[@]}" "${cmd[@]}")
printf '+'
printf ' %q' "${full[@]}"
printf '\n'
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
exec "${full[@]}"
