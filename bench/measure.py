"""Timing on a shared, noisy machine: interleaved rounds, medians, and a matmul ceiling measured alongside.

Two models timed one after the other see different background load; timed in alternation (A B A B ...) they see the
same load on average, and the median of each ignores the rounds a neighbour's job disturbed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

CEILING_SIZE = 2048  # square fp32 matmul: large enough to run at the BLAS library's best speed on a CPU


def configure_cpu(threads: int) -> None:
    """Same settings for every contestant: thread count, and denormals flushed (they make AdamW 5-10x slower)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(size: int = CEILING_SIZE, repeats: int = 8, device: str = "cpu", dtype=torch.float32) -> float:
    """Sustained GFLOP/s of back-to-back (size x size) @ (size x size) matmuls: what the hardware and BLAS deliver on
    dense math. Timed like a training step (a second or so, not the best instant), so that on a shared machine the
    ceiling and the steps it is compared with see the same kind of interference."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool, BLAS buffers
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def interleaved(
    contestants: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: str = "cpu",
    ceiling: bool = True,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contestant, called in alternation for `rounds` rounds after `warmup` rounds.

    With `ceiling`, the matmul ceiling is measured before the first contestant of a round and after each one, and
    each call's ceiling (the mean of the measurements just before and just after it) is returned under the key
    "<name> ceiling". On a shared machine the speed the hardware gives drifts by tens of percent within minutes (a
    neighbour on the same physical core); bracketing each step compares it with the speed of its own moment.
    """
    for _ in range(warmup):
        for run in contestants.values():
            run()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in contestants}
    if ceiling:
        seconds.update({f"{name} ceiling": [] for name in contestants})
    for index in range(rounds):
        # Alternate which contestant goes first.
        order = list(contestants) if index % 2 == 0 else list(reversed(contestants))
        this_round = {}
        before = matmul_gflops(device=device) if ceiling else 0.0
        for name in order:
            start = time.perf_counter()
            contestants[name]()
            synchronize(device)
            this_round[name] = time.perf_counter() - start
            seconds[name].append(this_round[name])
            if ceiling:
                after = matmul_gflops(device=device)
                this_round[f"{name} ceiling"] = (before + after) / 2
                seconds[f"{name} ceiling"].append(this_round[f"{name} ceiling"])
                before = after
        if on_round is not None:
            on_round(index, this_round)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    """The 1/5/15-minute load averages: on a 2-core machine shared with others, anything above ~2 means contention."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} threads"
    return f"{hardware}; torch {torch.__version__}; load average {load_average()}"
