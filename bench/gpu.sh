#!/usr/bin/env bash
# One self-contained GPU benchmark run, under 8 minutes on an H100:
#   1. training: GPT-2 124M preset, bf16 autocast, seq 1024, torch.compile, flash/SDPA attention; tokens/s and MFU
#      against the H100's dense bf16 peak (989 TFLOP/s), next to transformers' GPT2LMHeadModel with the same weights;
#      then MiniGPT alone at nanoGPT's settings (vocabulary padded to a multiple of 64, batch 32), and at the settings
#      of the highest MFU measured (bf16 weights, batch 64, a compiled function returning only the loss, Inductor's
#      two-pass softmax for the cross-entropy: 49.4% on an H200, 2026-11-27);
#   2. generation: greedy generate() tokens/s, MiniGPT vs transformers' Qwen2ForCausalLM at the same config
#      (qwen2.5-0.5b shape), eager and with a static cache + torch.compile;
#   3. serving: the native export (`python -m minigpt convert --to-native`) under vLLM, when vLLM imports.
#
#   bash bench/gpu.sh                      # on the GPU machine (torch with CUDA, transformers; vLLM optional)
#   bash bench/gpu.sh --device cpu --tiny  # checks the whole script on CPU with tiny shapes
# Extra arguments go to every step (see `python bench/gpu_bench.py --help`), e.g. --peak-tflops 756 for H100 PCIe.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minigpt importable without pip install -e .
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0

step() {  # step SECONDS DESCRIPTION COMMAND...: run with a time limit; a failed step is reported, the others still run
  local limit=$1 description=$2
  shift 2
  echo "=== $description (limit ${limit}s)"
  local started=$SECONDS
  if timeout "$limit" "$@"; then
    echo "--- done in $((SECONDS - started))s"
  else
    echo "--- FAILED or timed out after $((SECONDS - started))s: $*"
    status=1
  fi
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

step 200 "training step: MiniGPT vs GPT2LMHeadModel" "$PYTHON" bench/gpu_bench.py train "$@"
step 120 "training step at MFU settings (vocab padded to 50304, batch 32), MiniGPT only" \
  "$PYTHON" bench/gpu_bench.py train --no-peer --pad-vocab-to 64 --batch 32 "$@"
step 120 "training step at the best settings measured (bf16 weights, batch 64, loss-only compile), MiniGPT only" \
  "$PYTHON" bench/gpu_bench.py train --no-peer --pad-vocab-to 64 --batch 64 --bf16-weights --use-cache off \
  --compile-target loss --inductor online_softmax=0 "$@"
step 150 "generation: MiniGPT vs Qwen2ForCausalLM" "$PYTHON" bench/gpu_bench.py generate "$@"

if "$PYTHON" -c 'import vllm' 2>/dev/null; then
  step 60 "save a Qwen-style MiniGPT" "$PYTHON" bench/gpu_bench.py save-model "$WORK/minigpt" "$@"
  step 60 "convert it to the native class" "$PYTHON" -m minigpt convert --to-native "$WORK/minigpt" "$WORK/native"
  step 150 "vLLM serving of the native export" "$PYTHON" bench/gpu_bench.py vllm "$WORK/native" "$@"
else
  echo "=== vLLM does not import here: serving step skipped"
fi
exit $status
