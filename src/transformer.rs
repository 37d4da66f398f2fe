//! The whole model of Figure 1: embeddings and positional encoding, encoder, decoder, and the
//! output projection to vocabulary logits (§3, §3.4).

use std::hash::{Hash, Hasher};

use ndarray::{
    Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3, Axis,
    CowArray, Dim, Ix2, IxDyn,
};
use rand::Rng;

use crate::attention::DecoderCache;
use crate::config::TransformerConfig;
use crate::decoder::{check_decoder_inputs, Decoder, DecoderLayer, DecoderTrace};
use crate::embedding::Embedding;
use crate::encoder::{Encoder, EncoderLayer, EncoderTrace};
use crate::error::{Error, Result};
use crate::huge_pages;
use crate::input_embedding::InputEmbedding;
use crate::layer_norm::LayerNorm;
use crate::linear::{quantize_linears, Linear, Linears};
use crate::mask::{KeyPaddingMask, Mask};
use crate::naming;
use crate::ops;
use crate::parameters::{self, visit_child, Parameters, Scope, Visitor};
use crate::positional::PositionalEncoding;
use crate::precision::Precision;

/// The Transformer: token ids in, next-token logits out.
///
/// Data flows `ids → embedding·√d_model + PE → encoder → memory → decoder → projection → logits`.
///
/// ```
/// use ndarray::array;
/// use rand::{rngs::StdRng, SeedableRng};
/// use ndtransformer::{KeyPaddingMask, Transformer, TransformerConfig};
///
/// let config = TransformerConfig {
///     d_model: 16, num_heads: 4, d_ff: 32, num_encoder_layers: 2, num_decoder_layers: 2,
///     ..TransformerConfig::base(11, 13)
/// };
/// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
/// let src = array![[5u32, 6, 7, 2], [3, 9, 0, 0]];          // [batch, src_len]
/// let src_padding = KeyPaddingMask::from_lengths(&[4, 2], 4)?;
/// let tgt = array![[1u32, 4, 8], [1, 12, 3]];               // [batch, tgt_len]
/// let logits = model.forward(src.view(), tgt.view(), Some(&src_padding), None)?;
/// assert_eq!(logits.shape(), &[2, 3, 13]);                  // [batch, tgt_len, tgt_vocab]
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Transformer {
    config: TransformerConfig,
    src_embed: Embedding,
    /// `None` when the source and target share one table (`share_embeddings`).
    tgt_embed: Option<Embedding>,
    input: InputEmbedding,
    encoder: Encoder,
    decoder: Decoder,
    /// The output projection (§3.4), `[tgt_vocab, d_model]`; its weight is the target
    /// embedding's table when tied.
    output: Linear,
    /// A hash of the config and a sample of the weights, so a [`DecoderCache`] can tell
    /// whether it was made by this model (equal weights give equal fingerprints).
    fingerprint: u64,
}

/// Every intermediate of one [`Transformer::forward_traced`] call.
#[derive(Debug, Clone)]
pub struct TransformerTrace {
    /// Encoder input, `[batch, src_len, d_model]`.
    pub src_embedded: Array3<f32>,
    /// Decoder input, `[batch, tgt_len, d_model]`.
    pub tgt_embedded: Array3<f32>,
    /// Encoder layer outputs, self-attention weights and the memory.
    pub encoder: EncoderTrace,
    /// Decoder layer outputs, self- and cross-attention weights and the decoder output.
    pub decoder: DecoderTrace,
    /// `[batch, tgt_len, tgt_vocab]`.
    pub logits: Array3<f32>,
}

