//! Decoding a corpus: many source sequences of any lengths, batched by length under a token
//! budget, results in input order.
//!
//! A batch is one `[batch, src_len]` array: every row is right-padded to the batch's longest
//! source, and the encoder, the memory's keys and values and every step's cross-attention do
//! the work of the padded positions too. Cut a corpus into batches in its own order and nearly
//! every batch is as long as its longest row: dates of 10 to 29 characters in batches of 256
//! are padded to about 29, twice the mean length. **Sorting by length** puts sequences of
//! (nearly) equal length together, so the padding almost vanishes, and a batch of equal
//! lengths needs no padding mask at all.
//!
//! Once batches are sorted, a fixed row count makes their sizes very unequal: 256 rows of 29
//! tokens are 2.9 times the activations of 256 rows of 10. **A token budget**
//! ([`CorpusOptions::max_batch_tokens`]) bounds the padded size, `rows × longest source`,
//! instead: short sequences go many to a batch, long ones few, and every batch's working set
//! (the encoder's activations, the memory's cached keys and values,
//! `2 · num_decoder_layers · rows · src_len · d_model` floats) stays about the same size, which
//! the caller can fit to the CPU's caches. The budget counts source tokens only; the decoder's
//! steps are bounded by the search's own maximum length.
//!
//! **Several batches at once** ([`CorpusOptions::concurrent_batches`]): a small model's
//! batch is a chain of short products and attention loops that keep the pool's threads only
//! partly busy (each step waits for its slowest piece); with one batch per thread the threads
//! rarely wait. A large model's products already fill the threads, and each batch in flight
//! adds its own working set, so the default is one batch at a time.
//!
//! [`decode_corpus`] does the batching for any search (a closure decodes one batch);
//! [`Transformer::greedy_corpus`] and [`Transformer::beam_search_corpus`] run
//! [`greedy_decode`](Transformer::greedy_decode) and [`beam_search`](Transformer::beam_search)
//! through it. Each sequence's result is that of decoding it alone, up to the last bits of the
//! floating-point sums (different batch shapes may take different kernels).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use ndarray::{s, Array2, ArrayView1, ArrayView2};

use crate::decoding::{BeamSearchOptions, GenerateOptions, GreedyOptions, Hypothesis};
use crate::error::{Error, Result};
use crate::mask::KeyPaddingMask;
use crate::transformer::Transformer;

/// How [`decode_corpus`] cuts a corpus into batches.
///
/// ```
/// use ndtransformer::CorpusOptions;
/// let options = CorpusOptions { max_batch_size: 64, ..CorpusOptions::new(4096, 0) };
/// options.validate()?;
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusOptions {
    /// Largest padded size of a batch, `rows × longest source in the batch`, in tokens (at
    /// least 1). A sequence longer than the budget is decoded in a batch of its own.
    pub max_batch_tokens: usize,
    /// Largest number of rows in a batch (at least 1); `usize::MAX`, the default of
    /// [`CorpusOptions::new`], sets no limit besides the token budget.
    pub max_batch_size: usize,
    /// The id written into padded positions (it must be a valid source id; padded positions
    /// are hidden from attention by the padding mask).
    pub pad_id: u32,
    /// How many batches are decoded at once on the current rayon pool (at least 1; the
    /// default of [`CorpusOptions::new`] is 1). A small model's batch is a chain of small
    /// products that keep two threads only partly busy; decoding one batch per thread fills
    /// them (the dates model of `examples/translate.rs`: 1.7× on 2 threads). Each batch in
    /// flight holds its own working set, so memory grows with this number.
    pub concurrent_batches: usize,
}

