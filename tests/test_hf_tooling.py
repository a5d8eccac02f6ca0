"""The standard Hugging Face tooling works on MiniGPT unchanged: Trainer, peft LoRA (saved, reloaded onto a remote-code
base in a fresh interpreter, merged), pipeline("text-generation"), and TRL's SFTTrainer and GRPOTrainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, pipeline

from minigpt import MiniGPTConfig, MiniGPTForCausalLM

VOCAB = 128
STYLES = ["tiny-gpt2", "tiny-qwen"]
# Every attention and MLP projection, by the Llama/Qwen2 names peft already knows (GPT-2 style has no gate_proj).
LORA_TARGETS = {
    "tiny-gpt2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "tiny-qwen": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def random_model(preset: str, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(
        MiniGPTConfig.from_preset(preset, **{"vocab_size": VOCAB, "pad_token_id": 0, **overrides})
    )


def counting_dataset(rows: int = 64, length: int = 32) -> Dataset:
    """Each row counts up in steps of 3 from its own start: a pattern a tiny model learns in a few steps."""
    sequences = [[(start + 3 * t) % VOCAB for t in range(length)] for start in range(rows)]
    return Dataset.from_dict({"input_ids": sequences, "labels": sequences})


# Trainer settings every run here shares: CPU, a log line per step, no checkpoints, no reporting, seeded.
QUIET_CPU_RUN = dict(logging_steps=1, save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=0)


def train(model: torch.nn.Module, out_dir: Path, steps: int, learning_rate: float) -> list[float]:
    """Plain transformers Trainer on CPU; returns the loss logged at every step."""
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        **QUIET_CPU_RUN,
    )
    trainer = Trainer(model=model, args=args, train_dataset=counting_dataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("preset", STYLES)
def test_trainer_trains_20_steps_and_the_loss_falls(preset: str, tmp_path: Path) -> None:
    losses = train(random_model(preset), tmp_path, steps=20, learning_rate=3e-3)
    assert len(losses) == 20
    assert losses[0] > 4.0  # about ln(128): it starts knowing nothing
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_trainer_label_smoothing_shifts_labels_as_for_transformers_own_models(tmp_path: Path) -> None:
    """Trainer's label smoother shifts labels only for the causal LMs transformers knows by class name; unknown, it
    would train each position to predict its own token. MiniGPT's loss must equal Qwen2ForCausalLM's, same weights."""
    from transformers import Qwen2ForCausalLM

    from minigpt.convert import to_native

    ours = random_model("tiny-qwen")
    native = to_native(ours)
    assert isinstance(native, Qwen2ForCausalLM)
    batch = counting_dataset(rows=4)[:]
    inputs = {key: torch.tensor(value) for key, value in batch.items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to="none", disable_tqdm=True
    )
    losses = {}
    for name, model in (("MiniGPT", ours), ("Qwen2ForCausalLM", native)):
        trainer = Trainer(model=model.train(), args=args)
        with torch.no_grad():
            losses[name] = trainer.compute_loss(model, dict(inputs)).item()
    assert losses["MiniGPT"] == pytest.approx(losses["Qwen2ForCausalLM"], rel=1e-5), losses
    with torch.no_grad():
        unsmoothed = ours(**inputs).loss.item()
    assert abs(losses["MiniGPT"] - unsmoothed) < 0.1  # the same next-token task, a little smoothed (unshifted: 3.82)


# Fresh interpreter outside the repository, minigpt blocked: the base model comes from the copied modeling files.
LORA_CHILD = r"""
import sys
sys.modules["minigpt"] = None
import json
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

request = json.loads(sys.argv[1])
input_ids = torch.tensor(request["input_ids"])
results = {}
for name, paths in request["models"].items():
    base = AutoModelForCausalLM.from_pretrained(paths["base"], trust_remote_code=True)
    model = PeftModel.from_pretrained(base, paths["adapter"]).eval()
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids).logits
    results[name] = {
        "base_class": type(base).__module__,
        "merged_class": type(merged_model).__name__,
        "unmerged": unmerged.tolist(),
        "merged": merged.tolist(),
    }
