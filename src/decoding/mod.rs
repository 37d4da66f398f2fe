//! Generating output sequences: greedy decoding, sampling and beam search (§6.1), on the KV
//! cache.
//!
//! The decoder is auto-regressive: each token is predicted from the source and the tokens
//! before it. Every search runs the encoder once, keeps a [`DecoderCache`](crate::DecoderCache),
//! and feeds one token per batch row (or beam) per step. Rows (or beams) that are finished are
//! dropped from the cache, so they stop costing work.
//!
//! - [`GenerateOptions`] holds every control: lengths, beam size, length penalty, the logit
//!   rules of [`rules`] and forced prefixes; [`GreedyOptions`] and [`BeamSearchOptions`] are
//!   the short forms of the two plain searches.
//! - [`beam`]: the per-row search state and ranking; [`sampling`]: temperature, top-k, top-p;
//!   [`stream`]: greedy decoding and sampling one step at a time.

mod beam;
mod rules;
mod sampling;
mod stream;

use ndarray::{Array1, Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
use rand::Rng;

use self::beam::{RowSearch, StepRule};
use self::rules::LogitRules;
pub use self::sampling::Sampling;
pub use self::stream::{StreamedToken, TokenStream};
use crate::attention::DecoderCache;
use crate::error::{Error, Result};
use crate::mask::{KeyPaddingMask, Mask};
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
    /// Each token's log-probability, `log p(y_t | y_<t, x)` after the logit rules.
    pub token_log_probs: Vec<f32>,
    /// Whether it ended with EOS (otherwise it reached the maximum length).
    pub finished: bool,
    /// With [`GenerateOptions::alignment_layer`]: that layer's cross-attention averaged over
    /// heads, `[tokens, src_len]`, row `t` the weights over the source when token `t` was chosen.
    pub alignment: Option<Array2<f32>>,
}

/// `lp(Y) = ((5 + |Y|) / 6)^α`.
pub fn length_penalty(len: usize, alpha: f32) -> f32 {
    ((5.0 + len as f32) / 6.0).powf(alpha)
}

/// How beam search ranks hypotheses of different lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LengthPenalty {
    /// `log_prob / ((5 + |Y|) / 6)^α` (Wu et al. 2016; the paper, §6.1, uses α = 0.6).
    /// α = 0 ranks by log-probability alone.
    Wu(f32),
    /// `log_prob / |Y|^α`, the convention of Hugging Face `generate()` (its
    /// `length_penalty`, 1 by default), with its stopping rule: a row is done once it has
    /// `beam_size` finished hypotheses and the best live one, scored at its current length,
    /// does not beat the worst (`early_stopping=False`); at the maximum length the step's top
    /// `beam_size` candidates end the search. Reproduces `generate(num_beams=…)` token for
    /// token.
    HuggingFace(f32),
}

impl LengthPenalty {
    /// The score of a hypothesis of `len` tokens with summed log-probability `log_prob`.
    pub fn score(self, log_prob: f32, len: usize) -> f32 {
        match self {
            LengthPenalty::Wu(alpha) => log_prob / length_penalty(len, alpha),
            // The divisor rounded from f64, as Python's `len ** α` is.
            LengthPenalty::HuggingFace(alpha) => {
                log_prob / (len as f64).powf(f64::from(alpha)) as f32
            }
        }
    }

    fn alpha(self) -> f32 {
        match self {
            LengthPenalty::Wu(a) | LengthPenalty::HuggingFace(a) => a,
        }
    }
}