impl Transformer {
    /// A freshly initialised model (see [`crate::init`] for the scheme); the same RNG state
    /// gives the same model.
    ///
    /// # Errors
    /// [`Error::Config`] if `config.validate()` fails.
    pub fn new<R: Rng + ?Sized>(config: TransformerConfig, rng: &mut R) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let src_embed = Embedding::init(c.src_vocab, c.d_model, rng);
        let tgt_embed = (!c.share_embeddings).then(|| Embedding::init(c.tgt_vocab, c.d_model, rng));
        let encoder_layers = (0..c.num_encoder_layers)
            .map(|_| EncoderLayer::init(c, rng))
            .collect::<Result<Vec<_>>>()?;
        let decoder_layers = (0..c.num_decoder_layers)
            .map(|_| DecoderLayer::init(c, rng))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = || {
            c.final_norm
                .then(|| LayerNorm::identity(c.d_model, c.layer_norm_eps))
                .transpose()
        };
        let encoder = Encoder::new(encoder_layers, final_norm()?)?;
        let decoder = Decoder::new(decoder_layers, final_norm()?)?;
        let input = InputEmbedding::init(c, rng)?;
        let bias = Array1::zeros(c.tgt_vocab);
        let output = if c.tie_output_projection {
            Linear::tied(
                tgt_embed.as_ref().unwrap_or(&src_embed).shared_table(),
                Some(bias),
            )
        } else {
            let w =
                crate::init::xavier_uniform(c.tgt_vocab, c.d_model, c.d_model, c.tgt_vocab, rng);
            Linear::from_parts(w, Some(bias))
        };
        let (embeddings, stacks) = ((src_embed, tgt_embed), (encoder, decoder));
        Self::from_parts(config, embeddings, input, stacks, output)
    }

    /// Assembles a model from loaded parts, checking them against the config.
    pub(crate) fn from_parts(
        config: TransformerConfig,
        (src_embed, tgt_embed): (Embedding, Option<Embedding>),
        input: InputEmbedding,
        (encoder, decoder): (Encoder, Decoder),
        output: Linear,
    ) -> Result<Self> {
        config.validate()?;
        debug_assert_eq!(tgt_embed.is_none(), config.share_embeddings);
        debug_assert_eq!(output.is_tied(), config.tie_output_projection);
        let mut model = Transformer {
            config,
            src_embed,
            tgt_embed,
            input,
            encoder,
            decoder,
            output,
            fingerprint: 0,
        };
        model.fingerprint = model.compute_fingerprint();
        Ok(model)
    }

    /// Reads every tensor under the names of the [`Parameters`] walk from `scope`. A file that
    /// also stores a shared or tied matrix under its second name must store the same values.
    pub(crate) fn from_scope(scope: &mut Scope, config: TransformerConfig) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let d = c.d_model;
        let src_embed = Embedding::load(&mut scope.child("src_embed"), c.src_vocab, d)?;
        let tgt_embed = if c.share_embeddings {
            scope.check_alias(
                "tgt_embed.weight",
                "src_embed.weight",
                src_embed.weight().view(),
            )?;
            None
        } else {
            Some(Embedding::load(
                &mut scope.child("tgt_embed"),
                c.tgt_vocab,
                d,
            )?)
        };
        let input = InputEmbedding::load(&mut scope.child("input"), c)?;
        let encoder = Encoder::load(&mut scope.child("encoder"), c)?;
        let decoder = Decoder::load(&mut scope.child("decoder"), c)?;
        let output = if c.tie_output_projection {
            let (tied, of) = match &tgt_embed {
                Some(t) => (t, "tgt_embed.weight"),
                None => (&src_embed, "src_embed.weight"),
            };
            scope.check_alias("output.weight", of, tied.weight().view())?;
            let bias = scope.vector("output.bias", c.tgt_vocab)?;
            Linear::tied(tied.shared_table(), Some(bias))
        } else {
            Linear::load(&mut scope.child("output"), c.tgt_vocab, d)?
        };
        let (embeddings, stacks) = ((src_embed, tgt_embed), (encoder, decoder));
        Self::from_parts(config, embeddings, input, stacks, output)
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// The encoder stack (for custom masks, see [`Encoder::forward`]).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The decoder stack (for custom masks, see [`Decoder::forward`]).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The source embedding.
    pub fn src_embedding(&self) -> &Embedding {
        &self.src_embed
    }

    /// The target embedding (the source one when they are shared).
    pub fn tgt_embedding(&self) -> &Embedding {
        self.tgt_embed.as_ref().unwrap_or(&self.src_embed)
    }

    /// The positional-encoding table (sinusoidal or learned), shared by source and target.
    pub fn positional_encoding(&self) -> &PositionalEncoding {
        self.input.positions()
    }

    /// What turns ids into the stacks' inputs besides the token tables: scale, positions,
    /// token types, embedding norm (see [`EmbeddingConfig`](crate::EmbeddingConfig)).
    pub fn input_embedding(&self) -> &InputEmbedding {
        &self.input
    }

    /// The output projection's weight `[tgt_vocab, d_model]` (the target embedding when tied).
    ///
    /// An untied weight is stored in the panels its products read and comes back as a copy.
    pub fn output_weight(&self) -> CowArray<'_, f32, Ix2> {
        self.output.weight_view()
    }

    /// The output projection (§3.4): `[tgt_vocab, d_model]`, the target embedding's table as
    /// its weight when tied.
    pub fn output_projection(&self) -> &Linear {
        &self.output
    }

    /// Every parameter under the crate's own name for it, in PyTorch's layout, the way
    /// PyTorch's `named_parameters()` lists them: each once (a shared or tied matrix under its
    /// first owner), named by where it sits, e.g. `decoder.layers.0.cross_attn.k_proj.weight`.
    /// The checkpoint formats rename these (see [`crate::weights`]); weights stored in panels
    /// come back as copies.
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 8, num_heads: 2, d_ff: 16, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(10, 10) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// let named = model.named_parameters();
    /// assert_eq!(named[0].0, "src_embed.weight");
    /// assert!(named.iter().any(|(name, t)| name == "encoder.layers.0.self_attn.q_proj.weight"
    ///     && t.shape() == [8, 8]));
    /// let total: usize = named.iter().map(|(_, t)| t.len()).sum();
    /// assert_eq!(total, model.num_parameters());
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn named_parameters(&self) -> Vec<(String, CowArray<'_, f32, IxDyn>)> {
        parameters::named_values(self)
    }

    /// Number of parameters (a shared or tied matrix counted once).
    pub fn num_parameters(&self) -> usize {
        parameters::count(self)
    }

    /// Checks that every weight is finite; the first NaN or infinity is an
    /// [`Error::NonFinite`] naming the tensor (in PyTorch's names, see [`crate::weights`]),
    /// its index and the value. Loading can run the same check: [`LoadOptions::check_finite`](crate::LoadOptions::check_finite).
    ///
    /// # Errors
    /// [`Error::NonFinite`].
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 8, num_heads: 2, d_ff: 16, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(10, 10) };
    /// let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
    /// model.check_finite()?;
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn check_finite(&self) -> Result<()> {
        naming::PYTORCH.check_finite(self)
    }

    /// Converts every linear layer (the attention projections, the feed-forward layers and the
    /// output projection) to `precision`, in place, and at [`Precision::Int8`] the token
    /// embedding tables too, which a tied output projection keeps sharing (at
    /// [`Precision::Bf16`] it gets a bf16 copy of its f32 table). Norms, biases and the
    /// positional encoding stay f32 ([`Precision`]). Converting back to [`Precision::F32`]
    /// keeps the int8 or bf16 values' rounding: it does not restore the original weights.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming the tensor if a parameter is NaN or infinite, and
    /// [`Error::Config`] if a layer is wider than int8 sums can hold or a weight is beyond
    /// bf16's range; the model is unchanged then.
    pub fn quantize(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision() {
            return Ok(());
        }
        self.check_finite()?;
        quantize_linears(self, precision)?;
        self.src_embed.quantize(precision)?;
        if let Some(t) = &mut self.tgt_embed {
            t.quantize(precision)?;
        }
        if self.output.is_tied() {
            self.output.retie(self.tgt_embedding().shared_table());
            if precision == Precision::Bf16 {
                self.output.quantize(precision)?;
            }
        }
        self.fingerprint = self.compute_fingerprint();
        Ok(())
    }

    /// The precision of the linear layers.
    pub fn precision(&self) -> Precision {
        self.output.precision()
    }

    /// Bytes the parameters take as stored (a shared or tied matrix counted once), with a
    /// tied output projection's bf16 copy.
    pub fn parameter_bytes(&self) -> usize {
        parameters::bytes(self) + self.output.tied_copy_bytes()
    }

    /// `embedding(src)·√d_model + PE`: the encoder's input.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`
    /// - returns `[batch, src_len, d_model]`
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`], [`Error::Empty`], [`Error::SequenceTooLong`].
    pub fn embed_source(&self, src: ArrayView2<u32>) -> Result<Array3<f32>> {
        self.embed(&self.src_embed, src, "source ids")
    }

    /// `embedding(tgt)·√d_model + PE`: the decoder's input.
    ///
    /// # Shapes
    /// - `tgt`: `[batch, tgt_len]`
    /// - returns `[batch, tgt_len, d_model]`
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`], [`Error::Empty`], [`Error::SequenceTooLong`].
    pub fn embed_target(&self, tgt: ArrayView2<u32>) -> Result<Array3<f32>> {
        self.embed(self.tgt_embedding(), tgt, "target ids")
    }

    fn embed(&self, table: &Embedding, ids: ArrayView2<u32>, what: &str) -> Result<Array3<f32>> {
        self.embed_at(table, ids, what, 0)
    }

    /// Ids whose first position is `offset`, checked and embedded.
    fn embed_at(
        &self,
        table: &Embedding,
        ids: ArrayView2<u32>,
        what: &str,
        offset: usize,
    ) -> Result<Array3<f32>> {
        self.input.embed(table, ids, None, offset, what)
    }

    /// Encodes source ids into the memory.
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`
    /// - `src_padding`: `[batch, src_len]`, true = padding
    /// - returns `[batch, src_len, d_model]`
    ///
    /// # Errors
    /// Bad ids, lengths or mask shapes (see [`Error`]).
    pub fn encode(
        &self,
        src: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        let x = self.embed_source(src)?;
        self.encode_embedded(x.view(), src_padding)
    }

    /// Encodes an already embedded source (e.g. with custom embeddings).
    ///
    /// # Shapes
    /// - `x`: `[batch, src_len, d_model]`
    /// - `src_padding`: `[batch, src_len]`, true = padding
    /// - returns `[batch, src_len, d_model]`
    pub fn encode_embedded(
        &self,
        x: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        crate::encoder::check_input(x, self.config.d_model, "encoder input")?;
        if let Some(p) = src_padding {
            p.check(x.shape()[0], x.shape()[1], "source padding mask")?;
        }
        self.encoder
            .forward(x, &Mask::none().with_key_padding_opt(src_padding))
    }

    /// Decodes target ids against the memory; target self-attention is causal.
    ///
    /// # Shapes
    /// - `tgt`: `[batch, tgt_len]`
    /// - `memory`: `[batch, src_len, d_model]`
    /// - `src_padding`: `[batch, src_len]` (hides padded memory positions), true = padding
    /// - `tgt_padding`: `[batch, tgt_len]`, true = padding
    /// - returns `[batch, tgt_len, d_model]`
    ///
    /// # Errors
    /// Bad ids, lengths, memory or mask shapes (see [`Error`]).
    pub fn decode(
        &self,
        tgt: ArrayView2<u32>,
        memory: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        let y = self.embed_target(tgt)?;
        self.decode_embedded(y.view(), memory, src_padding, tgt_padding)
    }

    /// Decodes an already embedded target.
    ///
    /// # Shapes
    /// - `y`: `[batch, tgt_len, d_model]`; the other arguments as in [`decode`](Self::decode)
    /// - returns `[batch, tgt_len, d_model]`
    pub fn decode_embedded(
        &self,
        y: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        // The masks are checked here, by name, before the decoder checks them again as
        // anonymous "key padding masks".
        let d_model = self.config.d_model;
        crate::encoder::check_input(y, d_model, "decoder input")?;
        crate::encoder::check_input(memory, d_model, "memory")?;
        if let Some(p) = src_padding {
            p.check(memory.shape()[0], memory.shape()[1], "source padding mask")?;
        }
        if let Some(p) = tgt_padding {
            p.check(y.shape()[0], y.shape()[1], "target padding mask")?;
        }
        let self_mask = Mask::causal().with_key_padding_opt(tgt_padding);
        let cross_mask = Mask::none().with_key_padding_opt(src_padding);
        self.decoder.forward(y, memory, &self_mask, &cross_mask)
    }

    /// The output projection (§3.4): decoder output to unnormalised next-token scores.
    ///
    /// # Shapes
    /// - `decoded`: `[batch, tgt_len, d_model]`
    /// - returns `[batch, tgt_len, tgt_vocab]`
    pub fn project(&self, decoded: ArrayView3<f32>) -> Result<Array3<f32>> {
        crate::encoder::check_input(decoded, self.config.d_model, "decoder output")?;
        Ok(self.project_unchecked(decoded))
    }

    pub(crate) fn project_unchecked(&self, decoded: ArrayView3<f32>) -> Array3<f32> {
        let (b, len, _) = decoded.dim();
        with_rows(decoded, |flat| self.output.forward_2d(flat))
            .into_shape_with_order((b, len, self.config.tgt_vocab))
            .expect("same element count")
    }

    /// [`project`](Self::project) written into `logits`, a buffer the caller keeps from call to
    /// call: the same numbers, without a new `[batch, tgt_len, tgt_vocab]` array each time
    /// (for a large batch and vocabulary, many megabytes the operating system must hand over
    /// zeroed).
    ///
    /// # Shapes
    /// - `decoded`: `[batch, tgt_len, d_model]`
    /// - `logits`: `[batch, tgt_len, tgt_vocab]`, any contents (overwritten)
    ///
    /// # Errors
    /// A `decoded` of the wrong width or with no rows, or `logits` of another shape.
    pub fn project_into(&self, decoded: ArrayView3<f32>, logits: ArrayViewMut3<f32>) -> Result<()> {
        crate::encoder::check_input(decoded, self.config.d_model, "decoder output")?;
        self.check_logits(decoded.shape()[0], decoded.shape()[1], logits.shape())?;
        self.project_into_unchecked(decoded, logits);
        Ok(())
    }

    fn check_logits(&self, batch: usize, tgt_len: usize, found: &[usize]) -> Result<()> {
        let vocab = self.config.tgt_vocab;
        if found != [batch, tgt_len, vocab] {
            return Err(Error::shape(
                "logits",
                format!("[batch, tgt_len, tgt_vocab] = [{batch}, {tgt_len}, {vocab}]"),
                found,
            ));
        }
        Ok(())
    }

    fn project_into_unchecked(&self, decoded: ArrayView3<f32>, mut logits: ArrayViewMut3<f32>) {
        if !logits.is_standard_layout() {
            logits.assign(&self.project_unchecked(decoded));
            return;
        }
        let (b, len, _) = decoded.dim();
        let logits = logits
            .into_shape_with_order((b * len, self.config.tgt_vocab))
            .expect("standard layout, checked above");
        with_rows(decoded, |flat| self.output.forward_2d_into(flat, logits));
    }

    /// The full model: logits for every target position (teacher forcing).
    ///
    /// # Shapes
    /// - `src`: `[batch, src_len]`, `tgt`: `[batch, tgt_len]`
    /// - `src_padding`: `[batch, src_len]`, `tgt_padding`: `[batch, tgt_len]`, true = padding
    /// - returns `[batch, tgt_len, tgt_vocab]`
    ///
    /// # Errors
    /// Bad ids, lengths or mask shapes, or source and target batch sizes that differ.
    pub fn forward(
        &self,
        src: ArrayView2<u32>,
        tgt: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        check_same_batch(src, tgt)?;
        // The logits come first: a caller that drops each result before its next call gets
        // back the pages it has just freed, still mapped. Taken after the decoder, the same
        // memory can already have gone back to the host (a virtual machine's balloon device)
        // and must be faulted in again (docs/performance.md has the timings). The numbers are
        // `forward_into`'s, identical to `project`'s.
        let mut logits =
            huge_pages::zeros_faulted_in(Dim([tgt.nrows(), tgt.ncols(), self.config.tgt_vocab]));
        self.forward_into(src, tgt, src_padding, tgt_padding, logits.view_mut())?;
        Ok(logits)
    }

    /// [`forward`](Self::forward) written into `logits`, a buffer the caller keeps from call to
    /// call (a serving loop): the same numbers, without a new array of logits each time.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); `logits`: `[batch, tgt_len, tgt_vocab]`, any contents
    /// (overwritten).
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and `logits` of another shape (checked first).
    pub fn forward_into(
        &self,
        src: ArrayView2<u32>,
        tgt: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
        logits: ArrayViewMut3<f32>,
    ) -> Result<()> {
        check_same_batch(src, tgt)?;
        self.check_logits(tgt.nrows(), tgt.ncols(), logits.shape())?;
        let memory = self.encode(src, src_padding)?;
        let decoded = self.decode(tgt, memory.view(), src_padding, tgt_padding)?;
        self.project_into_unchecked(decoded.view(), logits);
        Ok(())
    }

    /// Log-probabilities over the target vocabulary, `log softmax(forward(..))`, computed stably.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward): returns `[batch, tgt_len, tgt_vocab]`.
    pub fn log_probs(
        &self,
        src: ArrayView2<u32>,
        tgt: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        let mut logits = self.forward(src, tgt, src_padding, tgt_padding)?;
        for mut row in logits.axis_iter_mut(Axis(0)) {
            ops::log_softmax_rows_inplace(row.view_mut());
        }
        Ok(logits)
    }

    /// As [`forward`](Self::forward), recording every intermediate and attention map.
    pub fn forward_traced(
        &self,
        src: ArrayView2<u32>,
        tgt: ArrayView2<u32>,
        src_padding: Option<&KeyPaddingMask>,
        tgt_padding: Option<&KeyPaddingMask>,
    ) -> Result<TransformerTrace> {
        check_same_batch(src, tgt)?;
        let src_embedded = self.embed_source(src)?;
        let tgt_embedded = self.embed_target(tgt)?;
        if let Some(p) = src_padding {
            p.check(src.nrows(), src.ncols(), "source padding mask")?;
        }
        if let Some(p) = tgt_padding {
            p.check(tgt.nrows(), tgt.ncols(), "target padding mask")?;
        }
        let cross_mask = Mask::none().with_key_padding_opt(src_padding);
        let encoder = self
            .encoder
            .forward_traced(src_embedded.view(), &cross_mask)?;
        let self_mask = Mask::causal().with_key_padding_opt(tgt_padding);
        check_decoder_inputs(
            tgt_embedded.view(),
            encoder.output.view(),
            self.config.d_model,
            &self_mask,
            &cross_mask,
        )?;
        let decoder = self.decoder.forward_traced(
            tgt_embedded.view(),
            encoder.output.view(),
            &self_mask,
            &cross_mask,
        )?;
        let logits = self.project_unchecked(decoder.output.view());
        Ok(TransformerTrace {
            src_embedded,
            tgt_embedded,
            encoder,
            decoder,
            logits,
        })
    }
}

impl Transformer {
    /// A cache for generating from `memory`: the cross-attention keys and values of every
    /// decoder layer are computed here, once.
    ///
    /// # Shapes
    /// - `memory`: `[batch, src_len, d_model]` (from [`encode`](Self::encode))
    /// - `src_padding`: `[batch, src_len]`, true = padding
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Empty`] if the memory or mask do not fit the model.
    pub fn start_decoding(
        &self,
        memory: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
    ) -> Result<DecoderCache> {
        self.start_decoding_with_capacity(memory, src_padding, 16)
    }

    /// As [`start_decoding`](Self::start_decoding), with room for `capacity` steps reserved.
    pub(crate) fn start_decoding_with_capacity(
        &self,
        memory: ArrayView3<f32>,
        src_padding: Option<&KeyPaddingMask>,
        capacity: usize,
    ) -> Result<DecoderCache> {
        crate::encoder::check_input(memory, self.config.d_model, "memory")?;
        let (batch, src_len, _) = memory.dim();
        if let Some(p) = src_padding {
            p.check(batch, src_len, "source padding mask")?;
        }
        let memory = memory.as_standard_layout();
        Ok(DecoderCache {
            model_fingerprint: self.fingerprint,
            layers: self.decoder.start_caches(memory.view(), capacity.max(1)),
            memory_padding: src_padding.cloned(),
            batch,
            len: 0,
        })
    }

    /// One generation step: feeds each batch row's newest target token and returns the logits
    /// of the token after it, updating `cache`.
    ///
    /// The logits equal those of [`forward`](Self::forward) at the last position of the whole
    /// prefix (the decoder is causal, so earlier positions' keys and values never change).
    ///
    /// # Shapes
    /// - `tokens`: `[batch]`
    /// - returns `[batch, tgt_vocab]`
    ///
    /// # Errors
    /// [`Error::CacheMismatch`] if `cache` was made by another model or `tokens` has another
    /// batch size; [`Error::TokenOutOfRange`]; [`Error::SequenceTooLong`] past `max_len`.
    pub fn decode_step(
        &self,
        tokens: ArrayView1<u32>,
        cache: &mut DecoderCache,
    ) -> Result<Array2<f32>> {
        let x = self.step_input(tokens, cache)?;
        let cross_mask = Mask::none().with_key_padding_opt(cache.memory_padding.as_ref());
        let logits = ops::with_warm_pool(|| {
            let decoded = self.decoder.run_step(x, &mut cache.layers, &cross_mask);
            self.project_unchecked(decoded.view())
        });
        cache.len += 1;
        Ok(logits.index_axis_move(Axis(1), 0))
    }

    /// [`decode_step`](Self::decode_step) written into `logits`, a buffer the caller keeps
    /// from step to step: the same numbers, without a new `[batch, tgt_vocab]` array each step
    /// (for a beam of a large vocabulary, tens of megabytes the operating system would hand
    /// over zeroed every time).
    ///
    /// # Shapes
    /// - `tokens`: `[batch]`
    /// - `logits`: `[batch, tgt_vocab]`, any contents (overwritten)
    ///
    /// # Errors
    /// As [`decode_step`](Self::decode_step); also `logits` of another shape.
    pub fn decode_step_into(
        &self,
        tokens: ArrayView1<u32>,
        cache: &mut DecoderCache,
        logits: ArrayViewMut2<f32>,
    ) -> Result<()> {
        self.check_logits(tokens.len(), 1, &[logits.nrows(), 1, logits.ncols()])?;
        let x = self.step_input(tokens, cache)?;
        let cross_mask = Mask::none().with_key_padding_opt(cache.memory_padding.as_ref());
        ops::with_warm_pool(|| {
            let decoded = self.decoder.run_step(x, &mut cache.layers, &cross_mask);
            self.project_into_unchecked(decoded.view(), logits.insert_axis(Axis(1)));
        });
        cache.len += 1;
        Ok(())
    }

    /// The checks of a step and its input: the embedded `tokens` at the cache's position.
    fn step_input(&self, tokens: ArrayView1<u32>, cache: &DecoderCache) -> Result<Array3<f32>> {
        if cache.model_fingerprint != self.fingerprint {
            return Err(Error::CacheMismatch {
                reason: "the cache was made by another model (its weights or config differ)".into(),
            });
        }
        if tokens.len() != cache.batch {
            return Err(Error::CacheMismatch {
                reason: format!(
                    "{} tokens were fed to a cache of batch {}",
                    tokens.len(),
                    cache.batch
                ),
            });
        }
        let ids = tokens.insert_axis(Axis(1));
        self.embed_at(self.tgt_embedding(), ids, "target ids", cache.len)
    }

    fn compute_fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{:?}", self.config).hash(&mut h);
        // Every 97th stored value of what decoding reads (weights in panels as stored: equal
        // weights, equal panels).
        let mut sample = |_: &str, t: parameters::Tensor| t.hash_sample(97, &mut h);
        self.tgt_embedding().visit(&mut sample);
        self.decoder.visit(&mut sample);
        self.output.visit(&mut sample);
        h.finish()
    }
}

