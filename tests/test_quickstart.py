"""`minigpt quickstart`: from nothing to a chat model that answers questions about facts it saw only in pretraining.

The --tiny run is the CI check (at most 2 minutes, a low, stated bar: TINY.min_accuracy per language); the default
run is the headline (at most 10 minutes, at least 80% in English and in Chinese) and is marked slow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from minigpt import quickstart
from minigpt.cli import main
from minigpt.errors import MiniGPTError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_quickstart_command(out: Path, *flags: str, timeout: int) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "quickstart", "--out", str(out), *flags],
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text()), result.stdout


# The --tiny run (30 people, 2 layers, ~1 minute of training) checks the whole pipeline and that it learns something:
# it answered 50.0% (en) / 42.5% (zh) of its held-out questions (2026-11-26; 7.5% / 17.5% before the FAQ passages and
# the fresh SFT mix), against roughly 1 in 10 by chance, so its bar (TINY.min_accuracy) leaves room for another CPU's
# rounding. Learning most of the facts is what the slow default run proves (>= 80% in each language).


def check_report(report: dict, plan: quickstart.Plan, max_seconds: float | None, min_accuracy: float) -> None:
    assert set(report["seconds"]) == {"data_and_tokenizer", "pretrain", "sft", "evaluate", "total"}
    if max_seconds is not None:
        assert report["seconds"]["total"] <= max_seconds, report["seconds"]
    for stage in ("pretrain", "sft"):
        assert report[stage]["final_train_loss"] < report[stage]["first_train_loss"], stage
    accuracy = report["heldout_accuracy_by_language"]
    assert set(accuracy) == {"en", "zh"}
    assert report["heldout_questions_asked"] == 2 * plan.questions_per_language
    for language, value in accuracy.items():
        assert value >= min_accuracy, (language, accuracy)


def test_tiny_quickstart_trains_a_chat_model_that_knows_some_held_out_facts(tmp_path, capsys):
    out = tmp_path / "quickstart"
    report, stdout = run_quickstart_command(out, "--tiny", timeout=600)
    # No wall-time bound here: on a shared CI core it measures the neighbours, not us. The --tiny run's time is
    # measured and reported from a quiet machine (closing note of issue 6).
    check_report(report, quickstart.TINY, max_seconds=None, min_accuracy=quickstart.TINY.min_accuracy)
    assert report["plan"] == "tiny"
    # The corpus a user can read, the tokenizer and both models are in the folder.
    for name in ("data/pretrain.jsonl", "data/sft.jsonl", "data/heldout_questions.jsonl", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    for model in ("pretrain", "chat"):
        assert json.loads((out / model / "config.json").read_text())["auto_map"]
    # The tokenizer learned the chat template's role headers: "<|im_start|>assistant\n" is three tokens.
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    for role in ("user", "assistant"):
        assert len(tokenizer(f"<|im_start|>{role}\n").input_ids) == 3, role
    # It printed chats in both languages and the accuracy.
    assert re.search(r"model: .*[\u4e00-\u9fff]", stdout) and re.search(r"model: [A-Za-z]", stdout)
    assert "held-out question accuracy:" in stdout
    # Both models record their world (seed 0, 30 people) with the run's facts; a model trained from the chat model
    # inherits the record, and `minigpt eval` asks about that world, not the default one (seed 0, 200 people).
    world = {"seed": 0, "size": quickstart.TINY.people}
    for model in ("pretrain", "chat"):
        assert json.loads((out / model / "training_run.json").read_text(encoding="utf-8"))["built_in_world"] == world
    assert "| built_in_world | seed 0, size 30 |" in (out / "chat" / "README.md").read_text(encoding="utf-8")
    more = tmp_path / "more"
    sft = ["sft", "--model", str(out / "chat"), "--data", str(out / "data/sft.jsonl"), "--out", str(more)]
    assert main([*sft, "--max-steps", "2", "--save-steps", "0"]) == 0
    assert json.loads((more / "training_run.json").read_text(encoding="utf-8"))["built_in_world"] == world
    capsys.readouterr()
    assert main(["eval", "--model", str(more), "--qa-limit", "10", "--no-prompts", "--json"]) == 0
    asked = {item["question"] for item in json.loads(capsys.readouterr().out)["qa_results"]}
    heldout = (out / "data/heldout_questions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(asked) == 10 and asked <= {json.loads(line)["question"] for line in heldout}


def test_quickstart_does_not_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    args = quickstart.build_parser().parse_args(["--out", str(tmp_path), "--tiny"])
    with pytest.raises(MiniGPTError, match="holds files a quick start did not write"):
        quickstart.run(args, "quickstart")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    args = quickstart.build_parser().parse_args(["--out", str(tmp_path / "notes.txt"), "--tiny"])
    with pytest.raises(MiniGPTError, match="notes.txt: --out: a file, not a folder"):
        quickstart.run(args, "quickstart")
    args = quickstart.build_parser().parse_args(["--out", str(tmp_path / "new"), "--tiny", "--seed", "-1"])
    with pytest.raises(MiniGPTError, match=re.escape("--seed must be in [0, 2**32), got -1")):
        quickstart.run(args, "quickstart")
    assert not (tmp_path / "new").exists()


def test_a_quickstart_stopped_over_an_earlier_one_leaves_no_report_of_it(tmp_path, monkeypatch):
    (tmp_path / "chat").mkdir()
    (tmp_path / "report.json").write_text('{"seed": 0}')

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minigpt.data.world.build_world", stopped)  # Ctrl-C as the new world is being built
    args = quickstart.build_parser().parse_args(["--out", str(tmp_path), "--tiny", "--seed", "1"])
    with pytest.raises(KeyboardInterrupt):
        quickstart.run(args, "quickstart")
    assert not (tmp_path / "report.json").exists()  # the earlier report no longer vouches for what is here


@pytest.mark.slow
def test_default_quickstart_answers_80_percent_of_held_out_questions_in_both_languages(tmp_path):
    report, _ = run_quickstart_command(tmp_path / "quickstart", timeout=1200)
    check_report(report, quickstart.DEFAULT, max_seconds=600, min_accuracy=quickstart.DEFAULT.min_accuracy)
    assert quickstart.DEFAULT.min_accuracy == 0.8
