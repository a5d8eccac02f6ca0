"""`minigpt eval`: perplexity checked against a hand computation, question scoring, the --json report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_chat import loaded_chat_model, run_minigpt, tiny_chat_model  # noqa: F401  (shared fixtures)

from minigpt.chat import Sampling, chat_reply, complete_text, generate_replies, load_model
from minigpt.cli import main
from minigpt.data.world import build_world
from minigpt.evaluate import PROMPTS, perplexity, question_accuracy, reply_is_right

TEXT = "Once upon a time a small robot lived in a quiet town by the sea. 泽姆布拉的首都是奥恩哈瓦。 The end."
QUESTIONS = [
    {
        "question": "What is the capital of Zembla?",
        "answer": "Onhava",
        "candidates": ["Onhava", "Kinbote"],
        "language": "en",
    },
    {"question": "泽姆布拉的首都是哪里？", "answer": "奥恩哈瓦", "candidates": ["奥恩哈瓦", "北京"], "language": "zh"},
    # The model says "Silver River": naming another candidate is wrong.
    {
        "question": "Which river runs through Onhava?",
        "answer": "Golden",
        "candidates": ["Golden", "Silver"],
        "language": "en",
    },
]


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """What perplexity() scores: the text after one <|endoftext|> as its starting context."""
    return torch.tensor([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])


def test_perplexity_is_exp_of_mean_nll_computed_by_hand(loaded_chat_model):  # noqa: F811
    model, tokenizer = loaded_chat_model
    ids = token_ids(tokenizer, TEXT)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    mean_nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()

    result = perplexity(model, tokenizer, [TEXT], max_length=512)
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == len(TEXT.encode("utf-8"))
    assert result["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(mean_nll * (len(ids) - 1) / math.log(2) / result["bytes"], rel=1e-5)


def test_sliding_window_scores_each_token_once_with_the_window_before_it(loaded_chat_model, capsys):  # noqa: F811
    model, tokenizer = loaded_chat_model
    ids = token_ids(tokenizer, TEXT)
    window = 8
    # stride 1: after the first window, token t is predicted from exactly the window-1 tokens before it.
    by_hand = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t + 1 - window) : t]
            logits = model(input_ids=context[None]).logits[0, -1]
            by_hand -= torch.log_softmax(logits, dim=-1)[ids[t]].item()

    result = perplexity(model, tokenizer, [TEXT], stride=1, max_length=window)
    assert len(ids) > 4 * window  # several windows, not one
    assert result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(by_hand, rel=1e-5)
    progress = capsys.readouterr().err  # one long text gets a progress bar over its tokens
    assert "perplexity: 100%" in progress and "tok/s" in progress, progress


def test_reply_is_right_needs_the_answer_and_no_other_candidate():
    assert reply_is_right("The capital is Onhava.", "Onhava", ["Onhava", "Kinbote"])
    assert not reply_is_right("Onhava or Kinbote.", "Onhava", ["Onhava", "Kinbote"])
    assert not reply_is_right("It is Kinbote.", "Onhava", ["Onhava", "Kinbote"])
    assert reply_is_right("I counted a hundred boats.", "hundred", ["hundred", "red"])  # "red" is not a word here
    assert reply_is_right("They live in New York.", "New York", ["New York", "York"])  # part of the answer itself
    assert reply_is_right("泽姆布拉的首都是奥恩哈瓦。", "奥恩哈瓦", ["奥恩哈瓦", "北京"])
    assert not reply_is_right("是北京，不是奥恩哈瓦。", "奥恩哈瓦", ["奥恩哈瓦", "北京"])


def test_question_accuracy_overall_and_per_language(loaded_chat_model):  # noqa: F811
    model, tokenizer = loaded_chat_model
    result = question_accuracy(model, tokenizer, QUESTIONS)
    assert [item["reply"] for item in result["results"]] == [
        "The capital of Zembla is Onhava.",
        "泽姆布拉的首都是奥恩哈瓦。",
        "The Silver River runs through Onhava.",
    ]
    assert (result["correct"], result["total"]) == (2, 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["by_language"] == {
        "en": {"correct": 1, "total": 2, "accuracy": 0.5},
        "zh": {"correct": 1, "total": 1, "accuracy": 1.0},
    }


def test_batched_replies_equal_one_by_one_replies(loaded_chat_model):  # noqa: F811
    """question_accuracy answers a left-padded batch at once; padding must not change a single greedy token."""
    model, tokenizer = loaded_chat_model
    conversations = [
        [{"role": "user", "content": text}] for text in ("Hello", "Tell me a story.", "奥恩哈瓦有什么河？")
    ]
    batched = generate_replies(model, tokenizer, conversations, Sampling(max_new_tokens=40, temperature=0))
    assert batched == [chat_reply(model, tokenizer, c, max_new_tokens=40, temperature=0) for c in conversations]
    assert batched[0] == "Hi there, how can I help?" and batched[2] == "银河流过奥恩哈瓦。"


def test_eval_asks_the_built_in_worlds_heldout_questions(tiny_chat_model, capsys):  # noqa: F811
    args = ["eval", "--model", str(tiny_chat_model), "--qa-limit", "6", "--no-prompts", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["qa_total"] == 6 and set(report["qa_by_language"]) == {"en", "zh"}
    assert 0.0 <= report["qa_accuracy"] <= 1.0 and "perplexity" not in report  # no --text: no perplexity
    heldout = {item["question"] for item in build_world(seed=0).heldout_questions()}
    assert {item["question"] for item in report["qa_results"]} <= heldout
    assert report["qa_questions"] == (
        "built-in world, seed 0, 200 people (the model's training_run.json records no world)"
    )


def record_world(folder, world: dict) -> None:
    """What the quick start records: the built-in world in the model's training_run.json."""
    facts_file = folder / "training_run.json"
    facts = json.loads(facts_file.read_text(encoding="utf-8")) if facts_file.exists() else {}
    facts_file.write_text(json.dumps({**facts, "built_in_world": world}), encoding="utf-8")


