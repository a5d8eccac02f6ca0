#!/usr/bin/env bash
# Training-step variants behind the GPU MFU figure, one process each (GPT-2 124M, seq 1024, bf16, torch.compile),
# most telling first, each with a kernel-time profile:
#   the all-ones attention mask (the mask tensor transformers' masking builds under torch.compile before torch 2.14),
#   no mask (MiniGPT's plain causal route: SDPA's is_causal), cuDNN's attention kernel, bf16 weights, and last the
#   side-by-side comparison with GPT2LMHeadModel that gpu.sh also runs.
#
#   bash bench/gpu_variants.sh                      # on the GPU machine
#   bash bench/gpu_variants.sh --device cpu --tiny  # checks the script on CPU with tiny shapes
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
status=0
mfu_settings=(--no-peer --pad-vocab-to 64 --batch 32 --profile)

variant() {  # variant DESCRIPTION ARGS...: one training measurement with a time limit; a failure does not stop the rest
  local description=$1
  shift
  echo "=== $description"
  timeout 150 "$PYTHON" bench/gpu_bench.py train "$@" || { echo "--- FAILED: $*"; status=1; }
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

variant "all-ones attention mask (mask tensor under compile)" "${mfu_settings[@]}" --mask-ones "$@"
variant "no attention mask (SDPA is_causal)" "${mfu_settings[@]}" "$@"
variant "no mask, cuDNN attention" "${mfu_settings[@]}" --sdpa-backend cudnn "$@"
variant "no mask, bf16 weights" "${mfu_settings[@]}" --bf16-weights "$@"
variant "no mask, bf16 weights, cuDNN attention" "${mfu_settings[@]}" --bf16-weights --sdpa-backend cudnn "$@"
variant "side by side with GPT2LMHeadModel (gpu.sh's first step)" "$@"
exit $status
