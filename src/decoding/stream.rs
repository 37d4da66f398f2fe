//! Token by token: greedy decoding and sampling as an iterator over the steps.
//!
//! A [`TokenStream`] owns the decoder cache and yields, at each step, the token every
//! unfinished row has just chosen, so a caller can print text while it is made and stop by
//! dropping the stream. [`Transformer::generate`] (beam size 1) and [`Transformer::sample`] run
//! the same stream to its end, so both return exactly the streamed tokens.

use ndarray::{Array1, Array3, ArrayViewMut2};
use rand::Rng;

use super::rules::LogitRules;
use super::sampling::Sampling;
use super::{GenerateOptions, Hypothesis};
use crate::attention::DecoderCache;
use crate::error::Result;
use crate::mask::KeyPaddingMask;
use crate::ops;
use crate::transformer::Transformer;

/// One token a row chose at one step of a [`TokenStream`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamedToken {
    /// The batch row.
    pub row: usize,
    /// The token, appended to the row's output.
    pub token: u32,
    /// Its log-probability after the logit rules (before temperature, top-k and top-p).
    pub log_prob: f32,
    /// Whether the row's output ends here (EOS, or its maximum length).
    pub is_last: bool,
}

/// The per-row state of a stream.
struct Row {
    /// BOS, then the generated tokens.
    context: Vec<u32>,
    token_log_probs: Vec<f32>,
    max_len: usize,
    /// Whether the output ended with a chosen (not forced) EOS.
    ended_by_eos: bool,
}

/// Greedy decoding or sampling, one step per [`next`](Iterator::next); see
/// [`Transformer::stream`] and [`Transformer::stream_sampled`].
///
/// Each item is the tokens chosen at one step, one per row still generating, in row order.
/// The stream ends (`None`) once every row has finished; an error ends it too.
pub struct TokenStream<'a> {
    model: &'a Transformer,
    options: GenerateOptions,
    sampler: Option<(Sampling, &'a mut (dyn Rng + Send))>,
    /// `None` once every row has finished (or a step failed).
    cache: Option<DecoderCache>,
    rows: Vec<Row>,
    /// Batch rows still generating, in cache order.
    active: Vec<usize>,
    last: Array1<u32>,
    /// The memory and its padding, kept only when alignments are asked for.
    memory: Option<(Array3<f32>, Option<KeyPaddingMask>)>,
    /// The logits buffer every step writes into.
    logits: Vec<f32>,
}

impl<'a> TokenStream<'a> {
    pub(crate) fn new(
        model: &'a Transformer,
        options: GenerateOptions,
        sampler: Option<(Sampling, &'a mut (dyn Rng + Send))>,
        cache: DecoderCache,
        max_lens: Vec<usize>,
        memory: Option<(Array3<f32>, Option<KeyPaddingMask>)>,
    ) -> Self {
        let batch = max_lens.len();
        let rows = max_lens
            .into_iter()
            .map(|max_len| Row {
                context: Self::start(options.bos_id, max_len),
                token_log_probs: Vec::with_capacity(max_len),
                max_len,
                ended_by_eos: false,
            })
            .collect();
        TokenStream {
            model,
            last: Array1::from_elem(batch, options.bos_id),
            options,
            sampler,
            cache: Some(cache),
            rows,
            active: (0..batch).collect(),
            memory,
            logits: Vec::new(),
        }
    }

    fn start(bos_id: u32, max_len: usize) -> Vec<u32> {
        let mut context = Vec::with_capacity(max_len + 1);
        context.push(bos_id);
        context
    }

    /// The tokens row `row` has generated so far (without BOS).
    ///
    /// # Panics
    /// If `row` is not below the batch size.
    pub fn tokens(&self, row: usize) -> &[u32] {
        &self.rows[row].context[1..]
    }

    /// Whether every row has finished.
    pub fn is_done(&self) -> bool {
        self.cache.is_none()
    }

    /// Runs the remaining steps and returns one hypothesis per batch row (its `score` is its
    /// `log_prob`: greedy decoding and sampling have no length penalty).
    ///
    /// # Errors
    /// The errors of [`Transformer::decode_step`].
    pub fn finish(mut self) -> Result<Vec<Hypothesis>> {
        while self.cache.is_some() {
            self.step()?;
        }
        let mut hyps: Vec<Vec<Hypothesis>> = self
            .rows
            .into_iter()
            .map(|r| {
                let log_prob = r.token_log_probs.iter().sum();
                let tokens = r.context[1..].to_vec();
                vec![Hypothesis {
                    tokens,
                    log_prob,
                    score: log_prob,
                    token_log_probs: r.token_log_probs,
                    finished: r.ended_by_eos,
                    alignment: None,
                }]
            })
            .collect();
        if let (Some(layer), Some((memory, padding))) = (self.options.alignment_layer, self.memory)
        {
            self.model.attach_alignments(
                memory.view(),
                padding.as_ref(),
                &mut hyps,
                self.options.bos_id,
                layer,
            )?;
        }
        Ok(hyps.into_iter().flatten().collect())
    }

    /// One decoding step for every active row.
    fn step(&mut self) -> Result<Vec<StreamedToken>> {
        let Some(cache) = self.cache.as_mut() else {
            return Ok(Vec::new());
        };
        let vocab = self.model.config().tgt_vocab;
        self.logits.resize(self.active.len() * vocab, 0.0);
        let mut logits =
            ArrayViewMut2::from_shape((self.active.len(), vocab), &mut self.logits[..])
                .expect("buffer sized for the active rows");
        if let Err(e) = self
            .model
            .decode_step_into(self.last.view(), cache, logits.view_mut())
        {
            self.cache = None;
            return Err(e);
        }
        let rules = LogitRules::new(&self.options);
        let mut chosen = Vec::with_capacity(self.active.len());
        let mut keep = Vec::with_capacity(self.active.len());
        for (slot, (&row, mut logits)) in self.active.iter().zip(logits.rows_mut()).enumerate() {
            let logits = logits.as_slice_mut().expect("logits in standard layout");
            let state = &mut self.rows[row];
            let generated = state.context.len() - 1;
            let forced = self
                .options
                .prefix
                .get(row)
                .and_then(|p| p.get(generated))
                .copied();
            if !rules.is_empty() {
                rules.apply(logits, &state.context, state.max_len);
            }
            let token = match (forced, self.sampler.as_mut()) {
                (Some(token), _) => token,
                (None, None) => ops::argmax_slice(logits) as u32,
                (None, Some((sampling, rng))) => sampling.draw(logits, &mut **rng),
            };
            let log_prob = logits[token as usize] - ops::log_sum_exp(logits);
            state.context.push(token);
            state.token_log_probs.push(log_prob);
            // A forced token never ends the output, even if it is EOS.
            state.ended_by_eos = forced.is_none() && Some(token) == self.options.eos_id;
            let is_last = state.ended_by_eos || generated + 1 >= state.max_len;
            if !is_last {
                keep.push(slot);
            }
            chosen.push(StreamedToken {
                row,
                token,
                log_prob,
                is_last,
            });
        }
        if keep.is_empty() {
            self.cache = None;
        } else {
            if keep.len() < self.active.len() {
                cache.select_rows(&keep)?;
            }
            self.last = keep.iter().map(|&slot| chosen[slot].token).collect();
            self.active = keep.iter().map(|&slot| self.active[slot]).collect();
        }
        Ok(chosen)
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<Vec<StreamedToken>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.cache.as_ref()?;
        Some(self.step())
    }
}
