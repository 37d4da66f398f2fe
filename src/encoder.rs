//! The encoder (§3.1, left half of Figure 1): a stack of N identical layers, each
//! self-attention followed by a position-wise feed-forward network.
//!
//! In self-attention every source position attends to every other, so after N layers each
//! position's vector ("memory") carries context from the whole sentence; the decoder reads it
//! through cross-attention.

use ndarray::{Array3, Array4, ArrayView3};
use rand::Rng;

use crate::attention::MultiHeadAttention;
use crate::config::{NormPosition, TransformerConfig};
use crate::error::{Error, Result};
use crate::feed_forward::FeedForward;
use crate::layer_norm::LayerNorm;
use crate::linear::{Linear, Linears};
use crate::mask::Mask;
use crate::ops;
use crate::parameters::{visit_child, Parameters, Scope, Visitor};
use crate::residual::{norm_inplace, residual};

/// One encoder layer: `x → Norm(x + SelfAttn(x)) → Norm(x + FFN(x))` (post-LN), or the pre-LN order.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderLayer {
    self_attn: MultiHeadAttention,
    feed_forward: FeedForward,
    self_attn_norm: LayerNorm,
    ffn_norm: LayerNorm,
    norm_position: NormPosition,
}

impl EncoderLayer {
    /// A layer from its parts.
    ///
    /// # Errors
    /// [`Error::Shape`] if the parts' widths differ.
    pub fn new(
        self_attn: MultiHeadAttention,
        feed_forward: FeedForward,
        self_attn_norm: LayerNorm,
        ffn_norm: LayerNorm,
        norm_position: NormPosition,
    ) -> Result<Self> {
        check_widths(
            self_attn.d_model(),
            &[
                ("feed-forward", feed_forward.d_model()),
                ("self_attn_norm", self_attn_norm.d_model()),
                ("ffn_norm", ffn_norm.d_model()),
            ],
        )?;
        Ok(EncoderLayer {
            self_attn,
            feed_forward,
            self_attn_norm,
            ffn_norm,
            norm_position,
        })
    }

    /// Reads the layer's tensors (the names of its [`Parameters`] walk) from `scope`.
    pub(crate) fn load(scope: &mut Scope, c: &TransformerConfig) -> Result<Self> {
        let (d, eps) = (c.d_model, c.layer_norm_eps);
        Self::new(
            MultiHeadAttention::load(&mut scope.child("self_attn"), d, c.num_heads)?,
            FeedForward::load(&mut scope.child("feed_forward"), c)?,
            LayerNorm::load(&mut scope.child("self_attn_norm"), d, eps)?,
            LayerNorm::load(&mut scope.child("ffn_norm"), d, eps)?,
            c.norm_position,
        )
    }

    /// A freshly initialised layer with `config`'s widths, activation, norm order and eps.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field if `config.validate_encoder()` fails.
    pub fn init<R: Rng + ?Sized>(config: &TransformerConfig, rng: &mut R) -> Result<Self> {
        config.validate_encoder()?;
        let (d_model, eps) = (config.d_model, config.layer_norm_eps);
        let self_attn = MultiHeadAttention::init(d_model, config.num_heads, rng)?;
        let feed_forward = FeedForward::init(d_model, config.d_ff, config.activation, rng);
        Self::new(
            self_attn,
            feed_forward,
            LayerNorm::identity(d_model, eps)?,
            LayerNorm::identity(d_model, eps)?,
            config.norm_position,
        )
    }

    /// The self-attention sub-layer.
    pub fn self_attn(&self) -> &MultiHeadAttention {
        &self.self_attn
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.self_attn.d_model()
    }

    /// Runs the layer.
    ///
    /// # Shapes
    /// - `x`: `[batch, src_len, d_model]`
    /// - `mask`: usually the source key padding `[batch, src_len]`
    /// - returns `[batch, src_len, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Empty`] if `x` or the mask do not fit.
    pub fn forward(&self, x: ArrayView3<f32>, mask: &Mask) -> Result<Array3<f32>> {
        check_input(x, self.d_model(), "encoder layer input")?;
        mask.check(x.shape()[0], x.shape()[1], x.shape()[1])?;
        Ok(self.forward_unchecked(x.as_standard_layout().into_owned(), mask, None))
    }

