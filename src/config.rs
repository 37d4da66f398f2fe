//! Model hyper-parameters, with the paper's presets (Table 3) and validation.

use crate::error::{Error, Result};

/// The non-linearity inside the position-wise feed-forward network (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `max(0, x)`, the paper's choice (Eq. 2).
    #[default]
    Relu,
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`, as PyTorch's `activation="gelu"`.
    Gelu,
    /// GELU's tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: PyTorch's
    /// `approximate="tanh"`, Hugging Face's `gelu_new`.
    GeluTanh,
    /// SiLU, `x·σ(x)`, which Marian (OPUS-MT) calls `swish`.
    Silu,
}

/// Where each sub-layer's LayerNorm sits relative to its residual connection (§3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormPosition {
    /// The paper's order: `LayerNorm(x + Sublayer(x))`. PyTorch's `norm_first=False`.
    #[default]
    Post,
    /// `x + Sublayer(LayerNorm(x))`, which trains more stably in deep stacks.
    /// PyTorch's `norm_first=True`.
    Pre,
}

/// Where the model learns word order from (§3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Positions {
    /// The fixed sine/cosine table of §3.5, the paper's choice.
    #[default]
    Sinusoidal,
    /// A learned `[max_len, d_model]` table, which the paper found "nearly identical"
    /// (§3.5, Table 3 row E) and which BERT-style encoders use.
    Learned,
    /// The sinusoids of §3.5 with their columns regrouped: every sine first, then every cosine
    /// (Hugging Face's Marian, OPUS-MT). The same waves, so the same information, in another
    /// order that a checkpoint's weights depend on.
    SinusoidalHalves,
}

/// How token ids become the first layer's input (§3.4, §3.5):
/// `x = E[id]·s + P[pos] (+ T[type])`, then an optional LayerNorm.
///
/// The paper's recipe is [`EmbeddingConfig::paper`]; BERT-style encoders (all-MiniLM, …) use
/// [`EmbeddingConfig::bert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// Multiply token embeddings by `s = √d_model` (§3.4); `false` means `s = 1`.
    pub scale: bool,
    /// Sinusoidal or learned positions.
    pub positions: Positions,
    /// Number of token types ("segments") with a learned embedding each, added to every
    /// position; 0 means none.
    pub type_vocab: usize,
    /// A LayerNorm over the sum (BERT's `embeddings.LayerNorm`).
    pub norm: bool,
}

impl EmbeddingConfig {
    /// The paper: scaled token embeddings plus the sinusoidal table, no types, no norm.
    pub const fn paper() -> Self {
        EmbeddingConfig {
            scale: true,
            positions: Positions::Sinusoidal,
            type_vocab: 0,
            norm: false,
        }
    }

    /// BERT: unscaled token embeddings, learned positions, `type_vocab` token types, a norm.
    pub const fn bert(type_vocab: usize) -> Self {
        EmbeddingConfig {
            scale: false,
            positions: Positions::Learned,
            type_vocab,
            norm: true,
        }
    }
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self::paper()
    }
}

/// Every hyper-parameter of a [`Transformer`](crate::Transformer) or an encoder-only
/// [`EncoderModel`](crate::EncoderModel).
///
/// Field names follow the paper: `d_model`, `num_heads` (h), `d_ff`, and N as
/// `num_encoder_layers` / `num_decoder_layers`.
///
/// ```
/// use ndtransformer::TransformerConfig;
/// let config = TransformerConfig::base(32000, 32000);
/// assert_eq!((config.d_model, config.num_heads, config.d_ff), (512, 8, 2048));
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Width of every token representation.
    pub d_model: usize,
    /// Number of attention heads h; `d_model` must be divisible by it (§3.2.2).
    pub num_heads: usize,
    /// Inner width of the feed-forward network (§3.3).
    pub d_ff: usize,
    /// Number of encoder layers N.
    pub num_encoder_layers: usize,
    /// Number of decoder layers N.
    pub num_decoder_layers: usize,
    /// Source vocabulary size.
    pub src_vocab: usize,
    /// Target vocabulary size (the width of the logits).
    pub tgt_vocab: usize,
    /// Longest sequence the positional-encoding table covers (§3.5).
    pub max_len: usize,
    /// Feed-forward non-linearity.
    pub activation: Activation,
    /// Post-LN (paper) or pre-LN residual blocks.
    pub norm_position: NormPosition,
    /// The epsilon LayerNorm adds to the variance (PyTorch's `layer_norm_eps`).
    pub layer_norm_eps: f32,
    /// One embedding matrix for source and target (§3.4); needs `src_vocab == tgt_vocab`.
    pub share_embeddings: bool,
    /// The output projection reuses the target embedding matrix (§3.4).
    pub tie_output_projection: bool,
    /// How ids become vectors: scaling, positions, token types, embedding norm.
    pub embedding: EmbeddingConfig,
    /// A LayerNorm after the last layer of each stack, as PyTorch's `nn.Transformer` always
    /// has (`encoder.norm`, `decoder.norm`); BERT-style encoders have none.
    pub final_norm: bool,
}

