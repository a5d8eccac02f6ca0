"""`minigpt export` and `minigpt push`: share the model as a Hugging Face Space folder, or upload it to the Hub.

`export --space OUT --model MODEL` writes a folder that *is* a Gradio Space: `app.py` (MiniGPT's demo), the `minigpt`
package bundled beside it (so the Space needs no MiniGPT release on PyPI), `requirements.txt` naming PyTorch's CPU
index (a plain `torch` pulls the multi-GB CUDA build onto a CPU Space), the model itself under `model/` when MODEL is a
local folder (or its Hub id when it is not), and `README.md` whose YAML header configures the Space.

`push --model DIR --repo NAME` uploads model and tokenizer with `push_to_hub`; `push --space DIR --repo NAME` uploads
an exported Space. Without a login or a network they fail with one line saying which.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import string
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    MiniGPTError,
    damaged_files,
    located,
    one_line_errors,
    refuse_to_replace_source,
    require_model_folder,
    require_model_source,
)
from .model_card import card_for_repo, read_json_object
from .tokenization import require_tokenizer

if TYPE_CHECKING:
    from .chat import Sampling
# minigpt.chat (torch, transformers) is imported only where needed, so `push` fails fast without a login or network.

# What a model folder needs at inference time; training leftovers (optimizer state, checkpoints, logs) stay behind.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".py", ".jinja", ".model", ".txt", ".tiktoken")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")  # as save_pretrained writes them, sharded or not
TRAINING_LEFTOVERS = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _template(name: str) -> str:
    return resources.files("minigpt").joinpath("templates", name).read_text(encoding="utf-8")


def _requirements() -> str:
    """Pinned to the versions this demo was tested with; torch from the CPU index."""
    import gradio
    import torch
    import transformers

    return (
        "# CPU-only PyTorch: a plain `torch` requirement would install the large CUDA build on a CPU Space.\n"
        f"--extra-index-url {CPU_TORCH_INDEX}\n"
        f"torch=={torch.__version__.split('+')[0]}\n"
        f"transformers=={transformers.__version__}\n"
        f"gradio=={gradio.__version__}\n"
    )


def _check_model_folder(path: Path) -> None:
    """Fail now, not on the Space: the folder must hold a model and a tokenizer with a chat template."""
    require_model_folder(path)
    if not any(file for pattern in WEIGHT_FILES for file in path.glob(pattern)):
        raise MiniGPTError(located(path, "no weights (no model.safetensors): the Space would have nothing to load"))
    for name, problem in damaged_files(path).items():  # a file cut short, which only the Space would find out
        if name.endswith(".safetensors"):  # (training leftovers such as optimizer.pt are not copied)
            raise MiniGPTError(located(path / name, f"damaged weights file: {problem}"))
    require_tokenizer(path)
    from transformers import AutoConfig, AutoTokenizer

    with one_line_errors(path / "config.json"):  # e.g. a model type transformers does not know and no auto_map
        AutoConfig.from_pretrained(path, trust_remote_code=True)
    with one_line_errors(path, "no usable tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    if not tokenizer.chat_template:
        raise MiniGPTError(
            located(path, "the tokenizer has no chat template; export a chat model (after `minigpt sft`)")
        )


def _copy_model(source: Path, target: Path) -> int:
    target.mkdir()
    copied = 0
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in MODEL_FILE_SUFFIXES and file.name not in TRAINING_LEFTOVERS:
            shutil.copy2(file, target / file.name)
            copied += file.stat().st_size
    return copied


def _bundle_package(target: Path) -> None:
    """Copy the installed `minigpt` package (pure Python) so `from minigpt.demo import serve` works on the Space."""
    import minigpt

    shutil.copytree(
        Path(minigpt.__file__).resolve().parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def _readme(title: str, model: str, bundled: bool) -> str:
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    card_data = SpaceCardData(
        title=title,
        emoji="💬",
        colorFrom="indigo",
        colorTo="blue",
        sdk="gradio",
        sdk_version=gradio.__version__,
        python_version="3.11",
        app_file="app.py",
        pinned=False,
        license="apache-2.0",
        short_description="Chat with a small language model built with MiniGPT",
        models=None if bundled else [model],
    )
    description = "the model in `model/`" if bundled else f"[{model}](https://huggingface.co/{model})"
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", title).strip("-").lower() or "minigpt-chat"
    card = SpaceCard.from_template(
        card_data,
        template_str=_template("space_README.md.tmpl"),
        title=title,
        model_description=description,
        bundled=bundled,
        slug=slug,
    )
    return str(card) + "\n"


def _app(model: str, bundled: bool, title: str, sampling: Sampling, concurrency: int, max_queue: int) -> str:
    if bundled:
        comment, expression = "The model bundled beside this file.", 'str(HERE / "model")'
    else:
        comment, expression = "A Hugging Face Hub model id, downloaded when the Space starts.", repr(model)
    return string.Template(_template("space_app.py.tmpl")).substitute(
        title=title,
        title_literal=repr(title),
        model_comment=comment,
        model_expression=expression,
        concurrency=concurrency,
        max_queue=max_queue,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
    )


def export_space(
    model: str,
    out_dir: str | os.PathLike,
    title: str = "MiniGPT chat",
    sampling: Sampling | None = None,
    concurrency: int = 2,
    max_queue: int = 32,
    overwrite: bool = False,
) -> Path:
    """Write the Space folder; built in a temporary folder beside `out_dir` and moved into place at the end."""
    from .chat import Sampling

    sampling = sampling or Sampling()
    out = Path(out_dir)
    bundled = Path(model).exists()
    if bundled:
        _check_model_folder(Path(model))
        refuse_to_replace_source(out, model, "the Space folder")
    else:
        require_model_source(model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MiniGPTError(located(out, "already exists and is not empty (pass --overwrite to replace it)"))
    with one_line_errors(out, "cannot create the folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the Space folder should read like any other
    try:
        if bundled:
            _copy_model(Path(model), staging / "model")
        _bundle_package(staging / "minigpt")
        (staging / "app.py").write_text(_app(model, bundled, title, sampling, concurrency, max_queue), encoding="utf-8")
        (staging / "requirements.txt").write_text(_requirements(), encoding="utf-8")
        (staging / "README.md").write_text(_readme(title, model, bundled), encoding="utf-8")
        (staging / ".gitignore").write_text("__pycache__/\n.gradio/\n", encoding="utf-8")
        if out.exists():
            # Move the old folder aside first: os.replace cannot replace a non-empty directory.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ---- push to the Hub ---------------------------------------------------------------------------------------------


def _hub_token(token: str | None) -> str:
    """The token to use, or a one-line error saying how to log in; also refuse early in offline mode."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise MiniGPTError("cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it and retry")
    token = token or get_token()
    if not token:
        raise MiniGPTError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN, then retry")
    return token


