"""`minigpt demo`: the real server in a subprocess, driven by headless Chromium and by 16 gradio_client users."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_chat import PROJECT_ROOT, STORY, loaded_chat_model, tiny_chat_model  # noqa: F401

from minigpt.chat import chat_reply, count_parameters
from minigpt.demo import build_demo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_INPUT_TOKENS = 50
MAX_NEW_TOKENS = 96
# What gradio_client sends after the message: system prompt, max new tokens, temperature, top-k, top-p, rep. penalty.
GREEDY = ("", MAX_NEW_TOKENS, 0.0, 50, 0.9, 1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], cwd: Path, log_path: Path, env: dict | None = None, python: str = sys.executable):
    """Start a Gradio app, wait until it answers HTTP, return (process, url). Used for the Space test too."""
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    environment["GRADIO_SERVER_PORT"] = str(port)
    log = open(log_path, "w")  # noqa: SIM115  (closed with the process by stop_server)
    command = [python, *args] if "demo" not in args else [python, *args, "--port", str(port)]
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return process, url
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise AssertionError(f"server did not answer within 240 s:\n{log_path.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def story_reply(loaded_chat_model) -> str:  # noqa: F811
    """The greedy reply the server should give to "Tell me a story." with the demo's settings."""
    model, tokenizer = loaded_chat_model
    reply = chat_reply(
        model,
        tokenizer,
        [{"role": "user", "content": "Tell me a story."}],
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=0,
    )
    assert len(reply) > 100 and STORY.startswith(reply)
    return reply


@pytest.fixture(scope="module")
def facts_line(loaded_chat_model) -> str:  # noqa: F811
    return f"{count_parameters(loaded_chat_model[0]):,} parameters · MiniGPTForCausalLM"


@pytest.fixture(scope="module")
def demo_server(tiny_chat_model, tmp_path_factory):  # noqa: F811
    log_path = tmp_path_factory.mktemp("demo") / "server.log"
    args = ["-m", "minigpt", "demo", "--model", str(tiny_chat_model), "--concurrency", "8"]
    args += ["--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0"]
    process, url = start_server(args, PROJECT_ROOT, log_path, env={"PYTHONPATH": str(PROJECT_ROOT)})
    yield process, url, log_path
    stop_server(process)


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on `port`, from the kernel's table."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_demo_listens_on_loopback_only_by_default(demo_server):
    _, url, log_path = demo_server
    assert listening_addresses(int(url.rsplit(":", 1)[1].strip("/"))) == {"127.0.0.1"}
    assert f"Running on local URL:  {url.rstrip('/')}" in log_path.read_text()


