"""`minigpt serve`: transformers' OpenAI-compatible server in front of a MiniGPT model, driven by the real `openai`
client as chat front ends drive it. The tiny chat model recites its training conversations, so every reply is known
word for word, and MiniGPT's own greedy generate() (minigpt.chat) gives the same replies as the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from test_chat import (  # noqa: F401
    CONVERSATIONS,
    PROJECT_ROOT,
    STORY,
    assert_computes_base_plus_adapter,
    loaded_chat_model,
    save_random_lora_adapter,
    tiny_chat_model,
)
from test_demo import free_port, stop_server

from minigpt.chat import chat_reply, complete_text
from minigpt.cli import main

openai = pytest.importorskip("openai", reason="the openai client comes with transformers[serving] (minigpt[serve])")

NAME = "tiny-chat"
MAX_TOKENS = 256  # the story is the longest reply, about 100 tokens


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):  # noqa: F811
    """`minigpt serve` in a fresh process; yields (process, client, its temporary folder, log path)."""
    workdir = tmp_path_factory.mktemp("serve")
    temporary = workdir / "tmp"  # TMPDIR of the server: where its converted copy of the model lives
    temporary.mkdir()
    log_path = workdir / "server.log"
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    command = [sys.executable, "-m", "minigpt", "serve", "--model", str(tiny_chat_model), "--name", NAME]
    command += ["--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            raise AssertionError(f"minigpt serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_server(process)
                raise AssertionError(f"no answer within 240 s:\n{log_path.read_text()}") from None
            time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    yield process, client, temporary, log_path
    stop_server(process)


def conversation_request(conversation: list[tuple[str, str]]) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text."""
    *before, (role, answer) = conversation
    assert role == "assistant"
    return [{"role": role, "content": text} for role, text in before], answer


def test_the_served_model_is_the_native_copy_under_the_given_name(server):
    _, client, temporary, log_path = server
    assert [model.id for model in client.models.list()] == [NAME]
    assert "model name 'tiny-chat', OpenAI API at http://127.0.0.1:" in log_path.read_text()
    assert "(POST /chat/completions, /completions; GET /models)" in log_path.read_text()
    (copy,) = temporary.glob(f"minigpt-serve-*/{NAME}")
    config = json.loads((copy / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # no remote code: transformers' own class
    generation = json.loads((copy / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2  # <|endoftext|> and the chat template's <|im_end|>


def test_chat_completions_are_the_models_own_greedy_replies(server, loaded_chat_model):  # noqa: F811
    """Every memorised conversation, multi-turn and system prompt included, in English and Chinese."""
    _, client, _, _ = server
    model, tokenizer = loaded_chat_model
    for conversation in CONVERSATIONS:
        messages, answer = conversation_request(conversation)
        response = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        choice = response.choices[0]
        reference = chat_reply(model, tokenizer, messages, max_new_tokens=MAX_TOKENS, temperature=0)
        assert choice.message.content == reference == answer, messages
        assert choice.finish_reason == "stop"  # ended at <|im_end|>, not at max_tokens


def test_streamed_reply_arrives_in_pieces_and_adds_up_to_the_reply(server):
    _, client, _, _ = server
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    pieces = [choice.delta.content for choice in chunks if choice.delta.content]
    assert len(pieces) > 20
    assert "".join(pieces) == STORY
    assert chunks[-1].finish_reason == "stop"


def test_temperature_samples_and_a_seed_repeats_the_sample(server):
    """The served model samples when a request asks for a temperature (transformers' server samples only if the
    model's generation config says do_sample), and a request's seed makes the sample repeatable."""
    _, client, _, _ = server
    messages = [{"role": "user", "content": "Good evening, who are you?"}]  # not a memorised question

    def reply(**sampling) -> str:
        response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, **sampling)
        return response.choices[0].message.content

    greedy = reply(temperature=0)
    samples = [reply(temperature=2.0, top_p=1.0, seed=seed) for seed in range(4)]
    assert len(set(samples)) >= 2 and any(sample != greedy for sample in samples), (greedy, samples)
    assert reply(temperature=2.0, top_p=1.0, seed=2) == samples[2]
    assert reply(temperature=0) == greedy


def test_text_completion_continues_the_prompt_as_the_model_does(server, loaded_chat_model):  # noqa: F811
    _, client, _, _ = server
    model, tokenizer = loaded_chat_model
    prompt = "Once upon a time a small robot"
    response = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12)
    assert response.choices[0].text == complete_text(model, tokenizer, prompt, max_new_tokens=12, temperature=0)


def test_sigterm_stops_the_server_and_deletes_the_copy(server):
    process, _, temporary, log_path = server
    process.terminate()
    assert process.wait(timeout=30) == 0, log_path.read_text()
    assert list(temporary.iterdir()) == []
    assert "Shutting down" in log_path.read_text()  # the server shut down cleanly, not killed


def test_unservable_config_and_busy_port_are_refused_in_one_line(tmp_path, tiny_chat_model, capsys):  # noqa: F811
    from minigpt import MiniGPTConfig, MiniGPTForCausalLM

    model_dir = tmp_path / "layernorm-rope"  # no native class has LayerNorm with RoPE
    MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny-gpt2", position_embedding_type="rope")).save_pretrained(
        model_dir
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).write_bytes((tiny_chat_model / name).read_bytes())
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["serve", "--model", str(model_dir), "--port", str(free_port())]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "cannot be served" in error and "norm_type" in error

    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tiny_chat_model), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"minigpt serve: error: 127.0.0.1:{port}: cannot listen there (Address already in use); choose another --port"
    )
    with pytest.raises(SystemExit):  # argparse's own usage error, as for any malformed flag
        main(["serve", "--model", str(tiny_chat_model), "--port", "70000"])
    assert "argument --port: 70000 is not a port: give 1-65535" in capsys.readouterr().err


def test_adapter_is_merged_into_the_served_copy(tiny_chat_model, loaded_chat_model, tmp_path):  # noqa: F811
    """--adapter: the copy the server loads (transformers' own class, no peft) computes what base + adapter compute."""
    from transformers import Qwen2ForCausalLM

    from minigpt.serve import write_servable_model

    reference = save_random_lora_adapter(tiny_chat_model, tmp_path / "adapter")
    class_name = write_servable_model(str(tiny_chat_model), str(tmp_path / "adapter"), tmp_path / "served")
    assert class_name == "Qwen2ForCausalLM"
    served = Qwen2ForCausalLM.from_pretrained(tmp_path / "served").eval()
    assert_computes_base_plus_adapter(served, reference, loaded_chat_model)
