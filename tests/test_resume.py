"""Checkpoints and resume: a run killed with SIGKILL (once mid-training, once while writing a checkpoint) and resumed
ends exactly where an uninterrupted run ends; incomplete checkpoints are ignored or refused, never resumed silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minigpt import train
from minigpt.errors import MiniGPTError
from minigpt.tokenization import build_tokenizer_from_texts, save_tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 12, 4

# `minigpt ...`, killed by SIGKILL right after it writes optimizer.pt of checkpoint-<step>: half a checkpoint on disk.
KILLED_WHILE_SAVING = r"""
import os, signal, sys
import torch

marker = os.path.join(f"checkpoint-{os.environ['KILL_WHILE_SAVING_STEP']}", "optimizer.pt")
original_save = torch.save

def save(obj, f, *args, **kwargs):
    original_save(obj, f, *args, **kwargs)
    if str(f).endswith(marker):
        os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
from minigpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(shared_data: Path, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("resume")
    text = folder / "stories.txt"
    text.write_text((shared_data / "pretrain/tinystories_train_first2MiB.txt").read_text()[:40_000])
    save_tokenizer(build_tokenizer_from_texts([text.read_text()], vocab_size=400), folder / "tokenizer")
    return {"folder": folder, "text": text, "tokenizer": folder / "tokenizer"}


def pretrain_argv(setup: dict, out: Path, *extra: str) -> list[str]:
    """A run where exactness is not free: dropout (RNG state), gradient accumulation, cosine schedule, shuffling."""
    return [
        *["--data", str(setup["text"]), "--tokenizer", str(setup["tokenizer"]), "--out", str(out)],
        *["--preset", "tiny-qwen", "--model-config", "residual_dropout=0.1", "--block-size", "64"],
        *["--batch-size", "4", "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", "3e-3", "--warmup", "3"],
        *["--save-steps", str(SAVE_EVERY), "--save-total-limit", "3", "--logging-steps", "1", "--eval-fraction", "0"],
        *["--precision", "fp32", "--seed", "7", *extra],
    ]


def run_in_process(argv: list[str]) -> dict:
    return train.train(train.resolve_args(train.parse_args("pretrain", argv), "pretrain"), "pretrain")


def start(argv: list[str], kill_while_saving: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    if kill_while_saving is None:
        command = [sys.executable, "-m", "minigpt", "pretrain", *argv]
    else:
        env["KILL_WHILE_SAVING_STEP"] = str(kill_while_saving)
        command = [sys.executable, "-c", KILLED_WHILE_SAVING, "pretrain", *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(setup) -> tuple[Path, dict]:
    out = setup["folder"] / "uninterrupted"
    return out, run_in_process(pretrain_argv(setup, out))


def test_run_killed_mid_training_and_while_saving_resumes_exactly(setup, uninterrupted):
    reference_out, reference = uninterrupted
    out = setup["folder"] / "interrupted"
    checkpoints = out / "checkpoints"

    # 1. SIGKILL at an arbitrary moment after the first checkpoint.
    process = start(pretrain_argv(setup, out))
    deadline = time.monotonic() + 600
    while not (checkpoints / f"checkpoint-{SAVE_EVERY}").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model.safetensors").exists()

    # 2. Resume, and get killed half-way through writing checkpoint-8.
    process = start(pretrain_argv(setup, out, "--resume"), kill_while_saving=2 * SAVE_EVERY)
    log = process.communicate(timeout=600)[0]
    assert process.returncode == -signal.SIGKILL, log[-2000:]
    assert f"resuming from {checkpoints / f'checkpoint-{SAVE_EVERY}'}" in log
    assert (checkpoints / ".staging" / f"checkpoint-{2 * SAVE_EVERY}" / "optimizer.pt").is_file()
    assert not (checkpoints / f"checkpoint-{2 * SAVE_EVERY}").exists()  # the half checkpoint never looks complete

    # 3. Resume again: the half-written checkpoint is ignored, the run continues from checkpoint-4 and finishes.
    process = start(pretrain_argv(setup, out, "--resume"))
    log = process.communicate(timeout=600)[0]
    assert process.returncode == 0, log[-3000:]
    assert f"resuming from {checkpoints / f'checkpoint-{SAVE_EVERY}'}" in log
    assert not (checkpoints / ".staging").exists()

    facts = json.loads((out / "training_run.json").read_text())
    assert facts["steps"] == STEPS and facts["finished"]
    relative = abs(facts["final_train_loss"] - reference["final_train_loss"]) / reference["final_train_loss"]
    assert relative <= 1e-6
    resumed, expected = weights(out), weights(reference_out)
    assert resumed.keys() == expected.keys()
    assert max((resumed[name] - expected[name]).abs().max().item() for name in expected) <= 1e-6
    # keep the last 3 checkpoints
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]


def test_resuming_a_finished_run_trains_nothing(setup, uninterrupted):
    out, reference = uninterrupted
    before = weights(out)
    facts = run_in_process(pretrain_argv(setup, out, "--resume"))
    assert facts["steps"] == STEPS == reference["steps"]
    after = weights(out)
    assert all(before[name].equal(after[name]) for name in before)
    assert facts["final_train_loss"] == reference["final_train_loss"]


def test_resuming_a_finished_run_with_more_max_steps_trains_on(setup, uninterrupted, capfd):
    source, reference = uninterrupted
    out = setup["folder"] / "extended"
    shutil.copytree(source, out)
    capfd.readouterr()
    facts = run_in_process(pretrain_argv(setup, out, "--resume", "--max-steps", str(STEPS + SAVE_EVERY)))
    assert facts["steps"] == STEPS + SAVE_EVERY and facts["finished"]
    log = "".join(capfd.readouterr())
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{STEPS}'}" in log
    assert "missing keys" not in log  # the tied LM head is not in the checkpoint, and is not missing
    before, after = weights(source), weights(out)
    assert any(not before[name].equal(after[name]) for name in before)


def test_resuming_with_another_model_shape_is_refused_in_one_line(setup, uninterrupted):
    source, _ = uninterrupted
    out = setup["folder"] / "reshaped"
    shutil.copytree(source, out)
    argv = pretrain_argv(
        setup, out, "--resume", "--max-steps", str(STEPS + 1), "--model-config", "intermediate_size=40"
    )
    with pytest.raises(MiniGPTError, match=r"checkpoint-12: does not fit this run's model .*size mismatch for model\."):
        run_in_process(argv)
    assert (out / "checkpoints" / f"checkpoint-{STEPS}").is_dir()


def test_checkpoint_missing_optimizer_state_is_refused(setup, uninterrupted):
    source, _ = uninterrupted
    out = setup["folder"] / "damaged"
    shutil.copytree(source / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / f"checkpoint-{STEPS}" / "optimizer.pt").unlink()
    with pytest.raises(MiniGPTError, match=r"checkpoint-12: checkpoint is missing optimizer\.pt"):
        run_in_process(pretrain_argv(setup, out, "--resume"))
    for name in ("scheduler.pt", "rng_state.pth"):
        (out / "checkpoints" / f"checkpoint-{STEPS}" / name).unlink()
    with pytest.raises(MiniGPTError, match=r"missing optimizer\.pt, scheduler\.pt, rng_state\.pth"):
        train.find_resumable_checkpoint(out / "checkpoints")


def test_a_damaged_checkpoint_is_refused_not_resumed(setup, uninterrupted):
    """Files cut short (a full disk, a power cut before the data reached the disk) crashed --resume with a traceback."""
    source, _ = uninterrupted
    checkpoint = setup["folder"] / "cut" / f"checkpoint-{STEPS}"
    shutil.copytree(source / "checkpoints" / f"checkpoint-{STEPS}", checkpoint)
    for name, problem in (("model.safetensors", "incomplete metadata"), ("optimizer.pt", "not a complete torch.save")):
        file = checkpoint / name
        intact = file.read_bytes()
        file.write_bytes(intact[: len(intact) // 2])
        with pytest.raises(MiniGPTError, match=rf"checkpoint is missing an intact {name} \(.*{problem}"):
            train.find_resumable_checkpoint(checkpoint.parent)
        file.write_bytes(intact)
    assert train.find_resumable_checkpoint(checkpoint.parent) == checkpoint


def test_a_save_stopped_half_way_leaves_no_model_that_looks_complete(setup, uninterrupted, monkeypatch, capsys):
    """The final model is moved into --out file by file: stopped after two files, the folder once held the old
    config.json beside new weights (a model that loads, mixed). Now config.json goes first and comes back last."""
    from minigpt.cli import main

    source, _ = uninterrupted
    out = setup["folder"] / "stopped-while-saving"
    shutil.copytree(source, out)
    real_replace, moved = os.replace, []

    def replace(source, target):
        if len(moved) == 2:
            raise KeyboardInterrupt  # as a kill -9 would stop it, between two renames
        moved.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(train.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(pretrain_argv(setup, out, "--resume"))
    monkeypatch.undo()
    assert not (out / "config.json").exists() and len(moved) == 2
    capsys.readouterr()
    assert main(["chat", "--model", str(out), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"minigpt chat: error: {out}: no model saved here yet (no config.json): the training run writing it is still "
        "going or was stopped; run its command again with --resume to finish and save it\n"
    )
    run_in_process(pretrain_argv(setup, out, "--resume"))  # saves the model again, and clears the stopped save
    assert (out / "config.json").is_file() and not list(out.glob(".saving-*"))
    resumed, expected = weights(out), weights(source)
    assert all(resumed[name].equal(expected[name]) for name in expected)


def test_ctrl_c_and_sigterm_wait_for_the_model_files_to_be_swapped():
    def stop(number, frame):  # as `minigpt` handles SIGTERM
        raise KeyboardInterrupt

    for number in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signal.SIGTERM, stop)
        finished = False
        try:
            with pytest.raises(KeyboardInterrupt):
                with train.signals_deferred():
                    signal.raise_signal(number)
                    finished = True
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert finished, signal.Signals(number).name


def test_sigterm_stops_a_run_as_ctrl_c_does(setup):
    """SIGTERM (kill, a scheduler, a container stopping) ended the run at once with no word and exit 143, leaving
    the --out folder it had created, without a checkpoint, behind."""
    out = setup["folder"] / "terminated"
    process = start(pretrain_argv(setup, out, "--max-steps", "100000", "--save-steps", "0"))
    deadline = time.monotonic() + 600
    while not (out / "runs").is_dir() and process.poll() is None:  # TensorBoard's folder: training has started
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "minigpt pretrain: terminated\n" in log and "Traceback" not in log, log[-3000:]
    assert not out.exists()


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(setup):
    """Two runs on one --out shared checkpoints/.staging: the checkpoint kept one run's weights and the other's
    trainer_state.json, and the second run died with a traceback."""
    out = setup["folder"] / "busy"
    with train.only_run_writing(out):
        assert (out / ".training.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(MiniGPTError, match=rf"busy: another run \(process {os.getpid()}\) is writing here"):
            run_in_process(pretrain_argv(setup, out))
    assert list(out.iterdir()) == []  # the lock file goes with the run; the folder stays, as it existed
    run_in_process(pretrain_argv(setup, out, "--max-steps", "1", "--save-steps", "0"))
    assert not (out / ".training.lock").exists()


@pytest.mark.parametrize(
    "file_limit_kib, save_steps, failure",
    [
        (8, "0", "{cache}: cannot write the prepared data: "),
        (300, "1", "{out}/checkpoints: cannot write checkpoint-1 (disk full?): "),
        (300, "0", "{out}: cannot write the model (disk full?): "),
    ],
)
def test_a_full_disk_is_one_line(setup, tmp_path, file_limit_kib, save_steps, failure):
    """No file may grow past the limit (ulimit -f; Python ignores SIGXFSZ, so a write fails as on a full disk): the
    data cache (8 KiB), then the 0.9 MiB optimizer state or the 0.5 MiB weights. Each stopped with a traceback."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [sys.executable, "-m", "minigpt", "pretrain", *pretrain_argv(setup, out, "--max-steps", "1")]
    argv += ["--save-steps", save_steps]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_DATASETS_CACHE": str(cache)}
    command = ["bash", "-c", f'ulimit -f {file_limit_kib} && exec "$@"', "bash", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    error = next(line for line in result.stderr.splitlines() if "error:" in line)
    expected = failure.format(out=out, cache=cache / "minigpt")
    assert error.startswith(f"minigpt pretrain: error: {expected}"), error
    assert "Traceback" not in result.stderr


def test_new_run_into_a_folder_with_checkpoints_needs_resume_or_overwrite(setup, uninterrupted):
    out, _ = uninterrupted
    with pytest.raises(MiniGPTError, match="holds checkpoints of an earlier run: pass --resume"):
        run_in_process(pretrain_argv(setup, out))


def test_max_minutes_stops_with_a_checkpoint_that_resume_finishes(setup):
    out = setup["folder"] / "timed"
    stopped = run_in_process(pretrain_argv(setup, out, "--max-minutes", "0.0001", "--save-steps", "100"))
    assert not stopped["finished"] and stopped["steps"] < STEPS
    assert (out / "checkpoints" / f"checkpoint-{stopped['steps']}").is_dir()
    finished = run_in_process(pretrain_argv(setup, out, "--resume", "--save-steps", "100"))
    assert finished["finished"] and finished["steps"] == STEPS
