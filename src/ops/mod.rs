//! The numerical kernels: every matrix product, softmax, LayerNorm and activation of the crate.
//!
//! Layers call these and never `dot` or a GEMM directly, so choosing or tuning the backend is
//! a decision made in this folder. This file holds what a linear layer calls (`Weight`,
//! `linear`, the `Epilogue` that adds its bias and activation) and the choice between the
//! batch and the few-row kernels; the rest is one concept a file:
//!
//! | file | holds |
//! |---|---|
//! | `gemm.rs` | products of strided matrices and the kernel choice for each (`gemm`, `matrixmultiply`) |
//! | `panels.rs` | the panel layout of weights and the batch products over it |
//! | `tile.rs` | the AVX-512 register tiles for a few rows times a weight in panels |
//! | `stream.rs` | products of very few rows: a weight streamed once, per-head few-row products |
//! | `amx.rs` | batch products on Intel's AMX tiles, at f32 accuracy |
//! | `int8.rs` | int8 linear layers: weights per row, activations per block of a row, i32 sums |
//! | `int8_amx.rs` | the int8 batch products on Intel's AMX tiles (`tdpbusd`) |
//! | `bf16.rs` | bf16 linear layers: weights in bf16 panels, f32 activations and sums |
//! | `attention.rs` | the per-head kernels of attention, `q kᵀ` and `p v` (§3.2.1) |
//! | `softmax.rs` | softmax, log-softmax, online softmax |
//! | `norm.rs` | LayerNorm and residual additions |
//! | `activation.rs` | ReLU, exact GELU, `exp` |
//! | `lanes.rs` | sixteen-lane sums, maxima, dot products, argmax |
//! | `pool.rs` | the warm thread pool a model pass runs in |
//!
//! All kernels work on `f32` and accept strided views. The softmax kernels are public for
//! decoding code and benchmarks; the rest is internal. CPU features and the crate's
//! process-wide state are in [`crate::cpu`].
//!
//! ```
//! use ndarray::array;
//! let mut scores = array![[1.0f32, 2.0, f32::NEG_INFINITY]];
//! ndtransformer::ops::softmax_rows_inplace(scores.view_mut());
//! assert_eq!(scores[[0, 2]], 0.0);
//! ```

use self::activation::{activate_rows, add_bias_activate};
use self::gemm::{
    blocked_product, blocked_product_fresh, kernel_for, matmul_into, threads_for, Kernel,
};
use self::lanes::with_slice;
use self::panels::{
    panel_view, panels_product_biased_into, panels_product_fresh, panels_product_into,
};
use self::tile::tile_kernel_for;
use crate::huge_pages;
use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, Axis, Dim};

mod activation;
mod attention;
mod bf16;
mod gemm;
mod int8;
mod lanes;
mod norm;
mod panels;
mod pool;
mod softmax;
mod stream;
#[cfg(test)]
mod testing;
mod tile;

/// Batch products on Intel's AMX tiles, at f32 precision, where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod amx;
/// Int8 batch products on Intel's AMX tiles, where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod int8_amx;

pub(crate) use self::attention::{
    head_scores, head_values, query_scores, weighted_rows, HeadScratch,
};
pub(crate) use self::bf16::{first_out_of_range as bf16_first_out_of_range, Bf16Weight};
pub(crate) use self::gemm::matmul_into_serial;
pub(crate) use self::int8::{Int8Weight, MAX_INPUTS as INT8_MAX_INPUTS};
pub(crate) use self::lanes::argmax_slice;
pub(crate) use self::norm::{add_rows_inplace, layer_norm_rows_inplace};
pub(crate) use self::panels::{pack_panels, unpack_panels};
pub(crate) use self::pool::with_warm_pool;
pub use self::softmax::{log_softmax_rows_inplace, softmax_rows_inplace};
pub(crate) use self::softmax::{log_sum_exp, online_softmax_update};

/// What [`linear`] does after the product: the bias (folded into the product) and an activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `y + b`
    Bias,
    /// `max(0, y + b)`
    BiasRelu,
    /// `gelu(y + b)`, exact
    BiasGelu,
    /// `gelu(y + b)` in its tanh approximation
    BiasGeluTanh,
    /// `silu(y + b)`, also called swish
    BiasSilu,
}

