"""Training examples from normal-form records: packed pretraining blocks, masked SFT conversations, DPO pairs.

Labels follow transformers' convention: `labels` line up with `input_ids` and the model shifts them by one inside
its loss, so a block of L tokens gives L - 1 next-token targets. -100 marks a position that is not trained on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MiniGPTError
from .formats import write_dataset

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

IGNORE_INDEX = -100
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _int_features(*columns: str):
    from datasets import Features, List, Value

    return Features({column: List(Value("int32")) for column in columns})


def _cache_path(dataset: Dataset, name: str) -> Path | None:
    """Beside the dataset's own Arrow file when it has one (a memory-mapped dataset), else None (kept in RAM)."""
    if not dataset.cache_files:
        return None
    return Path(dataset.cache_files[0]["filename"]).parent / f"{name}-{dataset._fingerprint}.arrow"


def _cached(path: Path | None) -> Dataset | None:
    from datasets import Dataset

    return Dataset.from_file(str(path)) if path is not None and path.exists() else None


# --- pretraining ---------------------------------------------------------------------------------------------------


def pack_pretraining(
    dataset: Dataset, tokenizer, block_size: int, stride: int | None = None, num_proc: int | None = None
) -> Dataset:
    """Tokenize the `text` column, put EOS after every document, and cut the token stream into full blocks.

    With `stride=None` (or `stride == block_size`) the blocks are consecutive and every token lands in exactly one
    block; only the stream's last, partial block is dropped. A smaller `stride` gives the book's sliding windows:
    window i starts at token i * stride, so windows overlap by `block_size - stride` tokens. `labels` equal
    `input_ids` (the model shifts them), so the book's pair x = t[i:i+L], y = t[i+1:i+L+1] is a block of L + 1."""
    stride = stride or block_size
    if block_size < 2 or not 0 < stride <= block_size:
        raise MiniGPTError(f"need block size >= 2 and 0 < stride <= block size (got {block_size} and {stride})")
    if tokenizer.eos_token_id is None:
        raise MiniGPTError("the tokenizer has no EOS token to put between documents")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [document + [eos] for document in ids]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        features=_int_features("input_ids"),
        num_proc=num_proc,
        desc="Tokenizing documents",
    )
    path = _cache_path(tokenized, f"packed-{block_size}-{stride}")
    packed = _cached(path)
    if packed is None:
        stream = _TokenStream(tokenized, block_size, stride)
        packed = write_dataset(stream.blocks(), _int_features("input_ids", "labels"), path)
        print(
            f"packed {stream.tokens:,} tokens from {len(dataset):,} documents into {len(packed):,} blocks of "
            f"{block_size} (stride {stride}); {stream.dropped:,} tokens at the end did not fill a block"
        )
    if len(packed) == 0:
        raise MiniGPTError(f"the data has fewer tokens than one block of {block_size}: use a smaller --block-size")
    return packed


class _TokenStream:
    """The documents' tokens as one stream, cut into windows; the unfinished tail of a batch carries over."""

    def __init__(self, tokenized: Dataset, block_size: int, stride: int):
        self.tokenized, self.block_size, self.stride = tokenized, block_size, stride
        self.tokens = self.dropped = 0

    def blocks(self) -> Iterator[dict[str, list]]:
        import numpy as np

        carry, any_window = np.zeros(0, dtype=np.int32), False
        for batch in self.tokenized.iter(batch_size=1000):
            pieces = [np.asarray(ids, dtype=np.int32) for ids in batch["input_ids"]]
            self.tokens += sum(len(piece) for piece in pieces)
            stream = np.concatenate([carry, *pieces])
            count = (len(stream) - self.block_size) // self.stride + 1 if len(stream) >= self.block_size else 0
            if count:
                starts = np.arange(count) * self.stride
                windows = stream[starts[:, None] + np.arange(self.block_size)].tolist()
                yield {"input_ids": windows, "labels": windows}
                any_window = True
            carry = stream[count * self.stride :]
        # Tokens in no window: the tail after the last one that fits (with overlap, part of it is already used).
        self.dropped = max(0, len(carry) - (self.block_size - self.stride if any_window else 0))


# --- supervised fine-tuning ----------------------------------------------------------------------------------------


