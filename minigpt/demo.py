"""`minigpt demo`: a web chat with the model (Gradio ChatInterface), the same app an exported Space runs.

Replies stream token by token through `minigpt.chat.stream_reply`. The Stop button closes our generator; its
`finally:` sets the stop event, so the background `generate()` stops within a token instead of running on unseen.
Requests go through Gradio's queue with a concurrency limit, so a crowd of visitors waits in line instead of
starving the CPU. A message longer than the model can read is refused with a message above the textbox.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .chat import (
    Sampling,
    add_model_arguments,
    add_sampling_arguments,
    at_least,
    context_length,
    count_parameters,
    load_model,
    note_if_only_pretrained,
    port_number,
    sampling_from_args,
    stream_reply,
)
from .errors import MiniGPTError

if TYPE_CHECKING:
    import gradio as gr

EXAMPLES = [
    "Hello! Who are you?",
    "Tell me a story.",
    "What can a small language model learn?",
    "你好！你是谁？",
    "给我讲一个故事。",
    "小模型能学会什么？",
]


def model_facts(model: PreTrainedModel, model_name: str) -> dict:
    """What a visitor wants to know about the model: size, architecture, context."""
    config = model.config.get_text_config()
    return {
        "model": model_name,
        "parameters": count_parameters(model),
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": config.model_type,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "heads": getattr(config, "num_attention_heads", None),
        "context_length": context_length(model),
    }


def _facts_markdown(facts: dict) -> str:
    shape = ", ".join(
        f"{facts[key]} {label}"
        for key, label in (("layers", "layers"), ("hidden_size", "wide"), ("heads", "heads"))
        if facts[key]
    )
    context = f"{facts['context_length']:,} tokens" if facts["context_length"] else "unknown"
    return (
        f"**{facts['model']}**: {facts['parameters']:,} parameters · {facts['architecture']} "
        f"(`{facts['model_type']}`, {shape}) · context length {context}"
    )


def _text(content) -> str:
    """Message content as plain text: gradio_client sends a string, the browser a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(_text(part) for part in content)
    return ""


def build_demo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    sampling: Sampling | None = None,
    max_input_tokens: int | None = None,
    title: str = "MiniGPT",
) -> gr.Blocks:
    """The chat app: ChatInterface with a system prompt, sampling sliders, examples and the model's facts."""
    import gradio as gr  # here, not at the top: it takes seconds to import, and `minigpt demo --help` needs none of it

    sampling = sampling or Sampling()
    facts = model_facts(model, model_name)
    context = facts["context_length"] or 2048
    # Half the context for the message leaves the other half for the history and the reply.
    max_input_tokens = max_input_tokens or max(context // 2, 1)

    def too_long(message: str) -> str | None:
        count = len(tokenizer(message, add_special_tokens=False)["input_ids"])
        if count <= max_input_tokens:
            return None
        return (
            f"Your message is {count:,} tokens; this model reads at most {max_input_tokens:,} "
            f"(context length {context:,}). Please shorten it."
        )

    def validate(message) -> dict:
        # Runs before the message is queued, so the browser shows the refusal at once and the textbox stays usable.
        problem = too_long(_text(message))
        return gr.validate(problem is None, problem or "")

    def respond(
        message, history: list[dict], system: str, max_new_tokens, temperature, top_k, top_p, repetition_penalty
    ) -> Iterator[str]:
        text = _text(message)
        problem = too_long(text)
        if problem:  # API callers skip the validator; they get an error reply and the next call works
            raise gr.Error(problem)
        messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
        messages += [{"role": turn["role"], "content": _text(turn["content"])} for turn in history]
        messages.append({"role": "user", "content": text})
        settings = Sampling(
            int(max_new_tokens), float(temperature), int(top_k), float(top_p), float(repetition_penalty)
        )
        stop = threading.Event()
        reply = ""
        try:
            for piece in stream_reply(model, tokenizer, messages, settings, stop):
                reply += piece
                yield reply
        except MiniGPTError as error:  # the history no longer fits: say so instead of crashing the request
            raise gr.Error(str(error)) from error
        finally:
            stop.set()  # the Stop button closes this generator: stop generate() too

    additional_inputs = [
        gr.Textbox(label="System prompt", value="", lines=2),
        gr.Slider(1, context, value=min(sampling.max_new_tokens, context), step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=sampling.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0, 200, value=sampling.top_k, step=1, label="Top-k (0 = off)"),
        gr.Slider(0.05, 1.0, value=sampling.top_p, step=0.05, label="Top-p"),
        gr.Slider(1.0, 2.0, value=sampling.repetition_penalty, step=0.05, label="Repetition penalty"),
    ]
    return gr.ChatInterface(
        respond,
        title=title,
        description=_facts_markdown(facts),
        additional_inputs=additional_inputs,
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        examples=[[example] for example in EXAMPLES],
        cache_examples=False,
        validator=validate,
        api_name="chat",
        fill_height=True,
    )


def serve(
    model_name: str,
    adapter: str | None = None,
    device: str | None = None,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    concurrency: int = 4,
    max_queue: int = 64,
    sampling: Sampling | None = None,
    max_input_tokens: int | None = None,
    title: str = "MiniGPT",
) -> None:
    """Load the model and serve the demo until interrupted. host/port None: Gradio's environment variables decide
    (a Space sets GRADIO_SERVER_NAME=0.0.0.0), else 127.0.0.1:7860."""
    model, tokenizer = load_model(model_name, adapter, device)
    demo = build_demo(model, tokenizer, model_name, sampling, max_input_tokens, title)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.launch(server_name=host, server_port=port, share=share)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 makes the demo reachable by others"
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--concurrency", type=at_least(1), default=4, help="replies generated at the same time")
    parser.add_argument(
        "--max-queue", type=at_least(1), default=64, help="requests allowed to wait; more are turned away"
    )
    parser.add_argument(
        "--max-input-tokens",
        type=at_least(1),
        default=None,
        help="longest message in tokens; if not given, half the context",
    )
    parser.add_argument("--title", default="MiniGPT", help="title shown above the chat")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    note_if_only_pretrained(args.model, args.adapter)
    serve(
        args.model,
        args.adapter,
        args.device,
        args.host,
        args.port,
        args.share,
        args.concurrency,
        args.max_queue,
        sampling_from_args(args),
        args.max_input_tokens,
        args.title,
    )
    return 0
