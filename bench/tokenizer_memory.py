"""Tokenizer training streams its corpus: peak memory stays flat as the corpus grows from 1 MB to 100 MB.

Generates deterministic bilingual text (invented English words and Chinese characters, in documents separated by blank
lines), then runs `minigpt train-tokenizer` on it in a fresh process per size and prints that process's peak RSS and
wall time. A trainer that loaded its corpus would need at least the corpus size in RAM.

    python bench/tokenizer_memory.py [--sizes-mb 1 25 100] [--vocab-size 6400]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"
COMMON_HAN = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about `megabytes` of text to `path`, streamed; the same seed gives the same bytes."""
    rng = random.Random(seed)
    english_words = [
        "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 4))) for _ in range(20_000)
    ]
    # Zipf-like word frequencies, as in natural text (cumulative, so each draw is a bisection).
    word_weights = list(itertools.accumulate(1 / rank for rank in range(1, len(english_words) + 1)))
    han_weights = list(itertools.accumulate(1 / rank for rank in range(1, len(COMMON_HAN) + 1)))
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as file:
        while written < target:
            sentences = []
            for _ in range(rng.randint(3, 12)):
                if rng.random() < 0.5:
                    words = rng.choices(english_words, cum_weights=word_weights, k=rng.randint(4, 16))
                    sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
                else:
                    sentences.append(
                        "".join(rng.choices(COMMON_HAN, cum_weights=han_weights, k=rng.randint(6, 30))) + "。"
                    )
            document = " ".join(sentences) + "\n\n"
            file.write(document)
            written += len(document.encode("utf-8"))
    return written


def train_in_fresh_process(corpus: Path, vocab_size: int, out_dir: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, the command's output) of `minigpt train-tokenizer` in a child process."""
    command = [sys.executable, "-m", "minigpt", "train-tokenizer", "--data", str(corpus)]
    command += ["--vocab-size", str(vocab_size), "--out", str(out_dir)]
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage; ru_maxrss is in kB on Linux
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if child.returncode != 0:
        sys.exit(f"train-tokenizer failed:\n{text}")
    return usage.ru_maxrss / 1024, seconds, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 25, 100])
    parser.add_argument("--vocab-size", type=int, default=6400)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for megabytes in sorted(args.sizes_mb):
            corpus = Path(work) / f"corpus-{megabytes:g}MB.txt"
            size = generate_corpus(corpus, megabytes)
            peak_mb, seconds, output = train_in_fresh_process(corpus, args.vocab_size, Path(work) / "tokenizer")
            print(output.strip().replace("\n", "\n    "))
            rows.append((size / 1e6, peak_mb, seconds))
            corpus.unlink()
    print(f"\n{'corpus MB':>10}  {'peak RSS MB':>11}  {'time s':>7}")
    for corpus_mb, peak_mb, seconds in rows:
        print(f"{corpus_mb:>10.1f}  {peak_mb:>11.0f}  {seconds:>7.1f}")


if __name__ == "__main__":
    main()
