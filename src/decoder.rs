//! The decoder (§3.1, right half of Figure 1): N identical layers, each masked self-attention,
//! encoder-decoder (cross) attention over the memory, and a feed-forward network.
//!
//! Self-attention is causal so that position `i` depends only on the targets before it, which
//! lets training run all positions at once and generation run one token at a time. In
//! cross-attention the queries come from the decoder and the keys and values from the encoder's
//! memory: this is where the output "looks at" the input.

use ndarray::{Array3, Array4, ArrayView3};
use rand::Rng;

use crate::attention::cache::{KeyValueCache, LayerCache};
use crate::attention::MultiHeadAttention;
use crate::config::{NormPosition, TransformerConfig};
use crate::encoder::{check_input, check_widths, load_final_norm, stack_width, visit_stack};
use crate::error::{Error, Result};
use crate::feed_forward::FeedForward;
use crate::layer_norm::LayerNorm;
use crate::linear::{Linear, Linears};
use crate::mask::Mask;
use crate::ops;
use crate::parameters::{visit_child, Parameters, Scope, Visitor};
use crate::residual::{norm_inplace, residual};

/// One decoder layer: masked self-attention, cross-attention over the memory, feed-forward,
/// each wrapped in a residual connection and LayerNorm (post-LN or pre-LN).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderLayer {
    self_attn: MultiHeadAttention,
    cross_attn: MultiHeadAttention,
    feed_forward: FeedForward,
    self_attn_norm: LayerNorm,
    cross_attn_norm: LayerNorm,
    ffn_norm: LayerNorm,
    norm_position: NormPosition,
}

/// Attention weights a decoder layer can return.
type LayerWeights<'a> = Option<(&'a mut Array4<f32>, &'a mut Array4<f32>)>;

impl DecoderLayer {
    /// A layer from its parts.
    ///
    /// # Errors
    /// [`Error::Shape`] if the parts' widths differ.
    pub fn new(
        self_attn: MultiHeadAttention,
        cross_attn: MultiHeadAttention,
        feed_forward: FeedForward,
        norms: [LayerNorm; 3],
        norm_position: NormPosition,
    ) -> Result<Self> {
        let [self_attn_norm, cross_attn_norm, ffn_norm] = norms;
        check_widths(
            self_attn.d_model(),
            &[
                ("cross-attention", cross_attn.d_model()),
                ("feed-forward", feed_forward.d_model()),
                ("self_attn_norm", self_attn_norm.d_model()),
                ("cross_attn_norm", cross_attn_norm.d_model()),
                ("ffn_norm", ffn_norm.d_model()),
            ],
        )?;
        Ok(DecoderLayer {
            self_attn,
            cross_attn,
            feed_forward,
            self_attn_norm,
            cross_attn_norm,
            ffn_norm,
            norm_position,
        })
    }

    /// Reads the layer's tensors (the names of its [`Parameters`] walk) from `scope`.
    pub(crate) fn load(scope: &mut Scope, c: &TransformerConfig) -> Result<Self> {
        let (d, eps) = (c.d_model, c.layer_norm_eps);
        Self::new(
            MultiHeadAttention::load(&mut scope.child("self_attn"), d, c.num_heads)?,
            MultiHeadAttention::load(&mut scope.child("cross_attn"), d, c.num_heads)?,
            FeedForward::load(&mut scope.child("feed_forward"), c)?,
            [
                LayerNorm::load(&mut scope.child("self_attn_norm"), d, eps)?,
                LayerNorm::load(&mut scope.child("cross_attn_norm"), d, eps)?,
                LayerNorm::load(&mut scope.child("ffn_norm"), d, eps)?,
            ],
            c.norm_position,
        )
    }

    /// A freshly initialised layer with `config`'s widths, activation, norm order and eps.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field if `config.validate()` fails.
    pub fn init<R: Rng + ?Sized>(config: &TransformerConfig, rng: &mut R) -> Result<Self> {
        config.validate()?;
        let (d_model, eps) = (config.d_model, config.layer_norm_eps);
        let self_attn = MultiHeadAttention::init(d_model, config.num_heads, rng)?;
        let cross_attn = MultiHeadAttention::init(d_model, config.num_heads, rng)?;
        let feed_forward = FeedForward::init(d_model, config.d_ff, config.activation, rng);
        let norm = || LayerNorm::identity(d_model, eps);
        Self::new(
            self_attn,
            cross_attn,
            feed_forward,
            [norm()?, norm()?, norm()?],
            config.norm_position,
        )
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.self_attn.d_model()
    }

    /// The masked self-attention sub-layer.
    pub fn self_attn(&self) -> &MultiHeadAttention {
        &self.self_attn
    }

