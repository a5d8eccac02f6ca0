"""The one exception type for mistakes in what the user gave us (a file, a flag, a config field).

The CLI prints its message as a single line and exits non-zero, so the message must say *what* was wrong and
*where* (file, line, field). Anything else that escapes is a bug in MiniGPT and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
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
