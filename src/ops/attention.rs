//! The per-head kernels of scaled dot-product attention (§3.2.1): scores `q kᵀ` and outputs `p v`.
//!
//! `attention.rs` (the layer) calls [`head_scores`] and [`head_values`] for a batch row and head
//! at a time, and the decoding step's cached attention calls [`query_scores`] and
//! [`weighted_rows`] for one query. Under a causal mask the AVX-512 register tiles skip the keys
//! in a query's future.

use super::gemm::matmul_into_serial;
use super::tile::{transpose_rows, TILE_M};
use multiversion::multiversion;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};

/// Rows ahead of the one being read that a step's attention asks the cache for: the keys and
/// values come from memory, and the hardware prefetchers alone left it waiting; 4 and 32 rows
/// ahead measured slower than 16 (`docs/performance.md`).
const PREFETCH_ROWS: usize = 16;

/// Asks the CPU to start loading the cache lines of `len` floats from `p`. A hint only: it
/// never faults and reads nothing the program sees, so an address past the data is harmless.
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(sse) = pulp::core_arch::x86::Sse::try_new() {
        for i in (0..len).step_by(16) {
            sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(i).cast());
        }
    }
}

/// One query's scores against keys stored transposed, `keys_t` `[d_k][stride]` with the keys
/// along each row: `scores[j] = Σ_d (scale · q[d]) · keys_t[d·stride + j]` for
/// `j < scores.len()`, summed over `d` in order and skipping zero entries of `q`, the arithmetic
/// [`matmul_into`] does for `q Kᵀ` on that layout.
pub(crate) fn query_scores(
    q: &[f32],
    scale: f32,
    keys_t: &[f32],
    stride: usize,
    scores: &mut [f32],
) {
    scaled_row_sum(q, scale, keys_t, stride, scores);
}

/// `out = Σ_j w[j] · rows[j]` for rows of `out.len()` values laid end to end in `rows` (one
/// query's attention output from its weights and the values), in order of `j` and skipping
/// zero weights, as [`matmul_into`] does for `w V`.
pub(crate) fn weighted_rows(w: &[f32], rows: &[f32], out: &mut [f32]) {
    scaled_row_sum(w, 1.0, rows, out.len(), out);
}

/// Query rows one register tile of the attention kernels ([`head_scores`], [`head_values`])
/// covers.
#[cfg(target_arch = "x86_64")]
const HEAD_TILE_M: usize = 6;
/// AVX-512 vectors across a register tile: [`HEAD_TILE_N`] keys (scores) or value columns
/// (outputs). 6 × 4 sums take 24 of the 32 registers, and each step loads ten values for 24
/// fused multiply-adds.
#[cfg(target_arch = "x86_64")]
const HEAD_VECTORS: usize = 4;
#[cfg(target_arch = "x86_64")]
const HEAD_TILE_N: usize = 16 * HEAD_VECTORS;

/// Memory the attention kernels reuse from head to head (one per task).
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct HeadScratch {
    /// The head's keys transposed, strip by strip: `[src_len / HEAD_TILE_N][d_k][HEAD_TILE_N]`
    /// (rounded up), so that a register tile reads one contiguous block.
    keys_t: Vec<f32>,
    /// The head's values as a contiguous `[src_len, d_v]` matrix.
    values: Vec<f32>,
    /// Zeros standing in for the rows past the last one of a partial register tile.
    zeros: Vec<f32>,
    /// Eight keys transposed, `[d_k][8]`, on their way into `keys_t`.
    block: Vec<[f32; 8]>,
}

/// Keys query `i` of `tgt_len` sees out of `src_len` under a causal mask (bottom-right aligned,
/// as [`crate::Mask`]): those up to its own position.
#[cfg(target_arch = "x86_64")]
fn visible_keys(i: usize, tgt_len: usize, src_len: usize) -> usize {
    (i + src_len + 1).saturating_sub(tgt_len).min(src_len)
}

