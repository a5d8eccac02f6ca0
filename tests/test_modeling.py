"""MiniGPTConfig and MiniGPTForCausalLM behave as a transformers causal LM must, in both styles.

Each test takes both styles (GPT-2: layernorm, GELU MLP, learned positions; Qwen: rmsnorm, SwiGLU, RoPE, GQA) with
random weights, and compares two routes that must agree: cache vs no cache, sdpa vs eager, static vs dynamic cache,
in-memory vs saved-and-reloaded, with vs without activation checkpointing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.modeling_minigpt import rope_inverse_frequencies

STYLES = ["tiny-gpt2", "tiny-qwen"]


def random_model(preset: str, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(preset, vocab_size=128, pad_token_id=0, **overrides)
    return MiniGPTForCausalLM(config).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 128, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def greedy(model: MiniGPTForCausalLM, max_new_tokens: int = 64, **kwargs) -> torch.Tensor:
    input_ids, attention_mask = left_padded_batch()
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(mlp_type="relu2"), "mlp_type"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
    ],
)
def test_impossible_config_raises_value_error_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MiniGPTConfig.from_preset("tiny-qwen", **overrides)


def test_from_preset_refuses_a_field_no_config_has_but_takes_transformers_own() -> None:
    with pytest.raises(ValueError, match=r"unknown config field 'num_layers' \(did you mean 'num_hidden_layers'\?\)"):
        MiniGPTConfig.from_preset("tiny-qwen", num_layers=8)
    assert MiniGPTConfig.from_preset("tiny-qwen", attn_implementation="eager")._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("preset", "parameters"),
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("qwen2.5-0.5b", 494_032_768)],
)
def test_presets_have_the_published_models_parameter_counts(preset: str, parameters: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = MiniGPTForCausalLM(MiniGPTConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_qwen_preset_has_exactly_qwen2_parameter_names_and_shapes() -> None:
    config = MiniGPTConfig.from_preset("qwen2.5-0.5b")
    qwen_config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        ours, theirs = MiniGPTForCausalLM(config), Qwen2ForCausalLM(qwen_config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# Generation and attention routes that must agree
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", STYLES)
def test_generation_with_cache_equals_generation_without_cache(preset: str) -> None:
    model = random_model(preset)
    with_cache = greedy(model, use_cache=True)
    assert with_cache.shape[1] == 10 + 64
    assert torch.equal(with_cache, greedy(model, use_cache=False))


@pytest.mark.parametrize("preset", STYLES)
def test_static_cache_equals_dynamic_cache(preset: str) -> None:
    model = random_model(preset)
    assert torch.equal(greedy(model, 24, cache_implementation="static"), greedy(model, 24))


@pytest.mark.parametrize("preset", STYLES)
@torch.no_grad()
def test_sdpa_equals_eager_on_real_tokens(preset: str) -> None:
    model = random_model(preset)
    input_ids, attention_mask = left_padded_batch()
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("eager")
    eager = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # fully masked padding rows legitimately differ between kernels
    torch.testing.assert_close(sdpa[real], eager[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_gqa_cache_stores_only_the_key_value_heads() -> None:
    model = random_model("tiny-qwen", num_attention_heads=4, num_key_value_heads=1)
    cache = DynamicCache(config=model.config)
    model(torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    assert cache.layers[0].keys.shape == (1, 1, 3, model.config.head_dim)  # (B, nkv, T, hs), not nh heads


# --------------------------------------------------------------------------------------------------------------------
# Save and reload
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", STYLES)
@torch.no_grad()
def test_rope_buffers_and_logits_are_right_after_from_pretrained(preset: str, tmp_path: Path) -> None:
    model = random_model(preset)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, MiniGPTForCausalLM)
    if model.config.position_embedding_type == "rope":
        inv_freq = reloaded.model.rotary_emb.inv_freq
        assert torch.equal(inv_freq, rope_inverse_frequencies(model.config))  # not meta-device garbage
    input_ids, attention_mask = left_padded_batch()
    assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_tied_embeddings_share_one_tensor_and_are_saved_once(tmp_path: Path) -> None:
    model = random_model("tiny-qwen", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys() and "model.embed_tokens.weight" in weights.keys()
    reloaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight

    untied = random_model("tiny-qwen", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", STYLES)
@torch.no_grad()
def test_hidden_states_and_attentions_come_back_with_right_counts_and_shapes(preset: str) -> None:
    model = random_model(preset)
    model.set_attn_implementation("eager")  # only the eager path materialises attention weights
    input_ids, attention_mask = left_padded_batch()
    outputs = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    config = model.config
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1  # embeddings + every block
    assert all(h.shape == (2, 10, config.hidden_size) for h in outputs.hidden_states)
    assert len(outputs.attentions) == config.num_hidden_layers
    assert all(a.shape == (2, config.num_attention_heads, 10, 10) for a in outputs.attentions)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(2, config.num_attention_heads, 10))


@pytest.mark.parametrize("preset", STYLES)
@torch.no_grad()
def test_return_dict_false_gives_a_tuple_led_by_loss_then_logits(preset: str) -> None:
    model = random_model(preset)
    input_ids, _ = left_padded_batch()
    as_dict = model(input_ids, labels=input_ids)
    as_tuple = model(input_ids, labels=input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


@pytest.mark.parametrize("preset", STYLES)
@torch.no_grad()
def test_logits_to_keep_returns_the_last_positions_only(preset: str) -> None:
    model = random_model(preset)
    input_ids, attention_mask = left_padded_batch()
    full = model(input_ids, attention_mask=attention_mask).logits
    last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


@torch.no_grad()
def test_loss_is_next_token_cross_entropy_ignoring_minus_100() -> None:
    model = random_model("tiny-qwen")
    input_ids, _ = left_padded_batch()
    labels = input_ids.clone()
    labels[:, :4] = -100
    logits = model(input_ids).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(model(input_ids, labels=labels).loss, expected)


# --------------------------------------------------------------------------------------------------------------------
# Training features
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", STYLES)
def test_activation_checkpointing_gives_identical_gradients(preset: str) -> None:
    input_ids, attention_mask = left_padded_batch()

    def gradients(model: MiniGPTForCausalLM) -> tuple[dict[str, torch.Tensor], int]:
        mlp = model.model.layers[0].mlp
        block_calls = []  # counted in forward itself: torch does not rerun hooks when it recomputes a checkpoint
        mlp.forward = lambda x, forward=mlp.forward: block_calls.append(1) or forward(x)
        model.train()
        model(input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}, len(block_calls)

    plain, plain_calls = gradients(random_model(preset))
    checkpointed_model = random_model(preset)
    checkpointed_model.activation_checkpointing_enable()
    checkpointed, checkpointed_calls = gradients(checkpointed_model)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block really was recomputed in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