@pytest.mark.browser
def test_browser_sees_the_reply_stream_in(demo_server, story_reply, facts_line, artifacts_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium")
    _, url, _ = demo_server
    with playwright.sync_playwright() as driver, tempfile.TemporaryDirectory() as profile:
        browser = driver.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")  # "networkidle" never comes: Gradio keeps a stream open
            textbox = page.locator('textarea[data-testid="textbox"]')
            textbox.wait_for(timeout=60_000)
            page_text = page.locator("body").inner_text()
            assert facts_line in page_text and "context length 512 tokens" in page_text
            # Record every text the reply shows while it streams in.
            page.evaluate(
                """() => { window.seen = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll('[data-testid="bot"]');
                    if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
                }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
            )
            textbox.fill("Tell me a story.")
            page.locator('button[data-testid="submit-button"]').click()
            bot = page.locator('[data-testid="bot"]').last
            bot.wait_for(timeout=60_000)
            final, unchanged_since = None, time.monotonic()
            while time.monotonic() - unchanged_since < 1.5:  # done when the text stops changing
                text = bot.inner_text()
                if text != final:
                    final, unchanged_since = text, time.monotonic()
                time.sleep(0.1)
            page.screenshot(path=str(artifacts_dir / "demo-streamed-reply.png"), full_page=True)
            partial = {text.strip() for text in page.evaluate("window.seen") if text.strip()} - {final.strip()}
            assert final.strip() == story_reply
            assert len(partial) >= 2, "the reply appeared at once instead of streaming"
            assert all(final.strip().startswith(text) for text in partial)

            textbox.fill("word " * (MAX_INPUT_TOKENS + 10))
            page.locator('button[data-testid="submit-button"]').click()
            refusal = page.locator("div.validation-error")
            refusal.wait_for(timeout=30_000)
            assert f"this model reads at most {MAX_INPUT_TOKENS}" in refusal.inner_text()
            page.screenshot(path=str(artifacts_dir / "demo-over-long-input.png"), full_page=True)
            assert page.locator('[data-testid="bot"]').count() == 1  # nothing was sent to the model
        finally:
            browser.close()


def test_sixteen_concurrent_clients_each_get_the_whole_reply(demo_server, story_reply):
    from gradio_client import Client

    process, url, _ = demo_server

    def one_user(_: int) -> str:
        return Client(url, verbose=False).predict("Tell me a story.", *GREEDY, api_name="/chat")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(one_user, range(16)))
    elapsed = time.monotonic() - started
    assert [reply.strip() for reply in replies] == [story_reply] * 16, f"after {elapsed:.1f} s"
    assert process.poll() is None  # still serving
    assert Client(url, verbose=False).predict("Hello", *GREEDY, api_name="/chat").strip() == "Hi there, how can I help?"
    print(f"16 concurrent clients served in {elapsed:.1f} s")


def test_api_over_long_message_gets_an_error_and_the_next_request_works(demo_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    _, url, _ = demo_server
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=f"this model reads at most {MAX_INPUT_TOKENS}"):
        client.predict("word " * (MAX_INPUT_TOKENS + 10), *GREEDY, api_name="/chat")
    assert client.predict("Hello", *GREEDY, api_name="/chat").strip() == "Hi there, how can I help?"


def test_stop_ends_generation_in_the_background_thread(loaded_chat_model):  # noqa: F811
    """The Stop button closes the reply generator; generate() must stop too instead of running on unseen."""
    from minigpt import MiniGPTConfig, MiniGPTForCausalLM

    _, tokenizer = loaded_chat_model
    torch.manual_seed(0)
    # Untrained and without an end-of-turn token: left alone it would generate all 4000 tokens.
    config = MiniGPTConfig.from_preset("tiny-qwen", vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = MiniGPTForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    forward_calls = []
    model.register_forward_hook(lambda *args: forward_calls.append(1))
    respond = build_demo(model, tokenizer, "untrained").fn

    reply = respond("Tell me a story.", [], "", 4000, 0.0, 50, 0.9, 1.0)
    texts = [next(reply) for _ in range(5)]
    assert len(set(texts)) == 5  # streaming: each yield is longer
    reply.close()  # what the Stop button does
    calls_at_stop = len(forward_calls)
    time.sleep(0.5)
    assert len(forward_calls) == calls_at_stop < 50
    assert not [thread for thread in threading.enumerate() if thread.name == "minigpt-generate"]


def test_model_facts_and_history_from_the_browser_format(loaded_chat_model, facts_line):  # noqa: F811
    """The browser sends history content as typed parts; the reply must be the same as with plain strings."""
    model, tokenizer = loaded_chat_model
    demo = build_demo(model, tokenizer, "tiny")
    assert facts_line in demo.description and "context length 512 tokens" in demo.description
    history = [
        {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada!"}]},
    ]
    *_, reply = demo.fn("What is my name?", history, "", 32, 0.0, 50, 0.9, 1.0)
    assert reply.strip() == "Your name is Ada."


def test_demo_help_does_not_import_gradio() -> None:
    """`minigpt demo --help` builds its parser without gradio, which alone takes seconds to import."""
    code = "import sys; from minigpt import cli; cli.command_parser('demo'); print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False", result.stdout
