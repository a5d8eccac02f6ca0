"""A saved MiniGPT directory is a complete Hub model: it loads with `trust_remote_code=True` where `minigpt` is not
installed, and the copied modeling files compute exactly what the package does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from minigpt import MiniGPTConfig, MiniGPTForCausalLM

# Runs in a fresh interpreter outside the repository; minigpt is blocked first because the editable install would
# otherwise make it importable (and an in-process registration wins over auto_map).
CHILD = r"""
import sys
sys.modules["minigpt"] = None
import json
import torch
from transformers import AutoModel, AutoModelForCausalLM

try:
    import minigpt  # noqa: F401
    minigpt_importable = True
except ImportError:
    minigpt_importable = False
request = json.loads(sys.argv[1])
input_ids, attention_mask = torch.tensor(request["input_ids"]), torch.tensor(request["attention_mask"])
results = {"minigpt_importable": minigpt_importable}
for name, directory in request["models"].items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False)
    base = AutoModel.from_pretrained(directory, trust_remote_code=True)  # the decoder without its LM head
    with torch.no_grad():
        same_base = torch.equal(base(input_ids).last_hidden_state, model.model(input_ids).last_hidden_state)
    results[name] = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "base_class": type(base).__name__,
        "same_base": same_base,
        "logits": logits.tolist(),
        "tokens": tokens.tolist(),
    }
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

results["known_to_trainer_as_causal_lm"] = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
print(json.dumps(results))
"""

MODELS = {
    "gpt2-style-tied": MiniGPTConfig.from_preset("tiny-gpt2", vocab_size=128, pad_token_id=0),
    "qwen-style-gqa-untied": MiniGPTConfig.from_preset(
        "tiny-qwen", vocab_size=128, pad_token_id=0, tie_word_embeddings=False
    ),
}


def test_saved_model_loads_with_remote_code_where_minigpt_is_not_installed(tmp_path: Path) -> None:
    input_ids = torch.tensor([[0, 0, 0, 5, 9, 17, 3, 44], [12, 7, 99, 5, 61, 2, 8, 30]])
    attention_mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()  # first row left-padded
    expected, directories = {}, {}
    for name, config in MODELS.items():
        torch.manual_seed(0)
        model = MiniGPTForCausalLM(config).eval()
        directories[name] = str(tmp_path / name)
        model.save_pretrained(directories[name])
        assert {"configuration_minigpt.py", "modeling_minigpt.py"} <= {p.name for p in (tmp_path / name).iterdir()}
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask).logits
        tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False)
        expected[name] = (logits, tokens)

    request = {"models": directories, "input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(request)],
        cwd=tmp_path,  # outside the repository: `minigpt` is not on the path from here
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])

    assert results["minigpt_importable"] is False
    assert results["known_to_trainer_as_causal_lm"] is True  # Trainer's label smoothing shifts its labels
    for name, (logits, tokens) in expected.items():
        assert results[name]["class"].startswith("transformers_modules.")  # the copied file, not the package
        assert results[name]["class"].endswith(".MiniGPTForCausalLM")
        assert results[name]["base_class"] == "MiniGPTModel" and results[name]["same_base"]
        # fp32 values survive JSON exactly, and the same code on the same weights gives the same bits
        assert torch.equal(torch.tensor(results[name]["logits"]), logits)
        assert results[name]["tokens"] == tokens.tolist()
