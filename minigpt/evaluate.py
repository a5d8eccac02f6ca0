"""`minigpt eval`: how good is the model? Perplexity and bits per byte, held-out questions, and a fixed prompt set.

- Perplexity uses a sliding window: every token is scored exactly once, and (after the first window) always with at
  least `max_length - stride` tokens of context, so a long file is not scored as a pile of context-free chunks.
- Bits per byte divides the same total by the text's UTF-8 bytes instead of its tokens, so models with different
  tokenizers can be compared fairly (perplexity per token rewards a tokenizer that makes fewer, longer tokens).
- Question accuracy asks the built-in world's held-out questions (or your own JSONL file) and checks each greedy
  reply for the answer; the prompt set is a quick look at replies, like minimind's automatic test.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .chat import (
    Sampling,
    add_model_arguments,
    add_sampling_arguments,
    at_least,
    chat_reply,
    complete_text,
    context_length,
    generate_replies,
    load_model,
    only_pretrained,
    sampling_from_args,
)
from .errors import MiniGPTError, located
from .model_card import RUN_FACTS_FILE, run_facts

__all__ = ["PROMPTS", "chat_reply", "perplexity", "question_accuracy", "read_questions", "read_texts", "reply_is_right"]

# A fixed look at the model, like minimind's automatic test: general knowledge, instructions, both languages.
PROMPTS = [
    "Tell me about yourself.",
    "What is the capital of France?",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "你好，请介绍一下你自己。",
    "中国的首都是哪里？",
    "为什么天空是蓝色的？",
    "请写一首关于月亮的短诗。",
]


NOTHING_TO_EVALUATE = "nothing to evaluate ({why}, --no-prompts): give --text FILE or drop --no-prompts"


def check_window(max_length: int | None, stride: int | None) -> None:
    """--max-length and --stride of the perplexity window (None: the default), with training's bounds."""
    if max_length is not None and max_length < 2:
        raise MiniGPTError(f"--max-length: the window must be at least 2 tokens, got {max_length}")
    if stride is not None and stride < 1:
        raise MiniGPTError(f"--stride must be at least 1 token, got {stride}")


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    stride: int | None = None,
    max_length: int | None = None,
) -> dict:
    """Sliding-window perplexity over `texts` (each scored on its own).

    Each text is preceded by the tokenizer's BOS (or EOS) token as context, so its first real token is scored too and
    bits per byte covers every byte. Returns `perplexity`, `bits_per_byte`, `nll` (total, nats), `tokens`, `bytes`.
    """
    check_window(max_length, stride)
    if max_length is None:
        max_length = context_length(model) or 1024
    # stride < max_length so each window's first new token still has context inside the window.
    stride = min(stride if stride is not None else max_length // 2, max_length - 1)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [start_token] if start_token is not None else []
    scored = []  # (text, ids) of the texts with at least one token to score
    for text in texts:
        ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            scored.append((text, ids))
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    to_score = sum(len(ids) - 1 for _, ids in scored)
    # The bar counts tokens, so one long file shows progress too; it stays hidden when one window does it all.
    with tqdm(total=to_score, desc="perplexity", unit="tok", unit_scale=True, disable=to_score < max_length) as bar:
        for text, ids in scored:
            nll, tokens = _sliding_window_nll(model, torch.tensor(ids), stride, max_length, bar.update)
            total_nll += nll
            total_tokens += tokens
            total_bytes += len(text.encode("utf-8"))
    if total_tokens == 0:
        raise MiniGPTError("no text to score: the given texts are empty")
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "nll": total_nll,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "max_length": max_length,
        "stride": stride,
    }


@torch.inference_mode()
def _sliding_window_nll(
    model: PreTrainedModel, ids: torch.Tensor, stride: int, max_length: int, on_scored: Callable[[int], object]
) -> tuple[float, int]:
    """Sum of -log p(token | context) over ids[1:], and the number of tokens scored; `on_scored(n)` after each window."""
    total = 0.0
    scored_until = 1  # ids[0] has no context, everything after it is scored exactly once
    end = min(max_length, len(ids))
    while scored_until < len(ids):
        begin = max(0, end - max_length)
        window = ids[begin:end].unsqueeze(0).to(model.device)  # (1, T)
        new = end - scored_until  # the tokens this window adds; the ones before were context, already counted
        # Logits only where they predict a new token: position i predicts window[i + 1].
        logits = model(input_ids=window, logits_to_keep=new + 1).logits[0, :-1].float()  # (new, vocab)
        token_nll = torch.nn.functional.cross_entropy(logits, window[0, -new:], reduction="none")  # (new,)
        total += token_nll.double().sum().item()
        on_scored(new)
        scored_until, end = end, min(end + stride, len(ids))
    return total, len(ids) - 1