impl CorpusOptions {
    /// A budget of `max_batch_tokens` padded tokens per batch, no row limit, padding with
    /// `pad_id`, one batch at a time.
    pub fn new(max_batch_tokens: usize, pad_id: u32) -> Self {
        CorpusOptions {
            max_batch_tokens,
            max_batch_size: usize::MAX,
            pad_id,
            concurrent_batches: 1,
        }
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Decoding`] if `max_batch_tokens`, `max_batch_size` or `concurrent_batches`
    /// is 0.
    pub fn validate(&self) -> Result<()> {
        for (parameter, value) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_batch_size", self.max_batch_size),
            ("concurrent_batches", self.concurrent_batches),
        ] {
            if value == 0 {
                return Err(Error::Decoding {
                    parameter,
                    reason: format!("{parameter} 0 must be at least 1"),
                });
            }
        }
        Ok(())
    }
}

/// How far [`decode_corpus`] has got; passed to its progress callback after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CorpusProgress {
    /// Sequences decoded so far.
    pub sequences_done: usize,
    /// Sequences in the corpus.
    pub sequences_total: usize,
    /// Batches decoded so far.
    pub batches_done: usize,
    /// Batches the corpus is cut into.
    pub batches_total: usize,
    /// Rows of the batch just decoded.
    pub batch_rows: usize,
    /// `src_len` of the batch just decoded: its longest source.
    pub batch_src_len: usize,
}

/// Decodes every sequence of `sources` in batches sorted by length under a token budget;
/// returns one result per sequence, in the order of `sources`.
///
/// The sequences are sorted by length, longest first (stable: equal lengths keep their input
/// order), and cut greedily into batches: a batch takes the next sequences while
/// `rows × longest` stays within [`max_batch_tokens`](CorpusOptions::max_batch_tokens) and
/// `rows` within [`max_batch_size`](CorpusOptions::max_batch_size). Longest first, a batch's
/// first row is its longest, and the largest batches in memory come first, so a budget too
/// large for the machine shows at once. `decode` gets each batch right-padded with
/// [`pad_id`](CorpusOptions::pad_id) and its padding mask (`None` when all its rows are equal
/// in length), and must return one result per row, in row order.
///
/// With [`concurrent_batches`](CorpusOptions::concurrent_batches) above 1, that many batches
/// are decoded at once on the current rayon pool (so `decode` is `Fn + Sync`, and a model's
/// results do not change: they never depend on the thread). `progress` is called after every
/// batch, one call at a time, in the order batches finish; its last call has
/// `sequences_done == sequences_total`.
///
/// # Shapes
/// - `sources`: any number of sequences of any lengths ≥ 1
/// - `decode` gets ids `[batch, src_len]` and a padding mask `[batch, src_len]` (true =
///   padding), returns `batch` results
/// - returns `sources.len()` results
///
/// # Errors
/// [`Error::Decoding`] for an invalid option ([`CorpusOptions::validate`]) or if `decode`
/// returns the wrong number of results; [`Error::Empty`] naming the index of an empty source
/// sequence (checked before anything is decoded); the errors of `decode`, where an
/// [`Error::TokenOutOfRange`]'s `batch` is rewritten from the row of the batch to the index
/// of the sequence in `sources`. After an error no new batch is started, and the error of the
/// first failing batch (in sorted order) is returned, however many run at once. An empty
/// corpus gives an empty `Vec`.
///
/// ```
/// use ndtransformer::{decode_corpus, CorpusOptions};
/// let sources = [vec![7u32, 8, 9], vec![4], vec![5, 6]];
/// // A stand-in for a search: each row's real tokens, reversed.
/// let reversed = decode_corpus(&sources, &CorpusOptions::new(4, 0), |src, padding| {
///     let lengths = padding.map_or(vec![src.ncols(); src.nrows()], |p| p.lengths());
///     Ok(src.rows().into_iter().zip(lengths)
///         .map(|(row, len)| row.iter().take(len).rev().copied().collect::<Vec<u32>>())
///         .collect())
/// }, |p| println!("{}/{} sequences", p.sequences_done, p.sequences_total))?;
/// assert_eq!(reversed, [vec![9, 8, 7], vec![4], vec![6, 5]]);
/// # Ok::<(), ndtransformer::Error>(())
/// ```
pub fn decode_corpus<S: AsRef<[u32]> + Sync, T: Send>(
    sources: &[S],
    options: &CorpusOptions,
    decode: impl Fn(ArrayView2<u32>, Option<&KeyPaddingMask>) -> Result<Vec<T>> + Sync,
    progress: impl FnMut(CorpusProgress) + Send,
) -> Result<Vec<T>> {
    options.validate()?;
    let lengths: Vec<usize> = sources.iter().map(|s| s.as_ref().len()).collect();
    if let Some(index) = lengths.iter().position(|&len| len == 0) {
        return Err(Error::Empty {
            what: format!("source sequence {index} of the corpus"),
            shape: vec![0],
        });
    }
    let plan = Plan::new(&lengths, options);
    let decode_batch = |b: usize| -> Result<(Vec<T>, usize)> {
        let rows = &plan.order[plan.batches[b].clone()];
        let (ids, padding) = pad_batch(sources, &lengths, rows, options.pad_id)?;
        let outputs = decode(ids.view(), padding.as_ref()).map_err(|e| match e {
            Error::TokenOutOfRange {
                id,
                vocab,
                batch,
                position,
            } if batch < rows.len() => Error::TokenOutOfRange {
                id,
                vocab,
                batch: rows[batch],
                position,
            },
            e => e,
        })?;
        if outputs.len() != rows.len() {
            return Err(Error::Decoding {
                parameter: "decode",
                reason: format!(
                    "decode returned {} results for a batch of {} sequences",
                    outputs.len(),
                    rows.len()
                ),
            });
        }
        Ok((outputs, ids.ncols()))
    };
    let state = Mutex::new(Collected {
        results: std::iter::repeat_with(|| None)
            .take(sources.len())
            .collect(),
        sequences_done: 0,
        batches_done: 0,
        first_error: None,
        progress,
    });
    let next_batch = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Each worker takes the next batch until none is left or one has failed.
    let work = || {
        while !failed.load(Ordering::Acquire) {
            let b = next_batch.fetch_add(1, Ordering::Relaxed);
            if b >= plan.batches.len() {
                break;
            }
            let outcome = decode_batch(b);
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Ok((outputs, src_len)) => {
                    let rows = &plan.order[plan.batches[b].clone()];
                    state.store(rows, outputs);
                    let report = CorpusProgress {
                        sequences_done: state.sequences_done,
                        sequences_total: sources.len(),
                        batches_done: state.batches_done,
                        batches_total: plan.batches.len(),
                        batch_rows: rows.len(),
                        batch_src_len: src_len,
                    };
                    (state.progress)(report);
                }
                Err(e) => {
                    failed.store(true, Ordering::Release);
                    // Batches start in order, so the first failing one has always run.
                    if state
                        .first_error
                        .as_ref()
                        .is_none_or(|&(first, _)| b < first)
                    {
                        state.first_error = Some((b, e));
                    }
                }
            }
        }
    };
    let workers = options.concurrent_batches.min(plan.batches.len());
    if workers <= 1 {
        work();
    } else {
        rayon::scope(|scope| {
            for _ in 1..workers {
                scope.spawn(|_| work());
            }
            work();
        });
    }
    let state = state.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, e)) = state.first_error {
        return Err(e);
    }
    debug_assert!(state.results.iter().all(Option::is_some));
    Ok(state.results.into_iter().flatten().collect())
}

