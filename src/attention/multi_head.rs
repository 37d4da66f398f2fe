//! Multi-head attention (§3.2.2).
//!
//! `MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O`, `head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)`.
//! "Multi-head attention allows the model to jointly attend to information from different
//! representation subspaces at different positions": each of the h heads works in its own
//! `d_k = d_model / h` slice, so the total cost equals one full-width head.

use ndarray::{s, Array3, Array4, ArrayView3, ArrayView4, Axis, Ix4};
use rand::Rng;
use rayon::prelude::*;

use super::cache::KeyValueCache;
use super::scaled_dot_product::{attend_into, attend_one_query};
use crate::config::validate_heads;
use crate::error::{Error, Result};
use crate::init;
use crate::linear::Linears;
use crate::linear::{pack_weights, Linear};
use crate::mask::Mask;
use crate::parameters::{visit_child, Parameters, Scope, Visitor};

/// Q, K, V and output projections around h parallel scaled dot-product attentions.
///
/// Serves as self-attention (query = key = value) and as encoder-decoder cross-attention
/// (query from the decoder, key = value = encoder memory, of another length).
///
/// ```
/// use ndarray::Array3;
/// use rand::{rngs::StdRng, SeedableRng};
/// use ndtransformer::{Mask, MultiHeadAttention};
/// let mha = MultiHeadAttention::init(16, 4, &mut StdRng::seed_from_u64(0))?;
/// let x = Array3::<f32>::ones((2, 5, 16));      // [batch, tgt_len, d_model]
/// let memory = Array3::<f32>::ones((2, 7, 16)); // [batch, src_len, d_model]
/// let (out, weights) = mha.forward_with_weights(x.view(), memory.view(), memory.view(), &Mask::none())?;
/// assert_eq!(out.shape(), &[2, 5, 16]);
/// assert_eq!(weights.shape(), &[2, 4, 5, 7]); // [batch, num_heads, tgt_len, src_len]
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiHeadAttention {
    num_heads: usize,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
}

impl MultiHeadAttention {
    /// A layer from ready projections, each `[d_model, d_model]` (PyTorch layout).
    ///
    /// # Errors
    /// [`Error::Config`] if `d_model` is not divisible by `num_heads`; [`Error::Shape`] if a
    /// projection is not `[d_model, d_model]`.
    pub fn new(
        mut q_proj: Linear,
        mut k_proj: Linear,
        mut v_proj: Linear,
        mut out_proj: Linear,
        num_heads: usize,
    ) -> Result<Self> {
        let d_model = q_proj.out_features();
        validate_heads(d_model, num_heads)?;
        for (name, p) in [
            ("q_proj", &q_proj),
            ("k_proj", &k_proj),
            ("v_proj", &v_proj),
            ("out_proj", &out_proj),
        ] {
            if (p.out_features(), p.in_features()) != (d_model, d_model) {
                return Err(Error::shape(
                    format!("{name} weight"),
                    format!("[d_model, d_model] = [{d_model}, {d_model}]"),
                    p.weight().shape(),
                ));
            }
        }
        pack_weights(&mut [&mut q_proj, &mut k_proj, &mut v_proj, &mut out_proj]);
        Ok(MultiHeadAttention {
            num_heads,
            q_proj,
            k_proj,
            v_proj,
            out_proj,
        })
    }

    /// A freshly initialised layer with PyTorch's scheme: the stacked Q/K/V matrix
    /// `[3·d_model, d_model]` Xavier-uniform as one, the output projection Xavier-uniform, all
    /// biases zero.
    ///
    /// # Errors
    /// [`Error::Config`] if `d_model` is not divisible by `num_heads`.
    pub fn init<R: Rng + ?Sized>(d_model: usize, num_heads: usize, rng: &mut R) -> Result<Self> {
        validate_heads(d_model, num_heads)?;
        let mut qkv = || {
            let w = init::xavier_uniform(d_model, d_model, d_model, 3 * d_model, rng);
            Linear::from_parts(w, Some(ndarray::Array1::zeros(d_model)))
        };
        let (q_proj, k_proj, v_proj) = (qkv(), qkv(), qkv());
        let out_proj = Linear::init(d_model, d_model, true, rng);
        Self::new(q_proj, k_proj, v_proj, out_proj, num_heads)
    }

    /// Reads `{q,k,v,out}_proj.{weight,bias}`, each `[d_model, d_model]`, from `scope`.
    pub(crate) fn load(scope: &mut Scope, d_model: usize, num_heads: usize) -> Result<Self> {
        let mut proj = |name: &str| Linear::load(&mut scope.child(name), d_model, d_model);
        let (q, k, v, out) = (
            proj("q_proj")?,
            proj("k_proj")?,
            proj("v_proj")?,
            proj("out_proj")?,
        );
        Self::new(q, k, v, out, num_heads)
    }

