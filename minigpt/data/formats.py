"""Readers: every dataset format our users bring, turned into one normal form and stored as memory-mapped Arrow.

Normal forms (the columns of the `datasets.Dataset` that `load_records` returns):
- pretrain:   `text` (one document)
- sft:        `messages`, a list of `{role, content}` with roles system / user / assistant
- preference: `prompt` (messages), `chosen` and `rejected` (each a list with one assistant message); the
  conversational form TRL's DPOTrainer takes.

Files are read one record at a time (JSON lines line by line, Parquet in row batches, text line by line), checked,
converted and written to an Arrow file, so a corpus larger than memory never has to fit in it. We parse JSON ourselves
rather than through `load_dataset("json")` so a bad record is reported with its file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MiniGPTError, located

if TYPE_CHECKING:
    from datasets import Dataset, Features

KINDS = ("pretrain", "sft", "preference")
ROLES = ("system", "user", "assistant")
DOCUMENT_SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


# --- what can be wrong with a record -------------------------------------------------------------------------------


class InvalidRecord(Exception):
    """One record (or file) we cannot use; `reason` is the short name it is counted under with --skip-invalid."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "not UTF-8"
EMPTY_FILE = "empty file"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT_TURN = "no assistant turn"
EMPTY_TEXT = "empty text"


class SkipCounter:
    """Counts skipped records by reason, remembering where each reason was first seen."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first_seen.setdefault(reason, where)

    def summary(self) -> str:
        total = sum(self.counts.values())
        parts = [f"{count} {reason} (first: {self.first_seen[reason]})" for reason, count in self.counts.most_common()]
        return f"skipped {total} invalid record{'s' if total != 1 else ''}: " + "; ".join(parts)


# --- checking and converting fields --------------------------------------------------------------------------------


def _field(record: dict, name: str, types: type | tuple[type, ...] = str, where: str | None = None) -> Any:
    if name not in record or record[name] is None:
        raise InvalidRecord(MISSING_FIELD, "missing", where or name)
    value = record[name]
    if not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise InvalidRecord(WRONG_TYPE, f"expected {expected}, got {type(value).__name__}", where or name)
    if isinstance(value, str):
        _check_encodable(value, where or name)
    return value


def _optional(record: dict, name: str, types: type | tuple[type, ...] = str) -> Any:
    return _field(record, name, types) if record.get(name) not in (None, "", []) else None


def _check_encodable(text: str, field: str) -> None:
    # Lone surrogates (from invalid bytes read with surrogateescape, or "\udXXX" escapes) cannot be stored in Arrow.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRecord(NOT_UTF8, f"not valid UTF-8 text at character {error.start}", field) from None


def _messages(value: Any, field: str, role_key: str = "role", content_key: str = "content", roles=None) -> list[dict]:
    """Check a list of chat messages and return it in the normal form; `roles` maps the file's role names to ours."""
    if not isinstance(value, list):
        raise InvalidRecord(WRONG_TYPE, f"expected a list of messages, got {type(value).__name__}", field)
    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise InvalidRecord(WRONG_TYPE, f"expected a message object, got {type(message).__name__}", where)
        role = _field(message, role_key, where=f"{where}.{role_key}")
        role = roles.get(role, role) if roles else role
        if role not in ROLES:
            known = ", ".join(sorted(roles)) if roles else ", ".join(ROLES)
            raise InvalidRecord(UNKNOWN_ROLE, f"unknown role {role!r} (expected one of {known})", f"{where}.{role_key}")
        content = _field(message, content_key, where=f"{where}.{content_key}")
        if role == "assistant":
            _nonempty_reply(content, f"{where}.{content_key}")
        messages.append({"role": role, "content": content})
    return messages


def _with_assistant_turn(messages: list[dict], field: str) -> list[dict]:
    if not any(message["role"] == "assistant" for message in messages):
        raise InvalidRecord(NO_ASSISTANT_TURN, "conversation has no assistant turn", field)
    return messages


