#!/usr/bin/env bash
# Large models on GPUs, one command: the memory bench (jobs/bench-memory.yaml: GPT-2-style LMs of 100 M-750 M
# parameters under ZeRO 0-3 and offload) and a ZeRO-3 fine-tune of GPT-2 large (jobs/gpu-zero3-finetune.yaml: bf16,
# activation checkpointing), each worker on one GPU: NCCL, DeepSpeed's CUDA accelerator.
#
#   benchmarks/gpu_large_model.sh [--dry-run] [--set FIELD=VALUE ...]
#
# --dry-run validates both specs exactly as they would run and prints the commands, running nothing (it needs no
# GPU). Further --set overrides go to the fine-tune, e.g. --set model.params.pretrained=/models/gpt2-large for a
# local copy of the model where the Hugging Face hub is out of reach. Results land under $OUT (default
# benchmarks/runs); the script prints each run's folder at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

STEWARD=${STEWARD:-.venv/bin/steward}
OUT=${OUT:-benchmarks/runs}
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi

export DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
BENCH=(jobs/bench-memory.yaml --set distributed.use_gpu=true --set "output_dir=$OUT")
FINETUNE=(jobs/gpu-zero3-finetune.yaml --set "output_dir=$OUT" "$@")

# Both specs are checked before anything starts: a bad override fails in a second, not after the bench.
"$STEWARD" validate "${BENCH[@]}"
"$STEWARD" validate "${FINETUNE[@]}"
if ((DRY_RUN)); then
    echo "would run: $STEWARD bench ${BENCH[*]}"
    echo "would run: $STEWARD train ${FINETUNE[*]}"
    exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu_large_model.sh: no GPU found (nvidia-smi); use --dry-run to check the specs on this machine" >&2
    exit 2
fi

"$STEWARD" bench "${BENCH[@]}"
"$STEWARD" train "${FINETUNE[@]}"

newest() { ls -d "$OUT/$1"/*/ | tail -1; }
echo
echo "memory bench: $(newest bench-memory)bench.md (and bench.json beside it)"
echo "ZeRO-3 fine-tune: $(newest gpu-zero3-finetune) (history.jsonl, metrics.json, model/)"
echo "Report both with the GPU model (nvidia-smi -L) beside every figure."
