//! Generating output sequences: greedy decoding and beam search (§6.1), on the KV cache.
//!
//! The decoder is auto-regressive: each token is predicted from the source and the tokens
//! before it. Both searches run the encoder once, keep a [`DecoderCache`](crate::DecoderCache),
//! and feed one token per batch row per step. Rows (or beams) that are finished are dropped
//! from the cache, so they stop costing work.

use ndarray::{Array1, ArrayView2};

use crate::attention::DecoderCache;
use crate::error::{Error, Result};
use crate::mask::KeyPaddingMask;
use crate::ops;
use crate::transformer::Transformer;

/// Options of [`Transformer::greedy_decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyOptions {
    /// The token every output starts from (not included in the result).
    pub bos_id: u32,
    /// The token that ends an output (included in the result); `None` runs `max_len` steps.
    pub eos_id: Option<u32>,
    /// Largest number of generated tokens, EOS included.
    pub max_len: usize,
}

/// How long a beam-search output may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxLength {
    /// At most this many generated tokens.
    Fixed(usize),
    /// At most the row's source length (padding excluded) plus this many; the paper's §6.1
    /// setting is `SourcePlus(50)`.
    SourcePlus(usize),
}

/// Options of [`Transformer::beam_search`]; [`BeamSearchOptions::paper`] gives §6.1's values.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamSearchOptions {
    /// Hypotheses kept per batch row at each step (the paper: 4).
    pub beam_size: usize,
    /// α of the length penalty `lp(Y) = ((5 + |Y|) / 6)^α` (Wu et al. 2016; the paper: 0.6);
    /// 0 means no penalty.
    pub length_penalty: f32,
    /// Maximum output length (the paper: source length + 50).
    pub max_len: MaxLength,
    /// How many hypotheses to return per batch row, best first (at most `beam_size`).
    pub num_return: usize,
    /// The token every output starts from (not included in the result).
    pub bos_id: u32,
    /// The token that ends an output (included in the result).
    pub eos_id: u32,
}

impl BeamSearchOptions {
    /// The paper's settings (§6.1): beam 4, α = 0.6, maximum length = source length + 50.
    pub fn paper(bos_id: u32, eos_id: u32) -> Self {
        BeamSearchOptions {
            beam_size: 4,
            length_penalty: 0.6,
            max_len: MaxLength::SourcePlus(50),
            num_return: 1,
            bos_id,
            eos_id,
        }
    }
}

/// One output of [`Transformer::beam_search`].
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens (without BOS; ending with EOS if `finished`).
    pub tokens: Vec<u32>,
    /// `Σ log p(y_t | y_<t, x)` over `tokens`.
    pub log_prob: f32,
    /// `log_prob / lp(|tokens|)`: what the search ranks by.
    pub score: f32,
    /// Whether it ended with EOS (otherwise it reached the maximum length).
    pub finished: bool,
}

/// `lp(Y) = ((5 + |Y|) / 6)^α`.
pub fn length_penalty(len: usize, alpha: f32) -> f32 {
    ((5.0 + len as f32) / 6.0).powf(alpha)
}

