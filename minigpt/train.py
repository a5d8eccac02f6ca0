"""`minigpt pretrain`, `minigpt sft`, `minigpt dpo`: every training stage on one code path.

    data files -> examples (minigpt.data) -> collator -> transformers Trainer (TRL DPOTrainer for dpo) -> model repo

A stage is a row of STAGES: which records it reads, its default hyper-parameters, and whether it makes a chat model.
`--lora` wraps the model in a peft adapter on any stage. What users expect from a training run lives here once: cosine
schedule with warmup, AdamW with weight decay on matrices only, gradient clipping and accumulation, precision chosen by
measuring the hardware, eval loss and perplexity, a progress bar, TensorBoard logs and loss.png, checkpoints written
atomically and resumed exactly, and DDP when started by `torchrun` or `accelerate launch`. `--config FILE.yaml` sets
any flag. The output directory is a Hugging Face model repo (see `save_model_repo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback, TrainingArguments

from .errors import (
    MiniGPTError,
    check_writable,
    damaged_files,
    first_line,
    located,
    no_such_folder,
    one_line_errors,
)
from .model_card import RUN_FACTS_FILE, run_facts
from .tokenization import require_tokenizer

CHECKPOINTS_DIR = "checkpoints"
# Checkpoints are written here first and moved to checkpoints/checkpoint-N when complete: a save killed half-way
# leaves only this folder, which resume ignores.
STAGING_DIR = ".staging"
# The final model is written into OUT/.saving-XXXX first, then moved in (save_model_repo).
SAVING_PREFIX = ".saving-"
# Held (flock) by the run writing into --out, so that a second run on the same --out is refused, not interleaved.
LOCK_FILE = ".training.lock"
DEFAULT_LENGTH = 512  # tokens per block / example when neither a flag nor a short model context says otherwise
# Files of a previous model in the output folder that a new save must not leave behind (an adapter_config.json next
# to full weights makes transformers load the folder as an adapter).
MODEL_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class Stage:
    """What distinguishes one training stage from another; everything else is shared."""

    name: str
    records: str  # the kind of records read (minigpt.data.formats.KINDS)
    chat: bool  # the result is a chat model: generation also stops at <|im_end|>
    lr: float
    weight_decay: float
    epochs: float


STAGES = {
    "pretrain": Stage("pretrain", "pretrain", chat=False, lr=1e-3, weight_decay=0.1, epochs=1.0),
    "sft": Stage("sft", "sft", chat=True, lr=2e-4, weight_decay=0.0, epochs=2.0),
    "dpo": Stage("dpo", "preference", chat=True, lr=5e-5, weight_decay=0.0, epochs=1.0),
}


# --- command line and --config ---------------------------------------------------------------------------------------


def _remembering(base: type[argparse.Action]) -> type[argparse.Action]:
    """`base`, also noting the flag's dest in `namespace._explicit` when the user types it."""

    class Remembering(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace._explicit = getattr(namespace, "_explicit", set()) | {self.dest}

    return Remembering


def _track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Flags typed on the command line win over --config values, so the parser records which ones were typed. Every
    add_argument (ours and minigpt.data's) resolves its action through the parser's registry, so we wrap it there."""
    for name in (None, "store", "store_true", "store_false", "store_const"):
        parser.register("action", name, _remembering(parser._registry_get("action", name)))


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from .configuration_minigpt import PRESETS
    from .data import add_data_arguments

    stage = STAGES[command]
    _track_explicit_flags(parser)
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of options: every key is a flag of this command (flags win)"
    )
    add_data_arguments(parser, stage.records, data_required=False)  # --data may come from --config
    if command == "sft":
        mixing = parser.add_argument_group("pretraining text in SFT")
        mixing.add_argument(
            "--mix-data",
            nargs="+",
            metavar="PATH",
            help="pretraining text mixed into the SFT batches, other blocks on each pass over the SFT data (keeps "
            "knowledge from pretraining answerable)",
        )
        mixing.add_argument("--mix-ratio", type=float, default=0.5, help="share of training rows from --mix-data")
        mixing.add_argument(
            "--mix-block-size", type=int, default=None, help="tokens per --mix-data row; if not given, --max-length"
        )
        mixing.add_argument(
            "--mix-text-field",
            default=None,
            help="the JSON field that holds the text of --mix-data records (as --text-field does for --data)",
        )
        parser.add_argument(
            "--neftune-alpha",
            type=float,
            default=0.0,
            help="NEFTune: noise on the input embeddings while fine-tuning (Trainer's neftune_noise_alpha; 0: off)",
        )

    model = parser.add_argument_group("model")
    if command == "pretrain":
        model.add_argument("--preset", choices=list(PRESETS), default="minimind2", help="model shape to start from")
        model.add_argument(
            "--model-config",
            nargs="+",
            metavar="KEY=VALUE",
            help="override preset fields, e.g. hidden_size=256 num_hidden_layers=4",
        )
        model.add_argument(
            "--tokenizer",
            metavar="DIR",
            help="tokenizer folder (from `minigpt train-tokenizer`); required for a new model",
        )
        model.add_argument("--model", metavar="DIR", help="continue pretraining this model instead of a new preset")
    else:
        model.add_argument(
            "--model", metavar="DIR", help="model folder to start from (a LoRA adapter is merged first); required"
        )
        model.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder; if not given, the model's")
    if command == "dpo":
        model.add_argument("--beta", type=float, default=0.1, help="DPO beta: how far the model may move from --model")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        help="output folder: a Hugging Face model repo, plus checkpoints/ and runs/; required, here or in --config",
    )
    run.add_argument("--seed", type=int, default=42, help="seed for initialisation, data order and dropout")
    run.add_argument("--epochs", type=float, default=stage.epochs, help="passes over the data")
    run.add_argument("--max-steps", type=int, default=-1, help="optimizer steps to run (overrides --epochs when > 0)")
    run.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much training time")
    run.add_argument("--save-steps", type=int, default=500, help="write a checkpoint every N steps (0: never)")
    run.add_argument("--save-total-limit", type=int, default=2, help="keep only the newest K checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    run.add_argument("--overwrite", action="store_true", help="delete an earlier run's checkpoints in --out first")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=stage.lr, help="peak learning rate")
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    optim.add_argument("--warmup", type=float, default=0.05, help="warmup steps (a value < 1 is a share of all steps)")
    optim.add_argument("--batch-size", type=int, default=8, help="rows per batch per process")
    optim.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    optim.add_argument("--weight-decay", type=float, default=stage.weight_decay, help="AdamW decay (matrices only)")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this")
    optim.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 on GPUs that have it (else fp16); on CPU bf16 autocast only when measured faster than fp32",
    )
    optim.add_argument("--compile", action="store_true", help="torch.compile the model (slow first step)")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")

    report = parser.add_argument_group("evaluation and logging")
    report.add_argument("--eval-fraction", type=float, default=0.02, help="share of examples held out for eval loss")
    report.add_argument(
        "--eval-steps", type=float, default=0.25, help="evaluate every N steps (a value < 1 is a share of all steps)"
    )
    report.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    lora.add_argument("--lora-rank", type=int, default=8, help="adapter rank r")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha (update x alpha / r)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input")
    lora.add_argument(
        "--lora-targets",
        nargs="+",
        default=["all-linear"],
        metavar="MODULE",
        help="module names to adapt, e.g. q_proj v_proj (all-linear: every linear layer but the LM head)",
    )
    lora.add_argument("--merge", action="store_true", help="save the merged model (the adapter goes to OUT/adapter)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser `minigpt <command>` uses; for calling a stage from Python (`parse_args`)."""
    parser = argparse.ArgumentParser(prog=f"minigpt {command}")
    add_arguments(parser, command)
    return parser


def parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    """Arguments for `run` exactly as `minigpt <command> ARGV...` would parse them."""
    return build_parser(command).parse_args(argv)


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """Convert one YAML value the way argparse would have converted the flag."""
    if action.nargs == 0:  # store_true and friends
        if not isinstance(value, bool):
            raise MiniGPTError(f"{where}expected true or false, got {value!r}")
        return action.const if value else action.default
    if isinstance(value, dict):  # model-config: {hidden_size: 256}
        value = [f"{key}={json.dumps(item)}" for key, item in value.items()]
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise MiniGPTError(f"{where}expected one value, got a list")
    items = value if isinstance(value, list) else [value]
    converted = []
    for item in items:
        try:
            item = action.type(item) if action.type else str(item)
        except (TypeError, ValueError) as error:
            raise MiniGPTError(f"{where}{error}") from error
        if action.choices is not None and item not in action.choices:
            raise MiniGPTError(f"{where}{item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def apply_config(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Fill the flags the user did not type from `args.config` (YAML; keys are flag names, `-` or `_`)."""
    import yaml

    if not args.config:
        return args
    path = Path(args.config)
    if not path.is_file():
        raise MiniGPTError(located(path, "no such config file"))
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise MiniGPTError(
            located(path, f"not valid YAML: {getattr(error, 'problem', error)}", line=mark and mark.line + 1)
        ) from error
    if values is None:
        return args
    if not isinstance(values, dict):
        raise MiniGPTError(located(path, "expected a mapping of flag: value", line=1))
    lines = {node.value: node.start_mark.line + 1 for node, _ in root.value}
    actions = {
        action.dest: action for action in build_parser(command)._actions if action.dest not in ("help", "config")
    }
    explicit = getattr(args, "_explicit", set())
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            flags = ", ".join(sorted(name.replace("_", "-") for name in actions))
            raise MiniGPTError(
                located(path, f"unknown option '{key}' for minigpt {command} (one of: {flags})", line=lines.get(key))
            )
        if dest not in explicit:
            setattr(args, dest, _config_value(actions[dest], value, located(path, "", line=lines.get(key), field=key)))
    return args


# Numeric flags and the values that make sense (a negative learning rate reached the optimizer as a traceback, zero
# epochs "trained" and saved an untouched model). Optional flags left unset (None) are not checked.
NUMBER_RULES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("lr", lambda v: v > 0, "above 0"),
    ("epochs", lambda v: v > 0, "above 0"),
    ("max_minutes", lambda v: v > 0, "above 0"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("grad_accum", lambda v: v >= 1, "at least 1"),
    ("save_steps", lambda v: v >= 0, "0 (never) or more"),
    ("save_total_limit", lambda v: v >= 1, "at least 1"),
    ("logging_steps", lambda v: v >= 1, "at least 1"),
    ("eval_steps", lambda v: v > 0, "above 0"),
    ("eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("max_grad_norm", lambda v: v >= 0, "0 (no clipping) or more"),
    ("block_size", lambda v: v >= 2, "at least 2"),
    ("stride", lambda v: v >= 1, "at least 1"),
    ("max_length", lambda v: v >= 2, "at least 2"),
    ("mix_block_size", lambda v: v >= 2, "at least 2"),
    ("mix_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("neftune_alpha", lambda v: v >= 0, "0 (off) or more"),
    ("beta", lambda v: v > 0, "above 0"),
    ("lora_rank", lambda v: v >= 1, "at least 1"),
    ("lora_alpha", lambda v: v > 0, "above 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("num_proc", lambda v: v >= 1, "at least 1"),
)
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _check_args(args: argparse.Namespace, stage: Stage) -> None:
    if not args.data:
        raise MiniGPTError("--data is required (as a flag or a 'data' key in --config)")
    if not args.out:
        raise MiniGPTError("--out is required (as a flag or an 'out' key in --config)")
    if stage.name == "pretrain":
        if not args.model and not args.tokenizer:
            raise MiniGPTError(
                "pretraining a new model needs --tokenizer DIR (train one with `minigpt train-tokenizer`)"
            )
        if args.model and args.model_config:
            raise MiniGPTError("--model-config changes a preset; it cannot reshape an existing --model")
    elif not args.model:
        raise MiniGPTError(f"minigpt {stage.name} starts from a trained model: pass --model DIR")
    for folder, flag in ((args.model, "--model"), (args.tokenizer, "--tokenizer")):
        if folder and not Path(folder).is_dir():
            problem = "a file, not a folder" if Path(folder).exists() else no_such_folder(folder)
            raise MiniGPTError(located(folder, f"{flag}: {problem}"))
    check_writable(args.out)
    if args.lora and not args.model:
        raise MiniGPTError("--lora adapts a trained model (--model DIR); a new model from a preset trains all weights")
    if args.lora and (Path(args.model) / "adapter_config.json").is_file():
        raise MiniGPTError(
            located(
                args.model,
                "--lora on a LoRA adapter: the new adapter would work only on its base with this one merged in, which "
                "is saved nowhere; pass the merged model (OUT of a run with --lora --merge), or drop --lora to train "
                "the merged weights whole",
            )
        )
    if args.merge and not args.lora:
        raise MiniGPTError("--merge merges a LoRA adapter: pass --lora too")
    defaults = build_parser(stage.name)
    for option in LORA_OPTIONS:
        if not args.lora and getattr(args, option) != defaults.get_default(option):
            raise MiniGPTError(f"--{option.replace('_', '-')} sets up a LoRA adapter: pass --lora too")
    for flag, allowed, rule in NUMBER_RULES:
        value = getattr(args, flag, None)  # flags of other stages are absent; optional ones are None
        if value is not None and not allowed(value):
            raise MiniGPTError(f"--{flag.replace('_', '-')} must be {rule}, got {value}")
    require_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")


# --- precision -------------------------------------------------------------------------------------------------------


def _cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported and supported())


def _cpu_bf16_is_faster(hidden_size: int) -> bool:
    """Time a matmul of the model's shape in fp32 and bf16. Without bf16 instructions (AVX512-BF16, AMX) oneDNN
    emulates bf16 and is 20x slower, so that case is not even timed."""
    if not _cpu_has_bf16():
        return False

    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(2048, hidden_size, dtype=dtype), torch.randn(hidden_size, 4 * hidden_size, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    return seconds(torch.bfloat16) < 0.8 * seconds(torch.float32)


def choose_precision(requested: str, hidden_size: int) -> str:
    """Return "fp32", "bf16" or "fp16": what was asked for, or for "auto" the fastest safe choice on this machine."""
    if requested == "fp16" and not torch.cuda.is_available():
        raise MiniGPTError("--precision fp16 needs a CUDA GPU (fp16 loss scaling); use bf16 or fp32 on CPU")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # Every DDP process must choose the same, so a timing (which could differ between processes) needs one process.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "bf16" if _cpu_has_bf16() else "fp32"
    return "bf16" if _cpu_bf16_is_faster(hidden_size) else "fp32"


# --- model and tokenizer ---------------------------------------------------------------------------------------------


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    overrides = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MiniGPTError(f"--model-config expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare string such as norm_type=layernorm
    return overrides


def load_model_and_tokenizer(args: argparse.Namespace, stage: Stage):
    """The model to train and its tokenizer: a new model from a preset (pretraining) or a trained one from --model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from . import MiniGPTConfig, MiniGPTForCausalLM

    tokenizer_folder, flag = (args.tokenizer, "--tokenizer") if args.tokenizer else (args.model, "--model")
    with one_line_errors(tokenizer_folder, f"{flag}: cannot load the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if args.model:
        with one_line_errors(args.model, "--model: cannot load the model"):
            if (Path(args.model) / "adapter_config.json").is_file():
                from peft import AutoPeftModelForCausalLM

                model = AutoPeftModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).merge_and_unload()
                model.requires_grad_(True)  # peft froze the base weights; merged, they are what this run trains
            else:
                model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        # What a LoRA adapter of this run names as its base (adapter_config.json): the folder as given, made absolute
        # so that the adapter loads from any working folder.
        model.name_or_path = model.config.name_or_path = os.path.abspath(args.model)
    else:
        overrides = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **_parse_overrides(args.model_config),
        }
        try:
            config = MiniGPTConfig.from_preset(args.preset, **overrides)
        except (TypeError, ValueError) as error:
            raise MiniGPTError(f"--model-config: {error}") from error
        set_seed(args.seed)  # the initial weights depend only on --seed
        model = MiniGPTForCausalLM(config)
    if len(tokenizer) > model.config.vocab_size:
        raise MiniGPTError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model only {model.config.vocab_size:,} embeddings"
        )
    return model, tokenizer


def add_lora(model, args: argparse.Namespace):
    """Freeze the model and train a LoRA adapter on `args.lora_targets` instead."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if args.lora_targets == ["all-linear"] else args.lora_targets
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. a target module name the model does not have
        raise MiniGPTError(f"--lora-targets: {error}") from error


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable), counting tied weights once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


# --- examples --------------------------------------------------------------------------------------------------------


def _split(dataset, fraction: float, seed: int):
    """(train, eval): `fraction` of the rows (at least one) held out, or no eval set."""
    if fraction <= 0 or len(dataset) < 2:
        return dataset, None
    held_out = max(1, round(len(dataset) * fraction))
    parts = dataset.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _sft_passes(args: argparse.Namespace, sft_rows: int, rows_per_step: int) -> int:
    """How many times training goes over the SFT rows: from --max-steps when set, else --epochs rounded up."""
    if args.max_steps > 0:
        return max(1, math.ceil(args.max_steps * rows_per_step * (1 - args.mix_ratio) / sft_rows))
    return max(1, math.ceil(args.epochs))


def _mix_pretraining(sft_train, args: argparse.Namespace, tokenizer, passes: int):
    """The SFT rows once per pass, each pass with its own packed pretraining blocks making up `--mix-ratio` of its
    rows; every block is used once before any repeats. Fresh blocks on each pass rather than the same few on every
    pass: the quick start at 240 SFT steps (11 passes over its SFT rows), with the same blocks in each (a tenth of
    its corpus), answered fewer questions about facts seen only in pretraining (README, quick start)."""
    import numpy as np
    from datasets import concatenate_datasets

    from .data import load_records, pack_pretraining

    records = load_records(args.mix_data, "pretrain", text_field=args.mix_text_field, skip_invalid=args.skip_invalid)
    blocks = pack_pretraining(records, tokenizer, args.mix_block_size or args.max_length)
    wanted = passes * round(len(sft_train) * args.mix_ratio / (1 - args.mix_ratio))
    order = np.random.default_rng(args.seed).permutation(len(blocks))
    rows = np.resize(order, wanted).tolist()
    blocks = blocks.select(rows).map(
        lambda batch: {"attention_mask": [[1] * len(ids) for ids in batch["input_ids"]]},
        batched=True,
        desc="Mixing in pretraining text",
    )
    print(
        f"mixed {wanted:,} pretraining blocks ({len(set(rows)):,} distinct) into {passes} pass(es) over "
        f"{len(sft_train):,} SFT rows"
    )
    return concatenate_datasets([sft_train] * passes + [blocks.cast(sft_train.features)])


def build_datasets(args: argparse.Namespace, stage: Stage, tokenizer, context_length: int, rows_per_step: int):
    """(train, eval, passes) from --data: `passes` is how many copies of the examples the train set holds (more than
    one when pretraining text is mixed into SFT, each copy with its own pretraining rows)."""
    from .data import load_examples

    length = min(context_length, DEFAULT_LENGTH)
    if stage.records == "pretrain":
        args.block_size = args.block_size or length
    else:
        args.max_length = args.max_length or length
    examples = load_examples(args, tokenizer, stage.records, context_length)
    train, evaluation = _split(examples, args.eval_fraction, args.seed)
    passes = 1
    if stage.name == "sft" and args.mix_data and args.mix_ratio > 0:
        passes = _sft_passes(args, len(train), rows_per_step)
        train = _mix_pretraining(train, args, tokenizer, passes)
    return train, evaluation, passes


# --- the trainer -----------------------------------------------------------------------------------------------------


class _StageTrainerMixin:
    """What every stage adds to transformers' Trainer (or TRL's DPOTrainer, itself a Trainer)."""

    reports_perplexity = True
    _staging_dir: str | None = None

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # Weight decay on matrices only: biases and norm gains are not pulled toward zero.
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.reports_perplexity and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint leaves out an LM head tied to the embedding (it is the same tensor), and Trainer then warned on
        # every --resume of "missing keys ['lm_head.weight']". Warn only about keys that are really missing.
        model = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, Trainer's "output dir" is the staging folder.
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into the staging folder, then move it into place in one rename."""
        name = f"checkpoint-{self.state.global_step}"
        checkpoints = Path(self.args.output_dir)
        self._staging_dir = str(checkpoints / STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as error:  # torch.save reports a full disk as RuntimeError
            raise MiniGPTError(
                located(checkpoints, f"cannot write {name} (disk full?): {first_line(error)}")
            ) from error
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its own rng_state_<i>.pth
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            final = checkpoints / name
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(checkpoints / STAGING_DIR / name, final)
            shutil.rmtree(checkpoints / STAGING_DIR, ignore_errors=True)
            rotate_checkpoints(str(checkpoints), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _trainer_class(stage: Stage) -> type[Trainer]:
    if stage.records == "preference":
        from trl import DPOTrainer as base
    else:
        base = Trainer

    class StageTrainer(_StageTrainerMixin, base):
        reports_perplexity = stage.records != "preference"

    StageTrainer.__name__ = f"MiniGPT{base.__name__}"
    return StageTrainer


class _TimeLimit(TrainerCallback):
    """Stop (with a checkpoint) once training has run for `--max-minutes`."""

    def __init__(self, minutes: float):
        self.seconds, self.start = minutes * 60, time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            print(f"\n--max-minutes reached at step {state.global_step}: stopping")
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


class _SaveLastStep(TrainerCallback):
    """Checkpoint the last step too, so `--resume` on a finished run finds it finished."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.save_strategy != "no":
            control.should_save = True


def training_arguments(
    args: argparse.Namespace, stage: Stage, precision: str, output_dir: Path, has_eval: bool, data_passes: int = 1
):
    """TrainingArguments (DPOConfig for dpo) from the flags; the train set holds its examples `data_passes` times."""
    common = dict(
        output_dir=str(output_dir),
        seed=args.seed,
        data_seed=args.seed,
        num_train_epochs=args.epochs / data_passes,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=int(args.warmup) if args.warmup >= 1 else args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        torch_compile=args.compile,
        activation_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=int(args.eval_steps) if args.eval_steps >= 1 else args.eval_steps,
        prediction_loss_only=True,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        save_total_limit=args.save_total_limit,
        report_to="none",  # TensorBoard is added as a callback writing to OUT/runs
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        dataloader_drop_last=False,
    )
    if stage.records == "preference":
        from trl import DPOConfig

        return DPOConfig(**common, beta=args.beta, max_length=args.max_length, gradient_checkpointing=False)
    neftune = getattr(args, "neftune_alpha", 0.0) or None  # sft only
    return TrainingArguments(**common, label_names=["labels"], neftune_noise_alpha=neftune)


def _tensorboard_callback(log_dir: Path) -> TrainerCallback:
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()  # it logs from process 0 only
    callback.logging_dir = str(log_dir)  # OUT/runs, where the Hub shows training metrics; not a dated subfolder
    return callback


# --- checkpoints -----------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def find_resumable_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint-N, after checking it holds everything an exact resume needs; None when there is none.

    A save killed half-way is only a staging folder and never a checkpoint-N (see `_save_checkpoint`). A checkpoint
    that lacks its optimizer, schedule or RNG state would resume *silently* with fresh ones in transformers, so it is
    refused here with the reason."""
    found = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    if not found:
        return None
    newest = max(found, key=_checkpoint_step)
    missing = [name for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json") if not (newest / name).is_file()]
    if not any(newest.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if not any((newest / name).is_file() for name in MODEL_FILES[1:]):
        missing.append("model weights")
    missing += [f"an intact {name} ({problem})" for name, problem in damaged_files(newest).items()]
    if not missing:
        try:
            json.loads((newest / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            missing.append("a readable trainer_state.json")
    if missing:
        raise MiniGPTError(
            located(
                newest,
                f"checkpoint is missing {', '.join(missing)}, so it cannot be resumed exactly; "
                "delete it to resume from the one before",
            )
        )
    return newest


def _finished(checkpoint: Path, max_steps: int) -> bool:
    """Whether the run of `checkpoint` is done: at --max-steps when given (a larger one continues it), else at the
    step count that run planned."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    planned = max_steps if max_steps > 0 else state["max_steps"]
    return planned > 0 and state["global_step"] >= planned


def _prepare_checkpoints(args: argparse.Namespace, checkpoints: Path, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None), after clearing what an interrupted or replaced run left behind."""
    if is_main:
        shutil.rmtree(checkpoints / STAGING_DIR, ignore_errors=True)
    if args.resume:
        checkpoint = find_resumable_checkpoint(checkpoints)
        print(
            f"resuming from {checkpoint}" if checkpoint else f"--resume: no checkpoint in {checkpoints} yet; starting"
        )
        return checkpoint
    if any(checkpoints.glob("checkpoint-*")):
        if not args.overwrite:
            raise MiniGPTError(
                located(
                    args.out,
                    "holds checkpoints of an earlier run: pass --resume to continue it, --overwrite to start over, "
                    "or choose another --out",
                )
            )
        if is_main:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return None


# --- the output: a Hugging Face model repo ---------------------------------------------------------------------------


def plot_losses(log_history: list[dict], path: Path, title: str) -> None:
    """loss.png: training loss (and eval loss when there is one) against the step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _generation_config(model, tokenizer, chat: bool):
    from transformers import GenerationConfig

    # A chat model ends its turn with <|im_end|>; a base model ends a document with <|endoftext|>.
    eos = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if chat and isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in eos:
        eos.append(im_end)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=256,
    )


def save_model_repo(trainer: Trainer, tokenizer, out: Path, stage: Stage, args, facts: dict, languages: list[str]):
    """Write the model repo into `out`: weights (safetensors), config with auto_map and the modeling files (or the
    LoRA adapter), tokenizer and chat template, generation_config.json, README.md model card, loss.png and
    training_run.json. Everything is written to a staging folder first and then moved in, file by file."""
    from .model_card import render_model_card

    model = trainer.accelerator.unwrap_model(trainer.model)
    for leftover in out.glob(f"{SAVING_PREFIX}*"):  # of a save that was killed (this run holds --out's lock)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=SAVING_PREFIX, dir=out))
    try:
        if args.lora and args.merge:
            model.save_pretrained(staging / "adapter")
            model = model.merge_and_unload()
            model.save_pretrained(staging)
        else:
            trainer.save_model(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle; the card has the facts
        tokenizer.save_pretrained(staging)
        _generation_config(model, tokenizer, stage.chat).save_pretrained(staging)
        tags = ["minigpt", stage.name, "custom_code"] + (["lora"] if args.lora else [])
        (staging / "README.md").write_text(render_model_card(facts, languages, tags), encoding="utf-8")
        plot_losses(trainer.state.log_history, staging / "loss.png", f"minigpt {stage.name}: {out.name}")
        (staging / RUN_FACTS_FILE).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # The swap: config.json, which every loader opens first, goes first and comes back last, so a kill -9 half-way
        # leaves a folder that says it holds no model (not old files mixed with new); Ctrl-C and SIGTERM wait for it.
        with signals_deferred():
            for name in ("config.json", *MODEL_FILES):
                (out / name).unlink(missing_ok=True)
            for item in sorted(staging.iterdir(), key=lambda item: item.name == "config.json"):
                target = out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
    except (OSError, SafetensorError) as error:  # a full disk, a folder made read-only mid-run
        raise MiniGPTError(located(out, f"cannot write the model (disk full?): {first_line(error)}")) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sample_texts(args: argparse.Namespace, stage: Stage, limit: int = 2000) -> list[str]:
    """Some training text, to tell which languages the model card should list."""
    from .data import load_records

    records = load_records(args.data, stage.records, args.format, args.text_field, args.skip_invalid, verbose=False)
    texts = []
    for record in records.select(range(min(limit, len(records)))):
        if "text" in record:
            texts.append(record["text"])
        else:
            messages = [m for key in ("messages", "prompt", "chosen") for m in record.get(key) or []]
            texts.extend(message["content"] for message in messages)
    return texts


# --- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """A stage ready to train: the trainer with its model and data, and what the run will report."""

    stage: Stage
    args: argparse.Namespace
    trainer: Trainer
    tokenizer: Any
    out: Path
    checkpoint: Path | None  # to resume from
    precision: str
    parameters: int
    trainable: int
    languages: list[str]
    data_passes: int  # copies of the examples in the train set: its epochs x this = passes over the examples
    started: float


def prepare(args: argparse.Namespace, command: str) -> StageRun:
    """Model, data and trainer for one stage, from fully resolved arguments (see `run`); nothing is trained yet."""
    from .data.formats import default_cache_dir
    from .model_card import detect_languages

    stage = STAGES[command]
    started = time.monotonic()
    torch.set_flush_denormal(True)  # denormals in AdamW's state make CPU elementwise ops 5-10x slower
    out = Path(args.out)
    checkpoints = out / CHECKPOINTS_DIR

    model, tokenizer = load_model_and_tokenizer(args, stage)
    # Now, not only in the final save: every checkpoint-N of an SFT run is a chat model that stops at <|im_end|>.
    model.generation_config = _generation_config(model, tokenizer, stage.chat)
    precision = choose_precision(args.precision, model.config.hidden_size)
    context_length = model.config.max_position_embeddings
    if args.lora:
        model = add_lora(model, args)
    parameters, trainable = count_parameters(model)

    # TrainingArguments set up the process group under torchrun / accelerate launch; create them before any work.
    probe = training_arguments(args, stage, precision, checkpoints, has_eval=args.eval_fraction > 0)
    is_main = probe.process_index == 0
    if is_main:
        with one_line_errors(out, "--out: cannot create the folder"):
            out.mkdir(parents=True, exist_ok=True)
    with probe.main_process_first(desc="reading the data"):
        checkpoint = _prepare_checkpoints(args, checkpoints, is_main)
        rows_per_step = args.batch_size * args.grad_accum * probe.world_size
        with one_line_errors(default_cache_dir(), "cannot write the prepared data", OSError):
            train_set, eval_set, data_passes = build_datasets(args, stage, tokenizer, context_length, rows_per_step)
            languages = detect_languages(_sample_texts(args, stage))
    training_args = training_arguments(
        args, stage, precision, checkpoints, has_eval=eval_set is not None, data_passes=data_passes
    )

    callbacks = [_SaveLastStep(), _tensorboard_callback(out / "runs")]
    if args.max_minutes:
        callbacks.append(_TimeLimit(args.max_minutes))
    trainer_kwargs: dict[str, Any] = dict(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if stage.records == "preference":
        # The reference policy is the starting model, frozen; with LoRA it is the base with the adapter disabled.
        trainer_kwargs["ref_model"] = None if args.lora else load_model_and_tokenizer(args, stage)[0]
    elif stage.records == "sft":
        from .data import SFTCollator

        trainer_kwargs["data_collator"] = SFTCollator(tokenizer.pad_token_id)
    else:
        from transformers import default_data_collator

        trainer_kwargs["data_collator"] = default_data_collator
    trainer = _trainer_class(stage)(**trainer_kwargs)
    if is_main:
        print(
            f"minigpt {command}: {parameters:,} parameters ({trainable:,} trained), {len(train_set):,} training rows, "
            f"precision {precision}, {training_args.world_size} process(es)"
        )
    return StageRun(
        stage,
        args,
        trainer,
        tokenizer,
        out,
        checkpoint,
        precision,
        parameters,
        trainable,
        languages,
        data_passes,
        started,
    )


def _logged_losses(state) -> list[float]:
    """The training losses Trainer logged, in order (every --logging-steps steps, and step 1)."""
    return [entry["loss"] for entry in state.log_history if "loss" in entry]


# Facts of the model a run starts from that hold for the new model too: the built-in world it learned (the quick start
# records it; `minigpt eval` asks that world's questions).
INHERITED_FACTS = ("built_in_world",)


def _facts(run: StageRun, metrics: dict, extra: dict | None = None) -> dict:
    """What the model card and training_run.json say about the run: its own facts, those the base model hands on
    (INHERITED_FACTS) and `extra` from the caller."""
    args, state = run.args, run.trainer.state
    losses = _logged_losses(state)
    base_facts = run_facts(args.model) if args.model else {}
    inherited = {key: base_facts[key] for key in INHERITED_FACTS if key in base_facts}
    return {
        "name": run.out.name,
        "stage": run.stage.name,
        "base": args.model or f"preset {args.preset}",
        "data": ", ".join(map(str, args.data)),
        "parameters": run.parameters,
        "trained_parameters": run.trainable,
        "lora": f"rank {args.lora_rank}, alpha {args.lora_alpha}, targets {' '.join(args.lora_targets)}"
        if args.lora
        else None,
        "merged": bool(args.merge) if args.lora else None,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "finished": state.global_step >= state.max_steps,
        "epochs": round((state.epoch or 0.0) * run.data_passes, 3),
        "global_batch_size": args.batch_size * args.grad_accum * run.trainer.args.world_size,
        "learning_rate": args.lr,
        "precision": run.precision,
        "world_size": run.trainer.args.world_size,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss": metrics.get("eval_loss"),
        "eval_perplexity": metrics.get("eval_perplexity"),
        "wall_time_s": round(time.monotonic() - run.started, 1),
        **inherited,
        **(extra or {}),
    }


@contextlib.contextmanager
def only_run_writing(out: Path) -> Iterator[None]:
    """Create --out and hold its lock file while this run writes there: two runs on one --out would share the
    checkpoint staging folder and mix their checkpoints. The lock (flock) ends with the process, however it ends."""
    with one_line_errors(out, "--out: cannot create the folder"):
        out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not checked against each other there
        yield
        return
    with one_line_errors(out, "--out: cannot write there"):
        lock = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (held across the yield)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise MiniGPTError(
                located(
                    out, f"another run (process {holder}) is writing here: wait for it to end or choose another --out"
                )
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            (out / LOCK_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done (a few renames that must all happen), then act on them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in stops}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received[:1]:
            signal.raise_signal(number)


def train(args: argparse.Namespace, command: str, extra_facts: dict | None = None) -> dict:
    """Run one stage with fully resolved arguments and save the model repo; returns the facts of the run (plus
    `extra_facts`, written into the model card and training_run.json with them). A run that fails before its first
    checkpoint removes the --out folder it created: no empty or half-filled folder is left behind."""
    out = Path(args.out).absolute()
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]
    created = missing[-1] if missing else None  # the outermost folder the run will create for --out
    first_process = int(os.environ.get("RANK", "0")) == 0
    try:
        with only_run_writing(out) if first_process else contextlib.nullcontext():
            return _train(args, command, extra_facts)
    except BaseException:
        if created and first_process and not any((out / CHECKPOINTS_DIR).glob("checkpoint-*")):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _train(args: argparse.Namespace, command: str, extra_facts: dict | None) -> dict:
    run = prepare(args, command)
    trainer, checkpoint = run.trainer, run.checkpoint
    try:
        if checkpoint is not None and _finished(checkpoint, args.max_steps):
            # Trainer would run one more step on a finished run; load its final state instead.
            print(f"{checkpoint.name} already finished this run: nothing to train")
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = trainer.state.load_from_json(str(checkpoint / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RuntimeError as error:
        if checkpoint is None or "Error(s) in loading state_dict" not in str(error):
            raise
        mismatch = str(error).splitlines()[-1].strip()  # "size mismatch for model.embed_tokens.weight: ..."
        raise MiniGPTError(
            located(
                checkpoint, f"does not fit this run's model (another preset, --model-config or tokenizer?): {mismatch}"
            )
        ) from error
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    # Trainer turns the KV cache off for training; the saved model (and any use of it in this process) wants it on.
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True

    facts = _facts(run, metrics, extra_facts)
    if trainer.is_world_process_zero():
        save_model_repo(trainer, run.tokenizer, run.out, run.stage, args, facts, run.languages)
        with contextlib.suppress(OSError):  # an empty checkpoints/ (--save-steps 0) is clutter in a model repo
            (run.out / CHECKPOINTS_DIR).rmdir()
        summary = f"saved {run.out}: step {facts['steps']}/{facts['max_steps']}"
        logged = len(_logged_losses(trainer.state))
        if logged == 1:  # not "x -> x", which reads as a run that learned nothing
            summary += f", train loss {facts['first_train_loss']:.4f} at step 1"
            summary += f" (the only one logged: --logging-steps {args.logging_steps})"
        elif logged > 1:
            summary += f", train loss {facts['first_train_loss']:.4f} -> {facts['final_train_loss']:.4f}"
        if facts["eval_perplexity"] is not None:
            summary += f", eval loss {facts['eval_loss']:.4f} (perplexity {facts['eval_perplexity']:.2f})"
        print(summary)
    trainer.accelerator.wait_for_everyone()  # data parallel: no process leaves while the first one saves
    return facts


def resolve_args(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """Fill flags from --config and check that the combination makes sense."""
    apply_config(args, command)
    _check_args(args, STAGES[command])
    return args


def run(args: argparse.Namespace, command: str) -> int:
    train(resolve_args(args, command), command)
    # One stage per process: take a data-parallel process group down before the interpreter exits. Left to exit with
    # gloo's threads running, a process once aborted (SIGABRT, "terminate called without an active exception") and
    # the launcher failed the run.
    from accelerate import PartialState

    PartialState().destroy_process_group()
    return 0
