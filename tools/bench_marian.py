#!/usr/bin/env python3
"""Tokens per second of a Marian (OPUS-MT) checkpoint: transformers, CTranslate2 and the crate.

Model: the checkpoint directory ``--model`` (default ``target/models/opus-mt-en-de-random``, the
random checkpoint of opus-mt-en-de's size that ``tools/make_marian_fixture.py --full`` writes:
d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, swish, vocabulary 58101). CTranslate2 runs it
after its own converter (``ctranslate2.converters.TransformersConverter``, float32 and int8),
kept in ``target/ctranslate2/``.

Workload: ``--sentences`` sentences (the built-in English list, cycled), tokenised by the
checkpoint's ``MarianTokenizer`` into one batch, then greedy decoding and beam search
(``--beam``, 4) producing exactly ``--tokens`` (32) target tokens per sentence in every
engine (a random model would otherwise stop at different places in each):

* transformers: ``generate(min_new_tokens=N, max_new_tokens=N, forced_eos_token_id=None)``,
  ``torch.set_num_threads(--threads)``;
* CTranslate2: ``translate_batch(min_decoding_length=N, max_decoding_length=N)``,
  ``intra_threads=--threads``;
* the crate: ``cargo run --release --example opus_mt -- --exact N`` on the same sentences with
  ``RAYON_NUM_THREADS=--threads`` (its own timing of the decoding, printed as tokens/s).

Timing: ``--warmup`` untimed runs, then the median of ``--runs`` in wall time; tokens/s is
sentences × N / median seconds. The CPU model is printed with the table.

Usage::

    python3 tools/make_marian_fixture.py --full
    python3 tools/bench_marian.py [--threads 2] [--sentences 32] [--tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

from bench_ctranslate2 import median_ms

ROOT = Path(__file__).resolve().parent.parent

SENTENCES = [
    "The house is small and the garden is large.",
    "Attention is all you need.",
    "We translate sentences on the CPU, in Rust.",
    "How long does the train to Berlin take?",
    "My brother repairs the old clock near the station every Sunday morning.",
    "Please send me the report before the meeting tomorrow.",
    "The weather was cold, but the children played outside all afternoon.",
    "Where is the nearest pharmacy?",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"]
                return " ".join(f for f in wanted if f in flags)
    except OSError:
        pass
    return ""


def median_seconds(run, runs: int, warmup: int) -> float:
    """The median wall time of ``runs`` calls of ``run`` after ``warmup`` untimed ones, in s."""
    return median_ms(run, runs, warmup) / 1e3


def bench_transformers(model_dir: Path, sentences: list[str], args) -> dict[str, float]:
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    torch.set_num_threads(args.threads)
    tok = MarianTokenizer.from_pretrained(str(model_dir))
    model = MarianMTModel.from_pretrained(str(model_dir)).eval()
    batch = tok(sentences, return_tensors="pt", padding=True)
    out = {}
    for name, beams in [("greedy", 1), (f"beam{args.beam}", args.beam)]:
        def run():
            with torch.no_grad():
                ids = model.generate(**batch, num_beams=beams, do_sample=False, min_new_tokens=args.tokens,
                                     max_new_tokens=args.tokens, forced_eos_token_id=None)
            assert ids.shape[1] == args.tokens + 1, ids.shape
        out[name] = median_seconds(run, args.runs, args.warmup)
    return out


def bench_ctranslate2(model_dir: Path, sentences: list[str], quantization: str, args) -> dict[str, float]:
    import ctranslate2
    from transformers import MarianTokenizer

    target = ROOT / "target" / "ctranslate2" / f"{model_dir.name}-{quantization}"
    if not (target / "model.bin").is_file():
        converter = ctranslate2.converters.TransformersConverter(str(model_dir))
        converter.convert(str(target), quantization=quantization, force=True)
    translator = ctranslate2.Translator(str(target), device="cpu", intra_threads=args.threads, inter_threads=1)
    tok = MarianTokenizer.from_pretrained(str(model_dir))
    source = [tok.convert_ids_to_tokens(tok.encode(s)) for s in sentences]
    out = {}
    for name, beams in [("greedy", 1), (f"beam{args.beam}", args.beam)]:
        def run():
            results = translator.translate_batch(source, beam_size=beams, min_decoding_length=args.tokens,
                                                 max_decoding_length=args.tokens, max_batch_size=len(source))
            assert all(len(r.hypotheses[0]) == args.tokens for r in results)
        out[name] = median_seconds(run, args.runs, args.warmup)
    return out


def bench_crate(model_dir: Path, sentences: list[str], precision: str | None, args) -> dict[str, float]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = {}
    for name, beams in [("greedy", 1), (f"beam{args.beam}", args.beam)]:
        cmd = ["cargo", "run", "--release", "--quiet", "--example", "opus_mt", "--", "--model", str(model_dir),
               "--beam", str(beams), "--exact", str(args.tokens), "--runs", str(args.runs),
               "--warmup", str(args.warmup), "--quiet"]
        if precision:
            cmd.append(f"--{precision}")
        text = subprocess.run(cmd + sentences, cwd=ROOT, env=env, check=True, capture_output=True,
                              text=True).stdout
        seconds = re.search(r"median ([0-9.]+) ms", text)
        if not seconds:
            raise SystemExit(f"no median in the example's output:\n{text}")
        out[name] = float(seconds.group(1)) / 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "target" / "models" / "opus-mt-en-de-random")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="engines to skip: transformers ctranslate2 crate")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} holds no checkpoint; run python3 tools/make_marian_fixture.py --full")
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(args.sentences)]

    rows: list[tuple[str, dict[str, float]]] = []
    if "crate" not in args.skip:
        rows.append(("ndtransformer f32", bench_crate(args.model, sentences, None, args)))
        rows.append(("ndtransformer int8", bench_crate(args.model, sentences, "int8", args)))
    if "ctranslate2" not in args.skip:
        import ctranslate2

        for q in ["float32", "int8"]:
            rows.append((f"CTranslate2 {ctranslate2.__version__} {q}", bench_ctranslate2(args.model, sentences, q, args)))
    if "transformers" not in args.skip:
        import torch
        import transformers

        rows.append((f"transformers {transformers.__version__} (torch {torch.__version__.split('+')[0]})",
                     bench_transformers(args.model, sentences, args)))

    generated = args.sentences * args.tokens
    print(f"CPU: {cpu_model()} ({cpu_flags()}), {args.threads} threads")
    print(f"{args.model.name}: {args.sentences} sentences, exactly {args.tokens} tokens each "
          f"({generated} tokens), medians of {args.runs}")
    beam = f"beam{args.beam}"
    print(f"| engine | greedy tokens/s | beam {args.beam} tokens/s |")
    print("|---|---:|---:|")
    for name, f in rows:
        print(f"| {name} | {generated / f['greedy']:.0f} | {generated / f[beam]:.0f} |")


if __name__ == "__main__":
    main()
