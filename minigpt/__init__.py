"""MiniGPT: build a GPT-2 or Qwen2.5-style language model from scratch, and use it anywhere in the HF ecosystem.

Importing the package registers `MiniGPTConfig` / `MiniGPTForCausalLM` with transformers' Auto classes, and marks them
so that `save_pretrained` writes `auto_map` and copies the two modeling files next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_minigpt import PRESETS, MiniGPTConfig
from .modeling_minigpt import MiniGPTForCausalLM, MiniGPTModel

__version__ = "0.1.0"

AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)
AutoModel.register(MiniGPTConfig, MiniGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM, exist_ok=True)
MiniGPTConfig.register_for_auto_class()
MiniGPTModel.register_for_auto_class("AutoModel")
MiniGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MiniGPTConfig", "MiniGPTForCausalLM", "MiniGPTModel", "PRESETS", "__version__"]
