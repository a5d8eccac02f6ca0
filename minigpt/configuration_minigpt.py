"""MiniGPTConfig: one configuration for GPT-2-style and Qwen2.5-style decoder-only transformers.

The two families differ only in a handful of switches, so they are fields here rather than separate classes:

| field                     | GPT-2 style         | Qwen2.5 style        |
|---------------------------|---------------------|----------------------|
| `norm_type`               | "layernorm"         | "rmsnorm"            |
| `mlp_type`                | "gelu" (2 matrices) | "swiglu" (3 matrices)|
| `position_embedding_type` | "learned"           | "rope"               |
| `attention_bias`          | True  (q, k, v)     | True  (q, k, v)      |
| `attention_out_bias`      | True  (o)           | False                |
| `mlp_bias`                | True                | False                |
| `num_key_value_heads`     | = heads (MHA)       | < heads (GQA)        |

This file is copied next to the weights by `save_pretrained`, so it imports only transformers.
"""

from __future__ import annotations

import difflib
from typing import Any

from transformers import PreTrainedConfig

# The Auto classes that load a saved MiniGPT from the two files save_pretrained copies beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModel": "modeling_minigpt.MiniGPTModel",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
}
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "swiglu")
POSITION_EMBEDDING_TYPES = ("learned", "rope")

_GPT2_STYLE: dict[str, Any] = dict(
    norm_type="layernorm",
    norm_eps=1e-5,
    mlp_type="gelu",
    hidden_act="gelu_new",
    position_embedding_type="learned",
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
)
_QWEN_STYLE: dict[str, Any] = dict(
    norm_type="rmsnorm",
    norm_eps=1e-6,
    mlp_type="swiglu",
    hidden_act="silu",
    position_embedding_type="rope",
    attention_bias=True,
    attention_out_bias=False,
    mlp_bias=False,
)

# Named shapes. The big ones are exact copies of the published models' shapes, so a converted checkpoint fits.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small, 124M parameters.
    "gpt2": dict(
        _GPT2_STYLE,
        vocab_size=50257,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        embedding_dropout=0.1,
        attention_dropout=0.1,
        residual_dropout=0.1,
    ),
    # GPT-2 medium, 355M parameters.
    "gpt2-medium": dict(
        _GPT2_STYLE,
        vocab_size=50257,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=1024,
        embedding_dropout=0.1,
        attention_dropout=0.1,
        residual_dropout=0.1,
    ),
    # Qwen2.5-0.5B: 24 layers, 896 wide, 14 query heads sharing 2 KV heads, tied embeddings.
    "qwen2.5-0.5b": dict(
        _QWEN_STYLE,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # minimind2-small's dense shape (26M): Qwen-style blocks, no q/k/v bias, 6,400-token vocabulary.
    "minimind2": dict(
        _QWEN_STYLE,
        vocab_size=6400,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        attention_bias=False,
        tie_word_embeddings=True,
    ),
    # The quick start's model: ~4M parameters, learns an invented world's facts in minutes on 2 CPU cores.
    "quickstart": dict(
        _QWEN_STYLE,
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    # Tiny shapes for tests: a forward pass costs microseconds.
    "tiny-gpt2": dict(
        _GPT2_STYLE,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "tiny-qwen": dict(
        _QWEN_STYLE,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


def _one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MiniGPTConfig.{field} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


class MiniGPTConfig(PreTrainedConfig):
    r"""Configuration of a MiniGPT decoder-only language model (GPT-2 or Qwen2.5 style; see the module docstring).

    Build one from a named shape with `MiniGPTConfig.from_preset("gpt2")` or
    `MiniGPTConfig.from_preset("tiny-qwen", vocab_size=1000)`; `MiniGPTConfig.preset_names()` lists them.
    """

    model_type = "minigpt"
    keys_to_ignore_at_inference = ["cache"]

    # Sizes.
    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None  # default: 4 x hidden for "gelu", ~8/3 x hidden (multiple of 64) for "swiglu"
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # = heads: MHA; 1: MQA; in between: GQA
    head_dim: int | None = None  # default hidden_size // num_attention_heads (Qwen3 sets it explicitly)
    max_position_embeddings: int = 2048
    # Architecture switches.
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp_type: str = "swiglu"
    hidden_act: str | None = None  # default "gelu_new" for the GELU MLP, "silu" for SwiGLU
    position_embedding_type: str = "rope"
    rope_theta: float = 1000000.0
    attention_bias: bool = True
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3, minimind-3)
    tie_word_embeddings: bool = True
    # Regularisation and initialisation.
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    initializer_range: float = 0.02
    # Generation.
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        _one_of("norm_type", self.norm_type, NORM_TYPES)
        _one_of("mlp_type", self.mlp_type, MLP_TYPES)
        _one_of("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"MiniGPTConfig.{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MiniGPTConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"MiniGPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}), or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"MiniGPTConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act is None:
            self.hidden_act = "gelu_new" if self.mlp_type == "gelu" else "silu"
        if self.intermediate_size is None:
            self.intermediate_size = (
                4 * self.hidden_size if self.mlp_type == "gelu" else 64 * round(8 * self.hidden_size / 3 / 64)
            )
        for field in ("embedding_dropout", "attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"MiniGPTConfig.{field} must be in [0, 1), got {getattr(self, field)!r}")
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # save_pretrained adds only the saving class's own entry: without this, AutoModel could not load a saved
            # MiniGPTForCausalLM's base model from the copied files.
            self.auto_map = dict(AUTO_MAP)

    @property
    def num_key_value_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def preset_names(cls) -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MiniGPTConfig:
        """A config with the named shape; any field can be overridden (`from_preset("gpt2", num_hidden_layers=6)`),
        and a name that is not a field is refused (a config keeps unknown keys, so a typo would change nothing)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        config = cls(**{**PRESETS[name], **overrides})
        fields = cls().to_dict()
        for key in set(overrides) & (set(config.to_dict()) - set(fields)):  # kept as given: no field of ours or HF's
            close = difflib.get_close_matches(key, fields, n=1)
            raise ValueError(f"unknown config field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return config


__all__ = ["MiniGPTConfig", "PRESETS"]
