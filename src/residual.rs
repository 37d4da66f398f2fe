//! Residual connection around a sub-layer, with its LayerNorm (§3.1, §5.4).
//!
//! The paper's order is `LayerNorm(x + Sublayer(x))` (post-LN). The pre-LN order,
//! `x + Sublayer(LayerNorm(x))`, keeps an un-normalised residual path and trains deep stacks
//! more stably; PyTorch calls it `norm_first`.

use ndarray::{Array3, ArrayView3};

use crate::config::NormPosition;
use crate::layer_norm::LayerNorm;

/// Applies `sublayer` to `x` with a residual connection and `norm` in the given position.
pub(crate) fn residual(
    mut x: Array3<f32>,
    norm: &LayerNorm,
    position: NormPosition,
    sublayer: impl FnOnce(ArrayView3<f32>) -> Array3<f32>,
) -> Array3<f32> {
    match position {
        NormPosition::Post => {
            x += &sublayer(x.view());
            norm_inplace(norm, &mut x);
            x
        }
        NormPosition::Pre => {
            let mut normed = x.clone();
            norm_inplace(norm, &mut normed);
            x += &sublayer(normed.view());
            x
        }
    }
}

/// LayerNorm of every position of a `[batch, seq, d_model]` array, in place.
pub(crate) fn norm_inplace(norm: &LayerNorm, x: &mut Array3<f32>) {
    if !x.is_standard_layout() {
        *x = x.as_standard_layout().into_owned();
    }
    let (b, len, d) = x.dim();
    let flat = x
        .view_mut()
        .into_shape_with_order((b * len, d))
        .expect("contiguous");
    norm.forward_inplace(flat);
}
