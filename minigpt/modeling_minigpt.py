"""MiniGPT: a decoder-only transformer, GPT-2 style or Qwen2.5 style, as a Hugging Face `PreTrainedModel`.

Read it top to bottom like the book: normalisation -> position information (learned table or rotary) -> projections
-> attention (MHA/GQA/MQA, causal mask, KV cache) -> feed-forward (GELU or SwiGLU) -> transformer block -> model ->
LM head and loss.
Every architectural difference is a config field (see `configuration_minigpt.py`), never a copied class.

Parameter names are transformers' Llama/Qwen2 names (`model.layers.N.self_attn.q_proj`, `mlp.down_proj`, ...), so
peft, TRL, vLLM and conversion scripts find the layers they expect. This file is copied next to the weights by
`save_pretrained`; it imports only torch, transformers and (relatively) its config, so it loads with
`trust_remote_code=True` where the `minigpt` package is not installed.

Fast paths (stacked projections, decoding projections, fused GELU, SwiGLU and RMSNorm with closed-form backwards,
fused LM head + loss, kept training buffers) compute the same numbers as the plain code, to float32 rounding, with
fewer passes over memory. Each is a named function saying why; each steps aside for what it does not cover
(peft/LoRA layers, hooks, autocast, torch.compile); `FAST_PATHS = False` turns all off.

Shapes: B batch, T tokens, C hidden size, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init
from transformers.activations import ACT2FN, NewGELUActivation, SiLUActivation
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_minigpt import MiniGPTConfig

# Fast paths compute the same numbers as the plain code with fewer passes over memory (see each one's comment).
# Switch off to run the plain path, e.g. to compare the two in tests.
FAST_PATHS = True

# What the fast paths keep between calls lives beside the modules, not in them, so that a copy, a pickle or a
# torch.save of the model never carries it; an entry goes with its module. Decoding copies of weights, by first layer:
DECODING_BLOCKS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
# Training buffers kept from step to step (KeptBuffer): the fused loss's (logits, exps) by model, the token
# embedding's (weight gradient,) by embedding module, a SwiGLU MLP's activations and gradient scratch by MLP module.
# eval() frees them. Scratch that all layers share is found here by name while some entry above holds it:
KEPT_BUFFERS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
SHARED_BUFFERS: weakref.WeakValueDictionary[str, KeptBuffer] = weakref.WeakValueDictionary()

# --------------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------------


class MiniGPTRMSNorm(nn.Module):
    """RMSNorm (Qwen, Llama): scale by the root mean square, no centring, no bias. Computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (hidden_states.shape[-1],)
        if FAST_PATHS and hidden_states.dtype == self.weight.dtype == torch.float32:
            cpu_training = hidden_states.device.type == "cpu" and torch.is_grad_enabled()
            if cpu_training and not torch.compiler.is_compiling():
                return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
            # One call for mean-square, rsqrt and the weight (a decoding step runs 13 per token). On CPU PyTorch still
            # composes it from ~6 small kernels, but it measured faster than the formula written out (29 vs 34 us).
            return F.rms_norm(hidden_states, shape, self.weight, eps=self.variance_epsilon)
        # float32 statistics keep bf16/fp16 training stable; rounded back before the weight, as transformers does.
        normed = F.rms_norm(hidden_states.float(), shape, eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class RMSNormFunction(torch.autograd.Function):
    """F.rms_norm(x, (C,), weight, eps) for float32 CPU training, differentiated in closed form.

    PyTorch composes rms_norm from pow, mean, rsqrt and two products, and autograd goes back through each of them:
    one (8, 256, 384) norm's backward took 5.5 ms here, against 1.8 ms for the formula below (forwards 0.85 ms
    both; a Qwen-style layer has two norms). With n = x / rms(x) and y = n * w:
    dL/dw = sum over positions of dy * n, and dL/dx = (g - n * mean(g * n)) / rms(x) where g = dy * w.
    The sums of squares and mean(g * n) = (dy * n) @ w / C are reductions without a (tokens, C) temporary, and g is
    written over dy * n once both sums are taken (torch.linalg.vecdot multiplies into one first): at (8, 512, 768),
    forward + backward 23 -> 13.5 ms, side by side.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        size = x.shape[-1]
        inverse_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(size).add_(eps).rsqrt_()
        normed = x * inverse_rms
        ctx.save_for_backward(normed, inverse_rms, weight)
        return normed * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        normed, inverse_rms, weight = ctx.saved_tensors
        size = normed.shape[-1]
        rows = normed.reshape(-1, size)
        grad_x_n = (grad * normed).reshape(-1, size)  # dy * n, (tokens, C)
        grad_weight = grad_x_n.sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            mean = torch.mv(grad_x_n, weight).div_(size).unsqueeze(-1)  # mean(g * n), (tokens, 1)
            g = torch.mul(grad.reshape(rows.shape), weight, out=grad_x_n)  # dy * n is summed: its memory takes g
            grad_x = g.addcmul_(rows, mean, value=-1).mul_(inverse_rms.reshape(-1, 1)).view(normed.shape)
        return grad_x, grad_weight, None


def make_norm(config: MiniGPTConfig, size: int | None = None) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Qwen), as the config says."""
    size = size or config.hidden_size
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return MiniGPTRMSNorm(size, eps=config.norm_eps)


# --------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE): positions enter attention as rotations of query/key pairs
# --------------------------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(config: MiniGPTConfig) -> torch.Tensor:
    """theta^(-2i/hs) for i < hs/2: one rotation speed per pair of head dimensions."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class MiniGPTRotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables that rotate queries and keys."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.config = config
        # Not saved with the weights (recomputed in `_init_weights` after `from_pretrained`).
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T, hs/2): angle = position x frequency, computed in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (B, heads, T, hs) queries and keys by their positions' angles."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    if FAST_PATHS and not torch.compiler.is_compiling():  # (a compiler fuses the formula itself)
        rotate = Rotation.apply if torch.is_grad_enabled() else rotated
        return rotate(q, cos, sin), rotate(k, cos, sin)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (with `inverse`, by the opposite angles) without rotate_half's copy.

    cos and sin repeat their first half (MiniGPTRotaryEmbedding), so the result is x * cos with the halves' cross
    terms added in place: out1 = x1 c - x2 s, out2 = x2 c + x1 s. Three kernels instead of six, no temporaries (at
    the GPT-2 small shape, one layer's q and k rotations forward + backward: 32 -> 21 ms, side by side).
    """
    out = x * cos
    (out1, out2), (x1, x2), (sin1, sin2) = out.chunk(2, dim=-1), x.chunk(2, dim=-1), sin.chunk(2, dim=-1)
    sign = -1 if inverse else 1
    out1.addcmul_(x2, sin1, value=-sign)
    out2.addcmul_(x1, sin2, value=sign)
    return out


class Rotation(torch.autograd.Function):
    """`rotated` with its gradient in closed form: a rotation's transpose is the rotation by minus the angle."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotated(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotated(grad, cos, sin, inverse=True), None, None


# --------------------------------------------------------------------------------------------------------------------
# Projections: nn.Linear layers, with fast paths for training (stacked weights) and decoding (weights read once)
# --------------------------------------------------------------------------------------------------------------------


def is_plain(kind: type[nn.Module], *modules: nn.Module) -> bool:
    """True for unmodified modules of exactly `kind`, whose weights a fast path may use directly. A peft/LoRA or
    quantised layer, or one with hooks or a patched forward (accelerate), must be called as a module, so fast paths
    step aside."""
    return all(
        type(module) is kind
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
        for module in modules
    )


def is_plain_linear(*modules: nn.Module) -> bool:
    return is_plain(nn.Linear, *modules)


def can_stack(*layers: nn.Linear) -> bool:
    """Plain linear layers that can run as one matmul over their stacked weights (biases all present or all absent)."""
    return FAST_PATHS and len({layer.bias is None for layer in layers}) == 1 and is_plain_linear(*layers)


def has_many_rows(x: torch.Tensor) -> bool:
    """A batch of tokens rather than a decoding step: stacked weights pay off from here (see project_together)."""
    return x.numel() >= 64 * x.shape[-1]


def is_decoding_step(x: torch.Tensor) -> bool:
    """A generation step on CPU: a handful of rows, no autograd, not being traced by torch.compile."""
    return (
        FAST_PATHS
        and x.numel() <= 16 * x.shape[-1]
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # a compiled decoding step plans its own matmuls
        and x.device.type == "cpu"
    )


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; in a decoding step, a layer with more outputs than inputs (LM head, MLP up/gate) reads its weight
    at memory speed.

    Decoding multiplies a few rows by every weight matrix, so it is bound by reading the weights. With one row and a
    wide (out x in) weight, the CPU BLAS runs `x @ W.T` at about half the memory speed, while a kept column-major
    copy of W, cut into one block per thread (`one_row_projection`), streams it once; with a few rows,
    `(W @ x.T).T` needs no copy.
    """
    if not (
        is_plain_linear(layer)  # a wrapped layer (peft's, which may lack out_features) runs as it is
        and layer.out_features > layer.in_features
        and is_decoding_step(x)
        and not layer.weight.is_inference()  # weights made under torch.inference_mode have no version counter
    ):
        return layer(x)
    if x.numel() == x.shape[-1]:
        return one_row_projection(x, layer)
    rows = x.reshape(-1, x.shape[-1])  # (B*T, in)
    out = (layer.weight @ rows.t()).t()
    if layer.bias is not None:
        out = out + layer.bias
    return out.view(*x.shape[:-1], layer.out_features)


def stacked(layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the layers' weights stacked along the outputs, (sum of outs, in); their stacked biases or None)."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


def decoding_blocks(*layers: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the layers' weights stacked along the outputs and transposed, (in, sum of outs), cut into column blocks of
    shape (parts, in, width), the last one zero-padded; their stacked biases or None). One block per thread, at least
    256 columns each.

    Made on first use and kept (in DECODING_BLOCKS, by first layer) while every weight and bias is unchanged (same
    storage, same version counter, so an optimizer step or load_state_dict replaces it). Training forwards and the
    start of each sequence drop it (`starts_a_sequence`): writes through `.data` leave the version counter as it was."""
    tensors = [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
    cached = DECODING_BLOCKS.get(layers[0])
    if cached is None or cached[0] != key:
        weight, bias = stacked(layers)
        outs, inputs = weight.shape
        parts = max(1, min(torch.get_num_threads(), outs // 256))
        width = -(-outs // parts)
        blocks = weight.new_zeros(parts, width, inputs)
        blocks.view(parts * width, inputs)[:outs] = weight
        cached = DECODING_BLOCKS[layers[0]] = (key, (blocks.transpose(1, 2).contiguous(), bias))
    return cached[1]


def starts_a_sequence(cache: Cache | None) -> bool:
    """Whether a forward begins a sequence: no KV cache, or one that holds nothing yet."""
    layers = getattr(cache, "layers", None)
    return not layers or not layers[0].is_initialized


def one_row_projection(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """One row (..., in) through the layers' kept blocks (`decoding_blocks`): (..., sum of outs), each layer's outputs
    in turn.

    One row times a weight matrix reads every weight once and does little else, so it runs at memory speed, and the
    CPU BLAS comes closer to that speed when each thread streams a contiguous block of its own: `torch.bmm` of the
    row with one column-major block per thread read the 50257 x 384 LM head at 20-25 GB/s on this 2-core machine,
    one (1, in) @ (in, out) product at 12-17 GB/s and `x @ W.T` at 6-7 GB/s.
    """
    blocks, bias = decoding_blocks(*layers)
    parts, inputs, width = blocks.shape
    outs = sum(layer.out_features for layer in layers)
    out = torch.bmm(x.reshape(1, 1, inputs).expand(parts, 1, inputs), blocks).view(1, parts * width)[:, :outs]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], outs)


def project_together(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`tuple(project(layer, x) for layer in layers)`, computed as one matmul over the layers' stacked weights.

    One wide matmul runs closer to the CPU's peak than two or three narrow ones, and the backward pass sums the input
    gradient inside one matmul instead of with extra additions. The parameters stay separate (`q_proj`, `k_proj`,
    `v_proj`; `gate_proj`, `up_proj`), so checkpoints, peft and conversions see the usual names.
    """
    if not can_stack(*layers):
        return tuple(project(layer, x) for layer in layers)
    sizes = [layer.out_features for layer in layers]
    if has_many_rows(x):
        return F.linear(x, *stacked(layers)).split(sizes, dim=-1)
    one_row = x.numel() == x.shape[-1]
    if one_row and is_decoding_step(x) and not any(layer.weight.is_inference() for layer in layers):
        # Decoding one sequence: one matmul per step instead of two or three (each call costs more in dispatch than
        # in math here), over stacked column-major blocks kept while the weights are unchanged. With several rows the
        # per-layer path is faster (measured: batch 8 lost 13%).
        return one_row_projection(x, *layers).split(sizes, dim=-1)
    return tuple(project(layer, x) for layer in layers)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): each key/value head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(hs) + mask) V, written out; the reference the fused kernels are tested against."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, Tq, Tk)
    if attention_mask is not None:
        scores = scores + attention_mask  # 0 where allowed, -inf (or dtype min) where masked
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Tq, nh, hs)
    return output, weights