    /// The encoder-decoder attention sub-layer.
    pub fn cross_attn(&self) -> &MultiHeadAttention {
        &self.cross_attn
    }

    /// Runs the layer.
    ///
    /// # Shapes
    /// - `x`: `[batch, tgt_len, d_model]`
    /// - `memory`: `[batch, src_len, d_model]`
    /// - `self_mask`: usually causal + target key padding `[batch, tgt_len]`
    /// - `cross_mask`: usually the source key padding `[batch, src_len]`
    /// - returns `[batch, tgt_len, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Empty`] if inputs or masks do not fit.
    pub fn forward(
        &self,
        x: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
    ) -> Result<Array3<f32>> {
        check_decoder_inputs(x, memory, self.d_model(), self_mask, cross_mask)?;
        Ok(self.forward_unchecked(
            x.as_standard_layout().into_owned(),
            memory,
            self_mask,
            cross_mask,
            None,
        ))
    }

    pub(crate) fn forward_unchecked(
        &self,
        x: Array3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
        weights: LayerWeights,
    ) -> Array3<f32> {
        let (self_w, cross_w) = match weights {
            Some((s, c)) => (Some(s), Some(c)),
            None => (None, None),
        };
        let p = self.norm_position;
        let x = residual(x, &self.self_attn_norm, p, |h| {
            self.self_attn.forward_unchecked(h, h, self_mask, self_w)
        });
        let x = residual(x, &self.cross_attn_norm, p, |h| {
            self.cross_attn
                .forward_unchecked(h, memory, cross_mask, cross_w)
        });
        residual(x, &self.ffn_norm, p, |h| {
            self.feed_forward.forward_unchecked(h)
        })
    }

    /// An empty self-attention cache with room for `capacity` target positions, and the
    /// cross-attention keys and values of `memory` `[batch, src_len, d_model]`.
    pub(crate) fn start_cache(&self, memory: ArrayView3<f32>, capacity: usize) -> LayerCache {
        let a = &self.cross_attn;
        let [_, k_proj, v_proj, _] = a.projections();
        let cross =
            KeyValueCache::from_full(a.split_heads(memory, k_proj), a.split_heads(memory, v_proj));
        let own = &self.self_attn;
        LayerCache {
            self_attn: KeyValueCache::with_capacity(
                memory.shape()[0],
                capacity,
                own.num_heads(),
                own.d_k(),
            ),
            cross_attn: cross,
        }
    }

    /// The layer on the newest target positions `x` `[batch, new, d_model]`, reading and
    /// extending `cache`: the same arithmetic as [`forward`](Self::forward) on the whole prefix.
    pub(crate) fn forward_step(
        &self,
        x: Array3<f32>,
        cache: &mut LayerCache,
        cross_mask: &Mask,
    ) -> Array3<f32> {
        let p = self.norm_position;
        let x = residual(x, &self.self_attn_norm, p, |h| {
            let a = &self.self_attn;
            let [q_proj, k_proj, v_proj, _] = a.projections();
            let q = a.split_heads(h, q_proj);
            let (k, v) = (a.split_heads(h, k_proj), a.split_heads(h, v_proj));
            cache.self_attn.append(k.view(), v.view());
            // The new queries sit at the end of the cached keys: causal, bottom-right aligned.
            a.attend_cached(&q, &cache.self_attn, &Mask::causal())
        });
        let x = residual(x, &self.cross_attn_norm, p, |h| {
            let a = &self.cross_attn;
            let q = a.split_heads(h, a.projections()[0]);
            a.attend_cached(&q, &cache.cross_attn, cross_mask)
        });
        residual(x, &self.ffn_norm, p, |h| {
            self.feed_forward.forward_unchecked(h)
        })
    }
}

/// What [`Decoder::forward_traced`] records besides the output.
#[derive(Debug, Clone)]
pub struct DecoderTrace {
    /// The decoder output, after the final norm: `[batch, tgt_len, d_model]`.
    pub output: Array3<f32>,
    /// Each layer's output (before the final norm): N × `[batch, tgt_len, d_model]`.
    pub layer_outputs: Vec<Array3<f32>>,
    /// Each layer's self-attention weights: N × `[batch, num_heads, tgt_len, tgt_len]`.
    pub self_attention: Vec<Array4<f32>>,
    /// Each layer's cross-attention weights: N × `[batch, num_heads, tgt_len, src_len]`.
    pub cross_attention: Vec<Array4<f32>>,
}

/// N decoder layers and the final LayerNorm (PyTorch's `decoder.norm`; see [`Encoder`](crate::Encoder)
/// for why a post-LN stack has it too).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoder {
    layers: Vec<DecoderLayer>,
    norm: Option<LayerNorm>,
}

