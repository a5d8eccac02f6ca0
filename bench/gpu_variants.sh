#!/usr/bin/env bash
# Training-step variants behind the GPU MFU figure, one process each (GPT-2 124M, seq 1024, bf16, torch.compile,
# vocabulary padded to 50304), most telling first, each with a kernel-time profile:
#   an all-ones attention mask (transformers' masking turns it into a full mask tensor under torch.compile before
#   torch 2.14), MiniGPT's defaults (SDPA is_causal, no KV cache in training), use_cache=True (the cache transformers'
#   models build in training), bf16 weights at batch 32 and 64, a compiled function returning only the loss (a
#   compiled module also returns the logits, and autograd feeds its backward a zero (B, T, vocab) gradient for them
#   when nothing uses them), and last the side-by-side comparison with
#   GPT2LMHeadModel, as each model ships and with use_cache=False for both (as Trainer runs).
#
#   bash bench/gpu_variants.sh                      # on the GPU machine, ~8 minutes
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

variant "all-ones attention mask (a mask tensor under compile)" "${mfu_settings[@]}" --mask-ones "$@"
variant "MiniGPT's defaults (no mask tensor, no KV cache)" "${mfu_settings[@]}" "$@"
variant "use_cache=True (a KV cache built in training)" "${mfu_settings[@]}" --use-cache on "$@"
variant "bf16 weights" "${mfu_settings[@]}" --bf16-weights "$@"
variant "bf16 weights, batch 64" "${mfu_settings[@]}" --bf16-weights --batch 64 "$@"
variant "compiled loss only (no zero gradient for the unused logits)" "${mfu_settings[@]}" --compile-target loss "$@"
variant "bf16 weights, batch 64, compiled loss only" "${mfu_settings[@]}" --bf16-weights --batch 64 --compile-target loss "$@"
variant "side by side with GPT2LMHeadModel, batch 16 (gpu.sh's first step)" "$@"
variant "side by side, use_cache=False for both (as Trainer runs)" --use-cache off "$@"
exit $status
