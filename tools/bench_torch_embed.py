#!/usr/bin/env python3
"""Time sentence-transformers' all-MiniLM-L6-v2 on PyTorch's CPU: sentences per second.

The figures are the PyTorch baseline for the crate's sentence-embedding benchmark. The model is
loaded from a local folder (``--model-dir``, filled by ``tools/fetch_model.py``; no hub access),
in eval mode, with ``torch.set_num_threads(--threads)`` (default 2) and under
``torch.inference_mode()``.

Workload: ``NUM_SENTENCES`` (256) English sentences of 8 to 40 words made by
`bench_sentences()` from a seeded `random.Random`, in file order, cut into consecutive batches
of ``--batch`` (32). The list is also the file ``tests/fixtures/minilm/bench_sentences.txt``
(UTF-8, one sentence per line), which the Rust benchmark reads, so both sides embed exactly the
same batches. The script writes the file when it is missing and refuses to run when the file
differs from the generated list (``--write-sentences`` overwrites it).

Measured, each ``--warmup`` times untimed and then ``--runs`` times, over all batches:

* ``encode``: ``model.encode(batch, batch_size=len(batch), convert_to_numpy=True)`` per batch,
  i.e. tokenisation + forward + mean pooling + L2 normalisation + copy to NumPy (the headline
  ``sentences_per_second`` and ``median_ms_per_batch``);
* ``forward_only``: ``model(features)`` on batches tokenised beforehand (BERT, pooling and
  normalisation, no tokenisation);
* ``tokenize_only``: the tokenisation of the batches (``model.preprocess``);
* ``encode_length_sorted``: one ``model.encode(all, batch_size=--batch)`` call, which sorts the
  sentences by length before batching and so pads less (what a user of the library gets).

The median of the ``--runs`` totals is reported; ``median_ms_per_batch`` is that median divided
by the number of batches. Output: one JSON object on stdout. Timings depend on whatever else
runs on the machine.

Usage::

    python tools/bench_torch_embed.py [--threads 2] [--batch 32] [--runs 5] [--warmup 1]
    python tools/bench_torch_embed.py --sentences-only      # just write/check the sentence file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fetch_model import ENV_MODEL_DIR, REPO_ROOT, resolve_dest

# sentence-transformers is imported lazily, after these are set: never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NUM_SENTENCES = 256
SENTENCE_SEED = 20240611
MIN_WORDS, MAX_WORDS = 8, 40
DEFAULT_SENTENCES_FILE = REPO_ROOT / "tests" / "fixtures" / "minilm" / "bench_sentences.txt"

SUBJECTS = (
    "the engineer", "my neighbour", "a small team", "the new manager", "our customer", "the teacher",
    "a young student", "the city council", "the old librarian", "every developer", "the research group",
    "a local farmer", "the doctor", "her brother", "the delivery driver", "the committee", "a journalist",
    "the support agent", "the pilot", "a volunteer", "the chef", "the museum", "the startup", "the robot",
)
VERBS = (
    "reviewed", "repaired", "explained", "ignored", "described", "painted", "measured", "shipped",
    "rebuilt", "tested", "designed", "cancelled", "translated", "cleaned", "ordered", "recorded",
    "borrowed", "planned", "compared", "printed", "moved", "questioned", "published", "discovered",
)
ADJECTIVES = (
    "broken", "quiet", "expensive", "detailed", "ancient", "colourful", "fragile", "efficient",
    "confusing", "remote", "wooden", "popular", "tiny", "enormous", "reliable", "unusual", "bright",
    "heavy", "digital", "famous", "simple", "late", "rusty", "careful",
)
NOUNS = (
    "report", "bicycle", "bridge", "recipe", "contract", "garden", "server", "painting", "schedule",
    "engine", "letter", "website", "library", "budget", "camera", "river", "window", "kitchen",
    "database", "concert", "harbour", "manuscript", "telescope", "spreadsheet",
)
PLACES = (
    "in the morning", "near the station", "after lunch", "before the deadline", "during the storm",
    "in Paris", "at the office", "on Tuesday", "under the old bridge", "behind the school",
    "in 2019", "at midnight", "for the third time", "without any help", "across the valley",
    "with great care", "in less than 20 minutes", "at the conference", "on the second floor",
)
CONNECTIVES = (
    "and", "but", "because", "while", "so", "although", "after", "before", "since", "until",
)
ADVERBS = ("quickly", "carefully", "again", "finally", "quietly", "suddenly", "eventually", "gladly")


def bench_sentences(n: int = NUM_SENTENCES, seed: int = SENTENCE_SEED) -> list[str]:
    """`n` deterministic English sentences of MIN_WORDS..MAX_WORDS words, made of whole clauses."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        target = rng.randint(MIN_WORDS, MAX_WORDS)
        words: list[str] = []
        while len(words) < target:
            clause = [rng.choice(CONNECTIVES)] if words else []
            clause.append(rng.choice(SUBJECTS))
            if rng.random() < 0.3:
                clause.append(rng.choice(ADVERBS))
            clause += [rng.choice(VERBS), rng.choice(("the", "a", "their", "this")),
                       rng.choice(ADJECTIVES), rng.choice(NOUNS)]
            if rng.random() < 0.6:
                clause.append(rng.choice(PLACES))
            clause_words = " ".join(clause).split()
            if words and len(words) + len(clause_words) > MAX_WORDS:
                break  # whole clauses only; the sentence so far already has >= MIN_WORDS words
            words += clause_words
            if rng.random() < 0.4:
                words[-1] += ","
        words[-1] = words[-1].rstrip(",")
        words[0] = words[0][0].upper() + words[0][1:]
        if not MIN_WORDS <= len(words) <= MAX_WORDS:
            raise AssertionError(f"generated a sentence of {len(words)} words")
        sentences.append(" ".join(words) + ("?" if rng.random() < 0.1 else "."))
    return sentences