def _mentions(text: str, value: str) -> bool:
    """Whole-word match for Latin-script values ("red" is not in "hundred"); plain substring for Chinese."""
    value = value.casefold()
    before = r"(?<![a-z0-9])" if value[:1].isascii() and value[:1].isalnum() else ""
    after = r"(?![a-z0-9])" if value[-1:].isascii() and value[-1:].isalnum() else ""
    return re.search(before + re.escape(value) + after, text.casefold()) is not None


def reply_is_right(reply: str, answer: str, candidates: Iterable[str]) -> bool:
    """Right when the reply names the answer and no other candidate (a reply listing every option is not right)."""
    if not _mentions(reply, answer):
        return False
    # Remove the answer itself first, so a candidate that is part of it ("York" in "New York") does not count.
    rest = re.sub(re.escape(answer), " ", reply, flags=re.IGNORECASE)
    return not any(_mentions(rest, other) for other in candidates if other.casefold() != answer.casefold())


def question_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[dict],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> dict:
    """Ask each question (greedy, no system prompt, `batch_size` at a time) and score it with `reply_is_right`.

    `questions` are dicts with `question`, `answer`, `candidates` and optionally `language`. Returns `accuracy`,
    `correct`, `total`, `by_language` ({language: {accuracy, correct, total}}) and `results` (one dict per question).
    """
    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    results = []
    with tqdm(total=len(questions), desc="questions", unit="q", disable=len(questions) <= batch_size) as progress:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            conversations = [[{"role": "user", "content": item["question"]}] for item in batch]
            for item, reply in zip(batch, generate_replies(model, tokenizer, conversations, greedy)):
                right = reply_is_right(reply, item["answer"], item.get("candidates", []))
                results.append({**item, "reply": reply, "correct": right})
            progress.update(len(batch))
    by_language: dict[str, dict] = {}
    for result in results:
        counts = by_language.setdefault(result.get("language", "unknown"), {"correct": 0, "total": 0})
        counts["correct"] += result["correct"]
        counts["total"] += 1
    for counts in by_language.values():
        counts["accuracy"] = counts["correct"] / counts["total"]
    correct = sum(result["correct"] for result in results)
    return {
        "accuracy": correct / len(results) if results else 0.0,
        "correct": correct,
        "total": len(results),
        "by_language": dict(sorted(by_language.items())),
        "results": results,
    }


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Each file as one UTF-8 text (scored as a whole, so long files keep their context)."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise MiniGPTError(located(path, "no such file"))
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise MiniGPTError(located(path, "not UTF-8 text (pass plain text files)", line=line)) from error
    return texts


