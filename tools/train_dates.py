#!/usr/bin/env python3
"""Train the small date-normalisation Transformer shipped in ``assets/dates/``.

The task (specified exactly in ``tools/dates_task.md``): translate a human-written date such as
``27 November 2026``, ``Nov 3, 1999`` or ``Friday, 27 November 2026`` into ISO ``YYYY-MM-DD``,
character by character. The model is ``Seq2Seq`` below: two embeddings, PyTorch's
``nn.Transformer`` (post-LN, ReLU, batch_first) and a linear generator, with state-dict names
that the ``ndtransformer`` crate loads.

Dates whose ``(y * 372 + m * 31 + d) % 10 == 3`` are held out: training never sees them in any
format, and accuracy is measured on them.

Writes into ``--out`` (default ``assets/dates``):

* ``model.safetensors``   float32 state dict, PyTorch names
* ``config.json``         model config, special ids, seed, training summary
* ``vocab.json``          the character vocabulary, a JSON list in id order
* ``reference.safetensors`` parity inputs/outputs (float64 slow-path logits, greedy decode)

Usage::

    pip install -r tools/requirements.txt
    python tools/train_dates.py --out assets/dates [--seed 1234]

Everything random derives from ``--seed``: ``torch.manual_seed(seed)`` for the initialisation
and dropout, ``numpy.random.default_rng(seed)`` for the training batches and
``numpy.random.default_rng(seed + 1)`` for the held-out evaluation sample. Training runs on
the CPU with ``torch.set_num_threads(2)`` and deterministic algorithms.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

# Worker threads that spin while idle make PyTorch many times slower when anything else
# shares the cores; this must be set before torch starts its OpenMP pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# --------------------------------------------------------------------------------------------
# The task: names, formats, held-out rule, vocabulary. Mirrored by tools/dates_task.md.
# --------------------------------------------------------------------------------------------

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
MONTHS_ABBR = tuple(name[:3] for name in MONTHS)  # Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

YEAR_MIN, YEAR_MAX = 1900, 2099

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def is_leap(y: int) -> bool:
    """Gregorian leap year."""
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def days_in_month(y: int, m: int) -> int:
    """Days in month ``m`` (1..12) of year ``y``."""
    if m == 2:
        return 29 if is_leap(y) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def weekday(y: int, m: int, d: int) -> int:
    """Day of the week, 0 = Monday .. 6 = Sunday (Sakamoto's method, proleptic Gregorian)."""
    t = (0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4)
    yy = y - 1 if m < 3 else y
    sunday_based = (yy + yy // 4 - yy // 100 + yy // 400 + t[m - 1] + d) % 7  # 0 = Sunday
    return (sunday_based + 6) % 7


def ordinal_suffix(d: int) -> str:
    """English ordinal suffix of a day of the month: 1st 2nd 3rd 4th .. 11th 12th 13th .. 21st 22nd 23rd .. 31st."""
    if d in (1, 21, 31):
        return "st"
    if d in (2, 22):
        return "nd"
    if d in (3, 23):
        return "rd"
    return "th"


def fmt(format_id: int, y: int, m: int, d: int) -> str:
    """The source string of date (y, m, d) in format ``format_id`` (0..NUM_FORMATS-1)."""
    month, abbr = MONTHS[m - 1], MONTHS_ABBR[m - 1]
    if format_id == 0:
        return f"{d} {month} {y}"                              # 27 November 2026
    if format_id == 1:
        return f"{d} {abbr} {y}"                               # 27 Nov 2026
    if format_id == 2:
        return f"{month} {d}, {y}"                             # November 27, 2026
    if format_id == 3:
        return f"{abbr} {d}, {y}"                              # Nov 27, 2026
    if format_id == 4:
        return f"{WEEKDAYS[weekday(y, m, d)]}, {d} {month} {y}"  # Friday, 27 November 2026
    if format_id == 5:
        return f"{d:02d}.{m:02d}.{y}"                          # 27.11.2026
    if format_id == 6:
        return f"{y}/{m:02d}/{d:02d}"                          # 2026/11/27
    if format_id == 7:
        return f"{d}{ordinal_suffix(d)} of {month}, {y}"       # 27th of November, 2026
    if format_id == 8:
        return f"{month.lower()} {d} {y}"                      # november 27 2026
    if format_id == 9:
        return f"{d:02d} {abbr.upper()} {y}"                   # 27 NOV 2026
    raise ValueError(f"unknown format {format_id}")


FORMAT_NAMES = (
    "D Month YYYY",
    "D Mon YYYY",
    "Month D, YYYY",
    "Mon D, YYYY",
    "Weekday, D Month YYYY",
    "DD.MM.YYYY",
    "YYYY/MM/DD",
    "Dth of Month, YYYY",
    "month D YYYY",
    "DD MON YYYY",
)
NUM_FORMATS = len(FORMAT_NAMES)


def iso(y: int, m: int, d: int) -> str:
    """The target string ``YYYY-MM-DD``."""
    return f"{y:04d}-{m:02d}-{d:02d}"


def is_held_out(y: int, m: int, d: int) -> bool:
    """The held-out rule: never trained on, in any format."""
    return (y * 372 + m * 31 + d) % 10 == 3


def all_dates() -> list[tuple[int, int, int]]:
    """Every valid date from 1900-01-01 to 2099-12-31, in calendar order."""
    return [
        (y, m, d)
        for y in range(YEAR_MIN, YEAR_MAX + 1)
        for m in range(1, 13)
        for d in range(1, days_in_month(y, m) + 1)
    ]


def build_vocab(dates: list[tuple[int, int, int]]) -> list[str]:
    """``<pad> <bos> <eos>`` then every character of every source and target string, sorted by code point."""
    chars: set[str] = set()
    for y, m, d in dates:
        chars.update(iso(y, m, d))
        for f in range(NUM_FORMATS):
            chars.update(fmt(f, y, m, d))
    return [PAD, BOS, EOS] + sorted(chars)


def check_calendar(dates: list[tuple[int, int, int]]) -> None:
    """Cross-check the hand-written calendar against Python's ``datetime``."""
    expected = (datetime.date(YEAR_MAX, 12, 31) - datetime.date(YEAR_MIN, 1, 1)).days + 1
    assert len(dates) == expected, (len(dates), expected)
    for y, m, d in dates:
        assert weekday(y, m, d) == datetime.date(y, m, d).weekday(), (y, m, d)
    assert fmt(4, 2026, 11, 27) == "Friday, 27 November 2026"


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


def positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """Interleaved sinusoidal table ``[length, d_model]``: PE[p, 2i] = sin(p / 10000^(2i/D)),
    PE[p, 2i+1] = cos(same); computed in float64, rounded to float32."""
    pe = np.zeros((length, d_model), dtype=np.float64)
    for p in range(length):
        for j in range(d_model):
            two_i = j - j % 2
            angle = p / 10000.0 ** (two_i / d_model)
            pe[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return torch.from_numpy(pe.astype(np.float32))


class Seq2Seq(nn.Module):
    """Embeddings + ``nn.Transformer`` + generator; ``state_dict()`` names are what the crate loads."""

    def __init__(self, cfg: dict, dropout: float):
        super().__init__()
        self.src_embed = nn.Embedding(cfg["src_vocab"], cfg["d_model"])
        self.tgt_embed = nn.Embedding(cfg["tgt_vocab"], cfg["d_model"])
        self.transformer = nn.Transformer(
            d_model=cfg["d_model"],
            nhead=cfg["nhead"],
            num_encoder_layers=cfg["num_encoder_layers"],
            num_decoder_layers=cfg["num_decoder_layers"],
            dim_feedforward=cfg["dim_feedforward"],
            dropout=dropout,
            activation=cfg["activation"],
            layer_norm_eps=cfg["layer_norm_eps"],
            batch_first=True,
            norm_first=cfg["norm_first"],
        )
        # Never take the nested-tensor path (pad rows of `memory` would become 0 there).
        self.transformer.encoder.use_nested_tensor = False
        self.transformer.encoder.enable_nested_tensor = False
        self.generator = nn.Linear(cfg["d_model"], cfg["tgt_vocab"])
        self.register_buffer("pe", positional_encoding(cfg["max_len"], cfg["d_model"]), persistent=False)
        self.scale = math.sqrt(cfg["d_model"])

    def embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """``table[ids] * sqrt(D) + PE[:len]`` in the table's dtype."""
        w = table.weight
        return w[ids] * self.scale + self.pe[: ids.shape[1]].to(w.dtype)

    def encode(self, src_ids: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        return self.transformer.encoder(self.embed(self.src_embed, src_ids), src_key_padding_mask=src_pad)

    def decode(
        self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor, tgt_pad: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` for decoder input ``tgt_ids`` (BOS first)."""
        t = tgt_ids.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_ids.device), diagonal=1)
        out = self.transformer.decoder(
            self.embed(self.tgt_embed, tgt_ids),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        return self.generator(out)

    def forward(
        self, src_ids: torch.Tensor, src_pad: torch.Tensor, tgt_ids: torch.Tensor, tgt_pad: torch.Tensor | None
    ) -> torch.Tensor:
        return self.decode(tgt_ids, self.encode(src_ids, src_pad), src_pad, tgt_pad)


def init_parameters(model: Seq2Seq) -> None:
    """Xavier-uniform for every matrix (``nn.Transformer`` already does this inside itself; here
    the embeddings and the generator too), zero biases outside LayerNorm."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
        elif name.startswith("generator") or name.endswith("in_proj_bias"):
            nn.init.zeros_(p)


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


class Codec:
    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.index = {tok: i for i, tok in enumerate(vocab)}

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i > EOS_ID:
                out.append(self.vocab[i])
        return "".join(out)


def pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with PAD_ID; return ids [B, L] int64 and the padding mask (True = pad)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids, ids == PAD_ID


def make_batch(codec: Codec, examples: list[tuple[int, int, int, int]]):
    """examples = [(y, m, d, format_id)] -> src ids/mask, decoder input (BOS + target), output (target + EOS)."""
    src = [codec.encode(fmt(f, y, m, d)) for y, m, d, f in examples]
    tgt = [codec.encode(iso(y, m, d)) for y, m, d, _ in examples]
    src_ids, src_pad = pad_rows(src)
    dec_in, _ = pad_rows([[BOS_ID] + t for t in tgt])
    dec_out, _ = pad_rows([t + [EOS_ID] for t in tgt])
    tgt_pad = dec_in == PAD_ID
    tgt_pad[:, 0] = False
    return src_ids, src_pad, dec_in, tgt_pad, dec_out


def sample_examples(rng: np.random.Generator, dates: list, n: int) -> list[tuple[int, int, int, int]]:
    idx = rng.integers(0, len(dates), size=n)
    fmts = rng.integers(0, NUM_FORMATS, size=n)
    return [(*dates[i], int(f)) for i, f in zip(idx, fmts)]


# --------------------------------------------------------------------------------------------
# Greedy decoding and evaluation.
# --------------------------------------------------------------------------------------------

MAX_OUT = 12  # BOS + 10 characters + EOS


@torch.no_grad()
def greedy(model: Seq2Seq, src_ids: torch.Tensor, src_pad: torch.Tensor, max_out: int = MAX_OUT) -> torch.Tensor:
    """Greedy decoding with full recompute: ids [B, max_out] = BOS, tokens.., EOS, then PAD (0).

    Each step feeds the whole prefix (no target padding mask), takes ``argmax`` (first maximum)
    of the last position's logits; after a row has produced EOS its later tokens are PAD.
    Stops early once every row has finished.
    """
    memory = model.encode(src_ids, src_pad)
    b = src_ids.shape[0]
    ys = torch.full((b, 1), BOS_ID, dtype=torch.int64)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_out - 1):
        logits = model.decode(ys, memory, src_pad, None)[:, -1]
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == EOS_ID
        if bool(done.all()):
            break
    if ys.shape[1] < max_out:
        ys = torch.cat([ys, torch.full((b, max_out - ys.shape[1]), PAD_ID, dtype=torch.int64)], dim=1)
    return ys


def evaluate(model: Seq2Seq, codec: Codec, examples: list, batch: int = 1024) -> tuple[float, list]:
    """Exact-match accuracy of greedy decoding (eval mode) and the list of failures."""
    was_training = model.training
    model.eval()
    correct, failures = 0, []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        src_ids, src_pad, *_ = make_batch(codec, chunk)
        out = greedy(model, src_ids, src_pad)
        for (y, m, d, f), row in zip(chunk, out.tolist()):
            pred = codec.decode(row[1:])
            if pred == iso(y, m, d) and row[1 + 10] == EOS_ID:
                correct += 1
            else:
                failures.append((fmt(f, y, m, d), iso(y, m, d), pred))
    model.train(was_training)
    return correct / len(examples), failures


# --------------------------------------------------------------------------------------------
# Independent float64 NumPy forward, used to check the reference logits.
# --------------------------------------------------------------------------------------------


def numpy_forward(sd: dict[str, np.ndarray], cfg: dict, src_ids, src_pad, tgt_ids, tgt_pad) -> np.ndarray:
    """Post-LN Transformer forward in float64 NumPy from the state dict; returns logits [B, T, V]."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    d_model, h, eps = cfg["d_model"], cfg["nhead"], cfg["layer_norm_eps"]
    dk = d_model // h
    pe = positional_encoding(cfg["max_len"], d_model).numpy().astype(np.float64)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    def mha(p, xq, xkv, masked):  # masked [B, Lq, Lk] True = -inf
        w, bias = sd[p + ".in_proj_weight"], sd[p + ".in_proj_bias"]
        q = xq @ w[:d_model].T + bias[:d_model]
        k = xkv @ w[d_model : 2 * d_model].T + bias[d_model : 2 * d_model]
        v = xkv @ w[2 * d_model :].T + bias[2 * d_model :]
        split = lambda x: x.reshape(x.shape[0], x.shape[1], h, dk).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dk)
        s = np.where(masked[:, None], -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = s / s.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(xq.shape[0], xq.shape[1], d_model)
        return lin(o, p + ".out_proj")

    def ffn(p, x):
        return lin(np.maximum(lin(x, p + ".linear1"), 0.0), p + ".linear2")

    s_len, t_len = src_ids.shape[1], tgt_ids.shape[1]
    x = sd["src_embed.weight"][src_ids] * math.sqrt(d_model) + pe[:s_len]
    enc_mask = np.broadcast_to(src_pad[:, None, :], (src_ids.shape[0], s_len, s_len))
    for i in range(cfg["num_encoder_layers"]):
        p = f"transformer.encoder.layers.{i}"
        x = ln(x + mha(p + ".self_attn", x, x, enc_mask), p + ".norm1")
        x = ln(x + ffn(p, x), p + ".norm2")
    memory = ln(x, "transformer.encoder.norm")

    y = sd["tgt_embed.weight"][tgt_ids] * math.sqrt(d_model) + pe[:t_len]
    causal = np.triu(np.ones((t_len, t_len), dtype=bool), 1)
    self_mask = causal[None] | tgt_pad[:, None, :]
    cross_mask = np.broadcast_to(src_pad[:, None, :], (tgt_ids.shape[0], t_len, s_len))
    for i in range(cfg["num_decoder_layers"]):
        p = f"transformer.decoder.layers.{i}"
        y = ln(y + mha(p + ".self_attn", y, y, self_mask), p + ".norm1")
        y = ln(y + mha(p + ".multihead_attn", y, memory, cross_mask), p + ".norm2")
        y = ln(y + ffn(p, y), p + ".norm3")
    y = ln(y, "transformer.decoder.norm")
    return lin(y, "generator")


# --------------------------------------------------------------------------------------------
# Reference file for the crate's parity tests.
# --------------------------------------------------------------------------------------------

# (y, m, d, format): different formats and lengths; the first three dates are held out.
REFERENCE_EXAMPLES = (
    (2025, 9, 24, 4),   # Wednesday, 24 September 2025  (held out; a longest source, 28 chars)
    (1999, 11, 4, 3),   # Nov 4, 1999                   (held out)
    (1907, 3, 16, 7),   # 16th of March, 1907           (held out)
    (2061, 9, 30, 5),   # 30.09.2061
    (2000, 2, 29, 8),   # february 29 2000
    (1900, 1, 1, 9),    # 01 JAN 1900
)
# Decoder-input lengths (BOS + first L-1 target characters) of the `prefix_*` tensors.
PREFIX_LENGTHS = (11, 8, 5, 1, 10, 3)


def make_reference(model: Seq2Seq, codec: Codec, cfg: dict) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Reference tensors: float64 slow-path logits of the float32 weights, plus greedy ids."""
    examples = list(REFERENCE_EXAMPLES)
    assert [is_held_out(y, m, d) for y, m, d, _ in examples] == [True] * 3 + [False] * 3
    sources = [fmt(f, y, m, d) for y, m, d, f in examples]
    targets = [iso(y, m, d) for y, m, d, _ in examples]
    src_ids, src_pad, dec_in, tgt_pad, _ = make_batch(codec, examples)
    assert not bool(tgt_pad.any())  # every target has 10 characters

    prefix_rows = [row[:n] for row, n in zip(dec_in.tolist(), PREFIX_LENGTHS)]
    prefix_ids, prefix_pad = pad_rows(prefix_rows)
    prefix_pad[:, 0] = False

    # Slow path: a float64 copy in training mode with dropout 0 (training mode only switches
    # PyTorch's inference fast paths off).
    ref_model = copy.deepcopy(model).double()
    for mod in ref_model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    for layer in list(ref_model.transformer.encoder.layers) + list(ref_model.transformer.decoder.layers):
        layer.dropout.p = 0.0
    ref_model.train()
    with torch.no_grad():
        logits64 = ref_model(src_ids, src_pad, dec_in, tgt_pad)
        prefix_logits64 = ref_model(src_ids, src_pad, prefix_ids, prefix_pad)
        greedy64 = greedy(ref_model, src_ids, src_pad)

    # Checks: an independent NumPy float64 forward, float32 eval mode, float32 greedy.
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    checks = {}
    for name, ids, pad, ref in (
        ("logits", dec_in, tgt_pad, logits64),
        ("prefix_logits", prefix_ids, prefix_pad, prefix_logits64),
    ):
        manual = numpy_forward(sd, cfg, src_ids.numpy(), src_pad.numpy(), ids.numpy(), pad.numpy())
        checks[f"{name}_max_abs_err_numpy_f64_vs_torch_f64"] = float(np.abs(manual - ref.numpy()).max())
        model.eval()
        with torch.no_grad():
            f32 = model(src_ids, src_pad, ids, pad)
        checks[f"{name}_max_abs_err_torch_f32_eval_vs_reference"] = float(
            (f32.double() - ref.float().double()).abs().max()
        )
    greedy32 = greedy(model.eval(), src_ids, src_pad)
    assert torch.equal(greedy32, greedy64), (greedy32, greedy64)
    decoded = [codec.decode(row[1:]) for row in greedy64.tolist()]
    checks["greedy_matches_targets"] = decoded == targets
    # Greedy steps = teacher-forced positions when the decode is right: the smallest gap between
    # the best and the second-best logit says how robust argmax is to float32 round-off.
    top2 = logits64.topk(2, dim=-1).values
    checks["greedy_min_top1_top2_logit_margin"] = float((top2[..., 0] - top2[..., 1]).min())
    assert checks["logits_max_abs_err_numpy_f64_vs_torch_f64"] < 1e-9, checks
    assert checks["prefix_logits_max_abs_err_numpy_f64_vs_torch_f64"] < 1e-9, checks
    assert checks["logits_max_abs_err_torch_f32_eval_vs_reference"] < 1e-4, checks

    tensors = {
        "src_ids": src_ids,
        "src_key_padding_mask": src_pad.to(torch.uint8),
        "tgt_ids": dec_in,
        "tgt_key_padding_mask": tgt_pad.to(torch.uint8),
        "logits": logits64.float(),
        "prefix_tgt_ids": prefix_ids,
        "prefix_tgt_key_padding_mask": prefix_pad.to(torch.uint8),
        "prefix_logits": prefix_logits64.float(),
        "greedy_ids": greedy64,
    }
    metadata = {
        "sources": json.dumps(sources),
        "targets": json.dumps(targets),
        "dates": json.dumps([[y, m, d] for y, m, d, _ in examples]),
        "formats": json.dumps([f for *_, f in examples]),
        "src_lengths": json.dumps([len(s) for s in sources]),
        "prefix_lengths": json.dumps(list(PREFIX_LENGTHS)),
        "greedy_decoded": json.dumps(decoded),
        "checks": json.dumps(checks),
        "note": (
            "logits/prefix_logits: float64 PyTorch slow path from the float32 weights, rounded to float32. "
            "tgt_ids = BOS + full target; prefix_tgt_ids row i = first prefix_lengths[i] tokens of tgt_ids "
            "row i, right-padded with 0. greedy_ids: BOS, chars, EOS, then 0, width 12. Masks: 1 = pad."
        ),
    }
    return {k: v.contiguous() for k, v in tensors.items()}, metadata, checks


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def learning_rate(step: int, d_model: int, warmup: int, factor: float, total: int, cooldown: float) -> float:
    """The paper's schedule, factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5) (step from 1),
    times a linear cooldown to 0 over the last ``cooldown`` fraction of the ``total`` steps."""
    noam = factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    cool_steps = max(1, round(cooldown * total))
    return noam * min(1.0, (total - step + 1) / cool_steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="assets/dates")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--lr-factor", type=float, default=1.0)
    ap.add_argument("--cooldown", type=float, default=0.3, help="fraction of steps with linear decay to 0")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--nhead", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-size", type=int, default=2000, help="held-out sample size during training")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    dates = all_dates()
    check_calendar(dates)
    held = [dt for dt in dates if is_held_out(*dt)]
    train = [dt for dt in dates if not is_held_out(*dt)]
    vocab = build_vocab(dates)
    codec = Codec(vocab)
    max_src = max(len(fmt(f, *dt)) for dt in dates for f in range(NUM_FORMATS))
    print(f"dates {len(dates)}: train {len(train)}, held out {len(held)} ({len(held) / len(dates):.2%})")
    print(f"vocab {len(vocab)}: {''.join(vocab[3:])!r}; longest source {max_src} chars")

    cfg = {
        "d_model": args.d_model,
        "nhead": args.nhead,
        "dim_feedforward": args.d_ff,
        "num_encoder_layers": args.layers,
        "num_decoder_layers": args.layers,
        "src_vocab": len(vocab),
        "tgt_vocab": len(vocab),
        "activation": "relu",
        "layer_norm_eps": 1e-5,
        "norm_first": False,
        "max_len": 32,
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "seed": args.seed,
    }
    assert cfg["max_len"] >= max_src + 2

    model = Seq2Seq(cfg, args.dropout)
    init_parameters(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params}")

    opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: learning_rate(i + 1, args.d_model, args.warmup, args.lr_factor, args.steps, args.cooldown),
    )
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=args.label_smoothing)

    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1)
    eval_examples = sample_examples(eval_rng, held, args.eval_size)

    model.train()
    t_train = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        src_ids, src_pad, dec_in, tgt_pad, dec_out = make_batch(codec, sample_examples(rng, train, args.batch))
        logits = model(src_ids, src_pad, dec_in, tgt_pad)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), dec_out.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {running / 100:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - t_train:.0f}s", flush=True)
            running = 0.0
        if step % args.eval_every == 0 or step == args.steps:
            acc, fails = evaluate(model, codec, eval_examples)
            print(f"  held-out sample exact match {acc:.4%}  e.g. {fails[:3]}", flush=True)
    train_seconds = time.perf_counter() - t_train
    print(f"training took {train_seconds:.0f}s")

    # ---- export ----
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")

    # ---- verification on a fresh model loaded from the exported file ----
    fresh = Seq2Seq(cfg, dropout=args.dropout)
    missing = fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    fresh.eval()
    sample_acc, _ = evaluate(fresh, codec, eval_examples)
    full = [(*dt, f) for dt in held for f in range(NUM_FORMATS)]
    full_acc, full_fails = evaluate(fresh, codec, full)
    train_check = sample_examples(np.random.default_rng(args.seed + 2), train, 2000)
    train_acc, _ = evaluate(fresh, codec, train_check)
    print(f"reloaded: held-out sample ({len(eval_examples)}) {sample_acc:.4%}; all held-out dates x all "
          f"formats ({len(full)}) {full_acc:.4%}; training sample {train_acc:.4%}")
    for f in full_fails[:20]:
        print("  FAIL", f)
    fail_sources = {s for s, _, _ in full_fails}
    per_format = {
        FORMAT_NAMES[f]: sum(1 for dt in held if fmt(f, *dt) in fail_sources) for f in range(NUM_FORMATS)
    }

    tensors, metadata, checks = make_reference(fresh, codec, cfg)
    save_file(tensors, str(out / "reference.safetensors"), metadata=metadata)
    print("reference checks:", json.dumps(checks, indent=1))
    print("reference sources:", metadata["sources"], "->", metadata["greedy_decoded"])

    size = os.path.getsize(out / "model.safetensors")
    summary = {
        "held_out_sample_exact_match": sample_acc,
        "held_out_sample_size": len(eval_examples),
        "held_out_all_formats_exact_match": full_acc,
        "held_out_all_formats_size": len(full),
        "held_out_all_formats_failures_by_format": per_format,
        "train_sample_exact_match": train_acc,
        "parameters": n_params,
        "model_safetensors_bytes": size,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_version": torch.__version__,
        "threads": args.threads,
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-9, weight_decay=0), grad clip 1.0",
            "schedule": (
                f"{args.lr_factor} * d_model^-0.5 * min(step^-0.5, step * {args.warmup}^-1.5), times a "
                f"linear decay to 0 over the last {args.cooldown:.0%} of the steps"
            ),
            "dropout": args.dropout,
            "label_smoothing": args.label_smoothing,
        },
        "reference_checks": checks,
    }
    cfg_out = dict(cfg)
    cfg_out["dropout_during_training"] = args.dropout
    cfg_out["training_summary"] = summary
    (out / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    ok = full_acc >= 0.995 and sample_acc >= 0.995
    print("OK" if ok else "ACCURACY BELOW 99.5%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