def _reply(value: Any, field: str, role_key: str = "role", content_key: str = "content", roles=None) -> list[dict]:
    """A chosen/rejected reply given as a string, a message, or a list of messages ending with the assistant's."""
    if isinstance(value, str):
        _check_encodable(value, field)
        return [{"role": "assistant", "content": _nonempty_reply(value, field)}]
    messages = _messages([value] if isinstance(value, dict) else value, field, role_key, content_key, roles)
    if not messages or messages[-1]["role"] != "assistant":
        raise InvalidRecord(NO_ASSISTANT_TURN, "reply is not an assistant message", field)
    return messages


def _nonempty_reply(value: str, field: str) -> str:
    """An assistant reply with text in it: training on an empty one teaches the model to say nothing."""
    if not value.strip():
        raise InvalidRecord(EMPTY_TEXT, "assistant reply is empty", field)
    return value


# --- the formats ---------------------------------------------------------------------------------------------------

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _json_text(record: dict, text_field: str | None) -> dict:
    name = text_field or "text"
    value = _field(record, name, (str, list))
    if isinstance(value, list):  # e.g. a poem's `paragraphs`
        if not all(isinstance(line, str) for line in value):
            raise InvalidRecord(WRONG_TYPE, "expected a string or a list of strings", name)
        value = "\n".join(value)
        _check_encodable(value, name)
    if not value.strip():
        raise InvalidRecord(EMPTY_TEXT, "text is empty", name)
    return {"text": value}


def _chat_messages(key: str) -> Callable[[dict, str | None], dict]:
    def convert(record: dict, text_field: str | None) -> dict:
        return {"messages": _with_assistant_turn(_messages(_field(record, key, list), key), key)}

    return convert


def _sharegpt_prompt(record: dict) -> list[dict]:
    messages = _messages(_field(record, "conversations", list), "conversations", "from", "value", SHAREGPT_ROLES)
    system = _optional(record, "system")
    return ([{"role": "system", "content": system}] if system else []) + messages


def _sharegpt(record: dict, text_field: str | None) -> dict:
    return {"messages": _with_assistant_turn(_sharegpt_prompt(record), "conversations")}


def _alpaca_prompt(record: dict) -> list[dict]:
    """LLaMA-Factory's reading of Alpaca: system, then the history pairs, then instruction + "\\n" + input."""
    messages = []
    system = _optional(record, "system")
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(_optional(record, "history", list) or []):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) for text in turn)):
            raise InvalidRecord(WRONG_TYPE, "expected a [user, assistant] pair of strings", f"history[{index}]")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    instruction = _field(record, "instruction")
    extra_input = _optional(record, "input")
    messages.append({"role": "user", "content": f"{instruction}\n{extra_input}" if extra_input else instruction})
    return messages


def _alpaca(record: dict, text_field: str | None) -> dict:
    reply = _nonempty_reply(_field(record, "output"), "output")
    return {"messages": _alpaca_prompt(record) + [{"role": "assistant", "content": reply}]}


