"""The `minigpt` command: one sub-command per stage of the book, each living in its own module.

A command module provides `add_arguments(parser, command)` and `run(args, command) -> int | None`. Modules are
imported only when their command runs, so `minigpt chat` never imports gradio. (`import minigpt` itself loads torch
and transformers, to register the model with the Auto classes: a few seconds before any command, `--help` included.)
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import signal
import sys
import threading
import warnings

from .errors import MiniGPTError

# Warnings one library raises about another's use of it, which no user of a command can act on: TRL (every DPO step)
# and peft (every LoRA model) read transformers' deprecated `is_gradient_checkpointing`.
LIBRARY_WARNINGS = ("`is_gradient_checkpointing` is deprecated",)

# command -> (module, one-line description); the order is the order of the book.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "minigpt.quickstart",
        "corpus -> tokenizer -> pretrain -> SFT -> eval -> chat, in one run, no files needed",
    ),
    "train-tokenizer": ("minigpt.tokenization", "train a byte-level BPE tokenizer with a ChatML chat template"),
    "pretrain": ("minigpt.train", 'pretrain a model from a preset on plain text ("pretraining learns knowledge")'),
    "sft": ("minigpt.train", 'supervised fine-tuning on conversations ("SFT learns to talk")'),
    "dpo": ("minigpt.train", "preference tuning with DPO on chosen/rejected pairs"),
    "eval": ("minigpt.evaluate", "perplexity, bits per byte and held-out question accuracy"),
    "chat": ("minigpt.chat", "streaming chat in the terminal with any chat model"),
    "demo": ("minigpt.demo", "web chat demo (Gradio)"),
    "serve": ("minigpt.serve", "OpenAI-compatible HTTP API for a model (transformers' own server)"),
    "export": ("minigpt.export", "write a folder ready to push as a Hugging Face Space"),
    "push": ("minigpt.export", "upload a model directory to the Hugging Face Hub"),
    "convert": ("minigpt.convert", "convert between MiniGPT and transformers' native GPT-2/Qwen2/Llama/Qwen3 classes"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: minigpt <command> [options]   (minigpt <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where that says nothing: no value (None), a switch that is off,
    or an option the user must give anyway."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def command_parser(command: str) -> tuple[object, argparse.ArgumentParser]:
    """The module of `minigpt COMMAND` and its argument parser."""
    module_name, description = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"minigpt {command}", description=description, formatter_class=HelpFormatter)
    module.add_arguments(parser, command)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"minigpt {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"minigpt: error: unknown command '{command}'{hint}; run 'minigpt --help' for the list", file=sys.stderr)
        return 2
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message, FutureWarning)
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers can be set only there)
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        module, parser = command_parser(command)  # imports torch and more: seconds, in which Ctrl-C is common
        args = parser.parse_args(rest)
        return int(module.run(args, command) or 0)
    except MiniGPTError as error:
        print(f"minigpt {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # what was half-written is cleaned up on the way here
        terminated = isinstance(stop, Terminated)
        print(f"minigpt {command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stopping), handled as Ctrl-C is: the run stops cleanly."""


def _terminate(signum, frame) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
