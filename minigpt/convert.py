"""Conversion between MiniGPT and transformers' native classes, both ways, with the weights unchanged.

`--from-native` lets a user start from a published GPT-2, Qwen2, Llama or Qwen3 checkpoint; `--to-native` writes the
class that vLLM, llama.cpp's converter and LLaMA-Factory load without remote code. Which native class fits is decided
by the architecture switches in the config:

| MiniGPT config                                                             | native class       |
|----------------------------------------------------------------------------|--------------------|
| layernorm + gelu MLP + learned positions, one key/value head per query head | GPT2LMHeadModel    |
| rmsnorm + swiglu + rope, q/k norm, same bias on q/k/v and o, no MLP bias    | Qwen3ForCausalLM   |
| rmsnorm + swiglu + rope, same bias on q/k/v and o                           | LlamaForCausalLM   |
| rmsnorm + swiglu + rope, bias on q/k/v only, no MLP bias                    | Qwen2ForCausalLM   |

Anything else (GPT-2 with per-layer attention scaling, layernorm with rope, a sliding window, scaled RoPE, ...) has no
exact counterpart and is refused with the reason. Qwen2/Llama/Qwen3 use MiniGPT's own parameter names, so their weights
copy over as they are; GPT-2 stores its projections as Conv1D (in, out), the transpose of nn.Linear, and fuses q/k/v
into one `c_attn` matrix, which is split.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from .configuration_minigpt import MiniGPTConfig
from .errors import MiniGPTError, located, one_line_errors, refuse_to_replace_source
from .modeling_minigpt import MiniGPTForCausalLM

logger = logging.getLogger(__name__)

# model_type -> the causal LM class a checkpoint of that type must be.
NATIVE_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Copied next to the converted weights when the source has them; both sides use the same tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

# Fields with the same name and meaning in MiniGPTConfig and every native config.
_COMMON_FIELDS = ("vocab_size", "initializer_range", "tie_word_embeddings", "use_cache")
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Llama-family field names are MiniGPT's own.
_LLAMA_FAMILY_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "hidden_act",
    "attention_dropout",
)
# MiniGPT field -> GPT2Config field.
_GPT2_FIELDS = {
    "hidden_size": "n_embd",
    "intermediate_size": "n_inner",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "hidden_act": "activation_function",
    "norm_eps": "layer_norm_epsilon",
    "embedding_dropout": "embd_pdrop",
    "attention_dropout": "attn_pdrop",
    "residual_dropout": "resid_pdrop",
}
# Per block: (MiniGPT name, GPT-2 name, stored as Conv1D so transposed). q/k/v are GPT-2's fused c_attn, handled apart.
_GPT2_BLOCK_WEIGHTS = (
    ("input_layernorm.weight", "ln_1.weight", False),
    ("input_layernorm.bias", "ln_1.bias", False),
    ("self_attn.o_proj.weight", "attn.c_proj.weight", True),
    ("self_attn.o_proj.bias", "attn.c_proj.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False),
    ("post_attention_layernorm.bias", "ln_2.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True),
    ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
)
_GPT2_MODEL_WEIGHTS = (
    ("model.embed_tokens.weight", "transformer.wte.weight"),
    ("model.embed_positions.weight", "transformer.wpe.weight"),
    ("model.norm.weight", "transformer.ln_f.weight"),
    ("model.norm.bias", "transformer.ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
)


def _refuse(message: str, field: str | None = None) -> MiniGPTError:
    return MiniGPTError(located(None, message, field=field))


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def native_architecture(config: MiniGPTConfig) -> str:
    """The native class that computes exactly what `config` computes; MiniGPTError saying why when none does."""
    style = (config.norm_type, config.mlp_type, config.position_embedding_type)
    if style == ("layernorm", "gelu", "learned"):
        if config.num_key_value_heads != config.num_attention_heads:
            raise _refuse(
                f"GPT-2 has one key/value head per query head; this config shares {config.num_key_value_heads} among "
                f"{config.num_attention_heads}, and no native class has GQA with learned positions",
                field="num_key_value_heads",
            )
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise _refuse(
                f"GPT-2 needs head_dim = hidden_size / num_attention_heads, got {config.head_dim}", field="head_dim"
            )
        if config.qk_norm:
            raise _refuse("GPT-2 has no q/k norm, and no native class has it with learned positions", field="qk_norm")
        return "GPT2LMHeadModel"
    if style != ("rmsnorm", "swiglu", "rope"):
        raise _refuse(
            f"norm_type={config.norm_type!r}, mlp_type={config.mlp_type!r}, position_embedding_type="
            f"{config.position_embedding_type!r} has no native equivalent: GPT-2 is layernorm + gelu + learned, "
            "Qwen2/Llama/Qwen3 are rmsnorm + swiglu + rope",
            field="norm_type",
        )
    same_attention_bias = config.attention_bias == config.attention_out_bias
    if config.qk_norm:
        if not same_attention_bias or config.mlp_bias:
            raise _refuse(
                "with qk_norm the native class is Qwen3, which has the same bias on q/k/v and o and none in the MLP; "
                f"this config has attention_bias={config.attention_bias}, attention_out_bias="
                f"{config.attention_out_bias}, mlp_bias={config.mlp_bias}",
                field="qk_norm",
            )
        return "Qwen3ForCausalLM"
    if same_attention_bias:
        return "LlamaForCausalLM"
    if config.attention_bias and not config.mlp_bias:
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise _refuse(
                f"Qwen2 needs head_dim = hidden_size / num_attention_heads, got {config.head_dim}", field="head_dim"
            )
        return "Qwen2ForCausalLM"
    raise _refuse(
        f"attention_bias={config.attention_bias}, attention_out_bias={config.attention_out_bias}, mlp_bias="
        f"{config.mlp_bias} matches no native class (Llama: q/k/v bias = o bias; Qwen2: q/k/v bias, no o or MLP bias)",
        field="attention_out_bias",
    )


def native_config(config: MiniGPTConfig) -> PreTrainedConfig:
    """The native config (GPT2Config, Qwen2Config, LlamaConfig or Qwen3Config) equivalent to `config`."""
    architecture = native_architecture(config)
    common = {name: getattr(config, name) for name in (*_COMMON_FIELDS, *_TOKEN_ID_FIELDS)}
    if architecture == "GPT2LMHeadModel":
        gpt2_fields = {gpt2_name: getattr(config, name) for name, gpt2_name in _GPT2_FIELDS.items()}
        return GPT2Config(**common, **gpt2_fields, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)

    dropped = [name for name in ("embedding_dropout", "residual_dropout") if getattr(config, name)]
    if dropped:  # training-time only: the exported model computes the same outputs
        logger.warning("%s has no %s; dropped from the export", architecture, " or ".join(dropped))
    fields = {
        **common,
        **{name: getattr(config, name) for name in _LLAMA_FAMILY_FIELDS},
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if architecture == "Qwen2ForCausalLM":
        return Qwen2Config(**fields, use_sliding_window=False)
    if architecture == "Qwen3ForCausalLM":
        return Qwen3Config(**fields, head_dim=config.head_dim, attention_bias=config.attention_bias)
    try:
        return LlamaConfig(
            **fields, head_dim=config.head_dim, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias
        )
    except ValueError as error:  # Llama also insists that heads divide hidden_size
        raise _refuse(f"LlamaConfig refuses it: {error}", field="head_dim") from None


def _minigpt_fields_from_gpt2(native: PreTrainedConfig) -> dict:
    unsupported = {
        "scale_attn_by_inverse_layer_idx": "scales attention by 1/layer index, which MiniGPT does not",
        "add_cross_attention": "has cross-attention, which a decoder-only MiniGPT does not",
    }
    for field, why in unsupported.items():
        if getattr(native, field, False):
            raise _refuse(f"this GPT-2 {why}", field=field)
    if not getattr(native, "scale_attn_weights", True):
        raise _refuse(
            "this GPT-2 does not scale attention by 1/sqrt(head size), which MiniGPT always does",
            field="scale_attn_weights",
        )
    fields = {name: getattr(native, gpt2_name) for name, gpt2_name in _GPT2_FIELDS.items()}
    fields["intermediate_size"] = fields["intermediate_size"] or 4 * native.n_embd  # GPT-2's n_inner=None means 4x
    return dict(
        fields,
        norm_type="layernorm",
        mlp_type="gelu",
        position_embedding_type="learned",
        num_key_value_heads=native.n_head,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
    )


def _minigpt_fields_from_llama_family(native: PreTrainedConfig) -> dict:
    if "sliding_attention" in (getattr(native, "layer_types", None) or []):
        raise _refuse("sliding-window attention has no MiniGPT equivalent", field="use_sliding_window")
    rope = native.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse(
            f"rope_type {rope['rope_type']!r} (scaled RoPE) has no MiniGPT equivalent", field="rope_parameters"
        )
    fields = {name: getattr(native, name) for name in _LLAMA_FAMILY_FIELDS}
    head_dim = getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads
    if native.model_type == "qwen2":
        biases = dict(attention_bias=True, attention_out_bias=False, mlp_bias=False)
    else:  # Llama and Qwen3 put one switch on all four attention projections
        biases = dict(
            attention_bias=native.attention_bias,
            attention_out_bias=native.attention_bias,
            mlp_bias=getattr(native, "mlp_bias", False),
        )
    return dict(
        fields,
        **biases,
        head_dim=head_dim,
        norm_type="rmsnorm",
        norm_eps=native.rms_norm_eps,
        mlp_type="swiglu",
        position_embedding_type="rope",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        qk_norm=native.model_type == "qwen3",
    )


def minigpt_config(native: PreTrainedConfig) -> MiniGPTConfig:
    """The MiniGPTConfig equivalent to a GPT-2, Qwen2, Llama or Qwen3 config; MiniGPTError saying why when none is."""
    if native.model_type not in NATIVE_ARCHITECTURES:
        raise _refuse(
            f"{native.model_type!r} is not supported; convert reads {', '.join(NATIVE_ARCHITECTURES)}",
            field="model_type",
        )
    if native.model_type == "gpt2":
        fields = _minigpt_fields_from_gpt2(native)
    else:
        fields = _minigpt_fields_from_llama_family(native)
    common = {name: getattr(native, name) for name in (*_COMMON_FIELDS, *_TOKEN_ID_FIELDS)}
    return MiniGPTConfig(**common, **fields)


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def _gpt2_weights_to_minigpt(weights: dict[str, torch.Tensor], config: MiniGPTConfig) -> dict[str, torch.Tensor]:
    converted = {name: weights[gpt2_name] for name, gpt2_name in _GPT2_MODEL_WEIGHTS}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, gpt2_name, is_conv1d in _GPT2_BLOCK_WEIGHTS:
            tensor = weights[theirs + gpt2_name]
            converted[ours + name] = tensor.t() if is_conv1d else tensor
        # c_attn: (C, 3C) Conv1D -> three (C, C) Linear weights, in q, k, v order.
        q, k, v = weights[theirs + "attn.c_attn.weight"].t().chunk(3, dim=0)
        q_bias, k_bias, v_bias = weights[theirs + "attn.c_attn.bias"].chunk(3, dim=0)
        for proj, weight, bias in (("q_proj", q, q_bias), ("k_proj", k, k_bias), ("v_proj", v, v_bias)):
            converted[f"{ours}self_attn.{proj}.weight"] = weight
            converted[f"{ours}self_attn.{proj}.bias"] = bias
    return converted


def _minigpt_weights_to_gpt2(weights: dict[str, torch.Tensor], config: MiniGPTConfig) -> dict[str, torch.Tensor]:
    def bias(name: str, size: int) -> torch.Tensor:
        # GPT-2 always has biases; a MiniGPT without them is the same model with zero biases.
        return weights.get(name, torch.zeros(size, dtype=weights["lm_head.weight"].dtype))

    converted = {gpt2_name: weights[name] for name, gpt2_name in _GPT2_MODEL_WEIGHTS}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, gpt2_name, is_conv1d in _GPT2_BLOCK_WEIGHTS:
            if name.endswith(".bias"):
                tensor = bias(ours + name, weights[ours + name.replace(".bias", ".weight")].shape[0])
            else:
                tensor = weights[ours + name]
            converted[theirs + gpt2_name] = tensor.t() if is_conv1d else tensor
        projections = [f"{ours}self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj")]
        converted[theirs + "attn.c_attn.weight"] = torch.cat([weights[p + ".weight"] for p in projections]).t()
        converted[theirs + "attn.c_attn.bias"] = torch.cat([bias(p + ".bias", config.hidden_size) for p in projections])
    return converted


def _build_with_weights(
    config: PreTrainedConfig, weights: dict[str, torch.Tensor], like: PreTrainedModel
) -> PreTrainedModel:
    """A model of `config`'s class holding `weights`, in the dtype, mode and generation settings of `like`."""
    dtype = next(like.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(weights, strict=True)  # a missing or extra name here is a bug in the mapping above
    model.generation_config = copy.deepcopy(like.generation_config)
    return model.train(like.training)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def from_native(model_or_dir: PreTrainedModel | str | os.PathLike) -> MiniGPTForCausalLM:
    """A MiniGPT with the same weights as a GPT2LMHeadModel, Qwen2ForCausalLM, LlamaForCausalLM or Qwen3ForCausalLM
    (an instance or a saved directory); it computes the same logits."""
    native = _load_native(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    if isinstance(native, MiniGPTForCausalLM):
        raise _refuse("the model is already a MiniGPT; use to_native / --to-native to go the other way")
    config = minigpt_config(native.config)
    weights = native.state_dict()
    if native.config.model_type == "gpt2":
        weights = _gpt2_weights_to_minigpt(weights, config)
    return _build_with_weights(config, weights, like=native)


def to_native(minigpt_model_or_dir: MiniGPTForCausalLM | str | os.PathLike) -> PreTrainedModel:
    """The transformers native model (GPT-2, Qwen2, Llama or Qwen3, whichever matches the config) with the same
    weights as a MiniGPT (an instance or a saved directory); it loads anywhere without remote code."""
    model = minigpt_model_or_dir
    if isinstance(model, (str, os.PathLike)):
        model = _load_minigpt(model)
    if not isinstance(model, MiniGPTForCausalLM):
        raise _refuse(f"expected a MiniGPTForCausalLM, got {type(model).__name__}; use from_native for native models")
    config = native_config(model.config)
    weights = model.state_dict()
    if config.model_type == "gpt2":
        weights = _minigpt_weights_to_gpt2(weights, model.config)
    return _build_with_weights(config, weights, like=model)


def _read_config_json(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise MiniGPTError(located(model_dir, "no such directory"))
    path = model_dir / "config.json"
    if not path.is_file():
        raise MiniGPTError(
            located(path, "not found; a model directory holds the config.json that save_pretrained writes")
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MiniGPTError(located(path, f"not valid JSON: {error.msg}", line=error.lineno)) from None


def _load(
    model_dir: str | os.PathLike, accepted: dict[str, str], check: Callable[[PreTrainedConfig], object]
) -> PreTrainedModel:
    """Load a directory whose model_type is one of `accepted` (model_type -> class) and whose config passes `check`.
    Everything is refused before any weight is read, and so is a checkpoint that lacks weights (from_pretrained would
    fill them with random values and only warn)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    raw = _read_config_json(model_dir)
    model_type, architectures = raw.get("model_type"), raw.get("architectures") or []
    if model_type not in accepted:
        hint = " (a MiniGPT directory: use --to-native)" if model_type == MiniGPTConfig.model_type else ""
        message = f"{model_type!r} is not supported here{hint}; accepted: {', '.join(accepted.values())}"
        raise MiniGPTError(located(config_path, message, field="model_type"))
    if architectures and accepted[model_type] not in architectures:
        message = f"{architectures} is not a causal LM checkpoint; expected {accepted[model_type]}"
        raise MiniGPTError(located(config_path, message, field="architectures"))
    try:
        config = AutoConfig.from_pretrained(model_dir)
        check(config)
    except (ValueError, TypeError) as error:  # the config's own validation: a field with an impossible value
        raise MiniGPTError(located(config_path, str(error).splitlines()[0])) from None
    except MiniGPTError as error:  # no equivalent on the other side: say which file the field lives in
        raise MiniGPTError(located(config_path, str(error))) from None
    with one_line_errors(model_dir):  # no weights file, or an unreadable or truncated one
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype="auto", output_loading_info=True
        )
    absent = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
    if absent:
        shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise MiniGPTError(located(model_dir, f"checkpoint lacks weights (or has wrong shapes) for {shown}"))
    return model


def _load_native(model_dir: str | os.PathLike) -> PreTrainedModel:
    return _load(model_dir, NATIVE_ARCHITECTURES, check=minigpt_config)


def _load_minigpt(model_dir: str | os.PathLike) -> MiniGPTForCausalLM:
    return _load(model_dir, {MiniGPTConfig.model_type: "MiniGPTForCausalLM"}, check=native_architecture)


# --------------------------------------------------------------------------------------------------------------------
# Directories and the `minigpt convert` command
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def max_logit_difference(first: PreTrainedModel, second: PreTrainedModel, num_tokens: int = 16) -> float:
    """Largest |logit difference| of two models on the same random tokens: the evidence that a conversion is exact."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, first.config.vocab_size, (1, num_tokens), generator=generator)
    logits = []
    for model in (first, second):
        was_training = model.training
        logits.append(model.eval()(input_ids).logits.float())  # eval: dropout off
        model.train(was_training)
    return (logits[0] - logits[1]).abs().max().item()


def _check_writable(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite):
        raise MiniGPTError(located(out_dir, "already exists; choose a new OUT_DIR or pass --overwrite"))


def _write_atomically(model: PreTrainedModel, tokenizer_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """save_pretrained into a hidden folder beside `out_dir`, then rename it into place: never a half-written model."""
    _check_writable(out_dir, overwrite)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with one_line_errors(out_dir, "cannot write"):  # no such place, no permission, disk full
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        if out_dir.is_dir() and any(out_dir.iterdir()):  # --overwrite: swap, then delete the old one
            previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
            os.replace(out_dir, previous)
            os.replace(staging, out_dir)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_dir(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, to: str, overwrite: bool = False
) -> tuple[PreTrainedModel, float]:
    """Convert a saved model directory (`to` is "minigpt" or "native") and write it, with its tokenizer files, to
    `out_dir`. Returns the converted model and its max |logit difference| from the source on random tokens."""
    if to not in ("minigpt", "native"):
        raise ValueError(f"convert_dir: to must be 'minigpt' or 'native', got {to!r}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    refuse_to_replace_source(out_dir, src_dir)
    _check_writable(out_dir, overwrite)  # before the (possibly long) load
    if to == "minigpt":
        source = _load_native(src_dir)
        converted = from_native(source)
    else:
        source = _load_minigpt(src_dir)
        converted = to_native(source)
    difference = max_logit_difference(source, converted)
    _write_atomically(converted, src_dir, out_dir, overwrite)
    return converted, difference


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-native",
        dest="to",
        action="store_const",
        const="minigpt",
        default=argparse.SUPPRESS,  # no "(default: None)" in --help
        help="SRC_DIR holds a GPT2LMHeadModel, Qwen2ForCausalLM, LlamaForCausalLM or Qwen3ForCausalLM; write a MiniGPT",
    )
    direction.add_argument(
        "--to-native",
        dest="to",
        action="store_const",
        const="native",
        default=argparse.SUPPRESS,
        help="SRC_DIR holds a MiniGPT; write the native class its config matches (loads without remote code)",
    )
    parser.add_argument("src_dir", metavar="SRC_DIR", help="model directory to read (config.json + weights)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write; tokenizer files are copied along")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")


def run(args: argparse.Namespace, command: str) -> int:
    model, difference = convert_dir(args.src_dir, args.out_dir, to=args.to, overwrite=args.overwrite)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {type(model).__name__} ({parameters / 1e6:.2f}M parameters, {model.dtype}) to {args.out_dir}; "
        f"max |logit difference| from the source on 16 random tokens: {difference:.2e}"
    )
    return 0


__all__ = [
    "NATIVE_ARCHITECTURES",
    "convert_dir",
    "from_native",
    "max_logit_difference",
    "minigpt_config",
    "native_architecture",
    "native_config",
    "to_native",
]
