"""The one exception type for mistakes in what the user gave us (a file, a flag, a config field).

The CLI prints its message as a single line and exits non-zero, so the message must say *what* was wrong and
*where* (file, line, field). Anything else that escapes is a bug in MiniGPT and keeps its traceback.
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
def one_line_errors(where: str | os.PathLike, what: str | None = None) -> Iterator[None]:
    """Turn a library's OSError, ValueError or SafetensorError while reading `where` (missing files, a model type
    transformers does not know, an impossible config value, a truncated weights file) into a one-line MiniGPTError:
    `where: what: the first line of its message`."""
    from safetensors import SafetensorError  # a damaged weights file: "incomplete metadata", "header too large"

    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        raise MiniGPTError(located(where, f"{what}: {first_line(error)}" if what else first_line(error))) from error