impl Linears for Transformer {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        self.encoder.linears_mut(f)?;
        self.decoder.linears_mut(f)?;
        // A tied projection follows its table (`quantize`).
        if self.output.is_tied() {
            return Ok(());
        }
        f(&mut self.output)
    }
}

/// `src_embed`, `tgt_embed` (unless shared), `input`, `encoder`, `decoder` and `output` (its
/// weight only when not tied).
impl Parameters for Transformer {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "src_embed", &self.src_embed);
        if let Some(t) = &self.tgt_embed {
            visit_child(f, "tgt_embed", t);
        }
        visit_child(f, "input", &self.input);
        visit_child(f, "encoder", &self.encoder);
        visit_child(f, "decoder", &self.decoder);
        visit_child(f, "output", &self.output);
    }
}

fn check_same_batch(src: ArrayView2<u32>, tgt: ArrayView2<u32>) -> Result<()> {
    if src.nrows() != tgt.nrows() {
        return Err(Error::shape(
            "target ids",
            format!(
                "[batch, tgt_len] with batch {} like the source ids",
                src.nrows()
            ),
            tgt.shape(),
        ));
    }
    Ok(())
}

/// `f` on the rows of `x: [batch, len, d]` as one `[batch · len, d]` matrix (copied only when
/// `x` is not in standard layout).
fn with_rows<R>(x: ArrayView3<f32>, f: impl FnOnce(ArrayView2<f32>) -> R) -> R {
    let (b, len, d) = x.dim();
    let x = x.as_standard_layout();
    f(x.view()
        .into_shape_with_order((b * len, d))
        .expect("standard layout"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NormPosition;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, s};
    use rand::{rngs::StdRng, SeedableRng};

    fn tiny() -> TransformerConfig {
        TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            max_len: 16,
            ..TransformerConfig::base(9, 7)
        }
    }

    #[test]
    fn same_seed_same_model() {
        let a = Transformer::new(tiny(), &mut StdRng::seed_from_u64(5)).unwrap();
        let b = Transformer::new(tiny(), &mut StdRng::seed_from_u64(5)).unwrap();
        let c = Transformer::new(tiny(), &mut StdRng::seed_from_u64(6)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn padded_batch_rows_equal_the_rows_alone() {
        for norm_position in [NormPosition::Post, NormPosition::Pre] {
            let model = Transformer::new(
                TransformerConfig {
                    norm_position,
                    ..tiny()
                },
                &mut StdRng::seed_from_u64(1),
            )
            .unwrap();
            let src = array![[3u32, 4, 5, 6], [7, 8, 0, 0]];
            let tgt = array![[1u32, 2, 3], [1, 5, 0]];
            let sp = KeyPaddingMask::from_lengths(&[4, 2], 4).unwrap();
            let tp = KeyPaddingMask::from_lengths(&[3, 2], 3).unwrap();
            let batched = model
                .forward(src.view(), tgt.view(), Some(&sp), Some(&tp))
                .unwrap();
            let alone = model
                .forward(
                    src.slice(s![1..2, ..2]),
                    tgt.slice(s![1..2, ..2]),
                    None,
                    None,
                )
                .unwrap();
            assert_abs_diff_eq!(batched.slice(s![1..2, ..2, ..]), alone, epsilon = 1e-5);
        }
    }

    #[test]
    fn shared_and_tied_weights() {
        let config = TransformerConfig {
            share_embeddings: true,
            tie_output_projection: true,
            ..TransformerConfig {
                tgt_vocab: 9,
                ..tiny()
            }
        };
        let model = Transformer::new(config, &mut StdRng::seed_from_u64(2)).unwrap();
        assert_eq!(model.output_weight(), model.src_embedding().weight());
        assert_eq!(model.tgt_embedding(), model.src_embedding());
        let untied = Transformer::new(
            TransformerConfig {
                tgt_vocab: 9,
                ..tiny()
            },
            &mut StdRng::seed_from_u64(2),
        )
        .unwrap();
        assert_eq!(untied.num_parameters() - model.num_parameters(), 2 * 9 * 8);
    }

    #[test]
    fn log_probs_normalise() {
        let model = Transformer::new(tiny(), &mut StdRng::seed_from_u64(3)).unwrap();
        let lp = model
            .log_probs(
                array![[1u32, 2]].view(),
                array![[1u32, 2, 3]].view(),
                None,
                None,
            )
            .unwrap();
        for row in lp.lanes(Axis(2)) {
            assert_abs_diff_eq!(row.mapv(f32::exp).sum(), 1.0, epsilon = 1e-5);
        }
    }

    #[test]
    fn errors_not_panics() {
        let model = Transformer::new(tiny(), &mut StdRng::seed_from_u64(4)).unwrap();
        let ok = array![[1u32, 2]];
        assert!(matches!(
            model.forward(array![[9u32]].view(), ok.view(), None, None),
            Err(Error::TokenOutOfRange {
                id: 9,
                vocab: 9,
                ..
            })
        ));
        assert!(matches!(
            model.forward(ok.view(), array![[7u32]].view(), None, None),
            Err(Error::TokenOutOfRange { vocab: 7, .. })
        ));
        let long = Array2::<u32>::ones((1, 17));
        assert!(matches!(
            model.forward(long.view(), ok.view(), None, None),
            Err(Error::SequenceTooLong {
                len: 17,
                max_len: 16
            })
        ));
        assert!(matches!(
            model.forward(Array2::<u32>::zeros((1, 0)).view(), ok.view(), None, None),
            Err(Error::Empty { .. })
        ));
        assert!(model
            .forward(array![[1u32], [2]].view(), ok.view(), None, None)
            .is_err());
        let wrong_mask = KeyPaddingMask::from_lengths(&[1], 1).unwrap();
        assert!(matches!(
            model.forward(ok.view(), ok.view(), Some(&wrong_mask), None),
            Err(Error::Shape { .. })
        ));
        assert!(Transformer::new(
            TransformerConfig {
                num_heads: 3,
                ..tiny()
            },
            &mut StdRng::seed_from_u64(0)
        )
        .is_err());
    }
}
