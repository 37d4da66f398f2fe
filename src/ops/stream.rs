//! Kernels for products of very few rows: a weight streamed once, and per-head few-row products.
//!
//! A decoding step's projections on a row-major weight ([`streaming_product`]) and one step's
//! queries against a head's keys or values ([`few_rows_product`]) are bound by reading the
//! other operand once; [`super::gemm`]'s kernel choice sends them here.

use super::lanes::{axpy_slices, dot, LANES};
use super::tile::store_sums;
use multiversion::multiversion;
use ndarray::parallel::prelude::*;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};

/// At most this many rows times a row-major weight (a decoding step's projections) go through
/// [`streaming_product`]: such a product is bound by reading the weight once, which the blocked
/// kernel's packing does in pieces the prefetchers follow badly.
pub(super) const STREAM_ROWS: usize = 8;
/// Widest column block of `b` a thread takes in [`streaming_product`]: four 4 KiB row pieces
/// and one accumulator row stay in L1.
const STREAM_COLS: usize = 1024;

/// `c = alpha · a · b + beta · c` for at most [`STREAM_ROWS`] rows of `a` and a `b` whose rows
/// are contiguous: `b` is read once, row after row, in runs of up to 4 KiB, and never packed.
///
/// Threads take column blocks of `b`; every column sums over the rows of `b` in the same order
/// whatever the block width, so the result does not depend on the thread count.
pub(super) fn streaming_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    let m = a.nrows();
    let n = b.ncols();
    // aᵀ as [k, m]: the m multipliers of one row of b sit together.
    let a_t: Vec<f32> = a.t().iter().copied().collect();
    let width = n
        .div_ceil(2 * threads)
        .next_multiple_of(LANES)
        .clamp(64, STREAM_COLS);
    c.axis_chunks_iter_mut(Axis(1), width)
        .into_par_iter()
        .zip(b.axis_chunks_iter(Axis(1), width))
        .for_each(|(mut c_block, b_block)| {
            let w = b_block.ncols();
            let rows: Vec<&[f32]> = b_block
                .rows()
                .into_iter()
                .map(|row| row.to_slice().expect("rows of b are contiguous"))
                .collect();
            let mut acc = vec![0.0f32; m * w];
            stream_block(&a_t, m, &rows, &mut acc, w);
            for (i, c_row) in c_block.rows_mut().into_iter().enumerate() {
                store_sums(c_row, &acc[i * w..(i + 1) * w], alpha, beta);
            }
        });
}

/// `acc[i, :] += Σ_r a_t[r, i] · b_rows[r]` for one work unit of [`streaming_product`], four
/// rows of `b` at a time so that each accumulator load and store carries four multiply-adds.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn stream_block(a_t: &[f32], m: usize, rows: &[&[f32]], acc: &mut [f32], width: usize) {
    let mut groups = rows.chunks_exact(4);
    let mut r = 0;
    for g in groups.by_ref() {
        let (b0, b1, b2, b3) = (
            &g[0][..width],
            &g[1][..width],
            &g[2][..width],
            &g[3][..width],
        );
        for i in 0..m {
            let s = [
                a_t[r * m + i],
                a_t[(r + 1) * m + i],
                a_t[(r + 2) * m + i],
                a_t[(r + 3) * m + i],
            ];
            let acc_i = &mut acc[i * width..(i + 1) * width];
            for j in 0..width {
                acc_i[j] += s[0] * b0[j] + s[1] * b1[j] + s[2] * b2[j] + s[3] * b3[j];
            }
        }
        r += 4;
    }
    for row in groups.remainder() {
        let row = &row[..width];
        for i in 0..m {
            let s = a_t[r * m + i];
            for (acc_ij, &b_j) in acc[i * width..(i + 1) * width].iter_mut().zip(row) {
                *acc_ij += s * b_j;
            }
        }
        r += 1;
    }
}

/// At most this many rows (one decoding step's queries per head) go through
/// [`few_rows_product`] instead of the blocked kernel, whose packing costs more than it saves.
pub(super) const FEW_ROWS: usize = 4;
/// ... as long as the other operand is small (an attention head's keys or values).
pub(super) const FEW_ROWS_MAX_WORK: usize = 1 << 16;

/// `c = alpha · a · b + beta · c` for a few rows of `a`, row by row: dot products with the
/// columns of `b` when those are contiguous (`b = Kᵀ`), else scaled sums of the rows of `b`
/// (`b = V`).
pub(super) fn few_rows_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    for (a_row, mut c_row) in a.rows().into_iter().zip(c.rows_mut()) {
        if beta == 0.0 {
            c_row.fill(0.0);
        } else if beta != 1.0 {
            c_row *= beta;
        }
        if b.strides()[0] == 1 {
            for (c_ij, b_col) in c_row.iter_mut().zip(b.columns()) {
                *c_ij += alpha * dot(a_row, b_col);
            }
        } else {
            for (&a_il, b_row) in a_row.iter().zip(b.rows()) {
                if a_il != 0.0 {
                    match (c_row.as_slice_mut(), b_row.as_slice()) {
                        (Some(c), Some(b)) => axpy_slices(alpha * a_il, b, c),
                        _ => c_row.scaled_add(alpha * a_il, &b_row),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::blocked_product;
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::Array2;

    #[test]
    fn few_rows_path_matches_the_blocked_kernel() {
        let a = Array2::from_shape_fn((3, 70), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let k = Array2::from_shape_fn((40, 70), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
        let v = Array2::from_shape_fn((70, 24), |(i, j)| ((i + 2 * j) % 7) as f32 * 0.2 - 0.6);
        for b in [k.t(), v.view()] {
            let mut small = Array2::from_elem((3, b.ncols()), 1.0f32);
            let mut big = small.clone();
            few_rows_product(a.view(), b, 0.5, 2.0, &mut small.view_mut());
            blocked_product(a.view(), b, 0.5, 2.0, &mut big.view_mut(), 2);
            assert_abs_diff_eq!(small, big, epsilon = 1e-5);
        }
    }

    #[test]
    fn streaming_products_match_the_blocked_kernel() {
        // Sizes with partial row and column blocks; β = 0 and β ≠ 0.
        for (m, k, n, threads) in [(1, 300, 2100, 2), (8, 130, 70, 1), (5, 7, 1030, 3)] {
            let a =
                Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
            let w = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
            for beta in [0.0, 2.0] {
                let mut streamed = Array2::from_elem((m, n), 1.0f32);
                let mut blocked = streamed.clone();
                streaming_product(
                    a.view(),
                    w.view(),
                    0.5,
                    beta,
                    &mut streamed.view_mut(),
                    threads,
                );
                blocked_product(a.view(), w.view(), 0.5, beta, &mut blocked.view_mut(), 1);
                assert_abs_diff_eq!(streamed, blocked, epsilon = 1e-4);
            }
        }
    }
}