impl TransformerConfig {
    /// The paper's base model (Table 3): N = 6, d_model 512, d_ff 2048, h 8.
    pub fn base(src_vocab: usize, tgt_vocab: usize) -> Self {
        TransformerConfig {
            d_model: 512,
            num_heads: 8,
            d_ff: 2048,
            num_encoder_layers: 6,
            num_decoder_layers: 6,
            src_vocab,
            tgt_vocab,
            max_len: 5000,
            activation: Activation::Relu,
            norm_position: NormPosition::Post,
            layer_norm_eps: 1e-5,
            share_embeddings: false,
            tie_output_projection: false,
            embedding: EmbeddingConfig::paper(),
            final_norm: true,
        }
    }

    /// The paper's big model (Table 3): N = 6, d_model 1024, d_ff 4096, h 16.
    pub fn big(src_vocab: usize, tgt_vocab: usize) -> Self {
        TransformerConfig {
            d_model: 1024,
            num_heads: 16,
            d_ff: 4096,
            ..Self::base(src_vocab, tgt_vocab)
        }
    }

    /// Width of each head's queries, keys and values: `d_k = d_v = d_model / num_heads`.
    pub fn d_k(&self) -> usize {
        self.d_model / self.num_heads.max(1)
    }

    /// Checks every field; the error names the first bad field and its value.
    pub fn validate(&self) -> Result<()> {
        self.validate_encoder()?;
        positive(&[
            ("num_decoder_layers", self.num_decoder_layers),
            ("tgt_vocab", self.tgt_vocab),
        ])?;
        within_u32("tgt_vocab", self.tgt_vocab)?;
        check_elements(
            "tgt_vocab",
            "the target embedding [tgt_vocab, d_model]",
            &[self.tgt_vocab, self.d_model],
        )?;
        if self.share_embeddings && self.src_vocab != self.tgt_vocab {
            return Err(Error::config(
                "share_embeddings",
                format!(
                    "share_embeddings needs src_vocab == tgt_vocab, found src_vocab {} and tgt_vocab {}",
                    self.src_vocab, self.tgt_vocab
                ),
            ));
        }
        Ok(())
    }

    /// Checks the fields an encoder-only model uses: widths, heads, `num_encoder_layers`,
    /// `src_vocab`, `max_len`, eps. The decoder's fields are ignored.
    pub fn validate_encoder(&self) -> Result<()> {
        positive(&[
            ("d_model", self.d_model),
            ("num_heads", self.num_heads),
            ("d_ff", self.d_ff),
            ("num_encoder_layers", self.num_encoder_layers),
            ("src_vocab", self.src_vocab),
            ("max_len", self.max_len),
        ])?;
        validate_heads(self.d_model, self.num_heads)?;
        validate_eps(self.layer_norm_eps)?;
        let d_model = self.d_model;
        for (field, what, rows) in [
            (
                "src_vocab",
                "the source embedding [src_vocab, d_model]",
                self.src_vocab,
            ),
            ("d_ff", "the feed-forward weight [d_ff, d_model]", self.d_ff),
            (
                "max_len",
                "the positional-encoding table [max_len, d_model]",
                self.max_len,
            ),
            (
                "embedding.type_vocab",
                "the token-type embedding [type_vocab, d_model]",
                self.embedding.type_vocab,
            ),
        ] {
            check_elements(field, what, &[rows, d_model])?;
        }
        within_u32("src_vocab", self.src_vocab)?;
        within_u32("embedding.type_vocab", self.embedding.type_vocab)
    }
}