impl Transformer {
    /// Greedy decoding: at every step the most probable next token (ties: lowest id).
    ///
    /// Each batch row stops at its own EOS; finished rows leave the cache.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    /// - returns `batch` token lists, each without BOS and ending with EOS if one was produced
    ///
    /// # Errors
    /// [`Error::Decoding`] for `max_len` 0 or beyond the positional table, or BOS/EOS outside
    /// the target vocabulary; the errors of [`encode`](Self::encode).
    ///
    /// ```
    /// use ndarray::array;
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{GreedyOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let out = model.greedy_decode(array![[5u32, 6, 7]].view(), None,
    ///     &GreedyOptions { bos_id: 1, eos_id: Some(2), max_len: 10 })?;
    /// assert!(out[0].len() <= 10);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn greedy_decode(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GreedyOptions,
    ) -> Result<Vec<Vec<u32>>> {
        self.check_token("bos_id", options.bos_id)?;
        if let Some(eos) = options.eos_id {
            self.check_token("eos_id", eos)?;
        }
        self.check_max_len(options.max_len)?;
        let memory = self.encode(src, src_padding)?;
        let cache =
            self.start_decoding_with_capacity(memory.view(), src_padding, options.max_len)?;
        // One warm pass for all the steps and the choices between them. (Not around the cache's
        // start: its large fresh allocations measured slower from a pool thread.)
        ops::with_warm_pool(|| self.greedy_steps(cache, options))
    }

    /// The steps of [`greedy_decode`](Self::greedy_decode) from a fresh cache.
    fn greedy_steps(
        &self,
        mut cache: DecoderCache,
        options: &GreedyOptions,
    ) -> Result<Vec<Vec<u32>>> {
        let batch = cache.batch();
        let mut outputs = vec![Vec::with_capacity(options.max_len); batch];
        // Batch rows still generating, in cache order.
        let mut active: Vec<usize> = (0..batch).collect();
        let mut last = Array1::from_elem(batch, options.bos_id);
        for _ in 0..options.max_len {
            let logits = self.decode_step(last.view(), &mut cache)?;
            let next = ops::argmax_rows(logits.view());
            let mut keep = Vec::with_capacity(active.len());
            for (slot, (&row, &token)) in active.iter().zip(&next).enumerate() {
                let token = token as u32;
                outputs[row].push(token);
                if Some(token) != options.eos_id {
                    keep.push(slot);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache.select_rows(&keep)?;
            }
            active = keep.iter().map(|&slot| active[slot]).collect();
            last = keep.iter().map(|&slot| next[slot] as u32).collect();
        }
        Ok(outputs)
    }

    /// Beam search (§6.1) with the length penalty of Wu et al. (2016).
    ///
    /// Each batch row keeps `beam_size` partial hypotheses; every step extends each by every
    /// token and ranks the extensions by log-probability. Of the best `2·beam_size`, an
    /// extension by EOS among the top `beam_size` becomes a finished hypothesis, scored
    /// `log_prob / lp(|Y|)`; the best `beam_size` others stay live. A row stops early once it has `beam_size` finished hypotheses and no live one
    /// can still beat the worst of them (a live score can only fall: its log-probability only
    /// decreases, and `lp` is largest at the maximum length). Hypotheses still live at the
    /// maximum length are returned unfinished. Ties go to the earlier beam, then the lower id.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    /// - returns `batch` lists of up to `num_return` hypotheses, best first
    ///
    /// # Errors
    /// [`Error::Decoding`] for beam size 0, a maximum length of 0 or beyond the positional
    /// table, `num_return` 0 or above the beam size, a negative or non-finite α, or BOS/EOS
    /// outside the target vocabulary; the errors of [`encode`](Self::encode).
    pub fn beam_search(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &BeamSearchOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        let o = options;
        if o.beam_size == 0 {
            return Err(Error::Decoding {
                parameter: "beam_size",
                reason: "beam_size is 0, it must be at least 1".into(),
            });
        }
        if o.num_return == 0 || o.num_return > o.beam_size {
            return Err(Error::Decoding {
                parameter: "num_return",
                reason: format!(
                    "num_return {} must be between 1 and beam_size {}",
                    o.num_return, o.beam_size
                ),
            });
        }
        if !(o.length_penalty.is_finite() && o.length_penalty >= 0.0) {
            return Err(Error::Decoding {
                parameter: "length_penalty",
                reason: format!(
                    "length_penalty {} must be finite and at least 0",
                    o.length_penalty
                ),
            });
        }
        self.check_token("bos_id", o.bos_id)?;
        self.check_token("eos_id", o.eos_id)?;
        let batch = src.nrows();
        // The lengths below come from the padding mask, so it must fit before they are used.
        if let Some(p) = src_padding {
            p.check(batch, src.ncols(), "source padding mask")?;
        }
        let src_lengths = match src_padding {
            Some(p) => p.lengths(),
            None => vec![src.ncols(); batch],
        };
        let max_lens: Vec<usize> = src_lengths
            .iter()
            .map(|&len| match o.max_len {
                MaxLength::Fixed(n) => n,
                // Saturating: an absurd `n` is then reported by `check_max_len`.
                MaxLength::SourcePlus(n) => len.saturating_add(n),
            })
            .collect();
        for &m in &max_lens {
            self.check_max_len(m)?;
        }

        let memory = self.encode(src, src_padding)?;
        let longest = max_lens.iter().copied().max().unwrap_or(0);
        let cache = self.start_decoding_with_capacity(memory.view(), src_padding, longest)?;
        let rows: Vec<RowSearch> = max_lens
            .iter()
            .map(|&max_len| RowSearch::new(max_len))
            .collect();
        // One warm pass for all the steps, as in greedy decoding.
        ops::with_warm_pool(|| self.beam_steps(cache, rows, o))
    }

    /// The steps of [`beam_search`](Self::beam_search) from a fresh cache, one search per row.
    fn beam_steps(
        &self,
        mut cache: DecoderCache,
        mut rows: Vec<RowSearch>,
        o: &BeamSearchOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        let batch = rows.len();
        // Cache slot → (batch row, beam index in that row).
        let mut slots: Vec<(usize, usize)> = (0..batch).map(|r| (r, 0)).collect();
        let mut last = Array1::from_elem(batch, o.bos_id);
        let mut step = 0;
        while !slots.is_empty() {
            let mut log_probs = self.decode_step(last.view(), &mut cache)?;
            ops::log_softmax_rows_inplace(log_probs.view_mut());
            step += 1;
            let mut next_slots = Vec::new();
            let mut next_sources = Vec::new();
            let mut next_tokens = Vec::new();
            let mut start = 0;
            while start < slots.len() {
                let row = slots[start].0;
                let end = start + slots[start..].iter().take_while(|s| s.0 == row).count();
                let chosen =
                    rows[row].advance(log_probs.slice(ndarray::s![start..end, ..]), step, o);
                for (beam, (source, token)) in chosen.into_iter().enumerate() {
                    next_slots.push((row, beam));
                    next_sources.push(start + source);
                    next_tokens.push(token);
                }
                start = end;
            }
            if next_slots.is_empty() {
                break;
            }
            cache.select_rows(&next_sources)?;
            slots = next_slots;
            last = Array1::from(next_tokens);
        }
        Ok(rows
            .into_iter()
            .map(|r| r.into_best(o.num_return))
            .collect())
    }

    fn check_token(&self, parameter: &'static str, id: u32) -> Result<()> {
        let vocab = self.config().tgt_vocab;
        if id as usize >= vocab {
            return Err(Error::Decoding {
                parameter,
                reason: format!(
                    "{parameter} {id} is outside the target vocabulary of size {vocab}"
                ),
            });
        }
        Ok(())
    }

    fn check_max_len(&self, max_len: usize) -> Result<()> {
        if max_len == 0 {
            return Err(Error::Decoding {
                parameter: "max_len",
                reason: "max_len is 0, it must be at least 1".into(),
            });
        }
        // Positions 0..max_len are fed (BOS and all generated tokens but the last).
        if max_len > self.config().max_len {
            return Err(Error::Decoding {
                parameter: "max_len",
                reason: format!(
                    "maximum output length {max_len} exceeds the positional-encoding table's max_len {}",
                    self.config().max_len
                ),
            });
        }
        Ok(())
    }
}

/// The `n` best `(log_prob, token)` of one row, best first, ties to the lower token id: one
/// pass over the vocabulary keeping the `n` best so far, sorted, so that a value enters only
/// when it beats the `n`-th (after the first few tokens, almost never).
fn top_tokens(row: ndarray::ArrayView1<f32>, n: usize) -> Vec<(f32, u32)> {
    let better = |a: (f32, u32), b: (f32, u32)| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).is_gt();
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (token, &lp) in row.iter().enumerate() {
        let c = (lp, token as u32);
        if best.len() == n && !better(c, best[n - 1]) {
            continue;
        }
        let at = best.partition_point(|&b| better(b, c));
        best.insert(at, c);
        best.truncate(n);
    }
    best
}

/// The beam-search state of one batch row.
struct RowSearch {
    max_len: usize,
    /// Live hypotheses: tokens and summed log-probability, in cache-slot order.
    live: Vec<(Vec<u32>, f32)>,
    finished: Vec<Hypothesis>,
}

impl RowSearch {
    fn new(max_len: usize) -> Self {
        RowSearch {
            max_len,
            live: vec![(Vec::new(), 0.0)],
            finished: Vec::new(),
        }
    }

