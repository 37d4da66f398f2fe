#!/usr/bin/env python3
"""Time greedy generation with PyTorch's CPU `nn.Transformer` at the paper's base size.

The figures are the PyTorch baseline for the crate's own generation benchmarks. Generation is
written the way `nn.Transformer` users write it: there is no KV cache, so every step re-runs the
whole decoder stack on the whole prefix generated so far.

Model: the same as ``bench_torch_forward.py``: ``nn.Transformer(d_model=512, nhead=8,
num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048, dropout=0.0,
batch_first=True)``, ``nn.Embedding(32000, 512)`` source and target embeddings scaled by
sqrt(512) plus the interleaved sinusoidal positional encoding (PE[p, 2i] = sin(p / 10000^(2i/D)),
PE[p, 2i+1] = cos(same)), and a generator ``nn.Linear(512, 32000)``; PyTorch's default init
after ``torch.manual_seed(0)``. It runs in eval mode under ``torch.inference_mode()`` with
``torch.set_num_threads(--threads)``.

Workload: a batch of ``--batch`` (8) sequences of ``--src-len`` (128) random source ids, no
padding. The encoder runs once and its memory is reused. Starting from ``ys`` = BOS (id 1),
each of the ``--steps`` (64) steps runs
``transformer.decoder(embed(ys), memory, tgt_mask=causal mask of len(ys), tgt_is_causal=True)``,
then the generator on the last position only, then argmax, and appends the argmax to ``ys``.
There is no EOS: every run does exactly ``--steps`` steps. Step ``k`` (1-based) decodes a prefix
of ``k`` tokens.

Timing: one untimed warm-up generation per ``--warmup``, then ``--runs`` timed generations.
Within each run, wall clock (``time.perf_counter``) is read before the encoder, after the
encoder and after every step, giving the run's encoder time, the time of each single step, and
the total (encoder + all steps). Reported are the medians over the runs of the total, of the
encoder time, and of the time of steps 1, steps/2 and steps (1, 32 and 64 by default), in ms per
step for the whole batch, and in ms per token (ms per step / batch). The table also gives the
median over the runs of the mean step time, and the total per generated token
(total / (batch * steps)); the JSON output has only the encoder, total and per-step medians.

Usage::

    python tools/bench_torch_generate.py [--threads 2] [--steps 64] [--batch 8] [--src-len 128]
                                         [--runs 3] [--warmup 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from bench_torch_forward import PAPER_BASE, SEED
from make_fixtures import BOS_ID, Seq2Seq, positional_encoding


@dataclass
class RunTimes:
    """Wall times of one timed generation, in milliseconds."""

    encoder_ms: float
    step_ms: list[float]  # step_ms[k - 1] is step k
    total_ms: float


def generate(model: Seq2Seq, src_ids: torch.Tensor, steps: int, pe: torch.Tensor) -> tuple[torch.Tensor, RunTimes]:
    """Greedy generation without KV cache; return the ids [B, 1 + steps] and the run's times."""
    start = time.perf_counter()
    memory = model.transformer.encoder(model.embed(model.src_embed, src_ids, pe))
    encoder_end = time.perf_counter()

    ys = torch.full((src_ids.shape[0], 1), BOS_ID, dtype=torch.int64)
    step_ms = []
    step_start = encoder_end
    for _ in range(steps):
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(ys.shape[1])
        out = model.transformer.decoder(
            model.embed(model.tgt_embed, ys, pe), memory, tgt_mask=tgt_mask, tgt_is_causal=True
        )
        next_ids = model.generator(out[:, -1]).argmax(dim=-1, keepdim=True)
        ys = torch.cat([ys, next_ids], dim=1)
        step_end = time.perf_counter()
        step_ms.append((step_end - step_start) * 1e3)
        step_start = step_end
    return ys, RunTimes((encoder_end - start) * 1e3, step_ms, (step_start - start) * 1e3)


def reported_steps(steps: int) -> list[int]:
    """The 1-based steps whose time is reported: 1, steps/2 and steps (1, 32, 64 for 64 steps)."""
    return sorted({1, max(1, steps // 2), steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--steps", type=int, default=64, help="generated tokens per sequence (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="sequences in the batch (default 8)")
    parser.add_argument("--src-len", type=int, default=128, help="source tokens per sequence (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="timed generations (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args()
    if min(args.threads, args.steps, args.batch, args.src_len, args.runs) < 1 or args.warmup < 0:
        parser.error("--threads, --steps, --batch, --src-len and --runs must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = Seq2Seq(PAPER_BASE).eval()
    src_ids = torch.randint(0, PAPER_BASE.src_vocab, (args.batch, args.src_len))
    pe = positional_encoding(max(args.src_len, args.steps), PAPER_BASE.d_model)

    with torch.inference_mode():
        for _ in range(args.warmup):
            generate(model, src_ids, args.steps, pe)
        runs = [generate(model, src_ids, args.steps, pe)[1] for _ in range(args.runs)]

    encoder_ms = statistics.median(run.encoder_ms for run in runs)
    total_ms = statistics.median(run.total_ms for run in runs)
    step_ms = {k: statistics.median(run.step_ms[k - 1] for run in runs) for k in reported_steps(args.steps)}
    mean_step_ms = statistics.median(sum(run.step_ms) / args.steps for run in runs)

    if args.json:
        figures = {
            "threads": args.threads,
            "encoder_ms": round(encoder_ms, 3),
            "total_ms": round(total_ms, 3),
            "step_ms": {str(k): round(ms, 3) for k, ms in step_ms.items()},
            "torch_version": torch.__version__,
        }
        print(json.dumps(figures, indent=2))
        return
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch} x {args.src_len} source tokens, "
        f"{args.steps} greedy steps, median of {args.runs} runs after {args.warmup} warm-up"
    )
    print(f"{'':26s} {'ms':>10s} {'ms/token':>10s}")
    print(f"{'encoder (once)':26s} {encoder_ms:10.2f} {'':>10s}")
    for k, ms in step_ms.items():
        print(f"{f'step {k} (prefix {k})':26s} {ms:10.2f} {ms / args.batch:10.2f}")
    print(f"{'mean step':26s} {mean_step_ms:10.2f} {mean_step_ms / args.batch:10.2f}")
    print(f"{'total (encoder + steps)':26s} {total_ms:10.2f} {total_ms / (args.batch * args.steps):10.2f}")


if __name__ == "__main__":
    main()
