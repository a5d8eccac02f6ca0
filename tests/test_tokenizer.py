"""The tokenizer: exact round trips, the Han rule, special tokens, the chat template, saving, and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from minigpt.cli import main
from minigpt.data import load_records
from minigpt.errors import MiniGPTError
from minigpt.tokenization import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer_from_texts,
    save_tokenizer,
    train_tokenizer,
)

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

EDGE_CASES = {
    "empty": "",
    "one space": " ",
    "emoji": "I ❤️ 🤖! 👩‍👩‍👧‍👦 family, 🇨🇳 flag, 👍🏽 skin tone",
    "tabs and newlines": "\tindented\n\n\t\tdeeper\r\nwindows line\rcarriage\n",
    "mixed scripts": "Hello 世界, こんにちは, 안녕하세요, Привет, مرحبا, שלום, नमस्ते, 𠀀 (CJK ext B)",
    "code": 'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # {braces} [1, 2] <tag/>\n',
    "spaces": "  leading, trailing  ,  double  spaces   ",
    "unicode that NFKC would change": "ﬁ ① Ｆｕｌｌ　ｗｉｄｔｈ e\u0301 \u00a0nbsp ½",
    "special token text": "a<|endoftext|>b<|im_start|>user\nhi<|im_end|>\n<|pad|>",
    "control characters": "nul\x00 bell\x07 esc\x1b del\x7f replacement \ufffd",
}


@pytest.fixture(scope="module")
def shared_texts(shared_data: Path) -> dict[str, str]:
    return {
        "zh": (shared_data / "pretrain/xiyouji_zh.txt").read_text(encoding="utf-8"),
        "en": (shared_data / "pretrain/tinystories_train_first2MiB.txt").read_text(encoding="utf-8"),
    }


@pytest.fixture(scope="module")
def tokenizer(shared_texts: dict[str, str]):
    # 200 kB of each language in 2 kB documents: enough for a 2,000-token vocabulary in about a second.
    texts = [text[start : start + 2000] for text in shared_texts.values() for start in range(0, 200_000, 2000)]
    return build_tokenizer_from_texts(texts, vocab_size=2000)


def test_decode_encode_round_trips_every_shared_text_file(tokenizer, shared_data: Path):
    files = sorted(path for path in shared_data.rglob("*") if path.is_file())
    assert len(files) >= 11
    texts = [path.read_text(encoding="utf-8") for path in files]
    # One batch: the files are encoded in parallel, each as a whole.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids)
    assert [path for path, text, back in zip(files, texts, decoded) if back != text] == []


@pytest.mark.parametrize("name", EDGE_CASES)
def test_decode_encode_round_trips_edge_cases(tokenizer, name: str):
    text = EDGE_CASES[name]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert (ids == []) == (text == "")


def test_special_tokens_have_fixed_ids_and_roles(tokenizer):
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3]
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|endoftext|>",) * 2 + ("<|pad|>",)
    # Written in text, a special token is one token, never spelled out in pieces.
    assert tokenizer("x<|im_end|>y", add_special_tokens=False)["input_ids"][1:2] == [2]
    assert tokenizer.decode(tokenizer("hi<|im_end|>")["input_ids"], skip_special_tokens=True) == "hi"


def test_no_token_holds_a_han_character_together_with_anything_else(tokenizer, shared_texts):
    # The Han pre-tokenizer rule: a token is either one whole Han character, or text with no Han character in it.
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    han_tokens = 0
    for token_id, token in enumerate(vocabulary):
        text = tokenizer.decode([token_id])
        if HAN.search(text):
            han_tokens += 1
            assert len(text) == 1, (token, text)
    assert han_tokens > 500  # the vocabulary did learn Chinese characters whole
    ids = tokenizer(shared_texts["zh"][:5000], add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert all(len(piece) == 1 for piece in pieces if HAN.search(piece))


def test_special_token_text_in_the_corpus_is_not_learned_as_merges(shared_data: Path):
    # minimind's pretraining text contains "<|im_start|>" literally; the trainer must not spend merges spelling it.
    texts = load_records(shared_data / "minimind/pretrain_hq_sample.jsonl", "pretrain", verbose=False)["text"]
    assert all("<|im_start|>" in text for text in texts)
    tokenizer = build_tokenizer_from_texts(texts, vocab_size=600, min_frequency=1)
    learned = [tokenizer.decode([i]) for i in range(len(SPECIAL_TOKENS), len(tokenizer))]
    assert not [token for token in learned if "im_" in token or "<|" in token or "|>" in token]
    assert len(tokenizer) > 400  # it did learn merges, just not those


def test_vocab_size_below_bytes_plus_specials_is_a_user_error():
    with pytest.raises(MiniGPTError, match="vocab size 100 is too small: .* at least 261"):
        build_tokenizer_from_texts(["some text"], vocab_size=100)


def test_saved_tokenizer_reloads_with_autotokenizer_without_remote_code(tokenizer, tmp_path: Path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok", trust_remote_code=False)
    text = EDGE_CASES["mixed scripts"] + EDGE_CASES["code"]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert (reloaded.eos_token_id, reloaded.pad_token_id, len(reloaded)) == (0, 3, len(tokenizer))


def test_chat_template_renders_minimind_conversations_as_chatml(tokenizer, shared_data: Path):
    conversations = load_records(shared_data / "minimind/lora_identity.jsonl", "sft", verbose=False)["messages"]
    system = [{"role": "system", "content": "You are MiniGPT."}]
    for messages in (conversations[0], system + conversations[1]):
        expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(conversations[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{conversations[0][0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_tokens_mask_covers_each_reply_and_its_im_end(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "孙悟空是谁？"},
        {"role": "assistant", "content": "齐天大圣。"},
        {"role": "user", "content": "And in English?"},
        {"role": "assistant", "content": " The Monkey King."},
    ]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "齐天大圣。<|im_end|> The Monkey King.<|im_end|>"
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n孙悟空是谁？<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd in English?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_train_tokenizer_command_saves_a_tokenizer_and_reports_vocab_time_and_held_out_bytes_per_token(
    shared_data: Path, tmp_path: Path, capfd
):
    data = [
        str(shared_data / "pretrain/xiyouji_zh.txt"),
        str(shared_data / "sft/rasbt_instruction-data_en_alpaca.json"),
    ]
    exit_code = main(["train-tokenizer", "--data", *data, "--vocab-size", "3000", "--out", str(tmp_path / "tok")])
    output = capfd.readouterr().out  # file-descriptor level: the Rust trainer writes there directly
    assert exit_code == 0
    assert output.startswith("vocabulary: 3,000 tokens (asked for 3,000)\n")  # no blank lines of hidden progress bars
    assert re.search(r"trained on [\d.]+ MB in [\d.]+ s", output)
    bytes_per_token = float(re.search(r"held-out slice .*: ([\d.]+) bytes/token", output).group(1))
    assert 1.5 < bytes_per_token < 6
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    # The SFT file's role names are in the training text, so the template scaffolding is one token per word.
    assert len(tokenizer("<|im_start|>assistant\n")["input_ids"]) == 3


@pytest.mark.parametrize("corpus", ["pretrain/xiyouji_zh.txt", "pretrain/tinystories_train_first2MiB.txt"])
def test_a_tokenizer_trained_on_plain_text_has_one_token_per_chat_role_header(shared_data: Path, corpus: str):
    # Neither corpus holds the words "user" or "assistant": without the headers trained in, the Chinese
    # novel spells "assistant" in nine tokens and the English stories in three.
    tokenizer = train_tokenizer([shared_data / corpus], 6400, verbose=False)
    for role in ("system", "user", "assistant"):
        assert len(tokenizer(f"<|im_start|>{role}\n")["input_ids"]) == 3, role


def test_train_tokenizer_command_reports_a_bad_line_in_one_line_and_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    exit_code = main(["train-tokenizer", "--data", str(bad), "--out", str(tmp_path / "tok")])
    assert exit_code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"minigpt train-tokenizer: error: {bad}:2: malformed JSON: Unterminated string starting at (column 10)"
    ]
    assert not (tmp_path / "tok").exists()


def test_train_tokenizer_refuses_an_out_that_is_a_file_or_a_model_before_training(tmp_path: Path, capsys, monkeypatch):
    from minigpt import tokenization

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(tokenization, "build_tokenizer_from_texts", no_training)
    text = tmp_path / "text.txt"
    text.write_text("hello world\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("the model's own")
    refusals = [(text, "--out: a file, not a folder"), (model, "holds a model (config.json)")]
    if Path("/sys/kernel").is_dir():  # Linux: sysfs takes no new file, not even from root (whom chmod does not stop)
        refusals.append((Path("/sys/kernel/tokenizer"), "--out: cannot write there (Permission denied)"))
    for out, message in refusals:
        assert main(["train-tokenizer", "--data", str(text), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"minigpt train-tokenizer: error: {out}: {message}")
    assert (model / "tokenizer.json").read_text() == "the model's own"


def test_work_run_interruptibly_ends_on_ctrl_c_at_once_and_hands_back_its_errors():
    """The BPE merges run in Rust and return only when done: in the main thread, Ctrl-C waited for them (a 28 MB
    corpus with a 60,000 vocabulary: stopped after 123 s instead of 25 s). In a worker thread the main thread acts on
    it at once; `work` here is a 30 s call that releases the GIL, as the merges do."""
    import signal
    import threading
    import time

    from minigpt.tokenization import run_interruptibly

    timer = threading.Timer(0.5, signal.raise_signal, args=(signal.SIGINT,))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(lambda: time.sleep(30))
    assert time.monotonic() - started < 5

    def read_a_bad_record() -> None:
        raise MiniGPTError("a bad record")

    with pytest.raises(MiniGPTError, match="a bad record"):
        run_interruptibly(read_a_bad_record)
