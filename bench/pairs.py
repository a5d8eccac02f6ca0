"""MiniGPT and the transformers model it is measured against, built at identical configurations.

"Identical" means: same layers, width, heads, key/value heads, MLP width, vocabulary, positions, norm epsilon,
activation, biases, tied embeddings, no dropout, the same attention implementation (sdpa) and dtype. The two models
therefore have exactly the same parameter count, which `build_pair` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.convert import to_native

GPT2_VOCAB = 50257  # GPT-2's tokenizer; used for both styles so the LM head costs the same


@dataclass(frozen=True)
class Shape:
    """A model size plus the batch it is measured on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int  # for the Qwen style; the GPT-2 style always has one key/value head per query head
    seq_len: int
    batch: int = 8


SHAPES = {
    # The CPU shape: 6 layers x 384 wide, 6 heads (2 KV heads for Qwen), seq 256, batch 8.
    "small": Shape(layers=6, hidden=384, heads=6, kv_heads=2, seq_len=256),
    # GPT-2 small's transformer (124M with its vocabulary) on 512-token sequences; Qwen keeps the 3:1 head grouping.
    "gpt2-small": Shape(layers=12, hidden=768, heads=12, kv_heads=4, seq_len=512),
    # Seconds-long smoke shape for checking the scripts themselves.
    "tiny": Shape(layers=2, hidden=64, heads=4, kv_heads=2, seq_len=32, batch=2),
}
STYLES = ("gpt2", "qwen")
PEER_NAMES = {"gpt2": "GPT2LMHeadModel", "qwen": "Qwen2ForCausalLM"}


def minigpt_config(style: str, shape: Shape, vocab_size: int) -> MiniGPTConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    if style == "gpt2":
        no_dropout = dict(embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
        return MiniGPTConfig.from_preset("gpt2", intermediate_size=4 * shape.hidden, **no_dropout, **common)
    # intermediate_size left to MiniGPT's SwiGLU default (~8/3 x hidden); the peer copies it below.
    return MiniGPTConfig.from_preset(
        "qwen2.5-0.5b", num_key_value_heads=shape.kv_heads, intermediate_size=None, **common
    )


def peer_config(style: str, config: MiniGPTConfig) -> GPT2Config | Qwen2Config:
    """The transformers config with the same shape and switches as `config`."""
    if style == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.max_position_embeddings,
            n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_inner=config.intermediate_size,
            activation_function=config.hidden_act,
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            attn_implementation="sdpa",
        )
    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="sdpa",
    )


def build_pair(
    style: str, shape: Shape, vocab_size: int = GPT2_VOCAB, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[nn.Module, nn.Module]:
    """(MiniGPT, transformers peer) with identical shapes; raises if their parameter counts differ."""
    config = minigpt_config(style, shape, vocab_size)
    torch.manual_seed(0)
    ours = MiniGPTForCausalLM(config).to(device=device, dtype=dtype)
    peer_class = GPT2LMHeadModel if style == "gpt2" else Qwen2ForCausalLM
    peer = peer_class(peer_config(style, config)).to(device=device, dtype=dtype)
    # The same weights in both (via the project's own converter), so their losses and generated tokens must agree.
    peer.load_state_dict(to_native(ours).state_dict())
    for model in (ours, peer):
        # No end-of-text token (always generate max_new_tokens); pad id 0 for left-padded batches.
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"{type(model).__name__} runs {model.config._attn_implementation}, not sdpa")
    if count_parameters(ours) != count_parameters(peer):
        raise RuntimeError(f"parameter counts differ: MiniGPT {count_parameters(ours)}, peer {count_parameters(peer)}")
    return ours, peer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once by .parameters()


def matmul_parameters(config: MiniGPTConfig) -> int:
    """Weights that take part in a matmul per token: every projection plus the LM head (embedding lookups do not)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = config.hidden_size * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    mlp = (3 if config.mlp_type == "swiglu" else 2) * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * config.hidden_size


def training_flops_per_token(config: MiniGPTConfig, seq_len: int) -> int:
    """6 N + 12 L C T (PaLM / nanoGPT): 2 FLOPs per weight forward and 4 backward, plus Q K^T and weights x V,
    counted without the causal half-saving as everyone does."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_parameters(config) + attention


def random_batch(shape: Shape, vocab_size: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (shape.batch, shape.seq_len), generator=generator).to(device)
