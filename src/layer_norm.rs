//! Layer normalisation (Ba et al. 2016), used around every sub-layer (§3.1).
//!
//! `LN(x) = (x − mean) / √(var + eps) · γ + β` over the last axis, with the biased variance and
//! eps added to the variance, exactly as PyTorch's `nn.LayerNorm` (not to the standard
//! deviation, as some tutorials write it).

use ndarray::{Array, Array1, ArrayView, ArrayView1, ArrayView2, ArrayViewMut2, Dimension};

use crate::config::validate_eps;
use crate::error::{Error, Result};
use crate::ops;
use crate::parameters::{Parameters, Scope, Tensor, Visitor};

/// LayerNorm over the last axis with learned gain `gamma` and bias `beta`.
///
/// ```
/// use ndarray::array;
/// use ndtransformer::LayerNorm;
/// let norm = LayerNorm::identity(4, 1e-5)?;
/// let y = norm.forward(array![[1.0f32, 2.0, 3.0, 4.0]].view())?;
/// assert!(y.sum().abs() < 1e-5); // zero mean
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    gamma: Array1<f32>,
    beta: Array1<f32>,
    eps: f32,
}

impl LayerNorm {
    /// A LayerNorm from ready parameters: `gamma: [d_model]`, `beta: [d_model]`.
    pub fn new(gamma: Array1<f32>, beta: Array1<f32>, eps: f32) -> Result<Self> {
        validate_eps(eps)?;
        if gamma.is_empty() || gamma.len() != beta.len() {
            return Err(Error::shape(
                "layer norm bias",
                format!(
                    "[d_model] = [{}] (the gain's length, at least 1)",
                    gamma.len()
                ),
                beta.shape(),
            ));
        }
        Ok(LayerNorm { gamma, beta, eps })
    }

    /// `gamma = 1`, `beta = 0`: the initial state.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::Config`] if `d_model` is more than an array can hold.
    pub fn identity(d_model: usize, eps: f32) -> Result<Self> {
        crate::config::check_elements("d_model", "the LayerNorm gain [d_model]", &[d_model])?;
        Self::new(Array1::ones(d_model), Array1::zeros(d_model), eps)
    }

    /// Reads γ (`weight`) and β (`bias`), `[d_model]` each, from `scope`.
    pub(crate) fn load(scope: &mut Scope, d_model: usize, eps: f32) -> Result<Self> {
        let gamma = scope.vector("weight", d_model)?;
        let beta = scope.vector("bias", d_model)?;
        Self::new(gamma, beta, eps)
    }

    /// Width normalised over.
    pub fn d_model(&self) -> usize {
        self.gamma.len()
    }

    /// The gain γ, `[d_model]`.
    pub fn gamma(&self) -> ArrayView1<'_, f32> {
        self.gamma.view()
    }

    /// The bias β, `[d_model]`.
    pub fn beta(&self) -> ArrayView1<'_, f32> {
        self.beta.view()
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Normalises over the last axis.
    ///
    /// # Shapes
    /// - `x`: `[..., d_model]`
    /// - returns `[..., d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] if the last axis is not `d_model`.
    pub fn forward<D: Dimension>(&self, x: ArrayView<f32, D>) -> Result<Array<f32, D>> {
        if x.shape().last() != Some(&self.d_model()) {
            return Err(Error::shape(
                "layer norm input",
                format!("[..., {}]", self.d_model()),
                x.shape(),
            ));
        }
        let mut out = x.as_standard_layout().into_owned();
        let rows = out.len() / self.d_model();
        let flat = out
            .view_mut()
            .into_shape_with_order((rows, self.d_model()))
            .expect("standard layout");
        self.forward_inplace(flat);
        Ok(out)
    }

    /// Normalises each row of `[rows, d_model]` in place.
    pub(crate) fn forward_inplace(&self, x: ArrayViewMut2<f32>) {
        ops::layer_norm_rows_inplace(x, None, self.gamma.view(), self.beta.view(), self.eps);
    }

    /// `x = LayerNorm(x + y)` on rows `[rows, d_model]`: a post-LN residual connection (§5.4).
    pub(crate) fn add_forward_inplace(&self, x: ArrayViewMut2<f32>, y: ArrayView2<f32>) {
        ops::layer_norm_rows_inplace(x, Some(y), self.gamma.view(), self.beta.view(), self.eps);
    }
}

/// γ as `weight` and β as `bias`, PyTorch's names.
impl Parameters for LayerNorm {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        f("weight", Tensor::Plain(self.gamma.view().into_dyn()));
        f("bias", Tensor::Plain(self.beta.view().into_dyn()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array3};

    #[test]
    fn zero_mean_unit_variance_then_affine() {
        let x = Array3::from_shape_fn((2, 3, 8), |(a, b, c)| (a * 100 + b * 10 + c * c) as f32);
        let n = LayerNorm::identity(8, 1e-5).unwrap();
        let y = n.forward(x.view()).unwrap();
        for row in y.rows() {
            assert_abs_diff_eq!(row.mean().unwrap(), 0.0, epsilon = 1e-5);
            assert_abs_diff_eq!(row.mapv(|v| v * v).mean().unwrap(), 1.0, epsilon = 1e-3);
        }
        let n2 =
            LayerNorm::new(Array1::from_elem(8, 2.0), Array1::from_elem(8, 1.0), 1e-5).unwrap();
        let y2 = n2.forward(x.view()).unwrap();
        assert_abs_diff_eq!(y2, y.mapv(|v| 2.0 * v + 1.0), epsilon = 1e-5);
    }

    #[test]
    fn constant_row_is_beta() {
        let n = LayerNorm::new(array![3.0f32, 3.0], array![0.5f32, -0.5], 1e-5).unwrap();
        let y = n.forward(array![[7.0f32, 7.0]].view()).unwrap();
        assert_eq!(y, array![[0.5f32, -0.5]]);
    }

    #[test]
    fn errors() {
        assert!(LayerNorm::new(array![1.0f32, 1.0], array![0.0f32], 1e-5).is_err());
        assert!(LayerNorm::identity(2, 0.0).is_err());
        let n = LayerNorm::identity(2, 1e-5).unwrap();
        assert!(n.forward(array![[1.0f32, 2.0, 3.0]].view()).is_err());
    }
}
