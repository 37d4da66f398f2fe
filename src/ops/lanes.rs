//! Loops over a row in sixteen independent lanes, which the compiler vectorises: sums, maxima,
//! dot products, `y += s·x` and argmax, and the rule for rows that are not contiguous.
//!
//! Every row kernel (softmax, LayerNorm, the activations, the few-row products) builds on these;
//! the decoding loops call [`argmax_slice`] for greedy choices.

use multiversion::multiversion;
use ndarray::{ArrayView1, ArrayViewMut1};

/// `y += s · x`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(super) fn axpy_slices(s: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += s * x;
    }
}

/// `x · y` with [`LANES`] partial sums when both are contiguous.
pub(super) fn dot(x: ArrayView1<f32>, y: ArrayView1<f32>) -> f32 {
    match (x.as_slice(), y.as_slice()) {
        (Some(x), Some(y)) => dot_slices(x, y),
        _ => x.dot(&y),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn dot_slices(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xc, yc) in xs.zip(ys) {
        for ((a, &p), &q) in acc.iter_mut().zip(xc).zip(yc) {
            *a += p * q;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` on the row as a slice, copying it only if it is not contiguous.
pub(super) fn with_slice(mut row: ArrayViewMut1<f32>, f: impl FnOnce(&mut [f32])) {
    match row.as_slice_mut() {
        Some(slice) => f(slice),
        None => {
            let mut copy = row.to_vec();
            f(&mut copy);
            row.assign(&ArrayView1::from(&copy));
        }
    }
}

/// Width of the independent accumulators below: enough lanes for the loops to vectorise.
pub(super) const LANES: usize = 16;

/// `Σ f(x)` with [`LANES`] partial sums.
#[inline(always)]
pub(super) fn sum_lanes_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    fold_lanes(acc, |a, b| a + b) + tail
}

/// The [`LANES`] partial results combined pairwise (lane `i` with lane `i + width`, halving
/// the width): four dependent vector steps, where a fold from the first lane to the last is
/// fifteen dependent scalar ones, most of a short row's softmax.
#[inline(always)]
pub(super) fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

/// The largest entry (`-inf` for an empty or fully masked row).
#[inline(always)]
pub(super) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    let max = fold_lanes(acc, |a, b| if b > a { b } else { a });
    if tail > max {
        tail
    } else {
        max
    }
}

/// Index of the largest entry of each row; ties go to the lowest index.
#[cfg(test)]
fn argmax_rows(x: ndarray::ArrayView2<f32>) -> Vec<usize> {
    x.rows()
        .into_iter()
        .map(|row| match row.as_slice() {
            Some(row) => argmax_slice(row),
            None => argmax_slice(&row.to_vec()),
        })
        .collect()
}

/// The index of the largest entry of `x` (ties: the lowest index), in [`LANES`] running maxima: each lane keeps the first index of
/// its largest value (strict `>`), so the smallest index among the lanes holding the overall
/// largest value is the row's first one. NaNs are never chosen over a number.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn argmax_slice(x: &[f32]) -> usize {
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0usize; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail_start = x.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        for (lane, &v) in chunk.iter().enumerate() {
            if v > best[lane] {
                best[lane] = v;
                at[lane] = c * LANES + lane;
            }
        }
    }
    let (mut max, mut index) = (f32::NEG_INFINITY, 0);
    for (&v, &i) in best.iter().zip(&at) {
        if v > max || (v == max && i < index) {
            (max, index) = (v, i);
        }
    }
    for (i, &v) in x.iter().enumerate().skip(tail_start) {
        if v > max {
            (max, index) = (v, i);
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    use ndarray::{array, Array2};

    #[test]
    fn argmax_breaks_ties_to_lowest_id() {
        let x = array![[1.0f32, 3.0, 3.0], [2.0, 2.0, 2.0]];
        assert_eq!(argmax_rows(x.view()), vec![1, 0]);
        // Many ties, lengths around the lane width, contiguous and strided rows, -inf rows.
        let first_max = |row: &[f32]| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter().position(|&v| v == max).unwrap()
        };
        for len in [1, 15, 16, 17, 33, 100, 1000] {
            let x = Array2::from_shape_fn((4, len), |(i, j)| ((j * 7 + i * 3) % 5) as f32);
            let want: Vec<usize> = x
                .rows()
                .into_iter()
                .map(|r| first_max(&r.to_vec()))
                .collect();
            assert_eq!(argmax_rows(x.view()), want, "len {len}");
            assert_eq!(argmax_rows(x.t().t()), want);
            let strided = x.t().to_owned();
            assert_eq!(argmax_rows(strided.t()), want, "strided, len {len}");
        }
        let masked = Array2::from_elem((2, 40), f32::NEG_INFINITY);
        assert_eq!(argmax_rows(masked.view()), vec![0, 0]);
    }
}
