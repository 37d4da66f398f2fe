#!/usr/bin/env python3
"""Regenerate the PyTorch parity fixtures of the `ndtransformer` crate.

Writes, for each fixture stem, one ``<stem>.safetensors`` file (``weights.*`` and ``io.*``
tensors) and one ``<stem>.json`` sidecar, plus ``manifest.json``. The layout, the tensor names
and the exact semantics are specified in ``tests/fixtures/FORMAT.md``.

Reproducibility: every random draw is derived from ``--seed`` (default 20170612). Fixture ``k``
uses the fixture seed ``seed * 100 + k`` (``k`` = 0, 1, 2 for the transformer fixtures, 50 for
``mha``); from it

* ``torch.manual_seed(fixture_seed)`` drives PyTorch's own parameter init (xavier-uniform in
  ``nn.Transformer``, kaiming-uniform for the generator),
* ``torch.Generator().manual_seed(fixture_seed + 1)`` randomises embeddings, biases and
  LayerNorm weights so that every path of the model matters,
* ``numpy.random.default_rng(fixture_seed)`` draws lengths, token ids, MHA inputs and masks.

The ``io.*`` outputs are computed by PyTorch in float64 from the stored float32 weights and
inputs, on the slow path (a float64 copy of the model in training mode: dropout is 0, so the
only effect of training mode is that PyTorch's nested-tensor inference fast path is never
taken), and then rounded to float32. The same computation in float32, on the slow path and on
the inference fast path, is measured against them and recorded in each sidecar.

Usage::

    python tools/make_fixtures.py --out tests/fixtures [--seed 20170612]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

FORMAT_VERSION = 1
GENERATOR_NAME = "make_fixtures.py"
DEFAULT_SEED = 20170612
DEFAULT_OUT = "tests/fixtures"

PAD_ID = 0
BOS_ID = 1
FIRST_TOKEN_ID = 2  # sampled token ids never collide with PAD or BOS

BIAS_STD = 0.2  # all biases and LayerNorm biases ~ N(0, 0.2); LayerNorm weights ~ 1 + N(0, 0.2)

GREEDY_STEPS = 8
GREEDY_MIN_DISTINCT_TOKENS = 3  # fewer distinct generated tokens in a row counts as degenerate
GREEDY_MIN_MARGIN = 1e-3  # top-1/top-2 logit gap below this could make argmax ties plausible
GREEDY_FALLBACK_SEED_OFFSET = 10  # fallback weight seeds: seed * 100 + 10, + 11, ...
GREEDY_MAX_FALLBACKS = 100

MHA_SEED_OFFSET = 50
MHA_MASK_PROBABILITY = 0.25


@dataclass(frozen=True)
class TransformerSpec:
    """One transformer fixture: the `nn.Transformer` arguments, vocabularies and batch shape."""

    name: str
    seed_offset: int
    d_model: int
    nhead: int
    num_encoder_layers: int
    num_decoder_layers: int
    dim_feedforward: int
    activation: str
    layer_norm_eps: float
    norm_first: bool
    src_vocab: int
    tgt_vocab: int
    batch: int
    src_len: int
    tgt_len: int

    def config_json(self) -> dict:
        """The sidecar's `config` block."""
        return {
            "activation": self.activation,
            "batch_first": True,
            "bias": True,
            "d_model": self.d_model,
            "dim_feedforward": self.dim_feedforward,
            "dropout": 0.0,
            "layer_norm_eps": self.layer_norm_eps,
            "nhead": self.nhead,
            "norm_first": self.norm_first,
            "num_decoder_layers": self.num_decoder_layers,
            "num_encoder_layers": self.num_encoder_layers,
            "src_vocab": self.src_vocab,
            "tgt_vocab": self.tgt_vocab,
        }