fn positive(fields: &[(&'static str, usize)]) -> Result<()> {
    for &(field, value) in fields {
        if value == 0 {
            return Err(Error::config(
                field,
                format!("{field} is 0, it must be at least 1"),
            ));
        }
    }
    Ok(())
}

fn within_u32(field: &'static str, value: usize) -> Result<()> {
    if value > u32::MAX as usize + 1 {
        return Err(Error::config(
            field,
            format!("{field} {value} exceeds the u32 token-id range"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_heads(d_model: usize, num_heads: usize) -> Result<()> {
    if num_heads == 0 {
        return Err(Error::config(
            "num_heads",
            "num_heads is 0, it must be at least 1",
        ));
    }
    if d_model == 0 {
        return Err(Error::config(
            "d_model",
            "d_model is 0, it must be at least 1",
        ));
    }
    if !d_model.is_multiple_of(num_heads) {
        return Err(Error::config(
            "d_model",
            format!("d_model {d_model} is not divisible by num_heads {num_heads}"),
        ));
    }
    check_elements(
        "d_model",
        "the stacked Q/K/V projection [3·d_model, d_model]",
        &[3, d_model, d_model],
    )
}

/// The most f32 values one array can hold: its byte size must fit in `isize`.
const MAX_ELEMENTS: usize = isize::MAX as usize / std::mem::size_of::<f32>();

/// Checks that an f32 array with axes `dims` can exist at all (its size does not overflow), so
/// that a huge config is an error instead of a panic inside ndarray.
pub(crate) fn check_elements(field: &'static str, what: &str, dims: &[usize]) -> Result<()> {
    let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if elements.is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(Error::config(
            field,
            format!("{what} = {dims:?} holds more than the {MAX_ELEMENTS} f32 values an array can address"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_eps(eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::config(
            "layer_norm_eps",
            format!("layer_norm_eps {eps} must be finite and positive"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_table_3() {
        let b = TransformerConfig::base(100, 200);
        assert_eq!(
            (b.num_encoder_layers, b.d_model, b.d_ff, b.num_heads),
            (6, 512, 2048, 8)
        );
        assert_eq!(b.d_k(), 64);
        let g = TransformerConfig::big(100, 200);
        assert_eq!(
            (g.num_encoder_layers, g.d_model, g.d_ff, g.num_heads),
            (6, 1024, 4096, 16)
        );
        assert_eq!(g.d_k(), 64);
        b.validate().unwrap();
        g.validate().unwrap();
    }

    #[test]
    fn indivisible_heads_name_both_values() {
        let c = TransformerConfig {
            d_model: 510,
            ..TransformerConfig::base(10, 10)
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("d_model 510 is not divisible by num_heads 8"),
            "{msg}"
        );
    }

    #[test]
    fn zero_fields_are_named() {
        for field in [
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_len",
            "tgt_vocab",
        ] {
            let mut c = TransformerConfig::base(10, 10);
            match field {
                "d_ff" => c.d_ff = 0,
                "num_encoder_layers" => c.num_encoder_layers = 0,
                "num_decoder_layers" => c.num_decoder_layers = 0,
                "max_len" => c.max_len = 0,
                _ => c.tgt_vocab = 0,
            }
            match c.validate() {
                Err(Error::Config { field: f, reason }) => {
                    assert_eq!(f, field);
                    assert!(reason.contains("is 0"), "{reason}");
                }
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_that_overflow_are_rejected() {
        let c = TransformerConfig {
            max_len: usize::MAX / 2,
            ..TransformerConfig::base(10, 10)
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains(&format!("[{}, 512]", usize::MAX / 2)), "{msg}");
        let c = TransformerConfig {
            d_model: 1 << 40,
            num_heads: 1,
            ..TransformerConfig::base(10, 10)
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("3·d_model"), "{msg}");
    }

    #[test]
    fn bad_eps_and_shared_vocab_are_rejected() {
        let c = TransformerConfig {
            layer_norm_eps: -1.0,
            ..TransformerConfig::base(10, 10)
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("layer_norm_eps -1"));
        let c = TransformerConfig {
            share_embeddings: true,
            ..TransformerConfig::base(10, 12)
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("src_vocab 10") && msg.contains("tgt_vocab 12"),
            "{msg}"
        );
    }
}
