"""`minigpt chat`: talk to a model in the terminal, and the one generation path that chat, demo and eval share.

Everything that turns messages into a reply lives here, once: loading a model (any causal LM with a chat template,
ours or from the Hub), applying the chat template, fitting the conversation into the context window, choosing the
`generate()` arguments (sampling flags only when sampling), and streaming text from a background thread with a stop
switch. `minigpt.demo` and `minigpt.evaluate` import these functions instead of keeping their own copies.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .errors import MiniGPTError, first_line, located, one_line_errors, require_model_folder, require_model_source
from .model_card import trained_stage
from .tokenization import require_tokenizer

# Tokens that end an assistant turn in common chat templates; a model whose generation config names only
# `<|endoftext|>` would otherwise talk on past its turn (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

CHAT_HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone clears it), /quit"
)


@dataclass
class Sampling:
    """How to pick the next token. temperature 0 means greedy decoding (reproducible)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        """`generate()` arguments; temperature/top-k/top-p only when sampling, or transformers warns they are ignored."""
        kwargs: dict = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.temperature > 0:
            kwargs.update(
                do_sample=True, temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p)
            )
        else:
            kwargs["do_sample"] = False
        return kwargs


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: Sampling | None = None) -> None:
    """The sampling flags, identical for chat, demo and eval."""
    defaults = defaults or Sampling()
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest reply, in tokens")
    group.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (reproducible)")
    group.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="sample from the k most likely tokens (0 = all)"
    )
    group.add_argument(
        "--top-p", type=float, default=defaults.top_p, help="nucleus sampling: smallest set with this mass"
    )
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1.0 = off")
    group.add_argument("--seed", type=int, default=None, help="seed the sampler for reproducible sampled replies")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """Check the sampling flags (a user mistake is a one-line error, not a traceback from generate())."""
    checks = [
        ("--max-new-tokens", args.max_new_tokens >= 1, "must be at least 1"),
        ("--temperature", args.temperature >= 0, "must be 0 (greedy) or more"),
        ("--top-k", args.top_k >= 0, "must be 0 or more"),
        ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1]"),
        ("--repetition-penalty", args.repetition_penalty > 0, "must be above 0"),
    ]
    for flag, ok, message in checks:
        if not ok:
            raise MiniGPTError(f"{flag} {message}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)


def port_number(text: str) -> int:
    """argparse type of --port: a TCP port a server can listen on."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give 1-65535")
    return port


def at_least(minimum: int):
    """argparse type of a whole-number flag with a smallest sensible value (--concurrency 0 wrote a Space that never
    answers)."""

    def parse(text: str) -> int:
        number = int(text)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{number} is too small: give {minimum} or more")
        return number

    parse.__name__ = "number"  # argparse's message for a non-number: "invalid number value: 'x'"
    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained layout) or Hugging Face Hub id")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (peft) to apply on top of --model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps; if not given, cuda when available")


def check_device(device: str) -> None:
    """Refuse a --device torch cannot parse, or whose kind of accelerator this machine or this torch lacks."""
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise MiniGPTError(f"--device {device}: {first_line(error)}") from error
    backend = getattr(torch, kind, None)
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise MiniGPTError(f"--device {device}: no {kind} device here (torch {torch.__version__}); use --device cpu")


def load_model(
    model_name: str,
    adapter: str | None = None,
    device: str | None = None,
    need_chat_template: bool = True,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder or a Hub id, optionally with a LoRA adapter on top.

    trust_remote_code=True so that any Hub model with its own modeling code works, ours included. `dtype` None:
    float32 on CPU, the saved dtype elsewhere.
    """
    import minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)

    path = Path(model_name)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from .export import adapter_base

        base = adapter_base(path)
        raise MiniGPTError(
            located(path, f"a LoRA adapter, not a model: pass --model {base or 'BASE_MODEL'} --adapter {path}")
        )
    if path.exists():
        require_model_folder(path)
    require_model_source(model_name)
    require_tokenizer(path)
    not_found = "no such folder, and not loadable from the Hugging Face Hub"
    with one_line_errors(model_name, "cannot load the tokenizer" if path.exists() else not_found):
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    # float32 on CPU: bf16 matmuls are slow there; on a GPU keep the dtype the weights were saved in.
    dtype = dtype or (torch.float32 if device == "cpu" else "auto")
    with one_line_errors(model_name, "cannot load the model" if path.exists() else not_found):
        model = AutoModelForCausalLM.from_pretrained(model_name, trust_remote_code=True, dtype=dtype).to(device)
    if adapter is not None:
        model = _apply_adapter(model, adapter)
    if need_chat_template and not tokenizer.chat_template:
        raise MiniGPTError(
            located(model_name, "the tokenizer has no chat template; chat needs a chat model (run `minigpt sft` first)")
        )
    _end_turns_at_end_of_turn_tokens(model, tokenizer)
    return model.eval(), tokenizer


