//! Beam search (§6.1): the state of one batch row's search and the per-step ranking.
//!
//! Every step extends each live hypothesis of a row by every token and ranks the extensions
//! by summed log-probability. Only each beam's best `2·beam_size` tokens can be among the
//! row's best `2·beam_size` extensions, so the vocabulary is scanned once per beam and no
//! `beams × vocab` list is ever sorted. Of the best `2·beam_size`, an EOS extension among the
//! top `beam_size` finishes a hypothesis; the best `beam_size` others stay live.

use ndarray::ArrayView2;

use super::{Hypothesis, LengthPenalty};

/// The `n` best `(log_prob, token)` of one row, best first, ties to the lower token id: one
/// pass over the vocabulary keeping the `n` best so far, sorted, so that a value enters only
/// when it beats the `n`-th (after the first few tokens, almost never). Blocks of values all
/// below the `n`-th are skipped by one vectorised comparison.
pub(crate) fn top_tokens(row: &[f32], n: usize) -> Vec<(f32, u32)> {
    let better = |a: (f32, u32), b: (f32, u32)| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).is_gt();
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (block, values) in row.chunks(SKIP_BLOCK).enumerate() {
        if best.len() == n {
            // Strictly below the n-th (by `<`, so equal values, ±0 and NaN take the exact
            // comparison): none of these can enter.
            let worst = best[n - 1].0;
            if values.iter().fold(true, |below, &v| below & (v < worst)) {
                continue;
            }
        }
        for (j, &lp) in values.iter().enumerate() {
            let c = (lp, (block * SKIP_BLOCK + j) as u32);
            if best.len() == n && !better(c, best[n - 1]) {
                continue;
            }
            let at = best.partition_point(|&b| better(b, c));
            best.insert(at, c);
            best.truncate(n);
        }
    }
    best
}

/// Values [`top_tokens`] tests at once against the `n`-th best.
const SKIP_BLOCK: usize = 32;

/// One live hypothesis.
pub(crate) struct Live {
    /// The decoder input so far: BOS, then the generated tokens.
    pub(crate) context: Vec<u32>,
    /// `Σ log p` of the generated tokens.
    pub(crate) log_prob: f32,
    /// Each generated token's log-probability.
    pub(crate) token_log_probs: Vec<f32>,
}

impl Live {
    fn extend(&self, token: u32, token_log_prob: f32) -> Live {
        let mut context = Vec::with_capacity(self.context.len() + 1);
        context.extend_from_slice(&self.context);
        context.push(token);
        let mut token_log_probs = Vec::with_capacity(self.token_log_probs.len() + 1);
        token_log_probs.extend_from_slice(&self.token_log_probs);
        token_log_probs.push(token_log_prob);
        Live {
            context,
            log_prob: self.log_prob + token_log_prob,
            token_log_probs,
        }
    }

    fn into_hypothesis(self, penalty: LengthPenalty, finished: bool) -> Hypothesis {
        let tokens = self.context[1..].to_vec();
        Hypothesis {
            score: penalty.score(self.log_prob, tokens.len()),
            tokens,
            log_prob: self.log_prob,
            token_log_probs: self.token_log_probs,
            finished,
            alignment: None,
        }
    }
}

/// What one step of a row's search needs from the options.
pub(crate) struct StepRule {
    pub(crate) beam_size: usize,
    pub(crate) eos_id: Option<u32>,
    pub(crate) penalty: LengthPenalty,
}

/// The beam-search state of one batch row.
pub(crate) struct RowSearch {
    /// Largest number of generated tokens.
    pub(crate) max_len: usize,
    /// Live hypotheses, in cache-slot order.
    pub(crate) live: Vec<Live>,
    finished: Vec<Hypothesis>,
}

impl RowSearch {
    pub(crate) fn new(max_len: usize, bos_id: u32) -> Self {
        RowSearch {
            max_len,
            live: vec![Live {
                context: vec![bos_id],
                log_prob: 0.0,
                token_log_probs: Vec::new(),
            }],
            finished: Vec::new(),
        }
    }

    /// Extends the single live hypothesis by a forced (prefix) token; it stays live.
    pub(crate) fn force(&mut self, log_probs: ArrayView2<f32>, token: u32) -> Vec<(usize, u32)> {
        debug_assert_eq!(self.live.len(), 1, "a forced prefix keeps one hypothesis");
        let lp = log_probs[[0, token as usize]];
        self.live = vec![self.live[0].extend(token, lp)];
        vec![(0, token)]
    }

