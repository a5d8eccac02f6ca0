"""The one exception type for mistakes in what the user gave us (a file, a flag, a config field).

The CLI prints its message as a single line and exits non-zero, so the message must say *what* was wrong and
*where* (file, line, field). Anything else that escapes is a bug in MiniGPT and keeps its traceback. The checks that
every command makes of the files and folders it is given (a model folder or Hub id, a folder to write, damaged
weights) live here too, so that each mistake is worded one way.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Iterator
from pathlib import Path


class MiniGPTError(Exception):
    """A user-facing error: printed as one line by the `minigpt` command, no traceback."""


def located(path: str | os.PathLike | None, message: str, line: int | None = None, field: str | None = None) -> str:
    """Format `message` with where it happened: `file.jsonl:12: field 'conversations': ...`."""
    where = str(path) if path is not None else ""
    if line is not None:
        where += f":{line}"
    prefix = f"{where}: " if where else ""
    if field:
        prefix += f"field '{field}': "
    return prefix + message


# A Hugging Face Hub model id: "name" or "user/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def no_such_folder(path: str | os.PathLike) -> str:
    """'no such folder', with the closest folder names beside it when the name looks mistyped."""
    path = Path(path)
    beside = path.parent if path.parent.is_dir() else None
    names = [entry.name for entry in beside.iterdir() if entry.is_dir()] if beside else []
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"no such folder (did you mean {path.parent / close[0]}?)" if close else "no such folder"


def require_model_source(name: str, flag: str = "--model") -> None:
    """Refuse at once a `name` that is no folder here and cannot be a Hub id either: not shaped like one, or a path
    under a folder that exists (runs/chta for runs/chat). Asking the Hub about it first costs five retries, about a
    minute, when offline."""
    path = Path(name)
    if path.exists():
        return
    if not HUB_ID.match(name) or (path.parent != Path(".") and path.parent.is_dir()):
        raise MiniGPTError(
            located(name, f"{flag}: {no_such_folder(path)}, and not a Hugging Face Hub id like 'user/model'")
        )


def require_model_folder(path: str | os.PathLike) -> None:
    """A local folder must hold a model's config.json; say why when it does not. A training run moves its config.json
    in last, so a run stopped while saving (or still training) leaves a folder without one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return
    if (path / "checkpoints").is_dir() or any(path.glob(".saving-*")):
        raise MiniGPTError(
            located(
                path,
                "no model saved here yet (no config.json): the training run writing it is still going or was stopped; "
                "run its command again with --resume to finish and save it",
            )
        )
    raise MiniGPTError(located(path, "not a model folder: no config.json (pass the folder save_pretrained wrote)"))


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, a folder to write that cannot be written: its nearest existing folder must take a
    file (a permission check alone misses read-only disks, immutable folders and root's view of them). A file where
    the folder should be is refused as `refuse_a_file` refuses it."""
    import tempfile

    refuse_a_file(path, flag)
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise MiniGPTError(located(existing, f"{flag}: a file, not a folder"))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise MiniGPTError(located(path, f"{flag}: cannot write there ({error.strerror or error})")) from None


def damaged_files(folder: str | os.PathLike) -> dict[str, str]:
    """The weights and torch state files in `folder` that are cut short or not what they claim to be, each with what
    is wrong: safetensors files whose header does not read (it gives every tensor's extent, checked against the file's
    size), and torch.save files (*.pt, *.pth: zip archives) without an intact zip directory at their end."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    damaged = {}
    for file in sorted(Path(folder).iterdir()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt"):
                    pass
            except (OSError, SafetensorError) as error:
                damaged[file.name] = first_line(error)
        elif file.suffix in (".pt", ".pth") and not zipfile.is_zipfile(file):
            damaged[file.name] = "not a complete torch.save archive"
    return damaged


def refuse_a_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """`flag` names a folder to write into: refuse a file already there, before any work is done."""
    if Path(path).exists() and not Path(path).is_dir():
        raise MiniGPTError(located(path, f"{flag}: a file, not a folder"))


def refuse_to_replace_source(out: str | os.PathLike, source: str | os.PathLike, name: str = "OUT_DIR") -> None:
    """Writing the folder `out` replaces it (--overwrite): refuse when the `source` it reads is that folder or lies
    inside it, which the replacement would delete."""
    out_path, source_path = Path(out).resolve(), Path(source).resolve()
    if out_path == source_path or out_path in source_path.parents:
        raise MiniGPTError(located(out, f"{name} holds {source}, which writing it would delete: choose another {name}"))


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (some run to a dozen lines), for a one-line MiniGPTError."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def one_line_errors(
    where: str | os.PathLike, what: str | None = None, errors: type | tuple[type, ...] | None = None
) -> Iterator[None]:
    """Turn a library's OSError, ValueError or SafetensorError (or only the `errors` given) while reading or writing
    `where` (missing files, a model type transformers does not know, an impossible config value, a truncated weights
    file, a full disk) into a one-line MiniGPTError: `where: what: the first line of its message`."""
    from safetensors import SafetensorError  # a damaged weights file: "incomplete metadata", "header too large"

    caught = errors or (OSError, ValueError, SafetensorError)
    try:
        yield
    except caught as error:
        raise MiniGPTError(located(where, f"{what}: {first_line(error)}" if what else first_line(error))) from error