def test_eval_asks_about_the_world_the_models_training_run_records(tiny_chat_model, tmp_path, capsys):  # noqa: F811
    """A quick start's model records its world (seed, people) in training_run.json: eval asks that world's questions
    unless --world-seed / --world-size say otherwise; a malformed record is a one-line error naming the file."""
    folder = tmp_path / "chat"
    shutil.copytree(tiny_chat_model, folder)
    record_world(folder, {"seed": 3, "size": 10})

    def questions_asked(*flags: str) -> tuple[set[str], str]:
        assert main(["eval", "--model", str(folder), "--qa-limit", "0", "--no-prompts", "--json", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        return {item["question"] for item in report["qa_results"]}, report["qa_questions"]

    asked, source = questions_asked()
    assert asked == {item["question"] for item in build_world(seed=3, size=10).heldout_questions()}
    assert source == "built-in world, seed 3, 10 people (the world the model's training_run.json records)"
    asked, source = questions_asked("--world-seed", "4")
    assert asked == {item["question"] for item in build_world(seed=4, size=10).heldout_questions()}
    assert source == "built-in world, seed 4, 10 people (the model's training_run.json records seed 3, 10 people)"

    record_world(folder, {"seed": "three"})
    assert main(["eval", "--model", str(folder), "--no-prompts"]) == 2
    assert capsys.readouterr().err == (
        f'minigpt eval: error: {folder / "training_run.json"}: field \'built_in_world\': not {{"seed": int, "size": int}}\n'
    )


def test_eval_json_is_reproducible_and_matches_the_library(tiny_chat_model, loaded_chat_model, tmp_path, capsys):  # noqa: F811
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 3, encoding="utf-8")
    questions_file = tmp_path / "questions.jsonl"
    questions_file.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    args = ["eval", "--model", str(tiny_chat_model), "--text", str(text_file), "--questions", str(questions_file)]
    args += ["--max-length", "32", "--stride", "8", "--max-new-tokens", "8", "--json"]

    result = run_minigpt(*args)  # the real command, in a fresh process
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["qa_accuracy"] == pytest.approx(2 / 3)
    model, tokenizer = loaded_chat_model
    expected = perplexity(model, tokenizer, [TEXT * 3], stride=8, max_length=32)
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)
    assert len(report["prompts"]) == 8 and all(isinstance(item["reply"], str) for item in report["prompts"])
    assert report["prompts_as"] == "chat"

    assert main(args) == 0  # and again in this process: the same numbers and replies
    assert json.loads(capsys.readouterr().out) == report