def _minimind_preference(record: dict, text_field: str | None) -> dict:
    chosen = _reply(_field(record, "chosen", list), "chosen")
    rejected = _reply(_field(record, "rejected", list), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise InvalidRecord(WRONG_TYPE, "chosen and rejected start from different prompts", "rejected")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _sharegpt_preference(record: dict, text_field: str | None) -> dict:
    return {
        "prompt": _sharegpt_prompt(record),
        "chosen": _reply(_field(record, "chosen", dict), "chosen", "from", "value", SHAREGPT_ROLES),
        "rejected": _reply(_field(record, "rejected", dict), "rejected", "from", "value", SHAREGPT_ROLES),
    }


def _alpaca_preference(record: dict, text_field: str | None) -> dict:
    return {
        "prompt": _alpaca_prompt(record),
        "chosen": _reply(_field(record, "chosen"), "chosen"),
        "rejected": _reply(_field(record, "rejected"), "rejected"),
    }


def _trl_preference(record: dict, text_field: str | None) -> dict:
    prompt = _field(record, "prompt", (str, list))
    if isinstance(prompt, str):  # TRL's "standard" (non-chat) form: the prompt is what the user says
        prompt = [{"role": "user", "content": prompt}]
    return {
        "prompt": _messages(prompt, "prompt"),
        "chosen": _reply(_field(record, "chosen", (str, list)), "chosen"),
        "rejected": _reply(_field(record, "rejected", (str, list)), "rejected"),
    }


@dataclass(frozen=True)
class Format:
    name: str
    kind: str
    description: str
    convert: Callable[[dict, str | None], dict] | None  # None: plain text files, read by `_read_text_documents`


FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in [
        Format("text", "pretrain", "plain text; documents split on <|endoftext|>, else on blank lines", None),
        Format("json-text", "pretrain", 'JSON records with a text field: {"text": ...} or --text-field', _json_text),
        Format("minimind", "sft", '{"conversations": [{"role", "content"}, ...]}', _chat_messages("conversations")),
        Format("openai", "sft", '{"messages": [{"role", "content"}, ...]}', _chat_messages("messages")),
        Format("sharegpt", "sft", '{"conversations": [{"from", "value"}, ...], "system"?}', _sharegpt),
        Format("alpaca", "sft", '{"instruction", "input", "output", "system"?, "history"?}', _alpaca),
        Format("minimind-dpo", "preference", '{"chosen": [messages], "rejected": [messages]}', _minimind_preference),
        Format(
            "sharegpt-dpo",
            "preference",
            '{"conversations", "chosen": {"from","value"}, "rejected"}',
            _sharegpt_preference,
        ),
        Format("alpaca-dpo", "preference", '{"instruction", "input", "chosen", "rejected"}', _alpaca_preference),
        Format("trl", "preference", '{"prompt", "chosen", "rejected"} (strings or messages)', _trl_preference),
    ]
}


def detect_format(record: Any, text_field: str | None = None) -> str | None:
    """The format a JSON record is in, judged from its keys; None if it matches none."""
    if not isinstance(record, dict):
        return None
    if text_field:
        return "json-text" if text_field in record else None
    if "chosen" in record and "rejected" in record:
        if "prompt" in record:
            return "trl"
        if "conversations" in record:
            return "sharegpt-dpo"
        if "instruction" in record:
            return "alpaca-dpo"
        return "minimind-dpo"
    if "conversations" in record:
        turns = record["conversations"]
        return (
            "sharegpt"
            if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
            else "minimind"
        )
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "json-text"
    return None


# --- reading files, one raw record at a time -----------------------------------------------------------------------
# Each reader yields (line, record) pairs, where record is an InvalidRecord for a line it could not read.


