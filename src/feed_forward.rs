//! Position-wise feed-forward network (§3.3, Eq. 2): `FFN(x) = max(0, x W₁ + b₁) W₂ + b₂`.
//!
//! The same two-layer network is applied to every position separately; it is where each
//! token's representation is transformed after attention has mixed information across tokens.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3};
use rand::Rng;

use crate::config::{Activation, TransformerConfig};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::linear::Linears;
use crate::ops;
use crate::parameters::{visit_child, Parameters, Scope, Visitor};

/// `linear2(activation(linear1(x)))`, widths `d_model → d_ff → d_model`.
///
/// ```
/// use ndarray::Array3;
/// use rand::{rngs::StdRng, SeedableRng};
/// use ndtransformer::{Activation, FeedForward};
/// let ffn = FeedForward::init(8, 32, Activation::Relu, &mut StdRng::seed_from_u64(0));
/// let y = ffn.forward(Array3::<f32>::ones((2, 3, 8)).view())?; // [batch, seq, d_model]
/// assert_eq!(y.shape(), &[2, 3, 8]);
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FeedForward {
    pub(crate) linear1: Linear,
    pub(crate) linear2: Linear,
    activation: Activation,
}

impl FeedForward {
    /// From ready layers: `linear1: [d_ff, d_model]`, `linear2: [d_model, d_ff]`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the widths do not chain back to `d_model`.
    pub fn new(linear1: Linear, linear2: Linear, activation: Activation) -> Result<Self> {
        let (d_model, d_ff) = (linear1.in_features(), linear1.out_features());
        if (linear2.out_features(), linear2.in_features()) != (d_model, d_ff) {
            return Err(Error::shape(
                "feed-forward linear2 weight",
                format!("[d_model, d_ff] = [{d_model}, {d_ff}]"),
                linear2.weight().shape(),
            ));
        }
        Ok(FeedForward {
            linear1,
            linear2,
            activation,
        })
    }

    /// Reads `linear1` and `linear2` with `config`'s widths from `scope`.
    pub(crate) fn load(scope: &mut Scope, config: &TransformerConfig) -> Result<Self> {
        let (d, d_ff) = (config.d_model, config.d_ff);
        let linear1 = Linear::load(&mut scope.child("linear1"), d_ff, d)?;
        let linear2 = Linear::load(&mut scope.child("linear2"), d, d_ff)?;
        Self::new(linear1, linear2, config.activation)
    }

    /// Freshly initialised (Xavier-uniform weights, zero biases).
    ///
    /// # Panics
    /// If `d_ff × d_model` is more values than an array can address (ndarray's own rule);
    /// [`Transformer::new`](crate::Transformer::new) rejects such sizes with an error first.
    pub fn init<R: Rng + ?Sized>(
        d_model: usize,
        d_ff: usize,
        activation: Activation,
        rng: &mut R,
    ) -> Self {
        let linear1 = Linear::init(d_model, d_ff, true, rng);
        let linear2 = Linear::init(d_ff, d_model, true, rng);
        FeedForward {
            linear1,
            linear2,
            activation,
        }
    }

    /// The non-linearity between the two layers.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.linear1.in_features()
    }

    /// The two layers, `(linear1, linear2)`.
    pub fn layers(&self) -> (&Linear, &Linear) {
        (&self.linear1, &self.linear2)
    }

    /// Applies the network to every position.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`Error::Shape`] if the width is not `d_model`.
    pub fn forward(&self, x: ArrayView3<f32>) -> Result<Array3<f32>> {
        if x.shape()[2] != self.d_model() {
            return Err(Error::shape(
                "feed-forward input",
                format!("[batch, seq, {}]", self.d_model()),
                x.shape(),
            ));
        }
        Ok(self.forward_unchecked(x))
    }

    pub(crate) fn forward_unchecked(&self, x: ArrayView3<f32>) -> Array3<f32> {
        let (b, len, d_model) = x.dim();
        let x = x.as_standard_layout();
        let flat = x
            .view()
            .into_shape_with_order((b * len, d_model))
            .expect("standard layout");
        self.forward_2d(flat)
            .into_shape_with_order((b, len, d_model))
            .expect("same element count")
    }

    /// `[rows, d_model] → [rows, d_model]`.
    pub(crate) fn forward_2d(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let epilogue = match self.activation {
            Activation::Relu => ops::Epilogue::BiasRelu,
            Activation::Gelu => ops::Epilogue::BiasGelu,
            Activation::GeluTanh => ops::Epilogue::BiasGeluTanh,
            Activation::Silu => ops::Epilogue::BiasSilu,
        };
        let hidden = self.linear1.forward_2d_with(x, epilogue);
        self.linear2.forward_2d(hidden.view())
    }
}

/// `linear1` (W₁, `[d_ff, d_model]`) and `linear2` (W₂, `[d_model, d_ff]`), as in PyTorch.
impl Linears for FeedForward {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        f(&mut self.linear1)?;
        f(&mut self.linear2)
    }
}

impl Parameters for FeedForward {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "linear1", &self.linear1);
        visit_child(f, "linear2", &self.linear2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, Array1};

    fn tiny(activation: Activation) -> FeedForward {
        let l1 = Linear::new(array![[1.0f32], [-1.0]], Some(array![0.0f32, 0.5])).unwrap();
        let l2 = Linear::new(array![[1.0f32, 2.0]], Some(Array1::zeros(1))).unwrap();
        FeedForward::new(l1, l2, activation).unwrap()
    }

    #[test]
    fn relu_and_gelu_follow_equation_2() {
        let x = array![[[2.0f32], [-2.0]]];
        // hidden = [x, 0.5 - x]; relu → [max(x,0), max(0.5-x,0)]; out = h0 + 2 h1
        assert_eq!(
            tiny(Activation::Relu).forward(x.view()).unwrap(),
            array![[[2.0f32], [5.0]]]
        );
        let gelu = |v: f64| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
        let y = tiny(Activation::Gelu).forward(x.view()).unwrap();
        assert_abs_diff_eq!(
            y[[0, 0, 0]],
            (gelu(2.0) + 2.0 * gelu(-1.5)) as f32,
            epsilon = 1e-6
        );
    }

    #[test]
    fn width_errors() {
        let l1 = Linear::new(Array2::zeros((4, 2)), None).unwrap();
        let l2 = Linear::new(Array2::zeros((3, 4)), None).unwrap();
        assert!(FeedForward::new(l1, l2, Activation::Relu).is_err());
        assert!(tiny(Activation::Relu)
            .forward(Array3::zeros((1, 1, 2)).view())
            .is_err());
    }
}
