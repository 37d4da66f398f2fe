#!/usr/bin/env python3
"""Run the crate's criterion benches and PyTorch's timings of the same workloads, one table.

Both sides use the same thread count (`--threads`, default 2): the crate through
`RAYON_NUM_THREADS`, PyTorch through `torch.set_num_threads`. Medians everywhere. Columns:

* ``ndtransformer ms`` / ``PyTorch ms``: median wall time of the workload;
* ``speed-up``: PyTorch time / crate time (above 1 means the crate is faster);
* ``GFLOP/s``: the crate's rate, counting 2·M·N·K per matrix product (the FLOP counts come
  from the benches' own `Throughput`);
* ``% ceiling``: that rate over the machine's SGEMM ceiling, the faster of MKL (``torch.mm``)
  and the crate's own kernel on a 2048³ product at the same thread count.

Sentence embeddings (all-MiniLM-L6-v2, 256 sentences in batches of 32, ``benches/embed.rs``
against ``tools/bench_torch_embed.py``) are listed with sentences per second beside the times.

For cached generation the table adds the read bandwidth (the ``memory/read_1GiB`` bench) and
the time to stream the decoder's weights and the output projection once at that bandwidth,
which bounds a cached decoding step from below.

The output starts with the CPU it ran on (model, cores and threads, and which of AVX2,
AVX-512F, AVX-512 VNNI, AVX-512 BF16, AVX-VNNI and AMX its flags show), so that a table carries
its machine with it.

Usage::

    python3 tools/bench_compare.py [--threads 2] [--markdown] [--skip-generation] [--skip-embed]
                                   [--rounds 1] [--ctranslate2] [--only-ctranslate2]
                                   [--accuracy]

With ``--ctranslate2`` a second table follows: the crate in f32 and in int8 against
CTranslate2 in float32 and int8 (``tools/bench_ctranslate2.py``: the same architecture as a
Hugging Face ``MarianMTModel`` with random weights, converted by CTranslate2's converter), and
a line for MiniLM in int8 against sentence-transformers. ``--only-ctranslate2`` prints that
table alone. ``--accuracy`` adds the accuracy of each reduced precision on the real models, as
the tests ``tests/int8.rs`` (and ``tests/bf16.rs`` where present) print it.

With ``--rounds N`` the forward workloads run N times on each side, alternating (the crate's
benches, then PyTorch's script, and again): the table gives the medians over the rounds and a
note the speed-up of each round. This machine's speed drifts over minutes, and one round of
each side takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
CRITERION = ROOT / "target" / "criterion"

# The paper's base model (Table 3), as in the benches.
D_MODEL, D_FF, LAYERS, VOCAB = 512, 2048, 6, 32000


# /proc/cpuinfo flags worth naming beside a table: the crate's kernels depend on them.
CPU_FEATURES = [
    ("AVX2", "avx2"),
    ("AVX-512F", "avx512f"),
    ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AVX-VNNI", "avx_vnni"),
]
AMX_FLAGS = ["amx_tile", "amx_bf16", "amx_int8"]


def cpu_summary() -> list[str]:
    """Lines naming the CPU: model, cores/threads, and which of `CPU_FEATURES` and `AMX_FLAGS`
    are present (from /proc/cpuinfo; elsewhere the model from `platform.processor()` and
    "features unknown")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model, flags, threads, cores = "", set(), 0, set()
    physical = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            threads += 1
        elif key == "model name" and not model:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    model = model or platform.processor() or platform.machine() or "unknown"
    threads = threads or os.cpu_count() or 0
    count = f"{len(cores)} cores, {threads} threads" if cores else f"{threads} threads"
    if flags:
        present = [name for name, flag in CPU_FEATURES if flag in flags]
        amx = [flag for flag in AMX_FLAGS if flag in flags]
        if amx:
            present.append(f"AMX ({'/'.join(amx)})")
        features = ", ".join(present) if present else "none of AVX2, AVX-512, AVX-VNNI, AMX"
    else:
        features = "features unknown"
    return [f"CPU: {model} ({count})", f"CPU features: {features}"]


