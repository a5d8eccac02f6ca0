"""`minigpt serve`: an OpenAI-compatible HTTP API for a model (what minimind's serve_openai_api.py offers), so the
`openai` client and chat front ends (Open WebUI, FastGPT, ...) can talk to it:

    minigpt serve --model out/chat                  # http://127.0.0.1:8000/v1, model name "chat"
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "chat", "messages": [{"role": "user", "content": "你好"}]}'

The server is transformers' own (`transformers serve`: /v1/chat/completions with streaming, /v1/completions,
/v1/models, /health). It loads only transformers' own classes (it looks the architecture's name up in the
`transformers` module, so it never runs a model's remote code), so a MiniGPT model is served as the native model its
config matches (`minigpt convert --to-native`: the same weights, the same logits), written with its tokenizer and
generation settings into a temporary folder that is deleted when the server stops. A LoRA adapter is merged first.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import MiniGPTError, located, require_model_source


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from .chat import add_model_arguments, port_number

    add_model_arguments(parser)
    parser.add_argument(
        "--name", default=None, help="the model name clients send and /v1/models lists; if not given, the folder's name"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 makes the API reachable by others"
    )
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="dtype to serve in (auto: as the weights were saved)",
    )


def write_servable_model(model_name: str, adapter: str | None, folder: Path) -> str:
    """Write `model_name` (with `adapter` merged) into `folder` as a model of one of transformers' own classes, with
    its tokenizer and its generation settings (stopping at the chat template's end-of-turn token); returns the class
    name. A MiniGPT becomes its native equivalent; a config without one is refused with the reason."""
    import transformers

    from .chat import Sampling, load_model
    from .configuration_minigpt import MiniGPTConfig
    from .convert import native_architecture, to_native
    from .modeling_minigpt import MiniGPTForCausalLM

    require_model_source(model_name)
    try:  # a config without a native class is refused before any weight is read
        config = transformers.AutoConfig.from_pretrained(model_name, trust_remote_code=True)
        if isinstance(config, MiniGPTConfig):
            native_architecture(config)
    except (OSError, ValueError):
        pass  # load_model says what is wrong with the folder, the Hub id or the config
    except MiniGPTError as error:
        raise MiniGPTError(located(model_name, f"cannot be served by transformers' server: {error}")) from None
    model, tokenizer = load_model(model_name, adapter, device="cpu", need_chat_template=False, dtype="auto")
    if adapter is not None:
        model = model.merge_and_unload()
    if isinstance(model, MiniGPTForCausalLM):
        model = to_native(model)
    if not model.generation_config.do_sample:
        # The server sets a request's temperature and top_p on the model's generation config but samples only if
        # that config says do_sample: without this, every reply would be greedy whatever the request asks.
        # Requests that give no temperature are sampled as `minigpt chat` samples; temperature 0 is greedy.
        sampling = Sampling().generate_kwargs()
        del sampling["max_new_tokens"]  # the server's own default (1024) or the request's max_tokens
        model.generation_config.update(**sampling)
    class_name = type(model).__name__
    if getattr(transformers, class_name, None) is not type(model):
        raise MiniGPTError(
            located(model_name, f"{class_name} is not one of transformers' classes, the only ones its server loads")
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return class_name


def _check_port_free(host: str, port: int) -> None:
    """Fail now, in one line, rather than after loading the model, when something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((host, port))
        except OSError as error:
            raise MiniGPTError(
                f"{host}:{port}: cannot listen there ({error.strerror}); choose another --port"
            ) from None


def _run_server(command: list[str], cwd: Path) -> int:
    """Run the server until it exits, or until Ctrl-C / SIGTERM, which it is given time to shut down on."""
    server = subprocess.Popen(command, cwd=cwd)
    stopping = False

    def forward_terminate(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        server.terminate()

    previous = signal.signal(signal.SIGTERM, forward_terminate)
    try:
        try:
            code = server.wait()
        except KeyboardInterrupt:  # Ctrl-C in a terminal reaches the server as well: let it shut down
            stopping = True
            try:
                code = server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.terminate()
                code = server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.kill()
            server.wait()
    return 0 if stopping else code


def run(args: argparse.Namespace, command: str) -> int:
    from transformers.utils.import_utils import is_serve_available

    from .chat import check_device

    if not is_serve_available():
        raise MiniGPTError(
            "transformers' server needs FastAPI, Uvicorn and openai: pip install 'transformers[serving]'"
        )
    name = args.name or Path(args.model.rstrip("/")).name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise MiniGPTError(f"--name {name!r}: give a relative name such as 'chat' or 'you/minigpt-chat'")
    _check_port_free(args.host, args.port)
    if args.device:
        check_device(args.device)
    with tempfile.TemporaryDirectory(prefix="minigpt-serve-") as workdir:
        print(f"minigpt serve: preparing {args.model}{f' with {args.adapter}' if args.adapter else ''} ...")
        class_name = write_servable_model(args.model, args.adapter, Path(workdir) / name)
        chat = (Path(workdir) / name / "chat_template.jinja").is_file()
        if not chat:
            print("minigpt serve: the tokenizer has no chat template, so only /v1/completions (plain text) answers")
        url = f"http://{args.host}:{args.port}/v1"
        endpoints = "POST /chat/completions, /completions" if chat else "POST /completions"
        print(
            f"minigpt serve: {args.model} as {class_name}, model name '{name}', OpenAI API at {url} "
            f"({endpoints}; GET /models); Ctrl-C stops"
        )
        # The server resolves the model name as a path from its working folder: clients send the short name.
        server = [sys.executable, "-m", "transformers.cli.transformers", "serve", name]
        server += ["--host", args.host, "--port", str(args.port), "--dtype", args.dtype]
        server += ["--device", args.device or "auto"]
        return _run_server(server, cwd=Path(workdir))
