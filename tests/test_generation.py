"""generate() works on MiniGPT unchanged, in every decoding strategy transformers ships in the library: each gives the
tokens (and scores) transformers' own GPT2LMHeadModel / Qwen2ForCausalLM give with the same weights.

MiniGPT's CPU decoding fast paths are on throughout (one row: kept column-major weight blocks; a few rows, as in beam
search: the transposed product), so this also checks them inside every strategy, with the cache reordered by beam
search and cropped by assisted decoding. Contrastive search, DoLa, group and constrained beam search moved to Hub
repositories (`custom_generate`) and need the network, so they are not run here.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_convert import randomise_norms_and_biases
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from minigpt import MiniGPTConfig, MiniGPTForCausalLM
from minigpt.convert import to_native

VOCAB = 256
STYLES = ["tiny-gpt2", "tiny-qwen"]


def model_pair(preset: str) -> tuple[MiniGPTForCausalLM, PreTrainedModel]:
    """(MiniGPT, transformers' own model with the same weights), both in eval mode. Larger-than-default weights give
    peaked next-token distributions, so no two candidate tokens tie within float32 rounding."""
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(preset, vocab_size=VOCAB, pad_token_id=0, initializer_range=0.2)
    ours = MiniGPTForCausalLM(config).eval()
    randomise_norms_and_biases(ours)
    native = to_native(ours).eval()
    for model in (ours, native):
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return ours, native


def prompts(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` prompts of 10 tokens, all but the first left-padded by a different amount."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, VOCAB, (rows, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, rows):
        attention_mask[row, : 2 * row] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def generate(model: PreTrainedModel, rows: int, seed: int = 0, **settings):
    input_ids, attention_mask = prompts(rows)
    torch.manual_seed(seed)  # sampling strategies draw from the global generator
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=12,
            return_dict_in_generate=True,
            output_scores=True,
            **settings,
        )


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam_search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, num_beams=3, temperature=0.7),
    "penalties_and_bans": dict(
        do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5], [7, 8]], min_new_tokens=6
    ),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("preset", STYLES)
@pytest.mark.parametrize("rows", [1, 2])
def test_decoding_strategy_gives_transformers_tokens_and_scores(preset: str, strategy: str, rows: int) -> None:
    ours, native = model_pair(preset)
    mine, theirs = (generate(model, rows, **STRATEGIES[strategy]) for model in (ours, native))
    assert torch.equal(mine.sequences, theirs.sequences)
    assert len(mine.scores) == len(theirs.scores) == 12
    for step, (my_scores, their_scores) in enumerate(zip(mine.scores, theirs.scores, strict=True)):
        # -inf where a processor banned a token: the same tokens must be banned in both
        assert torch.equal(my_scores.isinf(), their_scores.isinf()), step
        finite = my_scores.isfinite()
        torch.testing.assert_close(my_scores[finite], their_scores[finite], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", STYLES)
def test_static_cache_beam_search_equals_dynamic_cache(preset: str) -> None:
    ours, _ = model_pair(preset)
    settings = STRATEGIES["beam_search"]
    static = generate(ours, 2, cache_implementation="static", **settings)
    assert torch.equal(static.sequences, generate(ours, 2, **settings).sequences)


@pytest.mark.parametrize("preset", STYLES)
def test_assisted_and_prompt_lookup_decoding_give_the_greedy_tokens(preset: str) -> None:
    """Speculative decoding proposes tokens from a draft (a smaller MiniGPT, or n-grams of the prompt) and keeps those
    the main model agrees with, cropping its cache past the first disagreement: greedy output must not change."""
    ours, native = model_pair(preset)
    torch.manual_seed(1)
    draft_config = MiniGPTConfig.from_preset(preset, vocab_size=VOCAB, pad_token_id=0, num_hidden_layers=1)
    draft = MiniGPTForCausalLM(draft_config).eval()
    draft.generation_config.pad_token_id, draft.generation_config.eos_token_id = 0, None
    greedy = generate(native, 1, do_sample=False).sequences
    assert torch.equal(generate(ours, 1, do_sample=False, assistant_model=draft).sequences, greedy)
    assert torch.equal(generate(ours, 1, do_sample=False, prompt_lookup_num_tokens=3).sequences, greedy)


class TokenCollector(BaseStreamer):
    """A streamer that keeps what generate() hands it: the prompt first, then one new token per step."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.pieces.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("preset", STYLES)
def test_streamer_receives_the_prompt_then_each_new_token_in_order(preset: str) -> None:
    ours, _ = model_pair(preset)
    streamer = TokenCollector()
    sequences = generate(ours, 1, do_sample=False, streamer=streamer).sequences
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.pieces), sequences[0])
    assert [len(piece) for piece in streamer.pieces[1:]] == [1] * 12


@pytest.mark.parametrize("rows", [1, 2])
def test_accelerate_offloading_a_layer_to_disk_gives_the_same_tokens(rows: int, tmp_path) -> None:
    """accelerate's big-model loading hooks every offloaded module and fetches its weights per call; MiniGPT's
    decoding fast paths step aside for hooked layers (and keep no copy of weights meant to stay on disk)."""
    ours, _ = model_pair("tiny-qwen")
    ours.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    device_map |= {"model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", trust_remote_code=True, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really on disk
    offloaded.generation_config.pad_token_id, offloaded.generation_config.eos_token_id = 0, None
    assert torch.equal(
        generate(offloaded, rows, do_sample=False).sequences, generate(ours, rows, do_sample=False).sequences
    )
    kept = sys.modules[type(offloaded).__module__].DECODING_BLOCKS  # the copy of modeling_minigpt.py it loaded
    assert not any(module in kept for module in offloaded.modules())