impl Decoder {
    /// A stack from its layers and an optional final norm.
    ///
    /// # Errors
    /// [`Error::Config`] for zero layers; [`Error::Shape`] if widths differ.
    pub fn new(layers: Vec<DecoderLayer>, norm: Option<LayerNorm>) -> Result<Self> {
        stack_width(
            layers.iter().map(|l| l.d_model()),
            norm.as_ref(),
            "num_decoder_layers",
        )?;
        Ok(Decoder { layers, norm })
    }

    /// Reads `layers.{i}` for each of `config`'s layers and, with `final_norm`, `norm`.
    pub(crate) fn load(scope: &mut Scope, config: &TransformerConfig) -> Result<Self> {
        let layers = (0..config.num_decoder_layers)
            .map(|i| DecoderLayer::load(&mut scope.child(&format!("layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Self::new(layers, load_final_norm(scope, config)?)
    }

    /// The layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.layers[0].d_model()
    }

    /// Decodes an embedded target against the encoder memory.
    ///
    /// # Shapes
    /// - `x`: `[batch, tgt_len, d_model]` (embeddings + positional encoding)
    /// - `memory`: `[batch, src_len, d_model]`
    /// - `self_mask`: usually [`Mask::causal`] + target key padding `[batch, tgt_len]`
    /// - `cross_mask`: usually the source key padding `[batch, src_len]`
    /// - returns `[batch, tgt_len, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Empty`] if inputs or masks do not fit.
    pub fn forward(
        &self,
        x: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
    ) -> Result<Array3<f32>> {
        check_decoder_inputs(x, memory, self.d_model(), self_mask, cross_mask)?;
        Ok(self.run(x, memory, self_mask, cross_mask, None))
    }

    /// As [`forward`](Self::forward), also recording every layer's output and attention weights.
    pub fn forward_traced(
        &self,
        x: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
    ) -> Result<DecoderTrace> {
        check_decoder_inputs(x, memory, self.d_model(), self_mask, cross_mask)?;
        let mut trace = DecoderTrace {
            output: Array3::zeros((0, 0, 0)),
            layer_outputs: Vec::new(),
            self_attention: Vec::new(),
            cross_attention: Vec::new(),
        };
        trace.output = self.run(x, memory, self_mask, cross_mask, Some(&mut trace));
        Ok(trace)
    }

    pub(crate) fn run(
        &self,
        x: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
        trace: Option<&mut DecoderTrace>,
    ) -> Array3<f32> {
        ops::with_warm_pool(|| self.run_layers(x, memory, self_mask, cross_mask, trace))
    }

    fn run_layers(
        &self,
        x: ArrayView3<f32>,
        memory: ArrayView3<f32>,
        self_mask: &Mask,
        cross_mask: &Mask,
        mut trace: Option<&mut DecoderTrace>,
    ) -> Array3<f32> {
        let (b, tgt_len, _) = x.dim();
        let src_len = memory.shape()[1];
        let mut x = x.as_standard_layout().into_owned();
        for layer in &self.layers {
            let h = layer.self_attn.num_heads();
            let mut weights = trace.as_ref().map(|_| {
                (
                    Array4::zeros((b, h, tgt_len, tgt_len)),
                    Array4::zeros((b, h, tgt_len, src_len)),
                )
            });
            x = layer.forward_unchecked(
                x,
                memory,
                self_mask,
                cross_mask,
                weights.as_mut().map(|(s, c)| (s, c)),
            );
            if let Some(t) = trace.as_deref_mut() {
                t.layer_outputs.push(x.clone());
                if let Some((s, c)) = weights {
                    t.self_attention.push(s);
                    t.cross_attention.push(c);
                }
            }
        }
        if let Some(norm) = &self.norm {
            norm_inplace(norm, &mut x);
        }
        x
    }
}

impl Decoder {
    /// One [`LayerCache`] per layer for `memory` `[batch, src_len, d_model]`.
    pub(crate) fn start_caches(&self, memory: ArrayView3<f32>, capacity: usize) -> Vec<LayerCache> {
        self.layers
            .iter()
            .map(|l| l.start_cache(memory, capacity))
            .collect()
    }

    /// The stack on the newest positions `x` `[batch, new, d_model]` with per-layer caches.
    pub(crate) fn run_step(
        &self,
        mut x: Array3<f32>,
        caches: &mut [LayerCache],
        cross_mask: &Mask,
    ) -> Array3<f32> {
        for (layer, cache) in self.layers.iter().zip(caches) {
            x = layer.forward_step(x, cache, cross_mask);
        }
        if let Some(norm) = &self.norm {
            norm_inplace(norm, &mut x);
        }
        x
    }
}

/// Checks target, memory and masks against each other.
pub(crate) fn check_decoder_inputs(
    x: ArrayView3<f32>,
    memory: ArrayView3<f32>,
    d_model: usize,
    self_mask: &Mask,
    cross_mask: &Mask,
) -> Result<()> {
    check_input(x, d_model, "decoder input")?;
    check_input(memory, d_model, "memory")?;
    let (b, tgt_len, _) = x.dim();
    if memory.shape()[0] != b {
        return Err(Error::shape(
            "memory",
            format!("[batch, src_len, d_model] with batch {b} like the target"),
            memory.shape(),
        ));
    }
    self_mask.check(b, tgt_len, tgt_len)?;
    cross_mask.check(b, tgt_len, memory.shape()[1])
}

impl Linears for DecoderLayer {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        self.self_attn.linears_mut(f)?;
        self.cross_attn.linears_mut(f)?;
        self.feed_forward.linears_mut(f)
    }
}

impl Linears for Decoder {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.linears_mut(f))
    }
}

