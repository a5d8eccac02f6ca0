"""Generation speed through the standard `model.generate(...)`: MiniGPT against transformers' own model.

Both models hold the same weights (converted), run greedy decoding in the same process, interleaved, and must
produce identical tokens. Two workloads: one prompt (batch 1, 16 tokens, 256 new tokens) and a left-padded batch of
8 prompts of different lengths.

    python bench/generate.py                 # the issue's CPU shape, both styles
    python bench/generate.py --styles qwen --new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from measure import configure_cpu, interleaved, load_average, machine_description, median
from pairs import GPT2_VOCAB, PEER_NAMES, SHAPES, STYLES, build_pair
from torch import nn


def prompts(batch: int, prompt_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for `batch` random prompts; several have different lengths, padded on the left."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, vocab_size, (batch, prompt_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):  # row r loses r // 2 leading tokens to padding
        attention_mask[row, : row // 2] = 0
        input_ids[row, : row // 2] = 0
    return input_ids, attention_mask


def greedy(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], new_tokens: int) -> Callable[[], torch.Tensor]:
    input_ids, attention_mask = inputs

    def run() -> torch.Tensor:
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False
        )

    return run


def compare(style: str, args: argparse.Namespace) -> None:
    ours, peer = build_pair(style, SHAPES[args.shape], vocab_size=args.vocab)
    ours.eval()
    peer.eval()
    peer_name = PEER_NAMES[style]
    for workload, batch in (("batch 1", 1), (f"batch {args.batch}", args.batch)):
        inputs = prompts(batch, args.prompt_len, args.vocab)
        runs = {"MiniGPT": greedy(ours, inputs, args.new_tokens), peer_name: greedy(peer, inputs, args.new_tokens)}
        with torch.inference_mode():
            outputs = {name: run() for name, run in runs.items()}  # also the warm-up
            same = torch.equal(outputs["MiniGPT"], outputs[peer_name])

            def progress(index: int, seconds: dict[str, float], workload: str = workload) -> None:
                times = ", ".join(f"{name} {value:.3f}" for name, value in seconds.items())
                print(f"  [{style} {workload} round {index + 1}/{args.rounds}] {times}", file=sys.stderr)

            timings = interleaved(runs, rounds=args.rounds, warmup=0, ceiling=False, on_round=progress)
        generated = batch * args.new_tokens
        speeds = {name: generated / median(seconds) for name, seconds in timings.items()}
        print(
            f"{style:<5} {workload:<8} MiniGPT {speeds['MiniGPT']:8.1f} tok/s   {peer_name} {speeds[peer_name]:8.1f} "
            f"tok/s   speed-up {speeds['MiniGPT'] / speeds[peer_name]:.2f}x   "
            f"identical tokens: {'yes' if same else 'NO'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary size for both styles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batched workload")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    configure_cpu(args.threads)
    shape = SHAPES[args.shape]
    print(
        f"Greedy generate(), shape {args.shape}: {shape.layers} layers x {shape.hidden}, {shape.heads} heads "
        f"({shape.kv_heads} KV heads for the Qwen style), vocab {args.vocab}, float32, sdpa, "
        f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens"
    )
    print(f"machine: {machine_description()}")
    for style in args.styles:
        compare(style, args)
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