def only_pretrained(model_name: str, adapter: str | None) -> bool:
    """Whether `minigpt pretrain` wrote the model (the adapter's run, if one is given, is the last): it has the chat
    template, for the SFT to come, but has not learnt to chat."""
    return trained_stage(adapter or model_name) == "pretrain"


def note_if_only_pretrained(model_name: str, adapter: str | None) -> None:
    """Say so on stderr when the model was only pretrained (chat and demo answer with it all the same)."""
    if only_pretrained(model_name, adapter):
        print(
            f"note: {adapter or model_name} is a pretrained model (its training_run.json says so): it continues "
            "text rather than answering; `minigpt sft` makes a chat model of it",
            file=sys.stderr,
        )


def _apply_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise MiniGPTError(located(adapter, "not a LoRA adapter folder: no adapter_config.json"))
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as error:  # load_state_dict's list of every mismatched weight, one per line
        if "size mismatch" not in str(error):
            raise
        mismatch = next(line.strip() for line in str(error).splitlines() if "size mismatch" in line)
        message = f"was trained on a base model of another shape than --model ({mismatch})"
        raise MiniGPTError(located(adapter, message)) from error


def _end_turns_at_end_of_turn_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generation stop at the template's end-of-turn token and give it a pad id (silences a warning)."""
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list | tuple) else ([eos] if eos is not None else [])
    candidates = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS]
    for token_id in candidates:
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in eos_ids:
            eos_ids.append(token_id)
    config.eos_token_id = eos_ids or None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [None])[0]


def context_length(model: PreTrainedModel) -> int | None:
    """Longest sequence the model was built for (names differ: Qwen/Llama vs GPT-2)."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters stored, counting tied embedding/LM-head weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class StopOnEvent(StoppingCriteria):
    """Stops `generate()` in its thread as soon as the event is set (Ctrl-C in chat, the Stop button in the demo)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# A byte-level BPE tokenizer spells a character it has no token for in byte tokens: a reply cut off by max_new_tokens
# (or a Stop) among them decodes to the replacement character U+FFFD, which is not text the model wrote.
UNFINISHED_CHARACTER = "\ufffd"


