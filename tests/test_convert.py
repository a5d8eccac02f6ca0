"""`minigpt convert`: MiniGPT and transformers' own GPT-2/Qwen2/Llama/Qwen3 compute the same thing with the same weights.

Every native model here is transformers' own class with random weights; "equal" means fp32 logits within 1e-5 on
the real tokens of a left-padded batch, identical greedy generations, and bit-identical state dicts after a round trip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.cli import main
from minigpt.convert import from_native, minigpt_config, native_architecture, to_native
from minigpt.errors import MiniGPTError

VOCAB = 300
TINY = dict(vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
LLAMA_TINY = dict(TINY, hidden_size=64, intermediate_size=112, num_attention_heads=4, max_position_embeddings=128)
GPT2_TINY = dict(vocab_size=VOCAB, n_layer=2, n_positions=128, pad_token_id=0, bos_token_id=1, eos_token_id=None)

# GPT-2 has only multi-head attention, so its shapes vary width, heads, MLP size and tying; GQA/MQA are Qwen2's.
NATIVE_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2-mha-tied": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_TINY, n_embd=64, n_head=4)),
    "gpt2-mha-untied": lambda: GPT2LMHeadModel(
        GPT2Config(**GPT2_TINY, n_embd=48, n_head=2, n_inner=96, tie_word_embeddings=False)
    ),
    "qwen2-mha-untied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_TINY, num_key_value_heads=4)),
    "qwen2-gqa-tied": lambda: Qwen2ForCausalLM(
        Qwen2Config(**LLAMA_TINY, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen2-mqa-untied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_TINY, num_key_value_heads=1)),
    "llama-gqa-biased": lambda: LlamaForCausalLM(
        LlamaConfig(**LLAMA_TINY, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    ),
    "qwen3-gqa-qknorm": lambda: Qwen3ForCausalLM(
        Qwen3Config(**LLAMA_TINY, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    ),
}


def randomise_norms_and_biases(model: torch.nn.Module) -> None:
    """Norm weights start at exactly 1 (and biases at 0); randomised, so a swapped or dropped one would show."""
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name or "ln_" in parameter_name or parameter_name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))


def random_native(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = NATIVE_MODELS[name]().eval()
    randomise_norms_and_biases(model)
    return model


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of 12 tokens, the last two left-padded; positions count real tokens only, as generate() does."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, :9] = 0
    input_ids[attention_mask == 0] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


@torch.no_grad()
def real_token_logits(model: PreTrainedModel) -> torch.Tensor:
    input_ids, attention_mask, position_ids = left_padded_batch()
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[attention_mask.bool()]  # padded rows' logits are meaningless and differ between kernels


def greedy_tokens(model: PreTrainedModel) -> torch.Tensor:
    input_ids, attention_mask, _ = left_padded_batch()
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
    )


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_from_native_logits_match_native_model_on_left_padded_batch(name: str) -> None:
    native = random_native(name)
    converted = from_native(native)
    assert isinstance(converted, MiniGPTForCausalLM)
    torch.testing.assert_close(real_token_logits(converted), real_token_logits(native), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_from_native_greedy_generation_gives_identical_tokens(name: str) -> None:
    native = random_native(name)
    assert torch.equal(greedy_tokens(from_native(native)), greedy_tokens(native))


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_to_native_round_trip_gives_identical_state_dict(name: str) -> None:
    native = random_native(name)
    back = to_native(from_native(native))
    assert type(back) is type(native)
    assert back.config.tie_word_embeddings == native.config.tie_word_embeddings
    original, round_tripped = native.state_dict(), back.state_dict()
    assert original.keys() == round_tripped.keys()
    for key in original:
        assert torch.equal(original[key], round_tripped[key]), key


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(), "GPT2LMHeadModel"),  # tiny-gpt2 as it is
        (dict(attention_bias=False, attention_out_bias=False, mlp_bias=False), "GPT2LMHeadModel"),  # zero biases
    ],
)
def test_gpt2_style_exports_to_gpt2_with_the_same_logits(overrides: dict, expected: str) -> None:
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny-gpt2", vocab_size=VOCAB, **overrides)).eval()
    native = to_native(model)
    assert type(native).__name__ == expected
    torch.testing.assert_close(real_token_logits(native), real_token_logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("preset", "overrides", "expected"),
    [
        ("tiny-gpt2", {}, "GPT2LMHeadModel"),
        ("tiny-qwen", {}, "Qwen2ForCausalLM"),
        ("qwen2.5-0.5b", {}, "Qwen2ForCausalLM"),
        ("minimind2", {}, "LlamaForCausalLM"),  # no bias anywhere: Llama's single switch covers it
        ("tiny-qwen", dict(attention_bias=True, attention_out_bias=True, mlp_bias=True), "LlamaForCausalLM"),
        ("tiny-qwen", dict(qk_norm=True, attention_bias=False), "Qwen3ForCausalLM"),
    ],
)
def test_to_native_picks_the_class_the_config_matches(preset: str, overrides: dict, expected: str) -> None:
    assert native_architecture(MiniGPTConfig.from_preset(preset, **overrides)) == expected


@pytest.mark.parametrize(
    ("preset", "overrides", "field"),
    [
        ("tiny-gpt2", dict(position_embedding_type="rope"), "norm_type"),  # layernorm + rope: no native class
        ("tiny-gpt2", dict(num_key_value_heads=2), "num_key_value_heads"),  # GPT-2 has no GQA
        ("tiny-qwen", dict(mlp_bias=True), "attention_out_bias"),  # q/k/v bias, no o bias, MLP bias
        ("tiny-qwen", dict(qk_norm=True), "qk_norm"),  # Qwen3 has one bias switch for q/k/v and o
    ],
)
def test_config_without_native_equivalent_is_refused_naming_the_field(preset: str, overrides: dict, field: str) -> None:
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset(preset, vocab_size=VOCAB, **overrides))
    with pytest.raises(MiniGPTError, match=f"field '{field}'"):
        to_native(model)


@pytest.mark.parametrize(
    ("native_config", "field"),
    [
        (
            GPT2Config(**GPT2_TINY, n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx",
        ),
        (GPT2Config(**GPT2_TINY, n_embd=64, n_head=4, scale_attn_weights=False), "scale_attn_weights"),
        (Qwen2Config(**LLAMA_TINY, use_sliding_window=True, max_window_layers=0), "use_sliding_window"),
        (
            LlamaConfig(**LLAMA_TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "rope_parameters",
        ),
    ],
)
def test_native_config_without_minigpt_equivalent_is_refused_naming_the_field(native_config, field: str) -> None:
    with pytest.raises(MiniGPTError, match=f"field '{field}'"):
        minigpt_config(native_config)


def save_with_tokenizer(model: PreTrainedModel, directory: Path) -> None:
    from minigpt.tokenization import build_tokenizer_from_texts

    model.save_pretrained(directory)
    texts = ["the cat sat on the mat", "a dog ran in the park", "猫坐在垫子上"] * 20
    build_tokenizer_from_texts(texts, vocab_size=VOCAB).save_pretrained(directory)


@pytest.mark.parametrize("name", ["gpt2-mha-untied", "qwen2-gqa-tied"])
def test_cli_converts_directories_both_ways_and_copies_the_tokenizer(name: str, tmp_path: Path) -> None:
    native = random_native(name)
    save_with_tokenizer(native, tmp_path / "native")

    assert main(["convert", "--from-native", str(tmp_path / "native"), str(tmp_path / "minigpt")]) == 0
    minigpt_dir = tmp_path / "minigpt"
    minigpt_config_json = json.loads((minigpt_dir / "config.json").read_text())
    assert minigpt_config_json["model_type"] == "minigpt" and "AutoModelForCausalLM" in minigpt_config_json["auto_map"]
    assert (minigpt_dir / "modeling_minigpt.py").is_file() and (minigpt_dir / "configuration_minigpt.py").is_file()
    assert (minigpt_dir / "tokenizer.json").read_bytes() == (tmp_path / "native" / "tokenizer.json").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(minigpt_dir)
    assert isinstance(loaded, MiniGPTForCausalLM)
    torch.testing.assert_close(real_token_logits(loaded), real_token_logits(native), atol=1e-5, rtol=0)

    assert main(["convert", "--to-native", str(minigpt_dir), str(tmp_path / "back")]) == 0
    back_dir = tmp_path / "back"
    back_config_json = json.loads((back_dir / "config.json").read_text())
    assert "auto_map" not in back_config_json and not list(back_dir.glob("*.py"))  # no remote code needed
    assert back_config_json["architectures"] == [type(native).__name__]
    assert (back_dir / "tokenizer_config.json").is_file()
    original, round_tripped = (
        load_file(tmp_path / "native" / "model.safetensors"),
        load_file(back_dir / "model.safetensors"),
    )
    assert original.keys() == round_tripped.keys()
    assert all(torch.equal(original[key], round_tripped[key]) for key in original)
    assert type(AutoModelForCausalLM.from_pretrained(back_dir)) is type(native)


def test_cli_refuses_to_replace_an_existing_output_unless_asked(tmp_path: Path, capsys) -> None:
    random_native("qwen2-mqa-untied").save_pretrained(tmp_path / "native")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "--from-native", str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["convert", "--from-native", str(tmp_path / "native"), str(tmp_path / "out"), "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["native", "out"]  # no staging folder left over


def test_cli_refuses_an_output_that_would_delete_the_source(tmp_path: Path, capsys) -> None:
    random_native("gpt2-mha-tied").save_pretrained(tmp_path / "models" / "native")
    for out in (tmp_path / "models" / "native", tmp_path / "models", tmp_path):  # the source itself, or a parent
        assert main(["convert", "--from-native", str(tmp_path / "models" / "native"), str(out), "--overwrite"]) == 2
        assert f"{out}: OUT_DIR holds " in capsys.readouterr().err
    assert (tmp_path / "models" / "native" / "model.safetensors").is_file()


def test_crash_while_saving_leaves_no_output_behind(tmp_path: Path, monkeypatch, capsys) -> None:
    random_native("gpt2-mha-tied").save_pretrained(tmp_path / "native")

    def crash(self, directory, **kwargs):
        Path(directory).mkdir(exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(MiniGPTForCausalLM, "save_pretrained", crash)
    assert main(["convert", "--from-native", str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith(f"minigpt convert: error: {tmp_path / 'out'}: cannot write: disk full\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["native"]


def test_checkpoint_missing_weights_is_refused_not_filled_with_random_values(tmp_path: Path) -> None:
    native = random_native("qwen2-gqa-tied")
    native.save_pretrained(tmp_path / "native")
    weights = load_file(tmp_path / "native" / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "native" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MiniGPTError, match="lacks weights .*model.layers.1.mlp.down_proj.weight"):
        from_native(tmp_path / "native")


def run_minigpt_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `minigpt` command, as a user runs it."""
    executable = shutil.which("minigpt", path=str(Path(sys.executable).parent))
    assert executable, "the minigpt command is not installed in this environment (pip install -e .)"
    return subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_on_missing_directory_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    result = run_minigpt_command("convert", "--from-native", "no-such-model", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["minigpt convert: error: no-such-model: no such directory"]
    assert not (tmp_path / "out").exists()


def test_cli_on_unsupported_architecture_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = run_minigpt_command("convert", "--from-native", "bert", "out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("minigpt convert: error: bert/config.json: field 'model_type': 'bert' is not supported")