TINY = TransformerSpec("tiny_postln_relu", 0, 16, 4, 2, 2, 32, "relu", 1e-5, False, 11, 13, 2, 7, 5)
TRANSFORMER_SPECS = (
    TINY,
    TransformerSpec("odd_shapes", 1, 24, 3, 3, 1, 40, "relu", 1e-6, False, 17, 19, 3, 9, 6),
    TransformerSpec("preln_gelu", 2, 32, 2, 2, 3, 48, "gelu", 1e-5, True, 10, 15, 2, 6, 8),
    # More than 64 rows a batch (160 source, 144 target positions), so that the linear layers
    # take the batch-product path, written piece by piece; widths 48, 80 and 150 off the
    # kernels' multiples of 16 and 32.
    TransformerSpec("batch_rows", 3, 48, 4, 2, 2, 80, "relu", 1e-5, False, 50, 150, 4, 40, 36),
)
GREEDY_NAME = "greedy_tiny"
MHA_NAME = "mha"
MHA_EMBED_DIM, MHA_HEADS, MHA_BATCH, MHA_QUERIES, MHA_KEYS = 12, 3, 2, 5, 7


class Seq2Seq(nn.Module):
    """Embeddings + `nn.Transformer` + generator; `state_dict()` gives the fixture weight names."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.src_embed = nn.Embedding(spec.src_vocab, spec.d_model)
        self.tgt_embed = nn.Embedding(spec.tgt_vocab, spec.d_model)
        self.transformer = nn.Transformer(
            d_model=spec.d_model,
            nhead=spec.nhead,
            num_encoder_layers=spec.num_encoder_layers,
            num_decoder_layers=spec.num_decoder_layers,
            dim_feedforward=spec.dim_feedforward,
            dropout=0.0,
            activation=spec.activation,
            layer_norm_eps=spec.layer_norm_eps,
            batch_first=True,
            norm_first=spec.norm_first,
            bias=True,
        )
        self.generator = nn.Linear(spec.d_model, spec.tgt_vocab)

    @staticmethod
    def embed(table: nn.Embedding, ids: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """`table[ids] * sqrt(D) + pe[:len]`, in the table's dtype."""
        weight = table.weight
        return weight[ids] * math.sqrt(weight.shape[1]) + pe[: ids.shape[1]].to(weight.dtype)

    def forward(
        self,
        src_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None,
        tgt_key_padding_mask: torch.Tensor | None,
        pe: torch.Tensor,
        logits_out: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the whole model; return embeddings, `memory`, `decoder_out` and `logits`.

        Keys are the fixture names without the `io.` prefix. Masks are bool, True = padding
        (None = no padding). With `logits_out` ([batch, tgt_len, tgt_vocab], contiguous) the
        logits are written into it (`torch.addmm(..., out=)`) instead of a new tensor.
        Encoder and decoder are called exactly as `nn.Transformer.forward` calls them; the causal
        target mask is built here and passed as a bool `tgt_mask` with `tgt_is_causal=True`.
        """
        src = self.embed(self.src_embed, src_ids, pe)
        tgt = self.embed(self.tgt_embed, tgt_ids, pe)
        memory = self.transformer.encoder(src, src_key_padding_mask=src_key_padding_mask)
        tgt_len = tgt_ids.shape[1]
        causal = torch.triu(torch.ones(tgt_len, tgt_len, dtype=torch.bool), diagonal=1)
        decoder_out = self.transformer.decoder(
            tgt,
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=src_key_padding_mask,
            tgt_is_causal=True,
        )
        return {
            "src_embedded": src,
            "tgt_embedded": tgt,
            "memory": memory,
            "decoder_out": decoder_out,
            "logits": (
                self.generator(decoder_out)
                if logits_out is None
                else self.logits_into(decoder_out, logits_out)
            ),
        }

    def logits_into(self, decoder_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`self.generator(decoder_out)` written into `out`, the same product and bias."""
        flat = decoder_out.reshape(-1, decoder_out.shape[-1])
        g = self.generator
        torch.addmm(g.bias, flat, g.weight.t(), out=out.view(-1, out.shape[-1]))
        return out


@contextmanager
def recording_layer_outputs(model: Seq2Seq) -> Iterator[dict[str, torch.Tensor]]:
    """Record every encoder/decoder layer output (`encoder_layer_out.{i}`, `decoder_layer_out.{i}`).

    Forward hooks disable PyTorch's layer fast path, so use this on the slow path only.
    """
    recorded: dict[str, torch.Tensor] = {}

    def recorder(key: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            recorded[key] = output

        return hook

    stacks = (("encoder", model.transformer.encoder.layers), ("decoder", model.transformer.decoder.layers))
    handles = [
        layer.register_forward_hook(recorder(f"{stack}_layer_out.{i}"))
        for stack, layers in stacks
        for i, layer in enumerate(layers)
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def slow_path_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` in `dtype` and training mode (dropout is 0: this only disables the fast path)."""
    return copy.deepcopy(module).to(dtype).train()


def randomise_parameters(module: nn.Module, seed: int, d_model: int | None = None) -> None:
    """Randomise embeddings, biases and LayerNorm weights in `named_parameters()` order.

    Embeddings ~ N(0, D^-1/2), biases (LayerNorm biases included) ~ N(0, 0.2), LayerNorm
    weights ~ 1 + N(0, 0.2); weight matrices keep PyTorch's init.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("embed.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * d_model**-0.5)
            elif ".norm" in name and name.endswith(".weight"):
                param.copy_(1 + BIAS_STD * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(BIAS_STD * torch.randn(param.shape, generator=gen))


def build_model(spec: TransformerSpec, seed: int) -> Seq2Seq:
    """The float32 model of `spec` with seeded init and randomised biases/norms/embeddings."""
    torch.manual_seed(seed)
    model = Seq2Seq(spec)
    randomise_parameters(model, seed + 1, spec.d_model)
    return model


def positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """Interleaved sinusoidal table: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same).

    Computed in float64 and rounded to float32: this rounded table is `io.pe` and is what the
    float64 reference adds (it is an input of the fixture, like the weights).
    """
    position = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angle = position * inv_freq[None, :]
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.to(torch.float32)


@dataclass
class TokenBatch:
    """Right-padded source/target token ids with their padding masks (True = padding)."""

    src_lengths: list[int]
    tgt_lengths: list[int]
    src_ids: torch.Tensor
    tgt_ids: torch.Tensor
    src_key_padding_mask: torch.Tensor
    tgt_key_padding_mask: torch.Tensor


def draw_batch(spec: TransformerSpec, seed: int) -> TokenBatch:
    """Draw lengths (row 0 always full) and token ids; target position 0 is BOS."""
    rng = np.random.default_rng(seed)
    src_lengths = [spec.src_len] + rng.integers(1, spec.src_len + 1, size=spec.batch - 1).tolist()
    tgt_lengths = [spec.tgt_len] + rng.integers(1, spec.tgt_len + 1, size=spec.batch - 1).tolist()
    src_ids = rng.integers(FIRST_TOKEN_ID, spec.src_vocab, size=(spec.batch, spec.src_len))
    tgt_ids = rng.integers(FIRST_TOKEN_ID, spec.tgt_vocab, size=(spec.batch, spec.tgt_len))
    tgt_ids[:, 0] = BOS_ID
    src_pad = np.arange(spec.src_len)[None, :] >= np.array(src_lengths)[:, None]
    tgt_pad = np.arange(spec.tgt_len)[None, :] >= np.array(tgt_lengths)[:, None]
    src_ids[src_pad] = PAD_ID
    tgt_ids[tgt_pad] = PAD_ID
    return TokenBatch(
        src_lengths,
        tgt_lengths,
        torch.from_numpy(src_ids),
        torch.from_numpy(tgt_ids),
        torch.from_numpy(src_pad),
        torch.from_numpy(tgt_pad),
    )


def weights_of(module: nn.Module, prefix: str = "weights.") -> dict[str, np.ndarray]:
    """The module's (float32) `state_dict()` as NumPy arrays named `<prefix><name>`."""
    return {prefix + name: t.detach().numpy().copy() for name, t in module.state_dict().items()}


def to_f32(t: torch.Tensor) -> np.ndarray:
    """Round a tensor to a float32 NumPy array."""
    return t.detach().to(torch.float32).numpy().copy()


def max_abs_err(a: torch.Tensor, reference: torch.Tensor, rows: np.ndarray | None = None) -> float | None:
    """max |a - reference| in float64, optionally over the rows selected by the boolean `rows`.

    Returns None when `rows` selects nothing.
    """
    diff = (a.to(torch.float64) - reference.to(torch.float64)).abs().numpy()
    if rows is not None:
        diff = diff[rows]
    return float(diff.max()) if diff.size else None


def stats(t: torch.Tensor) -> dict:
    """absmax and standard deviation (unbiased, over all elements) of a float64 output."""
    return {"absmax": float(t.abs().max()), "std": float(t.std())}


def make_transformer_fixture(spec: TransformerSpec, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Build one transformer fixture; return (sidecar JSON without `tensors`, tensors)."""
    fixture_seed = seed * 100 + spec.seed_offset
    model = build_model(spec, fixture_seed)
    batch = draw_batch(spec, fixture_seed)
    pe = positional_encoding(max(spec.src_len, spec.tgt_len), spec.d_model)
    args = (batch.src_ids, batch.tgt_ids, batch.src_key_padding_mask, batch.tgt_key_padding_mask, pe)

    reference_model = slow_path_copy(model, torch.float64)
    with torch.no_grad(), recording_layer_outputs(reference_model) as layer_outputs:
        ref = reference_model(*args)
    ref.update(layer_outputs)
    with torch.no_grad():
        f32 = slow_path_copy(model, torch.float32)(*args)
    with torch.inference_mode():
        fast = model.eval()(*args)

    tensors = weights_of(model)
    tensors.update({"io." + key: to_f32(value) for key, value in ref.items()})
    tensors["io.pe"] = pe.numpy()
    tensors["io.src_ids"] = batch.src_ids.numpy()
    tensors["io.tgt_ids"] = batch.tgt_ids.numpy()
    tensors["io.src_key_padding_mask"] = batch.src_key_padding_mask.numpy().astype(np.uint8)
    tensors["io.tgt_key_padding_mask"] = batch.tgt_key_padding_mask.numpy().astype(np.uint8)

    padded_rows = batch.src_key_padding_mask.numpy()
    meta = {
        "kind": "transformer",
        "name": spec.name,
        "seed": fixture_seed,
        "config": spec.config_json(),
        "batch": {
            "B": spec.batch,
            "S": spec.src_len,
            "T": spec.tgt_len,
            "bos_id": BOS_ID,
            "pad_id": PAD_ID,
            "padding_side": "right",
            "src_lengths": batch.src_lengths,
            "tgt_lengths": batch.tgt_lengths,
        },
        "stats": {key: stats(ref[key]) for key in ("memory", "decoder_out", "logits")},
        "torch_f32_max_abs_err_vs_reference": {
            "slow_path": {key: max_abs_err(f32[key], ref[key]) for key in ("memory", "decoder_out", "logits")},
            "inference_mode_fast_path": {
                "logits": max_abs_err(fast["logits"], ref["logits"]),
                "memory_valid_rows": max_abs_err(fast["memory"], ref["memory"], ~padded_rows),
                "memory_padded_rows": max_abs_err(fast["memory"], ref["memory"], padded_rows),
            },
        },
    }
    return meta, tensors


def greedy_decode(
    model: Seq2Seq, src_ids: torch.Tensor, src_key_padding_mask: torch.Tensor, pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with full recompute, no EOS: return ids [B, 1+steps] and step logits [B, steps, Vt]."""
    ys = torch.full((src_ids.shape[0], 1), BOS_ID, dtype=torch.int64)
    step_logits = []
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            logits = model(src_ids, ys, src_key_padding_mask, None, pe)["logits"][:, -1]
            step_logits.append(logits)
            ys = torch.cat([ys, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ys, torch.stack(step_logits, dim=1)


def top1_top2_margin(step_logits: torch.Tensor) -> float:
    """Smallest gap between the best and second-best logit over all rows and steps."""
    top2 = step_logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def is_degenerate(ids: torch.Tensor, margin: float) -> bool:
    """True if the decode would make a weak test.

    That is: some row generates fewer than 3 distinct tokens, all rows generate the same
    sequence, or some argmax is nearly tied.
    """
    generated = ids[:, 1:]
    too_few = any(len(set(row.tolist())) < GREEDY_MIN_DISTINCT_TOKENS for row in generated)
    rows_identical = bool((generated == generated[0]).all())
    return too_few or rows_identical or margin < GREEDY_MIN_MARGIN


def make_greedy_fixture(seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Greedy fixture on the tiny config: the tiny fixture's weights unless they decode degenerately."""
    input_seed = seed * 100 + TINY.seed_offset
    batch = draw_batch(TINY, input_seed)
    pe = positional_encoding(max(TINY.src_len, 1 + GREEDY_STEPS), TINY.d_model)
    candidates = [input_seed] + [seed * 100 + GREEDY_FALLBACK_SEED_OFFSET + k for k in range(GREEDY_MAX_FALLBACKS)]
    for weight_seed in candidates:
        model = build_model(TINY, weight_seed)
        ids, step_logits = greedy_decode(
            slow_path_copy(model, torch.float64), batch.src_ids, batch.src_key_padding_mask, pe
        )
        margin = top1_top2_margin(step_logits)
        if not is_degenerate(ids, margin):
            break
    else:
        raise RuntimeError(f"no non-degenerate greedy weights among seeds {candidates}")

    ids_f32, step_logits_f32 = greedy_decode(
        slow_path_copy(model, torch.float32), batch.src_ids, batch.src_key_padding_mask, pe
    )
    if not torch.equal(ids_f32, ids):
        raise RuntimeError("float32 greedy decoding chose different tokens than the float64 reference")

    tensors = weights_of(model)
    tensors.update(
        {
            "io.src_ids": batch.src_ids.numpy(),
            "io.src_key_padding_mask": batch.src_key_padding_mask.numpy().astype(np.uint8),
            "io.pe": pe.numpy(),
            "io.greedy_ids": ids.numpy(),
            "io.step_logits": to_f32(step_logits),
        }
    )
    meta = {
        "kind": "greedy",
        "name": GREEDY_NAME,
        "seed": input_seed,
        "config": TINY.config_json(),
        "batch": {"B": TINY.batch, "S": TINY.src_len, "pad_id": PAD_ID, "src_lengths": batch.src_lengths},
        "greedy": {
            "bos_id": BOS_ID,
            "eos": None,
            "min_top1_top2_logit_margin": margin,
            "same_weights_as": TINY.name if weight_seed == input_seed else None,
            "step_logits_f32_max_abs_err": max_abs_err(step_logits_f32, step_logits),
            "steps": GREEDY_STEPS,
            "weight_seed": weight_seed,
        },
    }
    return meta, tensors


def draw_mha_masks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random key padding [B, S] and attention [L, S] masks (True = masked), repaired so that
    every (batch, query) row keeps at least one key."""
    key_padding = rng.random((MHA_BATCH, MHA_KEYS)) < MHA_MASK_PROBABILITY
    attn = rng.random((MHA_QUERIES, MHA_KEYS)) < MHA_MASK_PROBABILITY
    for b in range(MHA_BATCH):
        if key_padding[b].all():
            key_padding[b, 0] = False
        first_kept = int(np.flatnonzero(~key_padding[b])[0])
        for q in range(MHA_QUERIES):
            if (key_padding[b] | attn[q]).all():
                attn[q, first_kept] = False
    return key_padding, attn


def make_mha_fixture(seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Standalone `nn.MultiheadAttention` fixture with random padding and attention masks."""
    fixture_seed = seed * 100 + MHA_SEED_OFFSET
    torch.manual_seed(fixture_seed)
    mha = nn.MultiheadAttention(MHA_EMBED_DIM, MHA_HEADS, dropout=0.0, bias=True, batch_first=True)
    randomise_parameters(mha, fixture_seed + 1)

    rng = np.random.default_rng(fixture_seed)
    query = rng.standard_normal((MHA_BATCH, MHA_QUERIES, MHA_EMBED_DIM)).astype(np.float32)
    key = rng.standard_normal((MHA_BATCH, MHA_KEYS, MHA_EMBED_DIM)).astype(np.float32)
    value = rng.standard_normal((MHA_BATCH, MHA_KEYS, MHA_EMBED_DIM)).astype(np.float32)
    key_padding, attn = draw_mha_masks(rng)

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        module = slow_path_copy(mha, dtype)
        q, k, v = (torch.from_numpy(x).to(dtype) for x in (query, key, value))
        with torch.no_grad():
            return module(
                q,
                k,
                v,
                key_padding_mask=torch.from_numpy(key_padding),
                attn_mask=torch.from_numpy(attn),
                need_weights=True,
                average_attn_weights=False,
            )

    out64, weights64 = run(torch.float64)
    out32, weights32 = run(torch.float32)

    tensors = weights_of(mha, prefix="weights.mha.")
    tensors.update(
        {
            "io.mha.query": query,
            "io.mha.key": key,
            "io.mha.value": value,
            "io.mha.key_padding_mask": key_padding.astype(np.uint8),
            "io.mha.attn_mask": attn.astype(np.uint8),
            "io.mha.attn_output": to_f32(out64),
            "io.mha.attn_weights": to_f32(weights64),
        }
    )
    meta = {
        "kind": "mha",
        "name": MHA_NAME,
        "seed": fixture_seed,
        "config": {
            "average_attn_weights": False,
            "batch_first": True,
            "bias": True,
            "dropout": 0.0,
            "embed_dim": MHA_EMBED_DIM,
            "head_dim": MHA_EMBED_DIM // MHA_HEADS,
            "kdim": MHA_EMBED_DIM,
            "need_weights": True,
            "num_heads": MHA_HEADS,
            "vdim": MHA_EMBED_DIM,
        },
        "batch": {"B": MHA_BATCH, "L": MHA_QUERIES, "S": MHA_KEYS},
        "torch_f32_max_abs_err_vs_reference": {
            "attn_output": max_abs_err(out32, out64),
            "attn_weights": max_abs_err(weights32, weights64),
        },
    }
    return meta, tensors


def write_fixture(out_dir: Path, meta: dict, tensors: dict[str, np.ndarray]) -> list[str]:
    """Write `<name>.safetensors` (JSON in the header under `fixture_json`) and `<name>.json`."""
    meta = {**meta, "format_version": FORMAT_VERSION, "torch_version": torch.__version__}
    name = meta["name"]
    tensors = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    save_file(
        tensors, str(out_dir / f"{name}.safetensors"), metadata={"fixture_json": json.dumps(meta, sort_keys=True)}
    )
    sidecar = {
        **meta,
        "tensors": {key: {"dtype": str(value.dtype), "shape": list(value.shape)} for key, value in tensors.items()},
    }
    (out_dir / f"{name}.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return [f"{name}.json", f"{name}.safetensors"]


def write_manifest(out_dir: Path, files: list[str], seed: int) -> None:
    """Write `manifest.json`: bytes and sha256 of every fixture file, seed, torch version.

    Files that an existing manifest lists besides `files` (the `generation` fixture of
    `make_generation_fixture.py`) stay listed, re-hashed, as long as they exist.
    """
    listed = set(files)
    old = out_dir / "manifest.json"
    if old.exists():
        listed |= {name for name in json.loads(old.read_text())["files"] if (out_dir / name).exists()}
    entries = {}
    for file_name in sorted(listed):
        data = (out_dir / file_name).read_bytes()
        entries[file_name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "files": entries,
        "format_version": FORMAT_VERSION,
        "generator": GENERATOR_NAME,
        "seed": seed,
        "torch_version": torch.__version__,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"master seed (default {DEFAULT_SEED})")
    args = parser.parse_args()

    # PyTorch explains at length why it does or does not use nested tensors; both are expected here.
    warnings.filterwarnings("ignore", message=".*nested.tensor", category=UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    builders = [lambda spec=spec: make_transformer_fixture(spec, args.seed) for spec in TRANSFORMER_SPECS]
    builders += [lambda: make_greedy_fixture(args.seed), lambda: make_mha_fixture(args.seed)]
    files = []
    for build in builders:
        meta, tensors = build()
        files += write_fixture(args.out, meta, tensors)
        print(f"wrote {meta['name']}: {len(tensors)} tensors")
    write_manifest(args.out, files, args.seed)
    print(f"wrote {args.out / 'manifest.json'}")


if __name__ == "__main__":
    main()
