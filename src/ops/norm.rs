//! Layer normalisation (§3.1, Ba et al. 2016) and the residual additions around it (§5.4).
//!
//! `LayerNorm` and the encoder and decoder layers call these, the residual add fused into the
//! norm's pass where the layer is post-LN.

use super::lanes::{axpy_slices, sum_lanes_map, with_slice};
use multiversion::multiversion;
use ndarray::parallel::prelude::*;
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Axis};

/// LayerNorm of each row of `x` `[rows, d]` in place, `(x - mean) / sqrt(var + eps) * gamma +
/// beta` with the biased variance and eps inside the square root, as PyTorch computes it; rows
/// spread over the threads. With `y` `[rows, d]`, `LayerNorm(x + y)`: a residual connection and
/// its norm (§5.4) in one pass, the same floats as adding first and normalising after.
pub(crate) fn layer_norm_rows_inplace(
    mut x: ArrayViewMut2<f32>,
    y: Option<ArrayView2<f32>>,
    gamma: ArrayView1<f32>,
    beta: ArrayView1<f32>,
    eps: f32,
) {
    let (gamma, beta) = (gamma.to_vec(), beta.to_vec());
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .with_min_len(16)
        .for_each(|(i, row)| {
            with_slice(row, |row| {
                if let Some(y) = y {
                    add_row(row, y.row(i));
                }
                layer_norm_slice(row, &gamma, &beta, eps)
            })
        });
}

/// `x += y` for `x`, `y` `[rows, d]`, rows spread over the threads (a pre-LN residual).
pub(crate) fn add_rows_inplace(mut x: ArrayViewMut2<f32>, y: ArrayView2<f32>) {
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(y.axis_iter(Axis(0)))
        .with_min_len(16)
        .for_each(|(row, y)| with_slice(row, |row| add_row(row, y)));
}

/// `row += y` (scaled by 1, which leaves every value as it is).
pub(super) fn add_row(row: &mut [f32], y: ArrayView1<f32>) {
    match y.as_slice() {
        Some(y) => axpy_slices(1.0, y, row),
        None => row.iter_mut().zip(y).for_each(|(v, &y)| *v += y),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn layer_norm_slice(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = sum_lanes_map(row, |v| v) / n;
    let var = sum_lanes_map(row, |v| (v - mean) * (v - mean)) / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv_std * g + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array1, Array2};

    #[test]
    fn residual_add_and_norm_in_one_pass_equals_add_then_norm() {
        let x = Array2::from_shape_fn((40, 24), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.3 - 1.0);
        // A transposed copy: `y` as a strided view, its rows not contiguous.
        let y_t = Array2::from_shape_fn((24, 40), |(j, i)| ((i * 5 + j) % 13) as f32 * 0.2);
        let y = y_t.t();
        let gamma = Array1::from_shape_fn(24, |j| 1.0 + j as f32 * 0.01);
        let beta = Array1::from_shape_fn(24, |j| j as f32 * -0.02);
        let mut expected = &x + &y;
        layer_norm_rows_inplace(expected.view_mut(), None, gamma.view(), beta.view(), 1e-5);
        let mut fused = x.clone();
        layer_norm_rows_inplace(fused.view_mut(), Some(y), gamma.view(), beta.view(), 1e-5);
        assert_eq!(fused, expected);
        let mut added = x.clone();
        add_rows_inplace(added.view_mut(), y);
        assert_eq!(added, &x + &y);
    }

    #[test]
    fn layer_norm_normalises_with_eps_on_variance() {
        let mut x = array![[1.0f32, 2.0, 3.0, 4.0]];
        let eps = 0.5;
        layer_norm_rows_inplace(
            x.view_mut(),
            None,
            array![1.0f32, 1.0, 1.0, 1.0].view(),
            array![0.0f32, 0.0, 0.0, 0.0].view(),
            eps,
        );
        // mean 2.5, biased variance 1.25: eps is added to the variance, not the std.
        let inv = 1.0 / (1.25f32 + eps).sqrt();
        assert_abs_diff_eq!(
            x,
            array![[-1.5 * inv, -0.5 * inv, 0.5 * inv, 1.5 * inv]],
            epsilon = 1e-6
        );
    }
}