def sync_sentence_file(path: Path, sentences: list[str], overwrite: bool) -> None:
    """Write the list to `path` if missing (or `overwrite`); otherwise require it to match."""
    text = "".join(f"{s}\n" for s in sentences)
    if path.is_file() and not overwrite:
        if path.read_text(encoding="utf-8") != text:
            raise SystemExit(f"{path} differs from bench_sentences(); rerun with --write-sentences to replace it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(sentences)} sentences)", file=sys.stderr)


def time_total_ms(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
    """Wall times of `runs` calls of `fn` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times_ms: list[float], num_sentences: int, num_batches: int) -> dict:
    median = statistics.median(times_ms)
    return {
        "sentences_per_second": round(num_sentences / (median / 1e3), 2),
        "median_ms_per_batch": round(median / num_batches, 3),
        "median_ms_total": round(median, 3),
        "min_ms_total": round(min(times_ms), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"model folder (default ${ENV_MODEL_DIR}, else target/models/all-MiniLM-L6-v2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="sentences per batch (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="timed passes over all batches (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    parser.add_argument("--sentences-file", type=Path, default=DEFAULT_SENTENCES_FILE,
                        help="where the benchmark sentences live (default tests/fixtures/minilm/bench_sentences.txt)")
    parser.add_argument("--write-sentences", action="store_true", help="overwrite the sentence file")
    parser.add_argument("--sentences-only", action="store_true", help="write/check the sentence file and exit")
    args = parser.parse_args()

    sentences = bench_sentences()
    sync_sentence_file(args.sentences_file, sentences, args.write_sentences)
    if args.sentences_only:
        return

    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model_dir = resolve_dest(args.model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"no model in {model_dir}; run `python tools/fetch_model.py` first or pass --model-dir")
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()

    batches = [sentences[i:i + args.batch] for i in range(0, len(sentences), args.batch)]

    def preprocess(batch: list[str]) -> dict:
        features = model.preprocess(batch) if hasattr(model, "preprocess") else model.tokenize(batch)
        return features

    with torch.inference_mode():
        features = [preprocess(b) for b in batches]
        lengths = [int(n) for f in features for n in f["attention_mask"].sum(dim=1)]
        padded = [int(f["input_ids"].shape[0] * f["input_ids"].shape[1]) for f in features]

        def run_encode() -> None:
            for batch in batches:
                model.encode(batch, batch_size=len(batch), convert_to_numpy=True, show_progress_bar=False)

        def run_forward() -> None:
            for f in features:
                model(dict(f))["sentence_embedding"]

        def run_tokenize() -> None:
            for batch in batches:
                preprocess(batch)

        def run_sorted() -> None:
            model.encode(sentences, batch_size=args.batch, convert_to_numpy=True, show_progress_bar=False)

        # The forward on pre-tokenised batches must give what encode gives.
        reference = np.concatenate([model.encode(b, batch_size=len(b), convert_to_numpy=True,
                                                 show_progress_bar=False) for b in batches])
        forward = np.concatenate([model(dict(f))["sentence_embedding"].numpy() for f in features])
        forward_diff = float(np.abs(reference - forward).max())

        results = {}
        for name, fn in (("encode", run_encode), ("forward_only", run_forward),
                         ("tokenize_only", run_tokenize), ("encode_length_sorted", run_sorted)):
            results[name] = summary(time_total_ms(fn, args.warmup, args.runs), len(sentences), len(batches))
            print(f"{name:>22}: {results[name]['sentences_per_second']:9.1f} sentences/s, "
                  f"{results[name]['median_ms_per_batch']:8.2f} ms/batch", file=sys.stderr)

    report = {
        "sentences_per_second": results["encode"]["sentences_per_second"],
        "median_ms_per_batch": results["encode"]["median_ms_per_batch"],
        "batch": args.batch,
        "threads": args.threads,
        "num_sentences": len(sentences),
        "num_batches": len(batches),
        "runs": args.runs,
        "warmup": args.warmup,
        "tokens_per_sentence_mean": round(sum(lengths) / len(lengths), 2),
        "tokens_per_sentence_max": max(lengths),
        "real_tokens_total": sum(lengths),
        "padded_tokens_total": sum(padded),
        "forward_vs_encode_max_abs_diff": forward_diff,
        "workloads": results,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
