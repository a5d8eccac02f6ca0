"""Training-step speed: MiniGPT against transformers' GPT2LMHeadModel and Qwen2ForCausalLM at identical configs.

One step = forward with labels, backward, fused AdamW step, zero_grad(set_to_none=True) - what the Trainer does.
Both models run in the same process, interleaved (A B A B ...), after warm-up; each figure is the median of the rounds.
Achieved GFLOP/s is compared with a square-matmul ceiling measured just before and after every step.

    python bench/train_step.py                        # the issue's CPU shape, both styles, eager
    python bench/train_step.py --shape gpt2-small     # 12 layers x 768, seq 512
    python bench/train_step.py --compile              # torch.compile on both models
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from measure import configure_cpu, interleaved, load_average, machine_description, median
from pairs import GPT2_VOCAB, PEER_NAMES, SHAPES, STYLES, build_pair, random_batch, training_flops_per_token
from torch import nn


def training_step(model: nn.Module, input_ids: torch.Tensor, compile_model: bool) -> Callable[[], float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if compile_model else model

    def step() -> float:
        loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compare(style: str, args: argparse.Namespace) -> dict[str, float]:
    shape = SHAPES[args.shape]
    ours, peer = build_pair(style, shape, vocab_size=args.vocab)
    peer_name = PEER_NAMES[style]
    input_ids = random_batch(shape, args.vocab)
    steps = {
        "MiniGPT": training_step(ours, input_ids, args.compile),
        peer_name: training_step(peer, input_ids, args.compile),
    }
    first_losses = {name: step() for name, step in steps.items()}  # also the first warm-up round (and compile)

    def progress(index: int, seconds: dict[str, float]) -> None:
        times = ", ".join(f"{name} {value:.3f}" for name, value in seconds.items())
        print(f"  [{style} round {index + 1}/{args.rounds}] {times}  (load {load_average()})", file=sys.stderr)

    timings = interleaved(steps, rounds=args.rounds, warmup=args.warmup - 1, on_round=progress)
    tokens = shape.batch * shape.seq_len
    flops = training_flops_per_token(ours.config, shape.seq_len) * tokens
    print(
        f"\n{style} style (same weights): first-step loss MiniGPT {first_losses['MiniGPT']:.4f}, "
        f"{peer_name} {first_losses[peer_name]:.4f}"
    )
    print(f"{'model':<18} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'ceiling':>8} {'% ceiling':>10}")
    step_times, shares = {}, {}
    for name in steps:
        seconds, ceilings = timings[name], timings[f"{name} ceiling"]
        step_times[name] = step_time = median(seconds)
        gflops = flops / step_time / 1e9
        # Each step against the ceiling measured around it, then the median over the rounds.
        shares[name] = median([flops / step / 1e9 / around for step, around in zip(seconds, ceilings, strict=True)])
        print(
            f"{name:<18} {step_time:>8.3f} {tokens / step_time:>10.0f} {gflops:>9.1f} {median(ceilings):>8.1f} "
            f"{100 * shares[name]:>9.1f}%"
        )
    ratio = step_times[peer_name] / step_times["MiniGPT"]
    print(
        f"speed-up MiniGPT / {peer_name}: {ratio:.2f}x   (MiniGPT at {100 * shares['MiniGPT']:.1f}% of the matmul ceiling)"
    )
    del ours, peer, steps
    return {"ratio": ratio, "share": shares["MiniGPT"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary size for both styles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, 3 for gpt2-small)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (at least 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compiled vs compiled)")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.shape == "gpt2-small" else 7)
    args.warmup = max(1, args.warmup)

    configure_cpu(args.threads)
    shape = SHAPES[args.shape]
    print(
        f"Training step, shape {args.shape}: {shape.layers} layers x {shape.hidden}, {shape.heads} heads "
        f"({shape.kv_heads} KV heads for the Qwen style), batch {shape.batch} x {shape.seq_len} tokens, "
        f"vocab {args.vocab}, float32, sdpa, AdamW(fused), {'torch.compile' if args.compile else 'eager'}"
    )
    print(f"machine: {machine_description()}")
    print("FLOPs per step = tokens x (6 x matmul weights incl. LM head + 12 x layers x hidden x seq_len)")
    print(
        "ceiling = sustained float32 2048x2048 @ 2048x2048 torch.matmul, measured just before and after every step; "
        "% ceiling = median over rounds of (step GFLOP/s / mean of the two around it)"
    )
    for style in args.styles:
        compare(style, args)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
