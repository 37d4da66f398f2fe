//! Operands and reference products the kernels' tests share.

#[cfg(target_arch = "x86_64")]
use super::amx;
use ndarray::{Array2, ArrayView2};

/// Whether a batch product `[m, k] · [k, n]` over panels runs on the AMX tiles here.
pub(super) fn on_amx_tiles(m: usize, k: usize, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::takes_tiles(m, k, n) && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y: [m, n]` against `expected`, a batch product with `k` inputs over panels against the
/// `gemm` path: the same floats where both run on `gemm`'s kernels, within f32 rounding
/// where the batch product sums on the AMX tiles in another order.
pub(super) fn same_sums(y: &Array2<f32>, expected: &Array2<f32>, k: usize) {
    let (m, n) = y.dim();
    if on_amx_tiles(m, k, n) {
        assert_eq!(y.dim(), expected.dim());
        for (y, e) in y.iter().zip(expected) {
            assert!((y - e).abs() <= 1e-6 * e.abs().max(1.0), "{y} against {e}");
        }
    } else {
        assert_eq!(y, expected);
    }
}

/// A `[m, k]` input and a `[k, n]` weight `Wᵀ` of small, varied values.
pub(super) fn operands(m: usize, k: usize, n: usize) -> (Array2<f32>, Array2<f32>) {
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
    let w_t = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
    (a, w_t)
}

/// A `[rows, cols]` matrix of varied values in about `[-1, 1]` (`(… % 97) / scale − 1`) with one
/// in 23 eight times larger (the outliers a quantized product must carry); `seed` shifts the
/// pattern.
pub(super) fn values_with_outliers(
    rows: usize,
    cols: usize,
    seed: usize,
    scale: f32,
) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        let v = ((i * 131 + j * 71 + seed * 17) % 97) as f32 / scale - 1.0;
        if (i + j + seed).is_multiple_of(23) {
            v * 8.0
        } else {
            v
        }
    })
}

/// `alpha · a · b + beta · c` with loops, for any strides.
pub(super) fn naive_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: ArrayView2<f32>,
) -> Array2<f32> {
    Array2::from_shape_fn(c.dim(), |(i, j)| {
        let dot: f32 = (0..a.ncols()).map(|l| a[[i, l]] * b[[l, j]]).sum();
        alpha * dot + beta * c[[i, j]]
    })
}