/// One head's scores, `s = scale · q kᵀ` (§3.2.1), with `q: [tgt_len, d_k]`,
/// `k: [src_len, d_k]`, `s: [tgt_len, src_len]`.
///
/// With `causal`, scores of keys in a query's future (which the mask hides anyway) need not be
/// computed. On AVX-512 with contiguous rows the product then runs on the crate's register tiles
/// ([`head_scores_tiles`]), which skip whole tiles of them and set those to `-inf`, leaving the
/// rest to the mask; otherwise on [`gemm_into`]'s kernels. Without a causal mask the tiles
/// measured no faster than `gemm`, hence only there (`docs/performance.md`). Both sum each
/// score over `d_k` in order; they give bit-identical results.
pub(crate) fn head_scores(
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    scale: f32,
    causal: bool,
    scratch: &mut HeadScratch,
    s: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(q.ncols(), k.ncols(), "queries and keys have the same width");
    assert_eq!(
        s.dim(),
        (q.nrows(), k.nrows()),
        "scores are [tgt_len, src_len]"
    );
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(simd), true, true, Some(s)) = (
        causal,
        pulp::x86::V4::try_new(),
        rows_contiguous(q),
        rows_contiguous(k),
        s.as_slice_mut(),
    ) {
        return head_scores_tiles(simd, q, k, scale, scratch, s);
    }
    matmul_into_serial(q, k.t(), scale, 0.0, s);
}

/// One head's outputs, `out = p v` (§3.2.1), from its attention weights `p: [tgt_len, src_len]`
/// and values `v: [src_len, d_v]`; `out: [tgt_len, d_v]`.
///
/// With `causal`, the weights of keys in a query's future must be 0 (a soft-maxed masked row):
/// on AVX-512 the register tiles of [`head_values_tiles`] skip the keys no query of theirs
/// sees, as dropping a term whose weight is 0 leaves a sum unchanged; otherwise, and without a
/// causal mask, [`gemm_into`]'s kernels (see [`head_scores`]). Each output sums over the keys
/// in order.
pub(crate) fn head_values(
    p: ArrayView2<f32>,
    v: ArrayView2<f32>,
    causal: bool,
    scratch: &mut HeadScratch,
    out: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(p.ncols(), v.nrows(), "one weight per value");
    assert_eq!(
        out.dim(),
        (p.nrows(), v.ncols()),
        "output is [tgt_len, d_v]"
    );
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(simd), Some(p), true, 0) = (
        causal,
        pulp::x86::V4::try_new(),
        p.as_slice(),
        rows_contiguous(v) && rows_contiguous(out.view()),
        v.ncols() % HEAD_TILE_N,
    ) {
        return head_values_tiles(simd, p, v, scratch, out);
    }
    matmul_into_serial(p, v, 1.0, 0.0, out);
}

/// Whether every row of `x` is a contiguous slice.
#[cfg(target_arch = "x86_64")]
pub(super) fn rows_contiguous(x: ArrayView2<f32>) -> bool {
    x.ncols() <= 1 || x.strides()[1] == 1
}

