"""Data parallel on CPU: `minigpt pretrain` runs unchanged under `torchrun` and `accelerate launch` with two processes
(gloo), and its loss curve matches one process at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt import train
from minigpt.tokenization import build_tokenizer_from_texts, save_tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(shared_data: Path, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ddp")
    text = folder / "stories.txt"
    text.write_text((shared_data / "pretrain/tinystories_train_first2MiB.txt").read_text()[:30_000])
    save_tokenizer(build_tokenizer_from_texts([text.read_text()], vocab_size=400), folder / "tokenizer")
    return {"folder": folder, "text": text, "tokenizer": folder / "tokenizer"}


def pretrain_argv(setup: dict, out: Path, batch_size: int) -> list[str]:
    return [
        *["--data", str(setup["text"]), "--tokenizer", str(setup["tokenizer"]), "--out", str(out)],
        *["--preset", "tiny-qwen", "--block-size", "64", "--batch-size", str(batch_size), "--lr", "3e-3"],
        *["--max-steps", str(STEPS), "--save-steps", str(STEPS), "--logging-steps", "1", "--eval-fraction", "0"],
        *["--precision", "fp32", "--seed", "3"],
    ]


def loss_curve(out: Path) -> list[float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def launch(launcher: list[str], argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*launcher, "-m", "minigpt", "pretrain", *argv],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = process.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def single_process(setup) -> list[float]:
    out = setup["folder"] / "single"
    facts = train.train(
        train.resolve_args(train.parse_args("pretrain", pretrain_argv(setup, out, 8)), "pretrain"), "pretrain"
    )
    assert facts["world_size"] == 1 and facts["global_batch_size"] == 8
    return loss_curve(out)


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            lambda: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())],
            id="torchrun",
        ),
        pytest.param(
            # --multi_gpu with use_cpu=True is gloo DDP on CPU; `--cpu --num_processes 2` would silently run one process.
            lambda: [
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--main_process_port",
                str(free_port()),
            ],
            id="accelerate",
        ),
    ],
)
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(setup, single_process, launcher):
    out = setup["folder"] / f"ddp-{os.getpid()}-{free_port()}"
    launch([sys.executable, *launcher()], pretrain_argv(setup, out, 4))
    facts = json.loads((out / "training_run.json").read_text())
    assert facts["world_size"] == 2 and facts["global_batch_size"] == 8
    # Each process wrote its own RNG state into the one checkpoint.
    names = {p.name for p in (out / "checkpoints" / f"checkpoint-{STEPS}").glob("rng_state*.pth")}
    assert names == {"rng_state_0.pth", "rng_state_1.pth"}
    curve = loss_curve(out)
    assert len(curve) == len(single_process) == STEPS
    assert curve[-1] < curve[0] - 0.5  # it learns
    assert curve == pytest.approx(single_process, rel=1e-5)  # measured: ~2e-7