class ReplyStreamer(TextIteratorStreamer):
    """transformers' TextIteratorStreamer, without an unfinished character at the end of the stream."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        super().on_finalized_text(text.rstrip(UNFINISHED_CHARACTER) if stream_end else text, stream_end=stream_end)


def decode_replies(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor) -> list[str]:
    """Each row's generated tokens as text, stripped, without an unfinished character at the end."""
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.rstrip(UNFINISHED_CHARACTER).strip() for text in texts]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_prompt_tokens: int | None = None
) -> torch.Tensor:
    """Apply the chat template; drop the oldest turns (never the system prompt or the last message) to fit.

    Raises MiniGPTError when even the last message alone is longer than `max_prompt_tokens`.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while True:
        input_ids = tokenizer.apply_chat_template(
            system + turns, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        if max_prompt_tokens is None or input_ids.shape[1] <= max_prompt_tokens:
            return input_ids
        if len(turns) <= 1:
            raise MiniGPTError(
                f"the message is too long: {input_ids.shape[1]} tokens with the chat template, "
                f"the model has room for {max_prompt_tokens}"
            )
        turns = turns[1:]
        # A conversation must start with the user, so drop the assistant reply that answered the dropped turn too.
        while turns and turns[0]["role"] != "user" and len(turns) > 1:
            turns = turns[1:]


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    sampling: Sampling,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Yield pieces of generated text as they are produced; generate() runs in a thread and stops with `stop`.

    Closing the iterator early (the consumer stops reading) sets `stop`, so the thread never runs on unseen.
    """
    stop = stop or threading.Event()
    # No timeout: a big model's first token may take long on a CPU, and a failed generate() ends the stream below.
    streamer = ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = sampling.generate_kwargs()
    limit = context_length(model)
    if limit is not None:
        kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], limit - input_ids.shape[1]))
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=torch.ones_like(input_ids).to(model.device),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                    **kwargs,
                )
        except BaseException as error:  # re-raised in the consumer's thread below
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=generate, name="minigpt-generate", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    sampling: Sampling,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Stream the assistant's reply to a conversation (list of {role, content})."""
    limit = context_length(model)
    # Keep room for at least a short reply; the rest of max_new_tokens is cut by stream_generate if it must.
    room = None if limit is None else limit - min(sampling.max_new_tokens, max(limit // 4, 1))
    input_ids = encode_chat(tokenizer, messages, room)
    yield from stream_generate(model, tokenizer, input_ids, sampling, stop)


def chat_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict], **sampling) -> str:
    """The whole reply as one string; keyword arguments are `Sampling` fields (temperature=0 for greedy)."""
    return "".join(stream_reply(model, tokenizer, messages, Sampling(**sampling))).strip()


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], sampling: Sampling
) -> list[str]:
    """Replies to many conversations in one left-padded batch (evaluation: many short greedy answers at once)."""
    prompts = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    output = model.generate(**batch.to(model.device), **sampling.generate_kwargs())
    return decode_replies(tokenizer, output[:, batch["input_ids"].shape[1] :])


def complete_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, **sampling) -> str:
    """Continue plain text (for pretrained models without a chat template)."""
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return "".join(stream_generate(model, tokenizer, input_ids, Sampling(**sampling)))


# ---- the terminal chat -------------------------------------------------------------------------------------------


class ChatSession:
    """A conversation: the system prompt, the turns so far, and the slash commands that change them."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.turns + user

    def command(self, line: str) -> str:
        """Run a slash command; returns what to tell the user."""
        name, _, rest = line.partition(" ")
        if name == "/reset":
            self.turns = []
            return "(conversation cleared)"
        if name == "/system":
            self.system = rest.strip() or None
            return f"(system prompt: {self.system})" if self.system else "(system prompt cleared)"
        if name in ("/help", "/?"):
            return CHAT_HELP
        return f"(unknown command {name}; {CHAT_HELP})"


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sampling: Sampling,
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """Read a line, answer it streaming, repeat until /quit or end of input. Ctrl-C stops the current reply only."""
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            out.write(session.command(line) + "\n")
            continue
        out.write("bot> ")
        out.flush()
        reply = []
        try:
            for piece in stream_reply(model, tokenizer, session.messages(line), sampling):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except MiniGPTError as error:  # an over-long message: say so and keep the conversation going
            out.write(f"(error: {error})\n")
            continue
        out.write("\n")
        session.turns += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply).strip()}]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt for the conversation")
    parser.add_argument("--prompt", default=None, help="answer this one message, print the reply and exit")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    sampling = sampling_from_args(args)
    model, tokenizer = load_model(args.model, args.adapter, args.device)
    note_if_only_pretrained(args.model, args.adapter)
    session = ChatSession(args.system)
    if args.prompt is not None:
        for piece in stream_reply(model, tokenizer, session.messages(args.prompt), sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    print(f"minigpt chat: {args.model} ({count_parameters(model):,} parameters). {CHAT_HELP}; Ctrl-D exits.")
    chat_loop(model, tokenizer, sampling, session)
    return 0