    pub(crate) fn forward_unchecked(
        &self,
        x: Array3<f32>,
        mask: &Mask,
        weights: Option<&mut Array4<f32>>,
    ) -> Array3<f32> {
        let x = residual(x, &self.self_attn_norm, self.norm_position, |h| {
            self.self_attn.forward_unchecked(h, h, mask, weights)
        });
        residual(x, &self.ffn_norm, self.norm_position, |h| {
            self.feed_forward.forward_unchecked(h)
        })
    }
}

impl EncoderLayer {
    /// The layer on sequences packed without padding (`[1, total, d_model]`, sequence `i` in
    /// the next `lengths[i]` positions): every sub-layer but attention works token by token, so
    /// only attention needs to know where sequences end.
    pub(crate) fn forward_packed(&self, x: Array3<f32>, lengths: &[usize]) -> Array3<f32> {
        let x = residual(x, &self.self_attn_norm, self.norm_position, |h| {
            self.self_attn.self_attend_packed(h, lengths)
        });
        residual(x, &self.ffn_norm, self.norm_position, |h| {
            self.feed_forward.forward_unchecked(h)
        })
    }
}

/// What [`Encoder::forward_traced`] records besides the output.
#[derive(Debug, Clone)]
pub struct EncoderTrace {
    /// The memory, after the final norm: `[batch, src_len, d_model]`.
    pub output: Array3<f32>,
    /// Each layer's output (before the final norm): N × `[batch, src_len, d_model]`.
    pub layer_outputs: Vec<Array3<f32>>,
    /// Each layer's self-attention weights: N × `[batch, num_heads, src_len, src_len]`.
    pub self_attention: Vec<Array4<f32>>,
}

/// N encoder layers and the final LayerNorm.
///
/// The final norm is the one PyTorch's `nn.Transformer` always adds (`encoder.norm`): for
/// pre-LN stacks it normalises the un-normalised residual stream; for post-LN stacks (the
/// paper's order) it is applied on top of the last layer's own norm, a PyTorch quirk this crate
/// reproduces so that PyTorch weights give PyTorch's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    norm: Option<LayerNorm>,
}

impl Encoder {
    /// A stack from its layers and an optional final norm.
    ///
    /// # Errors
    /// [`Error::Config`] for zero layers; [`Error::Shape`] if widths differ.
    pub fn new(layers: Vec<EncoderLayer>, norm: Option<LayerNorm>) -> Result<Self> {
        let d_model = stack_width(
            layers.iter().map(|l| l.d_model()),
            norm.as_ref(),
            "num_encoder_layers",
        )?;
        debug_assert!(d_model > 0);
        Ok(Encoder { layers, norm })
    }

