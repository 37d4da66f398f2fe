//! Scaled dot-product attention (§3.2.1, Eq. 1): `Attention(Q, K, V) = softmax(QKᵀ / √d_k) V`.
//!
//! Each query is compared with every key by a dot product; the scores, divided by √d_k so that
//! their variance does not grow with the width and push the softmax into flat regions, become
//! weights over the values. Masked keys get weight 0 (see [`crate::mask`]).

use ndarray::{
    s, Array2, Array4, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut3,
    ArrayViewMut4, Axis, Zip,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::mask::Mask;
use crate::ops::{self, HeadScratch};

/// `softmax(Q Kᵀ / √d_k) V`, batched over batch and heads.
///
/// # Shapes
/// - `q`: `[batch, num_heads, tgt_len, d_k]`
/// - `k`: `[batch, num_heads, src_len, d_k]`
/// - `v`: `[batch, num_heads, src_len, d_v]`
/// - returns `[batch, num_heads, tgt_len, d_v]`
///
/// # Errors
/// [`Error::Shape`] if the shapes disagree or a mask part does not fit; [`Error::Empty`] if
/// the queries or keys have a zero-length axis (`d_k = 0` included).
///
/// ```
/// use ndarray::Array4;
/// use ndtransformer::{scaled_dot_product_attention, Mask};
/// let q = Array4::<f32>::ones((2, 4, 3, 8));
/// let kv = Array4::<f32>::ones((2, 4, 5, 8));
/// let out = scaled_dot_product_attention(q.view(), kv.view(), kv.view(), &Mask::none())?;
/// assert_eq!(out.shape(), &[2, 4, 3, 8]);
/// # Ok::<(), ndtransformer::Error>(())
/// ```
pub fn scaled_dot_product_attention(
    q: ArrayView4<f32>,
    k: ArrayView4<f32>,
    v: ArrayView4<f32>,
    mask: &Mask,
) -> Result<Array4<f32>> {
    let (b, h, tgt_len, _) = check_shapes(q, k, v, mask)?;
    let mut out = Array4::zeros((b, h, tgt_len, v.shape()[3]));
    attend_into(q, k, v, mask, out.view_mut(), None);
    Ok(out)
}

/// As [`scaled_dot_product_attention`], also returning the attention weights.
///
/// # Shapes
/// - returns `([batch, num_heads, tgt_len, d_v], [batch, num_heads, tgt_len, src_len])`;
///   each weight row sums to 1, or is all zeros if every key of that query is masked.
pub fn scaled_dot_product_attention_with_weights(
    q: ArrayView4<f32>,
    k: ArrayView4<f32>,
    v: ArrayView4<f32>,
    mask: &Mask,
) -> Result<(Array4<f32>, Array4<f32>)> {
    let (b, h, tgt_len, src_len) = check_shapes(q, k, v, mask)?;
    let mut out = Array4::zeros((b, h, tgt_len, v.shape()[3]));
    let mut weights = Array4::zeros((b, h, tgt_len, src_len));
    attend_into(q, k, v, mask, out.view_mut(), Some(weights.view_mut()));
    Ok((out, weights))
}

fn check_shapes(
    q: ArrayView4<f32>,
    k: ArrayView4<f32>,
    v: ArrayView4<f32>,
    mask: &Mask,
) -> Result<(usize, usize, usize, usize)> {
    let (b, h, tgt_len, d_k) = q.dim();
    let src_len = k.shape()[2];
    // With d_k = 0 the scale 1/√d_k is infinite, and with no query or key there is nothing
    // to attend: both are caller mistakes, as in the layers above.
    for (what, x) in [("queries", q), ("keys", k)] {
        if x.is_empty() {
            return Err(Error::Empty {
                what: what.into(),
                shape: x.shape().to_vec(),
            });
        }
    }
    if k.shape() != [b, h, src_len, d_k] {
        return Err(Error::shape(
            "keys",
            format!("[batch, num_heads, src_len, d_k] = [{b}, {h}, _, {d_k}]"),
            k.shape(),
        ));
    }
    if v.shape()[..3] != [b, h, src_len] {
        return Err(Error::shape(
            "values",
            format!("[batch, num_heads, src_len, d_v] = [{b}, {h}, {src_len}, _]"),
            v.shape(),
        ));
    }
    mask.check(b, tgt_len, src_len)?;
    Ok((b, h, tgt_len, src_len))
}

/// The kernel behind every attention call, shapes already checked: writes the attention
/// output into `out` and, when given, the weights into `weights`.
///
/// Batch rows and heads run in parallel; the inputs may be strided views (heads split out of
/// a `[batch, len, d_model]` projection without copies).
pub(crate) fn attend_into(
    q: ArrayView4<f32>,
    k: ArrayView4<f32>,
    v: ArrayView4<f32>,
    mask: &Mask,
    mut out: ArrayViewMut4<f32>,
    weights: Option<ArrayViewMut4<f32>>,
) {
    let scale = 1.0 / (q.shape()[3] as f32).sqrt();
    let (tgt_len, src_len) = (q.shape()[2], k.shape()[2]);
    let causal = mask.is_causal();
    let per_head = |b: usize,
                    q: ArrayView2<f32>,
                    k: ArrayView2<f32>,
                    v: ArrayView2<f32>,
                    mut o: ArrayViewMut2<f32>,
                    mut s: ArrayViewMut2<f32>,
                    scratch: &mut HeadScratch| {
        // scores = Q Kᵀ / √d_k, masked, soft-maxed row by row; then out = weights · V.
        ops::head_scores(q, k, scale, causal, scratch, &mut s);
        mask.apply(b, s.view_mut());
        ops::softmax_rows_inplace(s.view_mut());
        ops::head_values(s.view(), v, causal, scratch, &mut o);
    };
    match weights {
        Some(mut w) => Zip::indexed(out.axis_iter_mut(Axis(0)))
            .and(q.axis_iter(Axis(0)))
            .and(k.axis_iter(Axis(0)))
            .and(v.axis_iter(Axis(0)))
            .and(w.axis_iter_mut(Axis(0)))
            .par_for_each(|b, mut o, q, k, v, mut w| {
                Zip::from(o.axis_iter_mut(Axis(0)))
                    .and(q.axis_iter(Axis(0)))
                    .and(k.axis_iter(Axis(0)))
                    .and(v.axis_iter(Axis(0)))
                    .and(w.axis_iter_mut(Axis(0)))
                    .par_for_each(|o, q, k, v, s| {
                        per_head(b, q, k, v, o, s, &mut HeadScratch::default())
                    });
            }),
        None => {
            let streaming = src_len >= STREAMING_MIN_KEYS;
            out.axis_iter_mut(Axis(0))
                .into_par_iter()
                .zip(q.axis_iter(Axis(0)))
                .zip(k.axis_iter(Axis(0)))
                .zip(v.axis_iter(Axis(0)))
                .enumerate()
                .for_each(|(b, (((mut o, q), k), v))| {
                    o.axis_iter_mut(Axis(0))
                        .into_par_iter()
                        .zip(q.axis_iter(Axis(0)))
                        .zip(k.axis_iter(Axis(0)))
                        .zip(v.axis_iter(Axis(0)))
                        .for_each_init(
                            // One score matrix per task, reused by its heads.
                            || {
                                let (rows, cols) = if streaming {
                                    (0, 0)
                                } else {
                                    (tgt_len, src_len)
                                };
                                (Array2::zeros((rows, cols)), HeadScratch::default())
                            },
                            |(s, scratch), (((o, q), k), v)| {
                                if streaming {
                                    attend_head_streaming(b, q, k, v, mask, scale, o);
                                } else {
                                    per_head(b, q, k, v, o, s.view_mut(), scratch);
                                }
                            },
                        );
                })
        }
    }
}

/// Eq. 1 for one new query per batch row and head (a decoding step) against a key/value
/// cache's storage, of which the first `len` positions are used.
///
/// # Shapes
/// - `q`: `[batch, num_heads, d_k]`, standard layout
/// - `keys_t`: `[batch, num_heads, d_k, capacity]` (keys stored transposed), standard layout
/// - `values`: `[batch, num_heads, capacity, d_v]`, standard layout
/// - `out`: `[batch, num_heads, d_v]`, standard layout
///
/// The same arithmetic as [`attend_into`] on views of the first `len` positions, without
/// them: each head reads its keys and values as plain slices. A step's attention is a few
/// microseconds of work per head, which the general path spent as much again walking views row
/// by row.
pub(crate) fn attend_one_query(
    q: ArrayView3<f32>,
    (keys_t, values, rows): (ArrayView4<f32>, ArrayView4<f32>, &[usize]),
    len: usize,
    mask: &Mask,
    mut out: ArrayViewMut3<f32>,
) {
    let (batch, heads, d_k) = q.dim();
    assert_eq!(rows.len(), batch, "one stored row per query");
    let (capacity, d_v) = (values.shape()[2], values.shape()[3]);
    let scale = 1.0 / (d_k as f32).sqrt();
    let q = q.to_slice().expect("queries in standard layout");
    let keys_t = keys_t.to_slice().expect("cached keys in standard layout");
    let values = values.to_slice().expect("cached values in standard layout");
    let out = out
        .as_slice_mut()
        .expect("attention output in standard layout");
    out.par_chunks_mut(d_v)
        .zip(q.par_chunks(d_k))
        .enumerate()
        .with_min_len(HEADS_PER_TASK)
        .for_each_init(
            || Array2::zeros((1, len)),
            |scores, (row_head, (out, q))| {
                // The stored row this query's slot reads (shared by the beams of a source row).
                let head = rows[row_head / heads] * heads + row_head % heads;
                let keys_t = &keys_t[head * d_k * capacity..][..d_k * capacity];
                let values = &values[head * capacity * d_v..][..len * d_v];
                let row = scores.as_slice_mut().expect("one row");
                ops::query_scores(q, scale, keys_t, capacity, row);
                mask.apply(row_head / heads, scores.view_mut());
                ops::softmax_rows_inplace(scores.view_mut());
                let weights = scores.as_slice().expect("a row");
                ops::weighted_rows(weights, values, out);
            },
        );
}

/// Heads one task of [`attend_one_query`] takes at least: a head is too little work to be
/// worth a task of its own.
const HEADS_PER_TASK: usize = 4;

/// From this many keys on (and when no weights are returned) a head streams over blocks of
/// keys with an online softmax, instead of materialising its `[tgt_len, src_len]` scores.
const STREAMING_MIN_KEYS: usize = 1024;
/// Keys per block of the streaming kernel: the block's scores stay in the L1/L2 cache.
const KEY_BLOCK: usize = 256;

/// One head of Eq. 1 without the full score matrix (the "online softmax" of Milakov &
/// Gimelshein 2018, as in FlashAttention): for each block of keys, the scores, then the running
/// maximum and sum per query, rescaling the output accumulated so far.
fn attend_head_streaming(
    b: usize,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    mask: &Mask,
    scale: f32,
    mut out: ArrayViewMut2<f32>,
) {
    let (tgt_len, src_len) = (q.nrows(), k.nrows());
    out.fill(0.0);
    let mut running_max = vec![f32::NEG_INFINITY; tgt_len];
    let mut running_sum = vec![0.0f32; tgt_len];
    let mut block = Array2::zeros((tgt_len, KEY_BLOCK.min(src_len)));
    for start in (0..src_len).step_by(KEY_BLOCK) {
        let end = (start + KEY_BLOCK).min(src_len);
        let mut scores = block.slice_mut(s![.., ..end - start]);
        ops::matmul_into_serial(q, k.slice(s![start..end, ..]).t(), scale, 0.0, &mut scores);
        mask.apply_keys(b, scores.view_mut(), start, src_len);
        for (i, (row, mut out_row)) in scores
            .rows_mut()
            .into_iter()
            .zip(out.rows_mut())
            .enumerate()
        {
            let correction =
                ops::online_softmax_update(row, &mut running_max[i], &mut running_sum[i]);
            if correction != 1.0 {
                out_row *= correction;
            }
        }
        ops::matmul_into_serial(
            scores.view(),
            v.slice(s![start..end, ..]),
            1.0,
            1.0,
            &mut out,
        );
    }
    for (mut row, &sum) in out.rows_mut().into_iter().zip(&running_sum) {
        // A query that saw no key keeps a zero output (the fully-masked-row rule).
        if sum > 0.0 {
            row *= 1.0 / sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{AttnMask, KeyPaddingMask};
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array4};

    fn pseudo_random(shape: (usize, usize, usize, usize), seed: u32) -> Array4<f32> {
        Array4::from_shape_fn(shape, |(a, b, c, d)| {
            let x = (a * 131 + b * 71 + c * 29 + d * 7) as u32 ^ seed.wrapping_mul(2654435761);
            ((x.wrapping_mul(2246822519) >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
        })
    }

    #[test]
    fn one_query_against_cache_storage_equals_the_general_kernel() {
        // Storage with room for more positions than are filled, some keys padded in row 1.
        let (b, h, d, capacity, len) = (2, 3, 8, 11, 7);
        let q = pseudo_random((b, h, 1, d), 1);
        let keys_t = pseudo_random((b, h, d, capacity), 2);
        let values = pseudo_random((b, h, capacity, d), 3);
        let mut padding = ndarray::Array2::from_elem((b, len), false);
        padding[[1, 2]] = true;
        padding[[1, 5]] = true;
        let padding = KeyPaddingMask::from_padding_flags(padding);
        // Three slots reading stored rows 1, 1 and 0, as beams of two source rows would.
        let rows = [1, 1, 0];
        let padding3 =
            KeyPaddingMask::from_padding_flags(padding.is_padding().select(Axis(0), &rows));
        for (mask, mask3) in [
            (
                Mask::none().with_key_padding(&padding),
                Mask::none().with_key_padding(&padding3),
            ),
            (Mask::causal(), Mask::causal()),
        ] {
            let mut expected = Array4::zeros((b, h, 1, d));
            attend_into(
                q.view(),
                keys_t
                    .slice(s![.., .., .., ..len])
                    .permuted_axes([0, 1, 3, 2]),
                values.slice(s![.., .., ..len, ..]),
                &mask,
                expected.view_mut(),
                None,
            );
            let mut out = ndarray::Array3::zeros((b, h, d));
            let identity: Vec<usize> = (0..b).collect();
            attend_one_query(
                q.index_axis(Axis(2), 0),
                (keys_t.view(), values.view(), &identity),
                len,
                &mask,
                out.view_mut(),
            );
            assert_eq!(out, expected.index_axis(Axis(2), 0));
            // Slots pointing at stored rows read them as copies of those rows would be read.
            let q3 = q.select(Axis(0), &rows);
            let (k3, v3) = (keys_t.select(Axis(0), &rows), values.select(Axis(0), &rows));
            let mut copied = ndarray::Array3::zeros((3, h, d));
            let mut shared = ndarray::Array3::zeros((3, h, d));
            let identity3: Vec<usize> = (0..3).collect();
            attend_one_query(
                q3.index_axis(Axis(2), 0),
                (k3.view(), v3.view(), &identity3),
                len,
                &mask3,
                copied.view_mut(),
            );
            attend_one_query(
                q3.index_axis(Axis(2), 0),
                (keys_t.view(), values.view(), &rows),
                len,
                &mask3,
                shared.view_mut(),
            );
            assert_eq!(shared, copied);
        }
    }

    /// Eq. 1 written out with loops, for one batch row and head.
    fn naive(q: ArrayView2<f32>, k: ArrayView2<f32>, v: ArrayView2<f32>) -> Array2<f32> {
        let d_k = q.ncols() as f32;
        let mut out = Array2::zeros((q.nrows(), v.ncols()));
        for i in 0..q.nrows() {
            let scores: Vec<f32> = (0..k.nrows())
                .map(|j| q.row(i).dot(&k.row(j)) / d_k.sqrt())
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            for (e, v_j) in exps.iter().zip(v.rows()) {
                out.row_mut(i).scaled_add(e / sum, &v_j);
            }
        }
        out
    }

    #[test]
    fn matches_equation_1() {
        let q = pseudo_random((2, 3, 4, 8), 1);
        let k = pseudo_random((2, 3, 6, 8), 2);
        let v = pseudo_random((2, 3, 6, 5), 3);
        let (out, w) =
            scaled_dot_product_attention_with_weights(q.view(), k.view(), v.view(), &Mask::none())
                .unwrap();
        for b in 0..2 {
            for h in 0..3 {
                let expect = naive(
                    q.slice(s![b, h, .., ..]),
                    k.slice(s![b, h, .., ..]),
                    v.slice(s![b, h, .., ..]),
                );
                assert_abs_diff_eq!(out.slice(s![b, h, .., ..]), expect, epsilon = 1e-5);
            }
        }
        for row in w.rows() {
            assert_abs_diff_eq!(row.sum(), 1.0, epsilon = 1e-5);
        }
        let out2 =
            scaled_dot_product_attention(q.view(), k.view(), v.view(), &Mask::none()).unwrap();
        assert_eq!(out, out2);
    }

    #[test]
    fn masked_keys_do_not_contribute() {
        let q = pseudo_random((1, 2, 3, 4), 4);
        let k = pseudo_random((1, 2, 5, 4), 5);
        let v = pseudo_random((1, 2, 5, 4), 6);
        let kp = KeyPaddingMask::from_lengths(&[3], 5).unwrap();
        let masked = scaled_dot_product_attention(
            q.view(),
            k.view(),
            v.view(),
            &Mask::none().with_key_padding(&kp),
        )
        .unwrap();
        let short = scaled_dot_product_attention(
            q.view(),
            k.slice(s![.., .., ..3, ..]),
            v.slice(s![.., .., ..3, ..]),
            &Mask::none(),
        )
        .unwrap();
        assert_abs_diff_eq!(masked, short, epsilon = 1e-6);
    }

    #[test]
    fn fully_masked_row_gives_zeros_not_nan() {
        let q = pseudo_random((1, 1, 2, 4), 7);
        let kv = pseudo_random((1, 1, 3, 4), 8);
        let kp = KeyPaddingMask::from_lengths(&[0], 3).unwrap();
        let (out, w) = scaled_dot_product_attention_with_weights(
            q.view(),
            kv.view(),
            kv.view(),
            &Mask::none().with_key_padding(&kp),
        )
        .unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
        assert!(w.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let q = Array4::<f32>::zeros((1, 2, 3, 4));
        let k = Array4::<f32>::zeros((1, 2, 5, 3));
        assert!(scaled_dot_product_attention(q.view(), k.view(), k.view(), &Mask::none()).is_err());
        let k = Array4::<f32>::zeros((2, 2, 5, 4));
        assert!(scaled_dot_product_attention(q.view(), k.view(), k.view(), &Mask::none()).is_err());
    }

    #[test]
    fn streaming_kernel_equals_the_materialised_one() {
        let (lq, lk, d) = (5, 700, 8);
        let q = pseudo_random((2, 1, lq, d), 9);
        let k = pseudo_random((2, 1, lk, d), 10).mapv(|x| 3.0 * x);
        let v = pseudo_random((2, 1, lk, d), 11);
        // Row 1 keeps 300 keys; with the pattern, query 0 of row 1 sees no key at all.
        let kp = KeyPaddingMask::from_lengths(&[lk, 300], lk).unwrap();
        let am =
            AttnMask::from_blocked(Array2::from_shape_fn((lq, lk), |(i, j)| i == 0 && j < 300));
        for mask in [
            Mask::none(),
            Mask::causal().with_key_padding(&kp).with_attn_mask(&am),
        ] {
            let expected =
                scaled_dot_product_attention(q.view(), k.view(), v.view(), &mask).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            for b in 0..2 {
                let mut out = Array2::zeros((lq, d));
                attend_head_streaming(
                    b,
                    q.slice(s![b, 0, .., ..]),
                    k.slice(s![b, 0, .., ..]),
                    v.slice(s![b, 0, .., ..]),
                    &mask,
                    scale,
                    out.view_mut(),
                );
                assert_abs_diff_eq!(out, expected.slice(s![b, 0, .., ..]), epsilon = 1e-5);
            }
        }
    }

    #[test]
    fn long_sources_take_the_streaming_path_with_the_same_result() {
        let (lq, lk, d) = (3, STREAMING_MIN_KEYS + 37, 4);
        let q = pseudo_random((1, 2, lq, d), 12);
        let kv = pseudo_random((1, 2, lk, d), 13);
        let kp = KeyPaddingMask::from_lengths(&[lk - 500], lk).unwrap();
        let mask = Mask::causal().with_key_padding(&kp);
        let streamed = scaled_dot_product_attention(q.view(), kv.view(), kv.view(), &mask).unwrap();
        let (materialised, _) =
            scaled_dot_product_attention_with_weights(q.view(), kv.view(), kv.view(), &mask)
                .unwrap();
        assert_abs_diff_eq!(streamed, materialised, epsilon = 1e-5);
    }
}