    /// Extends the live hypotheses by one token given their next-token log-probabilities
    /// `[live, vocab]`; returns the new live hypotheses as (source beam, token), empty when the
    /// row is done.
    pub(crate) fn advance(
        &mut self,
        log_probs: ArrayView2<f32>,
        step: usize,
        rule: &StepRule,
    ) -> Vec<(usize, u32)> {
        let k = rule.beam_size;
        let keep = k.saturating_mul(2).min(log_probs.len());
        // The best `keep` extensions of all beams are among each beam's own best `keep` (the
        // order within one beam is the same), so each beam's vocabulary is scanned once for
        // those, and only `beams × keep` candidates are ranked.
        let mut candidates: Vec<(f32, usize, u32, f32)> =
            Vec::with_capacity(log_probs.nrows() * keep);
        for (beam, row) in log_probs.rows().into_iter().enumerate() {
            let base = self.live[beam].log_prob;
            let row = row
                .as_slice()
                .expect("log-probabilities in standard layout");
            candidates.extend(
                top_tokens(row, keep)
                    .into_iter()
                    .map(|(lp, token)| (base + lp, beam, token, lp)),
            );
        }
        // Best first; ties to the earlier beam, then the lower token id.
        let order = |a: &(f32, usize, u32, f32), b: &(f32, usize, u32, f32)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        if keep < candidates.len() {
            candidates.select_nth_unstable_by(keep - 1, order);
            candidates.truncate(keep);
        }
        candidates.sort_unstable_by(order);

        let at_limit = step >= self.max_len;
        let hugging_face = matches!(rule.penalty, LengthPenalty::HuggingFace(_));
        // At most `keep` candidates survive, however large the beam.
        let mut next_live = Vec::with_capacity(k.min(keep));
        let mut chosen = Vec::with_capacity(k.min(keep));
        let mut extended = 0;
        for (rank, (_, beam, token, lp)) in candidates.into_iter().enumerate() {
            let is_eos = Some(token) == rule.eos_id;
            // As in fairseq, EOS finishes a hypothesis only from the top `k` candidates.
            if is_eos && rank >= k {
                continue;
            }
            // `generate()` ends its search at the maximum length with the top `k` candidates of
            // that step only, EOS or not.
            if at_limit && hugging_face && rank >= k {
                continue;
            }
            if !is_eos {
                if extended == k {
                    continue;
                }
                extended += 1;
            }
            let hyp = self.live[beam].extend(token, lp);
            if is_eos || at_limit {
                self.finished
                    .push(hyp.into_hypothesis(rule.penalty, is_eos));
            } else {
                next_live.push(hyp);
                chosen.push((beam, token));
            }
        }
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.live = next_live;
        if self.live.is_empty() || self.cannot_improve(k, rule.penalty, step) {
            self.live.clear();
            return Vec::new();
        }
        chosen
    }

    /// Whether `k` hypotheses are finished and no live one can still score above the k-th,
    /// after `step` tokens.
    ///
    /// With Wu's penalty this is a bound: a live score can only fall, since its log-probability
    /// only decreases and the penalty's divisor is largest at the maximum length. The Hugging
    /// Face convention reproduces `generate(early_stopping=False)`'s heuristic instead: the live
    /// scores at their current length.
    fn cannot_improve(&self, k: usize, penalty: LengthPenalty, step: usize) -> bool {
        if self.finished.len() < k {
            return false;
        }
        let worst_kept = self.finished[k - 1].score;
        let len = match penalty {
            LengthPenalty::Wu(_) => self.max_len,
            LengthPenalty::HuggingFace(_) => step,
        };
        let best_possible = self
            .live
            .iter()
            .map(|h| penalty.score(h.log_prob, len))
            .fold(f32::NEG_INFINITY, f32::max);
        worst_kept >= best_possible
    }

    pub(crate) fn into_best(mut self, n: usize) -> Vec<Hypothesis> {
        self.finished.truncate(n);
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    /// Every `(value, token)` of `row`, best first, ties to the lower token id.
    fn full_sort(row: &[f32]) -> Vec<(f32, u32)> {
        let mut sorted: Vec<(f32, u32)> = row
            .iter()
            .enumerate()
            .map(|(t, &v)| (v, t as u32))
            .collect();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        sorted
    }

    #[test]
    fn top_tokens_are_the_head_of_a_full_sort_ties_to_the_lower_id() {
        // Many ties (values repeat every 7 tokens) and negative infinities.
        let row = Array1::from_shape_fn(50, |t| match t % 7 {
            6 => f32::NEG_INFINITY,
            r => -(r as f32) * 0.5,
        });
        let row = row.as_slice().unwrap();
        let sorted = full_sort(row);
        for n in [0, 1, 2, 7, 8, 49, 50, 80] {
            assert_eq!(top_tokens(row, n), sorted[..n.min(50)], "n = {n}");
        }
    }

    /// Across many blocks: rising, falling and scattered values, ties across block edges,
    /// ±0 and negative infinities, so that blocks are skipped and entered.
    #[test]
    fn top_tokens_over_many_blocks_equal_a_full_sort() {
        let rows: Vec<Vec<f32>> = vec![
            (0..1000).map(|t| t as f32 * 0.01).collect(),
            (0..1000).map(|t| -(t as f32) * 0.01).collect(),
            (0..1000)
                .map(|t| match (t * 7919) % 13 {
                    0 => f32::NEG_INFINITY,
                    1 => 0.0,
                    2 => -0.0,
                    r => -((t * 104_729 % 997) as f32) / (r as f32),
                })
                .collect(),
            (0..1000).map(|t| ((t % 64) / 16) as f32).collect(),
        ];
        for row in rows {
            let sorted = full_sort(&row);
            for n in [1, 4, 8, 33] {
                assert_eq!(top_tokens(&row, n), sorted[..n], "n = {n}");
            }
        }
    }
}