    /// Reads `layers.{i}` for each of `config`'s layers and, with `final_norm`, `norm`.
    pub(crate) fn load(scope: &mut Scope, config: &TransformerConfig) -> Result<Self> {
        let layers = (0..config.num_encoder_layers)
            .map(|i| EncoderLayer::load(&mut scope.child(&format!("layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Self::new(layers, load_final_norm(scope, config)?)
    }

    /// The layers.
    pub fn layers(&self) -> &[EncoderLayer] {
        &self.layers
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.layers[0].d_model()
    }

    /// Encodes an embedded source.
    ///
    /// # Shapes
    /// - `x`: `[batch, src_len, d_model]` (embeddings + positional encoding)
    /// - `mask`: usually the source key padding `[batch, src_len]`
    /// - returns the memory `[batch, src_len, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Empty`] if `x` or the mask do not fit.
    pub fn forward(&self, x: ArrayView3<f32>, mask: &Mask) -> Result<Array3<f32>> {
        self.check(x, mask)?;
        Ok(self.run(x, mask, None))
    }

    /// As [`forward`](Self::forward), also recording every layer's output and attention weights.
    pub fn forward_traced(&self, x: ArrayView3<f32>, mask: &Mask) -> Result<EncoderTrace> {
        self.check(x, mask)?;
        let mut trace = EncoderTrace {
            output: Array3::zeros((0, 0, 0)),
            layer_outputs: Vec::with_capacity(self.layers.len()),
            self_attention: Vec::with_capacity(self.layers.len()),
        };
        trace.output = self.run(x, mask, Some(&mut trace));
        Ok(trace)
    }

    pub(crate) fn check(&self, x: ArrayView3<f32>, mask: &Mask) -> Result<()> {
        check_input(x, self.d_model(), "encoder input")?;
        mask.check(x.shape()[0], x.shape()[1], x.shape()[1])
    }

    pub(crate) fn run(
        &self,
        x: ArrayView3<f32>,
        mask: &Mask,
        trace: Option<&mut EncoderTrace>,
    ) -> Array3<f32> {
        ops::with_warm_pool(|| self.run_layers(x, mask, trace))
    }

    fn run_layers(
        &self,
        x: ArrayView3<f32>,
        mask: &Mask,
        mut trace: Option<&mut EncoderTrace>,
    ) -> Array3<f32> {
        let (b, len, _) = x.dim();
        let mut x = x.as_standard_layout().into_owned();
        for layer in &self.layers {
            let mut weights = trace
                .as_ref()
                .map(|_| Array4::zeros((b, layer.self_attn.num_heads(), len, len)));
            x = layer.forward_unchecked(x, mask, weights.as_mut());
            if let Some(t) = trace.as_deref_mut() {
                t.layer_outputs.push(x.clone());
                t.self_attention.extend(weights);
            }
        }
        if let Some(norm) = &self.norm {
            norm_inplace(norm, &mut x);
        }
        x
    }
}

impl Encoder {
    /// The stack on sequences packed without padding (see [`EncoderLayer::forward_packed`]).
    pub(crate) fn run_packed(&self, mut x: Array3<f32>, lengths: &[usize]) -> Array3<f32> {
        ops::with_warm_pool(|| {
            for layer in &self.layers {
                x = layer.forward_packed(x, lengths);
            }
            if let Some(norm) = &self.norm {
                norm_inplace(norm, &mut x);
            }
            x
        })
    }
}

/// Checks a `[batch, len, d_model]` input: non-empty, right width.
pub(crate) fn check_input(x: ArrayView3<f32>, d_model: usize, what: &str) -> Result<()> {
    if x.is_empty() {
        return Err(Error::Empty {
            what: what.into(),
            shape: x.shape().to_vec(),
        });
    }
    if x.shape()[2] != d_model {
        return Err(Error::shape(
            what,
            format!("[batch, len, d_model] with d_model {d_model}"),
            x.shape(),
        ));
    }
    Ok(())
}

/// Checks that every part of a layer has width `d_model`.
pub(crate) fn check_widths(d_model: usize, parts: &[(&str, usize)]) -> Result<()> {
    for &(name, width) in parts {
        if width != d_model {
            return Err(Error::shape(
                format!("{name} width"),
                format!("d_model {d_model} like the self-attention"),
                &[width],
            ));
        }
    }
    Ok(())
}

/// The common width of a stack's layers and final norm; errors on zero layers or a mismatch.
pub(crate) fn stack_width(
    widths: impl Iterator<Item = usize>,
    norm: Option<&LayerNorm>,
    field: &'static str,
) -> Result<usize> {
    let widths: Vec<usize> = widths.collect();
    let Some(&d_model) = widths.first() else {
        return Err(Error::config(
            field,
            format!("{field} is 0, it must be at least 1"),
        ));
    };
    let mut parts: Vec<(String, usize)> = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| (format!("layer {i}"), w))
        .collect();
    if let Some(n) = norm {
        parts.push(("final norm".into(), n.d_model()));
    }
    let parts: Vec<(&str, usize)> = parts.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    check_widths(d_model, &parts)?;
    Ok(d_model)
}

impl Linears for EncoderLayer {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        self.self_attn.linears_mut(f)?;
        self.feed_forward.linears_mut(f)
    }
}

impl Linears for Encoder {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.linears_mut(f))
    }
}

