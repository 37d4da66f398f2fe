"""NumPy reference implementations of the decoding rules of the `generation` fixture.

Shared by ``make_generation_fixture.py`` (which runs them on the PyTorch float32 model and checks
them against Hugging Face ``transformers``' ``generate``) and ``check_fixtures.py`` (which runs
them on its own NumPy float64 model). Only NumPy is needed. The rules are specified in
``tests/fixtures/FORMAT.md`` (section ``generation``).

Every function works on a model given as a callable

    next_logits(src_rows: np.ndarray[int], prefixes: np.ndarray[int, (n, t)]) -> np.ndarray[(n, V)]

that returns the raw logits of the last position of each decoder prefix; ``src_rows[i]`` is the
batch row (source sentence) prefix ``i`` belongs to. Prefixes start with the decoder start token.
All arithmetic stays in the dtype of the logits (float32 for the fixture, float64 in the check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

NextLogits = Callable[[np.ndarray, np.ndarray], np.ndarray]
Processor = Callable[[np.ndarray, list[int], int], np.ndarray]

PADDING = -1  # fills id tensors after a sequence's end
HF_NEG = -1.0e9  # the "impossible" score transformers' beam search uses for unused slots


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last dim, in x's dtype."""
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Logits processors: (scores [V], decoder sequence so far incl. the start token, number of
# generated tokens) -> processed scores [V]. Same rules as transformers' processors of the same
# name, for one sequence.


def repetition_penalty(theta: float) -> Processor:
    """CTRL penalty (RepetitionPenaltyLogitsProcessor): every id in the sequence, start token
    included, once: score < 0 ? score * theta : score / theta."""

    def apply(scores: np.ndarray, seq: list[int], _generated: int) -> np.ndarray:
        out = scores.copy()
        ids = np.unique(np.asarray(seq, dtype=np.int64))
        ids = ids[ids < scores.shape[-1]]
        s = out[ids]
        t = scores.dtype.type(theta)
        out[ids] = np.where(s < 0, s * t, s / t)
        return out

    return apply


def banned_ngram_tokens(seq: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of `seq` (NoRepeatNGramLogitsProcessor): every token
    that followed an earlier occurrence of the last n-1 tokens. Nothing if len(seq) < n."""
    if len(seq) < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1 :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}


def no_repeat_ngram(n: int) -> Processor:
    """Banned tokens (see `banned_ngram_tokens`, start token included in `seq`) get -inf."""

    def apply(scores: np.ndarray, seq: list[int], _generated: int) -> np.ndarray:
        out = scores.copy()
        for token in banned_ngram_tokens(seq, n):
            out[token] = -np.inf
        return out

    return apply


def min_length(min_len: int, eos_id: int) -> Processor:
    """EOS gets -inf while fewer than `min_len` tokens have been generated (start token not
    counted) -- transformers' MinNewTokensLengthLogitsProcessor with min_new_tokens = min_len."""

    def apply(scores: np.ndarray, _seq: list[int], generated: int) -> np.ndarray:
        out = scores.copy()
        if generated < min_len:
            out[eos_id] = -np.inf
        return out

    return apply


# ---------------------------------------------------------------------------------------------
# Greedy decoding


@dataclass
class GreedyResult:
    ids: np.ndarray  # [B, max_new] int64, PADDING after EOS; no start token
    lengths: np.ndarray  # [B] int64, EOS included
    log_probs: np.ndarray  # [B, max_new] log_softmax(raw logits)[chosen]; 0 after the end
    min_margin: float  # smallest top-1 minus top-2 processed score over all real steps


def greedy(
    next_logits: NextLogits,
    batch: int,
    start_id: int,
    max_new: int,
    eos_id: int | None = None,
    processors: Sequence[Processor] = (),
) -> GreedyResult:
    """Greedy decoding with full recompute: at each step argmax (first index on ties) of the raw
    logits passed through `processors`; a row stops after emitting `eos_id` (None: never)."""
    seqs = [[start_id] for _ in range(batch)]
    done = [False] * batch
    ids = np.full((batch, max_new), PADDING, dtype=np.int64)
    lengths = np.zeros(batch, dtype=np.int64)
    log_probs = None
    margin = np.inf
    for step in range(max_new):
        live = [b for b in range(batch) if not done[b]]
        if not live:
            break
        logits = next_logits(np.asarray(live), np.asarray([seqs[b] for b in live], dtype=np.int64))
        if log_probs is None:
            log_probs = np.zeros((batch, max_new), dtype=logits.dtype)
        raw_log_probs = log_softmax(logits)
        for i, b in enumerate(live):
            scores = logits[i]
            for process in processors:
                scores = process(scores, seqs[b], step)
            token = int(np.argmax(scores))
            top2 = np.sort(scores)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
            seqs[b].append(token)
            ids[b, step] = token
            log_probs[b, step] = raw_log_probs[i, token]
            lengths[b] = step + 1
            if eos_id is not None and token == eos_id:
                done[b] = True
    return GreedyResult(ids, lengths, log_probs, margin)


# ---------------------------------------------------------------------------------------------
# Beam search, as transformers' GenerationMixin._beam_search (early_stopping=False, one EOS id,
# no logits processors, no sampling)


@dataclass
class BeamHypothesis:
    tokens: list[int]  # generated tokens, no start token, EOS included if finished
    score: float  # sum_log_probs / len(tokens) ** alpha (the float in the logits' dtype)
    sum_log_probs: float
    finished: bool  # ended with EOS (else it was taken at the maximum length)


@dataclass
class BeamRowResult:
    hypotheses: list[BeamHypothesis]  # best first, num_return of them
    done_after: int | None  # generated length at which the early-stop test said "done", or None
    min_gap: float  # smallest relative gap at a ranking decision (see `beam_search`)
    eos_candidates_dropped: int = 0  # EOS candidates ranked >= num_beams (discarded)
    gaps: list[float] = field(default_factory=list)


def relative_gap(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|): how far apart two scores are, relative to their size (float32
    rounding of a sum of log-probs is relative, and normalised scores are divided by len**alpha)."""
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def _order(values: np.ndarray) -> np.ndarray:
    """Indices of `values`, largest first, lower index first on ties."""
    return np.lexsort((np.arange(values.shape[0]), -values))


def beam_search(
    next_logits: NextLogits,
    batch: int,
    start_id: int,
    eos_id: int,
    max_new: int,
    num_beams: int,
    length_penalty: float,
    num_return: int,
) -> list[BeamRowResult]:
    """transformers' beam search, one batch row at a time (rows do not interact).

    Per step (t = number of tokens generated so far, all live beams have length t):
      1. cumulative[k, v] = running_score[k] + log_softmax(logits[k])[v]; initially one live beam
         with score 0 (the others start at -1e9, so step 0 only extends beam 0).
      2. The K = 2 * num_beams best of all num_beams * V candidates (rank order).
      3. A candidate "hits" if its token is EOS or t + 1 == max_new.
      4. Next running beams: the num_beams best candidates that do not hit.
      5. Unless the row is done: every hitting candidate of rank < num_beams enters the finished
         list with score cumulative / (t + 1) ** alpha (t + 1 = its length, EOS included, start
         token not); the list keeps its num_beams best.
      6. The row is done (for good) once its finished list is full and
         best running cumulative / (t + 1) ** alpha <= worst finished score.
      The loop ends when every row is done or after max_new steps.
    Returned: the num_return best finished hypotheses. `min_gap` is the smallest relative gap
    (`relative_gap`) between two scores whose order decided something (candidate cut at
    num_beams, running cut, finished-list cut, order of the returned hypotheses, the done test).
    """
    results: list[BeamRowResult] = []
    k_keep = 2 * num_beams
    for row in range(batch):
        running: list[list[int]] = [[start_id] for _ in range(num_beams)]
        running_scores: np.ndarray | None = None
        finished: list[BeamHypothesis] = []
        done_after = None
        gaps: list[float] = []
        dropped = 0
        for t in range(max_new):
            logits = next_logits(np.full(num_beams, row), np.asarray(running, dtype=np.int64))
            dtype = logits.dtype.type
            if running_scores is None:
                running_scores = np.full(num_beams, HF_NEG, dtype=logits.dtype)
                running_scores[0] = 0
            step_log_probs = log_softmax(logits)
            cumulative = (step_log_probs + running_scores[:, None]).reshape(-1)
            vocab = logits.shape[-1]
            order = _order(cumulative)
            top = order[:k_keep]
            is_last = t + 1 == max_new
            hits = np.array([is_last or int(i % vocab) == eos_id for i in top])

            # 4. running beams
            live = [i for i, h in zip(top, hits) if not h]
            if not is_last:
                if len(live) < num_beams:
                    raise AssertionError("fewer live candidates than beams")
                new_running = [running[i // vocab] + [int(i % vocab)] for i in live[:num_beams]]
                non_hit_values = cumulative[[i for i in order if int(i % vocab) != eos_id]]
                gaps.append(relative_gap(float(non_hit_values[num_beams - 1]), float(non_hit_values[num_beams])))

            # 5. finished list
            if done_after is None:
                if hits.any():  # which hitting candidates rank below num_beams
                    gaps.append(relative_gap(float(cumulative[top[num_beams - 1]]), float(cumulative[top[num_beams]])))
                dropped += int(hits[num_beams:].sum()) if not is_last else 0
                lp = dtype(float(t + 1) ** length_penalty)
                for rank in range(num_beams):
                    if hits[rank]:
                        i = top[rank]
                        tokens = running[i // vocab][1:] + [int(i % vocab)]
                        finished.append(
                            BeamHypothesis(
                                tokens,
                                float(dtype(cumulative[i]) / lp),
                                float(cumulative[i]),
                                int(i % vocab) == eos_id,
                            )
                        )
                if finished:
                    scores = np.array([h.score for h in finished])
                    keep = _order(scores)
                    if len(finished) > num_beams:
                        gaps.append(relative_gap(float(scores[keep[num_beams - 1]]), float(scores[keep[num_beams]])))
                    finished = [finished[j] for j in keep[:num_beams]]

            if is_last:
                break
            running = new_running
            running_scores = cumulative[live[:num_beams]].astype(logits.dtype)

            # 6. done test (generated length t + 1)
            if done_after is None and len(finished) == num_beams:
                best_possible = float(dtype(running_scores[0]) / dtype(float(t + 1) ** length_penalty))
                worst = min(h.score for h in finished)
                gaps.append(relative_gap(best_possible, worst))
                if not best_possible > worst:
                    done_after = t + 1
            if done_after is not None:
                break  # nothing can enter the finished list any more
        returned = finished[:num_return]
        gaps += [relative_gap(returned[j].score, returned[j + 1].score) for j in range(len(returned) - 1)]
        results.append(BeamRowResult(returned, done_after, min(gaps) if gaps else np.inf, dropped, gaps))
    return results
