"""The model card (README.md) written into every trained model directory: Hub metadata plus the facts of the run.

The YAML header is what the Hub indexes (language, tags, library, pipeline); the body tells a reader what the model
is, how it was trained and on what, its final losses, and how to load it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RUN_FACTS_FILE = "training_run.json"  # the facts of the run beside the card, as JSON

_HAN = re.compile(r"[\u3400-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_languages(texts: Iterable[str], max_chars: int = 200_000) -> list[str]:
    """ "en" and/or "zh" by the share of Latin letters and Han characters in (a prefix of) the training text."""
    han = latin = total = 0
    for text in texts:
        han += len(_HAN.findall(text))
        latin += len(_LATIN.findall(text))
        total += len(text)
        if total >= max_chars:
            break
    languages = [code for code, count in (("en", latin), ("zh", han)) if total and count / total >= 0.05]
    return languages or ["en"]


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):  # e.g. the built-in world: "seed 0, size 50"
        return ", ".join(f"{key} {item}" for key, item in value.items())
    return str(value)


def render_model_card(facts: dict[str, Any], languages: list[str], tags: list[str]) -> str:
    """README.md text: a YAML header (language, tags, library_name, pipeline_tag, and base_model where the base is a
    Hub model) and a table of the run's facts."""
    from huggingface_hub import ModelCardData

    from .errors import HUB_ID

    is_adapter = facts.get("lora") and not facts.get("merged")
    base = str(facts.get("base") or "")
    header = ModelCardData(
        language=languages,
        tags=tags,
        library_name="peft" if is_adapter else "transformers",  # the Hub lists an adapter under its base by these two
        base_model=base if HUB_ID.match(base) and not Path(base).exists() else None,
        pipeline_tag="text-generation",
    ).to_yaml()
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)\n'
        if is_adapter
        else "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)\n'
    )
    if facts["stage"] == "pretrain":  # it has the chat template for the SFT to come, but has not learnt to chat
        use = (
            'inputs = tokenizer("Once upon a time", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n"
        )
        what = " A pretrained model continues text; `minigpt sft` makes a chat model of it."
    else:
        use = (
            'messages = [{"role": "user", "content": "Hello!"}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
            'return_tensors="pt")\n'
            'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]))\n'
        )
        what = ""
    rows = "\n".join(f"| {key} | {_number(value)} |" for key, value in facts.items() if value is not None)
    kind = "LoRA adapter" if is_adapter else "causal language model"
    return f"""---
{header}
---

# {facts.get("name", "MiniGPT model")}

A small {kind} trained with MiniGPT (`minigpt {facts["stage"]}`).{what} It loads with plain transformers (the modeling code ships in this folder):

```python
{load}tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
{use}```

## Training run

| fact | value |
|---|---|
{rows}

Training curves: `loss.png`; TensorBoard logs: `runs/` (`tensorboard --logdir runs`).
"""


def card_for_repo(card: str, repo_id: str) -> str:
    """The card's code with the Hub repo in place of the folder placeholder "PATH" (for `minigpt push`)."""
    return card.replace('from_pretrained("PATH"', f'from_pretrained("{repo_id}"')


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file `path`; {} when there is none: no such file, not JSON, or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_facts(folder: str | Path) -> dict[str, Any]:
    """The facts of the run that wrote `folder` (its training_run.json); {} if it has none (a Hub id has none here)."""
    return read_json_object(Path(folder) / RUN_FACTS_FILE)


def trained_stage(folder: str | Path) -> str | None:
    """The stage (pretrain, sft, dpo) whose run wrote `folder`, from its training_run.json; None if it has none."""
    return run_facts(folder).get("stage")