def _decode(raw: bytes) -> str | InvalidRecord:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return InvalidRecord(NOT_UTF8, "UTF-16 text (it starts with a UTF-16 byte order mark): save it as UTF-8")
    if b"\x00" in raw:  # valid UTF-8, but no text has it: UTF-16 without a byte order mark, or a binary file
        return InvalidRecord(NOT_UTF8, "NUL bytes: UTF-16 or binary, not UTF-8 text (save it as UTF-8)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_byte = raw[error.start]
        return InvalidRecord(NOT_UTF8, f"not valid UTF-8 (byte 0x{bad_byte:02x} at column {error.start + 1})")


def _contains(path: Path, needle: bytes, chunk_size: int = 1 << 22) -> bool:
    """Whether the file contains `needle`, read in chunks so a large file costs no memory."""
    tail = b""
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            if needle in tail + chunk[: len(needle)] or needle in chunk:
                return True
            tail = chunk[-len(needle) :]
    return False


def _read_text_documents(path: Path, max_chars: int | None = None) -> Iterator[tuple[int, str | InvalidRecord]]:
    """Documents of a plain text file: split on <|endoftext|> if the file has any, else on blank lines (TinyStories
    has blank lines inside its stories). `max_chars` cuts longer documents at a line end (for tokenizer training)."""
    split_on_separator = _contains(path, DOCUMENT_SEPARATOR.encode())
    lines: list[str] = []
    size = first_line = 0

    def flush() -> Iterator[tuple[int, str]]:
        nonlocal lines, size
        document = "".join(lines).strip("\r\n")
        lines, size = [], 0
        if document.strip():
            yield first_line, document

    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, 1):
            line = _decode(raw)
            if isinstance(line, InvalidRecord):
                yield line_number, line
                continue
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark (Windows Notepad) is not text
            if line.endswith("\r\n"):  # Windows line ends: the same text as Unix ones, so the same tokens
                line = line[:-2] + "\n"
            if not lines:
                first_line = line_number
            if split_on_separator and DOCUMENT_SEPARATOR in line:
                *ends, rest = line.split(DOCUMENT_SEPARATOR)
                for end in ends:
                    lines.append(end)
                    yield from flush()
                    first_line = line_number
                if rest.strip():
                    lines, size = [rest], len(rest)
            elif not split_on_separator and not line.strip():
                yield from flush()
            else:
                lines.append(line)
                size += len(line)
                if max_chars and size >= max_chars:
                    yield from flush()
        yield from flush()


def _parse_json_object(text: str) -> dict | InvalidRecord:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return InvalidRecord(MALFORMED_JSON, f"malformed JSON: {error.msg} (column {error.colno})")
    if not isinstance(record, dict):
        return InvalidRecord(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}")
    return record


def _read_json_lines(path: Path) -> Iterator[tuple[int, dict | InvalidRecord]]:
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, 1):
            if raw.strip():
                line = _decode(raw)
                if isinstance(line, InvalidRecord):
                    yield line_number, line
                else:
                    line = line.rstrip("\r\n")  # so an unclosed string is reported as such, not as a stray newline
                    yield line_number, _parse_json_object(line.lstrip("\ufeff") if line_number == 1 else line)


def _read_json_array(path: Path, skip_invalid: bool) -> Iterator[tuple[int, dict | InvalidRecord]]:
    """Records of a JSON array, each with the line it starts on. The file's text is held in memory (a JSON array
    cannot be read in pieces with the standard library); use .jsonl for corpora larger than memory."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if not skip_invalid:
            line_start = raw.rfind(b"\n", 0, error.start) + 1
            yield raw.count(b"\n", 0, error.start) + 1, _decode(raw[line_start : raw.find(b"\n", error.start)])
            return
        # Keep going: the record that holds the bad bytes fails the UTF-8 check in `_check_encodable`.
        text = raw.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, text.index("[") + 1).end()
    line = 1 + text.count("\n", 0, position)
    while position < len(text) and text[position] != "]":
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # A syntax error inside an array leaves no way to find where the next record starts: always stop here.
            raise MiniGPTError(
                located(path, f"malformed JSON: {error.msg} (column {error.colno})", error.lineno)
            ) from None
        yield (
            line,
            record
            if isinstance(record, dict)
            else InvalidRecord(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}"),
        )
        after = whitespace.match(text, end).end()
        if after < len(text) and text[after] == ",":
            after = whitespace.match(text, after + 1).end()
        elif after >= len(text) or text[after] != "]":
            lineno = 1 + text.count("\n", 0, after)
            raise MiniGPTError(located(path, "malformed JSON: expected ',' or ']' after a record", lineno))
        line += text.count("\n", position, after)
        position = after
    if text[position + 1 :].strip():  # two arrays one after the other, or anything else after the closing ]
        line += text.count("\n", position, whitespace.match(text, position + 1).end())
        raise MiniGPTError(located(path, "malformed JSON: more after the array's closing ']'", line))


def _read_json(path: Path, skip_invalid: bool) -> Iterator[tuple[int, dict | InvalidRecord]]:
    """A .json or .jsonl file: a JSON array of records, or one JSON object per line."""
    with open(path, "rb") as file:
        start = file.read(4096).lstrip()
    if start.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        start = start[3:].lstrip()
    if start.startswith(b"["):
        return _read_json_array(path, skip_invalid)
    return _read_json_lines(path)


def _read_parquet(path: Path) -> Iterator[tuple[int, dict | InvalidRecord]]:
    """Parquet rows in batches; the "line" is the row number, counted from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise MiniGPTError(located(path, f"cannot read as Parquet: {error}")) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1000):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _read_records(
    path: Path, skip_invalid: bool, max_document_chars: int | None
) -> Iterator[tuple[int, dict | str | InvalidRecord]]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text_documents(path, max_document_chars)
    if suffix in JSON_SUFFIXES:
        return _read_json(path, skip_invalid)
    return _read_parquet(path)


