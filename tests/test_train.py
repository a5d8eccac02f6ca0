"""Training stages end to end on tiny models and real files: pretrain, SFT, DPO, LoRA; the output folder is a model
repo that plain transformers loads in a fresh process; the losses are the ones computed by hand from the logits."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from minigpt import train
from minigpt.errors import MiniGPTError
from minigpt.model_card import trained_stage
from minigpt.tokenization import build_tokenizer_from_texts, save_tokenizer

# Loads a model folder the way a Hub user would: transformers only, our package unimportable.
RELOAD_AND_CHAT = r"""
import json, sys
sys.modules["minigpt"] = None  # any import of our package now fails: the folder must carry its own code
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompt = sys.argv[1], sys.argv[2]
# trust_remote_code for the tokenizer too: transformers reads config.json (with its auto_map) to pick the class.
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
messages = [{"role": "user", "content": prompt}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
new = output[0, inputs["input_ids"].shape[1]:]
print(json.dumps({"module": type(model).__module__, "new_tokens": len(new), "reply": tokenizer.decode(new)}))
"""


def _slice(source: Path, target: Path, chars: int) -> Path:
    target.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def corpus(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Slices of the real pretraining files, and a small tokenizer trained on them and the chat files."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {
        "tinystories": _slice(shared_data / "pretrain/tinystories_train_first2MiB.txt", folder / "ts.txt", 30_000),
        "xiyouji": _slice(shared_data / "pretrain/xiyouji_zh.txt", folder / "xyj.txt", 12_000),
    }
    texts = [path.read_text(encoding="utf-8") for path in files.values()]
    for name in ("sft/rasbt_instruction-data_en_alpaca.json", "dpo/llamafactory_dpo_zh_demo.json"):
        texts.append((shared_data / name).read_text(encoding="utf-8")[:40_000])
    save_tokenizer(build_tokenizer_from_texts(texts, vocab_size=512), folder / "tokenizer")
    files["tokenizer"] = folder / "tokenizer"
    return files


def stage_args(command: str, *argv: str) -> list[str]:
    """Flags for a fast tiny run: fp32 (so results are exact), loss logged every step, no checkpoints."""
    return [*argv, "--precision", "fp32", "--logging-steps", "1", "--save-steps", "0", "--seed", "0"]


def run_stage(command: str, *argv: str) -> dict:
    args = train.resolve_args(train.parse_args(command, stage_args(command, *argv)), command)
    return train.train(args, command)


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Qwen-style model pretrained on the TinyStories and 西游记 slices: the base of the later stages."""
    out = tmp_path_factory.mktemp("pretrained") / "model"
    facts = run_stage(
        "pretrain",
        *["--data", str(corpus["tinystories"]), str(corpus["xiyouji"]), "--tokenizer", str(corpus["tokenizer"])],
        *["--preset", "tiny-qwen", "--block-size", "64", "--batch-size", "8", "--max-steps", "40", "--lr", "3e-3"],
        *["--out", str(out), "--eval-fraction", "0.05"],
    )
    return out, facts


def run_model_card_code(model_dir: Path, cwd: Path) -> str:
    """Run the Python block of the folder's model card, as a Hub user pastes it (PATH: the folder); its output."""
    code = re.search(r"```python\n(.*?)```", (model_dir / "README.md").read_text(encoding="utf-8"), re.DOTALL)[1]
    script = 'import sys\nsys.modules["minigpt"] = None\n' + code.replace('"PATH"', repr(str(model_dir)))
    return _fresh_python(["-c", script], cwd).stdout


def reload_in_fresh_process(model_dir: Path, prompt: str, cwd: Path) -> dict:
    result = _fresh_python(["-c", RELOAD_AND_CHAT, str(model_dir), prompt], cwd)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fresh_python(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,  # outside the repository, so `minigpt` is not importable from the working directory either
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def card_header(model_dir: Path) -> dict:
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# --- the stages end to end -------------------------------------------------------------------------------------------


def test_pretrain_writes_a_hub_model_repo_and_its_loss_falls(pretrained, tmp_path):
    out, facts = pretrained
    assert facts["final_train_loss"] < facts["first_train_loss"] - 1.0
    assert facts["steps"] == 40 and facts["finished"]
    assert math.isclose(facts["eval_perplexity"], math.exp(facts["eval_loss"]), rel_tol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    assert config["use_cache"] is True
    for name in ("model.safetensors", "modeling_minigpt.py", "configuration_minigpt.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert trained_stage(out) == "pretrain"  # eval and chat read it: the template is for the SFT to come
    assert run_model_card_code(out, cwd=tmp_path).startswith("Once upon a time")  # the card's snippet continues text
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs").glob("events.out.tfevents.*")), "TensorBoard logs"
    assert not any(path.name.startswith(".") or path.name == "checkpoints" for path in out.iterdir())  # no clutter
    header = card_header(out)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert set(header["language"]) == {"en", "zh"} and "pretrain" in header["tags"]
    # A base model ends documents with <|endoftext|> only.
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


def test_sft_on_alpaca_and_minimind_answers_after_reload_in_fresh_process(pretrained, shared_data, tmp_path):
    base, _ = pretrained
    out = tmp_path / "chat"
    facts = run_stage(
        "sft",
        *["--model", str(base), "--out", str(out), "--max-length", "128", "--batch-size", "8"],
        *["--data", str(shared_data / "sft/rasbt_instruction-data_en_alpaca.json")],
        str(shared_data / "minimind/lora_identity.jsonl"),
        *["--max-steps", "25", "--lr", "2e-3"],
    )
    assert facts["final_train_loss"] < facts["first_train_loss"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]  # <|endoftext|> and <|im_end|>: a chat reply stops at its turn end
    answer = reload_in_fresh_process(out, "Give three tips for staying healthy.", cwd=tmp_path)
    assert answer["module"].startswith("transformers_modules")
    assert answer["new_tokens"] >= 1


def test_sft_checkpoints_stop_at_the_end_of_a_turn_as_the_final_model_does(pretrained, shared_data, tmp_path):
    """Only the final folder's generation_config.json listed <|im_end|> as an end: a checkpoint of an SFT run, loaded
    with transformers, ran on past the end of its turn."""
    base, _ = pretrained
    out = tmp_path / "sft"
    argv = ["--model", str(base), "--out", str(out), "--data", str(shared_data / "minimind/lora_identity.jsonl")]
    argv += ["--max-length", "64", "--max-steps", "2", "--eval-fraction", "0", "--precision", "fp32"]
    train.train(train.resolve_args(train.parse_args("sft", [*argv, "--save-steps", "2"]), "sft"), "sft")
    final = json.loads((out / "generation_config.json").read_text())
    checkpoint = json.loads((out / "checkpoints" / "checkpoint-2" / "generation_config.json").read_text())
    assert len(final["eos_token_id"]) == 2 and checkpoint["eos_token_id"] == final["eos_token_id"]
    pretrain_eos = json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    assert pretrain_eos == final["eos_token_id"][0]  # a pretrained model ends at <|endoftext|> only


def test_sft_neftune_alpha_noises_the_training_loss(pretrained, shared_data, tmp_path):
    """--neftune-alpha reaches Trainer's NEFTune (noise on the input embeddings in training forwards): same seed and
    data, and the first training loss moves with it."""
    base, _ = pretrained
    first_losses = {}
    for alpha in ("0", "5"):
        facts = run_stage(
            "sft",
            *["--model", str(base), "--out", str(tmp_path / f"alpha-{alpha}"), "--max-length", "64"],
            *["--batch-size", "4", "--max-steps", "1", "--neftune-alpha", alpha],
            *["--data", str(shared_data / "minimind/lora_identity.jsonl")],
        )
        first_losses[alpha] = facts["first_train_loss"]
    assert first_losses["0"] != first_losses["5"], first_losses


def test_pretrain_with_compile_trains_the_same_model_and_saves_plain_weights(corpus, tmp_path):
    """--compile (Trainer's torch_compile): the compiled step computes the eager step's losses (the fast paths step
    aside under the compiler), and the saved repo holds the plain parameter names, not torch.compile's wrapper's."""
    from torch._dynamo.utils import counters

    losses = {}
    for mode in ("eager", "compiled"):
        counters.clear()
        facts = run_stage(
            "pretrain",
            *["--data", str(corpus["tinystories"]), "--tokenizer", str(corpus["tokenizer"]), "--preset", "tiny-gpt2"],
            *["--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--eval-fraction", "0"],
            *["--out", str(tmp_path / mode), *(["--compile"] if mode == "compiled" else [])],
        )
        losses[mode] = (facts["first_train_loss"], facts["final_train_loss"])
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "compiled"), (mode, dict(counters["stats"]))
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), losses
    with safe_open(str(tmp_path / "compiled" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and not any("_orig_mod" in name for name in names), sorted(names)


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_model(corpus, tmp_path, monkeypatch):
    """--gradient-checkpointing: every layer runs again in the backward pass (twice the MLP calls), with the same
    losses as a plain run (the SwiGLU MLP's kept training memory included)."""
    from minigpt import modeling_minigpt as modeling

    calls = Counter()
    forward = modeling.MiniGPTMLP.forward

    def counted(self, *args, **kwargs):
        calls[mode] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling.MiniGPTMLP, "forward", counted)
    losses = {}
    for mode in ("plain", "checkpointed"):
        facts = run_stage(
            "pretrain",
            *["--data", str(corpus["tinystories"]), "--tokenizer", str(corpus["tokenizer"]), "--preset", "tiny-qwen"],
            *["--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--eval-fraction", "0"],
            *["--out", str(tmp_path / mode), *(["--gradient-checkpointing"] if mode == "checkpointed" else [])],
        )
        losses[mode] = (facts["first_train_loss"], facts["final_train_loss"])
    assert calls["checkpointed"] == 2 * calls["plain"] > 0, calls
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=1e-5), losses


def test_a_run_shorter_than_logging_steps_reports_its_one_logged_loss(pretrained, shared_data, tmp_path, capsys):
    """3 steps, loss logged every 10: Trainer logs step 1 only, and the summary must not read 'x -> x' (as if the
    run had learned nothing)."""
    base, _ = pretrained
    argv = stage_args(
        "sft",
        *["--model", str(base), "--out", str(tmp_path / "short"), "--max-length", "64", "--batch-size", "4"],
        *["--max-steps", "3", "--data", str(shared_data / "minimind/lora_identity.jsonl")],
    )
    argv[argv.index("--logging-steps") + 1] = "10"
    train.train(train.resolve_args(train.parse_args("sft", argv), "sft"), "sft")
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("saved "))
    assert "step 3/3" in summary and "->" not in summary, summary
    assert "at step 1 (the only one logged: --logging-steps 10)" in summary, summary


def test_sft_mix_data_gives_each_pass_over_the_sft_rows_its_own_pretraining_blocks(
    pretrained, corpus, shared_data, tmp_path
):
    """--mix-data: pretraining blocks make up --mix-ratio of the rows, and each pass over the SFT rows has its own
    (every block once before any repeats), not the same few on every pass."""
    base, _ = pretrained
    identity = shared_data / "minimind/lora_identity.jsonl"  # 91 conversations
    flags = ["--model", str(base), "--data", str(identity), "--mix-data", str(corpus["tinystories"])]
    flags += ["--mix-block-size", "32", "--max-length", "256", "--batch-size", "8", "--eval-fraction", "0"]

    def training_rows(*more: str):
        args = train.resolve_args(train.parse_args("sft", stage_args("sft", *flags, *more)), "sft")
        trainer = train.prepare(args, "sft").trainer
        chat_start = trainer.processing_class.convert_tokens_to_ids("<|im_start|>")
        rows = [tuple(row["input_ids"]) for row in trainer.train_dataset]
        sft = Counter(row for row in rows if chat_start in row)
        return trainer, sft, Counter(row for row in rows if chat_start not in row)

    # 80 steps x 8 rows, half of them SFT: 320 SFT rows are 4 passes (rounded up) over the 91 conversations.
    trainer, sft, blocks = training_rows("--out", str(tmp_path / "steps"), "--max-steps", "80")
    assert len(sft) == 91 and set(sft.values()) == {4}
    assert blocks.total() == 4 * 91
    assert len(blocks) > 91 and max(blocks.values()) - min(blocks.values()) <= 1, blocks.most_common(3)
    # --epochs counts passes over the SFT rows: the train set holds them twice, so Trainer goes over it once.
    trainer, sft, blocks = training_rows("--out", str(tmp_path / "epochs"), "--epochs", "2")
    assert set(sft.values()) == {2} and blocks.total() == 2 * 91 and set(blocks.values()) == {1}
    assert trainer.args.num_train_epochs == 1


def test_sft_mix_data_reads_json_by_its_own_text_field(pretrained, shared_data, tmp_path):
    """chinese-poetry JSON needs a text field; --text-field is --data's (an Alpaca file here): the mix had none."""
    base, _ = pretrained
    flags = ["--model", str(base), "--data", str(shared_data / "sft/rasbt_instruction-data_en_alpaca.json")]
    flags += ["--mix-data", str(shared_data / "pretrain/songci_ci.song.0.json"), "--mix-text-field", "paragraphs"]
    flags += ["--mix-block-size", "32", "--max-length", "128", "--max-steps", "4", "--out", str(tmp_path / "out")]
    trainer = train.prepare(
        train.resolve_args(train.parse_args("sft", stage_args("sft", *flags)), "sft"), "sft"
    ).trainer
    chat_start = trainer.processing_class.convert_tokens_to_ids("<|im_start|>")
    poems = [row["input_ids"] for row in trainer.train_dataset if chat_start not in row["input_ids"]]
    assert poems and "。" in "".join(trainer.processing_class.decode(poem) for poem in poems)  # Song lyrics


def test_dpo_on_both_preference_files(pretrained, shared_data, tmp_path):
    base, _ = pretrained
    out = tmp_path / "dpo"
    facts = run_stage(
        "dpo",
        *["--model", str(base), "--out", str(out), "--max-length", "128", "--batch-size", "4"],
        *["--data", str(shared_data / "dpo/llamafactory_dpo_zh_demo.json")],
        str(shared_data / "dpo/rasbt_instruction-data-with-preference_en.json"),
        *["--max-steps", "12", "--lr", "1e-3", "--eval-fraction", "0"],
    )
    assert facts["first_train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert facts["final_train_loss"] < facts["first_train_loss"]
    assert set(card_header(out)["language"]) == {"en", "zh"}
    assert reload_in_fresh_process(out, "你好", cwd=tmp_path)["new_tokens"] >= 1
    run_model_card_code(out, cwd=tmp_path)  # the card's chat snippet runs, without our package


def test_lora_adapter_is_saved_reloaded_and_merged(pretrained, shared_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = pretrained
    out = tmp_path / "lora"
    facts = run_stage(
        "sft",
        *["--model", str(base), "--out", str(out), "--data", str(shared_data / "minimind/lora_identity.jsonl")],
        *["--max-length", "128", "--max-steps", "15", "--lr", "5e-3", "--eval-fraction", "0"],
        *["--lora", "--lora-rank", "4", "--lora-targets", "q_proj", "v_proj", "--merge"],
    )
    assert facts["trained_parameters"] < facts["parameters"] / 5
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter_config.json").exists()  # the top level is the merged, plain model

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base_model = AutoModelForCausalLM.from_pretrained(base)
    base_logits = base_model(ids).logits
    with_adapter = PeftModel.from_pretrained(base_model, out / "adapter").eval()
    adapted_logits = with_adapter(ids).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert "lora" in card_header(out)["tags"] and card_header(out)["library_name"] == "transformers"  # merged


@pytest.mark.parametrize("command", ["pretrain", "dpo"])
def test_lora_on_other_stages_saves_an_adapter_that_peft_reloads(pretrained, corpus, shared_data, tmp_path, command):
    from peft import AutoPeftModelForCausalLM

    base, _ = pretrained
    out = tmp_path / f"lora-{command}"
    data = corpus["xiyouji"] if command == "pretrain" else shared_data / "dpo/llamafactory_dpo_zh_demo.json"
    length = "--block-size" if command == "pretrain" else "--max-length"
    facts = run_stage(
        command,
        *["--model", str(base), "--out", str(out), "--data", str(data), length, "128", "--batch-size", "2"],
        *["--max-steps", "4", "--lr", "1e-3", "--eval-fraction", "0", "--lora"],
    )
    assert facts["trained_parameters"] < facts["parameters"] / 5
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.peft_config["default"].r == 8
    run_model_card_code(out, cwd=tmp_path)  # the card's snippet loads the adapter with peft, without our package
    header = card_header(out)
    assert header["library_name"] == "peft" and "base_model" not in header  # the Hub's keys for an adapter; a
    # local base is no Hub model to link to


def test_a_lora_adapter_as_model_is_merged_and_trained_whole(pretrained, corpus, shared_data, tmp_path):
    base, _ = pretrained
    adapter = tmp_path / "adapter"
    run_stage(
        "pretrain",
        *["--model", str(base), "--out", str(adapter), "--data", str(corpus["xiyouji"]), "--block-size", "64"],
        *["--max-steps", "2", "--eval-fraction", "0", "--lora"],
    )
    out = tmp_path / "sft"
    facts = run_stage(
        "sft",
        *["--model", str(adapter), "--out", str(out), "--data", str(shared_data / "minimind/lora_identity.jsonl")],
        *["--max-length", "64", "--max-steps", "2", "--eval-fraction", "0"],
    )
    assert facts["trained_parameters"] == facts["parameters"]  # every merged weight, not the frozen base's 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_a_lora_adapter_names_its_base_so_that_it_loads_from_any_folder(pretrained, shared_data, tmp_path, monkeypatch):
    """`--model runs/base` went into adapter_config.json as typed: the adapter loaded only from the folder the run
    started in (elsewhere peft went looking for a Hub repo 'runs/base')."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = pretrained
    monkeypatch.chdir(tmp_path)
    data = shared_data / "minimind/lora_identity.jsonl"
    common = ["--data", str(data), "--max-length", "64", "--max-steps", "3", "--lr", "5e-3", "--eval-fraction", "0"]
    run_stage("sft", "--model", os.path.relpath(base), "--out", "adapter", "--lora", *common)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)

    monkeypatch.chdir(shared_data)  # anywhere else
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()(ids).logits
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
        torch.testing.assert_close(loaded, on_base.eval()(ids).logits)

    # A second adapter on this one would need it merged into the base, which is saved nowhere: the adapter it wrote
    # named the bare base and, loaded, left the first adapter out.
    with pytest.raises(MiniGPTError, match="adapter: --lora on a LoRA adapter: the new adapter would work only on"):
        run_stage("sft", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "second"), "--lora", *common)


# --- losses equal a hand computation ---------------------------------------------------------------------------------


def _assistant_positions(ids: list[int], tokenizer) -> list[int]:
    """Positions of assistant reply tokens, found by reading the ChatML markup: after `<|im_start|>assistant\\n`,
    up to and including the closing `<|im_end|>`."""
    header = tokenizer.convert_tokens_to_ids(["<|im_start|>"]) + tokenizer("assistant\n")["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    positions, i = [], 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            i += len(header)
            while i < len(ids):
                positions.append(i)
                i += 1
                if ids[i - 1] == im_end:
                    break
        else:
            i += 1
    return positions


def test_sft_loss_on_a_two_example_batch_equals_hand_computation(pretrained, shared_data, tmp_path):
    base, _ = pretrained
    args = train.parse_args(
        "sft",
        stage_args(
            "sft",
            *["--model", str(base), "--out", str(tmp_path / "sft"), "--max-length", "128"],
            *["--data", str(shared_data / "minimind/lora_identity.jsonl"), "--eval-fraction", "0"],
        ),
    )
    run = train.prepare(train.resolve_args(args, "sft"), "sft")
    rows = [run.trainer.train_dataset[i] for i in (0, 1)]
    assert len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])  # so the batch has padding
    batch = run.trainer.data_collator(rows)
    model = run.trainer.model.eval()
    with torch.no_grad():
        loss = run.trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()

    total, count = 0.0, 0
    for row, example in enumerate(rows):
        ids = list(example["input_ids"])
        positions = _assistant_positions(ids, run.tokenizer)
        assert positions and ids[positions[-1]] == run.tokenizer.convert_tokens_to_ids("<|im_end|>")
        log_probs = logits[row].log_softmax(-1)
        total -= sum(log_probs[t - 1, ids[t]].item() for t in positions)
        count += len(positions)
    assert count == int((batch["labels"] != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_dpo_loss_on_a_two_pair_batch_equals_hand_computation(pretrained, shared_data, tmp_path):
    base, _ = pretrained
    args = train.parse_args(
        "dpo",
        stage_args(
            "dpo",
            *["--model", str(base), "--out", str(tmp_path / "dpo"), "--max-length", "256", "--beta", "0.5"],
            *["--data", str(shared_data / "dpo/rasbt_instruction-data-with-preference_en.json")],
            *["--eval-fraction", "0"],
        ),
    )
    run = train.prepare(train.resolve_args(args, "dpo"), "dpo")
    policy, reference = run.trainer.model.eval(), run.trainer.ref_model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, or the loss is log 2 whatever the code does
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rows = [run.trainer.train_dataset[i] for i in (0, 1)]
    for row in rows:  # whole pairs, so no truncation is involved
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 256
    with torch.no_grad():
        loss = run.trainer.compute_loss(policy, run.trainer.data_collator(rows))

    def completion_log_prob(model, prompt: list[int], completion: list[int]) -> float:
        ids = torch.tensor([prompt + completion])
        log_probs = model(input_ids=ids).logits[0].double().log_softmax(-1)
        return sum(log_probs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))

    losses = []
    for row in rows:
        prompt = run.tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        prompt = list(prompt["input_ids"])
        assert list(row["prompt_ids"]) == list(prompt)
        with torch.no_grad():
            margins = [
                completion_log_prob(policy, prompt, list(row[key]))
                - completion_log_prob(reference, prompt, list(row[key]))
                for key in ("chosen_ids", "rejected_ids")
            ]
        losses.append(-torch.nn.functional.logsigmoid(torch.tensor(0.5 * (margins[0] - margins[1]))).item())
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3


# --- the optimiser and schedule users expect ---------------------------------------------------------------------------


def test_weight_decay_on_matrices_only_with_fused_adamw_and_cosine_warmup(corpus, tmp_path):
    args = train.parse_args(
        "pretrain",
        stage_args(
            "pretrain",
            *["--data", str(corpus["tinystories"]), "--tokenizer", str(corpus["tokenizer"])],
            *["--out", str(tmp_path / "m"), "--block-size", "64", "--lr", "1e-3", "--min-lr-ratio", "0.1"],
            *["--warmup", "4", "--max-steps", "20", "--preset", "tiny-gpt2"],
        ),
    )
    trainer = train.prepare(train.resolve_args(args, "pretrain"), "pretrain").trainer
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    parameters = list(trainer.model.parameters())
    assert any(p.ndim == 1 for p in parameters)  # GPT-2 style: biases and LayerNorm gains exist
    assert decayed == {id(p) for p in parameters if p.ndim >= 2}
    assert optimizer.defaults.get("fused") is True

    scheduler = trainer.create_scheduler(num_training_steps=20, optimizer=optimizer)
    rates = []
    for _ in range(21):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[2] == pytest.approx(0.5e-3) and rates[4] == pytest.approx(1e-3)
    assert rates[12] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through the cosine
    assert rates[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_precision_auto_never_picks_emulated_bf16_on_cpu(monkeypatch):
    assert train.choose_precision("fp32", 64) == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(MiniGPTError, match="fp16 needs a CUDA GPU"):
            train.choose_precision("fp16", 64)
        if not train._cpu_has_bf16():  # this machine: emulated bf16 is ~20x slower than fp32
            assert train.choose_precision("auto", 256) == "fp32"
        monkeypatch.setattr(train, "_cpu_has_bf16", lambda: False)
        assert train.choose_precision("auto", 256) == "fp32"


# --- --config ----------------------------------------------------------------------------------------------------------


def test_yaml_config_sets_any_flag_and_typed_flags_win(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(
        "data: [a.jsonl, b.json]\nout: run\nlr: 0.0005\nbatch-size: 16\nlora: true\nlora_targets: q_proj\n"
    )
    args = train.apply_config(train.parse_args("sft", ["--config", str(config), "--lr", "0.01"]), "sft")
    assert args.data == ["a.jsonl", "b.json"] and args.out == "run"
    assert args.lr == 0.01  # typed on the command line: wins over the file
    assert args.batch_size == 16 and args.lora is True and args.lora_targets == ["q_proj"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 0.1\nlearning_rate: 0.1\n", r"sft\.yaml:2: unknown option 'learning_rate'"),
        ("lr: 0.1\nbatch-size: many\n", r"sft\.yaml:2: field 'batch-size': invalid literal"),
        ("lora: 3\n", r"sft\.yaml:1: field 'lora': expected true or false"),
        ("precision: fp8\n", r"sft\.yaml:1: field 'precision': 'fp8' is not one of"),
        ("lr: [0.1\n", r"sft\.yaml:2: not valid YAML"),
    ],
)
def test_yaml_config_mistakes_name_file_line_and_field(tmp_path, text, message):
    config = tmp_path / "sft.yaml"
    config.write_text(text)
    with pytest.raises(MiniGPTError, match=message):
        train.apply_config(train.parse_args("sft", ["--config", str(config)]), "sft")


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("sft", ["--data", "x.jsonl", "--out", "o"], "minigpt sft starts from a trained model: pass --model DIR"),
        ("pretrain", ["--data", "x.txt", "--out", "o"], "pretraining a new model needs --tokenizer DIR"),
        ("dpo", ["--model", "m", "--out", "o"], "--data is required"),
        ("sft", ["--model", "no-such-dir", "--data", "x", "--out", "o"], "no-such-dir: --model: no such folder"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--merge"], "--merge merges a LoRA adapter"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--lr", "-1"], "--lr must be above 0, got -1.0"),
        ("dpo", ["--model", ".", "--data", "x", "--out", "o", "--epochs", "0"], "--epochs must be above 0, got 0.0"),
        ("pretrain", ["--tokenizer", ".", "--data", "x", "--out", "o", "--block-size", "1"], "--block-size must be at"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--mix-ratio", "1"], "--mix-ratio must be in [0, 1)"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o"], ".: --model: no tokenizer (no tokenizer.json)"),
        ("pretrain", ["--tokenizer", ".", "--data", "x", "--out", "o", "--lora"], "--lora adapts a trained model"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--lora-rank", "4"], "--lora-rank sets up a LoRA"),
        ("dpo", ["--model", ".", "--data", "x", "--out", "o", "--lora-targets", "q_proj"], "--lora-targets sets up"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        ("sft", ["--model", ".", "--data", "x", "--out", "o", "--num-proc", "-2"], "--num-proc must be at least 1"),
        ("sft", ["--model", ".", "--data", "x", "--out", "README.md"], "README.md: --out: a file, not a folder"),
        ("sft", ["--model", "README.md", "--data", "x", "--out", "o"], "README.md: --model: a file, not a folder"),
    ],
)
def test_stage_argument_mistakes_are_user_errors(command, argv, message):
    with pytest.raises(MiniGPTError, match=re.escape(message)):
        train.resolve_args(train.parse_args(command, argv), command)


def test_a_run_that_fails_on_its_data_leaves_no_output_folder(pretrained, tmp_path):
    base, _ = pretrained
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text(json.dumps({"conversations": turns}) + '\n{"conversations": [\n', encoding="utf-8")
    for out in (tmp_path / "new", tmp_path / "new" / "nested"):
        with pytest.raises(MiniGPTError, match="chat.jsonl:2"):
            run_stage("sft", "--model", str(base), "--data", str(data), "--out", str(out))
        assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(MiniGPTError, match="chat.jsonl:2"):
        run_stage("sft", "--model", str(base), "--data", str(data), "--out", str(kept))
    assert [path.name for path in kept.iterdir()] == ["notes.txt"]  # a folder the run did not create stays


def test_a_misspelt_model_config_field_is_refused(corpus, tmp_path):
    with pytest.raises(
        MiniGPTError, match=re.escape("--model-config: unknown config field 'hiden_size' (did you mean")
    ):
        run_stage(
            "pretrain",
            *["--data", str(corpus["xiyouji"]), "--tokenizer", str(corpus["tokenizer"]), "--out", str(tmp_path / "m")],
            *["--preset", "tiny-qwen", "--model-config", "hiden_size=128", "--max-steps", "1"],
        )
