#!/usr/bin/env bash
# Training-step variants behind the GPU MFU figure, one process each (GPT-2 124M, seq 1024, bf16, torch.compile,
# vocabulary padded to 50304, no KV cache in training), most telling first; the first prints a kernel-time profile.
# They compare: a compiled function returning only the loss against the compiled module (which also returns the
# logits, and autograd feeds its backward a zero-filled (B, T, vocab) gradient for them: bf16 fills, ~2 ms of a
# batch-64 step); Inductor's one-pass ("online") softmax reduction switched off for the cross-entropy; bf16 weights at
# batch 64 and 128, autocast (fp32 master weights) at batch 32, PyTorch's FlashAttention-2 kernel in place of cuDNN's
# (cuDNN's attention takes 15.4 ms of a 118 ms step); and last the side-by-side run with GPT2LMHeadModel.
# Earlier variants: bench/results/gpu-h200-2026-11-2*.log (all-ones mask, use_cache=True, a logsumexp loss).
#
#   bash bench/gpu_variants.sh                      # on the GPU machine, ~7.5 minutes (35-120 s a variant)
#   bash bench/gpu_variants.sh --device cpu --tiny  # checks the script on CPU with tiny shapes
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
status=0
mfu_settings=(--no-peer --pad-vocab-to 64 --use-cache off --steps 15)
best=(--compile-target loss --inductor online_softmax=0)

variant() {  # variant DESCRIPTION ARGS...: one training measurement with a time limit; a failure does not stop the rest
  local description=$1
  shift
  echo "=== $description"
  timeout 150 "$PYTHON" bench/gpu_bench.py train "$@" || { echo "--- FAILED: $*"; status=1; }
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

variant "bf16 weights, batch 64, compiled loss only, no online softmax (49.4% on 2026-11-27)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 "${best[@]}" --profile --top 20 "$@"
variant "bf16 weights, batch 64, compiled loss only (49.0%)" "${mfu_settings[@]}" --bf16-weights --batch 64 --compile-target loss "$@"
variant "bf16 weights, batch 64, compiled module (47.9%)" "${mfu_settings[@]}" --bf16-weights --batch 64 "$@"
variant "same as the first, FlashAttention-2 instead of cuDNN's attention (not measured yet)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 "${best[@]}" --sdpa-backend flash "$@"
variant "bf16 weights, batch 128, compiled loss only, no online softmax" "${mfu_settings[@]}" --bf16-weights --batch 128 "${best[@]}" "$@"
variant "autocast, batch 32, compiled loss only, no online softmax (45.3%)" "${mfu_settings[@]}" --batch 32 "${best[@]}" "$@"
variant "autocast, batch 32, compiled module (44.1%)" "${mfu_settings[@]}" --batch 32 "$@"
variant "side by side with GPT2LMHeadModel, batch 16, use_cache=False for both (as Trainer runs)" --use-cache off --steps 15 "$@"
exit $status
