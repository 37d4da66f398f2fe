//! An encoder-only model: the left half of Figure 1 on its own (§3.1).
//!
//! Most models people run today (BERT and its sentence-embedding descendants) are this half:
//! ids → input embedding → N encoder layers → one contextual vector per token. It is the same
//! [`InputEmbedding`] and [`Encoder`] that the [`Transformer`](crate::Transformer) runs, with
//! the options of [`EmbeddingConfig`](crate::EmbeddingConfig) and `final_norm` choosing between
//! the paper's recipe and BERT's.

use ndarray::{s, Array3, ArrayView2, Axis};
use rand::Rng;

use crate::config::TransformerConfig;
use crate::embedding::Embedding;
use crate::encoder::{Encoder, EncoderLayer, EncoderTrace};
use crate::error::{Error, Result};
use crate::input_embedding::InputEmbedding;
use crate::layer_norm::LayerNorm;
use crate::linear::{quantize_linears, Linears};
use crate::mask::{KeyPaddingMask, Mask};
use crate::naming;
use crate::parameters::{self, visit_child, Parameters, Scope, Visitor};
use crate::precision::Precision;

/// Token ids in, contextual token vectors out.
///
/// Only the encoder fields of the [`TransformerConfig`] are used (see
/// [`TransformerConfig::validate_encoder`]).
///
/// ```
/// use ndarray::array;
/// use rand::{rngs::StdRng, SeedableRng};
/// use ndtransformer::{EmbeddingConfig, EncoderModel, KeyPaddingMask, TransformerConfig};
///
/// let config = TransformerConfig {
///     d_model: 16, num_heads: 4, d_ff: 32, num_encoder_layers: 2, max_len: 32,
///     embedding: EmbeddingConfig::bert(2), final_norm: false,
///     ..TransformerConfig::base(50, 0)
/// };
/// let model = EncoderModel::new(config, &mut StdRng::seed_from_u64(0))?;
/// let ids = array![[2u32, 7, 9, 3], [2, 5, 3, 0]];             // [batch, seq]
/// let padding = KeyPaddingMask::from_lengths(&[4, 3], 4)?;
/// let hidden = model.forward(ids.view(), None, Some(&padding))?;
/// assert_eq!(hidden.shape(), &[2, 4, 16]);                    // [batch, seq, d_model]
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderModel {
    config: TransformerConfig,
    tokens: Embedding,
    input: InputEmbedding,
    encoder: Encoder,
}

impl EncoderModel {
    /// A freshly initialised model; the same RNG state gives the same model.
    ///
    /// # Errors
    /// [`Error::Config`] if `config.validate_encoder()` fails.
    pub fn new<R: Rng + ?Sized>(config: TransformerConfig, rng: &mut R) -> Result<Self> {
        config.validate_encoder()?;
        let c = &config;
        let tokens = Embedding::init(c.src_vocab, c.d_model, rng);
        let input = InputEmbedding::init(c, rng)?;
        let layers = (0..c.num_encoder_layers)
            .map(|_| EncoderLayer::init(c, rng))
            .collect::<Result<Vec<_>>>()?;
        let norm = c
            .final_norm
            .then(|| LayerNorm::identity(c.d_model, c.layer_norm_eps))
            .transpose()?;
        Self::from_parts(config, tokens, input, Encoder::new(layers, norm)?)
    }

    /// Assembles a model from its parts, checking them against the config.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; [`Error::Shape`] if a part's width, the
    /// vocabulary, the position table or the layer count differs from the config.
    pub fn from_parts(
        config: TransformerConfig,
        tokens: Embedding,
        input: InputEmbedding,
        encoder: Encoder,
    ) -> Result<Self> {
        config.validate_encoder()?;
        let c = &config;
        let parts = [
            (
                "token embedding",
                [tokens.vocab(), tokens.d_model()],
                [c.src_vocab, c.d_model],
            ),
            (
                "position table",
                [input.positions().max_len(), input.positions().d_model()],
                [c.max_len, c.d_model],
            ),
            (
                "encoder [layers, d_model]",
                [encoder.layers().len(), encoder.d_model()],
                [c.num_encoder_layers, c.d_model],
            ),
        ];
        for (what, found, expected) in parts {
            if found != expected {
                return Err(Error::shape(what, format!("{expected:?}"), &found));
            }
        }
        Ok(EncoderModel {
            config,
            tokens,
            input,
            encoder,
        })
    }

