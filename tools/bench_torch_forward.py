#!/usr/bin/env python3
"""Time PyTorch's CPU `nn.Transformer` forward pass at the paper's base size.

The figures are the PyTorch baseline for the crate's own forward benchmarks: the model is
d_model 512, 8 heads, d_ff 2048, 6 encoder + 6 decoder layers, dropout 0, batch_first, in eval
mode under `torch.inference_mode()` (so PyTorch may use its fused inference fast path), with
`torch.set_num_threads(--threads)`.

Workloads:

* ``encoder_8x128``: the encoder stack (with its final norm) on a batch of 8 x 128 tokens;
* ``full_forward_8x128_vocab32000``: token ids to logits (embedding * sqrt(d) + sinusoidal PE,
  encoder, decoder with causal mask, generator to a 32000-token vocabulary), source and target
  both 8 x 128 tokens;
* ``full_forward_into_8x128_vocab32000``: the same, the logits written into a tensor kept from
  call to call (``torch.addmm(..., out=)``);
* ``encoder_latency_1x32``: the encoder stack on a single sequence of 32 tokens.

Each workload is run ``--warmup`` times untimed, then ``--runs`` times; the median wall time in
milliseconds is reported (and the minimum in the table).

Usage::

    python tools/bench_torch_forward.py [--threads 2] [--runs 10] [--warmup 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from make_fixtures import Seq2Seq, TransformerSpec, positional_encoding

PAPER_BASE = TransformerSpec(
    name="paper_base",
    seed_offset=0,
    d_model=512,
    nhead=8,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dim_feedforward=2048,
    activation="relu",
    layer_norm_eps=1e-5,
    norm_first=False,
    src_vocab=32000,
    tgt_vocab=32000,
    batch=8,
    src_len=128,
    tgt_len=128,
)
SEED = 0


def time_ms(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
    """Wall times of `runs` calls of `fn` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def workloads(model: Seq2Seq) -> dict[str, Callable[[], object]]:
    """The benchmarked closures, by workload name, with their inputs drawn once."""
    d_model = PAPER_BASE.d_model
    gen = torch.Generator().manual_seed(SEED)
    encoder = model.transformer.encoder
    enc_batch = torch.randn(8, 128, d_model, generator=gen)
    enc_single = torch.randn(1, 32, d_model, generator=gen)
    src_ids = torch.randint(0, PAPER_BASE.src_vocab, (8, 128), generator=gen)
    tgt_ids = torch.randint(0, PAPER_BASE.tgt_vocab, (8, 128), generator=gen)
    pe = positional_encoding(128, d_model)
    logits_out = torch.empty(8, 128, PAPER_BASE.tgt_vocab)
    return {
        "encoder_8x128": lambda: encoder(enc_batch),
        "full_forward_8x128_vocab32000": lambda: model(src_ids, tgt_ids, None, None, pe)["logits"],
        "full_forward_into_8x128_vocab32000": lambda: model(src_ids, tgt_ids, None, None, pe, logits_out)["logits"],
        "encoder_latency_1x32": lambda: encoder(enc_single),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per workload (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs per workload (default 3)")
    parser.add_argument("--json", action="store_true", help="print {workload: median ms} as JSON instead of a table")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = Seq2Seq(PAPER_BASE).eval()
    results = {}
    with torch.inference_mode():
        for name, fn in workloads(model).items():
            times = time_ms(fn, args.warmup, args.runs)
            results[name] = (statistics.median(times), min(times))

    if args.json:
        print(json.dumps({name: round(median, 3) for name, (median, _) in results.items()}, indent=2))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.runs} runs after {args.warmup} warm-up")
    print(f"{'workload':32s} {'median ms':>10s} {'min ms':>10s}")
    for name, (median, fastest) in results.items():
        print(f"{name:32s} {median:10.2f} {fastest:10.2f}")


if __name__ == "__main__":
    main()
