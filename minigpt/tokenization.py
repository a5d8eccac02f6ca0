"""Byte-level BPE tokenizer with a ChatML chat template, trained by streaming over any corpus we can read.

`minigpt train-tokenizer --data PATH... --vocab-size N --out DIR` trains one with the `tokenizers` library and saves
it as a normal transformers tokenizer, so `AutoTokenizer.from_pretrained(DIR)` reloads it without remote code.

Choices that keep `decode(encode(text)) == text` for every string: no normalizer (no NFKC, no lower-casing), byte-level
alphabet (every byte has a token, so nothing is ever unknown), no added prefix space, and no clean-up of spaces when
decoding.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .errors import MiniGPTError, check_writable, located, one_line_errors

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Ids 0..3 in this order, as in minimind's tokenizer (0 = <|endoftext|>, 1 = <|im_start|>, 2 = <|im_end|>).
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

# ChatML. The `{% generation %}` block covers each assistant reply *and* its <|im_end|>, so
# `return_assistant_tokens_mask` (and TRL's assistant_only_loss) train the model to say the reply and then stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A folder holds a tokenizer transformers can load when it has its vocabulary in one of these (a fast tokenizer's
# tokenizer.json, BPE or WordPiece vocabularies, sentencepiece models).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def require_tokenizer(folder: str | os.PathLike, flag: str | None = None) -> None:
    """A local folder without tokenizer files is a one-line error (transformers raises a dozen-line ValueError about
    sentencepiece); Hub ids and folders that have the files pass."""
    path = Path(folder)
    if path.is_dir() and not any((path / name).is_file() for name in VOCABULARY_FILES):
        message = "no tokenizer (no tokenizer.json); save it beside the model with tokenizer.save_pretrained"
        raise MiniGPTError(located(path, f"{flag}: {message}" if flag else message))


# Each Han character becomes its own piece before BPE. Byte-level BPE on a small Chinese corpus otherwise learns
# merges that fuse a frequent character with the first byte of the next one, and those tokens generalise badly.
HAN_CHARACTER = r"\p{Han}"
# Qwen2's split rule: contractions, words with one leading non-letter, single digits (numbers are read digit by
# digit), punctuation runs, newlines, and other whitespace.
WORD_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The chat template's role headers as the tokenizer meets them after <|im_start|>. `train_tokenizer` adds them to the
# training text once per document, so each is one token even when the corpus is plain text that never uses the words
# (trained on a Chinese novel alone, "assistant" took nine tokens in every chat turn; the quick start answered more
# held-out questions once its role headers were one token each: English 72.5 -> 85.9% over three seeds).
ROLE_HEADERS = ("system\n", "user\n", "assistant\n")
_SPECIAL_TOKEN_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
# The smallest vocabulary that holds the 256 bytes, the special tokens and at least one merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1


def _empty_bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(HAN_CHARACTER), behavior="isolated"),
            pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Cut special-token strings out of training text (minimind's pretraining text contains them literally): the
    trainer does not know they are special and would spend merges spelling them."""
    for text in texts:
        if "<|" in text:
            yield from (piece for piece in _SPECIAL_TOKEN_PATTERN.split(text) if piece)
        elif text:
            yield text