    /// Reads every tensor under the names of the [`Parameters`] walk from `scope`.
    pub(crate) fn from_scope(scope: &mut Scope, config: TransformerConfig) -> Result<Self> {
        config.validate_encoder()?;
        let c = &config;
        let tokens = Embedding::load(&mut scope.child("tokens"), c.src_vocab, c.d_model)?;
        let input = InputEmbedding::load(&mut scope.child("input"), c)?;
        let encoder = Encoder::load(&mut scope.child("encoder"), c)?;
        Self::from_parts(config, tokens, input, encoder)
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// The token embedding table `[vocab, d_model]`.
    pub fn token_embedding(&self) -> &Embedding {
        &self.tokens
    }

    /// Scale, positions, token types and embedding norm.
    pub fn input_embedding(&self) -> &InputEmbedding {
        &self.input
    }

    /// The encoder stack.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Every parameter under the crate's own name for it (`tokens.weight`,
    /// `encoder.layers.0.self_attn.q_proj.weight`, …), as [`Transformer::named_parameters`](crate::Transformer::named_parameters)
    /// lists them; [`to_hf_bert_safetensors`](Self::to_hf_bert_safetensors) renames them.
    pub fn named_parameters(&self) -> Vec<(String, ndarray::CowArray<'_, f32, ndarray::IxDyn>)> {
        parameters::named_values(self)
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        parameters::count(self)
    }

    /// Checks that every parameter is finite; the first NaN or infinity is an
    /// [`Error::NonFinite`] naming the tensor (in Hugging Face's names), the index and the value.
    ///
    /// # Errors
    /// [`Error::NonFinite`].
    pub fn check_finite(&self) -> Result<()> {
        naming::BERT.check_finite(self)
    }

    /// Converts every linear layer (attention projections, feed-forward layers) and the token
    /// embedding table to `precision`, in place, as
    /// [`Transformer::quantize`](crate::Transformer::quantize) does; the position and
    /// token-type tables and the norms stay f32.
    ///
    /// # Errors
    /// As [`Transformer::quantize`](crate::Transformer::quantize); the model is unchanged then.
    pub fn quantize(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision() {
            return Ok(());
        }
        self.check_finite()?;
        quantize_linears(self, precision)?;
        self.tokens.quantize(precision)
    }

    /// The precision of the linear layers.
    pub fn precision(&self) -> Precision {
        parameters::precision(self)
    }

    /// Bytes the parameters take as stored.
    pub fn parameter_bytes(&self) -> usize {
        parameters::bytes(self)
    }

    /// The encoder's input: token embeddings, positions and types, normed if configured.
    ///
    /// # Shapes
    /// - `ids`, `token_types`: `[batch, seq]`
    /// - returns `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::TokenOutOfRange`], [`Error::SequenceTooLong`],
    /// [`Error::Shape`].
    pub fn embed(
        &self,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
    ) -> Result<Array3<f32>> {
        self.input.forward(&self.tokens, ids, token_types, 0)
    }

    /// Runs the model.
    ///
    /// With a padding mask the real tokens of all rows are packed end to end and run without
    /// padding (attention stays within each row), so a batch costs what its real tokens cost,
    /// however unequal the lengths.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`
    /// - `token_types`: `[batch, seq]`, `None` for type 0 everywhere
    /// - `padding`: `[batch, seq]`, true = padding (see
    ///   [`KeyPaddingMask::from_attention_mask`] for a tokenizer's `attention_mask`)
    /// - returns `[batch, seq, d_model]`; padding positions are zero vectors
    ///
    /// # Errors
    /// As [`embed`](Self::embed), and [`Error::Shape`] if the mask does not fit.
    pub fn forward(
        &self,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
        padding: Option<&KeyPaddingMask>,
    ) -> Result<Array3<f32>> {
        let x = self.embed(ids, token_types)?;
        let mask = Mask::none().with_key_padding_opt(padding);
        self.encoder.check(x.view(), &mask)?;
        let Some(padding) = padding else {
            return Ok(self.encoder.run(x.view(), &mask, None));
        };
        // Gather the real positions, row after row.
        let is_padding = padding.is_padding();
        let lengths: Vec<usize> = is_padding
            .rows()
            .into_iter()
            .map(|row| row.iter().filter(|&&p| !p).count())
            .collect();
        let total: usize = lengths.iter().sum();
        let (batch, seq, d_model) = x.dim();
        let mut out = Array3::zeros((batch, seq, d_model));
        if total == 0 {
            return Ok(out);
        }
        let mut packed = Array3::zeros((1, total, d_model));
        let real = || {
            (0..batch)
                .flat_map(move |b| (0..seq).map(move |j| (b, j)))
                .filter(|&(b, j)| !is_padding[[b, j]])
        };
        for ((b, j), mut row) in real().zip(packed.index_axis_mut(Axis(0), 0).rows_mut()) {
            row.assign(&x.slice(s![b, j, ..]));
        }
        let packed = self.encoder.run_packed(packed, &lengths);
        for ((b, j), row) in real().zip(packed.index_axis(Axis(0), 0).rows()) {
            out.slice_mut(s![b, j, ..]).assign(&row);
        }
        Ok(out)
    }

    /// As [`forward`](Self::forward), also recording every layer's output and attention weights.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_traced(
        &self,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
        padding: Option<&KeyPaddingMask>,
    ) -> Result<EncoderTrace> {
        let x = self.embed(ids, token_types)?;
        let mask = Mask::none().with_key_padding_opt(padding);
        self.encoder.forward_traced(x.view(), &mask)
    }
}

