"""Every fast path in modeling_minigpt.py computes what the plain path computes, and still matches transformers.

Fast paths: the fused LM head + cross-entropy (float32 CPU training), the stacked q/k/v and gate/up matmuls, PyTorch's
fused tanh-GELU, the closed-form backwards of RMSNorm, RoPE's rotation and the SwiGLU MLP (in kept memory) and the
tied embedding's kept gradient (training), the decoding projections (CPU generation), causal attention without a mask
tensor, and no KV cache in training forwards. Each test runs the same model with `FAST_PATHS` on and off (`plain`), or
another route to the same numbers, or transformers' own GPT2LMHeadModel / Qwen2ForCausalLM with the same weights, and
compares with `assert_close`.
"""

from __future__ import annotations

import gc
import io
import weakref
from collections.abc import Callable
from copy import deepcopy

import pytest
import torch
from torch import nn
from transformers import masking_utils

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt import modeling_minigpt as modeling
from minigpt.convert import to_native

STYLES = ["tiny-gpt2", "tiny-qwen"]
VOCAB = 384
# Float32 results of the same math with a different summation order: equal to well below the parity tests' 1e-5.
CLOSE = dict(rtol=1e-5, atol=1e-6)


def random_model(preset: str, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(preset, vocab_size=VOCAB, pad_token_id=0, **overrides)
    return MiniGPTForCausalLM(config)


def training_batch(rows: int = 3, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels with some positions excluded from the loss (-100), as an SFT batch has."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = -100
    labels[1, 30:] = -100
    return input_ids, labels


def plain(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> object:
    """`run()` with every fast path switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(modeling, "FAST_PATHS", False)
        return run()


def loss_logits_grads(model: nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return output.loss.detach(), output.logits.detach(), grads


def graph_node_names(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `output` was computed through."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def module_forward_backward(
    module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor
) -> tuple[list[torch.Tensor], set[str]]:
    """module(inputs) backpropagated from `grad`: [output, input gradient, parameter gradients] and the names of the
    autograd nodes it went through."""
    module.zero_grad(set_to_none=True)
    x = inputs.clone().requires_grad_()
    output = module(x)
    output.backward(grad)
    return [output.detach(), x.grad] + [p.grad for p in module.parameters()], graph_node_names(output)


def assert_same_training_step(fast: tuple, slow: tuple, scale: float = 1.0) -> None:
    """Equal losses, logits and gradients; `scale` widens the absolute tolerance where the weights were scaled up."""
    (fast_loss, fast_logits, fast_grads), (slow_loss, slow_logits, slow_grads) = fast, slow
    close = dict(CLOSE, atol=CLOSE["atol"] * scale)
    torch.testing.assert_close(fast_loss, slow_loss, **close)
    torch.testing.assert_close(fast_logits, slow_logits, **close)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], **close, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("preset", STYLES)
def test_plain_causal_pass_gives_sdpa_no_mask_and_the_same_numbers(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No padding mask, no cache: SDPA gets is_causal and no mask tensor (its causal kernels), even where transformers'
    masking builds a full mask (under torch.compile before torch 2.14, simulated here); the numbers equal the masked
    route's."""
    model = random_model(preset, attn_implementation="sdpa")
    input_ids, labels = training_batch()
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return real_sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(masking_utils, "is_torchdynamo_exporting", lambda: True)  # what dynamo saw before torch 2.14
    no_mask = loss_logits_grads(model, input_ids=input_ids, labels=labels)
    assert calls == [(True, True)] * model.config.num_hidden_layers
    calls.clear()
    all_ones = torch.ones_like(input_ids)
    masked = loss_logits_grads(model, input_ids=input_ids, labels=labels, attention_mask=all_ones)
    assert calls == [(False, False)] * model.config.num_hidden_layers  # the all-ones mask became a causal mask tensor
    assert_same_training_step(no_mask, masked)


def test_training_forward_builds_no_cache_unless_asked() -> None:
    """A training forward returns no KV cache by default (transformers' models build one), with the same numbers as
    when asked for one; eval, no-grad and explicit use_cache=True forwards keep theirs."""
    model = random_model("tiny-qwen")
    input_ids, labels = training_batch()
    default = model.train()(input_ids=input_ids, labels=labels)
    asked = model(input_ids=input_ids, labels=labels, use_cache=True)
    assert default.cache is None and asked.cache.get_seq_length() == input_ids.shape[1]
    torch.testing.assert_close(default.loss, asked.loss, rtol=0, atol=0)
    torch.testing.assert_close(default.logits, asked.logits, rtol=0, atol=0)
    with torch.no_grad():
        assert model(input_ids=input_ids).cache is not None
    assert model.eval()(input_ids=input_ids).cache is not None


# --------------------------------------------------------------------------------------------------------------------
# Training: fused LM head + loss, stacked projections, fused GELU
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", STYLES)
def test_training_step_fast_path_equals_plain_path(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 120 rows: enough for the stacked q/k/v and gate/up matmuls to engage, and several loss blocks.
    model = random_model(preset)
    input_ids, labels = training_batch()
    fast = loss_logits_grads(model, input_ids=input_ids, labels=labels)
    slow = plain(monkeypatch, lambda: loss_logits_grads(model, input_ids=input_ids, labels=labels))
    assert_same_training_step(fast, slow)


@pytest.mark.parametrize("preset", STYLES)
def test_training_step_matches_transformers_own_model(preset: str) -> None:
    ours = random_model(preset)
    native = to_native(ours)  # GPT2LMHeadModel or Qwen2ForCausalLM with the same weights, running its own code
    input_ids, labels = training_batch()
    our_loss, our_logits, our_grads = loss_logits_grads(ours, input_ids=input_ids, labels=labels)
    native_loss, native_logits, native_grads = loss_logits_grads(native, input_ids=input_ids, labels=labels)
    torch.testing.assert_close(our_loss, native_loss, **CLOSE)
    torch.testing.assert_close(our_logits, native_logits, rtol=1e-5, atol=1e-5)
    native_names = {
        "model.embed_tokens.weight": "transformer.wte.weight" if preset == "tiny-gpt2" else "model.embed_tokens.weight",
        "model.norm.weight": "transformer.ln_f.weight" if preset == "tiny-gpt2" else "model.norm.weight",
    }
    if preset == "tiny-qwen":  # same parameter names: every gradient must agree
        native_names = {name: name for name in our_grads}
    for ours_name, native_name in native_names.items():
        torch.testing.assert_close(our_grads[ours_name], native_grads[native_name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["training", "inference"])
def test_rotation_in_place_equals_rotate_half(grad_enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries and keys rotated without rotate_half's copy (the Rotation node in training, `rotated` without grad):
    the same values and gradients as x * cos + rotate_half(x) * sin, for GQA's different head counts."""
    config = MiniGPTConfig.from_preset("tiny-qwen", vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(6)
    positions = torch.randint(0, 500, (2, 9), generator=generator)  # any positions, as with left padding
    cos, sin = modeling.MiniGPTRotaryEmbedding(config)(torch.zeros(1), positions)
    # (B, heads, T, hs) views of (B, T, heads, hs), as the attention makes them
    queries, keys = (torch.randn(2, 9, heads, config.head_dim, generator=generator).transpose(1, 2) for heads in (4, 2))
    grads = [torch.randn(x.shape, generator=generator) for x in (queries, keys)]

    def rotate() -> list[torch.Tensor]:
        with torch.set_grad_enabled(grad_enabled):
            inputs = [x.clone().requires_grad_(grad_enabled) for x in (queries, keys)]
            outputs = modeling.apply_rotary_pos_emb(*inputs, cos, sin)
            if not grad_enabled:
                return list(outputs)
            torch.autograd.backward(outputs, grads)
            assert {type(output.grad_fn).__name__ for output in outputs} == (
                {"RotationBackward"} if modeling.FAST_PATHS else {"AddBackward0"}
            )
            return [output.detach() for output in outputs] + [x.grad for x in inputs]

    fast, slow = rotate(), plain(monkeypatch, rotate)
    for fast_tensor, slow_tensor in zip(fast, slow, strict=True):
        torch.testing.assert_close(fast_tensor, slow_tensor, **CLOSE)


@pytest.mark.parametrize("shape", [(3, 5, 48), (3, 5, 4, 48)], ids=["hidden states", "per-head (Qwen3 qk-norm)"])
def test_rms_norm_closed_form_backward_equals_autograd_through_rms_norm(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    norm = modeling.MiniGPTRMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(4)
    inputs, grad = torch.randn(shape, generator=generator) * 3, torch.randn(shape, generator=generator)
    fast, fast_nodes = module_forward_backward(norm, inputs, grad)
    slow, slow_nodes = plain(monkeypatch, lambda: module_forward_backward(norm, inputs, grad))
    assert "RMSNormFunctionBackward" in fast_nodes and "RMSNormFunctionBackward" not in slow_nodes
    for fast_tensor, slow_tensor in zip(fast, slow, strict=True):
        torch.testing.assert_close(fast_tensor, slow_tensor, **CLOSE)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_in_kept_memory_equals_the_plain_modules(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training a SiLU-gated MLP runs it as one SwiGLUFunction node (activations in kept memory, gate/up gradient
    written as one tensor): the same output and gradients as gate, up and down as modules and silu(gate) * up."""
    config = MiniGPTConfig.from_preset("tiny-qwen", vocab_size=VOCAB, mlp_bias=bias)
    torch.manual_seed(0)
    mlp = modeling.MiniGPTMLP(config)
    if bias:
        with torch.no_grad():
            for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                layer.bias.uniform_(-0.5, 0.5)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(3, 40, config.hidden_size, generator=generator)
    grad = torch.randn(3, 40, config.hidden_size, generator=generator)
    fast, fast_nodes = module_forward_backward(mlp, inputs, grad)
    slow, slow_nodes = plain(monkeypatch, lambda: module_forward_backward(mlp, inputs, grad))
    assert "SwiGLUFunctionBackward" in fast_nodes and "SwiGLUFunctionBackward" not in slow_nodes
    assert len(fast) == len(slow) == 2 + (6 if bias else 3)
    for fast_tensor, slow_tensor in zip(fast, slow, strict=True):
        torch.testing.assert_close(fast_tensor, slow_tensor, **CLOSE)


def test_swiglu_kept_memory_is_reused_only_when_no_graph_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step after step the MLPs run in the same kept memory, and all layers share one gradient scratch; two forwards
    before their backwards (gradient accumulation in the other order) get separate memory and the right gradients."""
    model = random_model("tiny-qwen")
    input_ids, labels = training_batch()
    other_ids = input_ids.flip(0)
    mlps = [layer.mlp for layer in model.model.layers]

    def kept_memory() -> list[tuple[int, ...]]:
        return [tuple(buffer.tensor.data_ptr() for buffer in modeling.KEPT_BUFFERS[mlp]) for mlp in mlps]

    loss_logits_grads(model, input_ids=input_ids, labels=labels)
    first = kept_memory()
    loss_logits_grads(model, input_ids=other_ids, labels=other_ids)
    assert kept_memory() == first
    assert len({memory[2:] for memory in first}) == 1  # d_gate_up and d_hidden: one pair for all layers
    assert len({memory[:2] for memory in first}) == len(mlps)  # gate/up output and hidden: each layer its own

    def two_forwards_then_backwards() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        first_loss = model(input_ids=input_ids, labels=labels).loss
        second_loss = model(input_ids=other_ids, labels=other_ids).loss
        second_loss.backward()
        first_loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    fast, slow = two_forwards_then_backwards(), plain(monkeypatch, two_forwards_then_backwards)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], **CLOSE, msg=lambda m, n=name: f"{n}: {m}")
    model.eval()
    assert not any(mlp in modeling.KEPT_BUFFERS for mlp in mlps)
    gc.collect()
    assert "SwiGLU d_gate_up" not in modeling.SHARED_BUFFERS  # the shared scratch went with the last layer's entry


@pytest.mark.parametrize("scale", [1.0, 40.0, -40.0], ids=["ordinary", "overflowing", "all-tiny"])
def test_softmax_sums_without_the_max_shift_equal_logsumexp(scale: float) -> None:
    """exp_and_sum skips the max subtraction while exp cannot overflow or underflow; logits above ~88 (overflowing)
    or columns of only very negative logits (all-tiny: every exp is 0 in float32) take the shifted path instead."""
    generator = torch.Generator().manual_seed(3)
    logits_t = torch.randn(500, 7, generator=generator) * 3
    logits_t[:, 3] += scale * 5  # one token's logits: ordinary, up to ~215, or all below ~-185
    shift, sums = modeling.exp_and_sum(logits_t, out=torch.empty_like(logits_t))
    assert isinstance(shift, float) == (scale == 1.0)  # the shift is only paid for where needed
    torch.testing.assert_close(sums.log() + shift, torch.logsumexp(logits_t, dim=0))


def test_fused_loss_with_huge_logits_equals_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model("tiny-qwen")
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)  # logits in the hundreds: exp without a shift would overflow
    input_ids, labels = training_batch()
    fast = loss_logits_grads(model, input_ids=input_ids, labels=labels)
    assert fast[1].abs().max() > 100 and fast[0].isfinite()
    # One float32 rounding of a hidden state moves a logit by up to ~400x as much here (seen: 1.9e-5 at logits ~200).
    assert_same_training_step(
        fast, plain(monkeypatch, lambda: loss_logits_grads(model, input_ids=input_ids, labels=labels)), scale=400.0
    )


def test_fused_loss_runs_in_training_and_steps_aside_elsewhere() -> None:
    model = random_model("tiny-qwen").train()
    input_ids, labels = training_batch()
    fused = model(input_ids=input_ids, labels=labels).loss
    assert type(fused.grad_fn).__name__ == "LMHeadCrossEntropyBackward"
    with torch.no_grad():
        assert model(input_ids=input_ids, labels=labels).loss.grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "LMHeadCrossEntropy" not in type(model(input_ids=input_ids, labels=labels).loss.grad_fn).__name__
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output)
    assert "LMHeadCrossEntropy" not in type(model(input_ids=input_ids, labels=labels).loss.grad_fn).__name__
    handle.remove()


@pytest.mark.parametrize(
    "loss_kwargs",
    [
        dict(num_items_in_batch=torch.tensor(50)),  # the Trainer's count across gradient-accumulation micro-batches
        dict(ignore_index=-1),
        dict(shift_labels="explicit"),
    ],
    ids=["num_items_in_batch", "ignore_index", "shift_labels"],
)
def test_fused_loss_takes_transformers_loss_arguments(loss_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model("tiny-qwen")
    input_ids, labels = training_batch()
    if loss_kwargs.get("ignore_index") is not None:
        labels = labels.masked_fill(labels == -100, loss_kwargs["ignore_index"])
    if loss_kwargs.get("shift_labels") == "explicit":
        loss_kwargs = dict(shift_labels=torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].roll(1, dims=1))
    inputs = dict(input_ids=input_ids, labels=labels, **loss_kwargs)
    fast = loss_logits_grads(model, **inputs)
    assert_same_training_step(fast, plain(monkeypatch, lambda: loss_logits_grads(model, **inputs)))


def test_fused_loss_with_no_targets_is_nan_with_zero_gradients_as_transformers() -> None:
    model = random_model("tiny-qwen").train()
    input_ids, _ = training_batch()
    output = model(input_ids=input_ids, labels=torch.full_like(input_ids, -100))
    assert type(output.loss.grad_fn).__name__ == "LMHeadCrossEntropyBackward"
    assert output.loss.isnan()  # mean over zero tokens, exactly as transformers' loss
    output.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_gradients_through_both_the_loss_and_the_returned_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    # A distillation-style objective: the loss scaled (not 1.0) plus a term on the logits themselves.
    model = random_model("tiny-gpt2")
    input_ids, labels = training_batch()

    def step() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        output = model(input_ids=input_ids, labels=labels)
        (0.5 * output.loss + output.logits.square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    fast, slow = step(), plain(monkeypatch, step)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], **CLOSE)


def test_loss_buffers_are_reused_only_when_nothing_else_holds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loss keeps its (tokens x vocab) logits and gradient between steps (fresh memory costs a page fault per
    4 KB on CPU). A step in kept memory equals the plain path; memory still held elsewhere (logits the caller kept, a
    slice of them, a graph not yet backpropagated or retained for a second backward) is never reused."""
    model = random_model("tiny-qwen")
    input_ids, labels = training_batch()
    other_ids = input_ids.flip(0)

    def kept_memory() -> tuple[int, int]:
        return tuple(buffer.tensor.data_ptr() for buffer in modeling.KEPT_BUFFERS[model])  # logits, exps

    memory = []
    for _ in range(2):
        loss, logits, grads = loss_logits_grads(model, input_ids=input_ids, labels=labels)
        logits = logits.clone()  # let go of the kept logits, so that the next step may reuse them
        memory.append(kept_memory())
        slow = plain(monkeypatch, lambda: loss_logits_grads(model, input_ids=input_ids, labels=labels))
        assert_same_training_step((loss, logits, grads), slow)
    assert memory[1] == memory[0]  # the second step ran in the first one's memory

    # Logits the caller keeps, here only a slice of them, are not overwritten by the next step.
    last_logits = model(input_ids=input_ids, labels=labels).logits[:, -1]
    expected = last_logits.detach().clone()
    model(input_ids=other_ids, labels=other_ids).loss.backward()
    torch.testing.assert_close(last_logits, expected, rtol=0, atol=0)
    del last_logits

    # Gradient accumulation in the other order: two forwards, then both backwards; the sum of grads must match.
    model.zero_grad(set_to_none=True)
    first, second = model(input_ids=input_ids, labels=labels).loss, model(input_ids=other_ids, labels=other_ids).loss
    (first + second).backward()
    together = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=labels).loss.backward()
    model(input_ids=other_ids, labels=other_ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(together[name], p.grad, **CLOSE)

    # A graph retained for a second backward, with another step in between: the same gradients the second time.
    model.zero_grad(set_to_none=True)
    retained = model(input_ids=input_ids, labels=labels).loss
    retained.backward(retain_graph=True)
    once = {name: p.grad.clone() for name, p in model.named_parameters()}
    model(input_ids=other_ids, labels=other_ids).loss.backward()
    model.zero_grad(set_to_none=True)
    retained.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, once[name], rtol=0, atol=0)


@pytest.mark.parametrize("preset", STYLES)
def test_tied_embedding_gradient_is_built_in_kept_memory_and_equals_the_plain_path(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token embedding's (vocab x hidden) gradient is built in memory kept between steps when the LM head shares
    its weight (the head's gradient reaches .grad first, this one is added into it): the same gradients as
    nn.Embedding, padding row included, and the second step runs in the first one's memory. Untied, nothing is kept."""
    model = random_model(preset)
    input_ids, labels = training_batch()
    input_ids[2, :5] = 0  # padding tokens as inputs: nn.Embedding gives the padding row no gradient
    memory = []
    for _ in range(2):
        fast = loss_logits_grads(model, input_ids=input_ids, labels=labels)
        memory.append(modeling.KEPT_BUFFERS[model.model.embed_tokens][0].tensor.data_ptr())
        slow = plain(monkeypatch, lambda: loss_logits_grads(model, input_ids=input_ids, labels=labels))
        assert_same_training_step(fast, slow)
    assert memory[1] == memory[0]

    untied = random_model(preset, tie_word_embeddings=False)
    loss_logits_grads(untied, input_ids=input_ids, labels=labels)
    assert untied.model.embed_tokens not in modeling.KEPT_BUFFERS


def test_eval_mode_frees_the_kept_training_buffers() -> None:
    model = random_model("tiny-qwen").train()
    input_ids, labels = training_batch()
    holders = (model, model.model.embed_tokens)  # the fused loss's logits and exps; the embedding's gradient

    def kept_tensors() -> list[torch.Tensor]:
        return [buffer.tensor for holder in holders for buffer in modeling.KEPT_BUFFERS[holder]]

    model(input_ids=input_ids, labels=labels).loss.backward()
    kept = [weakref.ref(tensor) for tensor in kept_tensors()]
    assert len(kept) == 3
    model.eval()
    gc.collect()
    assert all(tensor() is None for tensor in kept)
    model.train()
    model(input_ids=input_ids, labels=labels).loss.backward()  # and training goes on with new ones
    assert all(tensor is not None for tensor in kept_tensors())


def test_copies_and_pickles_of_a_used_model_carry_no_kept_buffers_or_weight_copies() -> None:
    model = random_model("tiny-qwen").train()
    input_ids, labels = training_batch()
    model(input_ids=input_ids, labels=labels).loss.backward()  # the fused loss keeps its buffers
    with torch.no_grad():
        model.generate(input_ids[:1], max_new_tokens=3, do_sample=False)  # one row: decoding copies of the weights
    assert model in modeling.KEPT_BUFFERS and model.lm_head in modeling.DECODING_BLOCKS
    copy = deepcopy(model)
    assert copy not in modeling.KEPT_BUFFERS
    assert not any(module in modeling.DECODING_BLOCKS for module in copy.modules())
    whole, weights = io.BytesIO(), io.BytesIO()
    torch.save(model, whole)
    torch.save(model.state_dict(), weights)
    assert whole.tell() < weights.tell() + 100_000  # the weights and the module structure, nothing the size of a copy


@pytest.mark.parametrize("target", [["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ["down_proj"]])
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["inference", "training"])
def test_fast_paths_step_aside_for_lora_layers(
    target: list[str], grad_enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked projections (inference) and the kept-memory SwiGLU MLP (training) use weights directly: a LoRA
    adapter on any of their layers must send them to the plain modules."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        random_model("tiny-qwen"), peft.LoraConfig(r=4, target_modules=target, init_lora_weights=False)
    )
    input_ids, _ = training_batch()
    model.train(grad_enabled)
    with torch.set_grad_enabled(grad_enabled):
        lora = model(input_ids=input_ids).logits.detach()
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits.detach()
        slow = plain(monkeypatch, lambda: model(input_ids=input_ids).logits.detach())
    assert not torch.allclose(lora, base)  # the adapters change the output...
    torch.testing.assert_close(lora, slow, **CLOSE)  # ...and are applied, not bypassed by a fast path


def test_fused_gelu_equals_transformers_gelu_new() -> None:
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 10_001, requires_grad=True)
    mlp = modeling.MiniGPTMLP(MiniGPTConfig.from_preset("tiny-gpt2"))
    fast = mlp.activation(x)
    reference = ACT2FN["gelu_new"](x)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    (fast_grad,) = torch.autograd.grad(fast.sum(), x)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-5, atol=2e-6)  # derivatives are O(1): a few ulps


# --------------------------------------------------------------------------------------------------------------------
# Generation: decoding LM head
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5])
def test_decoding_projection_equals_the_layer_and_follows_weight_updates(rows: int) -> None:
    model = random_model("tiny-gpt2").eval()
    layers = {"lm_head": model.lm_head, "up_proj (with bias)": model.model.layers[0].mlp.up_proj}
    for name, layer in layers.items():
        x = torch.randn(rows, 1, layer.in_features)
        with torch.inference_mode():
            assert modeling.is_decoding_step(x) and layer.out_features > layer.in_features, name
            torch.testing.assert_close(modeling.project(layer, x), layer(x), **CLOSE, msg=name)
        with torch.no_grad():  # an optimizer step or load_state_dict changes the weight in place
            layer.weight.mul_(-2.0)
        with torch.inference_mode():
            torch.testing.assert_close(modeling.project(layer, x), layer(x), **CLOSE, msg=name)
    assert (model.lm_head in modeling.DECODING_BLOCKS) == (rows == 1)
    model.train()(input_ids=torch.tensor([[1, 2, 3]]))  # a training forward frees the decoding copies
    assert model.lm_head not in modeling.DECODING_BLOCKS


@pytest.mark.parametrize("threads", [1, 3])
def test_one_row_projection_in_blocks_equals_the_layers(threads: int) -> None:
    """A one-row decoding step multiplies by one column-major block of the stacked weights per thread (here 1 or 3,
    the last block zero-padded: 1001 outputs); the result is the layers' outputs side by side."""
    torch.manual_seed(0)
    layers = (nn.Linear(48, 700), nn.Linear(48, 301))
    x = torch.randn(1, 1, 48)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fast = modeling.one_row_projection(x, *layers)
    finally:
        torch.set_num_threads(previous)
    blocks, _ = modeling.decoding_blocks(*layers)
    assert blocks.shape == (threads, 48, -(-1001 // threads))
    with torch.inference_mode():
        torch.testing.assert_close(fast, torch.cat([layer(x) for layer in layers], dim=-1), **CLOSE)


def test_stacked_decoding_projections_equal_the_layers_and_follow_updates() -> None:
    """Decoding one sequence runs q/k/v (with biases, Qwen style) and gate/up as one matmul over a kept stacked copy."""
    rows = 1
    model = random_model("tiny-qwen").eval()
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    groups = {"q/k/v": (attention.q_proj, attention.k_proj, attention.v_proj), "gate/up": (mlp.gate_proj, mlp.up_proj)}
    for name, layers in groups.items():
        x = torch.randn(rows, 1, layers[0].in_features)
        for change in (None, "weight", "bias"):
            target = layers[-1].weight if change == "weight" else layers[-1].bias if change == "bias" else None
            if target is not None:
                with torch.no_grad():  # an optimizer step or load_state_dict changes a tensor in place
                    target.mul_(-2.0)
            with torch.inference_mode():
                assert modeling.is_decoding_step(x), name
                for fast, layer in zip(modeling.project_together(x, *layers), layers, strict=True):
                    torch.testing.assert_close(fast, layer(x), **CLOSE, msg=f"{name} after {change}")
        assert layers[0] in modeling.DECODING_BLOCKS, name
    model.train()(input_ids=torch.tensor([[1, 2, 3]]))  # a training forward frees the decoding copies
    assert attention.q_proj not in modeling.DECODING_BLOCKS


@pytest.mark.parametrize("preset", STYLES)
def test_generate_after_a_lora_merge_uses_the_merged_weights(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's merge_and_unload adds the adapter through `weight.data`, which leaves the version counter as it was:
    a generate() before the merge kept decoding with the unmerged copies of the weights afterwards."""
    from peft import LoraConfig, get_peft_model

    model = random_model(preset).eval()
    prompt = torch.tensor([[5, 9, 2, 7]])
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    before = model.generate(prompt, **greedy)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    merged = lora.merge_and_unload().eval()
    after = merged.generate(prompt, **greedy)
    assert not torch.equal(after, before)  # the merge changed what the model says
    assert torch.equal(after, plain(monkeypatch, lambda: merged.generate(prompt, **greedy)))
    with torch.no_grad():  # and any write through .data, as EMA or weight averaging code does
        merged.lm_head.weight.data.mul_(-1.0)
    assert torch.equal(merged.generate(prompt, **greedy), plain(monkeypatch, lambda: merged.generate(prompt, **greedy)))


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, :7] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.mark.parametrize("preset", STYLES)
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_gives_the_same_tokens_as_the_plain_path_and_transformers(
    preset: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = random_model(preset).eval()
    native = to_native(model).eval()
    input_ids, attention_mask = (tensor[-batch:] for tensor in left_padded_prompts())

    def greedy(m: nn.Module) -> torch.Tensor:
        return m.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=40, min_new_tokens=40, do_sample=False
        )

    fast = greedy(model)
    assert torch.equal(fast, plain(monkeypatch, lambda: greedy(model)))
    assert torch.equal(fast, greedy(native))
