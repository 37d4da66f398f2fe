#!/usr/bin/env python3
"""Time CTranslate2 on the paper's base model, on the workloads of the crate's benches.

Model: a Hugging Face ``MarianMTModel`` of the base size (d_model 512, 8 heads, 6 + 6 layers,
d_ff 2048, ReLU, a shared vocabulary of 32000 ids, the last one Marian's ``<pad>``) with random
weights after ``torch.manual_seed(0)``, saved with a word-level tokenizer over the ids and
converted with CTranslate2's own converter
(``ctranslate2.converters.TransformersConverter``, ``quantization=`` float32 or int8). The
converted models are kept in ``target/ctranslate2/``.

Workloads, a batch of ``--batch`` (8) rows of ``--src-len`` (128) random source ids, no padding,
``ctranslate2.Translator(..., intra_threads=--threads, inter_threads=1)``:

* ``encoder``: ``translate_batch(max_decoding_length=1)``: the encoder and one decoding step
  (CTranslate2's Python API has no encoder-only call for a translator);
* ``encoder_1x32``: the same for one row of 32 ids;
* ``greedy``: ``beam_size=1``, exactly ``--steps`` (64) generated tokens
  (``min_decoding_length = max_decoding_length = steps``);
* ``beam4``: the same with ``beam_size=4``.

Timing: ``--warmup`` untimed runs, then the median wall time (``time.perf_counter``) of
``--runs`` runs, in ms. ``--json`` prints ``{"float32": {...}, "int8": {...}}`` for
``bench_compare.py``.

Usage::

    python3 tools/bench_ctranslate2.py [--threads 2] [--quantization float32 int8] [--runs 5]
                                       [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "ctranslate2"
VOCAB = 32000


def build_marian(directory: Path) -> None:
    """The random base-size MarianMTModel and its tokenizer, saved to ``directory``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=VOCAB,
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        activation_function="relu",
        max_position_embeddings=512,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        eos_token_id=0,
        pad_token_id=VOCAB - 1,
        decoder_start_token_id=VOCAB - 1,
    )
    model = MarianMTModel(config).eval()
    model.save_pretrained(directory)
    vocab = {"</s>": 0, "<unk>": 1}
    vocab.update({f"t{i}": i for i in range(2, VOCAB - 1)})
    vocab["<pad>"] = VOCAB - 1
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)


def converted(quantization: str) -> Path:
    """The CTranslate2 model for ``quantization``, converted on first use."""
    import ctranslate2

    hf = OUT / "marian-base-random"
    if not (hf / "config.json").is_file():
        build_marian(hf)
    target = OUT / f"marian-base-{quantization}"
    if not (target / "model.bin").is_file():
        converter = ctranslate2.converters.TransformersConverter(str(hf))
        converter.convert(str(target), quantization=quantization, force=True)
    return target


def median_ms(run, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(quantization: str, args: argparse.Namespace) -> dict[str, float]:
    import ctranslate2
    import random

    translator = ctranslate2.Translator(
        str(converted(quantization)),
        device="cpu",
        intra_threads=args.threads,
        inter_threads=1,
    )
    rng = random.Random(1)
    source = [[f"t{rng.randrange(3, VOCAB - 1)}" for _ in range(args.src_len)] for _ in range(args.batch)]

    def translate(beam: int, steps: int):
        def run():
            results = translator.translate_batch(
                source,
                beam_size=beam,
                max_decoding_length=steps,
                min_decoding_length=steps,
                max_batch_size=args.batch,
            )
            assert all(len(r.hypotheses[0]) == steps for r in results), "every row makes `steps` tokens"

        return run

    short = [source[0][:32]]

    def encode_short():
        translator.translate_batch(short, beam_size=1, max_decoding_length=1, min_decoding_length=1)

    return {
        "encoder": median_ms(translate(1, 1), args.runs, args.warmup),
        "encoder_1x32": median_ms(encode_short, 5 * args.runs, args.warmup),
        "greedy": median_ms(translate(1, args.steps), args.runs, args.warmup),
        "beam4": median_ms(translate(4, args.steps), max(1, args.runs // 2), args.warmup),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", nargs="+", default=["float32", "int8"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import ctranslate2

    figures = {q: bench(q, args) for q in args.quantization}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"CTranslate2 {ctranslate2.__version__}, {args.threads} threads, batch {args.batch} × {args.src_len}")
    for q, f in figures.items():
        print(f"{q:8}  encoder + 1 step {f['encoder']:8.1f} ms   greedy {args.steps} {f['greedy']:8.1f} ms"
              f"   beam 4 {f['beam4']:8.1f} ms")


if __name__ == "__main__":
    main()