    /// Number of heads h.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.q_proj.out_features()
    }

    /// Per-head width, `d_model / num_heads`.
    pub fn d_k(&self) -> usize {
        self.d_model() / self.num_heads
    }

    /// The query, key, value and output projections.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    /// Attention of `query` over `key`/`value`.
    ///
    /// # Shapes
    /// - `query`: `[batch, tgt_len, d_model]`
    /// - `key`, `value`: `[batch, src_len, d_model]`
    /// - `mask`: key padding `[batch, src_len]`, attention mask `[tgt_len, src_len]`
    /// - returns `[batch, tgt_len, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] if widths, batch sizes, key/value lengths or masks disagree;
    /// [`Error::Empty`] for zero-length inputs.
    pub fn forward(
        &self,
        query: ArrayView3<f32>,
        key: ArrayView3<f32>,
        value: ArrayView3<f32>,
        mask: &Mask,
    ) -> Result<Array3<f32>> {
        self.check(query, key, value, mask)?;
        Ok(self.project_and_attend(query, key, value, mask, None))
    }

    /// As [`forward`](Self::forward), also returning each head's attention weights
    /// `[batch, num_heads, tgt_len, src_len]` (not averaged over heads).
    pub fn forward_with_weights(
        &self,
        query: ArrayView3<f32>,
        key: ArrayView3<f32>,
        value: ArrayView3<f32>,
        mask: &Mask,
    ) -> Result<(Array3<f32>, Array4<f32>)> {
        self.check(query, key, value, mask)?;
        let (b, tgt_len, src_len) = (query.shape()[0], query.shape()[1], key.shape()[1]);
        let mut weights = Array4::zeros((b, self.num_heads, tgt_len, src_len));
        let out = self.project_and_attend(query, key, value, mask, Some(&mut weights));
        Ok((out, weights))
    }

    /// Self- or cross-attention with optional weights, shapes checked by the caller.
    pub(crate) fn forward_unchecked(
        &self,
        query: ArrayView3<f32>,
        key_value: ArrayView3<f32>,
        mask: &Mask,
        weights: Option<&mut Array4<f32>>,
    ) -> Array3<f32> {
        self.project_and_attend(query, key_value, key_value, mask, weights)
    }

    /// Projects query, key and value, runs the heads and the output projection.
    fn project_and_attend(
        &self,
        query: ArrayView3<f32>,
        key: ArrayView3<f32>,
        value: ArrayView3<f32>,
        mask: &Mask,
        weights: Option<&mut Array4<f32>>,
    ) -> Array3<f32> {
        let q = self.split_heads(query, &self.q_proj);
        let k = self.split_heads(key, &self.k_proj);
        let v = self.split_heads(value, &self.v_proj);
        self.attend(heads(&q), heads(&k), heads(&v), mask, weights)
    }

    /// Self-attention over sequences packed end to end without padding: `x` is
    /// `[1, total, d_model]` with sequence `i` in the next `lengths[i]` positions, and each
    /// sequence attends only to itself. The projections run once over all real tokens, so no
    /// work is spent on padding; the result equals padded attention with a key padding mask
    /// at every real position.
    pub(crate) fn self_attend_packed(&self, x: ArrayView3<f32>, lengths: &[usize]) -> Array3<f32> {
        let total = x.shape()[1];
        debug_assert_eq!(lengths.iter().sum::<usize>(), total);
        let q = self.split_heads(x, &self.q_proj);
        let k = self.split_heads(x, &self.k_proj);
        let v = self.split_heads(x, &self.v_proj);
        let mut concat = Array4::<f32>::zeros((1, total, self.num_heads, self.d_k()));
        // One disjoint slice of the output per sequence, sequences in parallel.
        let mut pieces = Vec::with_capacity(lengths.len());
        let (mut rest, mut start) = (concat.view_mut(), 0);
        for &len in lengths {
            let (piece, tail) = rest.split_at(Axis(1), len);
            pieces.push((start, piece));
            (rest, start) = (tail, start + len);
        }
        let none = Mask::none();
        pieces.into_par_iter().for_each(|(start, out)| {
            let len = out.shape()[1];
            attend_into(
                sequence_heads(&q, start, len),
                sequence_heads(&k, start, len),
                sequence_heads(&v, start, len),
                &none,
                out.permuted_axes(Ix4(0, 2, 1, 3)),
                None,
            );
        });
        let flat = concat
            .into_shape_with_order((total, self.d_model()))
            .expect("contiguous");
        self.out_proj
            .forward_2d(flat.view())
            .into_shape_with_order((1, total, self.d_model()))
            .expect("same element count")
    }

    /// Projects `x` and lays it out as `[batch, len, num_heads, d_k]` (contiguous), so that
    /// [`heads`] can view it as `[batch, num_heads, len, d_k]` without copying.
    pub(crate) fn split_heads(&self, x: ArrayView3<f32>, proj: &Linear) -> Array4<f32> {
        let (b, len, d_model) = x.dim();
        let x = x.as_standard_layout();
        let flat = x
            .view()
            .into_shape_with_order((b * len, d_model))
            .expect("standard layout");
        proj.forward_2d(flat)
            .into_shape_with_order((b, len, self.num_heads, self.d_k()))
            .expect("d_model = num_heads · d_k")
    }

    /// Runs the heads and the output projection: `Concat(head_1..head_h) W^O`.
    ///
    /// `q`, `k`, `v` are `[batch, num_heads, len, d_k]` views.
    pub(crate) fn attend(
        &self,
        q: ArrayView4<f32>,
        k: ArrayView4<f32>,
        v: ArrayView4<f32>,
        mask: &Mask,
        weights: Option<&mut Array4<f32>>,
    ) -> Array3<f32> {
        let (b, _, tgt_len, d_k) = q.dim();
        // Heads are written straight into their columns of the concatenation.
        let mut concat = Array4::<f32>::zeros((b, tgt_len, self.num_heads, d_k));
        let concat_heads = concat.view_mut().permuted_axes([0, 2, 1, 3]);
        attend_into(q, k, v, mask, concat_heads, weights.map(|w| w.view_mut()));
        self.project_heads(concat)
    }

    /// The output projection `Concat(head_1..head_h) W^O` of heads laid out
    /// `[batch, len, num_heads, d_k]`; returns `[batch, len, d_model]`.
    fn project_heads(&self, concat: Array4<f32>) -> Array3<f32> {
        let (b, len, _, _) = concat.dim();
        let flat = concat
            .into_shape_with_order((b * len, self.d_model()))
            .expect("contiguous");
        self.out_proj
            .forward_2d(flat.view())
            .into_shape_with_order((b, len, self.d_model()))
            .expect("same element count")
    }

    /// Runs the heads of the newest positions' queries `q` `[batch, new, num_heads, d_k]`
    /// against a key/value cache, and the output projection (a decoding step); returns
    /// `[batch, new, d_model]`. The new positions sit at the end of the cached ones.
    pub(crate) fn attend_cached(
        &self,
        q: &Array4<f32>,
        cache: &KeyValueCache,
        mask: &Mask,
    ) -> Array3<f32> {
        let (b, new, _, d_k) = q.dim();
        if new != 1 {
            let (k, v) = cache.heads();
            return self.attend(heads(q), k.view(), v.view(), mask, None);
        }
        let mut concat = Array4::<f32>::zeros((b, 1, self.num_heads, d_k));
        let (keys_t, values, len, rows) = cache.storage();
        attend_one_query(
            q.index_axis(Axis(1), 0),
            (keys_t, values, rows),
            len,
            mask,
            concat.index_axis_mut(Axis(1), 0),
        );
        self.project_heads(concat)
    }

    fn check(
        &self,
        query: ArrayView3<f32>,
        key: ArrayView3<f32>,
        value: ArrayView3<f32>,
        mask: &Mask,
    ) -> Result<()> {
        let d = self.d_model();
        let (b, tgt_len, _) = query.dim();
        let src_len = key.shape()[1];
        for (what, x) in [("query", query), ("key", key), ("value", value)] {
            if x.is_empty() {
                return Err(Error::Empty {
                    what: what.into(),
                    shape: x.shape().to_vec(),
                });
            }
            if x.shape()[2] != d || x.shape()[0] != b {
                return Err(Error::shape(
                    what,
                    format!("[batch, len, d_model] = [{b}, _, {d}]"),
                    x.shape(),
                ));
            }
        }
        if value.shape()[1] != src_len {
            return Err(Error::shape(
                "value",
                format!("[batch, src_len, d_model] = [{b}, {src_len}, {d}] like the key"),
                value.shape(),
            ));
        }
        mask.check(b, tgt_len, src_len)
    }
}