def _assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s in the assistant mask: one per assistant turn."""
    spans, start = [], None
    for position, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append((start, position))
            start = None
    return spans


def tokenize_sft(dataset: Dataset, tokenizer, max_length: int, num_proc: int | None = None) -> Dataset:
    """Render each conversation with the chat template; labels are the token ids of the assistant replies (each with
    its closing <|im_end|>) and -100 elsewhere.

    A conversation longer than `max_length` is cut after the last assistant turn that fits whole (what follows would
    be unlabelled context or a half reply); one whose first assistant turn does not fit is dropped and counted."""
    template = tokenizer.chat_template or ""
    if not _GENERATION_BLOCK.search(template):
        raise MiniGPTError(
            "the tokenizer's chat template has no {% generation %} block, so the assistant tokens cannot be found; "
            "train a tokenizer with `minigpt train-tokenizer` or set tokenizer.chat_template to "
            "minigpt.tokenization.CHAT_TEMPLATE"
        )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer.apply_chat_template(
            batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        examples: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"]):
            complete_turns_end = [end for _, end in _assistant_spans(mask) if end <= max_length]
            if not complete_turns_end:
                continue
            length = len(ids) if len(ids) <= max_length else complete_turns_end[-1]
            examples["input_ids"].append(ids[:length])
            examples["attention_mask"].append([1] * length)
            examples["labels"].append([i if m else IGNORE_INDEX for i, m in zip(ids[:length], mask[:length])])
        return examples

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        features=_int_features("input_ids", "attention_mask", "labels"),
        num_proc=num_proc,
        desc="Tokenizing conversations",
    )
    dropped = len(dataset) - len(tokenized)
    if dropped:
        print(
            f"dropped {dropped:,} of {len(dataset):,} conversations whose first assistant reply ends past {max_length} tokens"
        )
    if len(tokenized) == 0:
        raise MiniGPTError(f"no conversation has an assistant reply within {max_length} tokens: raise --max-length")
    return tokenized


@dataclass
class SFTCollator:
    """Pads a batch on the right: `input_ids` with the pad id, `attention_mask` with 0, `labels` with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padding = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for column, pad in padding.items():
            rows = [list(example[column]) for example in examples]
            batch[column] = torch.tensor([row + [pad] * (length - len(row)) for row in rows], dtype=torch.long)
        return batch


# --- preference pairs ----------------------------------------------------------------------------------------------


def prepare_preference(dataset: Dataset, tokenizer, max_length: int, num_proc: int | None = None) -> Dataset:
    """Keep the pairs TRL's DPOTrainer can learn from at `max_length`: two different replies (the same reply twice
    gives no gradient; real files have such pairs), a prompt that leaves room for a reply, and replies that still
    differ within that room (TRL cuts prompt + reply to `max_length`); the pairs whose replies are cut are counted.

    TRL drops long prompts itself, but when it drops all of them the error is an opaque IndexError; here the counts
    are printed and an empty result is a MiniGPTError."""

    def different_replies(batch: dict[str, list]) -> list[bool]:
        return [
            chosen[-1]["content"] != rejected[-1]["content"]
            for chosen, rejected in zip(batch["chosen"], batch["rejected"])
        ]

    def measure(batch: dict[str, list]) -> dict[str, list]:
        """The room `max_length` leaves each reply after its prompt, whether a reply is longer (TRL keeps the start
        of prompt + reply), and whether the two replies are the same within it (TRL's tokens: template of the whole
        conversation minus the template of the prompt)."""
        prompts = tokenizer.apply_chat_template(batch["prompt"], add_generation_prompt=True, return_dict=True)
        prompts = prompts["input_ids"]
        replies = {}
        for side in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(
                [p + r for p, r in zip(batch["prompt"], batch[side])], return_dict=True
            )
            replies[side] = [ids[len(prompt) :] for ids, prompt in zip(whole["input_ids"], prompts)]
        rooms = [max_length - len(prompt) for prompt in prompts]
        pairs = list(zip(replies["chosen"], replies["rejected"], rooms))
        return {
            "_room": rooms,
            "_cut": [len(chosen) > room or len(rejected) > room for chosen, rejected, room in pairs],
            "_same_when_cut": [chosen[:room] == rejected[:room] for chosen, rejected, room in pairs],
        }

    different = dataset.filter(different_replies, batched=True, num_proc=num_proc, desc="Checking replies")
    if len(different) == 0:
        raise MiniGPTError("every preference pair has the same chosen and rejected reply: nothing to prefer")
    if len(different) < len(dataset):
        same = len(dataset) - len(different)
        print(f"left out {same:,} of {len(dataset):,} preference pairs whose chosen and rejected replies are the same")
    measured = different.map(measure, batched=True, num_proc=num_proc, desc="Checking lengths")
    fits = measured.filter(lambda room: room > 0, input_columns="_room", batch_size=None, desc="Dropping long prompts")
    dropped = len(different) - len(fits)
    if dropped:
        print(f"dropped {dropped:,} of {len(different):,} preference pairs whose prompt fills max length {max_length}")
    if len(fits) == 0:
        raise MiniGPTError(f"every preference prompt is at least {max_length} tokens long: raise --max-length")
    kept = fits.filter(
        lambda same: not same, input_columns="_same_when_cut", batch_size=None, desc="Dropping same pairs"
    )
    if len(kept) < len(fits):
        print(
            f"left out {len(fits) - len(kept):,} of {len(fits):,} preference pairs whose replies are the same within "
            f"max length {max_length} (they differ only after the cut)"
        )
    if len(kept) == 0:
        raise MiniGPTError(
            f"every preference pair's replies are the same within {max_length} tokens: raise --max-length"
        )
    cut = sum(kept["_cut"])
    if cut:
        print(
            f"cut the replies of {cut:,} of {len(kept):,} preference pairs to max length {max_length} (prompt + reply)"
        )
    return kept.remove_columns(["_room", "_cut", "_same_when_cut"])