print(json.dumps(results))
"""


def test_lora_trains_saves_reloads_onto_remote_code_base_and_merges(tmp_path: Path) -> None:
    input_ids = torch.tensor([[5, 8, 11, 14, 17, 20], [40, 43, 46, 49, 52, 55]])
    request: dict = {"input_ids": input_ids.tolist(), "models": {}}
    expected = {}
    for preset in STYLES:
        base = random_model(preset)
        base.save_pretrained(tmp_path / preset / "base")  # before peft wraps its layers in place
        base_weights = {name: p.detach().clone() for name, p in base.named_parameters()}
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[preset])
        model = get_peft_model(base, lora)
        losses = train(model, tmp_path / preset / "run", steps=10, learning_rate=3e-2)
        assert sum(losses[-3:]) / 3 < losses[0] - 0.1  # slow: embeddings and head stay frozen and random

        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in name for name in trained)
        for target in LORA_TARGETS[preset]:  # every projection got an adapter that moved away from zero
            assert any(target in name and "lora_B" in name and p.abs().sum() > 0 for name, p in trained.items())
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name:  # the base itself is frozen
                assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), name

        model.save_pretrained(tmp_path / preset / "adapter")
        with torch.no_grad():
            expected[preset] = model.eval()(input_ids).logits
        request["models"][preset] = {
            "base": str(tmp_path / preset / "base"),
            "adapter": str(tmp_path / preset / "adapter"),
        }

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    child = subprocess.run(
        [sys.executable, "-c", LORA_CHILD, json.dumps(request)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for preset, logits in expected.items():
        assert results[preset]["base_class"].startswith("transformers_modules.")
        assert results[preset]["merged_class"] == "MiniGPTForCausalLM"
        torch.testing.assert_close(torch.tensor(results[preset]["unmerged"]), logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(results[preset]["merged"]), logits, atol=1e-5, rtol=0)


def test_lora_with_trainable_tokens_gives_what_it_gives_on_qwen2() -> None:
    """peft's trainable_token_indices wraps the embedding and the tied LM head in a layer without `out_features`: the
    first forward crashed (AttributeError) where Qwen2ForCausalLM trains, and merges."""
    from copy import deepcopy

    from minigpt.convert import to_native

    ours = random_model("tiny-qwen")
    native = to_native(deepcopy(ours))
    input_ids = torch.tensor([[5, 1, 8, 2, 11, 14], [40, 43, 2, 49, 1, 55]])
    results = []
    for model in (ours, native):
        torch.manual_seed(1)  # the same adapter initialisation for both
        lora = LoraConfig(target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 2], init_lora_weights=False)
        model = get_peft_model(model, lora)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        gradient = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad
        merged = model.merge_and_unload().eval()
        tokens = merged.generate(input_ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        results.append((loss.detach(), gradient, tokens))
    (loss, gradient, tokens), (native_loss, native_gradient, native_tokens) = results
    torch.testing.assert_close(loss, native_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, native_gradient, rtol=1e-4, atol=1e-6)
    assert torch.equal(tokens, native_tokens)


def test_text_generation_pipeline_loads_a_saved_model_and_generates(tmp_path: Path) -> None:
    from minigpt.tokenization import build_tokenizer_from_texts

    tokenizer = build_tokenizer_from_texts(["the cat sat on the mat", "the dog ran to the cat"] * 20, vocab_size=300)
    model = random_model("tiny-qwen", vocab_size=300, pad_token_id=tokenizer.pad_token_id).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    generator = pipeline("text-generation", model=str(tmp_path))
    assert isinstance(generator.model, MiniGPTForCausalLM)
    text = generator("the cat", max_new_tokens=8, do_sample=False)[0]["generated_text"]

    encoded = tokenizer("the cat", return_tensors="pt")
    tokens = model.generate(**encoded, max_new_tokens=8, do_sample=False)
    assert text == tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert text.startswith("the cat") and len(tokens[0]) > encoded["input_ids"].shape[1]


CHAT_TEXTS = ["the cat sat on the mat", "a dog ran in the park", "猫坐在垫子上", "狗在公园里跑"] * 20


def save_minigpt_and_qwen2(tmp_path: Path) -> None:
    """A tiny Qwen-style MiniGPT with a tokenizer trained on CHAT_TEXTS, saved as tmp_path/"minigpt", and the same
    weights as transformers' Qwen2ForCausalLM in tmp_path/"qwen2"."""
    from minigpt.convert import to_native
    from minigpt.tokenization import build_tokenizer_from_texts

    tokenizer = build_tokenizer_from_texts(CHAT_TEXTS, vocab_size=300)
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny-qwen",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ours = MiniGPTForCausalLM(config)
    for name, model in (("minigpt", ours), ("qwen2", to_native(ours))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trains_minigpt_as_it_trains_qwen2(packing: bool, tmp_path: Path) -> None:
    """TRL's SFTTrainer on chat messages, loss on the assistant replies only, with or without packing: the loss of
    every step equals Qwen2ForCausalLM's with the same weights (MiniGPT runs its fused LM head + loss here)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    save_minigpt_and_qwen2(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "minigpt")
    conversations = Dataset.from_list(
        [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]} for t in CHAT_TEXTS]
    )
    losses = {}
    for name in ("minigpt", "qwen2"):
        args = SFTConfig(
            output_dir=str(tmp_path / f"out-{name}"),
            max_steps=3,
            per_device_train_batch_size=4,
            optim="sgd",  # Adam's first steps move each weight by about +-lr whatever the gradient's size, so
            learning_rate=0.1,  # float32 rounding in near-zero gradients would show as loss differences
            assistant_only_loss=True,
            packing=packing,
            **QUIET_CPU_RUN,
        )
        trainer = SFTTrainer(
            model=str(tmp_path / name), args=args, train_dataset=conversations, processing_class=tokenizer
        )
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["minigpt"]) == 3
    # Equal without packing; with it, up to 3.4e-5 relative by the third step (float32 rounding: the first step's
    # loss differed by 2.7e-6 and the backbones' hidden states by 0.0 when run alone).
    assert losses["minigpt"] == pytest.approx(losses["qwen2"], rel=1e-4)


def test_trl_grpo_trains_minigpt_as_it_trains_qwen2(tmp_path: Path) -> None:
    """TRL's GRPOTrainer samples completions with generate(), scores them with a reward function and runs the backbone
    (`base_model`) under its own tiled LM head: the first step's completions, loss and entropy equal those of
    Qwen2ForCausalLM carrying the same weights, and training changes every parameter."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    save_minigpt_and_qwen2(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "minigpt")
    texts = CHAT_TEXTS
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in texts[:8]])
    seen: dict[str, list[list[str]]] = {}

    def reward(completions, **_) -> list[float]:  # mentions of "cat", shorter is better
        seen[current].append([completion[0]["content"] for completion in completions])
        return [float("cat" in text[0]["content"]) - 0.01 * len(text[0]["content"]) for text in completions]

    first_steps = {}
    for current in ("minigpt", "qwen2"):
        seen[current] = []
        args = GRPOConfig(
            output_dir=str(tmp_path / f"out-{current}"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=2,
            learning_rate=1e-2,
            beta=0.04,
            **QUIET_CPU_RUN,
        )
        trainer = GRPOTrainer(
            model=str(tmp_path / current),
            reward_funcs=reward,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )
        before = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
        trainer.train()
        first_steps[current] = trainer.state.log_history[0]
        if current == "minigpt":
            assert type(trainer.model) is MiniGPTForCausalLM
            assert all(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert seen["minigpt"][0] == seen["qwen2"][0]
    for metric in ("loss", "reward", "entropy"):
        assert first_steps["minigpt"][metric] == pytest.approx(first_steps["qwen2"][metric], rel=1e-5, abs=1e-7), metric
    # Gradients agree to float32 rounding before clipping. This first gradient is a zero-sum of advantages times
    # per-completion gradients that mostly cancel, so rounding shows at ~1e-3: transformers' own Qwen2 run with eager
    # instead of sdpa attention moved the grad norm by 1.3e-4 and single parameters' gradients by up to 1.2e-2;
    # MiniGPT with fast paths off was 3e-5 from Qwen2, with them (RMSNorm's closed-form backward) 1.2e-3 (measured).
    assert first_steps["minigpt"]["grad_norm"] == pytest.approx(first_steps["qwen2"]["grad_norm"], rel=5e-3)