impl Parameters for EncoderLayer {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "self_attn", &self.self_attn);
        visit_child(f, "feed_forward", &self.feed_forward);
        visit_child(f, "self_attn_norm", &self.self_attn_norm);
        visit_child(f, "ffn_norm", &self.ffn_norm);
    }
}

impl Parameters for Encoder {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_stack(f, &self.layers, self.norm.as_ref());
    }
}

/// A stack's `layers.{i}` and its final `norm`.
pub(crate) fn visit_stack<'a, L: Parameters>(
    f: &mut Visitor<'_, 'a>,
    layers: &'a [L],
    norm: Option<&'a LayerNorm>,
) {
    for (i, layer) in layers.iter().enumerate() {
        visit_child(f, &format!("layers.{i}"), layer);
    }
    if let Some(n) = norm {
        visit_child(f, "norm", n);
    }
}

/// A stack's final `norm` when `config.final_norm` asks for one.
pub(crate) fn load_final_norm(
    scope: &mut Scope,
    config: &TransformerConfig,
) -> Result<Option<LayerNorm>> {
    config
        .final_norm
        .then(|| {
            LayerNorm::load(
                &mut scope.child("norm"),
                config.d_model,
                config.layer_norm_eps,
            )
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::KeyPaddingMask;
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array3};
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    fn tiny(norm_position: NormPosition) -> TransformerConfig {
        TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            norm_position,
            ..TransformerConfig::base(10, 10)
        }
    }

    fn encoder(position: NormPosition, rng: &mut StdRng) -> Encoder {
        let layers = (0..2)
            .map(|_| EncoderLayer::init(&tiny(position), rng).unwrap())
            .collect();
        Encoder::new(layers, Some(LayerNorm::identity(8, 1e-5).unwrap())).unwrap()
    }

    #[test]
    fn padded_sequence_equals_the_sequence_alone() {
        for position in [NormPosition::Post, NormPosition::Pre] {
            let mut rng = StdRng::seed_from_u64(11);
            let enc = encoder(position, &mut rng);
            let x = Array3::from_shape_simple_fn((2, 6, 8), || rng.random_range(-1.0..1.0));
            let kp = KeyPaddingMask::from_lengths(&[6, 4], 6).unwrap();
            let batched = enc
                .forward(x.view(), &Mask::none().with_key_padding(&kp))
                .unwrap();
            let alone = enc
                .forward(x.slice(s![1..2, ..4, ..]), &Mask::none())
                .unwrap();
            assert_abs_diff_eq!(batched.slice(s![1..2, ..4, ..]), alone, epsilon = 1e-5);
            let first = enc
                .forward(x.slice(s![0..1, .., ..]), &Mask::none())
                .unwrap();
            assert_abs_diff_eq!(batched.slice(s![0..1, .., ..]), first, epsilon = 1e-5);
        }
    }

    #[test]
    fn trace_agrees_with_forward() {
        let mut rng = StdRng::seed_from_u64(12);
        let enc = encoder(NormPosition::Post, &mut rng);
        let x = Array3::from_shape_simple_fn((1, 3, 8), || rng.random_range(-1.0..1.0));
        let t = enc.forward_traced(x.view(), &Mask::none()).unwrap();
        assert_eq!(t.output, enc.forward(x.view(), &Mask::none()).unwrap());
        assert_eq!((t.layer_outputs.len(), t.self_attention.len()), (2, 2));
        assert_eq!(t.self_attention[1].shape(), &[1, 2, 3, 3]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = StdRng::seed_from_u64(13);
        let enc = encoder(NormPosition::Post, &mut rng);
        assert!(matches!(
            enc.forward(Array3::zeros((0, 3, 8)).view(), &Mask::none()),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            enc.forward(Array3::zeros((1, 3, 7)).view(), &Mask::none()),
            Err(Error::Shape { .. })
        ));
        assert!(Encoder::new(vec![], None).is_err());
    }
}
