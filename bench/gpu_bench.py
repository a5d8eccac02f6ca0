"""The GPU benchmark's steps (run by bench/gpu.sh): training MFU, generation against Qwen2, vLLM serving.

    python bench/gpu_bench.py train                 # GPT-2 124M, bf16, seq 1024, compiled, vs GPT2LMHeadModel
    python bench/gpu_bench.py generate              # greedy generate(): MiniGPT vs Qwen2ForCausalLM, eager and compiled
    python bench/gpu_bench.py save-model OUT_DIR    # a Qwen-style MiniGPT to convert and serve
    python bench/gpu_bench.py vllm NATIVE_DIR       # vLLM offline serving of the converted (native) export

Every step also runs on CPU with `--device cpu --tiny` (tiny shapes), which is how it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from measure import configure_cpu, machine_description, matmul_gflops, synchronize
from pairs import PEER_NAMES, matmul_parameters, peer_config
from torch import nn
from transformers import CompileConfig, GPT2LMHeadModel, Qwen2ForCausalLM

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.convert import to_native
from minigpt.modeling_minigpt import next_token_targets

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 tensor cores without sparsity


def training_config(tiny: bool, pad_vocab_to: int = 1) -> MiniGPTConfig:
    """GPT-2 124M (or tiny); `pad_vocab_to` rounds the vocabulary up (nanoGPT's 50257 -> 50304 for tensor cores)."""
    no_dropout = dict(embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    config = MiniGPTConfig.from_preset("tiny-gpt2" if tiny else "gpt2", attn_implementation="sdpa", **no_dropout)
    config.vocab_size = -(-config.vocab_size // pad_vocab_to) * pad_vocab_to
    return config


def generation_config(tiny: bool) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset("tiny-qwen" if tiny else "qwen2.5-0.5b", attn_implementation="sdpa")


def with_same_weights(ours: MiniGPTForCausalLM, peer_class: type[nn.Module], style: str) -> nn.Module:
    """The transformers model of the same config holding MiniGPT's weights (converted)."""
    peer = peer_class(peer_config(style, ours.config)).to(device=ours.device, dtype=ours.dtype)
    peer.load_state_dict(to_native(ours).state_dict())
    return peer


def seconds_per_call(run: Callable[[], object], calls: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / calls


# --------------------------------------------------------------------------------------------------------------------
# Training: tokens/s and MFU
# --------------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    config = training_config(args.tiny, args.pad_vocab_to)
    seq_len, batch = (64, 4) if args.tiny else (args.seq_len, args.batch)
    torch.manual_seed(0)
    ours = MiniGPTForCausalLM(config).to(args.device)
    if args.bf16_weights:  # bf16 parameters, gradients and AdamW states: no autocast, no fp32 master weights
        ours.to(torch.bfloat16)
    contestants = {"MiniGPT": ours}
    if not args.no_peer:
        contestants[PEER_NAMES["gpt2"]] = with_same_weights(ours, GPT2LMHeadModel, "gpt2")
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=args.device)
    # An all-ones mask is what a padding-free batch looks like to transformers' masking: under torch.compile before
    # torch 2.14 it becomes a full (B, 1, T, T) mask tensor, and SDPA's fused kernels work through all of T x T.
    attention_mask = torch.ones_like(input_ids) if args.mask_ones else None
    # use_cache as given, or each model's default (transformers' models build a KV cache in training, MiniGPT not)
    cache_choice = {"use_cache": args.use_cache == "on"} if args.use_cache != "default" else {}
    # 6 N + 12 L C T FLOPs per token (PaLM / nanoGPT), N = matmul weights including the LM head; padded vocabulary
    # rows are not counted (they are wasted work, not useful FLOPs).
    real = training_config(args.tiny)
    flops_per_token = 6 * matmul_parameters(real) + 12 * real.num_hidden_layers * real.hidden_size * seq_len
    size = 1024 if args.tiny else 8192
    ceiling = matmul_gflops(size, repeats=10, device=args.device, dtype=torch.bfloat16) / 1e3
    print(f"bf16 matmul ceiling measured now ({size}^3): {ceiling:.0f} TFLOP/s")
    inductor_settings = "".join(f", inductor {setting}" for setting in args.inductor)
    print(
        f"training: MiniGPT {'tiny-gpt2' if args.tiny else 'gpt2 (GPT-2 124M)'} preset "
        f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M"
        f" parameters, vocab {config.vocab_size}), batch {batch} x {seq_len}, "
        f"{'bf16 weights' if args.bf16_weights else 'bf16 autocast'}, fused AdamW, sdpa ({sdpa_backends()})"
        f"{', all-ones attention mask' if args.mask_ones else ''}{f', use_cache {args.use_cache}' if args.use_cache != 'default' else ''}, "
        f"{'eager' if args.no_compile else 'torch.compile mode ' + (args.compile_mode or 'default')}"
        f"{' (loss only)' if (args.compile_target == 'loss' or args.loss != 'model') and not args.no_compile else ''}{inductor_settings}, "
        f"{'loss: HeadLossFromExps, ' if args.loss == 'head-exps' else ''}peak {args.peak_tflops:.0f} TFLOP/s"
    )
    for name, model in contestants.items():
        model.train()
        if args.loss == "head-exps":  # the same loss as the model's own, checked once before timing it
            with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=not args.bf16_weights):
                inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **cache_choice)
                own, fused = model(**inputs).loss.item(), head_exps_loss(model)(**inputs).item()
            print(f"  {name}: loss {own:.4f} (its own), {fused:.4f} (HeadLossFromExps)")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        forward_loss = training_loss(model, args)

        def step(forward_loss: Callable = forward_loss, optimizer: torch.optim.Optimizer = optimizer) -> None:
            with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=not args.bf16_weights):
                loss = forward_loss(
                    input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **cache_choice
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(args.warmup):  # the first call compiles
            step()
        synchronize(args.device)
        warmup_seconds = time.perf_counter() - start
        seconds = seconds_per_call(step, args.steps, args.device)
        tokens_per_second = batch * seq_len / seconds
        achieved_tflops = flops_per_token * tokens_per_second / 1e12
        print(
            f"  {name:<18} {tokens_per_second:>10.0f} tokens/s  {achieved_tflops:7.1f} TFLOP/s  "
            f"MFU {100 * achieved_tflops / args.peak_tflops:5.1f}%  ({100 * achieved_tflops / ceiling:.0f}% of the "
            f"measured ceiling; warm-up incl. compile {warmup_seconds:.0f} s)"
        )
        if args.profile:
            print_kernel_profile(step, args.device, steps=3, top=args.top)
        del optimizer, forward_loss
        model.to("cpu")  # free the device for the next contestant
        if args.device == "cuda":
            torch.cuda.empty_cache()


def training_loss(model: nn.Module, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """model(**inputs).loss (or `--loss head-exps`), eager or compiled. `--compile-target model` compiles the module,
    as Trainer does; `loss` compiles a function that returns only the loss. The compiled module also returns the
    logits, and when nothing differentiates them autograd hands its backward a zero-filled (B, T, vocab) gradient for
    them (seen on CPU: one (4, 64, 5003) zero_ per step, absent when only the loss leaves the graph)."""
    loss_of = (lambda **inputs: model(**inputs).loss) if args.loss == "model" else head_exps_loss(model)
    if args.no_compile:
        return loss_of
    if args.compile_target == "loss" or args.loss != "model":
        return torch.compile(loss_of, mode=args.compile_mode)
    compiled = torch.compile(model, mode=args.compile_mode)
    return lambda **inputs: compiled(**inputs).loss


def head_exps_loss(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The model's loss, its LM head and cross-entropy computed by HeadLossFromExps from the base model's hidden
    states (MiniGPT's `model`, GPT2LMHeadModel's `transformer`)."""

    def loss_of(input_ids: torch.Tensor, labels: torch.Tensor, **inputs: object) -> torch.Tensor:
        hidden = model.base_model(input_ids=input_ids, **inputs).last_hidden_state
        targets = next_token_targets(labels)  # (B*T,): position t predicts token t + 1, as transformers' loss
        return HeadLossFromExps.apply(hidden.flatten(0, 1), model.lm_head.weight, targets, -100)

    return loss_of


class HeadLossFromExps(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden @ weight.T, keeping only exp(logits - max) for the backward pass.

    transformers' loss under torch.compile (with Inductor's two-pass softmax, the best setting so far) reads the
    (tokens x vocab) logits three times: for the max and for the sum of the log-softmax in the forward pass, and in
    the backward pass to write the bf16 gradient d(loss)/d(logits) that the two backward matmuls read. Here the
    forward pass reads them twice (the max, then exp and its sum in one kernel that also stores the exps) and writes
    the exps, with the target's entry replaced by exp - sum, so that exps[n] / (sum[n] x count) is row n of the
    gradient: the backward matmuls read the exps and scale their (tokens x hidden) products per token, and the
    gradient is never formed. One pass fewer over the logits: 6.6 GB of bf16 per batch-64 step at GPT-2's shape.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int):  # hidden (N, C), weight (V, C), targets (N,)
        logits = hidden @ weight.t()  # (N, V)
        shift = logits.amax(dim=1, keepdim=True).float()
        exps_fp32 = torch.exp(logits.float() - shift)
        sums = exps_fp32.sum(dim=1)  # (N,), float32
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, 0)
        target_logits = logits.gather(1, safe_targets[:, None])[:, 0].float()
        count = keep.sum()
        loss = torch.where(keep, sums.log() + shift[:, 0] - target_logits, 0.0).sum() / count
        exps = exps_fp32.to(logits.dtype)  # bf16 under autocast too (its float32 weights stay out of the matmuls)
        # the target's entry: exp - sum, computed in float32 and rounded once
        exps[torch.arange(exps.shape[0], device=exps.device), safe_targets] = (
            torch.exp(target_logits - shift[:, 0]) - sums
        ).to(exps.dtype)
        ctx.save_for_backward(hidden, weight, exps, keep / (count * sums))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, exps, row_scale = ctx.saved_tensors
        row_scale = (row_scale * grad_loss).to(exps.dtype)[:, None]  # (N, 1): 0 for tokens without a target
        grad_hidden = (exps @ weight.to(exps.dtype)) * row_scale
        grad_weight = exps.t() @ (hidden.to(exps.dtype) * row_scale)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


def sdpa_backends() -> str:
    """The SDPA backends enabled (PyTorch picks the first of flash, memory-efficient, cuDNN, math that fits)."""
    enabled = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "memory-efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cuDNN": torch.backends.cuda.cudnn_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }
    return "/".join(name for name, on in enabled.items() if on)


KERNEL_KINDS = {  # first match wins: attention kernels' names can also contain "sm90" or "gemm"
    "attention": ("flash", "fmha", "attention", "sdpa", "attn"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "addmm", "mm"),
    "optimizer": ("adam", "multi_tensor"),
    "compiled (Triton) fused": ("triton",),
}


def print_kernel_profile(step: Callable[[], None], device: str, steps: int, top: int) -> None:
    """Where a step's device time goes: kernel time by kind and the top kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == on_gpu]
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in events if time_of(e) > 0), key=time_of, reverse=True)
    total_ms = sum(time_of(e) for e in events) / 1e3 / steps
    by_kind: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS.items() if any(m in name for m in marks)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + time_of(e) / 1e3 / steps
    print(f"    profile: {wall_ms:.1f} ms per step (profiled), {'kernels' if on_gpu else 'ops'} {total_ms:.1f} ms")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"      {kind:<26} {ms:8.2f} ms  {100 * ms / total_ms:5.1f}%")
    for e in events[:top]:
        print(f"      {time_of(e) / 1e3 / steps:8.2f} ms  x{e.count // steps:<4} {e.key[:110]}")