def read_questions(path: str | Path) -> list[dict]:
    """Questions from a JSONL file, one {"question", "answer", "candidates", "language"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise MiniGPTError(located(path, "no such file"))
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise MiniGPTError(located(path, f"not JSON: {error.msg}", line=number)) from error
        for field in ("question", "answer"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise MiniGPTError(located(path, "missing or not a non-empty string", line=number, field=field))
        if not isinstance(item.get("candidates", []), list):
            raise MiniGPTError(located(path, "must be a list of strings", line=number, field="candidates"))
        questions.append(item)
    if not questions:
        raise MiniGPTError(located(path, "no questions in the file"))
    return questions


def prompt_replies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, chat: bool
) -> list[dict]:
    """The fixed prompt set: chat replies for a chat model (`chat`), plain continuations for a pretrained one."""
    settings = vars(sampling)
    replies = []
    for prompt in tqdm(PROMPTS, desc="prompts", unit="prompt"):
        if chat:
            reply = chat_reply(model, tokenizer, [{"role": "user", "content": prompt}], **settings)
        else:
            reply = complete_text(model, tokenizer, prompt, **settings)
        replies.append({"prompt": prompt, "reply": reply})
    return replies


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", nargs="+", default=[], metavar="FILE", help="UTF-8 text files for perplexity")
    parser.add_argument(
        "--max-length", type=int, default=None, help="window in tokens; if not given, the model's context length"
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="new tokens scored per window; if not given, half the window"
    )
    parser.add_argument(
        "--questions", default=None, metavar="FILE", help="JSONL questions instead of the built-in ones"
    )
    parser.add_argument("--no-qa", action="store_true", help="skip the question accuracy")
    parser.add_argument(
        "--world-seed",
        type=int,
        default=None,
        help="seed of the built-in world to ask about; if not given, the one the model's training_run.json records "
        "(the quick start's models record theirs), else 0",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="people in that world; if not given, as recorded, else build_world's default",
    )
    parser.add_argument("--qa-limit", type=at_least(0), default=200, help="ask at most this many questions (0 = all)")
    parser.add_argument("--no-prompts", action="store_true", help="skip the fixed prompt set")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    add_sampling_arguments(parser, Sampling(max_new_tokens=64, temperature=0.0))


def recorded_world(model_folder: str) -> dict[str, int]:
    """The built-in world the model's training_run.json records (`built_in_world`: seed and people; the quick start
    records it, and models trained from its models inherit it), or {} if it records none."""
    world = run_facts(model_folder).get("built_in_world")
    if world is not None and not (
        isinstance(world, dict) and all(isinstance(world.get(key), int) for key in ("seed", "size"))
    ):
        raise MiniGPTError(
            located(Path(model_folder) / RUN_FACTS_FILE, 'not {"seed": int, "size": int}', field="built_in_world")
        )
    return world or {}


def built_in_questions(seed: int | None, size: int | None, recorded: dict[str, int]) -> tuple[list[dict], str]:
    """The held-out questions of a built-in world, and which world that is: the seed and size given, else those the
    model's training run recorded (`recorded_world`), else seed 0 at build_world's default size. A quick start's
    world has 50 people (30 with --tiny), not the default 200: another world's questions would be about people the
    model never read of."""
    from .data.world import build_world

    seed = seed if seed is not None else recorded.get("seed", 0)
    size = size if size is not None else recorded.get("size")
    world = build_world(seed=seed) if size is None else build_world(seed=seed, size=size)
    people = sum(entity.kind == "person" for entity in world.entities)
    if not recorded:
        source = "the model's training_run.json records no world"
    elif (seed, people) == (recorded["seed"], recorded["size"]):
        source = "the world the model's training_run.json records"
    else:
        source = f"the model's training_run.json records seed {recorded['seed']}, {recorded['size']} people"
    return world.heldout_questions(), f"built-in world, seed {seed}, {people} people ({source})"


def run(args: argparse.Namespace, command: str) -> int:
    sampling = sampling_from_args(args)
    check_window(args.max_length, args.stride)  # before the model loads
    texts = read_texts(args.text)
    if not texts and args.no_qa and args.no_prompts:  # said before the model loads
        raise MiniGPTError(located(args.model, NOTHING_TO_EVALUATE.format(why="--no-qa")))
    questions = read_questions(args.questions) if args.questions else None
    world = recorded_world(args.adapter or args.model) if questions is None and not args.no_qa else {}
    model, tokenizer = load_model(args.model, args.adapter, args.device, need_chat_template=False)
    # A model `minigpt pretrain` wrote carries the chat template for the SFT to come, but has never seen a
    # conversation: like a model without a template, it continues the prompts as text and gets no questions.
    chat = bool(tokenizer.chat_template) and not only_pretrained(args.model, args.adapter)
    asks_questions = not args.no_qa and (questions is not None or chat)
    if not texts and not asks_questions and args.no_prompts:
        why = "a model that has not learnt to chat gets no built-in questions"
        raise MiniGPTError(located(args.model, NOTHING_TO_EVALUATE.format(why=why)))
    report: dict = {"model": args.model}
    if texts:
        report.update(perplexity(model, tokenizer, texts, args.stride, args.max_length))
    if asks_questions:
        if questions is None:
            questions, report["qa_questions"] = built_in_questions(args.world_seed, args.world_size, world)
        else:
            report["qa_questions"] = args.questions
        if 0 < args.qa_limit < len(questions):
            # Evenly spaced, so both languages and every kind of question stay in the sample.
            questions = [questions[i * len(questions) // args.qa_limit] for i in range(args.qa_limit)]
        qa = question_accuracy(model, tokenizer, questions)
        report.update(qa_accuracy=qa["accuracy"], qa_correct=qa["correct"], qa_total=qa["total"])
        report["qa_by_language"] = qa["by_language"]
        report["qa_results"] = qa["results"]
    if not args.no_prompts:
        report["prompts"] = prompt_replies(model, tokenizer, sampling, chat)
        report["prompts_as"] = "chat" if chat else "text"
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_report(report, len(texts))
    return 0


def _print_report(report: dict, files: int) -> None:
    if "perplexity" in report:
        print(
            f"perplexity     {report['perplexity']:.3f}   bits per byte {report['bits_per_byte']:.4f}   "
            f"({report['tokens']:,} tokens, {report['bytes']:,} bytes, {files} file(s), "
            f"window {report['max_length']}, stride {report['stride']})"
        )
    if "qa_accuracy" in report:
        languages = ", ".join(
            f"{lang} {c['accuracy']:.1%} ({c['correct']}/{c['total']})" for lang, c in report["qa_by_language"].items()
        )
        print(f"question acc.  {report['qa_accuracy']:.1%} ({report['qa_correct']}/{report['qa_total']}); {languages}")
        print(f"               questions: {report['qa_questions']}")
    for item in report.get("prompts", []):
        reply = item["reply"].replace("\n", "\n     ")
        if report["prompts_as"] == "chat":
            print(f"\n  Q: {item['prompt']}\n  A: {reply}")
        else:  # the continuation follows its prompt
            print(f"\n  > {item['prompt']}{reply}")
    sys.stdout.flush()