def _folder_files(folder: Path) -> list[Path]:
    """The files in `folder` and below that may be data, sorted: not the hidden ones (.git, Jupyter's
    .ipynb_checkpoints copies, macOS's ._ files), nor a dataset card (README.md, as every Hub dataset has)."""
    return sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
        and file.stem.lower() != "readme"
    )


def _unread_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files in the given folders that `find_files` passes over for their type (a .csv, a .jsonl.gz)."""
    folders = [Path(given) for given in paths if Path(given).is_dir()]
    return [file for folder in folders for file in _folder_files(folder) if file.suffix.lower() not in DATA_SUFFIXES]


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files named by `paths`, each once: files as given, folders searched recursively for the suffixes we
    read (leaving out hidden files and README files)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = [file for file in _folder_files(given) if file.suffix.lower() in DATA_SUFFIXES]
            if not found:
                raise MiniGPTError(located(given, f"folder has no data files ({', '.join(DATA_SUFFIXES)})"))
            files += found
        elif given.is_file():
            if given.suffix.lower() not in DATA_SUFFIXES:
                raise MiniGPTError(
                    located(
                        given, f"unsupported file type '{given.suffix}' (expected one of {', '.join(DATA_SUFFIXES)})"
                    )
                )
            files.append(given)
        else:
            raise MiniGPTError(located(given, "no such file or folder"))
    if not files:
        raise MiniGPTError("no data files given")
    # A file named twice (a folder and a file in it, `data/*.jsonl data/a.jsonl`) is read once, not twice.
    once = {}
    for file in files:
        once.setdefault(file.resolve(), file)
    return list(once.values())


# --- records in normal form ----------------------------------------------------------------------------------------


def iter_records(
    paths: Sequence[str | os.PathLike],
    format: str | None = None,
    text_field: str | None = None,
    skip_invalid: bool = False,
    skipped: SkipCounter | None = None,
    formats_seen: Counter | None = None,
    max_document_chars: int | None = None,
    kind: str | None = None,
) -> Iterator[tuple[Format, dict]]:
    """Every record of every file as (its format, the record in that format's normal form).

    The format is detected per file from its first readable record unless `format` forces it. Invalid records raise
    MiniGPTError naming file, line and problem, or with `skip_invalid` are counted in `skipped` and left out. With
    `kind`, a file whose records are not of that kind (nor readable as it) is a MiniGPTError naming the file."""
    if format is not None and format not in FORMATS:
        raise MiniGPTError(f"unknown format '{format}' (known: {', '.join(FORMATS)})")
    skipped = skipped if skipped is not None else SkipCounter()
    for path in find_files(paths):
        is_text_file = path.suffix.lower() in TEXT_SUFFIXES
        if is_text_file and format not in (None, "text"):
            raise MiniGPTError(located(path, f"a plain text file cannot be read as format '{format}'"))
        if not is_text_file and format == "text":
            raise MiniGPTError(located(path, "format 'text' is for plain text files; this file holds records"))
        fmt = FORMATS["text"] if is_text_file else FORMATS.get(format or "")
        skipped_before, count = sum(skipped.counts.values()), 0
        for line, raw in _read_records(path, skip_invalid, max_document_chars) if os.path.getsize(path) else ():
            try:
                if isinstance(raw, InvalidRecord):
                    raise raw
                if fmt is None:
                    fmt = FORMATS.get(detect_format(raw, text_field) or "")
                    if fmt is None:
                        keys = ", ".join(map(repr, list(raw)[:8]))
                        problem = f"no field '{text_field}'" if text_field else "cannot tell the format from the fields"
                        hint = "pass --text-field FIELD for records that hold text, or --format " + "/".join(FORMATS)
                        raise MiniGPTError(located(path, f"{problem} ({keys}); {hint}", line))
                record = {"text": raw} if fmt.convert is None else fmt.convert(raw, text_field)
            except InvalidRecord as problem:
                if not skip_invalid:
                    raise MiniGPTError(located(path, problem.message, line, problem.field)) from None
                skipped.add(problem.reason, located(path, problem.message, line, problem.field))
                continue
            if kind is not None and not _readable_as(fmt, kind):
                raise MiniGPTError(located(path, _wrong_kind_message(fmt, kind), line))
            count += 1
            if formats_seen is not None:
                formats_seen[fmt.name] += 1
            yield fmt, record
        if count == 0 and sum(skipped.counts.values()) == skipped_before:
            if not skip_invalid:
                raise MiniGPTError(located(path, "file is empty"))
            skipped.add(EMPTY_FILE, str(path))


def convert_record(record: dict, from_kind: str, to_kind: str) -> dict:
    """A normal-form record as another kind; only preference -> sft (the prompt and the chosen reply) is allowed."""
    if from_kind == to_kind:
        return record
    if from_kind == "preference" and to_kind == "sft":
        return {"messages": record["prompt"] + record["chosen"]}
    raise ValueError(f"cannot turn {from_kind} records into {to_kind} records")


def record_texts(record: dict) -> Iterator[str]:
    """The text of a normal-form record as the chat template renders it, minus the special tokens: a tokenizer
    trained on these pieces learns the role names and reply text it will meet in chat data."""
    if "text" in record:
        yield record["text"]
        return
    messages = record.get("messages") or (record["prompt"] + record["chosen"] + record["rejected"])
    for message in messages:
        yield f"{message['role']}\n{message['content']}"


def iter_texts(
    paths: Sequence[str | os.PathLike],
    format: str | None = None,
    text_field: str | None = None,
    skip_invalid: bool = False,
    max_document_chars: int = 1_000_000,
) -> Iterator[str]:
    """Text for tokenizer training from files of any format, streamed; prints a skip summary at the end."""
    skipped = SkipCounter()
    for _, record in iter_records(paths, format, text_field, skip_invalid, skipped, None, max_document_chars):
        yield from record_texts(record)
    if skipped.counts:
        print(skipped.summary())


def _message_features():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def record_features(kind: str) -> Features:
    """The Arrow schema of each normal form."""
    from datasets import Features, Value

    if kind == "pretrain":
        return Features({"text": Value("string")})
    if kind == "sft":
        return Features({"messages": _message_features()})
    if kind == "preference":
        return Features({"prompt": _message_features(), "chosen": _message_features(), "rejected": _message_features()})
    raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def write_dataset(batches: Iterable[dict[str, list]], features: Features, path: Path | None) -> Dataset:
    """Write column batches to an Arrow file at `path` (atomically) and memory-map it; with no path, keep it in RAM."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    if path is None:
        stream = pa.BufferOutputStream()
        writer = ArrowWriter(features=features, stream=stream)
        for batch in batches:
            writer.write_batch(batch)
        writer.finalize()
        table = pa.ipc.open_stream(stream.getvalue()).read_all()
        return Dataset(table).cast(features) if table.num_rows == 0 else Dataset(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        writer = ArrowWriter(features=features, path=temporary)
        for batch in batches:
            writer.write_batch(batch)
        writer.finalize()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return Dataset.from_file(str(path))


def default_cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "minigpt"


def _cache_key(files: list[Path], **settings: Any) -> str:
    # The reader's own source is part of the key, so a fixed reader never serves records an older one wrote.
    identity = {
        "reader": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        # ctime too: unlike the modification time, no copy tool or `touch` can set it back after an edit
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ctime_ns) for f in files],
        **settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def load_records(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    kind: str,
    format: str | None = None,
    text_field: str | None = None,
    skip_invalid: bool = False,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Dataset:
    """Read data files of any supported format into a memory-mapped `datasets.Dataset` in `kind`'s normal form.

    Results are cached by file identity (path, size, modification and change times) and settings, so the second run
    of a stage on a multi-GB file starts at once. Preference data can be read as kind "sft" (prompt + chosen reply)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    features = record_features(kind)
    files = find_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    key = _cache_key(files, kind=kind, format=format, text_field=text_field, skip_invalid=skip_invalid)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    arrow_path, summary_path = cache / f"records-{key}.arrow", cache / f"records-{key}.json"
    if arrow_path.exists() and summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        dataset = Dataset.from_file(str(arrow_path))
    else:
        skipped, formats_seen = SkipCounter(), Counter()
        records = iter_records(files, format, text_field, skip_invalid, skipped, formats_seen, kind=kind)
        records = tqdm(records, desc=f"Reading {len(files)} file{'s' if len(files) != 1 else ''}", unit=" records")
        dataset = write_dataset(_batches(records, kind), features, arrow_path)
        summary = {"formats": dict(formats_seen), "skipped": skipped.summary() if skipped.counts else None}
        _write_text_atomically(summary_path, json.dumps(summary))
    if verbose:
        formats = ", ".join(f"{count:,} {name}" for name, count in summary["formats"].items())
        print(
            f"read {len(dataset):,} {kind} records from {len(files)} file{'s' if len(files) != 1 else ''} ({formats})"
        )
        if summary["skipped"]:
            print(summary["skipped"])
        unread = _unread_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
        if unread:
            kinds = ", ".join(sorted({file.suffix or file.name for file in unread}))
            print(
                f"left out {len(unread):,} file{'s' if len(unread) != 1 else ''} of other types in the data folders "
                f"({kinds}): minigpt reads {', '.join(DATA_SUFFIXES)}"
            )
    if len(dataset) == 0:
        raise MiniGPTError(f"no usable {kind} records in {', '.join(map(str, files))}")
    return dataset


def _batches(records: Iterator[tuple[Format, dict]], kind: str, size: int = 1000):
    batch: list[dict] = []
    for fmt, record in records:
        batch.append(convert_record(record, fmt.kind, kind))
        if len(batch) == size:
            yield {column: [r[column] for r in batch] for column in batch[0]}
            batch = []
    if batch:
        yield {column: [r[column] for r in batch] for column in batch[0]}


def _readable_as(fmt: Format, kind: str) -> bool:
    return fmt.kind == kind or (fmt.kind == "preference" and kind == "sft")


def _wrong_kind_message(fmt: Format, kind: str) -> str:
    needs = {
        "pretrain": "plain text or JSON records with a text field",
        "sft": "conversations (minimind, openai, sharegpt, alpaca) or preference pairs",
        "preference": "chosen/rejected pairs",
    }[kind]
    return f"the data is in format '{fmt.name}' ({fmt.kind} data), but {kind} needs {needs}"


def _write_text_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)
