#!/usr/bin/env bash
# Training-step variants behind the GPU MFU figure, one process each (GPT-2 124M, seq 1024, bf16, torch.compile,
# vocabulary padded to 50304, no KV cache in training), most telling first. The first is the best measured so far
# (bf16 weights, batch 64, a compiled function returning only the loss, Inductor's two-pass softmax: 49.4% on an
# H200, 2026-11-27); the next ones ask what is still open: the LM head and cross-entropy as one function that keeps
# exp(logits - max) for the backward (bench/gpu_bench.py's HeadLossFromExps: one pass fewer over the (tokens x vocab)
# logits; printed with a kernel profile), the same with Inductor's one-pass softmax, PyTorch's FlashAttention-2
# kernel in place of cuDNN's (cuDNN's attention takes 15.4 ms of a 118 ms step), autocast (fp32 master weights, 45.3%
# before) with the new loss; and last the side-by-side run with GPT2LMHeadModel. Variants measured before (compiled
# module vs loss only, batch 128, an all-ones mask, use_cache=True, a logsumexp loss): bench/results/gpu-h200-*.log.
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

variant "bf16 weights, batch 64, compiled loss only, two-pass softmax (49.4% on 2026-11-27)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 "${best[@]}" "$@"
variant "same, LM head + cross-entropy as HeadLossFromExps (not measured yet)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 "${best[@]}" --loss head-exps --profile --top 20 "$@"
variant "same, HeadLossFromExps with Inductor's one-pass softmax (its default)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 --compile-target loss --loss head-exps "$@"
variant "the first, FlashAttention-2 instead of cuDNN's attention (not measured yet)" \
  "${mfu_settings[@]}" --bf16-weights --batch 64 "${best[@]}" --sdpa-backend flash "$@"
variant "autocast, batch 32, compiled loss only, two-pass softmax, HeadLossFromExps (45.3% without it)" \
  "${mfu_settings[@]}" --batch 32 "${best[@]}" --loss head-exps "$@"
variant "side by side with GPT2LMHeadModel, batch 16, use_cache=False for both (as Trainer runs)" --use-cache off --steps 15 "$@"
exit $status
