"""Bytes per token: our byte-level BPE at 6,400 and 32,000 tokens against GPT-2's tokenizer, on Chinese and English.

Ours is trained on the first 90% of the documents of 《西游记》 and of the TinyStories sample, plus the other text
files in ../shared/data (Shakespeare, Song ci, the SFT and DPO files), and every tokenizer is measured on the last 10%
of 《西游记》 and of TinyStories (held out). Higher bytes per token = shorter sequences for the same text.
GPT-2's tokenizer is rebuilt from its original `encoder.json` + `vocab.bpe` in ../shared/data/tokenizers/gpt2.

    python bench/tokenizer_bpt.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from minigpt.data import iter_texts, load_records  # noqa: E402
from minigpt.tokenization import build_tokenizer_from_texts, bytes_per_token  # noqa: E402

CORPORA = {
    "xiyouji_zh (Chinese)": "pretrain/xiyouji_zh.txt",
    "TinyStories (English)": "pretrain/tinystories_train_first2MiB.txt",
}
# More training text, not measured on: file -> the JSON field holding its text (None: detected).
EXTRA_TRAINING = {
    "pretrain/tinyshakespeare_input.txt": None,
    "pretrain/songci_ci.song.0.json": "paragraphs",
    "sft/rasbt_instruction-data_en_alpaca.json": None,
    "dpo/llamafactory_dpo_zh_demo.json": None,
    "dpo/rasbt_instruction-data-with-preference_en.json": None,
    "minimind/lora_identity.jsonl": None,
}


def gpt2_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from OpenAI's original files, checked against ids GPT-2 is known to give."""
    tokenizer = Tokenizer(models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    gpt2 = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False)
    assert gpt2("Hello world")["input_ids"] == [15496, 995], "GPT-2 files give unexpected ids"
    assert len(gpt2) == 50257
    return gpt2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[6400, 32000])
    args = parser.parse_args()

    training, held_out = [], {}
    for name, relative_path in CORPORA.items():
        documents = list(load_records(args.shared / relative_path, "pretrain", cache_dir=None, verbose=False)["text"])
        cut = int(len(documents) * 0.9)
        training += documents[:cut]
        held_out[name] = documents[cut:]
    for relative_path, text_field in EXTRA_TRAINING.items():
        training += iter_texts([args.shared / relative_path], text_field=text_field)
    print(f"training text: {sum(len(d.encode()) for d in training) / 1e6:.1f} MB; held out: "
          + ", ".join(f"{name} {sum(len(d.encode()) for d in docs) / 1e6:.2f} MB" for name, docs in held_out.items()))  # fmt: skip

    tokenizers = {"GPT-2 (50,257)": gpt2_tokenizer(args.shared / "tokenizers/gpt2")}
    for vocab_size in args.vocab_sizes:
        start = time.perf_counter()
        ours = build_tokenizer_from_texts(training, vocab_size)
        short = " (every pair seen twice is merged: more text gives more tokens)" if len(ours) < vocab_size else ""
        print(f"trained ours at {vocab_size:,}: {len(ours):,} tokens in {time.perf_counter() - start:.1f} s{short}")
        tokenizers[f"ours ({len(ours):,})"] = ours

    width = max(map(len, tokenizers))
    print(f"\nbytes per token on held-out text (higher is better)\n{'tokenizer':<{width}}  " + "  ".join(CORPORA))
    for label, tokenizer in tokenizers.items():
        cells = [f"{bytes_per_token(tokenizer, docs):>{len(name)}.2f}" for name, docs in held_out.items()]
        print(f"{label:<{width}}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
