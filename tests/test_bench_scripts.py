"""The benchmark scripts in bench/ still run, and still compare like with like, on tiny shapes.

They measure speed (not here: timings belong to bench/ runs on a quiet machine); these tests check what a benchmark
result rests on: both contestants start from the same loss (same weights), generate identical tokens, and every
step of the GPU script runs end to end (on CPU, tiny shapes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_bench(*command: str, timeout: int) -> str:
    result = subprocess.run(
        list(command),
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_train_step_bench_compares_models_with_the_same_weights() -> None:
    out = run_bench(
        sys.executable, "bench/train_step.py", "--shape", "tiny", "--rounds", "1", "--warmup", "1", timeout=300
    )
    losses = re.findall(r"first-step loss MiniGPT ([\d.]+), (\w+) ([\d.]+)", out)
    assert [peer for _, peer, _ in losses] == ["GPT2LMHeadModel", "Qwen2ForCausalLM"], out
    for ours, _, peer in losses:
        assert ours == peer, out  # the same weights give the same first loss, to the printed 4 decimals
    shares = re.findall(r"MiniGPT at ([\d.]+)% of the matmul ceiling", out)
    assert len(shares) == 2 and all(0 < float(share) < 200 for share in shares), out


def test_generate_bench_produces_identical_tokens() -> None:
    out = run_bench(
        sys.executable,
        "bench/generate.py",
        "--shape",
        "tiny",
        "--rounds",
        "1",
        "--new-tokens",
        "8",
        timeout=300,
    )
    assert out.count("identical tokens: yes") == 4, out  # 2 styles x (batch 1, left-padded batch 8)


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_cpu_with_tiny_shapes() -> None:
    out = run_bench("bash", "bench/gpu.sh", "--device", "cpu", "--tiny", timeout=600)  # ~2 minutes: torch.compile
    assert "FAILED" not in out, out
    assert out.count("--- done") == 4, out  # training: side by side, MFU settings, bf16 weights; generation


@pytest.mark.slow
def test_gpu_variants_script_runs_every_variant_on_cpu() -> None:
    flags = ("--device", "cpu", "--tiny", "--no-compile", "--steps", "1", "--warmup", "1")
    out = run_bench("bash", "bench/gpu_variants.sh", *flags, timeout=900)  # ~5 minutes: 8 processes
    assert "FAILED" not in out, out
    assert out.count("===") == 8, out
    assert len(re.findall(r"^  MiniGPT +\d+ tokens/s", out, re.M)) == 8, out
    assert len(re.findall(r"^  GPT2LMHeadModel +\d+ tokens/s", out, re.M)) == 1, out  # the side-by-side variant
    assert out.count("profile:") == 1, out  # the first prints where the time goes