/// What the batches of [`decode_corpus`] have given so far.
struct Collected<T, P> {
    /// One slot per source, filled when its batch is decoded.
    results: Vec<Option<T>>,
    sequences_done: usize,
    batches_done: usize,
    /// The failing batch with the lowest index, and its error.
    first_error: Option<(usize, Error)>,
    progress: P,
}

impl<T, P> Collected<T, P> {
    /// Puts one batch's outputs at its rows' indices.
    fn store(&mut self, rows: &[usize], outputs: Vec<T>) {
        for (&index, output) in rows.iter().zip(outputs) {
            self.results[index] = Some(output);
        }
        self.sequences_done += rows.len();
        self.batches_done += 1;
    }
}

/// The batches of a corpus: its indices sorted by length, and each batch's range of them.
#[derive(Debug)]
struct Plan {
    /// Indices into the corpus, longest sequence first, equal lengths in input order.
    order: Vec<usize>,
    /// Consecutive ranges of `order` covering it, one per batch.
    batches: Vec<std::ops::Range<usize>>,
}

impl Plan {
    fn new(lengths: &[usize], options: &CorpusOptions) -> Plan {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let mut batches = Vec::new();
        let mut start = 0;
        while start < order.len() {
            // The first row is the longest, so `rows × longest` is the batch's padded size.
            let longest = lengths[order[start]];
            let rows = (options.max_batch_tokens / longest)
                .clamp(1, options.max_batch_size)
                .min(order.len() - start);
            batches.push(start..start + rows);
            start += rows;
        }
        Plan { order, batches }
    }
}