def _with_role_headers(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield text
        yield from ROLE_HEADERS


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tokenizer_from_texts(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on an iterable of strings (consumed once, never held in memory)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise MiniGPTError(
            f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)"
        )
    tokenizer = _empty_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    run_interruptibly(lambda: tokenizer.train_from_iterator(_without_special_tokens(texts), trainer=trainer))
    return _wrap(tokenizer)


def run_interruptibly(work: Callable[[], object]) -> None:
    """Run `work` in a worker thread while this one waits: Python acts on Ctrl-C only in the main thread, and only
    between its own steps, so a long call into Rust (the tokenizers library's BPE merges release the GIL but return
    only when done, minutes on a large corpus) held Ctrl-C off until it ended. The worker dies with the process."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as error:  # handed to the waiting thread
            failure.append(error)

    worker = threading.Thread(target=target, name="minigpt-worker", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failure:
        raise failure[0]


def bytes_per_token(tokenizer, texts: Iterable[str], batch_size: int = 256) -> float:
    """UTF-8 bytes per token over `texts`: higher means the tokenizer compresses better."""
    total_bytes = total_tokens = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        total_bytes += sum(len(text.encode("utf-8")) for text in batch)
        total_tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
    return total_bytes / total_tokens if total_tokens else float("nan")


class _HeldOutSplit:
    """Routes every `every`-th document to a held-out list (up to `max_bytes`) and the rest to training."""

    def __init__(self, texts: Iterable[str], every: int = 100, max_bytes: int = 2_000_000):
        self.texts, self.every, self.max_bytes = texts, every, max_bytes
        self.held_out: list[str] = []
        self.held_out_bytes = 0
        self.training_bytes = 0

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(self.texts):
            if index % self.every == self.every - 1 and self.held_out_bytes < self.max_bytes:
                self.held_out.append(text)
                self.held_out_bytes += len(text.encode("utf-8"))
            else:
                self.training_bytes += len(text.encode("utf-8"))
                yield text


def train_tokenizer(
    paths: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    format: str | None = None,
    text_field: str | None = None,
    skip_invalid: bool = False,
    min_frequency: int = 2,
    verbose: bool = True,
) -> PreTrainedTokenizerFast:
    """Train on the text of any file `minigpt.data` reads (streamed) plus the chat template's role headers, save to
    `out_dir` if given, and print the vocabulary size, the time taken and bytes per token on a held-out slice (every
    100th document)."""
    from .data.formats import iter_texts

    if out_dir is not None:  # before the training, not after it
        _check_out_dir(Path(out_dir))
    start = time.perf_counter()
    split = _HeldOutSplit(iter_texts(paths, format=format, text_field=text_field, skip_invalid=skip_invalid))
    texts = _with_role_headers(split)
    # The trainer's progress bars only on a terminal: written to a pipe or a file they come out as blank lines.
    progress = verbose and sys.stdout.isatty()
    tokenizer = build_tokenizer_from_texts(texts, vocab_size, min_frequency=min_frequency, show_progress=progress)
    seconds = time.perf_counter() - start
    if split.training_bytes == 0:
        raise MiniGPTError(f"no text to train on in {', '.join(map(str, paths))}")
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    if verbose:
        print(f"vocabulary: {len(tokenizer):,} tokens (asked for {vocab_size:,})")
        print(f"trained on {split.training_bytes / 1e6:,.1f} MB in {seconds:.1f} s")
        if split.held_out:
            bpt = bytes_per_token(tokenizer, split.held_out)
            print(f"held-out slice ({split.held_out_bytes / 1e6:,.2f} MB, every 100th document): {bpt:.2f} bytes/token")
        else:
            print("held-out slice: none (fewer than 100 documents)")
        if out_dir is not None:
            print(f"saved to {out_dir}")
    return tokenizer


def _check_out_dir(out_dir: Path) -> None:
    """--out must be a folder that holds no model: a new tokenizer there would silently replace the one the model's
    embeddings were trained with (its token ids then mean other text)."""
    check_writable(out_dir)
    if (out_dir / "config.json").is_file():
        raise MiniGPTError(
            located(out_dir, "holds a model (config.json), whose tokenizer this would replace: choose another --out")
        )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> None:
    """Save into a temporary folder beside `out_dir`, then move the files in, so a crash leaves no half tokenizer."""
    out_dir = Path(out_dir)
    with one_line_errors(out_dir, "cannot write the tokenizer"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            tokenizer.save_pretrained(staging)
            out_dir.mkdir(exist_ok=True)
            for file in staging.iterdir():
                os.replace(file, out_dir / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from .data import add_data_arguments

    add_data_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer in (AutoTokenizer loads it)")
    parser.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")


def run(args: argparse.Namespace, command: str) -> int:
    train_tokenizer(
        args.data,
        args.vocab_size,
        out_dir=args.out,
        format=args.format,
        text_field=args.text_field,
        skip_invalid=args.skip_invalid,
        min_frequency=args.min_frequency,
    )
    return 0
