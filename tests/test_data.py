"""Readers on the real files, bad input, packing, SFT masks, and the preference form TRL's DPOTrainer takes."""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minigpt.data import (
    IGNORE_INDEX,
    SFTCollator,
    add_data_arguments,
    load_examples,
    load_records,
    pack_pretraining,
    prepare_preference,
    tokenize_sft,
)
from minigpt.errors import MiniGPTError
from minigpt.tokenization import build_tokenizer_from_texts


@pytest.fixture
def read(tmp_path: Path):
    """load_records with a private cache folder."""

    def read(paths, kind: str, **options):
        return load_records(paths, kind, cache_dir=tmp_path / "cache", **options)

    return read


@pytest.fixture(scope="module")
def tokenizer(shared_data: Path):
    stories = (shared_data / "pretrain/tinystories_train_first2MiB.txt").read_text(encoding="utf-8")[:200_000]
    identity = (shared_data / "minimind/lora_identity.jsonl").read_text(encoding="utf-8")
    return build_tokenizer_from_texts([stories, identity], vocab_size=1000)


def _paragraph_count(text: str) -> int:
    """Runs of non-blank lines, counted independently of the reader."""
    return sum(1 for blank, _ in itertools.groupby(text.splitlines(), key=lambda line: not line.strip()) if not blank)


# --- each reader on the real files ---------------------------------------------------------------------------------


def _expected_count(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    if path.name == "tinystories_train_first2MiB.txt":
        return text.count("<|endoftext|>") + 1  # stories between separators; the last one is cut but present
    if path.suffix == ".txt":
        return _paragraph_count(text)
    if path.suffix == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    return len(json.loads(text))


@pytest.mark.parametrize(
    "relative_path, kind, text_field, detected_format",
    [
        ("sft/rasbt_instruction-data_en_alpaca.json", "sft", None, "alpaca"),
        ("dpo/llamafactory_dpo_zh_demo.json", "preference", None, "sharegpt-dpo"),
        ("dpo/rasbt_instruction-data-with-preference_en.json", "preference", None, "alpaca-dpo"),
        ("minimind/lora_identity.jsonl", "sft", None, "minimind"),
        ("minimind/pretrain_hq_sample.jsonl", "pretrain", None, "json-text"),
        ("pretrain/xiyouji_zh.txt", "pretrain", None, "text"),
        ("pretrain/tinystories_train_first2MiB.txt", "pretrain", None, "text"),
        ("pretrain/tinyshakespeare_input.txt", "pretrain", None, "text"),
        ("pretrain/songci_ci.song.0.json", "pretrain", "paragraphs", "json-text"),
    ],
)
def test_reader_record_count_equals_the_files(
    read, shared_data: Path, capsys, relative_path, kind, text_field, detected_format
):
    path = shared_data / relative_path
    records = read(path, kind, text_field=text_field)
    expected = _expected_count(path)
    assert len(records) == expected
    assert capsys.readouterr().out == f"read {expected:,} {kind} records from 1 file ({expected:,} {detected_format})\n"


def test_alpaca_records_become_user_and_assistant_turns(read, shared_data: Path):
    path = shared_data / "sft/rasbt_instruction-data_en_alpaca.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    expected = [
        [
            {"role": "user", "content": f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in raw
    ]
    assert read(path, "sft")["messages"] == expected
    assert sum(1 for r in raw if not r["input"]) > 100  # both branches are exercised


def test_sharegpt_preference_records_become_prompt_chosen_rejected(read, shared_data: Path):
    path = shared_data / "dpo/llamafactory_dpo_zh_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    records = read(path, "preference")
    assert records["prompt"] == [
        [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]] for r in raw
    ]
    assert records["chosen"] == [[{"role": "assistant", "content": r["chosen"]["value"]}] for r in raw]
    assert records["rejected"] == [[{"role": "assistant", "content": r["rejected"]["value"]}] for r in raw]


def test_preference_file_read_for_sft_is_prompt_plus_chosen_reply(read, shared_data: Path):
    path = shared_data / "dpo/rasbt_instruction-data-with-preference_en.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    messages = read(path, "sft")["messages"]
    assert len(messages) == len(raw)
    assert [m[-1]["content"] for m in messages] == [r["chosen"] for r in raw]


def test_format_flag_overrides_detection(read, shared_data: Path):
    # Detected as alpaca-dpo; forced to plain alpaca, the reply is the record's `output` field.
    path = shared_data / "dpo/rasbt_instruction-data-with-preference_en.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert [m[-1]["content"] for m in read(path, "sft", format="alpaca")["messages"]] == [r["output"] for r in raw]


def test_minimind_text_keeps_its_literal_chat_markup(read, shared_data: Path):
    path = shared_data / "minimind/pretrain_hq_sample.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert read(path, "pretrain")["text"] == [json.loads(line)["text"] for line in lines]


def test_text_files_split_on_endoftext_else_on_blank_lines(read, shared_data: Path):
    stories_path = shared_data / "pretrain/tinystories_train_first2MiB.txt"
    stories = read(stories_path, "pretrain")["text"]
    text = stories_path.read_text(encoding="utf-8")
    assert stories == [story.strip("\n") for story in text.split("<|endoftext|>")]
    assert any("\n\n" in story for story in stories)  # a blank line inside a story does not split it
    chapters = read(shared_data / "pretrain/xiyouji_zh.txt", "pretrain")["text"]
    assert chapters[:3] == ["第一回 灵根育孕源流出\u3000心性修持大道生", "诗曰：", chapters[2]]
    assert chapters[2].startswith("混沌未分天地乱，茫茫渺渺无人见。\n自从盘古破鸿蒙")


def test_folder_is_read_recursively_with_each_files_format(read, shared_data: Path, capsys):
    folder = shared_data / "pretrain"
    records = read(folder, "pretrain", text_field="paragraphs")
    expected = sum(_expected_count(path) for path in folder.iterdir())
    assert len(records) == expected
    assert f"read {expected:,} pretrain records from 4 files" in capsys.readouterr().out


def test_parquet_and_jsonl_copies_read_the_same_as_the_json_array(read, shared_data: Path, tmp_path: Path):
    raw = json.loads((shared_data / "sft/rasbt_instruction-data_en_alpaca.json").read_text(encoding="utf-8"))
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "alpaca.parquet", row_group_size=300)
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
    from_json = read(shared_data / "sft/rasbt_instruction-data_en_alpaca.json", "sft")["messages"]
    assert read(tmp_path / "alpaca.parquet", "sft")["messages"] == from_json
    assert read(tmp_path / "alpaca.jsonl", "sft")["messages"] == from_json


