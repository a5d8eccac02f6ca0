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
import torch
from torch.nn import functional as F

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


def head_and_loss_gradients(loss_of, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_of(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def transformers_style_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100)  # as ForCausalLMLoss upcasts


def test_gpu_bench_head_exps_loss_equals_cross_entropy_eager_and_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--loss head-exps` (HeadLossFromExps: the LM head and its cross-entropy, keeping only the exps for the
    backward) gives transformers' loss and gradients, eager and under torch.compile (one graph)."""
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "bench"))
    from gpu_bench import HeadLossFromExps

    torch.manual_seed(0)
    hidden, weight = torch.randn(96, 32), torch.randn(500, 32) * 0.3
    targets = torch.randint(0, 500, (96,))
    targets[::5] = -100  # positions without a target (padding, prompts) count for nothing

    def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return HeadLossFromExps.apply(hidden, weight, targets, -100)

    expected = head_and_loss_gradients(transformers_style_loss, hidden, weight, targets)
    for loss_of in (fused, torch.compile(fused, fullgraph=True)):
        for got, want in zip(head_and_loss_gradients(loss_of, hidden, weight, targets), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gpu_bench_head_exps_loss_in_bf16_is_as_precise_as_transformers_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """In bf16, with logits in the hundreds (exp without subtracting the max would overflow), its loss and gradients
    are as close to the float32 result on the same bf16 inputs as transformers' loss computed in bf16."""
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "bench"))
    from gpu_bench import HeadLossFromExps

    torch.manual_seed(0)
    hidden, weight = (torch.randn(128, 64) * 30).bfloat16(), (torch.randn(1000, 64) * 0.3).bfloat16()
    targets = torch.randint(0, 1000, (128,))
    assert (hidden.float() @ weight.float().t()).amax() > 150
    truth = head_and_loss_gradients(transformers_style_loss, hidden.float(), weight.float(), targets)

    def relative_errors(loss_of) -> list[float]:
        got = head_and_loss_gradients(loss_of, hidden, weight, targets)
        return [((g.float() - t).norm() / t.norm()).item() for g, t in zip(got, truth)]

    baseline = relative_errors(transformers_style_loss)
    fused = relative_errors(lambda h, w, t: HeadLossFromExps.apply(h, w, t, -100))
    assert all(error <= 1.25 * reference + 1e-4 for error, reference in zip(fused, baseline)), (fused, baseline)


def test_gpu_bench_head_exps_loss_under_autocast_keeps_bf16_exps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast (float32 weights, bf16 matmuls) the kept (tokens x vocab) exps are bf16, as the logits are, so
    the backward matmuls run in bf16; the gradients come back float32 and agree with transformers' loss under the
    same autocast to bf16 rounding."""
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "bench"))
    from gpu_bench import HeadLossFromExps

    torch.manual_seed(0)
    hidden, weight = torch.randn(96, 32), torch.randn(500, 32) * 0.3
    targets = torch.randint(0, 500, (96,))
    saved_dtypes = {}

    def under_autocast(loss_of):
        def run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            def remember(tensor: torch.Tensor) -> torch.Tensor:
                saved_dtypes[tuple(tensor.shape)] = tensor.dtype
                return tensor

            with (
                torch.autocast("cpu", dtype=torch.bfloat16),
                torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor),
            ):
                return loss_of(hidden, weight, targets)

        return run

    expected = head_and_loss_gradients(under_autocast(transformers_style_loss), hidden, weight, targets)
    saved_dtypes.clear()
    fused = under_autocast(lambda h, w, t: HeadLossFromExps.apply(h, w, t, -100))
    got = head_and_loss_gradients(fused, hidden, weight, targets)
    assert saved_dtypes[(96, 500)] == torch.bfloat16
    assert [g.dtype for g in got] == [torch.float32] * 3
    for g, e in zip(got, expected):
        assert ((g - e).norm() / e.norm()).item() < 2e-2


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_cpu_with_tiny_shapes() -> None:
    out = run_bench("bash", "bench/gpu.sh", "--device", "cpu", "--tiny", timeout=600)  # ~2 minutes: torch.compile
    assert "FAILED" not in out, out
    assert out.count("--- done") == 4, out  # training: side by side, MFU settings, bf16 weights; generation


@pytest.mark.slow
def test_gpu_variants_script_runs_every_variant_on_cpu() -> None:
    flags = ("--device", "cpu", "--tiny", "--no-compile", "--steps", "1", "--warmup", "1")
    out = run_bench("bash", "bench/gpu_variants.sh", *flags, timeout=900)  # ~4 minutes: 6 processes
    assert "FAILED" not in out, out
    assert out.count("===") == 6, out
    assert len(re.findall(r"^  MiniGPT +\d+ tokens/s", out, re.M)) == 6, out
    checks = re.findall(r"^  MiniGPT: loss ([\d.]+) \(its own\), ([\d.]+) \(HeadLossFromExps\)", out, re.M)
    assert len(checks) == 3 and all(own == fused for own, fused in checks), out
    assert len(re.findall(r"^  GPT2LMHeadModel +\d+ tokens/s", out, re.M)) == 1, out  # the side-by-side variant
    assert out.count("profile:") == 1, out  # the first prints where the time goes