/// [`head_scores`] under a causal mask on AVX-512 register tiles of [`HEAD_TILE_M`] queries ×
/// [`HEAD_TILE_N`] keys, skipping the tiles whose keys no query of the tile sees; `s` is the
/// standard-layout score matrix.
#[cfg(target_arch = "x86_64")]
fn head_scores_tiles(
    simd: pulp::x86::V4,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    scale: f32,
    scratch: &mut HeadScratch,
    s: &mut [f32],
) {
    let ((tgt_len, d_k), src_len) = (q.dim(), k.nrows());
    let HeadScratch {
        keys_t,
        zeros,
        block,
        ..
    } = scratch;
    let keys_t = transpose_keys(simd, k, keys_t, block);
    if zeros.len() < d_k {
        zeros.resize(d_k, 0.0);
    }
    let zeros = &zeros[..d_k];
    let strip_len = d_k * HEAD_TILE_N;
    let scale = simd.splat_f32x16(scale);
    simd.vectorize(
        #[inline(always)]
        || {
            for i0 in (0..tgt_len).step_by(HEAD_TILE_M) {
                let rows = (tgt_len - i0).min(HEAD_TILE_M);
                let q_rows: [&[f32]; HEAD_TILE_M] = std::array::from_fn(|r| {
                    if r < rows {
                        q.row(i0 + r).to_slice().expect("contiguous rows")
                    } else {
                        zeros
                    }
                });
                // Keys the tile's last (most advanced) query sees.
                let limit = visible_keys(i0 + rows - 1, tgt_len, src_len);
                for (strip, keys) in keys_t
                    .chunks_exact(strip_len)
                    .take(limit.div_ceil(HEAD_TILE_N))
                    .enumerate()
                {
                    let sums = score_tile(simd, &q_rows, keys);
                    let j0 = strip * HEAD_TILE_N;
                    let cols = (src_len - j0).min(HEAD_TILE_N);
                    for (r, sums) in sums.iter().enumerate().take(rows) {
                        let sums: [f32; HEAD_TILE_N] =
                            pulp::bytemuck::cast(sums.map(|x| simd.mul_f32x16(scale, x)));
                        let start = (i0 + r) * src_len + j0;
                        s[start..start + cols].copy_from_slice(&sums[..cols]);
                    }
                }
                let computed = limit.next_multiple_of(HEAD_TILE_N).min(src_len);
                for r in 0..rows {
                    let row = (i0 + r) * src_len;
                    s[row + computed..row + src_len].fill(f32::NEG_INFINITY);
                }
            }
        },
    );
}

/// `k: [src_len, d_k]` into `keys_t` as `[strip][d_k][HEAD_TILE_N]`, returned: strip `t`, row
/// `d` holds `k[t·HEAD_TILE_N + j][d]` for `j < HEAD_TILE_N` (slots past the last key keep
/// what the buffer held: the sums they feed are never stored). Eight keys at a time go through
/// the register transposition of [`transpose_rows`].
#[cfg(target_arch = "x86_64")]
fn transpose_keys<'a>(
    simd: pulp::x86::V4,
    k: ArrayView2<f32>,
    keys_t: &'a mut Vec<f32>,
    block: &mut Vec<[f32; TILE_M]>,
) -> &'a [f32] {
    let (src_len, d_k) = k.dim();
    let strips = src_len.div_ceil(HEAD_TILE_N);
    // Every key's slots are written below; the padding's only feed sums that are never stored,
    // so the buffer is not cleared from head to head.
    let len = strips * d_k * HEAD_TILE_N;
    if keys_t.len() < len {
        keys_t.resize(len, 0.0);
    }
    let keys_t = &mut keys_t[..len];
    block.resize(d_k, [0.0; TILE_M]);
    for (g, keys) in k.axis_chunks_iter(Axis(0), TILE_M).enumerate() {
        let (strip, offset) = (g * TILE_M / HEAD_TILE_N, g * TILE_M % HEAD_TILE_N);
        let out = &mut keys_t[strip * d_k * HEAD_TILE_N..][..d_k * HEAD_TILE_N];
        let row = |j: usize| keys.row(j).to_slice().expect("contiguous rows");
        if keys.nrows() == TILE_M {
            transpose_rows(simd, std::array::from_fn(row), block);
            for (d, values) in block.iter().enumerate() {
                out[d * HEAD_TILE_N + offset..][..TILE_M].copy_from_slice(values);
            }
        } else {
            for j in 0..keys.nrows() {
                for (d, &x) in row(j).iter().enumerate() {
                    out[d * HEAD_TILE_N + offset + j] = x;
                }
            }
        }
    }
    keys_t
}