    /// Extends the live hypotheses by one token given their next-token log-probabilities
    /// `[live, vocab]`; returns the new live hypotheses as (source beam, token), empty when the
    /// row is done.
    fn advance(
        &mut self,
        log_probs: ArrayView2<f32>,
        step: usize,
        o: &BeamSearchOptions,
    ) -> Vec<(usize, u32)> {
        let k = o.beam_size;
        let keep = k.saturating_mul(2).min(log_probs.len());
        // The best `keep` extensions of all beams are among each beam's own best `keep` (the
        // order within one beam is the same), so each beam's vocabulary is scanned once for
        // those, and only `beams × keep` candidates are ranked.
        let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(log_probs.nrows() * keep);
        for (beam, row) in log_probs.rows().into_iter().enumerate() {
            let base = self.live[beam].1;
            candidates.extend(
                top_tokens(row, keep)
                    .into_iter()
                    .map(|(lp, token)| (base + lp, beam, token)),
            );
        }
        // Best first; ties to the earlier beam, then the lower token id.
        let order = |a: &(f32, usize, u32), b: &(f32, usize, u32)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        if keep < candidates.len() {
            candidates.select_nth_unstable_by(keep - 1, order);
            candidates.truncate(keep);
        }
        candidates.sort_unstable_by(order);

        let at_limit = step >= self.max_len;
        // At most `keep` candidates survive, however large the beam.
        let mut next_live = Vec::with_capacity(k.min(keep));
        let mut chosen = Vec::with_capacity(k.min(keep));
        let mut extended = 0;
        for (rank, (log_prob, beam, token)) in candidates.into_iter().enumerate() {
            let is_eos = token == o.eos_id;
            // As in fairseq, EOS finishes a hypothesis only from the top `k` candidates.
            if is_eos && rank >= k {
                continue;
            }
            if !is_eos {
                if extended == k {
                    continue;
                }
                extended += 1;
            }
            let mut tokens = self.live[beam].0.clone();
            tokens.push(token);
            if is_eos || at_limit {
                let score = log_prob / length_penalty(tokens.len(), o.length_penalty);
                self.finished.push(Hypothesis {
                    tokens,
                    log_prob,
                    score,
                    finished: is_eos,
                });
            } else {
                next_live.push((tokens, log_prob));
                chosen.push((beam, token));
            }
        }
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.live = next_live;
        if self.live.is_empty() || self.cannot_improve(k, o.length_penalty) {
            self.live.clear();
            return Vec::new();
        }
        chosen
    }

    /// Whether `k` hypotheses are finished and no live one can still score above the k-th.
    fn cannot_improve(&self, k: usize, alpha: f32) -> bool {
        if self.finished.len() < k {
            return false;
        }
        let worst_kept = self.finished[k - 1].score;
        let best_possible = self
            .live
            .iter()
            .map(|(_, lp)| lp / length_penalty(self.max_len, alpha))
            .fold(f32::NEG_INFINITY, f32::max);
        worst_kept >= best_possible
    }

    fn into_best(mut self, n: usize) -> Vec<Hypothesis> {
        self.finished.truncate(n);
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_tokens_are_the_head_of_a_full_sort_ties_to_the_lower_id() {
        // Many ties (values repeat every 7 tokens) and negative infinities.
        let row = Array1::from_shape_fn(50, |t| match t % 7 {
            6 => f32::NEG_INFINITY,
            r => -(r as f32) * 0.5,
        });
        let mut sorted: Vec<(f32, u32)> = row
            .iter()
            .enumerate()
            .map(|(t, &v)| (v, t as u32))
            .collect();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for n in [0, 1, 2, 7, 8, 49, 50, 80] {
            assert_eq!(top_tokens(row.view(), n), sorted[..n.min(50)], "n = {n}");
        }
    }
}
