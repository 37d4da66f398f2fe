//! Residual connection around a sub-layer, with its LayerNorm (§3.1, §5.4).
//!
//! The paper's order is `LayerNorm(x + Sublayer(x))` (post-LN). The pre-LN order,
//! `x + Sublayer(LayerNorm(x))`, keeps an un-normalised residual path and trains deep stacks
//! more stably; PyTorch calls it `norm_first`.

use ndarray::{Array2, Array3, ArrayView3, ArrayViewMut2};

use crate::config::NormPosition;
use crate::layer_norm::LayerNorm;
use crate::ops;

/// Applies `sublayer` to `x` with a residual connection and `norm` in the given position.
///
/// The addition and the norm after it are one pass over the rows, spread over the threads.
pub(crate) fn residual(
    mut x: Array3<f32>,
    norm: &LayerNorm,
    position: NormPosition,
    sublayer: impl FnOnce(ArrayView3<f32>) -> Array3<f32>,
) -> Array3<f32> {
    match position {
        NormPosition::Post => {
            let y = sublayer(x.view());
            norm.add_forward_inplace(rows_mut(&mut x), into_rows(y).view());
            x
        }
        NormPosition::Pre => {
            let mut normed = x.clone();
            norm_inplace(norm, &mut normed);
            let y = sublayer(normed.view());
            ops::add_rows_inplace(rows_mut(&mut x), into_rows(y).view());
            x
        }
    }
}

/// LayerNorm of every position of a `[batch, seq, d_model]` array, in place.
pub(crate) fn norm_inplace(norm: &LayerNorm, x: &mut Array3<f32>) {
    norm.forward_inplace(rows_mut(x));
}

/// `x` `[batch, seq, d_model]` as rows `[batch · seq, d_model]`, made standard layout first if
/// it is not.
fn rows_mut(x: &mut Array3<f32>) -> ArrayViewMut2<'_, f32> {
    if !x.is_standard_layout() {
        *x = x.as_standard_layout().into_owned();
    }
    let (b, len, d) = x.dim();
    x.view_mut()
        .into_shape_with_order((b * len, d))
        .expect("standard layout")
}

/// `y` `[batch, seq, d_model]` as rows `[batch · seq, d_model]` (copied only if it is not in
/// standard layout).
fn into_rows(y: Array3<f32>) -> Array2<f32> {
    let (b, len, d) = y.dim();
    let y = if y.is_standard_layout() {
        y
    } else {
        y.as_standard_layout().into_owned()
    };
    y.into_shape_with_order((b * len, d))
        .expect("standard layout")
}