/// `tokens`, `input` and `encoder`.
impl Linears for EncoderModel {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut crate::Linear) -> Result<()>) -> Result<()> {
        self.encoder.linears_mut(f)
    }
}

impl Parameters for EncoderModel {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "tokens", &self.tokens);
        visit_child(f, "input", &self.input);
        visit_child(f, "encoder", &self.encoder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EmbeddingConfig;
    use crate::Transformer;
    use ndarray::{array, s};
    use rand::{rngs::StdRng, SeedableRng};

    fn tiny(embedding: EmbeddingConfig, final_norm: bool) -> TransformerConfig {
        TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            num_encoder_layers: 2,
            max_len: 10,
            embedding,
            final_norm,
            ..TransformerConfig::base(20, 0)
        }
    }

    #[test]
    fn padded_rows_equal_the_rows_alone() {
        let model = EncoderModel::new(
            tiny(EmbeddingConfig::bert(2), false),
            &mut StdRng::seed_from_u64(3),
        )
        .unwrap();
        let ids = array![[1u32, 4, 7, 2], [5, 6, 0, 0]];
        let types = array![[0u32, 0, 1, 1], [0, 1, 0, 0]];
        let padding = KeyPaddingMask::from_lengths(&[4, 2], 4).unwrap();
        let both = model
            .forward(ids.view(), Some(types.view()), Some(&padding))
            .unwrap();
        let alone = model
            .forward(
                ids.slice(s![1..2, 0..2]),
                Some(types.slice(s![1..2, 0..2])),
                None,
            )
            .unwrap();
        let diff = (&both.slice(s![1..2, 0..2, ..]) - &alone)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn packed_run_equals_the_masked_padded_run() {
        let model = EncoderModel::new(
            tiny(EmbeddingConfig::bert(2), false),
            &mut StdRng::seed_from_u64(4),
        )
        .unwrap();
        let ids = array![[1u32, 4, 7, 2, 9], [5, 6, 3, 0, 0], [8, 8, 8, 8, 8]];
        // Right padding, a hole in the middle, and a row without padding.
        let padding = KeyPaddingMask::from_padding_flags(array![
            [false, false, false, false, true],
            [false, true, false, true, true],
            [false, false, false, false, false]
        ]);
        let packed = model.forward(ids.view(), None, Some(&padding)).unwrap();
        let padded = model
            .forward_traced(ids.view(), None, Some(&padding))
            .unwrap()
            .output;
        for ((b, j), &p) in padding.is_padding().indexed_iter() {
            let (x, y) = (packed.slice(s![b, j, ..]), padded.slice(s![b, j, ..]));
            if p {
                assert!(x.iter().all(|&v| v == 0.0));
            } else {
                let diff = (&x - &y).iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(diff < 1e-5, "row {b} position {j}: {diff}");
            }
        }
        // Every position padded: zeros, no error.
        let all = KeyPaddingMask::from_lengths(&[0, 0, 0], 5).unwrap();
        let out = model.forward(ids.view(), None, Some(&all)).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn paper_recipe_equals_the_transformers_encoder() {
        // Same seed, same draws: the encoder-only model must match Transformer::encode when
        // built from the transformer's own parts.
        let config = TransformerConfig {
            num_decoder_layers: 1,
            tgt_vocab: 20,
            ..tiny(EmbeddingConfig::paper(), true)
        };
        let t = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(1)).unwrap();
        let model = EncoderModel::from_parts(
            config,
            t.src_embedding().clone(),
            t.input_embedding().clone(),
            t.encoder().clone(),
        )
        .unwrap();
        let ids = array![[3u32, 1, 4, 1, 5]];
        assert_eq!(
            model.forward(ids.view(), None, None).unwrap(),
            t.encode(ids.view(), None).unwrap()
        );
    }

    #[test]
    fn config_and_parts_are_checked() {
        let bad = TransformerConfig {
            d_model: 9,
            ..tiny(EmbeddingConfig::paper(), true)
        };
        let err = EncoderModel::new(bad, &mut StdRng::seed_from_u64(0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("d_model 9 is not divisible by num_heads 2"),
            "{err}"
        );
        let model = EncoderModel::new(
            tiny(EmbeddingConfig::paper(), true),
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
        let other = TransformerConfig {
            src_vocab: 21,
            ..model.config().clone()
        };
        let err = EncoderModel::from_parts(
            other,
            model.tokens.clone(),
            model.input.clone(),
            model.encoder.clone(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("token embedding"), "{err}");
        let err = model
            .forward(array![[1u32; 11]].view(), None, None)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::SequenceTooLong {
                len: 11,
                max_len: 10
            }
        ));
    }
}