def _hub_error(error: Exception) -> MiniGPTError:
    """One line for what went wrong talking to the Hub: rejected token, no network, or the Hub's own message."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return MiniGPTError("cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it and retry")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return MiniGPTError(
                f"the Hugging Face Hub refused the token (HTTP {status}): run `hf auth login` with a token that can write"
            )
        return MiniGPTError(f"the Hugging Face Hub answered with an error: {str(error).splitlines()[0]}")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return MiniGPTError(f"cannot reach the Hugging Face Hub (are you offline?): {reason}")


# What `push --model` leaves out of a model folder: Trainer's checkpoints (optimizer states, several times the model's
# size) and Python's caches. Everything else is the Hub repo: weights, config, modeling files, tokenizer, model card,
# training_run.json, the loss plot and runs/ (TensorBoard logs, which the Hub shows as training metrics).
MODEL_UPLOAD_IGNORE = ["checkpoints/*", ".saving-*", ".training.lock", "*__pycache__*", "*.pyc"]


def adapter_base(folder: Path) -> str | None:
    """The base model a LoRA adapter folder names (adapter_config.json), or None for any other folder."""
    return str(read_json_object(folder / "adapter_config.json").get("base_model_name_or_path") or "") or None


def push_model(model_dir: str | os.PathLike, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload a model folder as it is (see MODEL_UPLOAD_IGNORE), once it loads; returns the repo URL.

    Not `model.push_to_hub`: that re-saves the model without the folder's model card (the Hub then writes a generic
    one), training facts, loss plot and TensorBoard logs. The uploaded card's code loads the repo (card_for_repo), so
    that it runs as pasted from the Hub page."""
    from huggingface_hub import HfApi

    from .chat import load_model

    path = Path(model_dir)
    base = adapter_base(path)
    if base is not None and Path(base).exists():
        raise MiniGPTError(
            located(
                path,
                f"a LoRA adapter on the local model {base}, which a Hub user could not load: push the merged model "
                "instead (train with --merge: OUT holds it)",
            )
        )
    if base is None:
        require_model_folder(path)
    token = _hub_token(token)
    api = HfApi(token=token)
    try:
        api.whoami()  # fail on login/network before spending time on loading
        if base is None:  # (an adapter on a Hub model would download it first: not checked)
            load_model(str(path), device="cpu", need_chat_template=False)  # a folder that does not load stays here
        url = api.create_repo(repo, private=private, exist_ok=True)
        card = path / "README.md"
        api.upload_folder(
            folder_path=path,
            repo_id=url.repo_id,
            commit_message=f"Upload {path.name} with minigpt push",
            ignore_patterns=[*MODEL_UPLOAD_IGNORE, card.name],
        )
        if card.is_file():
            api.upload_file(
                path_or_fileobj=card_for_repo(card.read_text(encoding="utf-8"), url.repo_id).encode("utf-8"),
                path_in_repo=card.name,
                repo_id=url.repo_id,
                commit_message="Model card: the code loads this repo",
            )
    except MiniGPTError:
        raise
    except Exception as error:
        raise _hub_error(error) from error
    return str(url)