/// The sequences `rows` of `sources`, right-padded with `pad_id` into `[batch, src_len]`, and
/// their padding mask unless all are equally long.
fn pad_batch<S: AsRef<[u32]>>(
    sources: &[S],
    lengths: &[usize],
    rows: &[usize],
    pad_id: u32,
) -> Result<(Array2<u32>, Option<KeyPaddingMask>)> {
    let row_lengths: Vec<usize> = rows.iter().map(|&i| lengths[i]).collect();
    let src_len = row_lengths.iter().copied().max().unwrap_or(0);
    let mut ids = Array2::from_elem((rows.len(), src_len), pad_id);
    for (mut row, &i) in ids.rows_mut().into_iter().zip(rows) {
        let source = sources[i].as_ref();
        row.slice_mut(s![..source.len()])
            .assign(&ArrayView1::from(source));
    }
    let padding = if row_lengths.iter().all(|&len| len == src_len) {
        None
    } else {
        Some(KeyPaddingMask::from_lengths(&row_lengths, src_len)?)
    };
    Ok((ids, padding))
}

impl Transformer {
    /// [`greedy_decode`](Self::greedy_decode) of every sequence of `sources`, in batches
    /// sorted by length under a token budget ([`decode_corpus`]); results in input order.
    ///
    /// # Shapes
    /// - `sources`: any number of source sequences of any lengths ≥ 1; each batch is
    ///   `[batch, src_len]`, right-padded with `corpus.pad_id`
    /// - returns `sources.len()` token lists, each without BOS and ending with EOS if one was
    ///   produced
    ///
    /// # Errors
    /// [`Error::Decoding`] for a `pad_id` outside the source vocabulary or the errors of
    /// [`decode_corpus`] and [`greedy_decode`](Self::greedy_decode) (which checks `options` on
    /// the first batch).
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{CorpusOptions, GreedyOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let sources = [vec![5u32, 6, 7], vec![8], vec![9, 10, 11, 12]];
    /// let options = GreedyOptions { bos_id: 1, eos_id: Some(2), max_len: 10 };
    /// let outputs = model.greedy_corpus(&sources, &CorpusOptions::new(8, 0), &options, |_| {})?;
    /// let alone = model.greedy_decode(ndarray::aview2(&[[8u32]]), None, &options)?;
    /// assert_eq!(outputs[1], alone[0]);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn greedy_corpus<S: AsRef<[u32]> + Sync>(
        &self,
        sources: &[S],
        corpus: &CorpusOptions,
        options: &GreedyOptions,
        progress: impl FnMut(CorpusProgress) + Send,
    ) -> Result<Vec<Vec<u32>>> {
        self.check_pad_id(corpus.pad_id)?;
        decode_corpus(
            sources,
            corpus,
            |src, padding| self.greedy_decode(src, padding, options),
            progress,
        )
    }