/// One register tile of [`head_scores_tiles`]: `sums[r][j] = Σ_d q_rows[r][d] · keys[d][j]`
/// for the strip `keys: [d_k][HEAD_TILE_N]`, over `d` in order, one fused multiply-add a term.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn score_tile(
    simd: pulp::x86::V4,
    q_rows: &[&[f32]; HEAD_TILE_M],
    keys: &[f32],
) -> [[pulp::f32x16; HEAD_VECTORS]; HEAD_TILE_M] {
    let mut acc = [[simd.splat_f32x16(0.0); HEAD_VECTORS]; HEAD_TILE_M];
    for (d, keys) in keys.chunks_exact(HEAD_TILE_N).enumerate() {
        let keys: [pulp::f32x16; HEAD_VECTORS] =
            pulp::bytemuck::cast(*<&[f32; HEAD_TILE_N]>::try_from(keys).expect("a strip row"));
        for (acc_r, q_row) in acc.iter_mut().zip(q_rows) {
            let x = simd.splat_f32x16(q_row[d]);
            for (acc, &keys) in acc_r.iter_mut().zip(&keys) {
                *acc = simd.mul_add_f32x16(x, keys, *acc);
            }
        }
    }
    acc
}

/// [`head_values`] under a causal mask on AVX-512 register tiles of [`HEAD_TILE_M`] queries ×
/// [`HEAD_TILE_N`] value columns, each summing over the keys its queries see; `p` is the
/// standard-layout weight matrix. Values with strided rows (one head of a projection) are
/// copied into one contiguous block first: read in place, their rows, a power of two apart,
/// share a few L1 sets.
#[cfg(target_arch = "x86_64")]
fn head_values_tiles(
    simd: pulp::x86::V4,
    p: &[f32],
    v: ArrayView2<f32>,
    scratch: &mut HeadScratch,
    out: &mut ArrayViewMut2<f32>,
) {
    let (src_len, d_v) = v.dim();
    let tgt_len = out.nrows();
    let HeadScratch { values, zeros, .. } = scratch;
    let values: &[f32] = match v.as_slice() {
        Some(values) => values,
        None => {
            values.clear();
            for row in v.rows() {
                values.extend_from_slice(row.to_slice().expect("contiguous rows"));
            }
            values
        }
    };
    if zeros.len() < src_len {
        zeros.resize(src_len, 0.0);
    }
    let zeros = &zeros[..src_len];
    simd.vectorize(
        #[inline(always)]
        || {
            for i0 in (0..tgt_len).step_by(HEAD_TILE_M) {
                let rows = (tgt_len - i0).min(HEAD_TILE_M);
                let limit = visible_keys(i0 + rows - 1, tgt_len, src_len);
                let p_rows: [&[f32]; HEAD_TILE_M] = std::array::from_fn(|r| {
                    if r < rows {
                        &p[(i0 + r) * src_len..][..limit]
                    } else {
                        &zeros[..limit]
                    }
                });
                for c0 in (0..d_v).step_by(HEAD_TILE_N) {
                    let sums = value_tile(simd, &p_rows, &values[c0..], d_v);
                    for (r, sums) in sums.iter().enumerate().take(rows) {
                        let sums: [f32; HEAD_TILE_N] = pulp::bytemuck::cast(*sums);
                        let mut row = out.row_mut(i0 + r);
                        let row = row.as_slice_mut().expect("contiguous output rows");
                        row[c0..c0 + HEAD_TILE_N].copy_from_slice(&sums);
                    }
                }
            }
        },
    );
}

/// One register tile of [`head_values_tiles`]:
/// `sums[r][c] = Σ_j p_rows[r][j] · values[j·d_v + c]` for `c < HEAD_TILE_N`, over `j` in
/// order, one fused multiply-add a term.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn value_tile(
    simd: pulp::x86::V4,
    p_rows: &[&[f32]; HEAD_TILE_M],
    values: &[f32],
    d_v: usize,
) -> [[pulp::f32x16; HEAD_VECTORS]; HEAD_TILE_M] {
    let mut acc = [[simd.splat_f32x16(0.0); HEAD_VECTORS]; HEAD_TILE_M];
    let keys = p_rows[0].len();
    for (j, value) in values.chunks(d_v).take(keys).enumerate() {
        let value: [pulp::f32x16; HEAD_VECTORS] = pulp::bytemuck::cast(
            *<&[f32; HEAD_TILE_N]>::try_from(&value[..HEAD_TILE_N]).expect("a strip"),
        );
        for (acc_r, p_row) in acc.iter_mut().zip(p_rows) {
            let w = simd.splat_f32x16(p_row[j]);
            for (acc, &value) in acc_r.iter_mut().zip(&value) {
                *acc = simd.mul_add_f32x16(w, value, *acc);
            }
        }
    }
    acc
}

