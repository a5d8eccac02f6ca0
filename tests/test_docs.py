"""The commands the READMEs show are commands MiniGPT accepts: every `minigpt ...` line in a code block parses with
its sub-command's own parser (each flag exists, each value has the right type and choice, no required flag is
missing), and every sub-command named anywhere in the text exists. The documentation cannot drift from the code
unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from minigpt.cli import COMMANDS, command_parser

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README_zh.md")


def code_block_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv) of each `minigpt ...` command in fenced or indented code blocks; continuation lines
    (ending in a backslash) are joined, comments dropped, and `a && minigpt b` counts as `minigpt b`."""
    commands, fenced, pending = [], False, None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        if pending is not None:
            start, joined = pending
            line, pending = joined + " " + line.strip(), None
        else:
            start = number
        if line.rstrip().endswith("\\"):
            pending = (start, line.rstrip()[:-1])
            continue
        for part in line.split("&&"):
            argv = shlex.split(part, comments=True)
            if argv[:1] == ["minigpt"]:
                commands.append((start, argv[1:]))
    return commands


@pytest.mark.parametrize("readme", READMES)
def test_every_command_in_a_code_block_parses(readme: str) -> None:
    commands = code_block_commands((PROJECT_ROOT / readme).read_text(encoding="utf-8"))
    assert len(commands) >= 10, "the extractor found too few commands: is it still reading the code blocks?"
    problems = []
    for line, argv in commands:
        if argv[0] not in COMMANDS:
            problems.append(f"{readme}:{line}: unknown command {argv[0]!r}")
            continue
        _, parser = command_parser(argv[0])
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.suppress(SystemExit):
            parser.parse_args(argv[1:])
        if errors.getvalue():
            problems.append(f"{readme}:{line}: minigpt {shlex.join(argv)}: {errors.getvalue().splitlines()[-1]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("readme", READMES)
def test_every_command_named_in_the_text_exists(readme: str) -> None:
    text = (PROJECT_ROOT / readme).read_text(encoding="utf-8")
    named = set(re.findall(r"`minigpt ([a-z][a-z-]*)", text))
    assert named, "no `minigpt COMMAND` found"
    assert named <= set(COMMANDS), named - set(COMMANDS)


@pytest.mark.parametrize("readme", (*READMES, "docs/quickstart-experiments.md"))
def test_relative_links_point_to_files_that_exist(readme: str) -> None:
    path = PROJECT_ROOT / readme
    targets = re.findall(r"\]\(([^)#:]+)\)", path.read_text(encoding="utf-8"))  # [text](target), no URLs
    missing = [target for target in targets if not (path.parent / target).exists()]
    assert not missing, missing


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_defaults_that_say_something_and_which_options_are_required(command: str) -> None:
    _, parser = command_parser(command)
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    if command in ("pretrain", "sft", "dpo"):
        assert " ".join(text.split()).count("required, here or") == 2  # --data and --out (a --config may give them)