def cargo_bench(bench: str, filters: list[str], threads: int) -> None:
    """Runs one criterion bench target restricted to the benchmarks matching `filters`."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    for pattern in filters:
        cmd = ["cargo", "bench", "--quiet", "--bench", bench, "--", pattern]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def criterion_result(group: str, function: str) -> tuple[float, int | None]:
    """(median ms, throughput elements or bytes) of a finished criterion benchmark."""
    folder = CRITERION / group / function.replace("/", "_")
    estimates = json.loads((folder / "new" / "estimates.json").read_text())
    bench = json.loads((folder / "new" / "benchmark.json").read_text())
    throughput = bench.get("throughput") or {}
    amount = next(iter(throughput.values()), None)
    return estimates["median"]["point_estimate"] / 1e6, amount


def torch_json(script: str, threads: int, *extra: str) -> dict:
    """Runs one of the PyTorch timing scripts with `--json` and returns its result."""
    cmd = [sys.executable, str(TOOLS / script), "--threads", str(threads), "--json", *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=TOOLS, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def mkl_sgemm_gflops(threads: int, n: int = 2048, runs: int = 10) -> float:
    """torch.mm on an n³ single-precision product: PyTorch's (MKL's) SGEMM rate."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def decoder_step_bytes() -> int:
    """f32 bytes a cached step reads: each decoder layer's weights except the cross-attention
    key/value projections (applied once to the memory), and the output projection."""
    d, ff = D_MODEL, D_FF
    self_attn = 4 * d * d + 4 * d
    cross_attn = 2 * d * d + 2 * d
    ffn = 2 * d * ff + ff + d
    norms = 3 * 2 * d
    per_layer = self_attn + cross_attn + ffn + norms
    return 4 * (LAYERS * per_layer + VOCAB * d + VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--skip-generation", action="store_true", help="no generation workloads")
    parser.add_argument("--skip-embed", action="store_true", help="no sentence-embedding workloads")
    parser.add_argument(
        "--ctranslate2",
        action="store_true",
        help="also the int8 workloads against CTranslate2 (tools/bench_ctranslate2.py)",
    )
    parser.add_argument(
        "--only-ctranslate2",
        action="store_true",
        help="only the CTranslate2 table (implies --ctranslate2)",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="also the accuracy of the reduced precisions on the real models (tests/int8.rs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the two sides' forward workloads this many times; medians over the rounds",
    )
    args = parser.parse_args()
    t = args.threads
    # The machine first, before any bench runs, so that a table is never without it.
    for line in cpu_summary():
        print(line)
    print(flush=True)
    if args.only_ctranslate2:
        ctranslate2_table(args.threads, args.markdown)
        if args.accuracy:
            accuracy_table(args.markdown)
        return

    forward_workloads = [
        ("encoder, batch 8 × 128", "encoder_8x128", "encoder_8x128"),
        ("full forward to logits, 8 × 128 → 8 × 128", "forward_logits_8x128", "full_forward_8x128_vocab32000"),
        ("  the same into a kept logits buffer", "forward_logits_into_8x128", "full_forward_into_8x128_vocab32000"),
        ("encoder latency, 1 × 32", "encoder_1x32", "encoder_latency_1x32"),
    ]
    # Rounds alternate the two sides, so that a slow spell of the machine falls on both.
    ours_rounds: list[dict[str, tuple[float, int]]] = []
    torch_rounds: list[dict] = []
    for round_index in range(args.rounds):
        cargo_bench("forward", ["model/"] + (["ops/sgemm"] if round_index == 0 else []), t)
        ours_rounds.append({ours_id: criterion_result("model", ours_id) for _, ours_id, _ in forward_workloads})
        torch_rounds.append(torch_json("bench_torch_forward.py", t))
    ours_sgemm, flops = criterion_result("ops", "sgemm_2048")
    ceiling = max(mkl_sgemm_gflops(t), flops / (ours_sgemm * 1e6))

    rows = []
    notes = [f"SGEMM ceiling at {t} thread(s): {ceiling:.0f} GFLOP/s"]
    for label, ours_id, torch_key in forward_workloads:
        ms = statistics.median(r[ours_id][0] for r in ours_rounds)
        work = ours_rounds[0][ours_id][1]
        theirs = statistics.median(r[torch_key] for r in torch_rounds)
        gflops = work / (ms * 1e6)
        rows.append((label, ms, theirs, gflops, 100 * gflops / ceiling))
        if args.rounds > 1:
            ratios = ", ".join(
                f"{tr[torch_key] / our[ours_id][0]:.2f}×" for our, tr in zip(ours_rounds, torch_rounds)
            )
            notes.append(f"{label.strip()}: speed-up by round {ratios}")
    if not args.skip_generation:
        cargo_bench("generation", ["generation_step/cached", "greedy_generation", "memory/"], t)
        torch_gen = torch_json("bench_torch_generate.py", t)
        ms, _ = criterion_result("greedy_generation", "cached_64_tokens_with_encoder")
        rows.append(("greedy generation, 8 × 128 → 64 tokens", ms, torch_gen["total_ms"], None, None))
        for step in ("1", "32", "64"):
            ms, _ = criterion_result("generation_step", f"cached/step_{step}")
            rows.append((f"  decoding step {step} (batch 8)", ms, torch_gen["step_ms"][step], None, None))
        read_ms, read_bytes = criterion_result("memory", "read_1GiB")
        bandwidth = read_bytes / (read_ms * 1e6)
        stream_ms = decoder_step_bytes() / (bandwidth * 1e6)
        notes.append(
            f"read bandwidth {bandwidth:.1f} GB/s; streaming the decoder's weights and the output "
            f"projection once ({decoder_step_bytes() / 1e6:.0f} MB) takes {stream_ms:.2f} ms"
        )

    if not args.skip_embed:
        cargo_bench("embed", ["embed/"], t)
        cmd = [sys.executable, str(TOOLS / "bench_torch_embed.py"), "--threads", str(t)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        out = subprocess.run(cmd, cwd=TOOLS, check=True, capture_output=True, text=True).stdout
        torch_embed = json.loads(out[out.index("{"):])
        n = torch_embed["num_sentences"]
        for label, ours_id, torch_key in [
            ("MiniLM-L6 embeddings, tokenise + encode", f"encode_{n}", "encode"),
            ("MiniLM-L6 embeddings, encode only", f"forward_{n}", "forward_only"),
        ]:
            ms, _ = criterion_result("embed", ours_id)
            theirs = torch_embed["workloads"][torch_key]["median_ms_total"]
            rows.append((f"{label}, {n} sentences", ms, theirs, None, None))
            notes.append(
                f"{label}: {n / (ms / 1e3):.0f} sentences/s vs PyTorch {n / (theirs / 1e3):.0f} "
                f"(batches of {torch_embed['batch']})"
            )

    header = ["workload", "ndtransformer ms", "PyTorch ms", "speed-up", "GFLOP/s", "% ceiling"]
    lines = []
    for label, ours, theirs, gflops, pct in rows:
        cells = [label, f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}×"]
        cells += [f"{gflops:.0f}" if gflops else "–", f"{pct:.0f}%" if pct else "–"]
        lines.append(cells)
    print_table(header, lines, args.markdown)
    for note in notes:
        print(note)
    if args.ctranslate2:
        ctranslate2_table(args.threads, args.markdown)
    if args.accuracy:
        accuracy_table(args.markdown)


def accuracy_table(markdown: bool) -> None:
    """The figures the accuracy tests print (dates model exact matches, MiniLM's lowest
    cosine with f32, weight bytes), for each reduced precision they cover."""
    tests = [t for t in ("int8", "bf16") if (ROOT / "tests" / f"{t}.rs").exists()]
    header = ["precision", "dates model, 5000 held-out", "MiniLM lowest cosine vs f32",
              "MiniLM weights MB (f32)"]
    lines = []
    for test in tests:
        cmd = ["cargo", "test", "--release", "--test", test, "--", "--nocapture", "--test-threads", "1"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        dates = re.search(r"dates model, \w+: (\d+)/(\d+)", out)
        minilm = re.search(r"all-MiniLM-L6-v2 \w+: lowest cosine with f32 over \d+ sentences "
                           r"([0-9.]+); weights (\d+) of (\d+) bytes", out)
        lines.append([
            test,
            f"{dates[1]}/{dates[2]}" if dates else "–",
            minilm[1] if minilm else "–",
            f"{int(minilm[2]) / 1e6:.1f} ({int(minilm[3]) / 1e6:.1f})" if minilm else "–",
        ])
    print()
    print_table(header, lines, markdown)


def ctranslate2_table(threads: int, markdown: bool) -> None:
    """The crate in f32 and int8 against CTranslate2 in float32 and int8
    (`tools/bench_ctranslate2.py`), on the workloads both run."""
    cargo_bench("forward", ["model/encoder_", "model_int8/"], threads)
    cargo_bench("generation", ["greedy_generation/", "generation_int8/"], threads)
    cargo_bench("embed", ["embed/encode", "embed_int8/"], threads)
    ct2 = torch_json("bench_ctranslate2.py", threads)
    workloads = [
        ("encoder, batch 8 × 128 (CTranslate2: + one step)", ("model", "encoder_8x128"),
         ("model_int8", "encoder_8x128"), "encoder"),
        ("encoder latency, 1 × 32 (CTranslate2: + one step)", ("model", "encoder_1x32"),
         ("model_int8", "encoder_1x32"), "encoder_1x32"),
        ("greedy, 8 × 128 → 64 tokens", ("greedy_generation", "cached_64_tokens_with_encoder"),
         ("generation_int8", "cached_64_tokens_with_encoder"), "greedy"),
        ("beam 4, 8 × 128 → 64 tokens", ("greedy_generation", "beam_4_64_tokens_with_encoder"),
         ("generation_int8", "beam_4_64_tokens_with_encoder"), "beam4"),
    ]
    header = ["workload", "ours f32 ms", "ours int8 ms", "CT2 f32 ms", "CT2 int8 ms",
              "int8 vs CT2 int8"]
    lines = []
    for label, f32_bench, int8_bench, key in workloads:
        ours_f32 = criterion_result(*f32_bench)[0]
        ours_int8 = criterion_result(*int8_bench)[0]
        theirs_f32, theirs_int8 = ct2["float32"][key], ct2["int8"][key]
        lines.append([label, f"{ours_f32:.1f}", f"{ours_int8:.1f}", f"{theirs_f32:.1f}",
                      f"{theirs_int8:.1f}", f"{theirs_int8 / ours_int8:.2f}×"])
    print()
    print_table(header, lines, markdown)
    # MiniLM has no CTranslate2 counterpart here: its int8 row is against sentence-transformers.
    cmd = [sys.executable, str(TOOLS / "bench_torch_embed.py"), "--threads", str(threads)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=TOOLS, check=True, capture_output=True, text=True).stdout
    torch_embed = json.loads(out[out.index("{"):])
    n = torch_embed["num_sentences"]
    theirs = torch_embed["workloads"]["encode"]["median_ms_total"]
    ours_f32 = criterion_result("embed", f"encode_{n}")[0]
    ours_int8 = criterion_result("embed_int8", f"encode_{n}")[0]
    print(
        f"MiniLM-L6, tokenise + encode {n} sentences: ours f32 {ours_f32:.0f} ms, int8 "
        f"{ours_int8:.0f} ms; sentence-transformers (PyTorch f32) {theirs:.0f} ms: int8 "
        f"{theirs / ours_int8:.2f}× PyTorch"
    )


def print_table(header: list[str], lines: list[list[str]], markdown: bool) -> None:
    """Rows of cells under `header`, as Markdown or as aligned text."""
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        for cells in [header, *lines]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))


if __name__ == "__main__":
    main()
