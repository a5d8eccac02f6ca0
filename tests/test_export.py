"""`minigpt export` writes a Space folder that runs on its own; `minigpt push` fails with one clear line offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
import torch
import yaml
from huggingface_hub import SpaceCard
from test_chat import loaded_chat_model, run_minigpt, tiny_chat_model  # noqa: F401
from test_demo import GREEDY, start_server, stop_server, story_reply  # noqa: F401

from minigpt.chat import chat_reply, load_model
from minigpt.cli import main
from minigpt.export import CPU_TORCH_INDEX, export_space


@pytest.fixture
def trained_folder(tiny_chat_model, tmp_path) -> Path:  # noqa: F811
    """The model folder as training leaves it: weights plus optimizer state and a checkpoint."""
    folder = tmp_path / "trained"
    shutil.copytree(tiny_chat_model, folder)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"\0" * 1024)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


def test_export_writes_a_space_folder_with_the_model_bundled(tiny_chat_model, trained_folder, tmp_path):  # noqa: F811
    out = export_space(str(trained_folder), tmp_path / "space", title="Tiny chat")

    card = SpaceCard.load(out / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.sdk_version) == ("gradio", "app.py", gradio.__version__)
    assert card.data.title == "Tiny chat" and card.data.get("models") is None
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert f"--extra-index-url {CPU_TORCH_INDEX}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert {line.split("==")[0] for line in requirements if "==" in line} == {"torch", "transformers", "gradio"}

    # The model files, without the training leftovers.
    assert sorted(path.name for path in (out / "model").iterdir()) == sorted(
        path.name for path in tiny_chat_model.iterdir()
    )
    assert {"__init__.py", "chat.py", "demo.py"} <= {path.name for path in (out / "minigpt").iterdir()}
    assert not list(out.rglob("__pycache__"))
    app = (out / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert 'MODEL = str(HERE / "model")' in app and "server_name" not in app
    assert (out.stat().st_mode & 0o777) == 0o755

    # The bundled copy is a working chat model on its own.
    model, tokenizer = load_model(str(out / "model"), device="cpu")
    reply = chat_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of Zembla?"}], temperature=0)
    assert reply == "The capital of Zembla is Onhava."


def test_export_with_a_hub_id_loads_the_model_from_the_hub(tmp_path, capsys):
    # --out, as every other command names its output, is --space's other name
    assert main(["export", "--out", str(tmp_path / "space"), "--model", "someone/tiny-chat"]) == 0
    assert "wrote the Space folder" in capsys.readouterr().out
    assert "MODEL = 'someone/tiny-chat'" in (tmp_path / "space" / "app.py").read_text()
    assert SpaceCard.load(tmp_path / "space" / "README.md").data.models == ["someone/tiny-chat"]
    assert not (tmp_path / "space" / "model").exists()


def test_export_refuses_bad_input_and_leaves_nothing_half_written(trained_folder, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main(["export", "--space", str(occupied), "--model", str(trained_folder)]) == 2
    assert capsys.readouterr().err == (
        f"minigpt export: error: {occupied}: already exists and is not empty (pass --overwrite to replace it)\n"
    )
    assert [path.name for path in occupied.iterdir()] == ["keep.txt"]

    # No chat template: refused before anything is written.
    (trained_folder / "chat_template.jinja").unlink()
    config = json.loads((trained_folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (trained_folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["export", "--space", str(tmp_path / "new"), "--model", str(trained_folder)]) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["occupied", "trained"]  # no staging folder left

    assert main(["export", "--space", str(tmp_path / "new"), "--model", "not a model"]) == 2
    assert "no such folder, and not a Hugging Face Hub id" in capsys.readouterr().err


def test_export_overwrite_replaces_the_folder(tiny_chat_model, tmp_path):  # noqa: F811
    out = tmp_path / "space"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_space(str(tiny_chat_model), out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "app.py").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["space"]


def test_export_refuses_a_space_folder_that_holds_the_model(tiny_chat_model, tmp_path, capsys):  # noqa: F811
    import shutil

    model = tmp_path / "runs" / "chat"
    shutil.copytree(tiny_chat_model, model)
    assert main(["export", "--space", str(tmp_path / "runs"), "--model", str(model), "--overwrite"]) == 2
    assert f"{tmp_path / 'runs'}: the Space folder holds {model}" in capsys.readouterr().err
    assert (model / "config.json").is_file()


def test_push_without_login_fails_with_one_line(tiny_chat_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no saved `hf auth login`
    assert main(["push", "--model", str(tiny_chat_model), "--repo", "someone/tiny"]) == 2
    assert capsys.readouterr().err == (
        "minigpt push: error: not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN, then retry\n"
    )


def test_push_without_network_fails_with_one_line(tiny_chat_model, tmp_path):  # noqa: F811
    # A fresh process with a token and no way out: a proxy that refuses connections stands in for being offline,
    # so the test means the same on a CI machine that has network.
    dead_proxy = "http://127.0.0.1:9"
    env = {
        "HF_HOME": str(tmp_path),
        "HF_TOKEN": "hf_not_a_real_token",
        "HTTPS_PROXY": dead_proxy,
        "HTTP_PROXY": dead_proxy,
    }
    result = run_minigpt("push", "--model", str(tiny_chat_model), "--repo", "someone/tiny", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        "minigpt push: error: cannot reach the Hugging Face Hub (are you offline?): "
    )
    assert "Traceback" not in result.stderr


def test_push_in_offline_mode_says_so(tiny_chat_model, monkeypatch, capsys):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", "--model", str(tiny_chat_model), "--repo", "someone/tiny", "--token", "hf_x"]) == 2
    assert capsys.readouterr().err == (
        "minigpt push: error: cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it and retry\n"
    )


@pytest.mark.slow
def test_exported_space_runs_in_a_fresh_venv(tiny_chat_model, story_reply, tmp_path):  # noqa: F811
    """pip install -r requirements.txt into an empty venv, then `python app.py` serves the demo and answers."""
    from gradio_client import Client

    started = time.monotonic()
    space = export_space(str(tiny_chat_model), tmp_path / "space")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)  # no system site-packages
    python = str(tmp_path / "venv" / "bin" / "python")
    # The CPU index is unreachable here; PIP_RETRIES=0 lets pip move on at once (torch resolves from local disk).
    pip_env = {**os.environ, "PIP_RETRIES": "0", "PYTHONPATH": ""}
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", "requirements.txt"],
        cwd=space,
        env=pip_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    installed = time.monotonic()
    check = [
        python,
        "-c",
        "import torch, importlib.util; print(torch.__version__, importlib.util.find_spec('minigpt'))",
    ]
    probe = subprocess.run(check, cwd=tmp_path, env=pip_env, capture_output=True, text=True)
    torch_version, minigpt_spec = probe.stdout.split()
    assert torch_version.endswith("+cpu") and minigpt_spec == "None"  # CPU torch; minigpt only from the bundle

    # PYTHONPATH emptied: the app must find `minigpt` in the bundle, not in this checkout.
    process, url = start_server(["app.py"], space, tmp_path / "space.log", env={"PYTHONPATH": ""}, python=python)
    try:
        reply = Client(url, verbose=False).predict("Tell me a story.", *GREEDY, api_name="/chat")
    finally:
        stop_server(process)
    assert reply.strip() == story_reply
    print(f"fresh venv install {installed - started:.0f} s, whole test {time.monotonic() - started:.0f} s")


def recorded_hub(monkeypatch: pytest.MonkeyPatch) -> dict:
    """HfApi's login check, create_repo and uploads replaced by a record of their arguments (no network here)."""
    from huggingface_hub import HfApi, RepoUrl

    calls = {}

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs) -> None:
        calls["upload_folder"] = kwargs

    def upload_file(self, **kwargs) -> None:
        calls["upload_file"] = kwargs

    monkeypatch.setattr(HfApi, "whoami", lambda self, **kwargs: {"name": "someone"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    return calls


def test_push_model_uploads_the_folder_as_it_is_without_checkpoints(tiny_chat_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The repo gets the folder's own model card (loading the repo) and training logs (model.push_to_hub would re-save
    the model and tokenizer only, and the Hub would write a generic card), not Trainer's checkpoints. The Hub itself is replaced by
    recording HfApi's calls; which files go up is worked out by huggingface_hub's own pattern filter."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # upload_folder's own filter

    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_model, folder)
    card = 'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)\n'
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# my model card\n{card}", encoding="utf-8")
    (folder / "training_run.json").write_text("{}", encoding="utf-8")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1.host").write_bytes(b"tensorboard")
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    calls = recorded_hub(monkeypatch)
    assert main(["push", "--model", str(folder), "--repo", "someone/tiny", "--private", "--token", "hf_x"]) == 0
    assert capsys.readouterr().out.strip() == "pushed to https://huggingface.co/someone/tiny"
    assert calls["create_repo"] == ("someone/tiny", {"private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert Path(upload["folder_path"]) == folder and upload["repo_id"] == "someone/tiny"
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    ignored = list(upload["ignore_patterns"]) + DEFAULT_IGNORE_PATTERNS
    uploaded = set(filter_repo_objects(files, ignore_patterns=ignored))
    assert uploaded == {name for name in files if not name.startswith("checkpoints/") and name != "README.md"}
    assert {"training_run.json", "runs/events.out.tfevents.1.host", "model.safetensors"} <= uploaded
    # The card goes up after the folder, its code loading the repo instead of "PATH"; the folder keeps its own.
    assert calls["upload_file"]["path_in_repo"] == "README.md" and calls["upload_file"]["repo_id"] == "someone/tiny"
    uploaded_card = calls["upload_file"]["path_or_fileobj"].decode("utf-8")
    assert uploaded_card.startswith("---\nlicense: apache-2.0\n---\n# my model card\n")
    assert 'from_pretrained("someone/tiny", trust_remote_code=True)' in uploaded_card and "PATH" not in uploaded_card
    assert '"PATH"' in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("base", ["local", "hub"])
def test_push_of_a_lora_adapter_needs_a_base_model_on_the_hub(base, tiny_chat_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    """An adapter folder names its base model; one trained on a local folder could not be loaded from the Hub, so it is
    refused in one line pointing at --merge. One on a Hub model goes up as it is, its card loading the repo."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    base_model = str(tiny_chat_model) if base == "local" else "someone/base-model"
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base_model}), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (folder / "README.md").write_text('AutoPeftModelForCausalLM.from_pretrained("PATH")\n', encoding="utf-8")
    calls = recorded_hub(monkeypatch)
    code = main(["push", "--model", str(folder), "--repo", "someone/adapter", "--token", "hf_x"])
    out, err = capsys.readouterr()
    if base == "local":
        assert code == 2 and calls == {}
        assert err == (
            f"minigpt push: error: {folder}: a LoRA adapter on the local model {tiny_chat_model}, which a Hub user "
            "could not load: push the merged model instead (train with --merge: OUT holds it)\n"
        )
    else:
        assert code == 0 and out.strip() == "pushed to https://huggingface.co/someone/adapter", (out, err)
        assert Path(calls["upload_folder"]["folder_path"]) == folder
        assert (
            calls["upload_file"]["path_or_fileobj"] == b'AutoPeftModelForCausalLM.from_pretrained("someone/adapter")\n'
        )


def test_a_model_card_names_a_hub_base_model_and_an_adapter_as_peft() -> None:
    from minigpt.model_card import render_model_card

    def header(**facts) -> dict:
        card = render_model_card({"stage": "sft", **facts}, ["en"], ["minigpt"])
        return yaml.safe_load(card.split("---")[1])

    assert header(base="Qwen/Qwen2.5-0.5B")["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert header(base="Qwen/Qwen2.5-0.5B", lora=True)["library_name"] == "peft"
    assert header(base="Qwen/Qwen2.5-0.5B", lora=True, merged=True)["library_name"] == "transformers"
    assert "base_model" not in header(base="preset tiny") and "base_model" not in header(base="/no/such/folder")