# --------------------------------------------------------------------------------------------------------------------
# Generation: MiniGPT vs Qwen2ForCausalLM through generate()
# --------------------------------------------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> None:
    config = generation_config(args.tiny)
    new_tokens = 32 if args.tiny else args.new_tokens
    torch.manual_seed(0)
    ours = MiniGPTForCausalLM(config).to(device=args.device, dtype=torch.bfloat16).eval()
    peer = with_same_weights(ours, Qwen2ForCausalLM, "qwen").eval()
    for model in (ours, peer):
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    prompt = torch.randint(1, config.vocab_size, (1, 16), device=args.device)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = (
        True  # transformers compiles only on GPUs unless told; lets --device cpu run it
    )
    modes = {"eager, dynamic cache": {}}
    if not args.no_compile:
        modes["static cache + torch.compile"] = dict(cache_implementation="static", compile_config=compile_config)
    print(
        f"generation: {'tiny-qwen' if args.tiny else 'qwen2.5-0.5b'} preset shape "
        f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
        f"random weights), bf16, batch 1, 16-token prompt, {new_tokens} new tokens, greedy"
    )
    for mode, kwargs in modes.items():
        speeds, outputs = {}, {}
        for name, model in (("MiniGPT", ours), ("Qwen2ForCausalLM", peer)):

            def run(model: nn.Module = model, kwargs: dict = kwargs) -> torch.Tensor:
                return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **kwargs)

            with torch.inference_mode():
                start = time.perf_counter()
                outputs[name] = run()  # warm-up; compiles in the compiled mode
                synchronize(args.device)
                warmup_seconds = time.perf_counter() - start
                speeds[name] = new_tokens / seconds_per_call(run, args.repeats, args.device)
            print(f"  {mode:<30} {name:<18} {speeds[name]:8.1f} tokens/s   (first call {warmup_seconds:.0f} s)")
        same = torch.equal(outputs["MiniGPT"], outputs["Qwen2ForCausalLM"])
        print(
            f"  {mode:<30} speed-up {speeds['MiniGPT'] / speeds['Qwen2ForCausalLM']:.2f}x, "
            f"identical tokens: {'yes' if same else 'no (bf16 kernels may break near-ties differently)'}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Serving: vLLM on the native export
# --------------------------------------------------------------------------------------------------------------------


def save_model(args: argparse.Namespace) -> None:
    """A Qwen-style MiniGPT (random weights, bf16) in a directory, for `minigpt convert --to-native`."""
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(generation_config(args.tiny)).to(torch.bfloat16)
    model.save_pretrained(args.out_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter MiniGPT to {args.out_dir}")


def serve_with_vllm(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    new_tokens = 32 if args.tiny else args.new_tokens
    llm = LLM(model=args.native_dir, skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    generator = torch.Generator().manual_seed(3)
    vocab_size = json.loads((Path(args.native_dir) / "config.json").read_text())["vocab_size"]
    for batch in (1, 64):
        prompts = [{"prompt_token_ids": torch.randint(1, vocab_size, (16,), generator=generator).tolist()}] * batch
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(result.outputs[0].token_ids) for result in results)
        print(f"  vLLM {args.native_dir}: batch {batch:>2}: {generated / seconds:9.1f} generated tokens/s")


def set_inductor_option(setting: str) -> None:
    """KEY=VALUE: torch._inductor.config.KEY = VALUE (0/1/true/false as booleans, else int, float or text)."""
    import torch._inductor.config as inductor_config

    key, _, text = setting.partition("=")
    known = inductor_config.get_config_copy()
    if key not in known:
        raise SystemExit(f"--inductor {setting}: torch._inductor.config has no {key!r}")
    current = known[key]
    if isinstance(current, bool):
        value: object = text.lower() in ("1", "true", "on")
    elif isinstance(current, (int, float)):
        value = type(current)(text)
    else:
        value = text
    inductor_config.patch({key: value}).__enter__()  # for the rest of the process
    print(f"torch._inductor.config.{key} = {value!r} (default {current!r})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("train", "generate", "save-model", "vllm"))
    parser.add_argument("path", nargs="?", help="OUT_DIR for save-model, NATIVE_DIR for vllm")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script itself in seconds")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-mode", default=None, help="training: torch.compile mode (e.g. max-autotune)")
    parser.add_argument(
        "--compile-target",
        choices=["model", "loss"],
        default="model",
        help="training: compile the module (as Trainer does) or a function returning only the loss",
    )
    parser.add_argument("--no-peer", action="store_true", help="training: skip transformers' GPT2LMHeadModel")
    parser.add_argument(
        "--loss",
        choices=("model", "head-exps"),
        default="model",
        help="training: the model's own loss, or its LM head + cross-entropy as one function keeping exp(logits - "
        "max) for the backward (compiled like --compile-target loss)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--pad-vocab-to", type=int, default=1, help="training: round the vocabulary up (64: 50304)")
    parser.add_argument("--bf16-weights", action="store_true", help="training: bf16 parameters instead of autocast")
    parser.add_argument(
        "--mask-ones", action="store_true", help="training: pass an all-ones attention_mask (transformers' mask route)"
    )
    parser.add_argument(
        "--sdpa-backend",
        choices=("default", "cudnn", "flash"),
        default="default",
        help="training: restrict SDPA to cuDNN's or the flash kernel (math stays as the fallback)",
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training: set torch._inductor.config.KEY (e.g. online_softmax=0); repeatable",
    )
    parser.add_argument("--profile", action="store_true", help="training: print where a step's kernel time goes")
    parser.add_argument("--top", type=int, default=14, help="training: kernels listed by --profile")
    parser.add_argument(
        "--use-cache",
        choices=("default", "on", "off"),
        default="default",
        help="training: pass use_cache=True/False (off: as Trainer runs); default: each model's own default",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps (the first compiles)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    args = parser.parse_args()
    args.out_dir = args.native_dir = args.path
    if args.step in ("save-model", "vllm") and not args.path:
        parser.error(f"{args.step} needs a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --tiny to check the script on CPU")
    if args.device == "cpu":
        configure_cpu(torch.get_num_threads())
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast use tensor cores too
    for setting in args.inductor:
        set_inductor_option(setting)
    if args.sdpa_backend != "default":
        torch.backends.cuda.enable_flash_sdp(args.sdpa_backend == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa_backend == "cudnn")
    print(f"[{args.step}] {machine_description(args.device)}")
    {"train": train, "generate": generate, "save-model": save_model, "vllm": serve_with_vllm}[args.step](args)


if __name__ == "__main__":
    main()