def test_mixing_kinds_is_a_clear_error(read, shared_data: Path):
    # The minimind folder holds an SFT file and a pretraining file.
    # The error names the file (and its first record) that is not of the kind asked for.
    pattern = r"pretrain_hq_sample\.jsonl:1: the data is in format 'json-text' \(pretrain data\), but sft needs conv"
    with pytest.raises(MiniGPTError, match=pattern):
        read(shared_data / "minimind", "sft")


SMALL_FORMATS = {
    "openai": (
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        "sft",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
    ),
    "sharegpt": (
        {"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "sft",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
    ),
    "alpaca": (
        {"instruction": "I", "input": "", "output": "O", "system": "S", "history": [["q1", "a1"]]},
        "sft",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "I"},
                {"role": "assistant", "content": "O"},
            ]
        },
    ),
    "minimind-dpo": (
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
        },
        "preference",
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ),
    "trl": (
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        "preference",
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ),
    "alpaca-dpo": (
        {"instruction": "I", "input": "x", "chosen": "good", "rejected": "bad"},
        "preference",
        {
            "prompt": [{"role": "user", "content": "I\nx"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ),
}


@pytest.mark.parametrize("format_name", SMALL_FORMATS)
def test_formats_without_a_shared_file_are_detected_and_converted(read, tmp_path: Path, capsys, format_name: str):
    record, kind, expected = SMALL_FORMATS[format_name]
    path = tmp_path / f"{format_name}.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    records = read(path, kind)
    assert records.to_list() == [expected, expected]
    assert f"(2 {format_name})" in capsys.readouterr().out


def test_cache_is_not_served_after_the_file_changes(read, tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n')
    assert read(path, "pretrain")["text"] == ["one"]
    assert read(path, "pretrain")["text"] == ["one"]  # from the cache
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read(path, "pretrain")["text"] == ["one", "two"]
    # An edit of the same size, with the modification time set back (`touch -r`, `cp -p`, `rsync -t`)
    stat = path.stat()
    path.write_text('{"text": "one"}\n{"text": "six"}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read(path, "pretrain")["text"] == ["one", "six"]


def test_a_byte_order_mark_and_windows_line_ends_are_not_text(read, tmp_path: Path):
    """Notepad's UTF-8 files start with a byte order mark and end lines with CRLF: the mark began the first document
    (the tokenizer learnt it as a token) and every line end inside a document kept its \\r."""
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line\r\nsecond line\r\n\r\nNext document\r\n".encode())
    assert read(path, "pretrain")["text"] == ["First line\nsecond line", "Next document"]


def test_folders_leave_out_hidden_files_and_readme(read, tmp_path: Path, capsys):
    """A folder's .ipynb_checkpoints copy was read as data too (every record twice), .git's files and a dataset
    card (README.md) were trained on, and macOS's ._ files stopped the run."""
    folder = tmp_path / "data"
    for name in ("train.jsonl", ".ipynb_checkpoints/train-checkpoint.jsonl", "sub/more.jsonl"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps({"text": name}) + "\n")
    (folder / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (folder / "README.md").write_text("# My dataset\n\nA card.\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "description.md").write_text("Unnamed repository\n")
    assert sorted(read(folder, "pretrain")["text"]) == ["sub/more.jsonl", "train.jsonl"]
    (folder / "more.csv").write_text("text\nnot read\n")
    (folder / "sub" / "big.jsonl.gz").write_bytes(b"\x1f\x8b")
    capsys.readouterr()
    read(folder, "pretrain", verbose=True)
    assert capsys.readouterr().out.endswith(
        "left out 2 files of other types in the data folders (.csv, .gz): minigpt reads .txt, .text, .md, .jsonl, "
        ".json, .parquet\n"
    )
    # a file given twice, or a folder and a file in it, is read once
    both = [folder, folder / "train.jsonl", folder / "sub" / ".." / "train.jsonl"]
    assert sorted(read(both, "pretrain")["text"]) == ["sub/more.jsonl", "train.jsonl"]


# --- bad input -----------------------------------------------------------------------------------------------------

GOOD_TURNS = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
BAD_INPUTS = {
    "malformed JSON": (
        f'{GOOD_TURNS}\n{{"conversations": [}}\n'.encode(),
        ".jsonl",
        "bad.jsonl:2: malformed JSON: Expecting value (column 20)",
    ),
    "missing field": (
        f'{GOOD_TURNS}\n{GOOD_TURNS}\n{{"conversations": [{{"role": "user"}}]}}\n'.encode(),
        ".jsonl",
        "bad.jsonl:3: field 'conversations[0].content': missing",
    ),
    "unknown role": (
        b'{"conversations": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}\n',
        ".jsonl",
        "bad.jsonl:1: field 'conversations[0].role': unknown role 'tool' (expected one of system, user, assistant)",
    ),
    "empty file": (b"", ".jsonl", "bad.jsonl: file is empty"),
    "blank file": (b"\n  \n", ".jsonl", "bad.jsonl: file is empty"),
    "non-UTF-8 line": (
        f'{GOOD_TURNS}\n{{"conversations": "caf\xe9"}}\n'.encode("latin-1"),
        ".jsonl",
        "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 23)",
    ),
    "non-UTF-8 in a JSON array": (
        f'[\n  {GOOD_TURNS},\n  {{"conversations": "caf\xe9"}}\n]\n'.encode("latin-1"),
        ".json",
        "bad.json:3: not valid UTF-8 (byte 0xe9 at column 25)",
    ),
    "non-UTF-8 in plain text": (b"fine\n\ncaf\xe9\n", ".txt", "bad.txt:3: not valid UTF-8 (byte 0xe9 at column 4)"),
    "no assistant turn": (
        f'{GOOD_TURNS}\n{{"conversations": [{{"role": "user", "content": "hi"}}]}}\n'.encode(),
        ".jsonl",
        "bad.jsonl:2: field 'conversations': conversation has no assistant turn",
    ),
    "sharegpt role": (
        b'[{"conversations": [{"from": "observation", "value": "x"}, {"from": "gpt", "value": "y"}]}]',
        ".json",
        "bad.json:1: field 'conversations[0].from': unknown role 'observation' (expected one of assistant, gpt, human, system, user)",
    ),
    "record not an object": (b'[{"text": "a"}, "b"]', ".json", "bad.json:1: expected a JSON object, got str"),
    # `cat a.json b.json`: the second array's records were dropped without a word
    "two JSON arrays": (
        b'[{"text": "a"}]\n[{"text": "b"}]\n',
        ".json",
        "bad.json:2: malformed JSON: more after the array's closing ']'",
    ),
    # read as text with a NUL after every character, and a tokenizer trained on it learnt NUL tokens
    "UTF-16 text": (
        "First line\n\nSecond\n".encode("utf-16"),
        ".txt",
        "bad.txt:1: UTF-16 text (it starts with a UTF-16 byte order mark): save it as UTF-8",
    ),
    "UTF-16 without a byte order mark": (
        "First line\n".encode("utf-16-le"),
        ".txt",
        "bad.txt:1: NUL bytes: UTF-16 or binary, not UTF-8 text (save it as UTF-8)",
    ),
    "empty reply": (
        f'{GOOD_TURNS}\n{{"conversations": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": " "}}]}}\n'.encode(),
        ".jsonl",
        "bad.jsonl:2: field 'conversations[1].content': assistant reply is empty",
    ),
    "empty alpaca output": (
        b'[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "input": "", "output": ""}]',
        ".json",
        "bad.json:2: field 'output': assistant reply is empty",
    ),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_input_stops_with_one_line_naming_file_line_and_problem(read, tmp_path: Path, problem: str):
    content, suffix, message = BAD_INPUTS[problem]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    kind = "pretrain" if suffix == ".txt" or b'"text"' in content else "sft"
    with pytest.raises(MiniGPTError) as error:
        read(path, kind)
    assert str(error.value) == f"{tmp_path}/{message}"


def test_skip_invalid_skips_bad_records_and_counts_them_by_reason(read, tmp_path: Path, capsys):
    lines = [
        GOOD_TURNS,
        '{"conversations": [',
        '{"conversations": [{"role": "user"}]}',
        '{"conversations": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        '{"conversations": [{"role": "user", "content": "only a question"}]}',
        '{"conversations": [{"role": "user", "content": "no reply"}]}',
        GOOD_TURNS.replace("hello", "hello again"),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"conversations": "\xff"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    records = read([path, tmp_path / "empty.jsonl"], "sft", skip_invalid=True)
    assert [m[-1]["content"] for m in records["messages"]] == ["hello", "hello again"]
    output = capsys.readouterr().out.splitlines()
    assert output[0] == "read 2 sft records from 2 files (2 minimind)"
    assert output[1] == (
        f"skipped 7 invalid records: 2 no assistant turn (first: {path}:5: field 'conversations': conversation has "
        f"no assistant turn); 1 malformed JSON (first: {path}:2: malformed JSON: Expecting value (column 20)); "
        f"1 missing field (first: {path}:3: field 'conversations[0].content': missing); "
        f"1 unknown role (first: {path}:4: field 'conversations[0].role': unknown role 'tool' (expected one of "
        f"system, user, assistant)); 1 not UTF-8 (first: {path}:8: not valid UTF-8 (byte 0xff at column 20)); "
        f"1 empty file (first: {tmp_path}/empty.jsonl)"
    )


# --- pretraining examples ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(shared_data: Path, tmp_path_factory):
    path = shared_data / "pretrain/tinystories_train_first2MiB.txt"
    return load_records(path, "pretrain", cache_dir=tmp_path_factory.mktemp("cache"), verbose=False)


@pytest.fixture(scope="module")
def token_stream(stories, tokenizer) -> list[int]:
    """Each story's tokens followed by EOS, computed independently of the packer."""
    ids = tokenizer(list(stories["text"]), add_special_tokens=False)["input_ids"]
    return [token for story in ids for token in [*story, tokenizer.eos_token_id]]


def test_packing_makes_full_blocks_with_eos_between_documents_and_loses_no_token(
    stories, tokenizer, token_stream, capsys
):
    blocks = pack_pretraining(stories, tokenizer, block_size=256)
    stream = token_stream
    assert len(stories) > 2000  # more than one batch of 1,000 documents: the carry between batches is exercised
    assert {len(ids) for ids in blocks["input_ids"]} == {256}
    assert blocks["labels"] == blocks["input_ids"]
    packed = [token for ids in blocks["input_ids"] for token in ids]
    dropped = len(stream) - len(packed)
    assert packed == stream[: len(packed)] and 0 <= dropped < 256  # in order, nothing lost or repeated
    assert packed.count(tokenizer.eos_token_id) == stream[: len(packed)].count(tokenizer.eos_token_id)
    assert stream.count(tokenizer.eos_token_id) == len(stories)
    assert capsys.readouterr().out.endswith(
        f"packed {len(stream):,} tokens from {len(stories):,} documents into {len(blocks):,} blocks of 256 "
        f"(stride 256); {dropped:,} tokens at the end did not fill a block\n"
    )


def test_stride_gives_the_books_sliding_windows(stories, tokenizer, token_stream):
    windows = pack_pretraining(stories, tokenizer, block_size=128, stride=48)["input_ids"]
    stream = token_stream
    assert len(windows) == (len(stream) - 128) // 48 + 1
    assert all(window == stream[i * 48 : i * 48 + 128] for i, window in enumerate(windows))


def test_packing_more_than_the_data_holds_is_a_user_error(tokenizer):
    from datasets import Dataset

    with pytest.raises(MiniGPTError, match="fewer tokens than one block of 4096"):
        pack_pretraining(Dataset.from_dict({"text": ["a short text"]}), tokenizer, block_size=4096)


# --- SFT examples --------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are MiniGPT, made by the MiniGPT team."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am MiniGPT."},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是 MiniGPT，一个小模型。"},
    {"role": "user", "content": "And once more?"},
    {"role": "assistant", "content": " Still MiniGPT. "},
]


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    runs = itertools.groupby(labels, key=lambda label: label != IGNORE_INDEX)
    return [list(run) for labelled, run in runs if labelled]


def test_sft_labels_are_exactly_the_assistant_replies_each_with_im_end(tokenizer):
    from datasets import Dataset

    example = tokenize_sft(Dataset.from_dict({"messages": [CONVERSATION]}), tokenizer, max_length=512)[0]
    replies = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in _labelled_runs(example["labels"])] == replies
    unlabelled = [i for i, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    assert tokenizer.decode(unlabelled) == (
        "<|im_start|>system\nYou are MiniGPT, made by the MiniGPT team.<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd once more?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(example["input_ids"], example["labels"]))
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_sft_labels_decode_to_the_replies_on_every_real_conversation(read, shared_data: Path, tokenizer):
    for relative_path in ("minimind/lora_identity.jsonl", "sft/rasbt_instruction-data_en_alpaca.json"):
        records = read(shared_data / relative_path, "sft")
        examples = tokenize_sft(records, tokenizer, max_length=100_000)
        assert len(examples) == len(records)
        for messages, labels in zip(records["messages"], examples["labels"]):
            replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
            assert [tokenizer.decode(run) for run in _labelled_runs(labels)] == replies


def test_sft_truncation_keeps_whole_assistant_turns_or_drops_the_example(tokenizer, capsys):
    from datasets import Dataset

    mask = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)[
        "assistant_masks"
    ]
    turn_ends = [end for end, (inside, after) in enumerate(itertools.pairwise([*mask, 0]), 1) if inside and not after]
    tiny = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    dataset = Dataset.from_dict({"messages": [CONVERSATION, CONVERSATION[:3], tiny]})

    cut = tokenize_sft(dataset, tokenizer, max_length=turn_ends[1] + 3)  # the third reply would be cut: end at the 2nd
    assert len(cut[0]["input_ids"]) == turn_ends[1]
    assert [tokenizer.decode(run) for run in _labelled_runs(cut[0]["labels"])] == [
        "I am MiniGPT.<|im_end|>",
        "我是 MiniGPT，一个小模型。<|im_end|>",
    ]
    assert len(cut) == 3 and capsys.readouterr().out == ""

    kept = tokenize_sft(dataset, tokenizer, max_length=turn_ends[0] - 1)  # not even the first reply fits
    assert [tokenizer.decode(run) for run in _labelled_runs(kept[0]["labels"])] == ["Yo<|im_end|>"]
    assert capsys.readouterr().out == (
        f"dropped 2 of 3 conversations whose first assistant reply ends past {turn_ends[0] - 1} tokens\n"
    )
    with pytest.raises(MiniGPTError, match="no conversation has an assistant reply within 5 tokens"):
        tokenize_sft(dataset, tokenizer, max_length=5)


def test_sft_needs_a_template_with_a_generation_block(tokenizer):
    from datasets import Dataset

    plain_chatml = tokenizer.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, chat_template=plain_chatml)
    with pytest.raises(MiniGPTError, match=r"chat template has no \{% generation %\} block"):
        tokenize_sft(Dataset.from_dict({"messages": [CONVERSATION]}), tokenizer, max_length=512)


def test_sft_collator_pads_ids_with_pad_mask_with_0_and_labels_with_minus_100(tokenizer):
    from datasets import Dataset

    examples = tokenize_sft(Dataset.from_dict({"messages": [CONVERSATION, CONVERSATION[:3]]}), tokenizer, 512)
    batch = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(list(examples))
    long, short = (len(ids) for ids in examples["input_ids"])
    width = -(-long // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][1].tolist() == examples[1]["input_ids"] + [tokenizer.pad_token_id] * (width - short)
    assert batch["labels"][1].tolist() == examples[1]["labels"] + [IGNORE_INDEX] * (width - short)
    assert batch["attention_mask"].sum(dim=1).tolist() == [long, short]


# --- preference pairs ----------------------------------------------------------------------------------------------


def test_preference_pairs_train_a_step_with_trls_dpo_trainer(read, shared_data: Path, tokenizer, tmp_path: Path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs = read(shared_data / "dpo/rasbt_instruction-data-with-preference_en.json", "preference").select(range(8))
    pairs = prepare_preference(pairs, tokenizer, max_length=256)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model, reference = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    arguments = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4, max_length=256,
        use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
    )  # fmt: skip
    trainer = DPOTrainer(model, reference, args=arguments, train_dataset=pairs, processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(first["chosen_ids"]) == pairs[0]["chosen"][0]["content"] + "<|im_end|>\n"
    assert trainer.train().training_loss == pytest.approx(0.6931, abs=1e-3)  # log(2): policy == reference


def test_preference_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(read, shared_data, tokenizer, capsys):
    pairs = read(shared_data / "dpo/llamafactory_dpo_zh_demo.json", "preference")
    prompt_lengths = [
        len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])
        for prompt in pairs["prompt"]
    ]
    capsys.readouterr()
    kept = prepare_preference(pairs, tokenizer, max_length=1024)
    too_long = sum(length >= 1024 for length in prompt_lengths)
    assert 0 < too_long < len(pairs) and len(kept) <= len(pairs) - too_long
    assert capsys.readouterr().out.startswith(
        f"dropped {too_long:,} of {len(pairs):,} preference pairs whose prompt fills max length 1024\n"
    )
    with pytest.raises(MiniGPTError, match="every preference prompt is at least 8 tokens long"):
        prepare_preference(pairs, tokenizer, max_length=8)


def test_preference_pairs_cut_by_max_length_are_counted_and_left_out_when_the_cut_replies_are_the_same(
    read, shared_data, tokenizer, tmp_path, capsys
):
    """TRL keeps the start of prompt + reply within max_length: at 64 tokens most replies of the rasbt pairs were cut
    without a word, and 177 pairs were left with the same chosen and rejected tokens (no gradient, and a DPO loss
    of log 2 diluting the rest). Checked here against the tokens TRL's DPOTrainer itself makes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs = read(shared_data / "dpo/rasbt_instruction-data-with-preference_en.json", "preference").select(range(200))
    capsys.readouterr()
    kept = prepare_preference(pairs, tokenizer, max_length=64)
    report = capsys.readouterr().out
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    arguments = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_length=64, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", activation_checkpointing=False,
    )  # fmt: skip
    model, reference = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
    trainer = DPOTrainer(model, reference, args=arguments, train_dataset=kept, processing_class=tokenizer)
    trl_pairs = trainer.train_dataset
    cut = same_after_cut = 0
    for pair in trl_pairs:
        room = 64 - len(pair["prompt_ids"])
        cut += len(pair["chosen_ids"]) > room or len(pair["rejected_ids"]) > room
        same_after_cut += pair["chosen_ids"][:room] == pair["rejected_ids"][:room]
    assert same_after_cut == 0 and cut > 0
    left_out = int(report.split("left out ")[1].split(" of")[0])
    assert left_out > 0 and f"cut the replies of {cut:,} of {len(kept):,} preference pairs to max length 64" in report


def test_preference_pairs_with_the_same_reply_twice_are_left_out_and_counted(read, shared_data, tokenizer, capsys):
    path = shared_data / "dpo/rasbt_instruction-data-with-preference_en.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    same = sum(record["chosen"] == record["rejected"] for record in raw)
    pairs = read(path, "preference")
    assert same > 0 and len(pairs) == len(raw)  # read as they are (as SFT data, the chosen reply is fine)
    capsys.readouterr()
    kept = prepare_preference(pairs, tokenizer, max_length=1024)
    assert len(kept) == len(raw) - same
    assert all(pair["chosen"] != pair["rejected"] for pair in kept)
    assert capsys.readouterr().out == (
        f"left out {same:,} of {len(raw):,} preference pairs whose chosen and rejected replies are the same\n"
    )
    with pytest.raises(MiniGPTError, match="every preference pair has the same chosen and rejected reply"):
        prepare_preference(pairs.filter(lambda pair: pair["chosen"] == pair["rejected"]), tokenizer, max_length=1024)


# --- the flags, defined once for every stage -----------------------------------------------------------------------


def test_data_flags_build_each_stages_examples(shared_data: Path, tokenizer, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "cache")
    stages = {
        "pretrain": ["--data", str(shared_data / "minimind/pretrain_hq_sample.jsonl"), "--block-size", "64"],
        "sft": ["--data", str(shared_data / "minimind/lora_identity.jsonl"), "--max-length", "1024"],
        "preference": ["--data", str(shared_data / "dpo/llamafactory_dpo_zh_demo.json"), "--max-length", "4096"],
    }
    built = {}
    for kind, argv in stages.items():
        parser = argparse.ArgumentParser()
        add_data_arguments(parser, kind)
        built[kind] = load_examples(parser.parse_args(argv), tokenizer, kind, context_length=4096)
    assert {len(ids) for ids in built["pretrain"]["input_ids"]} == {64}
    assert len(built["sft"]) == 91 and max(len(ids) for ids in built["sft"]["input_ids"]) <= 1024
    assert built["preference"].column_names == ["prompt", "chosen", "rejected"]
    with pytest.raises(MiniGPTError, match="--block-size 64 is longer than the model's context length 32"):
        parser = argparse.ArgumentParser()
        add_data_arguments(parser, "pretrain")
        load_examples(parser.parse_args(stages["pretrain"]), tokenizer, "pretrain", context_length=32)
