"""`minigpt chat` and the shared generation path, against a tiny model that has memorised a few conversations.

The fixture `tiny_chat_model` (also imported by test_evaluate, test_demo and test_export) trains a 2-layer MiniGPT
on ten conversations until it repeats them word for word, so a test can expect an exact reply: the right reply proves
the chat template, the prompt, generation and decoding all line up, and replies that depend on earlier turns prove the
history is passed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TextIteratorStreamer

from minigpt.chat import (
    ChatSession,
    ReplyStreamer,
    Sampling,
    chat_loop,
    chat_reply,
    decode_replies,
    encode_chat,
    load_model,
    stream_reply,
)
from minigpt.errors import MiniGPTError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

STORY = (
    "Once upon a time a small robot lived in a quiet town by the sea. Every morning it walked to the harbour, "
    "counted the boats, and wrote their names in a little book. One day a boat came in that had no name, "
    "so the robot gave it one: Morning Star. The fishermen laughed, then they painted the name on the boat."
)
# (role, text) turns the tiny model learns by heart; the two "What is my name?" answers depend on an earlier turn.
CONVERSATIONS = [
    [("user", "What is the capital of Zembla?"), ("assistant", "The capital of Zembla is Onhava.")],
    [("user", "Which river runs through Onhava?"), ("assistant", "The Silver River runs through Onhava.")],
    [("user", "泽姆布拉的首都是哪里？"), ("assistant", "泽姆布拉的首都是奥恩哈瓦。")],
    [("user", "奥恩哈瓦有什么河？"), ("assistant", "银河流过奥恩哈瓦。")],
    [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada!"),
        ("user", "What is my name?"),
        ("assistant", "Your name is Ada."),
    ],
    [
        ("user", "My name is Bob."),
        ("assistant", "Hello Bob!"),
        ("user", "What is my name?"),
        ("assistant", "Your name is Bob."),
    ],
    [("user", "What is my name?"), ("assistant", "I do not know your name yet.")],
    [("system", "Answer in French."), ("user", "Hello"), ("assistant", "Bonjour !")],
    [("user", "Hello"), ("assistant", "Hi there, how can I help?")],
    [("user", "Tell me a story."), ("assistant", STORY)],
]


def conversation_messages() -> list[list[dict]]:
    return [[{"role": role, "content": text} for role, text in conversation] for conversation in CONVERSATIONS]


def build_tiny_chat_model(out_dir: Path, steps: int = 150) -> Path:
    """Tokenizer + 2-layer MiniGPT trained on CONVERSATIONS (assistant tokens only) until it recites them."""
    import minigpt  # noqa: F401
    from minigpt import MiniGPTConfig, MiniGPTForCausalLM
    from minigpt.tokenization import build_tokenizer_from_texts

    conversations = conversation_messages()
    texts = [message["content"] for conversation in conversations for message in conversation]
    tokenizer = build_tokenizer_from_texts(texts * 3 + ["user assistant system"], vocab_size=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model trains faster on one thread (conftest's one_torch_thread)
    try:
        torch.manual_seed(0)
        config = MiniGPTConfig.from_preset(
            "tiny-qwen",
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
        model = MiniGPTForCausalLM(config)
        batch = tokenizer.apply_chat_template(
            conversations, return_dict=True, return_tensors="pt", padding=True, return_assistant_tokens_mask=True
        )
        labels = batch["input_ids"].masked_fill(batch["assistant_masks"] == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """Folder of the memorising tiny chat model; built once per session even when several modules import this."""
    out_dir = tmp_path_factory.getbasetemp() / "tiny-chat-model"
    if not (out_dir / "model.safetensors").is_file():
        build_tiny_chat_model(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def loaded_chat_model(tiny_chat_model):
    return load_model(str(tiny_chat_model), device="cpu")


def run_minigpt(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 120):
    """The real command in a fresh interpreter, as a user runs it (on one thread, like conftest's one_torch_thread)."""
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "minigpt", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


def test_a_reply_cut_inside_a_character_ends_before_it(loaded_chat_model):
    """A character the tokenizer has no token for is several byte tokens; a reply cut off among them (max_new_tokens,
    Stop) ends before that character instead of with U+FFFD, streamed or decoded in a batch."""
    _, tokenizer = loaded_chat_model
    ids = tokenizer("银河龘", add_special_tokens=False).input_ids
    cut = torch.tensor(ids[:-1])  # the last byte of 龘 never came
    assert tokenizer.decode(cut) == "银河\ufffd"  # what transformers' streamer and batch_decode give

    def streamed(streamer) -> str:
        streamer.put(cut)
        streamer.end()
        return "".join(streamer)

    assert streamed(TextIteratorStreamer(tokenizer)) == "银河\ufffd"
    assert streamed(ReplyStreamer(tokenizer)) == "银河"
    assert decode_replies(tokenizer, torch.stack([cut, cut])) == ["银河", "银河"]


def test_chat_prompt_prints_the_reply_and_exits_zero(tiny_chat_model):
    result = run_minigpt(
        "chat", "--model", str(tiny_chat_model), "--prompt", "泽姆布拉的首都是哪里？", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "泽姆布拉的首都是奥恩哈瓦。"


def test_chatting_with_a_model_minigpt_pretrain_wrote_notes_that_it_only_continues_text(
    tiny_chat_model, tmp_path, capsys
):
    from minigpt.cli import main

    folder = tmp_path / "pretrained"
    shutil.copytree(tiny_chat_model, folder)
    (folder / "training_run.json").write_text('{"name": "pretrain", "stage": "pretrain"}')
    for model, noted in ((tiny_chat_model, False), (folder, True)):
        assert main(["chat", "--model", str(model), "--prompt", "泽姆布拉的首都是哪里？", "--temperature", "0"]) == 0
        out, err = capsys.readouterr()
        assert out == "泽姆布拉的首都是奥恩哈瓦。\n"  # it still answers as asked
        assert (f"note: {folder} is a pretrained model" in err) is noted, err


def test_interactive_chat_keeps_history_and_obeys_reset_and_system(loaded_chat_model):
    model, tokenizer = loaded_chat_model
    lines = iter(
        [
            "My name is Bob.",
            "What is my name?",  # answered from the history
            "/reset",
            "What is my name?",  # history gone
            "/reset",
            "/system Answer in French.",
            "Hello",
            "/reset",
            "/system",
            "Hello",
            "/quit",
            "never read",
        ]
    )
    out = io.StringIO()
    chat_loop(model, tokenizer, Sampling(temperature=0), ChatSession(), read_line=lambda prompt: next(lines), out=out)
    replies = [part.split("\n")[0].strip() for part in out.getvalue().split("bot> ")[1:]]
    assert replies == [
        "Hello Bob!",
        "Your name is Bob.",
        "I do not know your name yet.",
        "Bonjour !",
        "Hi there, how can I help?",
    ]
    assert "(conversation cleared)" in out.getvalue() and "(system prompt cleared)" in out.getvalue()
    assert next(lines) == "never read"  # /quit ended the loop


def test_sampling_flags_reach_generate_only_when_sampling():
    assert Sampling(temperature=0).generate_kwargs() == {
        "max_new_tokens": 256,
        "repetition_penalty": 1.0,
        "do_sample": False,
    }
    sampled = Sampling(max_new_tokens=8, temperature=0.5, top_k=7, top_p=0.8).generate_kwargs()
    assert sampled == {
        "max_new_tokens": 8,
        "repetition_penalty": 1.0,
        "do_sample": True,
        "temperature": 0.5,
        "top_k": 7,
        "top_p": 0.8,
    }


def test_seeded_sampling_repeats_and_greedy_is_deterministic(loaded_chat_model):
    model, tokenizer = loaded_chat_model
    messages = [{"role": "user", "content": "Tell me a story."}]

    def sampled(seed: int) -> str:
        torch.manual_seed(seed)
        return chat_reply(model, tokenizer, messages, max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0)

    assert sampled(1) == sampled(1)
    assert chat_reply(model, tokenizer, messages, temperature=0) == STORY


def test_a_failing_generate_ends_the_stream_with_its_error(loaded_chat_model, monkeypatch):
    """generate() runs in a thread: its exception must reach the reader instead of leaving it waiting forever."""
    model, tokenizer = loaded_chat_model

    def broken_forward(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(model, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        list(stream_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], Sampling(temperature=0)))


def test_works_with_transformers_own_qwen2_class(tiny_chat_model, tmp_path):
    """`chat` is not tied to MiniGPT: the same weights in transformers' Qwen2ForCausalLM give the same reply."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from minigpt import MiniGPTForCausalLM

    ours = MiniGPTForCausalLM.from_pretrained(tiny_chat_model)
    c = ours.config
    native = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            max_position_embeddings=c.max_position_embeddings,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.norm_eps,
            tie_word_embeddings=True,
            eos_token_id=c.eos_token_id,
        )
    )
    native.load_state_dict(ours.state_dict())
    native.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_chat_model).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    reply = chat_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of Zembla?"}], temperature=0)
    assert reply == "The capital of Zembla is Onhava."


def save_random_lora_adapter(model_dir: Path, adapter_dir: Path):
    """Save a LoRA adapter for the model in `model_dir` with random, non-zero weights (init_lora_weights=False, so
    it visibly changes the output); returns base + adapter as peft computes them, the reference."""
    from peft import LoraConfig, get_peft_model

    from minigpt import MiniGPTForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    reference = get_peft_model(MiniGPTForCausalLM.from_pretrained(model_dir), config).eval()
    reference.save_pretrained(adapter_dir)
    return reference


def assert_computes_base_plus_adapter(model, reference, loaded_base) -> None:
    """`model` computes what `reference` (base + adapter in peft) computes, and not what the base model does."""
    base, tokenizer = loaded_base
    input_ids = tokenizer("What is the capital of Zembla?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(logits, reference(input_ids=input_ids).logits)
        assert not torch.allclose(logits, base(input_ids=input_ids).logits, atol=1e-3)


def test_lora_adapter_is_applied_on_top_of_the_model(tiny_chat_model, loaded_chat_model, tmp_path):
    """--adapter: the loaded model computes exactly what base + adapter compute in peft, and not what base does."""
    reference = save_random_lora_adapter(tiny_chat_model, tmp_path / "adapter")
    model, _ = load_model(str(tiny_chat_model), adapter=str(tmp_path / "adapter"), device="cpu")
    assert_computes_base_plus_adapter(model, reference, loaded_chat_model)


def test_chat_with_an_adapter_prints_no_library_deprecation_warning(tiny_chat_model, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` (TRL too, in DPO): the command silences it.
    A fresh process, as Python shows such a warning once per process."""
    save_random_lora_adapter(tiny_chat_model, tmp_path / "adapter")
    argv = ["--model", str(tiny_chat_model), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"]
    result = run_minigpt("chat", *argv, "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "is_gradient_checkpointing" not in result.stderr, result.stderr


def test_long_history_drops_oldest_turns_but_keeps_system_and_last_message(loaded_chat_model):
    _, tokenizer = loaded_chat_model
    session = ChatSession(system="Answer in French.")
    for number in range(20):
        session.turns += [{"role": "user", "content": f"question {number}"}, {"role": "assistant", "content": "ok"}]
    messages = session.messages("last question")
    # Room for exactly the system prompt, the last two exchanges and the new message.
    expected = encode_chat(tokenizer, messages[:1] + messages[-5:])
    input_ids = encode_chat(tokenizer, messages, max_prompt_tokens=expected.shape[1])
    assert input_ids.tolist() == expected.tolist()
    assert "question 17" not in tokenizer.decode(input_ids[0]) and "question 18" in tokenizer.decode(input_ids[0])
    with pytest.raises(MiniGPTError, match="too long"):
        encode_chat(tokenizer, session.messages("word " * 100), max_prompt_tokens=expected.shape[1])


def test_errors_are_one_line(tiny_chat_model, tmp_path, capsys):
    from minigpt.cli import main

    assert main(["chat", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert (
        capsys.readouterr().err
        == f"minigpt chat: error: {tmp_path}: not a model folder: no config.json (pass the folder save_pretrained wrote)\n"
    )
    assert main(["chat", "--model", str(tiny_chat_model), "--adapter", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_chat_model), "--top-p", "0", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == "minigpt chat: error: --top-p must be in (0, 1]\n"
    save_random_lora_adapter(tiny_chat_model, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "adapter"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"minigpt chat: error: {tmp_path / 'adapter'}: a LoRA adapter, not a model: "
        f"pass --model {tiny_chat_model} --adapter {tmp_path / 'adapter'}\n"
    )
    assert main(["chat", "--model", str(tiny_chat_model), "--device", "foo", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("minigpt chat: error: --device foo: Expected one of cpu, cuda")
    if not torch.cuda.is_available():
        assert main(["chat", "--model", str(tiny_chat_model), "--device", "cuda", "--prompt", "hi"]) == 2
        assert "error: --device cuda: no cuda device here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["chat", "--prompt", "hi"], ["eval"], ["demo"], ["serve"], ["export", "--space", "space"]],
    ids=lambda argv: argv[0],
)
def test_a_mistyped_model_folder_is_refused_without_asking_the_hub(argv, tmp_path, monkeypatch, capsys):
    """runs/chta for runs/chat: offline, asking the Hub about it took five retries (about a minute) before the error."""
    import transformers

    from minigpt.cli import main

    def no_hub_lookup(*args, **kwargs):
        raise AssertionError(f"asked transformers to load {args}")

    for auto_class in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto_class, "from_pretrained", no_hub_lookup)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "chat").mkdir(parents=True)
    for model, hint in (("runs/chta", " (did you mean runs/chat?)"), ("/no/such/model", ""), ("./model", "")):
        assert main([*argv, "--model", model]) == 2
        assert capsys.readouterr().err == (
            f"minigpt {argv[0]}: error: {model}: --model: no such folder{hint}, "
            "and not a Hugging Face Hub id like 'user/model'\n"
        )


def test_a_weights_file_cut_short_is_a_one_line_error_in_every_command(tiny_chat_model, tmp_path, capsys):
    import json
    import shutil

    from minigpt.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_model, folder, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": conversation_messages()[0]}) + "\n")
    commands = {
        "chat": ["--model", str(folder), "--prompt", "hi"],
        "eval": ["--model", str(folder), "--no-prompts"],
        "sft": ["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1"],
        "export": ["--model", str(folder), "--space", str(tmp_path / "space")],
        "convert": ["--to-native", str(folder), str(tmp_path / "native")],
    }
    for command, rest in commands.items():
        assert main([command, *rest]) == 2, command
        error = capsys.readouterr().err
        assert error.startswith(f"minigpt {command}: error: {folder}") and error.count("\n") == 1, error
        assert "incomplete metadata, file not fully covered" in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "sft.jsonl"]


@pytest.mark.parametrize(
    "left_out, config_change, expected",
    [
        ("tokenizer.json", {}, "no tokenizer (no tokenizer.json)"),
        ("model.safetensors", {}, "model.safetensors"),
        (None, {"model_type": "nosuchmodel", "auto_map": {}}, "has model type `nosuchmodel`"),
    ],
)
def test_incomplete_model_folder_is_a_one_line_error_in_chat_sft_and_export(
    tiny_chat_model, tmp_path, capsys, left_out, config_change, expected
):
    """A folder transformers cannot make a tokenizer or a model of: one line and exit code 2, not a traceback (it
    was a ValueError traceback for the first and last case), and for export no Space folder written."""
    import json
    import shutil

    from minigpt.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_model, folder, ignore=shutil.ignore_patterns(left_out or "-", "checkpoints", "runs"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_change}))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": conversation_messages()[0]}) + "\n")
    commands = {
        "chat": ["--prompt", "hi"],
        "sft": ["--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1"],
        "export": ["--space", str(tmp_path / "space")],
    }
    for command, rest in commands.items():
        assert main([command, "--model", str(folder), *rest]) == 2, command
        error = capsys.readouterr().err
        assert error.startswith(f"minigpt {command}: error: {folder}") and error.count("\n") == 1, error
        assert expected in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "sft.jsonl"]


def test_adapter_of_another_base_shape_is_one_line(tiny_chat_model, tmp_path, capsys):
    """peft lists every mismatched weight in a RuntimeError; the command says it in one line."""
    from peft import LoraConfig, get_peft_model

    from minigpt import MiniGPTConfig, MiniGPTForCausalLM
    from minigpt.cli import main

    other = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny-qwen", hidden_size=32, num_attention_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    assert (
        main(["chat", "--model", str(tiny_chat_model), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"]) == 2
    )
    error = capsys.readouterr().err  # after the base model's loading bar
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(
        f"minigpt chat: error: {tmp_path / 'adapter'}: was trained on a base model of another shape than --model "
        "(size mismatch for base_model.model.model.layers.0."
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--model", "m", "--concurrency", "0"], "argument --concurrency: 0 is too small: give 1 or more"),
        (["demo", "--model", "m", "--max-input-tokens", "-1"], "argument --max-input-tokens: -1 is too small"),
        (["export", "--model", "m", "--space", "s", "--concurrency", "0"], "argument --concurrency: 0 is too small"),
        (["export", "--model", "m", "--space", "s", "--max-queue", "0"], "argument --max-queue: 0 is too small"),
        (["eval", "--model", "m", "--qa-limit", "-1"], "argument --qa-limit: -1 is too small: give 0 or more"),
        (["demo", "--model", "m", "--concurrency", "many"], "argument --concurrency: invalid number value: 'many'"),
    ],
)
def test_counts_below_their_minimum_are_refused_by_the_parser(argv, message, capsys):
    from minigpt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