/// A weight as [`linear`] takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weight<'a> {
    /// `W`, `[out, in]` (PyTorch's layout), any strides. The layers keep their weights in
    /// panels (a tied table too, since a plain `W` is repacked by every product); the tests
    /// use this layout as the reference.
    #[cfg_attr(not(test), allow(dead_code))]
    Plain(ArrayView2<'a, f32>),
    /// `Wᵀ` in panels ([`pack_panels`]), with its number of columns (`out`).
    Panels(ArrayView3<'a, f32>, usize),
    /// `W` as int8 values with one scale per output row ([`Int8Weight`]).
    Int8(&'a Int8Weight),
    /// `W` as bf16 values in panels ([`Bf16Weight`]).
    Bf16(&'a Bf16Weight),
}

impl Weight<'_> {
    /// `out`, the number of outputs.
    fn out_features(&self) -> usize {
        match self {
            Weight::Plain(w) => w.nrows(),
            Weight::Panels(_, n) => *n,
            Weight::Int8(w) => w.out_features(),
            Weight::Bf16(w) => w.out_features(),
        }
    }
}

/// The f32 weights of [`Weight`], which the float kernels take.
#[derive(Clone, Copy)]
enum F32Weight<'a> {
    Plain(ArrayView2<'a, f32>),
    Panels(ArrayView3<'a, f32>, usize),
}

/// The reduced-precision weights of [`Weight`], each with its own kernels.
#[derive(Clone, Copy)]
enum Reduced<'a> {
    Int8(&'a Int8Weight),
    Bf16(&'a Bf16Weight),
}

impl<'a> Weight<'a> {
    /// The f32 weight, or the reduced-precision one.
    fn split(self) -> Result<F32Weight<'a>, Reduced<'a>> {
        match self {
            Weight::Plain(w) => Ok(F32Weight::Plain(w)),
            Weight::Panels(p, n) => Ok(F32Weight::Panels(p, n)),
            Weight::Int8(q) => Err(Reduced::Int8(q)),
            Weight::Bf16(w) => Err(Reduced::Bf16(w)),
        }
    }
}

/// `epilogue(x · wᵀ + bias)` into `y` (any contents, overwritten) for a reduced-precision
/// weight: its kernel writes `x · wᵀ + bias`, the activation is one more pass.
fn reduced_linear(
    x: ArrayView2<f32>,
    w: Reduced,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    match w {
        // The int8 kernel applies the activation as it stores the sums.
        Reduced::Int8(q) => int8::int8_linear(x, q, bias, epilogue, y.view_mut()),
        Reduced::Bf16(w) => {
            bf16::bf16_linear(x, w, bias, y.view_mut());
            if epilogue != Epilogue::Bias {
                activate_rows(y, epilogue);
            }
        }
    }
}

/// `epilogue(x · wᵀ, bias)`, with `x: [rows, in]`, `w: [out, in]`; returns `[rows, out]`.
///
/// Products of many rows are written once into fresh memory, and the bias and activation
/// added to each block of it right after its product (weights in panels) or in one pass over
/// it by all threads (a plain weight). Otherwise the output starts as the bias, repeated
/// on every row, and the product is added to it (`beta = 1`): the sum `x · wᵀ + b` is the same
/// float either way, and this saves a zeroing pass and a bias pass over the output. An
/// activation, if any, is one more pass.
pub(crate) fn linear(
    x: ArrayView2<f32>,
    w: Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
) -> Array2<f32> {
    let (rows, out) = (x.nrows(), w.out_features());
    let w = match w.split() {
        Ok(w) => w,
        Err(Reduced::Int8(q)) => {
            // The int8 kernel writes every output: no pass zeroes them first.
            let mut y = huge_pages::uninit(Dim([rows, out]));
            int8::int8_linear_uninit(x, q, bias, epilogue, y.view_mut());
            // SAFETY: `int8_linear_uninit` wrote every element.
            return unsafe { y.assume_init() };
        }
        Err(w) => {
            let mut y = huge_pages::zeros(Dim([rows, out]));
            reduced_linear(x, w, bias, epilogue, y.view_mut());
            return y;
        }
    };
    if rows * out > 0 && takes_blocked(x, w) {
        return match w {
            F32Weight::Plain(w) => {
                let mut y = blocked_product_fresh(x, w.t(), threads_for(x, w.t()));
                bias_activate_rows(y.view_mut(), bias, epilogue);
                y
            }
            F32Weight::Panels(panels, n) => panels_product_fresh(x, panels, n, bias, epilogue),
        };
    }
    let mut y = match bias {
        // Large outputs of few rows (a wide vocabulary's logits in a step) come as fresh zeroed
        // huge pages and are filled by all threads.
        Some(b) if rows * out >= PARALLEL_FILL => {
            let mut y = huge_pages::zeros(Dim([rows, out]));
            fill_rows(y.view_mut(), b);
            y
        }
        Some(b) => {
            let b = b.to_vec();
            let mut data = Vec::with_capacity(rows * out);
            for _ in 0..rows {
                data.extend_from_slice(&b);
            }
            Array2::from_shape_vec((rows, out), data).expect("rows × out values")
        }
        None => huge_pages::zeros(Dim([rows, out])),
    };
    add_product(x, w, bias.is_some(), epilogue, y.view_mut());
    y
}

/// [`linear`] written into `y: [rows, out]` (whatever it holds), the same floats: for a caller
/// that keeps its output buffer from call to call (a batch's logits are 131 MB, which fresh
/// memory must have the kernel zero first, page by page).
pub(crate) fn linear_into(
    x: ArrayView2<f32>,
    w: Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    let (rows, out) = (x.nrows(), w.out_features());
    assert_eq!(y.dim(), (rows, out), "output is [rows, out]");
    if rows * out == 0 {
        return;
    }
    let w = match w.split() {
        Ok(w) => w,
        Err(w) => return reduced_linear(x, w, bias, epilogue, y),
    };
    if takes_blocked(x, w) {
        match w {
            F32Weight::Plain(w) => {
                blocked_product(x, w.t(), 1.0, 0.0, &mut y, threads_for(x, w.t()));
                bias_activate_rows(y, bias, epilogue);
            }
            F32Weight::Panels(panels, n) => {
                panels_product_biased_into(x, panels, n, bias, epilogue, y)
            }
        }
        return;
    }
    // Few rows: the bias first, the product added to it, as in `linear`.
    match bias {
        Some(b) => fill_rows(y.view_mut(), b),
        None => y.fill(0.0),
    }
    add_product(x, w, bias.is_some(), epilogue, y);
}

/// Whether `x · wᵀ` takes the blocked kernel (a batch of rows), whose output [`linear`] writes
/// once into fresh memory; the choice depends on the shapes alone.
fn takes_blocked(x: ArrayView2<f32>, w: F32Weight) -> bool {
    match w {
        F32Weight::Plain(w) => matches!(kernel_for(x, w.t()), Kernel::Blocked),
        F32Weight::Panels(panels, n) => {
            !uses_tile(x.nrows(), x.ncols(), n)
                && matches!(kernel_for(x, panel_view(panels, n, 0)), Kernel::Blocked)
        }
    }
}

/// Every row of `y` set to `b`, rows in parallel.
fn fill_rows(mut y: ArrayViewMut2<f32>, b: ArrayView1<f32>) {
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .with_min_len(16)
        .for_each(|mut row| row.assign(&b));
}

/// `y = epilogue(y + bias)` on every row of `y`, which holds `x · wᵀ`; rows in parallel.
fn bias_activate_rows(
    mut y: ArrayViewMut2<f32>,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
) {
    match bias {
        Some(b) => y
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .with_min_len(16)
            .for_each(|row| with_slice(row, |row| add_bias_activate(row, b, epilogue))),
        None if epilogue != Epilogue::Bias => activate_rows(y, epilogue),
        None => {}
    }
}

/// `y = epilogue(y + x · wᵀ)` when `y` holds the bias (`onto_bias`), else `epilogue(x · wᵀ)`
/// over whatever `y` holds.
fn add_product(
    x: ArrayView2<f32>,
    w: F32Weight,
    onto_bias: bool,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    let beta = if onto_bias { 1.0 } else { 0.0 };
    match w {
        F32Weight::Plain(w) => matmul_into(x, w.t(), 1.0, beta, &mut y),
        F32Weight::Panels(panels, n) => panels_product_into(x, panels, n, 1.0, beta, &mut y),
    }
    if epilogue != Epilogue::Bias {
        activate_rows(y, epilogue);
    }
}

/// Whether a product of `rows` rows with a `[k, n]` weight in panels runs on a register tile
/// of [`tile`].
fn uses_tile(rows: usize, k: usize, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tile_kernel_for(rows, k, n).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, k, n);
        false
    }
}

/// Outputs of at least this many values lie on huge pages and, when they start as the bias,
/// get it written by all threads.
const PARALLEL_FILL: usize = 1 << 22;

#[cfg(test)]
mod tests {
    use super::panels::pack_panels;
    use super::testing::same_sums;
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array1, Array2};

    #[test]
    fn linear_matches_naive_product() {
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 * 0.1);
        let w = Array2::from_shape_fn((2, 4), |(o, i)| (o as f32 - i as f32) * 0.3);
        let b = array![0.5f32, -1.0];
        let panels = pack_panels(w.t());
        for weight in [Weight::Plain(w.view()), Weight::Panels(panels.view(), 2)] {
            let y = linear(x.view(), weight, Some(b.view()), Epilogue::Bias);
            for r in 0..3 {
                for o in 0..2 {
                    let expect: f32 = (0..4).map(|i| x[[r, i]] * w[[o, i]]).sum::<f32>() + b[o];
                    assert_abs_diff_eq!(y[[r, o]], expect, epsilon = 1e-5);
                }
            }
        }
    }

    #[test]
    fn batch_linear_layers_written_into_fresh_memory_match_the_filled_path() {
        // 600 rows take the blocked kernel's fresh-output path; the reference fills the bias
        // first and adds the product (beta = 1), the path of fewer rows. Same floats expected.
        let x = Array2::from_shape_fn((600, 40), |(i, j)| {
            ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5
        });
        let w = Array2::from_shape_fn((2000, 40), |(o, i)| ((o * 5 + i) % 13) as f32 * 0.05 - 0.3);
        let b = Array1::from_shape_fn(2000, |o| (o % 7) as f32 * 0.25 - 0.75);
        let panels = pack_panels(w.t());
        for epilogue in [
            Epilogue::Bias,
            Epilogue::BiasRelu,
            Epilogue::BiasGelu,
            Epilogue::BiasGeluTanh,
            Epilogue::BiasSilu,
        ] {
            let y = linear(x.view(), Weight::Plain(w.view()), Some(b.view()), epilogue);
            let mut expected = Array2::from_shape_fn((600, 2000), |(_, o)| b[o]);
            blocked_product(x.view(), w.t(), 1.0, 1.0, &mut expected.view_mut(), 2);
            activate_rows(expected.view_mut(), epilogue);
            assert_eq!(y, expected, "{epilogue:?}");
            assert!(y.is_standard_layout());
            let y = linear(
                x.view(),
                Weight::Panels(panels.view(), 2000),
                Some(b.view()),
                epilogue,
            );
            let mut expected = Array2::from_shape_fn((600, 2000), |(_, o)| b[o]);
            panels_product_into(
                x.view(),
                panels.view(),
                2000,
                1.0,
                1.0,
                &mut expected.view_mut(),
            );
            activate_rows(expected.view_mut(), epilogue);
            same_sums(&y, &expected, 40);
        }
        let no_bias = linear(x.view(), Weight::Plain(w.view()), None, Epilogue::Bias);
        let mut expected = Array2::zeros((600, 2000));
        blocked_product(x.view(), w.t(), 1.0, 0.0, &mut expected.view_mut(), 1);
        assert_eq!(no_bias, expected);
        for weight in [
            Weight::Plain(Array2::zeros((5, 0)).view()),
            Weight::Panels(pack_panels(Array2::zeros((0, 5)).view()).view(), 5),
        ] {
            let empty = linear(Array2::zeros((300, 0)).view(), weight, None, Epilogue::Bias);
            assert_eq!(empty, Array2::<f32>::zeros((300, 5)), "k = 0 writes zeros");
        }
    }
}