def push_space(space_dir: str | os.PathLike, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported Space folder (creating the Space if needed); returns the Space URL."""
    from huggingface_hub import HfApi

    path = Path(space_dir)
    if not (path / "app.py").is_file() or not (path / "README.md").is_file():
        raise MiniGPTError(
            located(path, "not a Space folder: app.py or README.md missing (run `minigpt export` first)")
        )
    token = _hub_token(token)
    api = HfApi(token=token)
    try:
        api.whoami()
        url = api.create_repo(repo, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=path,
            repo_id=url.repo_id,
            repo_type="space",
            commit_message="Upload with minigpt push",
            ignore_patterns=["__pycache__/*", "*.pyc", ".gradio/*"],
        )
    except Exception as error:
        raise _hub_error(error) from error
    return str(url)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "export":
        parser.add_argument(
            "--space", "--out", dest="space", required=True, metavar="OUT_DIR", help="folder to write the Space into"
        )
        parser.add_argument("--model", required=True, help="model folder (copied into the Space) or a Hub model id")
        from .chat import add_sampling_arguments, at_least

        parser.add_argument("--title", default="MiniGPT chat", help="the Space's title")
        parser.add_argument("--concurrency", type=at_least(1), default=2, help="replies generated at once on the Space")
        parser.add_argument("--max-queue", type=at_least(1), default=32, help="requests allowed to wait on the Space")
        parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        add_sampling_arguments(parser)
    else:
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument(
            "--model", help="model folder to upload as it is (model card and training logs too; not checkpoints/)"
        )
        what.add_argument("--space", metavar="DIR", help="an exported Space folder to upload")
        parser.add_argument("--repo", required=True, help="Hub repo: NAME (your account) or OWNER/NAME")
        parser.add_argument("--private", action="store_true", help="create the repo as private")
        parser.add_argument(
            "--token", default=None, help="Hub token; if not given, HF_TOKEN or the saved `hf auth login`"
        )


def run(args: argparse.Namespace, command: str) -> int:
    if command == "export":
        from .chat import sampling_from_args

        out = export_space(
            args.model,
            args.space,
            args.title,
            sampling_from_args(args),
            args.concurrency,
            args.max_queue,
            args.overwrite,
        )
        print(f"wrote the Space folder {out}; try it: cd {out} && pip install -r requirements.txt && python app.py")
        return 0
    if args.model:
        url = push_model(args.model, args.repo, args.private, args.token)
    else:
        url = push_space(args.space, args.repo, args.private, args.token)
    print(f"pushed to {url}")
    return 0