/// Every control of [`Transformer::generate`], [`Transformer::sample`] and the streams, in one
/// place; [`greedy`](Self::greedy) and [`beam`](Self::beam) give the plain settings, to which
/// a caller adds what it needs with `..`.
///
/// ```
/// use ndtransformer::{GenerateOptions, MaxLength};
/// let options = GenerateOptions {
///     min_len: 3,
///     no_repeat_ngram_size: 3,
///     repetition_penalty: 1.2,
///     max_len: MaxLength::SourcePlus(20),
///     ..GenerateOptions::beam(1, 2, 4)
/// };
/// assert_eq!(options.beam_size, 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The token every output starts from (not included in the result).
    pub bos_id: u32,
    /// The token that ends an output (included in the result); `None` runs to `max_len`.
    pub eos_id: Option<u32>,
    /// Largest number of generated tokens, EOS and a forced prefix included.
    pub max_len: MaxLength,
    /// EOS is forbidden until an output has this many tokens (a forced prefix included).
    pub min_len: usize,
    /// Hypotheses kept per row; 1 is greedy decoding.
    pub beam_size: usize,
    /// Hypotheses returned per row, best first (1 to `beam_size`).
    pub num_return: usize,
    /// How beam search ranks hypotheses of different lengths (ignored at beam size 1).
    pub length_penalty: LengthPenalty,
    /// CTRL's repetition penalty θ (Keskar et al. 2019): every token already in the output
    /// (BOS included) has its logit divided by θ if positive, multiplied if negative; 1 is off.
    pub repetition_penalty: f32,
    /// No n-gram of this size occurs twice in an output (BOS counted as its first token,
    /// as `transformers` does); 0 is off.
    pub no_repeat_ngram_size: usize,
    /// Tokens never generated.
    pub suppress_tokens: Vec<u32>,
    /// Empty, or one forced target prefix per batch row: a row's output starts with its prefix
    /// verbatim (each token scored by the model) and decoding continues after it.
    pub prefix: Vec<Vec<u32>>,
    /// On request, each returned hypothesis's alignment: this decoder layer's
    /// cross-attention, averaged over heads, `[tokens, src_len]`.
    pub alignment_layer: Option<usize>,
    /// An output that reaches its maximum length ends with EOS: the last token it may
    /// generate can only be EOS (`transformers`' `forced_eos_token_id`, which Marian sets).
    /// Needs `eos_id`.
    pub forced_eos: bool,
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_len` tokens, no other control.
    pub fn greedy(bos_id: u32, eos_id: Option<u32>, max_len: usize) -> Self {
        GenerateOptions {
            bos_id,
            eos_id,
            max_len: MaxLength::Fixed(max_len),
            min_len: 0,
            beam_size: 1,
            num_return: 1,
            length_penalty: LengthPenalty::Wu(0.0),
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            suppress_tokens: Vec::new(),
            prefix: Vec::new(),
            alignment_layer: None,
            forced_eos: false,
        }
    }

    /// Beam search with the paper's other settings (§6.1): α = 0.6 (Wu), maximum length =
    /// source length + 50, the best hypothesis returned.
    pub fn beam(bos_id: u32, eos_id: u32, beam_size: usize) -> Self {
        GenerateOptions {
            max_len: MaxLength::SourcePlus(50),
            beam_size,
            length_penalty: LengthPenalty::Wu(0.6),
            ..GenerateOptions::greedy(bos_id, Some(eos_id), 0)
        }
    }
}

impl From<&GreedyOptions> for GenerateOptions {
    fn from(o: &GreedyOptions) -> Self {
        GenerateOptions::greedy(o.bos_id, o.eos_id, o.max_len)
    }
}

impl From<&BeamSearchOptions> for GenerateOptions {
    fn from(o: &BeamSearchOptions) -> Self {
        GenerateOptions {
            max_len: o.max_len,
            num_return: o.num_return,
            length_penalty: LengthPenalty::Wu(o.length_penalty),
            ..GenerateOptions::beam(o.bos_id, o.eos_id, o.beam_size)
        }
    }
}

impl Transformer {
    /// Greedy decoding: at every step the most probable next token (ties: lowest id).
    ///
    /// Each batch row stops at its own EOS; finished rows leave the cache. The short form of
    /// [`generate`](Self::generate) at beam size 1, returning only the tokens.
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
        let hyps = self.generate(src, src_padding, &options.into())?;
        Ok(hyps
            .into_iter()
            .map(|mut row| row.swap_remove(0).tokens)
            .collect())
    }

    /// Beam search (§6.1) with the length penalty of Wu et al. (2016): the short form of
    /// [`generate`](Self::generate).
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    /// - returns `batch` lists of up to `num_return` hypotheses, best first
    ///
    /// # Errors
    /// As [`generate`](Self::generate).
    pub fn beam_search(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &BeamSearchOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        self.generate(src, src_padding, &options.into())
    }

    /// Generates an output for every source row: greedy decoding at beam size 1, beam search
    /// (§6.1) above, with the controls of [`GenerateOptions`].
    ///
    /// Greedy decoding takes the most probable token at every step (ties: lowest id); each row
    /// stops at its own EOS and leaves the cache.
    ///
    /// Beam search keeps `beam_size` partial hypotheses per row; every step extends each by
    /// every token and ranks the extensions by log-probability. Of the best `2·beam_size`, an
    /// extension by EOS among the top `beam_size` becomes a finished hypothesis, scored by the
    /// length penalty; the best `beam_size` others stay live. A row stops early once it has
    /// `beam_size` finished hypotheses and no live one can still beat the worst of them.
    /// Hypotheses still live at the maximum length are returned unfinished. Ties go to the
    /// earlier beam, then the lower id. The beams of a row share its memory's cross-attention
    /// keys and values; finished rows leave the cache.
    ///
    /// The logit rules (minimum length, suppressed tokens, repetition penalty, no-repeat
    /// n-grams) apply to each hypothesis's logits before its log-softmax, as in CTranslate2.
    /// Every returned hypothesis carries its tokens' log-probabilities (after the rules).
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    /// - returns `batch` lists of `num_return` hypotheses (fewer if the search ran out), best
    ///   first
    ///
    /// # Errors
    /// [`Error::Decoding`] naming the option for: beam size 0, `num_return` 0 or above the beam
    /// size, a maximum length of 0 or beyond the positional table, a negative or non-finite α,
    /// a repetition penalty not finite and above 0, a token id (BOS, EOS, suppressed, prefix)
    /// outside the target vocabulary, a prefix list not one per row or a prefix not shorter
    /// than the row's maximum length, an alignment layer beyond the decoder's; the errors of
    /// [`encode`](Self::encode).
    ///
    /// ```
    /// use ndarray::array;
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{GenerateOptions, MaxLength, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let options = GenerateOptions {
    ///     max_len: MaxLength::Fixed(8),
    ///     num_return: 2,
    ///     no_repeat_ngram_size: 2,
    ///     prefix: vec![vec![7, 8]],
    ///     ..GenerateOptions::beam(1, 2, 4)
    /// };
    /// let out = model.generate(array![[5u32, 6, 7]].view(), None, &options)?;
    /// assert_eq!(&out[0][0].tokens[..2], &[7, 8]);
    /// assert_eq!(out[0][0].token_log_probs.len(), out[0][0].tokens.len());
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn generate(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GenerateOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        if options.beam_size == 1 {
            let stream = self.start_stream(src, src_padding, options, None)?;
            // One warm pass for all the steps and the choices between them. (Not around the
            // cache's start: its large fresh allocations measured slower from a pool thread.)
            let hyps = ops::with_warm_pool(|| stream.finish())?;
            return Ok(hyps.into_iter().map(|h| vec![h]).collect());
        }
        let max_lens = self.check_generate(src, src_padding, options)?;
        let memory = self.encode(src, src_padding)?;
        let longest = max_lens.iter().copied().max().unwrap_or(0);
        let cache = self.start_decoding_with_capacity(memory.view(), src_padding, longest)?;
        let rows: Vec<RowSearch> = max_lens
            .iter()
            .map(|&max_len| RowSearch::new(max_len, options.bos_id))
            .collect();
        // One warm pass for all the steps, as in greedy decoding.
        let mut hyps = ops::with_warm_pool(|| self.beam_steps(cache, rows, options))?;
        if let Some(layer) = options.alignment_layer {
            self.attach_alignments(memory.view(), src_padding, &mut hyps, options.bos_id, layer)?;
        }
        Ok(hyps)
    }

    /// Samples one output per source row: at every step a token drawn from the model's
    /// distribution as [`Sampling`] shapes it (temperature, top-k, top-p), after the logit
    /// rules of `options`, from the caller's `rng`. The same seed gives the same outputs on
    /// any thread count.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    /// - returns `batch` hypotheses; `log_prob` and `token_log_probs` are the model's
    ///   (after the logit rules, before temperature and filtering)
    ///
    /// # Errors
    /// As [`generate`](Self::generate); also a beam size other than 1, a temperature not
    /// finite and above 0, a `top_p` outside `(0, 1]`.
    ///
    /// ```
    /// use ndarray::array;
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{GenerateOptions, Sampling, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let sampling = Sampling { temperature: 0.8, top_k: 5, top_p: 0.9 };
    /// let options = GenerateOptions::greedy(1, Some(2), 10);
    /// let src = array![[5u32, 6, 7]];
    /// let a = model.sample(src.view(), None, &options, &sampling, &mut StdRng::seed_from_u64(7))?;
    /// let b = model.sample(src.view(), None, &options, &sampling, &mut StdRng::seed_from_u64(7))?;
    /// assert_eq!(a, b);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn sample<R: Rng + Send>(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GenerateOptions,
        sampling: &Sampling,
        rng: &mut R,
    ) -> Result<Vec<Hypothesis>> {
        let stream = self.stream_sampled(src, src_padding, options, sampling, rng)?;
        ops::with_warm_pool(|| stream.finish())
    }

    /// Greedy decoding as a [`TokenStream`]: each `next()` runs one step and yields the token
    /// each unfinished row chose. [`TokenStream::finish`] returns what
    /// [`generate`](Self::generate) would.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `src_padding`: `[batch, src_len]` (true = padding)
    ///
    /// # Errors
    /// As [`generate`](Self::generate); also a beam size other than 1.
    ///
    /// ```
    /// use ndarray::array;
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{GenerateOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(20, 20) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let options = GenerateOptions::greedy(1, Some(2), 10);
    /// let mut printed = Vec::new();
    /// for step in model.stream(array![[5u32, 6, 7]].view(), None, &options)? {
    ///     for t in step? {
    ///         printed.push(t.token); // a caller would print the token's text here
    ///     }
    /// }
    /// let all = model.generate(array![[5u32, 6, 7]].view(), None, &options)?;
    /// assert_eq!(printed, all[0][0].tokens);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn stream(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GenerateOptions,
    ) -> Result<TokenStream<'_>> {
        self.start_stream(src, src_padding, options, None)
    }

    /// Sampling as a [`TokenStream`]; see [`sample`](Self::sample) and
    /// [`stream`](Self::stream).
    ///
    /// # Errors
    /// As [`sample`](Self::sample).
    pub fn stream_sampled<'a, R: Rng + Send>(
        &'a self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GenerateOptions,
        sampling: &Sampling,
        rng: &'a mut R,
    ) -> Result<TokenStream<'a>> {
        sampling.check()?;
        self.start_stream(src, src_padding, options, Some((*sampling, rng)))
    }

    fn start_stream<'a>(
        &'a self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        options: &GenerateOptions,
        sampler: Option<(Sampling, &'a mut (dyn Rng + Send))>,
    ) -> Result<TokenStream<'a>> {
        if options.beam_size != 1 {
            return Err(Error::Decoding {
                parameter: "beam_size",
                reason: format!(
                    "beam_size {} is not 1: only greedy decoding and sampling stream",
                    options.beam_size
                ),
            });
        }
        let max_lens = self.check_generate(src, src_padding, options)?;
        let memory = self.encode(src, src_padding)?;
        let longest = max_lens.iter().copied().max().unwrap_or(0);
        let cache = self.start_decoding_with_capacity(memory.view(), src_padding, longest)?;
        let memory = options
            .alignment_layer
            .map(|_| (memory, src_padding.cloned()));
        Ok(TokenStream::new(
            self,
            options.clone(),
            sampler,
            cache,
            max_lens,
            memory,
        ))
    }

    /// The steps of beam search from a fresh cache, one search per row.
    fn beam_steps(
        &self,
        mut cache: DecoderCache,
        mut rows: Vec<RowSearch>,
        o: &GenerateOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        let batch = rows.len();
        let rules = LogitRules::new(o);
        let rule = StepRule {
            beam_size: o.beam_size,
            eos_id: o.eos_id,
            penalty: o.length_penalty,
        };
        // Cache slot → (batch row, beam index in that row).
        let mut slots: Vec<(usize, usize)> = (0..batch).map(|r| (r, 0)).collect();
        let mut last = Array1::from_elem(batch, o.bos_id);
        let mut step = 0;
        // One logits buffer for every step (rows change as beams fill and finish).
        let vocab = self.config().tgt_vocab;
        let mut buffer = Vec::new();
        while !slots.is_empty() {
            buffer.resize(slots.len() * vocab, 0.0);
            let mut log_probs = ArrayViewMut2::from_shape((slots.len(), vocab), &mut buffer[..])
                .expect("buffer sized for the slots");
            self.decode_step_into(last.view(), &mut cache, log_probs.view_mut())?;
            if !rules.is_empty() {
                for (&(row, beam), mut logits) in slots.iter().zip(log_probs.rows_mut()) {
                    let logits = logits.as_slice_mut().expect("logits in standard layout");
                    rules.apply(logits, &rows[row].live[beam].context, rows[row].max_len);
                }
            }
            ops::log_softmax_rows_inplace(log_probs.view_mut());
            step += 1;
            let mut next_slots = Vec::new();
            let mut next_sources = Vec::new();
            let mut next_tokens = Vec::new();
            let mut start = 0;
            while start < slots.len() {
                let row = slots[start].0;
                let end = start + slots[start..].iter().take_while(|s| s.0 == row).count();
                let block = log_probs.slice(ndarray::s![start..end, ..]);
                let chosen = match o.prefix.get(row).and_then(|p| p.get(step - 1)) {
                    Some(&token) => rows[row].force(block, token),
                    None => rows[row].advance(block, step, &rule),
                };
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

    /// Sets each hypothesis's alignment: decoder layer `layer`'s cross-attention, averaged over
    /// heads, from one teacher-forced pass over all the hypotheses (the decoder is causal, so
    /// these are the weights of the steps that chose each token). `hyps[r]` are row `r`'s.
    pub(crate) fn attach_alignments(
        &self,
        memory: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
        hyps: &mut [Vec<Hypothesis>],
        bos_id: u32,
        layer: usize,
    ) -> Result<()> {
        let owners: Vec<usize> = hyps
            .iter()
            .enumerate()
            .flat_map(|(r, h)| std::iter::repeat_n(r, h.len()))
            .collect();
        let longest = hyps.iter().flatten().map(|h| h.tokens.len()).max();
        let Some(longest) = longest.filter(|&l| l > 0) else {
            return Ok(());
        };
        // Decoder inputs BOS + tokens[..len - 1]; the right padding (BOS) is never attended to
        // by earlier positions under the causal mask.
        let mut tgt = Array2::from_elem((owners.len(), longest), bos_id);
        for (i, h) in hyps.iter().flatten().enumerate() {
            for (j, &t) in h.tokens[..h.tokens.len().saturating_sub(1)]
                .iter()
                .enumerate()
            {
                tgt[[i, j + 1]] = t;
            }
        }
        let memory = memory.select(Axis(0), &owners);
        let padding = src_padding
            .map(|p| KeyPaddingMask::from_padding_flags(p.is_padding().select(Axis(0), &owners)));
        let y = self.embed_target(tgt.view())?;
        let trace = self.decoder().forward_traced(
            y.view(),
            memory.view(),
            &Mask::causal(),
            &Mask::none().with_key_padding_opt(padding.as_ref()),
        )?;
        let weights = trace.cross_attention[layer]
            .mean_axis(Axis(1))
            .expect("at least one head");
        for (i, h) in hyps.iter_mut().flatten().enumerate() {
            let len = h.tokens.len();
            h.alignment = Some(weights.slice(ndarray::s![i, ..len, ..]).to_owned());
        }
        Ok(())
    }

    /// Validates `options` against the model and the source; returns each row's maximum
    /// output length.
    fn check_generate(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        o: &GenerateOptions,
    ) -> Result<Vec<usize>> {
        let fail = |parameter, reason: String| Err(Error::Decoding { parameter, reason });
        if o.beam_size == 0 {
            return fail("beam_size", "beam_size is 0, it must be at least 1".into());
        }
        if o.num_return == 0 || o.num_return > o.beam_size {
            return fail(
                "num_return",
                format!(
                    "num_return {} must be between 1 and beam_size {}",
                    o.num_return, o.beam_size
                ),
            );
        }
        let alpha = o.length_penalty.alpha();
        if !(alpha.is_finite() && alpha >= 0.0) {
            return fail(
                "length_penalty",
                format!("length_penalty {alpha} must be finite and at least 0"),
            );
        }
        if !(o.repetition_penalty.is_finite() && o.repetition_penalty > 0.0) {
            return fail(
                "repetition_penalty",
                format!(
                    "repetition_penalty {} must be finite and above 0 (1 is off)",
                    o.repetition_penalty
                ),
            );
        }
        self.check_token("bos_id", o.bos_id)?;
        if let Some(eos) = o.eos_id {
            self.check_token("eos_id", eos)?;
        }
        for &t in &o.suppress_tokens {
            self.check_token("suppress_tokens", t)?;
        }
        if o.forced_eos && o.eos_id.is_none() {
            return fail(
                "forced_eos",
                "forced_eos needs an eos_id to force".to_string(),
            );
        }
        let layers = self.config().num_decoder_layers;
        if let Some(layer) = o.alignment_layer.filter(|&l| l >= layers) {
            return fail(
                "alignment_layer",
                format!("alignment_layer {layer} is beyond the decoder's {layers} layers"),
            );
        }
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
        if !o.prefix.is_empty() {
            if o.prefix.len() != batch {
                return fail(
                    "prefix",
                    format!(
                        "{} prefixes were given for a batch of {batch} rows (give one per row, or none)",
                        o.prefix.len()
                    ),
                );
            }
            for (row, (p, &max_len)) in o.prefix.iter().zip(&max_lens).enumerate() {
                if p.len() >= max_len {
                    return fail(
                        "prefix",
                        format!(
                            "the prefix of row {row} has {} tokens, not fewer than its maximum length {max_len}",
                            p.len()
                        ),
                    );
                }
                for &t in p {
                    self.check_token("prefix", t)?;
                }
            }
        }
        Ok(max_lens)
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
