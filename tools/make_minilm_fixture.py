#!/usr/bin/env python3
"""Regenerate the all-MiniLM-L6-v2 sentence-embedding fixture of the `ndtransformer` crate.

Loads the model with sentence-transformers from a local folder (``--model-dir``, filled by
``tools/fetch_model.py``; ``HF_HUB_OFFLINE=1``, CPU, 2 threads) and writes to ``--out``
(default ``tests/fixtures/minilm``):

* ``sentences.json``: the sentences (with per-sentence token counts and whether they were
  truncated), the model's ``max_seq_length``, the package name and version the model came from,
  the sha256 of the model files, the library versions, the module pipeline read from
  ``modules.json`` / ``1_Pooling/config.json``, the tensor table and the verification results;
* ``reference.safetensors``:

  =================  =======  ===========  ==================================================
  name               dtype    shape        meaning
  =================  =======  ===========  ==================================================
  ``input_ids``      int64    [n, L]       the whole list tokenised as one batch, exactly as
                                           sentence-transformers tokenises a batch: [CLS] ...
                                           [SEP], truncated to ``max_seq_length`` (256), right-
                                           padded with 0 to the longest row (L = 256 here)
  ``attention_mask`` int64    [n, L]       1 for real tokens, 0 for padding
  ``token_type_ids`` int64    [n, L]       all 0 (single sentences)
  ``lengths``        int64    [n]          real tokens per sentence (row sums of the mask)
  ``embeddings``     float32  [n, 384]     ``model.encode(sentences, batch_size=32,
                                           convert_to_numpy=True)``: mean pooling + L2 norm
  =================  =======  ===========  ==================================================

Checks, run on every invocation (the script fails if one does not hold):

1. the files are reloaded and compared with what was written;
2. mean pooling in NumPy (float64) of the BERT's ``last_hidden_state`` (from PyTorch, on the
   stored ids and mask) over the attention mask, then L2 normalisation, reproduces
   ``embeddings`` (``numpy_mean_pool_max_abs_diff``);
3. an independent float64 NumPy implementation of the whole BERT encoder, read straight from
   ``model.safetensors`` and run on each sentence's unpadded ids, followed by the same pooling
   and normalisation, reproduces ``embeddings`` (``numpy_bert_float64_max_abs_diff``);
4. encoding every sentence on its own (batch of 1, no padding) gives the same embeddings up to
   float32 rounding (``batched_vs_single_max_abs_diff``).

The sentence list is fixed in this file; the near-limit sentence is cut, deterministically,
from a fixed text to the longest prefix that stays at or under ``NEAR_LIMIT_TARGET`` tokens.
With the same library versions on the same machine the output is byte-for-byte reproducible
(float fields of the ``checks`` block may differ in the last digits across machines).

Usage::

    python tools/fetch_model.py
    python tools/make_minilm_fixture.py [--model-dir DIR] [--out tests/fixtures/minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from fetch_model import ENV_MODEL_DIR, PROVENANCE, resolve_dest, sha256_file

# sentence-transformers is imported lazily, after these are set: never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FORMAT_VERSION = 1
GENERATOR_NAME = "make_minilm_fixture.py"
DEFAULT_OUT = "tests/fixtures/minilm"
THREADS = 2
BATCH_SIZE = 32
NEAR_LIMIT_TARGET = 250  # tokens incl. [CLS]/[SEP]; must land in [NEAR_LIMIT_MIN, max_seq_length)
NEAR_LIMIT_MIN = 240
UPSTREAM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
UPSTREAM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
HASHED_FILES = ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "modules.json",
                "1_Pooling/config.json", "sentence_bert_config.json")

NEAR_LIMIT_SOURCE = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines "
    "were programmed by rewiring plugboards, and every new problem meant a new tangle of cables. "
    "Stored-program computers changed that: instructions became data, and data could be edited, "
    "copied and shared. Assemblers let people write mnemonics instead of raw numbers, compilers "
    "let them write formulas instead of registers, and operating systems let many programs share "
    "one processor without knowing about each other. Each step hid details that had seemed "
    "essential a decade earlier. Networks then connected the machines, and protocols such as "
    "TCP/IP turned unreliable links into dependable streams. The web added documents, links and "
    "forms; search engines made the documents findable; phones put the whole arrangement into "
    "pockets. Machine learning is the latest layer: instead of writing rules by hand, engineers "
    "collect examples and let an optimiser adjust millions of parameters until the model's "
    "predictions match the data. Transformers, introduced in 2017, replaced recurrence with "
    "attention, which lets every position of a sequence look at every other position in a single "
    "step. Sentence encoders built on them map a whole sentence to one vector, so that sentences "
    "with similar meanings end up close together, which is useful for search, clustering, "
    "deduplication and recommendation. Running such a model efficiently on an ordinary CPU still "
    "takes care: matrix multiplications dominate the cost, memory layout matters, and the "
    "tokenizer must agree exactly with the one used in training, down to lower-casing, accent "
    "stripping and the handling of punctuation, or the embeddings quietly drift away from the "
    "reference values that everybody else computes and compares against in their own tests."
)

OVER_LIMIT_SENTENCE = " ".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while counting {i * 7} sheep, "
    f"{i * 11} clouds and {i * 13} stars near the riverbank."
    for i in range(1, 16)
)

# (kind, text). The near-limit sentence is inserted by `build_sentences`.
SENTENCES: tuple[tuple[str, str], ...] = (
    ("short", "Hi"),
    ("empty", ""),
    ("plain", "A man is eating food."),
    ("question", "How do I reset my password if I no longer have access to my email account?"),
    ("long", ("Sentence embeddings map a piece of text to a single vector of fixed size, and "
              "models such as this one are trained on more than a billion sentence pairs so that "
              "paraphrases land close to each other while unrelated sentences end up far apart, "
              "which makes them a convenient building block for semantic search, clustering and "
              "duplicate detection in large document collections.")),
    ("punctuation", ("Wait... what?! No -- really: (yes); [maybe] {never} \"quoted\" 'single' "
                     "#hash @at $5 & 50% *star* ~tilde~ `tick` <angle> /slash\\ ^caret_ |pipe|")),
    ("accents", "Crème brûlée à la française, naïve façade, São Paulo, Zürich, Ångström, Dvořák."),
    ("cjk", "我爱自然语言处理。東京は日本の首都です。한국어 문장도 있습니다."),
    ("emoji", "I love pizza 🍕🍕 and rockets 🚀! Great job 👍🏽 ❤️ 😂"),
    ("cyrillic", "Привет, мир! Как у тебя дела сегодня?"),
    ("arabic", "مرحبا بالعالم، كيف حالك اليوم؟"),
    ("greek_devanagari", "Καλημέρα κόσμε. नमस्ते दुनिया।"),
    ("numbers", "In 2023, 3.14159 × 2 = 6.28318; call +1-800-555-0199 or pay $1,234.56 (≈ €1.1k) by 12/31."),
    ("mixed_case", "ThE QuIcK BrOwN FoX JUMPS over the LAZY dog; iPhone, eBay, NASA, McDonald's."),
    ("url", "See https://example.com/path/to/page?query=1&lang=en#section or mail info@example.org now."),
    ("whitespace", "  leading and   multiple\tspaces\n\nand newlines   trailing   "),
    ("control_chars", "zero\u200bwidth soft\u00adhyphen non\u00a0breaking\u3000ideographic space"),
    ("code", "fn main() { println!(\"Hello, world!\"); } // a Rust snippet with snake_case_names"),
    ("rare_words", ("Supercalifragilisticexpialidocious antidisestablishmentarianism "
                    "pneumonoultramicroscopicsilicovolcanoconiosis")),
    ("over_limit", OVER_LIMIT_SENTENCE),
)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` with [CLS]/[SEP] and without truncation."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def near_limit_sentence(tokenizer, max_seq_length: int) -> str:
    """Longest word prefix of NEAR_LIMIT_SOURCE with at most NEAR_LIMIT_TARGET tokens."""
    words = NEAR_LIMIT_SOURCE.split(" ")
    best = ""
    for end in range(1, len(words) + 1):
        candidate = " ".join(words[:end])
        if count_tokens(tokenizer, candidate) > NEAR_LIMIT_TARGET:
            break
        best = candidate
    else:
        raise SystemExit("NEAR_LIMIT_SOURCE is too short to reach the target token count")
    n = count_tokens(tokenizer, best)
    if not NEAR_LIMIT_MIN <= n < max_seq_length:
        raise SystemExit(f"near-limit sentence has {n} tokens, outside [{NEAR_LIMIT_MIN}, {max_seq_length})")
    return best


def build_sentences(tokenizer, max_seq_length: int) -> list[tuple[str, str]]:
    """SENTENCES with the near-limit sentence inserted before the over-limit one."""
    sentences = list(SENTENCES)
    sentences.insert(len(sentences) - 1, ("near_limit", near_limit_sentence(tokenizer, max_seq_length)))
    return sentences


def load_model(model_dir: Path):
    """The SentenceTransformer on the CPU, in eval mode."""
    from sentence_transformers import SentenceTransformer

    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json")
               if not (model_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"{model_dir} does not hold the model ({', '.join(missing)} missing); "
            f"run `python tools/fetch_model.py` first or pass --model-dir / set {ENV_MODEL_DIR}"
        )
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()
    return model


def tokenize_batch(model, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenise `texts` as one batch, the way `model.encode` tokenises each of its batches."""
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    return {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}