@pytest.mark.parametrize("pretrained_by", ["no chat template", "minigpt pretrain"])
def test_eval_of_a_pretrained_model_continues_the_prompts(tiny_chat_model, tmp_path, capsys, pretrained_by):  # noqa: F811
    """A pretrained model gets no question accuracy, and the prompts are continued as text. It is one without a chat
    template, or one `minigpt pretrain` wrote: that keeps the template for the SFT to come (training_run.json says)."""
    folder = tmp_path / "pretrained"
    shutil.copytree(tiny_chat_model, folder)
    if pretrained_by == "no chat template":
        (folder / "chat_template.jinja").unlink()
    else:
        (folder / "training_run.json").write_text(json.dumps({"name": "pretrain", "stage": "pretrain"}))
    assert main(["eval", "--model", str(folder), "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "qa_accuracy" not in report and [item["prompt"] for item in report["prompts"]] == PROMPTS
    assert report["prompts_as"] == "text"
    model, tokenizer = load_model(str(folder), device="cpu", need_chat_template=False)
    continued = [complete_text(model, tokenizer, prompt, max_new_tokens=4, temperature=0) for prompt in PROMPTS]
    assert [item["reply"] for item in report["prompts"]] == continued
    # Without the prompts such a model has nothing to be evaluated on: said, not an empty report.
    assert main(["eval", "--model", str(folder), "--no-prompts"]) == 2
    assert capsys.readouterr().err.endswith(
        f"minigpt eval: error: {folder}: nothing to evaluate (a model that has not learnt to chat gets no built-in "
        "questions, --no-prompts): give --text FILE or drop --no-prompts\n"
    )


def test_eval_bad_inputs_are_one_line_errors(tiny_chat_model, tmp_path, capsys):  # noqa: F811
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("first line\nsecond line caf\xe9\n".encode("latin-1"))
    assert main(["eval", "--model", str(tiny_chat_model), "--text", str(binary)]) == 2
    assert capsys.readouterr().err == f"minigpt eval: error: {binary}:2: not UTF-8 text (pass plain text files)\n"
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q?"}\n', encoding="utf-8")
    assert main(["eval", "--model", str(tiny_chat_model), "--questions", str(questions)]) == 2
    assert capsys.readouterr().err == (
        f"minigpt eval: error: {questions}:2: field 'answer': missing or not a non-empty string\n"
    )
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time.\n", encoding="utf-8")
    assert main(["eval", "--model", str(tiny_chat_model), "--text", str(text), "--stride", "-5"]) == 2
    assert capsys.readouterr().err == "minigpt eval: error: --stride must be at least 1 token, got -5\n"
    # 0 is refused as training refuses it, not read as "the default"
    assert main(["eval", "--model", str(tiny_chat_model), "--text", str(text), "--max-length", "0"]) == 2
    assert capsys.readouterr().err == "minigpt eval: error: --max-length: the window must be at least 2 tokens, got 0\n"
    # said before the model loads: a folder holding no model gets the same answer
    for model in (tiny_chat_model, tmp_path):
        assert main(["eval", "--model", str(model), "--no-qa", "--no-prompts"]) == 2
        assert "nothing to evaluate (--no-qa, --no-prompts)" in capsys.readouterr().err
