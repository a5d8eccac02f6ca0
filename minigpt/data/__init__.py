"""Data for every stage: readers for the formats users bring (`formats`) and training examples built from them
(`examples`). `add_data_arguments` defines the data flags once for every command; `load_examples` turns those flags
into a training dataset.

Nothing here imports `datasets`, `transformers` or `torch` at import time, so `minigpt <command> --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import MiniGPTError
from .examples import IGNORE_INDEX, SFTCollator, pack_pretraining, prepare_preference, tokenize_sft
from .formats import FORMATS, KINDS, detect_format, find_files, iter_records, iter_texts, load_records

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "KINDS",
    "SFTCollator",
    "add_data_arguments",
    "detect_format",
    "find_files",
    "iter_records",
    "iter_texts",
    "load_examples",
    "load_records",
    "pack_pretraining",
    "prepare_preference",
    "tokenize_sft",
]


def add_data_arguments(parser: argparse.ArgumentParser, kind: str | None = None, data_required: bool = True) -> None:
    """The data flags: reading (--data, --format, --text-field, --skip-invalid) for every command, plus the example
    flags of `kind`: --block-size/--stride for "pretrain", --max-length for "sft" and "preference"."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        nargs="+",
        required=data_required,
        metavar="PATH",
        help="data files or folders: .txt, .jsonl, .json, .parquet (folders are searched recursively)"
        + ("" if data_required else "; required, here or as 'data' in --config"),
    )
    group.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="force the format instead of detecting it from the records",
    )
    group.add_argument(
        "--text-field", default=None, help="JSON field holding the text, e.g. paragraphs; if not given, 'text'"
    )
    group.add_argument(
        "--skip-invalid", action="store_true", help="skip bad records and print a count by reason instead of stopping"
    )
    if kind == "pretrain":
        group.add_argument(
            "--block-size",
            type=int,
            default=None,
            help="tokens per training block; if not given, the model's context length",
        )
        group.add_argument(
            "--stride",
            type=int,
            default=None,
            help="start a block every STRIDE tokens (overlapping sliding windows); if not given, the block size",
        )
    elif kind in ("sft", "preference"):
        group.add_argument(
            "--max-length",
            type=int,
            default=None,
            help="longest example in tokens; if not given, the model's context length",
        )
    if kind is not None:
        group.add_argument("--num-proc", type=int, default=None, help="processes for tokenizing the data")


def load_examples(args: argparse.Namespace, tokenizer, kind: str, context_length: int | None = None) -> Dataset:
    """Read `args.data` and build `kind`'s training examples: packed blocks (pretrain), masked conversations (sft) or
    prompt/chosen/rejected conversations for TRL (preference). `context_length` is the model's, the default length."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    length_flag = "--block-size" if kind == "pretrain" else "--max-length"
    length = (args.block_size if kind == "pretrain" else args.max_length) or context_length
    if length is None:
        raise MiniGPTError(f"pass {length_flag}")
    if context_length is not None and length > context_length:
        raise MiniGPTError(f"{length_flag} {length} is longer than the model's context length {context_length}")
    records = load_records(args.data, kind, args.format, args.text_field, args.skip_invalid)
    num_proc = getattr(args, "num_proc", None)
    if kind == "pretrain":
        return pack_pretraining(records, tokenizer, length, args.stride, num_proc)
    if kind == "sft":
        return tokenize_sft(records, tokenizer, length, num_proc)
    return prepare_preference(records, tokenizer, length, num_proc)