def pipeline_description(model_dir: Path) -> dict:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json, as found."""
    modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    pooling = None
    for module in modules:
        if module["type"].endswith(".Pooling"):
            pooling = json.loads((model_dir / module["path"] / "config.json").read_text(encoding="utf-8"))
    return {
        "modules": [module["type"] for module in modules],
        "pooling_config": pooling,
        "normalize": any(module["type"].endswith(".Normalize") for module in modules),
        "sentence_bert_config": json.loads((model_dir / "sentence_bert_config.json").read_text(encoding="utf-8")),
    }


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over positions with mask 1, then L2 normalisation (float64). hidden [n, L, D], mask [n, L]."""
    m = mask.astype(np.float64)[:, :, None]
    pooled = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class NumpyBert:
    """BERT encoder in float64 NumPy, from the safetensors weights (eval mode: no dropout)."""

    def __init__(self, weights_path: Path, config: dict):
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(weights_path)).items()
                  if v.dtype == np.float32}
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        if config["hidden_act"] != "gelu" or config["position_embedding_type"] != "absolute":
            raise SystemExit("NumpyBert implements hidden_act=gelu (erf) and absolute positions only")

    def layer_norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[f"{prefix}.weight"] + self.w[f"{prefix}.bias"]

    def linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[f"{prefix}.weight"].T + self.w[f"{prefix}.bias"]

    def __call__(self, ids: np.ndarray, token_types: np.ndarray) -> np.ndarray:
        """Last hidden state [T, D] of one unpadded sequence."""
        from scipy.special import erf

        w = self.w
        t = len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][token_types])
        x = self.layer_norm(x, "embeddings.LayerNorm")
        d = x.shape[1]
        dh = d // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self.linear(x, f"{p}.attention.self.{n}").reshape(t, self.heads, dh).transpose(1, 0, 2)
                       for n in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(t, d)
            x = self.layer_norm(x + self.linear(context, f"{p}.attention.output.dense"),
                                f"{p}.attention.output.LayerNorm")
            h = self.linear(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
            x = self.layer_norm(x + self.linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


def versions() -> dict:
    import safetensors
    import sentence_transformers
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"model folder (default ${ENV_MODEL_DIR}, else target/models/all-MiniLM-L6-v2)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)  # nothing is random in eval mode; set for good measure
    model_dir = resolve_dest(args.model_dir)
    model = load_model(model_dir)
    tokenizer = model.tokenizer
    max_seq_length = int(model.max_seq_length)
    pipeline = pipeline_description(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    provenance_path = model_dir / PROVENANCE
    provenance = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.is_file() else {}

    sentences = build_sentences(tokenizer, max_seq_length)
    texts = [text for _, text in sentences]

    with torch.inference_mode():
        features = tokenize_batch(model, texts)
        embeddings = model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
        single = np.concatenate([
            model.encode([text], batch_size=1, convert_to_numpy=True, show_progress_bar=False) for text in texts
        ])
        hidden = model[0].auto_model(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            token_type_ids=features["token_type_ids"],
        ).last_hidden_state.numpy()

    tensors = {
        "input_ids": features["input_ids"].numpy().astype(np.int64),
        "attention_mask": features["attention_mask"].numpy().astype(np.int64),
        "token_type_ids": features["token_type_ids"].numpy().astype(np.int64),
        "lengths": features["attention_mask"].numpy().sum(axis=1).astype(np.int64),
        "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
    }
    n = len(texts)
    assert tensors["embeddings"].shape == (n, config["hidden_size"])
    assert tensors["input_ids"].shape[1] <= max_seq_length

    # Independent checks.
    pool_diff = float(np.abs(mean_pool_normalize(hidden, tensors["attention_mask"]) - embeddings).max())
    bert = NumpyBert(model_dir / "model.safetensors", config)
    reference64 = []
    for i in range(n):
        length = int(tensors["lengths"][i])
        last = bert(tensors["input_ids"][i, :length], tensors["token_type_ids"][i, :length])
        reference64.append(mean_pool_normalize(last[None], np.ones((1, length)))[0])
    numpy_bert_diff = float(np.abs(np.stack(reference64) - embeddings).max())
    single_diff = float(np.abs(single - embeddings).max())
    print(f"max |numpy mean pool + L2 of torch last_hidden_state - embeddings| = {pool_diff:.3e}")
    print(f"max |numpy float64 BERT + mean pool + L2 - embeddings|              = {numpy_bert_diff:.3e}")
    print(f"max |encode one by one - encode batched|                            = {single_diff:.3e}")
    for name, value, tol in (("mean pool", pool_diff, 1e-5), ("numpy BERT", numpy_bert_diff, 1e-4),
                             ("batched vs single", single_diff, 1e-4)):
        if not value < tol:
            raise SystemExit(f"check '{name}' failed: {value:.3e} >= {tol}")

    sentence_rows = []
    for i, (kind, text) in enumerate(sentences):
        untruncated = count_tokens(tokenizer, text)
        length = int(tensors["lengths"][i])
        sentence_rows.append({
            "index": i,
            "kind": kind,
            "text": text,
            "num_tokens": length,
            "num_tokens_untruncated": untruncated,
            "truncated": untruncated > length,
        })
        assert length == min(untruncated, max_seq_length), (kind, length, untruncated)

    doc = {
        "format_version": FORMAT_VERSION,
        "generator": GENERATOR_NAME,
        "model": {
            "upstream": UPSTREAM_MODEL,
            "upstream_revision": UPSTREAM_REVISION,
            "package": provenance.get("package"),
            "package_version": provenance.get("version"),
            "files_sha256": {name: sha256_file(model_dir / name) for name in HASHED_FILES},
            "max_seq_length": max_seq_length,
            "hidden_size": config["hidden_size"],
            "num_hidden_layers": config["num_hidden_layers"],
            "num_attention_heads": config["num_attention_heads"],
            "intermediate_size": config["intermediate_size"],
            "hidden_act": config["hidden_act"],
            "layer_norm_eps": config["layer_norm_eps"],
            "vocab_size": config["vocab_size"],
        },
        "pipeline": {
            **pipeline,
            "tokenization": "tokenizer.json (BertNormalizer: clean_text, handle_chinese_chars, lowercase, "
                            "strip_accents follows lowercase; BertPreTokenizer; WordPiece '##', [UNK]=100), "
                            "[CLS]=101 ... [SEP]=102; truncation longest_first to max_seq_length tokens "
                            "including [CLS]/[SEP]; right padding with [PAD]=0 to the longest row of the "
                            "batch. The padding/truncation blocks stored in tokenizer.json (fixed 128) are "
                            "NOT what sentence-transformers uses.",
            "pooling": "mean of last_hidden_state over positions with attention_mask 1 ([CLS] and [SEP] included)",
            "normalization": "L2 (Normalize module): e / max(||e||_2, 1e-12)",
            "token_type_ids": "all zero",
        },
        "encode": {"batch_size": BATCH_SIZE, "convert_to_numpy": True, "device": "cpu", "threads": THREADS,
                   "note": "encode sorts a call's inputs by character length before batching; with "
                           f"{n} < {BATCH_SIZE} sentences the fixture is a single batch"},
        "versions": versions(),
        "tensors": {name: {"dtype": str(array.dtype), "shape": list(array.shape)} for name, array in tensors.items()},
        "checks": {
            "numpy_mean_pool_max_abs_diff": pool_diff,
            "numpy_bert_float64_max_abs_diff": numpy_bert_diff,
            "batched_vs_single_max_abs_diff": single_diff,
        },
        "sentences": sentence_rows,
    }

    args.out.mkdir(parents=True, exist_ok=True)
    st_path = args.out / "reference.safetensors"
    json_path = args.out / "sentences.json"
    save_file(tensors, str(st_path), metadata={"generator": GENERATOR_NAME, "format_version": str(FORMAT_VERSION)})
    json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # Reload and re-check.
    reloaded = load_file(str(st_path))
    assert set(reloaded) == set(tensors)
    for name, array in tensors.items():
        assert reloaded[name].dtype == array.dtype and np.array_equal(reloaded[name], array), name
    assert json.loads(json_path.read_text(encoding="utf-8"))["sentences"] == sentence_rows
    assert [row["text"] for row in sentence_rows] == texts
    again = model.encode([row["text"] for row in sentence_rows], batch_size=BATCH_SIZE, convert_to_numpy=True,
                         show_progress_bar=False)
    assert np.array_equal(again, reloaded["embeddings"]), "encode is not deterministic"

    total = st_path.stat().st_size + json_path.stat().st_size
    print(f"{n} sentences, max {int(tensors['lengths'].max())} tokens, padded width {tensors['input_ids'].shape[1]}")
    print(f"wrote {st_path} ({st_path.stat().st_size} bytes, sha256 {sha256_file(st_path)})")
    print(f"wrote {json_path} ({json_path.stat().st_size} bytes); total {total} bytes")
    if total >= 200_000:
        print("warning: fixture is larger than 200 kB", file=sys.stderr)


if __name__ == "__main__":
    main()
