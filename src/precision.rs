//! The number formats a model's linear layers can keep their weights in.

use std::fmt;

/// How the weights of a model's linear layers are stored and multiplied.
///
/// [`F32`](Precision::F32) is the default and matches PyTorch to float32 rounding.
/// [`Int8`](Precision::Int8) is opt-in: each weight row is stored as int8 values with one f32
/// scale, `W[o, :] ≈ s[o] · q[o, :]` with `s[o] = max|W[o, :]| / 127`. Each input row (each
/// token) is quantized the same way when a layer runs, the products are summed exactly in i32
/// and scaled back by both scales. The weights take a quarter of the memory and are read four
/// times faster. Token embedding tables are stored the same way, one scale per token, and an
/// output projection tied to one shares its int8 values. LayerNorm, softmax, residuals, the
/// position and token-type tables and the KV cache stay f32.
/// [`Bf16`](Precision::Bf16) is opt-in too: each weight is rounded to the nearest bfloat16
/// (ties to even), half of the f32 bytes, and widened back exactly when a layer runs; the
/// activations stay f32 and the products are summed in f32. Embedding tables, LayerNorm,
/// softmax, residuals and the KV cache stay f32 here (a tied output projection gets its own
/// bf16 copy of the table). Converting between two reduced precisions goes through the f32
/// weight that [`F32`](Precision::F32) would give back.
///
/// ```
/// # use rand::{rngs::StdRng, SeedableRng};
/// use ndtransformer::{Precision, Transformer, TransformerConfig};
/// let config = TransformerConfig { d_model: 32, num_heads: 4, d_ff: 64, num_encoder_layers: 1,
///     num_decoder_layers: 1, ..TransformerConfig::base(50, 50) };
/// let mut model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
/// model.quantize(Precision::Int8)?;
/// assert_eq!(model.precision(), Precision::Int8);
/// model.quantize(Precision::Bf16)?; // through the int8 weights' f32 values
/// assert_eq!(model.precision(), Precision::Bf16);
/// assert_eq!(Precision::Bf16.to_string(), "bf16");
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Precision {
    /// 32-bit floats: PyTorch's numbers.
    #[default]
    F32,
    /// int8 weights with one scale per output row; int8 activations with one scale per row.
    Int8,
    /// bfloat16 weights (8 significant bits, f32's range); f32 activations and sums.
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        })
    }
}