/// `out = Σ_r (scale · c[r]) · rows[r·stride..][..out.len()]`, in order of `r`, skipping zero
/// coefficients, asking for the row [`PREFETCH_ROWS`] ahead as it goes (both kernels of a
/// step's single-query attention).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn scaled_row_sum(c: &[f32], scale: f32, rows: &[f32], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    let width = out.len();
    for (r, (&c_r, row)) in c.iter().zip(rows.chunks(stride)).enumerate() {
        prefetch(
            rows.as_ptr().wrapping_add((r + PREFETCH_ROWS) * stride),
            width,
        );
        if c_r != 0.0 {
            let s = scale * c_r;
            for (o, &x) in out.iter_mut().zip(&row[..width]) {
                *o += s * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::softmax::softmax_rows_inplace;
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array2};

    /// A `[len, 3·d]` matrix whose middle `d` columns serve as one head: rows strided, as the
    /// heads of a projection are.
    fn head_source(len: usize, d: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((len, 3 * d), |(i, j)| {
            ((i * 31 + j * 17 + seed * 7) % 23) as f32 * 0.1 - 1.1
        })
    }

    /// Equal within `eps`, or both `-inf` (masked scores).
    fn assert_scores_eq(a: ArrayView2<f32>, b: ArrayView2<f32>, eps: f32) {
        assert_eq!(a.dim(), b.dim());
        for (((i, j), &x), &y) in a.indexed_iter().zip(b.iter()) {
            let masked = x == f32::NEG_INFINITY && y == f32::NEG_INFINITY;
            assert!(masked || (x - y).abs() <= eps, "({i}, {j}): {x} vs {y}");
        }
    }

    #[test]
    fn head_kernels_equal_the_general_products_with_and_without_a_causal_mask() {
        // One scratch for every shape, largest first, so that stale contents would show; more
        // queries than keys (fully masked rows), partial tiles, a d_v the tiles do not take.
        let mut scratch = HeadScratch::default();
        for (t, n, d_k, d_v) in [
            (128, 128, 64, 64),
            (70, 70, 64, 128),
            (9, 200, 8, 64),
            (13, 45, 24, 64),
            (20, 7, 16, 64),
            (1, 9, 3, 64),
            (5, 5, 4, 32),
        ] {
            let (q, k, v) = (
                head_source(t, d_k, 1),
                head_source(n, d_k, 2),
                head_source(n, d_v, 3),
            );
            let q = q.slice(s![.., d_k..2 * d_k]);
            let k = k.slice(s![.., d_k..2 * d_k]);
            let v = v.slice(s![.., d_v..2 * d_v]);
            for mask in [crate::Mask::none(), crate::Mask::causal()] {
                let causal = mask.is_causal();
                let mut expected = Array2::zeros((t, n));
                matmul_into_serial(q, k.t(), 0.125, 0.0, &mut expected.view_mut());
                mask.apply(0, expected.view_mut());
                let mut scores = Array2::from_elem((t, n), f32::NAN);
                head_scores(q, k, 0.125, causal, &mut scratch, &mut scores.view_mut());
                mask.apply(0, scores.view_mut());
                assert_scores_eq(scores.view(), expected.view(), 1e-5);

                softmax_rows_inplace(expected.view_mut());
                softmax_rows_inplace(scores.view_mut());
                let mut expected_out = Array2::zeros((t, d_v));
                matmul_into_serial(expected.view(), v, 1.0, 0.0, &mut expected_out.view_mut());
                // Written into strided rows, as into the concatenation of the heads.
                let mut out = Array2::from_elem((t, 2 * d_v), f32::NAN);
                let mut head = out.slice_mut(s![.., d_v..]);
                head_values(scores.view(), v, causal, &mut scratch, &mut head);
                assert_abs_diff_eq!(head, expected_out, epsilon = 1e-5);
                assert!(out.slice(s![.., ..d_v]).iter().all(|x| x.is_nan()));
            }
        }
    }
}