class MiniGPTAttention(nn.Module):
    """Causal self-attention with grouped key/value heads; the cache stores only the nkv key/value heads."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_key_value_groups  # read by transformers' sdpa/flex functions
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        self.o_proj.writes_residual = True  # read by _init_weights
        if config.qk_norm:  # Qwen3: normalise each head's query and key before the rotation
            self.q_norm = MiniGPTRMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = MiniGPTRMSNorm(self.head_dim, eps=config.norm_eps)
        self.resid_dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = project_together(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        query = query.view(hidden_shape)  # (B, T, nh, hs)
        key, value = key.view(hidden_shape), value.view(hidden_shape)  # (B, T, nkv, hs)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, heads, T, hs)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        if cache is not None:  # append this step's keys/values; get back the whole history (B, nkv, T_total, hs)
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hs)
        return self.resid_dropout(self.o_proj(output)), weights


# --------------------------------------------------------------------------------------------------------------------
# Memory kept from one training step to the next (CPU page faults)
# --------------------------------------------------------------------------------------------------------------------


class KeptBuffer:
    """A large tensor kept from one training step to the next, handed out again only while nothing else holds it.

    On CPU a freed tensor of hundreds of MB goes back to the operating system, and a fresh one pays a page fault on
    its first touch of every 4 KB page: for GPT-2's vocabulary and 2k tokens ~100k faults, ~135 ms, per (tokens x
    vocab) tensor (measured here; a refill of kept memory took 23 ms). The SwiGLU MLP's activations and gradients
    (below), the token embedding's weight gradient and the fused loss's logits and their exps are kept this way.
    Whether the kept tensor is free is read from its memory's reference count: while logits the caller kept (or any
    view of them) or a graph not yet backpropagated (or retained for another backward) still holds it, the next step
    gets a fresh tensor and the holder keeps the old one untouched.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.own_references = (0, 0)  # memory_references(tensor) while only this buffer holds it

    def get(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with `like`'s dtype and device: the kept one if it fits and is free."""
        tensor = self.tensor
        if tensor is not None and tensor.shape == shape and tensor.dtype == like.dtype and tensor.device == like.device:
            references = memory_references(tensor)
            if references is not None and references == self.own_references:
                return tensor
        self.tensor = None  # let go of the old one first (freed unless somebody still holds it)
        self.tensor = like.new_empty(shape)
        self.own_references = memory_references(self.tensor)
        return self.tensor


def memory_references(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(references to `tensor`'s memory, references to the tensor itself), None where torch cannot say.

    The first counts views (kept logits, a slice of them); the second counts holders of the tensor object itself,
    such as a graph that saved it for backward. Both counters are private to torch: without them nothing is reused.
    """
    storage_references = getattr(torch._C, "_storage_Use_Count", None)
    if storage_references is None or not hasattr(tensor, "_use_count"):
        return None
    return storage_references(tensor.untyped_storage()._cdata), tensor._use_count()


def kept_buffers(module: nn.Module, make: Callable[[], tuple]) -> tuple:
    """`module`'s entry in KEPT_BUFFERS, made by `make()` on its first training step (not built again every step)."""
    buffers = KEPT_BUFFERS.get(module)
    if buffers is None:
        buffers = KEPT_BUFFERS[module] = make()
    return buffers


def shared_buffer(name: str) -> KeptBuffer:
    """The KeptBuffer `name` that all layers share, for scratch used only within one layer's backward. It lives while
    a layer's entry in KEPT_BUFFERS holds it (until eval() or the model goes)."""
    buffer = SHARED_BUFFERS.get(name)
    if buffer is None:
        buffer = SHARED_BUFFERS[name] = KeptBuffer()
    return buffer


# --------------------------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------------------------


def linear_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = F.linear(rows, weight, bias), written into `out` (which may be a column slice of a wider matrix)."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)


class SwiGLUFunction(torch.autograd.Function):
    """The SwiGLU MLP, down(silu(gate(x)) * up(x)), as one autograd node for training, its big tensors in kept memory.

    At the GPT-2 small shape (8 x 512 tokens, 768 -> 2048) each (tokens x 2048) float32 activation is 32 MiB, the size
    from which glibc maps fresh memory for every tensor and unmaps it when freed, so each costs ~8k page faults on its
    first touch (a silu into fresh memory took 25-34 ms here, into kept memory 7-10 ms). As separate modules one
    layer's forward and backward allocate ~250 MB that way. Here gate and up write the two halves of one kept
    (tokens, 2I) tensor, silu(gate) * up goes into a second one (both per layer, saved for the backward), and the
    backward's two gradients (hidden, and gate/up as one tensor written in place) use scratch that all layers share
    (SHARED_BUFFERS). Side by side at that shape: 1234 -> 1142 ms per layer forward + backward, 0-2k page faults
    instead of 60-73k.
    """

    @staticmethod
    def forward(ctx, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, buffers):
        kept_gate_up, kept_hidden, d_gate_up_scratch, d_hidden_scratch = buffers
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        gate_up = kept_gate_up.get((rows.shape[0], 2 * up_weight.shape[0]), x)
        gate, up = gate_up.chunk(2, dim=-1)
        linear_into(gate, rows, gate_weight, gate_bias)
        linear_into(up, rows, up_weight, up_bias)
        hidden = torch.ops.aten.silu.out(gate, out=kept_hidden.get(gate.shape, x)).mul_(up)
        ctx.save_for_backward(rows, gate_up, hidden, gate_weight, up_weight, down_weight)
        ctx.scratch = (d_gate_up_scratch, d_hidden_scratch)
        return F.linear(hidden, down_weight, down_bias).view(*x.shape[:-1], down_weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, gate_up, hidden, gate_weight, up_weight, down_weight = ctx.saved_tensors
        d_gate_up_scratch, d_hidden_scratch = ctx.scratch
        needs = ctx.needs_input_grad  # x, gate weight, gate bias, up weight, up bias, down weight, down bias
        dy = grad.reshape(-1, grad.shape[-1])  # (N, C)
        grads = [None] * 8
        if needs[5]:
            grads[5] = dy.t() @ hidden
        if needs[6]:
            grads[6] = dy.sum(0)
        if any(needs[:5]):
            d_hidden = torch.mm(dy, down_weight, out=d_hidden_scratch.get(hidden.shape, hidden))
            d_gate_up = d_gate_up_scratch.get(gate_up.shape, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            d_gate, d_up = d_gate_up.chunk(2, dim=-1)
            torch.ops.aten.silu.out(gate, out=d_up).mul_(d_hidden)  # d/d(up) = dh * silu(gate)
            torch.mul(d_hidden, up, out=d_gate)  # d/d(gate) = dh * up * silu'(gate), the last factor in place:
            torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
            if needs[0]:
                grads[0] = torch.mm(d_gate, gate_weight).addmm_(d_up, up_weight).view(*grad.shape[:-1], -1)
            for index, d in ((1, d_gate), (3, d_up)):
                if needs[index]:
                    grads[index] = d.t() @ rows
                if needs[index + 1]:
                    grads[index + 1] = d.sum(0)
        return tuple(grads)


class MiniGPTMLP(nn.Module):
    """Position-wise feed-forward: GELU two-layer (GPT-2) or SwiGLU, act(gate(x)) * up(x) (Qwen, Llama)."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp_type == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.writes_residual = True  # read by _init_weights
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._trains_swiglu_in_kept_memory(x):
            return self.dropout(self._swiglu_in_kept_memory(x))
        if self.gated:
            gate, up = project_together(x, self.gate_proj, self.up_proj)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(project(self.up_proj, x))
        return self.dropout(self.down_proj(hidden))

    def _trains_swiglu_in_kept_memory(self, x: torch.Tensor) -> bool:
        """Training a SiLU-gated MLP of plain layers in x's dtype, no autocast (its matmuls write into kept memory)."""
        return (
            FAST_PATHS
            and self.gated
            and isinstance(self.act_fn, SiLUActivation)
            and torch.is_grad_enabled()
            and has_many_rows(x)
            and is_plain_linear(self.gate_proj, self.up_proj, self.down_proj)
            and x.dtype == self.down_proj.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
        )

    def _swiglu_in_kept_memory(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        buffers = kept_buffers(  # gate/up output and hidden (this layer's), their gradients (shared)
            self,
            lambda: (KeptBuffer(), KeptBuffer(), shared_buffer("SwiGLU d_gate_up"), shared_buffer("SwiGLU d_hidden")),
        )
        return SwiGLUFunction.apply(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, buffers)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if FAST_PATHS and isinstance(self.act_fn, NewGELUActivation):
            # GPT-2's tanh-approximate GELU: transformers writes the formula out as eight elementwise ops, each a pass
            # over the (B, T, 4C) activations forward and more backward; PyTorch's kernel computes it in one.
            return F.gelu(x, approximate="tanh")
        return self.act_fn(x)


# --------------------------------------------------------------------------------------------------------------------
# Transformer block: pre-norm attention and feed-forward, each added back to the residual stream
# --------------------------------------------------------------------------------------------------------------------


class MiniGPTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = MiniGPTAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MiniGPTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    config: MiniGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniGPTDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": MiniGPTDecoderLayer, "attentions": MiniGPTAttention}

    def train(self, mode: bool = True) -> MiniGPTPreTrainedModel:
        if not mode:  # eval(): the training buffers kept by the fast paths (the fused loss's two tokens x vocab ones,
            for module in self.modules():  # ~800 MB for GPT-2's vocabulary and 2k tokens) are freed until training
                KEPT_BUFFERS.pop(module, None)  # resumes
        return super().train(mode)

    def _init_weights(self, module: nn.Module) -> None:
        # `transformers.initialization` skips tensors already loaded by from_pretrained.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2's scaled init: projections that write into the residual stream shrink with depth.
            scale = (2 * self.config.num_hidden_layers) ** -0.5 if getattr(module, "writes_residual", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, MiniGPTRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MiniGPTRotaryEmbedding):
            # Non-persistent buffers come back uninitialised from from_pretrained's meta-device build.
            init.copy_(module.inv_freq, rope_inverse_frequencies(module.config))


def embed_tokens(embedding: nn.Embedding, input_ids: torch.Tensor, tied_to_lm_head: bool) -> torch.Tensor:
    """`embedding(input_ids)`; in CPU training of an embedding tied to the LM head, through EmbeddingKeptGradient."""
    weight = embedding.weight
    if not (
        FAST_PATHS
        and tied_to_lm_head
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and is_plain(nn.Embedding, embedding)
        and not (embedding.sparse or embedding.scale_grad_by_freq or embedding.max_norm is not None)
    ):
        return embedding(input_ids)
    (buffer,) = kept_buffers(embedding, lambda: (KeptBuffer(),))
    return EmbeddingKeptGradient.apply(input_ids, weight, embedding.padding_idx, buffer)


class EmbeddingKeptGradient(torch.autograd.Function):
    """F.embedding whose backward builds the dense (vocab x hidden) weight gradient in kept memory.

    A lookup's gradient is zero but for the rows looked up, yet autograd takes it as a dense (V, C) tensor: 77 MB for
    GPT-2's vocabulary at width 384, and on CPU a fresh one costs a page-faulting zero fill each step. With the
    embedding tied to the LM head, the head's gradient reaches `.grad` first and autograd adds this one into it in
    place, so the same memory is free to be zeroed and filled again next step (KeptBuffer). Measured side by side,
    lookup backward plus accumulation for a (8, 256) batch: 46 ms fresh, 16 ms kept.
    """

    @staticmethod
    def forward(ctx, input_ids, weight, padding_idx, buffer: KeptBuffer):
        ctx.save_for_backward(input_ids)
        ctx.weight_shape, ctx.padding_idx, ctx.buffer = weight.shape, padding_idx, buffer
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        grad_weight = ctx.buffer.get(tuple(ctx.weight_shape), grad_output).zero_()
        grad_weight.index_add_(0, input_ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]))
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            grad_weight[ctx.padding_idx] = 0
        return None, grad_weight, None, None


class MiniGPTModel(MiniGPTPreTrainedModel):
    """Token ids -> contextual hidden states (B, T, C)."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary_emb = MiniGPTRotaryEmbedding(config)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(MiniGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MiniGPTModel.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = embed_tokens(self.embed_tokens, input_ids, self.config.tie_word_embeddings)  # (B, T, C)
        # A plain causal pass (no padding, no earlier cache, no packed positions) through SDPA needs no mask tensor:
        # with is_causal the fused kernels skip the masked half. transformers' masking skips the mask the same way in
        # eager mode, but under torch.compile on torch < 2.14 it builds a full (B, 1, T, T) mask, and the kernels
        # then work through all of T x T (GPT-2 124M on an H200: attention 18.3 -> 7.4 ms per step, measured).
        plain_causal_sdpa = (
            attention_mask is None
            and position_ids is None
            and cache is None
            and self.config._attn_implementation == "sdpa"
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:  # positions continue after what the cache has already seen
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        # (B, 1, Tq, Tk) additive mask: causal and padding; None when the kernel can apply causality itself.
        mask = None
        if not plain_causal_sdpa:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.embed_dropout(hidden_states)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, **kwargs
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


# --------------------------------------------------------------------------------------------------------------------
# Next-token loss: LM head and cross-entropy with fewer passes (fast path for float32 training on CPU)
# --------------------------------------------------------------------------------------------------------------------


def next_token_targets(
    labels: torch.Tensor, ignore_index: int = -100, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Position t learns to predict labels[t + 1]; the last position has no target (as in transformers' loss)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def column_sums(matrix: torch.Tensor) -> torch.Tensor:
    """matrix.sum(dim=0) for a (V, N) matrix, as the matrix-vector product ones(V) @ matrix: the BLAS streams it once,
    the reduction kernel is slower here (50257 x 2048: 34-37 ms against 44-52 ms, measured side by side)."""
    return torch.mv(matrix.t(), matrix.new_ones(matrix.shape[0]))


def exp_and_sum(logits_t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor]:
    """out = exp(logits_t - shift) and its (N,) sums over the vocabulary (dim 0); returns (shift, sums).

    Softmax usually subtracts each token's largest logit first so that exp cannot overflow. That costs two passes
    over the (V, N) logits (the max, then the subtraction), ~3% of a GPT-2-vocabulary training step here. float32 exp
    only overflows above ~88 and loses its precision only when a whole column is tiny, so exp(x) is taken directly
    and the max is subtracted only if some column's sum came out infinite, NaN or below 1e-30 (then every term that
    matters is a normal float: the largest is at least 1e-30 / V).
    """
    torch.exp(logits_t, out=out)
    sums = column_sums(out)
    if bool(((sums >= 1e-30) & (sums < float("inf"))).all()):
        return 0.0, sums
    shift = logits_t.amax(dim=0)
    torch.sub(logits_t, shift, out=out).exp_()
    return shift, column_sums(out)


class LMHeadCrossEntropy(torch.autograd.Function):
    """logits = hidden @ weight.T and their mean cross-entropy, with two passes over the (tokens x vocab) logits.

    transformers' loss builds three more (tokens x vocab) tensors after the logits: the log-softmax, a zero-filled
    gradient and the softmax gradient, each read again in the backward pass. With GPT-2's 50k vocabulary each is
    400 MB for 2k tokens, and on CPU each fresh buffer also costs a page-faulting pass over memory. Here the forward
    pass writes exp(logits) into one buffer and sums it; nothing else of that size is written. The gradient,
    d(loss)/d(logits)[v, n] = (exp[v, n] / sum[n] - [v == target[n]]) / divisor, is never formed: the backward pass
    multiplies the exps by the weight and the hidden states, then scales each token's (C,) row by 1 / (sum x divisor)
    and subtracts its target's row, on (tokens x hidden) products a hundred times smaller. Same formula
    (logsumexp - target logit), so the loss and gradients agree to float32 rounding.

    The logits are computed vocabulary-major, (V, N) = weight @ hidden.T, and returned as its transpose (N, V): the
    same values, not contiguous in memory. The CPU BLAS runs this product ~1.4x faster than hidden @ weight.T
    (measured here: 675 ms against 1119 ms for 2048 tokens x 50257 x 384), and the two backward matmuls read the
    vocabulary-major exps faster too; the softmax sums run over dim 0 instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, divisor, buffers: tuple[KeptBuffer, KeptBuffer]):
        # hidden (N, C), weight (V, C), targets (N,); `divisor` is what the summed loss is divided by.
        ctx.set_materialize_grads(False)  # an unused `logits` output must not cost a zero-filled gradient
        shape = (weight.shape[0], hidden.shape[0])  # (V, N)
        logits_t = torch.mm(weight, hidden.t(), out=buffers[0].get(shape, hidden))  # returned as its transpose
        keep = targets != ignore_index  # (N,): tokens with a target
        safe_targets = torch.where(keep, targets, 0)
        exps = buffers[1].get(shape, hidden)
        shift, sums = exp_and_sum(logits_t, out=exps)  # exp(x - shift), (V, N); sums (N,)
        token_losses = sums.log() + shift - logits_t.gather(0, safe_targets[None])[0]  # logsumexp - target logit
        loss = torch.where(keep, token_losses, 0.0).sum() / divisor
        inverse_divisor = 1.0 / float(divisor) if float(divisor) != 0 else 0.0  # no targets at all: zero gradient
        target_scale = keep * inverse_divisor  # (N,): 1 / divisor, 0 for tokens without a target
        ctx.save_for_backward(hidden, weight, exps, safe_targets, target_scale / sums, target_scale)
        return loss, logits_t.t()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_of_logits):
        hidden, weight, exps, targets, exp_scale, target_scale = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if grad_loss is not None:
            exp_scale, target_scale = (exp_scale * grad_loss)[:, None], (target_scale * grad_loss)[:, None]  # (N, 1)
            if ctx.needs_input_grad[0]:  # row n: exp_scale[n] * sum_v exp[v, n] W[v], minus target_scale[n] * W[t[n]]
                grad_hidden = (exps.t() @ weight).mul_(exp_scale).sub_(weight[targets] * target_scale)
            if ctx.needs_input_grad[1]:  # row v: sum_n exp[v, n] * exp_scale[n] h[n], minus scaled h[n] where t[n] = v
                grad_weight = (exps @ (hidden * exp_scale)).index_add_(0, targets, hidden * target_scale, alpha=-1)
        if grad_of_logits is not None:  # the caller also differentiated through the returned (N, V) logits
            if ctx.needs_input_grad[0]:
                grad_hidden = add_or_keep(grad_hidden, grad_of_logits @ weight)
            if ctx.needs_input_grad[1]:
                grad_weight = add_or_keep(grad_weight, grad_of_logits.t() @ hidden)
        return grad_hidden, grad_weight, None, None, None, None


def add_or_keep(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total.add_(term)


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    """MiniGPTModel plus the LM head: hidden states -> next-token logits over the vocabulary."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__(config)
        self.model = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""`labels` are the input ids themselves (shifted inside the loss); -100 marks positions without loss.
        `logits_to_keep=k` computes logits for the last k positions only (generation needs just one)."""
        if use_cache is None and cache is None and self.training and torch.is_grad_enabled():
            # A training forward keeps no KV cache unless asked: nothing decodes from it, and under torch.compile its
            # keys and values become extra outputs of the graph (a GPU training step ~6% slower, measured).
            use_cache = False
        if torch.is_grad_enabled() or starts_a_sequence(cache):
            # Training frees the decoding copies of the weights; each new sequence (every generate() call starts with
            # an empty cache) remakes them, as the weights may have changed in ways no version counter records: peft's
            # merge_and_unload and EMA-style copies write through `.data`.
            self.forget_decoding_blocks()
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss = None
        if labels is not None and self._can_fuse_head_and_loss(hidden_states, logits_to_keep):
            loss, logits = self._fused_head_and_loss(hidden_states, labels, **kwargs)
        else:
            logits = project(self.lm_head, hidden_states)  # (B, T, vocab)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def forget_decoding_blocks(self) -> None:
        for module in self.modules():
            DECODING_BLOCKS.pop(module, None)

    def _can_fuse_head_and_loss(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> bool:
        """The fused head + loss serves float32 CPU training with the standard loss; all else takes the plain path
        (autocast keeps transformers' float32 upcast of the logits; under torch.compile the compiler fuses the plain
        path itself)."""
        return (
            FAST_PATHS
            and torch.is_grad_enabled()
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and is_plain_linear(self.lm_head)
            and self.lm_head.bias is None
            and self.loss_function is ForCausalLMLoss
        )

    def _fused_head_and_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ForCausalLMLoss (same arguments, same result) and the logits, via LMHeadCrossEntropy."""
        targets = next_token_targets(labels.to(hidden_states.device), ignore_index, shift_labels)
        # Mean over tokens with a target, or the sum over `num_items_in_batch` when the Trainer counts across a batch.
        divisor = (targets != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
        buffers = kept_buffers(self, lambda: (KeptBuffer(), KeptBuffer()))  # logits, exps
        loss, logits = LMHeadCrossEntropy.apply(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            self.lm_head.weight,
            targets,
            ignore_index,
            divisor,
            buffers,
        )
        return loss, logits.view(*hidden_states.shape[:-1], -1)


# transformers knows causal LMs by class name from this table: Trainer shifts labels for label smoothing only for the
# models in it (any other learns to predict each position's own token), and pipeline() and `transformers serve` read it
# too. Added here, not only in the package, so that a model loaded with trust_remote_code is known as well.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MiniGPTConfig.model_type, MiniGPTForCausalLM.__name__)

__all__ = ["MiniGPTForCausalLM", "MiniGPTModel", "MiniGPTPreTrainedModel"]
