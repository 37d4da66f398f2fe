#!/usr/bin/env python3
"""Check a directory of parity fixtures with an independent NumPy float64 implementation.

For every fixture listed in ``manifest.json`` this script

* checks the manifest (bytes, sha256), that the sidecar's ``tensors`` block describes the
  safetensors file exactly, and that the header's ``fixture_json`` equals the sidecar minus
  ``tensors``;
* recomputes every ``io.*`` output from the stored weights and inputs with NumPy in float64,
  following the semantics in ``tests/fixtures/FORMAT.md`` (no PyTorch involved), and compares
  it with the stored value (greedy token ids must match exactly); the ``generation`` fixture's
  decodings are re-run with the rules of ``generation_reference.py`` (ids, lengths and
  finished flags exactly, log-probs and beam scores within the tolerance);
* with ``--reference DIR``, checks that both sets have the same files, the same tensor names,
  dtypes and shapes, and the same JSON key structure.

Exits with status 1 if any check fails. Needs only NumPy and safetensors (and
``generation_reference.py`` from this folder).

Usage::

    python tools/check_fixtures.py tests/fixtures [--reference OTHER_DIR] [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

import generation_reference as gen_ref

DEFAULT_TOL = 1e-5

_erf = np.frompyfunc(math.erf, 1, 1)


# ---------------------------------------------------------------------------------------------
# Fixture loading


def load_fixture(directory: Path, stem: str) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Return (sidecar JSON, header `fixture_json`, tensors) of one fixture."""
    sidecar = json.loads((directory / f"{stem}.json").read_text())
    with safe_open(directory / f"{stem}.safetensors", framework="np") as f:
        header = json.loads(f.metadata()["fixture_json"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return sidecar, header, tensors


def fixture_stems(directory: Path) -> list[str]:
    """Fixture stems listed in the directory's manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    return sorted({name.rsplit(".", 1)[0] for name in manifest["files"]})


def integrity_errors(directory: Path) -> list[str]:
    """Manifest and sidecar/header consistency problems of a fixture directory."""
    errors = []
    manifest = json.loads((directory / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            errors.append(f"manifest: {name} does not match its bytes/sha256")
    for stem in fixture_stems(directory):
        sidecar, header, tensors = load_fixture(directory, stem)
        described = sidecar.pop("tensors")
        actual = {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()}
        if described != actual:
            errors.append(f"{stem}: sidecar `tensors` does not describe the safetensors file")
        if header != sidecar:
            errors.append(f"{stem}: header `fixture_json` differs from the sidecar minus `tensors`")
    return errors


def key_paths(obj: object, prefix: str = "") -> set[str]:
    """All dotted key paths of nested dicts (leaves of any type end a path)."""
    if not isinstance(obj, dict):
        return {prefix}
    paths = set()
    for key, value in obj.items():
        paths |= key_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def structure_errors(directory: Path, reference: Path) -> list[str]:
    """Differences in files, tensor names/dtypes/shapes and JSON key structure vs `reference`."""
    stems, ref_stems = fixture_stems(directory), fixture_stems(reference)
    errors = [f"fixture sets differ: {stems} vs {ref_stems}"] if stems != ref_stems else []
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    if key_paths({**manifest, "files": None}) != key_paths({**ref_manifest, "files": None}):
        errors.append("manifest.json key structure differs")
    for stem in sorted(set(stems) & set(ref_stems)):
        sidecar, _, tensors = load_fixture(directory, stem)
        ref_sidecar, _, ref_tensors = load_fixture(reference, stem)
        if key_paths(sidecar) != key_paths(ref_sidecar):
            errors.append(f"{stem}: JSON key structure differs: {key_paths(sidecar) ^ key_paths(ref_sidecar)}")
        for name in sorted(set(tensors) | set(ref_tensors)):
            mine, theirs = tensors.get(name), ref_tensors.get(name)
            if mine is None or theirs is None:
                errors.append(f"{stem}: tensor {name} only in {'reference' if mine is None else 'checked set'}")
            elif mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                errors.append(
                    f"{stem}: {name} is {mine.dtype}{list(mine.shape)}, reference {theirs.dtype}{list(theirs.shape)}"
                )
    return errors


# ---------------------------------------------------------------------------------------------
# NumPy float64 reference semantics


def positional_encoding(length: int, d_model: int) -> np.ndarray:
    """Interleaved sinusoidal table: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
    angle = np.arange(length)[:, None] / 10000.0 ** (np.arange(0, d_model, 2) / d_model)
    pe = np.empty((length, d_model))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last dim with biased variance."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = x W^T + b with PyTorch's [out, in] weight layout."""
    return x @ w.T + b


def softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last dim; -inf entries become exactly 0."""
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(
    w: dict[str, np.ndarray],
    prefix: str,
    xq: np.ndarray,
    xk: np.ndarray,
    xv: np.ndarray,
    nhead: int,
    masked: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head attention with packed `in_proj_*`; `masked` [B, Lq, Lk] is True where masked out.

    Returns the output [B, Lq, D] and the per-head probabilities [B, H, Lq, Lk].
    """
    d = xq.shape[-1]
    head_dim = d // nhead
    in_w, in_b = w[prefix + "in_proj_weight"], w[prefix + "in_proj_bias"]
    q, k, v = (linear(x, in_w[i * d : (i + 1) * d], in_b[i * d : (i + 1) * d]) for i, x in enumerate((xq, xk, xv)))

    def heads(x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], x.shape[1], nhead, head_dim).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    probs = softmax(np.where(masked[:, None], -np.inf, scores))
    out = (probs @ heads(v)).transpose(0, 2, 1, 3).reshape(xq.shape)
    return linear(out, w[prefix + "out_proj.weight"], w[prefix + "out_proj.bias"]), probs


class NumpyTransformer:
    """The fixture model of FORMAT.md evaluated in float64 from a `weights.*` dict."""

    def __init__(self, tensors: dict[str, np.ndarray], config: dict):
        self.w = {k[len("weights.") :]: v.astype(np.float64) for k, v in tensors.items() if k.startswith("weights.")}
        self.cfg = config

    def _ln(self, prefix: str, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.w[prefix + "weight"], self.w[prefix + "bias"], self.cfg["layer_norm_eps"])

    def _ffn(self, prefix: str, x: np.ndarray) -> np.ndarray:
        h = linear(x, self.w[prefix + "linear1.weight"], self.w[prefix + "linear1.bias"])
        if self.cfg["activation"] == "relu":
            h = np.maximum(h, 0.0)
        else:
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))
        return linear(h, self.w[prefix + "linear2.weight"], self.w[prefix + "linear2.bias"])

    def _attn(self, prefix: str, xq: np.ndarray, xkv: np.ndarray, masked: np.ndarray) -> np.ndarray:
        return attention(self.w, prefix, xq, xkv, xkv, self.cfg["nhead"], masked)[0]

    def embed(self, table: str, ids: np.ndarray, pe: np.ndarray) -> np.ndarray:
        """E[ids] * sqrt(D) + pe[:len]."""
        return self.w[table][ids] * math.sqrt(self.cfg["d_model"]) + pe[: ids.shape[1]]

    def encode(self, x: np.ndarray, src_pad: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Encoder layer outputs and memory (after the final encoder norm)."""
        masked = np.broadcast_to(src_pad[:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
        outs = []
        for i in range(self.cfg["num_encoder_layers"]):
            p = f"transformer.encoder.layers.{i}."
            if self.cfg["norm_first"]:
                h = self._ln(p + "norm1.", x)
                x = x + self._attn(p + "self_attn.", h, h, masked)
                x = x + self._ffn(p, self._ln(p + "norm2.", x))
            else:
                x = self._ln(p + "norm1.", x + self._attn(p + "self_attn.", x, x, masked))
                x = self._ln(p + "norm2.", x + self._ffn(p, x))
            outs.append(x)
        return outs, self._ln("transformer.encoder.norm.", x)

    def decode(
        self, x: np.ndarray, memory: np.ndarray, tgt_pad: np.ndarray, src_pad: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Decoder layer outputs, decoder_out (after the final norm) and logits."""
        b, t, s = x.shape[0], x.shape[1], memory.shape[1]
        causal = np.triu(np.ones((t, t), dtype=bool), k=1)
        self_masked = tgt_pad[:, None, :] | causal[None]
        cross_masked = np.broadcast_to(src_pad[:, None, :], (b, t, s))
        outs = []
        for i in range(self.cfg["num_decoder_layers"]):
            p = f"transformer.decoder.layers.{i}."
            if self.cfg["norm_first"]:
                h = self._ln(p + "norm1.", x)
                x = x + self._attn(p + "self_attn.", h, h, self_masked)
                x = x + self._attn(p + "multihead_attn.", self._ln(p + "norm2.", x), memory, cross_masked)
                x = x + self._ffn(p, self._ln(p + "norm3.", x))
            else:
                x = self._ln(p + "norm1.", x + self._attn(p + "self_attn.", x, x, self_masked))
                x = self._ln(p + "norm2.", x + self._attn(p + "multihead_attn.", x, memory, cross_masked))
                x = self._ln(p + "norm3.", x + self._ffn(p, x))
            outs.append(x)
        out = self._ln("transformer.decoder.norm.", x)
        return outs, out, linear(out, self.w["generator.weight"], self.w["generator.bias"])


# ---------------------------------------------------------------------------------------------
# Per-kind checks: each returns {output name: max abs error}


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_transformer(meta: dict, t: dict[str, np.ndarray]) -> dict[str, float]:
    """Recompute every io.* output of a transformer fixture."""
    model = NumpyTransformer(t, meta["config"])
    src_pad, tgt_pad = t["io.src_key_padding_mask"].astype(bool), t["io.tgt_key_padding_mask"].astype(bool)
    pe = t["io.pe"].astype(np.float64)
    src = model.embed("src_embed.weight", t["io.src_ids"], pe)
    tgt = model.embed("tgt_embed.weight", t["io.tgt_ids"], pe)
    enc_outs, memory = model.encode(src, src_pad)
    dec_outs, dec_out, logits = model.decode(tgt, memory, tgt_pad, src_pad)
    computed = {
        "pe": positional_encoding(*t["io.pe"].shape),
        "src_embedded": src,
        "tgt_embedded": tgt,
        "memory": memory,
        "decoder_out": dec_out,
        "logits": logits,
    }
    computed.update({f"encoder_layer_out.{i}": x for i, x in enumerate(enc_outs)})
    computed.update({f"decoder_layer_out.{i}": x for i, x in enumerate(dec_outs)})
    return {name: max_err(value, t["io." + name]) for name, value in computed.items()}


def check_greedy(meta: dict, t: dict[str, np.ndarray]) -> dict[str, float]:
    """Re-run greedy decoding (full recompute, no EOS); ids must match exactly."""
    model = NumpyTransformer(t, meta["config"])
    src_pad = t["io.src_key_padding_mask"].astype(bool)
    pe = t["io.pe"].astype(np.float64)
    _, memory = model.encode(model.embed("src_embed.weight", t["io.src_ids"], pe), src_pad)
    ys = np.full((src_pad.shape[0], 1), meta["greedy"]["bos_id"], dtype=np.int64)
    step_logits = []
    for _ in range(meta["greedy"]["steps"]):
        tgt = model.embed("tgt_embed.weight", ys, pe)
        logits = model.decode(tgt, memory, np.zeros(ys.shape, dtype=bool), src_pad)[2][:, -1]
        step_logits.append(logits)
        ys = np.concatenate([ys, logits.argmax(-1)[:, None]], axis=1)
    ids_equal = np.array_equal(ys, t["io.greedy_ids"])
    return {
        "greedy_ids (0 = equal)": 0.0 if ids_equal else math.inf,
        "step_logits": max_err(np.stack(step_logits, axis=1), t["io.step_logits"]),
    }


def check_mha(meta: dict, t: dict[str, np.ndarray]) -> dict[str, float]:
    """Recompute nn.MultiheadAttention output and per-head weights."""
    w = {k[len("weights.") :]: v.astype(np.float64) for k, v in t.items() if k.startswith("weights.")}
    masked = t["io.mha.key_padding_mask"].astype(bool)[:, None, :] | t["io.mha.attn_mask"].astype(bool)[None]
    q, k, v = (t[f"io.mha.{name}"].astype(np.float64) for name in ("query", "key", "value"))
    out, probs = attention(w, "mha.", q, k, v, meta["config"]["num_heads"], masked)
    return {
        "attn_output": max_err(out, t["io.mha.attn_output"]),
        "attn_weights": max_err(probs, t["io.mha.attn_weights"]),
    }


def check_generation(meta: dict, t: dict[str, np.ndarray]) -> dict[str, float]:
    """Re-run every decoding of the `generation` fixture on the float64 model."""
    model = NumpyTransformer(t, meta["config"])
    src_pad = t["io.src_key_padding_mask"].astype(bool)
    pe = t["io.pe"].astype(np.float64)
    _, memory = model.encode(model.embed("src_embed.weight", t["io.src_ids"], pe), src_pad)

    def next_logits(rows: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
        tgt = model.embed("tgt_embed.weight", prefixes, pe)
        return model.decode(tgt, memory[rows], np.zeros(prefixes.shape, dtype=bool), src_pad[rows])[2][:, -1]

    g = meta["generation"]
    batch, start, eos, steps = src_pad.shape[0], g["decoder_start_token_id"], g["eos_id"], g["max_new_tokens"]
    cases = {
        "greedy": (g["greedy"], []),
        "repetition_penalty": (g["repetition_penalty"], [gen_ref.repetition_penalty(g["repetition_penalty"]["theta"])]),
        "greedy_eos": (g["greedy_eos"], []),
        "min_length": (g["min_length"], [gen_ref.min_length(g["min_length"]["min_len"], eos)]),
    }
    cases.update({f"no_repeat_ngram.{c['n']}": (c, [gen_ref.no_repeat_ngram(c["n"])]) for c in g["no_repeat_ngram"]})

    def exact(a: np.ndarray, b: np.ndarray) -> float:
        return 0.0 if np.array_equal(a, b) else math.inf

    errs = {}
    for key, (case, processors) in cases.items():
        result = gen_ref.greedy(next_logits, batch, start, steps, eos_id=case["eos_id"], processors=processors)
        errs[f"{key}.ids (0 = equal)"] = exact(result.ids, t[case["ids"]])
        if "lengths" in case:
            errs[f"{key}.lengths (0 = equal)"] = exact(result.lengths, t[case["lengths"]])
        if "log_probs" in case:
            errs[f"{key}.log_probs"] = max_err(result.log_probs, t[case["log_probs"]])
    beam = g["beam"]
    for setting in beam["settings"]:
        prefix = setting["prefix"]
        rows = gen_ref.beam_search(
            next_logits, batch, start, beam["eos_id"], steps, beam["num_beams"], setting["length_penalty"],
            beam["num_return_sequences"],
        )
        n_return = beam["num_return_sequences"]
        ids = np.full((batch * n_return, steps), gen_ref.PADDING, dtype=np.int64)
        fields = {name: np.zeros((batch, n_return)) for name in ("lengths", "scores", "sum_log_probs", "finished")}
        for b, row in enumerate(rows):
            for r, hyp in enumerate(row.hypotheses):
                ids[b * n_return + r, : len(hyp.tokens)] = hyp.tokens
                fields["lengths"][b, r], fields["finished"][b, r] = len(hyp.tokens), hyp.finished
                fields["scores"][b, r], fields["sum_log_probs"][b, r] = hyp.score, hyp.sum_log_probs
        errs[f"{prefix[3:]}.ids (0 = equal)"] = exact(ids, t[f"{prefix}.ids"])
        for name in ("lengths", "finished"):
            errs[f"{prefix[3:]}.{name} (0 = equal)"] = exact(fields[name], t[f"{prefix}.{name}"])
        errs[f"{prefix[3:]}.done_after (0 = equal)"] = exact(
            np.array([row.done_after for row in rows]), np.array(setting["done_after"])
        )
        for name in ("scores", "sum_log_probs"):
            errs[f"{prefix[3:]}.{name}"] = max_err(fields[name], t[f"{prefix}.{name}"])
    return errs


CHECKS = {"transformer": check_transformer, "greedy": check_greedy, "mha": check_mha, "generation": check_generation}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="fixture directory (with manifest.json)")
    parser.add_argument("--reference", type=Path, help="fixture directory to compare the structure with")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help=f"max abs error allowed (default {DEFAULT_TOL})")
    args = parser.parse_args()

    errors = integrity_errors(args.dir)
    if args.reference:
        errors += structure_errors(args.dir, args.reference)
    worst = 0.0
    for stem in fixture_stems(args.dir):
        sidecar, _, tensors = load_fixture(args.dir, stem)
        for name, err in CHECKS[sidecar["kind"]](sidecar, tensors).items():
            worst = max(worst, err)
            flag = "" if err <= args.tol else "  FAIL"
            print(f"{stem:18s} {name:26s} {err:.3e}{flag}")
            if err > args.tol:
                errors.append(f"{stem}: {name} max abs err {err:.3e} > {args.tol:g}")
    print(f"worst max abs err: {worst:.3e} (tolerance {args.tol:g})")
    for error in errors:
        print("ERROR:", error)
    print("OK" if not errors else f"{len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