impl Parameters for DecoderLayer {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "self_attn", &self.self_attn);
        visit_child(f, "cross_attn", &self.cross_attn);
        visit_child(f, "feed_forward", &self.feed_forward);
        visit_child(f, "self_attn_norm", &self.self_attn_norm);
        visit_child(f, "cross_attn_norm", &self.cross_attn_norm);
        visit_child(f, "ffn_norm", &self.ffn_norm);
    }
}

impl Parameters for Decoder {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_stack(f, &self.layers, self.norm.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array3};
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    fn tiny(norm_position: NormPosition) -> TransformerConfig {
        TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            activation: crate::config::Activation::Gelu,
            norm_position,
            ..TransformerConfig::base(10, 10)
        }
    }

    fn decoder(position: NormPosition, rng: &mut StdRng) -> Decoder {
        let layers = (0..2)
            .map(|_| DecoderLayer::init(&tiny(position), rng).unwrap())
            .collect();
        Decoder::new(layers, Some(LayerNorm::identity(8, 1e-5).unwrap())).unwrap()
    }

    #[test]
    fn changing_a_later_target_leaves_earlier_outputs_unchanged() {
        for position in [NormPosition::Post, NormPosition::Pre] {
            let mut rng = StdRng::seed_from_u64(21);
            let dec = decoder(position, &mut rng);
            let memory = Array3::from_shape_simple_fn((1, 4, 8), || rng.random_range(-1.0..1.0));
            let mut x = Array3::from_shape_simple_fn((1, 5, 8), || rng.random_range(-1.0..1.0));
            let before = dec
                .forward(x.view(), memory.view(), &Mask::causal(), &Mask::none())
                .unwrap();
            x.slice_mut(s![0, 3, ..]).fill(7.0);
            let after = dec
                .forward(x.view(), memory.view(), &Mask::causal(), &Mask::none())
                .unwrap();
            assert_eq!(before.slice(s![.., ..3, ..]), after.slice(s![.., ..3, ..]));
            assert!(
                (&before.slice(s![.., 3.., ..]) - &after.slice(s![.., 3.., ..]))
                    .iter()
                    .any(|d| d.abs() > 1e-3)
            );
        }
    }

    #[test]
    fn trace_shapes_and_memory_checks() {
        let mut rng = StdRng::seed_from_u64(22);
        let dec = decoder(NormPosition::Post, &mut rng);
        let memory = Array3::from_shape_simple_fn((2, 4, 8), || rng.random_range(-1.0..1.0));
        let x = Array3::from_shape_simple_fn((2, 3, 8), || rng.random_range(-1.0..1.0));
        let t = dec
            .forward_traced(x.view(), memory.view(), &Mask::causal(), &Mask::none())
            .unwrap();
        assert_abs_diff_eq!(
            t.output,
            dec.forward(x.view(), memory.view(), &Mask::causal(), &Mask::none())
                .unwrap(),
            epsilon = 0.0
        );
        assert_eq!(t.cross_attention[0].shape(), &[2, 2, 3, 4]);
        assert_eq!(t.self_attention[1].shape(), &[2, 2, 3, 3]);
        let wrong_batch = Array3::<f32>::zeros((3, 4, 8));
        assert!(dec
            .forward(x.view(), wrong_batch.view(), &Mask::causal(), &Mask::none())
            .is_err());
        let wrong_width = Array3::<f32>::zeros((2, 4, 6));
        assert!(dec
            .forward(x.view(), wrong_width.view(), &Mask::causal(), &Mask::none())
            .is_err());
    }
}
