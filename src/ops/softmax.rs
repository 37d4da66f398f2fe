//! Softmax (§3.2.1), log-softmax and the online softmax, row by row.
//!
//! Attention normalises its scores with [`softmax_slice`] (or block by block with
//! [`online_softmax_update`]); decoding turns logits into log-probabilities with
//! [`log_softmax_rows_inplace`]. A row whose entries are all `-inf` becomes all zeros.

use super::activation::{exp, exp_with};
use super::lanes::{fold_lanes, max_lanes, sum_lanes_map, with_slice, LANES};
use multiversion::multiversion;
use ndarray::{ArrayViewMut1, ArrayViewMut2};

/// Numerically stable softmax of each row, in place (§3.2.1).
///
/// Entries equal to `-inf` are masked keys and get probability exactly 0. A row whose entries
/// are all `-inf` (every key masked) becomes all zeros instead of NaN: the crate's one rule for
/// a fully masked row, so the attention output of such a query is the zero vector.
pub fn softmax_rows_inplace(mut scores: ArrayViewMut2<f32>) {
    for row in scores.rows_mut() {
        with_slice(row, softmax_slice);
    }
}

/// Log-softmax of each row in place: `x - max - ln Σ exp(x - max)`, stable for large logits.
pub fn log_softmax_rows_inplace(mut x: ArrayViewMut2<f32>) {
    for row in x.rows_mut() {
        with_slice(row, log_softmax_slice);
    }
}

fn log_softmax_slice(row: &mut [f32]) {
    let shift = log_sum_exp(row);
    row.iter_mut().for_each(|v| *v -= shift);
}

/// `ln Σ exp(x)` of one row, as `max + ln Σ exp(x − max)`: what [`log_softmax_rows_inplace`]
/// subtracts, so `x[i] − log_sum_exp(x)` is exactly its entry `i`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_lanes(row);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f32 = sum_lanes_map(row, |v| exp(v - max));
    max + sum.ln()
}

/// Softmax of one contiguous row; see [`softmax_rows_inplace`] for the masked-row rule.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn softmax_slice(row: &mut [f32]) {
    let max = max_lanes(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Fused multiply-adds in `exp` where the CPU has them: half the polynomial's instructions.
    const FMA: bool = multiversion::target::selected_target!().supports_feature_str("fma");
    let sum = if FMA {
        exp_in_place::<true>(row, max)
    } else {
        exp_in_place::<false>(row, max)
    };
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `row[i] = e^(row[i] − max)` in one pass, returning their sum (with [`LANES`] partial sums,
/// as [`sum_lanes_map`] adds).
#[inline(always)]
fn exp_in_place<const FUSED: bool>(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *v = exp_with::<FUSED>(*v - max);
            *a += *v;
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|v| {
            *v = exp_with::<FUSED>(*v - max);
            *v
        })
        .sum();
    fold_lanes(acc, |a, b| a + b) + tail
}

/// One step of the online (streaming) softmax over a block of a row's scores.
///
/// `running_max` and `running_sum` carry the row's maximum and `Σ exp(score − max)` over the
/// blocks seen so far. The block's scores become `exp(score − new max)`, and the returned factor
/// `exp(old max − new max)` rescales everything accumulated from earlier blocks. Masked (`-inf`)
/// scores contribute exactly 0; a row that has seen only masked scores keeps a sum of 0.
pub(crate) fn online_softmax_update(
    mut row: ArrayViewMut1<f32>,
    running_max: &mut f32,
    running_sum: &mut f32,
) -> f32 {
    let mut correction = 1.0;
    with_slice(row.view_mut(), |row| {
        correction = online_softmax_slice(row, running_max, running_sum)
    });
    correction
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn online_softmax_slice(row: &mut [f32], running_max: &mut f32, running_sum: &mut f32) -> f32 {
    let new_max = max_lanes(row).max(*running_max);
    if new_max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 1.0;
    }
    let correction = exp(*running_max - new_max);
    row.iter_mut().for_each(|v| *v = exp(*v - new_max));
    *running_sum = *running_sum * correction + sum_lanes_map(row, |v| v);
    *running_max = new_max;
    correction
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array2};

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut x = array![
            [1.0f32, 2.0, 3.0],
            [1000.0, 1000.0, -1000.0],
            [-5.0, 0.0, 5.0]
        ];
        softmax_rows_inplace(x.view_mut());
        for row in x.rows() {
            assert_abs_diff_eq!(row.sum(), 1.0, epsilon = 1e-6);
            assert!(row.iter().all(|&p| (0.0..=1.0).contains(&p)));
        }
        assert_abs_diff_eq!(x[[1, 0]], 0.5, epsilon = 1e-6);
        assert!(x[[0, 2]] > x[[0, 1]] && x[[0, 1]] > x[[0, 0]]);
    }

    #[test]
    fn masked_entries_get_zero_and_fully_masked_rows_are_zero() {
        let ninf = f32::NEG_INFINITY;
        let mut x = array![[0.0f32, ninf, 0.0], [ninf, ninf, ninf]];
        softmax_rows_inplace(x.view_mut());
        assert_eq!(x.row(0).to_vec(), vec![0.5, 0.0, 0.5]);
        assert_eq!(x.row(1).to_vec(), vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn log_softmax_is_log_of_softmax_and_stable() {
        let x = array![[1.0f32, 2.0, 3.0], [1e4, 0.0, -1e4]];
        let mut lp = x.clone();
        log_softmax_rows_inplace(lp.view_mut());
        let mut p = x.clone();
        softmax_rows_inplace(p.view_mut());
        assert_abs_diff_eq!(lp.row(0).mapv(f32::exp), p.row(0), epsilon = 1e-6);
        assert!(lp.iter().all(|v| v.is_finite()));
        assert_abs_diff_eq!(lp[[1, 0]], 0.0, epsilon = 1e-6);
    }

    #[test]
    fn strided_rows_take_the_copy_path() {
        let x = Array2::from_shape_fn((5, 3), |(i, j)| (i * 3 + j) as f32 * 0.3);
        let mut t = x.t().to_owned();
        softmax_rows_inplace(t.view_mut());
        let mut strided = x.clone();
        softmax_rows_inplace(strided.view_mut().reversed_axes());
        assert_abs_diff_eq!(strided.t(), t.view(), epsilon = 1e-7);
    }
}