/// Positions `start..start + len` of a packed `[1, total, num_heads, d_k]` projection, viewed as
/// `[1, num_heads, len, d_k]`.
fn sequence_heads(x: &Array4<f32>, start: usize, len: usize) -> ArrayView4<'_, f32> {
    x.slice(s![.., start..start + len, .., ..])
        .permuted_axes(Ix4(0, 2, 1, 3))
}

/// `[batch, len, num_heads, d_k]` viewed as `[batch, num_heads, len, d_k]` (strides only).
pub(crate) fn heads(x: &Array4<f32>) -> ArrayView4<'_, f32> {
    x.view().permuted_axes(Ix4(0, 2, 1, 3))
}

/// `q_proj`, `k_proj`, `v_proj` (W^Q, W^K, W^V of all heads) and `out_proj` (W^O), §3.2.2.
impl Linears for MultiHeadAttention {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        for p in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.out_proj,
        ] {
            f(p)?;
        }
        Ok(())
    }
}

impl Parameters for MultiHeadAttention {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "q_proj", &self.q_proj);
        visit_child(f, "k_proj", &self.k_proj);
        visit_child(f, "v_proj", &self.v_proj);
        visit_child(f, "out_proj", &self.out_proj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::scaled_dot_product_attention;
    use crate::mask::KeyPaddingMask;
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array3, Axis};
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    fn random(shape: (usize, usize, usize), rng: &mut StdRng) -> Array3<f32> {
        Array3::from_shape_simple_fn(shape, || rng.random_range(-1.0..1.0))
    }

    #[test]
    fn equals_per_head_attention_concatenated() {
        let mut rng = StdRng::seed_from_u64(3);
        let mha = MultiHeadAttention::init(12, 3, &mut rng).unwrap();
        let q_in = random((2, 4, 12), &mut rng);
        let kv_in = random((2, 6, 12), &mut rng);
        let out = mha
            .forward(q_in.view(), kv_in.view(), kv_in.view(), &Mask::none())
            .unwrap();
        // The same computation by hand: project, cut columns per head, attend, concat, project.
        let proj = |x: &Array3<f32>, l: &Linear| l.forward(x.view()).unwrap();
        let (q, k, v) = (
            proj(&q_in, &mha.q_proj),
            proj(&kv_in, &mha.k_proj),
            proj(&kv_in, &mha.v_proj),
        );
        let mut concat = Array3::<f32>::zeros((2, 4, 12));
        for h in 0..3 {
            let cols = s![.., .., h * 4..(h + 1) * 4];
            let head = scaled_dot_product_attention(
                q.slice(cols).insert_axis(Axis(1)),
                k.slice(cols).insert_axis(Axis(1)),
                v.slice(cols).insert_axis(Axis(1)),
                &Mask::none(),
            )
            .unwrap();
            concat.slice_mut(cols).assign(&head.index_axis(Axis(1), 0));
        }
        let expect = proj(&concat, &mha.out_proj);
        assert_abs_diff_eq!(out, expect, epsilon = 1e-5);
    }

    #[test]
    fn weights_are_returned_per_head_and_rows_sum_to_one() {
        let mut rng = StdRng::seed_from_u64(4);
        let mha = MultiHeadAttention::init(8, 2, &mut rng).unwrap();
        let x = random((3, 5, 8), &mut rng);
        let kp = KeyPaddingMask::from_lengths(&[5, 2, 4], 5).unwrap();
        let mask = Mask::causal().with_key_padding(&kp);
        let (out, w) = mha
            .forward_with_weights(x.view(), x.view(), x.view(), &mask)
            .unwrap();
        assert_eq!(w.shape(), &[3, 2, 5, 5]);
        for row in w.rows() {
            assert_abs_diff_eq!(row.sum(), 1.0, epsilon = 1e-5);
        }
        assert_eq!(w[[1, 0, 4, 3]], 0.0); // padding
        assert_eq!(w[[0, 1, 1, 2]], 0.0); // future
        assert_eq!(
            out,
            mha.forward(x.view(), x.view(), x.view(), &mask).unwrap()
        );
    }

    #[test]
    fn config_and_shape_errors() {
        let mut rng = StdRng::seed_from_u64(5);
        let err = MultiHeadAttention::init(10, 4, &mut rng).unwrap_err();
        assert!(
            err.to_string()
                .contains("d_model 10 is not divisible by num_heads 4"),
            "{err}"
        );
        let mha = MultiHeadAttention::init(8, 2, &mut rng).unwrap();
        let x = Array3::<f32>::zeros((2, 3, 8));
        let bad_width = Array3::<f32>::zeros((2, 3, 6));
        assert!(mha
            .forward(x.view(), bad_width.view(), bad_width.view(), &Mask::none())
            .is_err());
        let other_batch = Array3::<f32>::zeros((1, 3, 8));
        assert!(mha
            .forward(
                x.view(),
                other_batch.view(),
                other_batch.view(),
                &Mask::none()
            )
            .is_err());
        let shorter_value = Array3::<f32>::zeros((2, 2, 8));
        assert!(mha
            .forward(x.view(), x.view(), shorter_value.view(), &Mask::none())
            .is_err());
        let empty = Array3::<f32>::zeros((2, 0, 8));
        assert!(matches!(
            mha.forward(empty.view(), x.view(), x.view(), &Mask::none()),
            Err(Error::Empty { .. })
        ));
        let kp = KeyPaddingMask::from_lengths(&[1, 1], 2).unwrap();
        assert!(mha
            .forward(
                x.view(),
                x.view(),
                x.view(),
                &Mask::none().with_key_padding(&kp)
            )
            .is_err());
    }
}