    /// [`beam_search`](Self::beam_search) of every sequence of `sources`, in batches sorted by
    /// length under a token budget ([`decode_corpus`]); results in input order.
    ///
    /// # Shapes
    /// - `sources`: any number of source sequences of any lengths ≥ 1; each batch is
    ///   `[batch, src_len]`, right-padded with `corpus.pad_id`
    /// - returns `sources.len()` lists of up to `num_return` hypotheses, best first
    ///
    /// # Errors
    /// [`Error::Decoding`] for a `pad_id` outside the source vocabulary or the errors of
    /// [`decode_corpus`] and [`beam_search`](Self::beam_search) (which checks `options` on the
    /// first batch).
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{BeamSearchOptions, CorpusOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let sources = [vec![5u32, 6, 7], vec![8], vec![9, 10, 11, 12]];
    /// let options = BeamSearchOptions { num_return: 2, ..BeamSearchOptions::paper(1, 2) };
    /// let best = model.beam_search_corpus(&sources, &CorpusOptions::new(8, 0), &options, |p| {
    ///     eprintln!("batch {}/{}", p.batches_done, p.batches_total)
    /// })?;
    /// assert_eq!(best.len(), 3);
    /// assert!(best.iter().all(|hypotheses| hypotheses.len() == 2));
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn beam_search_corpus<S: AsRef<[u32]> + Sync>(
        &self,
        sources: &[S],
        corpus: &CorpusOptions,
        options: &BeamSearchOptions,
        progress: impl FnMut(CorpusProgress) + Send,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        self.check_pad_id(corpus.pad_id)?;
        decode_corpus(
            sources,
            corpus,
            |src, padding| self.beam_search(src, padding, options),
            progress,
        )
    }

    /// [`generate`](Self::generate) of every sequence of `sources` with every control of
    /// [`GenerateOptions`] (a checkpoint's own settings, for example
    /// [`MarianCheckpoint::generation`](crate::marian::MarianCheckpoint)), in batches sorted by
    /// length under a token budget ([`decode_corpus`]); results in input order.
    ///
    /// # Shapes
    /// As [`beam_search_corpus`](Self::beam_search_corpus).
    ///
    /// # Errors
    /// As [`beam_search_corpus`](Self::beam_search_corpus) with [`generate`](Self::generate)'s
    /// checks, and [`Error::Decoding`] for a forced `prefix`, which names batch rows that a
    /// corpus reorders (decode those sequences with [`generate`](Self::generate)).
    pub fn generate_corpus<S: AsRef<[u32]> + Sync>(
        &self,
        sources: &[S],
        corpus: &CorpusOptions,
        options: &GenerateOptions,
        progress: impl FnMut(CorpusProgress) + Send,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        self.check_pad_id(corpus.pad_id)?;
        if !options.prefix.is_empty() {
            return Err(Error::Decoding {
                parameter: "prefix",
                reason: format!(
                    "prefix holds {} rows, but a corpus reorders its sequences into batches; \
                     decode prefixed sequences with generate",
                    options.prefix.len()
                ),
            });
        }
        decode_corpus(
            sources,
            corpus,
            |src, padding| self.generate(src, padding, options),
            progress,
        )
    }

    fn check_pad_id(&self, pad_id: u32) -> Result<()> {
        let vocab = self.config().src_vocab;
        if pad_id as usize >= vocab {
            return Err(Error::Decoding {
                parameter: "pad_id",
                reason: format!("pad_id {pad_id} is outside the source vocabulary of size {vocab}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in search: each row's real tokens, read back through the padding mask, with
    /// the padded tail checked to hold `pad_id`.
    fn echo(src: ArrayView2<u32>, padding: Option<&KeyPaddingMask>, pad_id: u32) -> Vec<Vec<u32>> {
        let lengths = padding.map_or(vec![src.ncols(); src.nrows()], |p| p.lengths());
        src.rows()
            .into_iter()
            .zip(lengths)
            .map(|(row, len)| {
                assert!(row.iter().skip(len).all(|&id| id == pad_id));
                row.iter().take(len).copied().collect()
            })
            .collect()
    }

    /// Pseudo-random lengths in `1..=max` (a fixed linear congruential sequence).
    fn lengths(n: usize, max: usize) -> Vec<usize> {
        let mut x = 12345u64;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (x >> 33) as usize % max
            })
            .collect()
    }

    fn corpus(lengths: &[usize]) -> Vec<Vec<u32>> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|j| (i * 31 + j) as u32 % 97 + 1).collect())
            .collect()
    }

    #[test]
    fn every_index_exactly_once_within_the_budget() {
        let lens = lengths(500, 30);
        for (budget, max_rows) in [
            (1, usize::MAX),
            (29, usize::MAX),
            (64, 3),
            (256, usize::MAX),
            (100_000, 7),
        ] {
            let options = CorpusOptions {
                max_batch_size: max_rows,
                ..CorpusOptions::new(budget, 0)
            };
            let plan = Plan::new(&lens, &options);
            let mut seen = vec![0; lens.len()];
            let mut next = 0;
            for range in &plan.batches {
                assert_eq!(range.start, next, "batches are consecutive");
                assert!(!range.is_empty());
                next = range.end;
                let rows = &plan.order[range.clone()];
                let longest = rows.iter().map(|&i| lens[i]).max().unwrap();
                assert!(rows.len() <= max_rows);
                assert!(
                    rows.len() * longest <= budget || rows.len() == 1,
                    "budget {budget}: {} rows × {longest}",
                    rows.len()
                );
                for &i in rows {
                    seen[i] += 1;
                }
            }
            assert_eq!(next, lens.len());
            assert!(seen.iter().all(|&n| n == 1), "budget {budget}");
            // Longest first, ties in input order.
            for w in plan.order.windows(2) {
                assert!(lens[w[0]] > lens[w[1]] || (lens[w[0]] == lens[w[1]] && w[0] < w[1]));
            }
        }
    }

    #[test]
    fn batches_are_filled_greedily() {
        // Sorted: 5, 4, 4, 3, 2, 1, 1 → budget 10: [5, 4] (2 × 5), [4, 3] (2 × 4), [2, 1, 1, …].
        let lens = [1, 4, 5, 2, 4, 3, 1];
        let plan = Plan::new(&lens, &CorpusOptions::new(10, 0));
        let batches: Vec<Vec<usize>> = plan
            .batches
            .iter()
            .map(|r| plan.order[r.clone()].iter().map(|&i| lens[i]).collect())
            .collect();
        assert_eq!(batches, [vec![5, 4], vec![4, 3], vec![2, 1, 1]]);
    }

    #[test]
    fn a_sequence_longer_than_the_budget_goes_alone() {
        let lens = [3, 12, 2, 9, 3];
        let plan = Plan::new(&lens, &CorpusOptions::new(8, 0));
        let batches: Vec<Vec<usize>> = plan
            .batches
            .iter()
            .map(|r| plan.order[r.clone()].to_vec())
            .collect();
        // 12 and 9 exceed 8 and go alone; then 3, 3, 2 → 2 × 3 = 6 ≤ 8, 3 × 3 = 9 > 8.
        assert_eq!(batches, [vec![1], vec![3], vec![0, 4], vec![2]]);
    }

    #[test]
    fn results_come_back_in_input_order_with_progress() {
        let lens = lengths(300, 30);
        let sources = corpus(&lens);
        for budget in [1, 20, 97, 1000, usize::MAX] {
            let pad_id = 1000;
            let options = CorpusOptions::new(budget, pad_id);
            let mut calls = Vec::new();
            let out = decode_corpus(
                &sources,
                &options,
                |src, padding| {
                    if let Some(p) = padding {
                        // A mask only when the lengths differ.
                        let l = p.lengths();
                        assert!(l.iter().any(|&len| len != l[0]));
                    }
                    Ok(echo(src, padding, pad_id))
                },
                |p| calls.push(p),
            )
            .unwrap();
            assert_eq!(out, sources, "budget {budget}");
            let last = calls.last().unwrap();
            assert_eq!(last.sequences_done, 300);
            assert_eq!(last.sequences_total, 300);
            assert_eq!(last.batches_done, last.batches_total);
            assert_eq!(calls.len(), last.batches_total);
            assert_eq!(calls.iter().map(|p| p.batch_rows).sum::<usize>(), 300);
            assert!(calls
                .windows(2)
                .all(|w| w[0].batch_src_len >= w[1].batch_src_len));
        }
    }

    #[test]
    fn concurrent_batches_give_the_same_results_and_progress() {
        let lens = lengths(300, 30);
        let sources = corpus(&lens);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for concurrent_batches in [1, 2, 3, 8] {
            let options = CorpusOptions {
                concurrent_batches,
                ..CorpusOptions::new(64, 0)
            };
            let mut calls = Vec::new();
            let out = pool
                .install(|| {
                    decode_corpus(
                        &sources,
                        &options,
                        |src, p| Ok(echo(src, p, 0)),
                        |p| calls.push(p),
                    )
                })
                .unwrap();
            assert_eq!(out, sources, "{concurrent_batches} at once");
            // Counts grow by one batch a call, whatever order the batches finish in.
            for (k, p) in calls.iter().enumerate() {
                assert_eq!(p.batches_done, k + 1);
            }
            let done: Vec<usize> = calls.iter().map(|p| p.sequences_done).collect();
            assert!(done.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(*done.last().unwrap(), sources.len());
        }
    }

    #[test]
    fn the_first_failing_batch_gives_the_error_however_many_run_at_once() {
        let lens = lengths(300, 30);
        let sources = corpus(&lens);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        for concurrent_batches in [1, 2, 4] {
            let options = CorpusOptions {
                concurrent_batches,
                ..CorpusOptions::new(40, 0)
            };
            // Batches of source length 20 and below fail, each naming its length.
            let e = pool
                .install(|| {
                    decode_corpus(
                        &sources,
                        &options,
                        |src, p| -> Result<Vec<Vec<u32>>> {
                            if src.ncols() <= 20 {
                                return Err(Error::Decoding {
                                    parameter: "test",
                                    reason: format!("src_len {}", src.ncols()),
                                });
                            }
                            Ok(echo(src, p, 0))
                        },
                        |_| {},
                    )
                })
                .unwrap_err();
            assert!(
                e.to_string().ends_with("src_len 20"),
                "{concurrent_batches}: {e}"
            );
        }
    }

    #[test]
    fn an_empty_corpus_gives_nothing_and_calls_nothing() {
        let sources: [Vec<u32>; 0] = [];
        let out: Vec<u32> = decode_corpus(
            &sources,
            &CorpusOptions::new(10, 0),
            |_, _| panic!("no batch to decode"),
            |_| panic!("no progress to report"),
        )
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn invalid_input_is_an_error_naming_the_value() {
        let sources = [vec![3u32, 4], vec![], vec![5]];
        let run = |sources: &[Vec<u32>], options: &CorpusOptions| {
            decode_corpus(sources, options, |src, p| Ok(echo(src, p, 0)), |_| {})
        };
        let e = run(&sources, &CorpusOptions::new(10, 0)).unwrap_err();
        assert!(matches!(e, Error::Empty { .. }), "{e}");
        assert!(e.to_string().contains("source sequence 1 "), "{e}");

        let e = run(&sources[..1], &CorpusOptions::new(0, 0)).unwrap_err();
        assert!(
            e.to_string()
                .contains("max_batch_tokens 0 must be at least 1"),
            "{e}"
        );
        let options = CorpusOptions {
            max_batch_size: 0,
            ..CorpusOptions::new(10, 0)
        };
        let e = run(&sources[..1], &options).unwrap_err();
        assert!(
            e.to_string()
                .contains("max_batch_size 0 must be at least 1"),
            "{e}"
        );
        // Options are checked even when there is nothing to decode.
        assert!(run(&[], &options).is_err());

        let e = decode_corpus(
            &sources[..1],
            &CorpusOptions::new(10, 0),
            |_, _| Ok(vec![1, 2]),
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("decode returned 2 results for a batch of 1 sequences"),
            "{e}"
        );
    }

    #[test]
    fn a_token_error_names_the_corpus_index() {
        // Sorted longest first, the sequence at index 2 is batch row 0.
        let sources = [vec![3u32], vec![4, 5], vec![6, 99, 7]];
        let e = decode_corpus(
            &sources,
            &CorpusOptions::new(100, 0),
            |src, _| -> Result<Vec<()>> {
                let (batch, position) = src
                    .indexed_iter()
                    .find(|(_, &id)| id == 99)
                    .map(|(at, _)| at)
                    .unwrap();
                Err(Error::TokenOutOfRange {
                    id: 99,
                    vocab: 50,
                    batch,
                    position,
                })
            },
            |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TokenOutOfRange {
                    batch: 2,
                    position: 1,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
