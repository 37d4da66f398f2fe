//! The affine map `y = x Wᵀ + b` used by every projection of the model.

use ndarray::{
    ArcArray, Array, Array1, Array2, ArrayView, ArrayView1, ArrayView2, ArrayViewMut2, Axis,
    CowArray, Dim, Dimension, Ix2, Ix3, IxDyn,
};
use rand::Rng;

use crate::embedding::Table;
use crate::error::{Error, Result};
use crate::parameters::{first_non_finite, Matrix, Parameters, Scope, Tensor, Visitor};
use crate::precision::Precision;
use crate::{huge_pages, init, ops};

/// A fully connected layer, `y = x Wᵀ + b`, with the weight in PyTorch's `[out, in]` layout.
///
/// The weight is kept transposed (`Wᵀ`, `[in, out]`) and cut into panels of 128 output
/// columns, each contiguous, so that the product `x Wᵀ` reads it front to back whatever the
/// number of rows (the layout of `src/ops/panels.rs`). [`weight`](Self::weight) gives
/// PyTorch's `[out, in]` back. A projection tied to an embedding table (§3.4) shares the
/// table and keeps its own panels copy of it for the products.
///
/// ```
/// use ndarray::{array, Array3};
/// use ndtransformer::Linear;
/// let linear = Linear::new(array![[1.0f32, 0.0], [1.0, 1.0], [0.0, 2.0]], Some(array![0.0f32, 0.5, 0.0]))?;
/// let x = Array3::<f32>::ones((4, 5, 2)); // [batch, seq, in]
/// let y = linear.forward(x.view())?;      // [batch, seq, out]
/// assert_eq!(y.shape(), &[4, 5, 3]);
/// assert_eq!(y[[0, 0, 1]], 2.5);
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    weight: Stored,
    out_features: usize,
    bias: Option<Array1<f32>>,
}

/// How a [`Linear`] keeps its weight. Never written after construction.
#[derive(Debug, Clone, PartialEq)]
enum Stored {
    /// `Wᵀ` in panels, `[out.div_ceil(128), in, 128]` (`ops::pack_panels`); possibly one part
    /// of a larger allocation shared with sibling layers ([`pack_weights`]).
    Panels(ArcArray<f32, Ix3>),
    /// `W` itself, `[out, in]`, shared with the embedding table it is tied to, and a copy of
    /// `Wᵀ` in panels for the products: read in place, the table's rows are repacked whole by
    /// every product, which made each decoding step of a tied model (OPUS-MT, 58101 × 512)
    /// stream the table twice more.
    Rows(ArcArray<f32, Ix2>, ArcArray<f32, Ix3>),
    /// `W` as int8 values with one scale per output row ([`Precision::Int8`]).
    Int8(ops::Int8Weight),
    /// An int8 embedding table the layer is tied to, shared.
    TiedInt8(ops::Int8Weight),
    /// `W` as bf16 values in panels ([`Precision::Bf16`]); with the f32 table it was made from
    /// when the layer is tied to one (tables stay f32 under bf16).
    Bf16(ops::Bf16Weight, Option<ArcArray<f32, Ix2>>),
}

impl Linear {
    /// A layer from ready tensors: `weight: [out, in]`, `bias: [out]`.
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(Error::shape(
                    "linear bias",
                    format!(
                        "[out] = [{}] to match weight {:?}",
                        weight.nrows(),
                        weight.shape()
                    ),
                    b.shape(),
                ));
            }
        }
        Ok(Self::from_parts(weight, bias))
    }

    /// A freshly initialised layer: Xavier-uniform weight, zero bias when `bias` is set.
    ///
    /// # Panics
    /// If `out_features × in_features` is more values than an array can address (ndarray's own rule);
    /// [`Transformer::new`](crate::Transformer::new) rejects such sizes with an error first.
    pub fn init<R: Rng + ?Sized>(
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut R,
    ) -> Self {
        let weight =
            init::xavier_uniform(out_features, in_features, in_features, out_features, rng);
        Self::from_parts(weight, bias.then(|| Array1::zeros(out_features)))
    }

    pub(crate) fn from_parts(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Self {
        debug_assert!(bias.as_ref().is_none_or(|b| b.len() == weight.nrows()));
        Linear {
            weight: Stored::Panels(ops::pack_panels(weight.t()).into_shared()),
            out_features: weight.nrows(),
            bias,
        }
    }

    /// A layer whose weight is `table`, `[out, in]`, shared: the output projection tied to the
    /// target embedding (§3.4). An f32 table also gets a panels copy for the products.
    pub(crate) fn tied(table: Table, bias: Option<Array1<f32>>) -> Self {
        let (out_features, weight) = match table {
            Table::F32(w) => (w.nrows(), Self::rows(w)),
            Table::Int8(q) => (q.out_features(), Stored::TiedInt8(q)),
        };
        debug_assert!(bias.as_ref().is_none_or(|b| b.len() == out_features));
        Linear {
            weight,
            out_features,
            bias,
        }
    }

    /// The tied f32 storage of `table`: the table and its panels copy.
    fn rows(table: ArcArray<f32, Ix2>) -> Stored {
        let panels = ops::pack_panels(table.t()).into_shared();
        Stored::Rows(table, panels)
    }

    /// Ties the layer to `table` again, after the table changed precision.
    pub(crate) fn retie(&mut self, table: Table) {
        let bias = self.bias.take();
        *self = Self::tied(table, bias);
    }

    /// Whether the weight is an embedding table's, shared.
    pub(crate) fn is_tied(&self) -> bool {
        matches!(
            self.weight,
            Stored::Rows(..) | Stored::TiedInt8(_) | Stored::Bf16(_, Some(_))
        )
    }

    /// Reads `{weight, bias}` of an `[out, in]` layer from `scope`, the weight in the
    /// precision the file stores it in.
    pub(crate) fn load(scope: &mut Scope, out_features: usize, in_features: usize) -> Result<Self> {
        let weight = scope.stored_matrix("weight", out_features, in_features)?;
        let bias = Some(scope.vector("bias", out_features)?);
        let mut layer = match weight {
            Matrix::F32(w) => Self::from_parts(w, bias),
            Matrix::Int8(q) => Linear {
                weight: Stored::Int8(q),
                out_features,
                bias,
            },
        };
        let precision = layer.precision();
        check_int8_widths(&mut layer, precision)?;
        Ok(layer)
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        match &self.weight {
            Stored::Panels(p) => p.shape()[1],
            Stored::Rows(w, _) => w.ncols(),
            Stored::Int8(q) | Stored::TiedInt8(q) => q.in_features(),
            Stored::Bf16(w, _) => w.in_features(),
        }
    }

    /// The precision the weight is stored in.
    pub fn precision(&self) -> Precision {
        match &self.weight {
            Stored::Panels(_) | Stored::Rows(..) => Precision::F32,
            Stored::Int8(_) | Stored::TiedInt8(_) => Precision::Int8,
            Stored::Bf16(..) => Precision::Bf16,
        }
    }

    /// Converts the weight to `precision` in place (the bias stays f32).
    ///
    /// To [`Precision::Int8`]: one symmetric scale per output row. To [`Precision::Bf16`]:
    /// each weight rounded to the nearest bf16, ties to even. Back to [`Precision::F32`]: the
    /// int8 values times their scales or the bf16 values widened (what the products use), or
    /// the table itself for a bf16 projection tied to one. From one reduced precision to the
    /// other: through that f32 weight (Int8 → Bf16 rounds the dequantized int8 weights). A
    /// layer tied to an int8 embedding table gets a weight of its own (models convert the table
    /// and keep the tie).
    ///
    /// # Errors
    /// [`Error::NonFinite`] (named `weight`) if the weight holds NaN or ±∞; [`Error::Config`] if
    /// `in_features` is more than int8 sums can hold (131072), or if a weight is beyond bf16's
    /// range (about ±3.39e38) for [`Precision::Bf16`].
    pub fn quantize(&mut self, precision: Precision) -> Result<()> {
        check_int8_widths(self, precision)?;
        check_bf16_range(self, precision)?;
        match (precision, &self.weight) {
            (Precision::F32, Stored::Int8(q) | Stored::TiedInt8(q)) => {
                self.weight = Stored::Panels(ops::pack_panels(q.dequantize().t()).into_shared());
            }
            (Precision::Int8, Stored::Panels(_) | Stored::Rows(..)) => {
                let q = {
                    let w = self.weight_view();
                    first_non_finite("weight", w.view().into_dyn())?;
                    ops::Int8Weight::quantize(w.view()).expect("finite, checked above")
                };
                self.weight = Stored::Int8(q);
            }
            (Precision::Int8, Stored::TiedInt8(q)) => self.weight = Stored::Int8(q.clone()),
            (Precision::F32, Stored::Bf16(w, tied)) => {
                self.weight = match tied {
                    Some(table) => Self::rows(table.clone()),
                    None => Stored::Panels(ops::pack_panels(w.dequantize().t()).into_shared()),
                };
            }
            (Precision::Bf16, Stored::Panels(_) | Stored::Rows(..)) => {
                let w = {
                    let w = self.weight_view();
                    first_non_finite("weight", w.view().into_dyn())?;
                    ops::Bf16Weight::from_f32(w.view())
                };
                let tied = match &self.weight {
                    Stored::Rows(table, _) => Some(table.clone()),
                    _ => None,
                };
                self.weight = Stored::Bf16(w, tied);
            }
            // Between the reduced precisions: through the f32 weight.
            (Precision::Int8, Stored::Bf16(..))
            | (Precision::Bf16, Stored::Int8(_) | Stored::TiedInt8(_)) => {
                self.quantize(Precision::F32)?;
                self.quantize(precision)?;
            }
            (Precision::F32, _)
            | (Precision::Int8, Stored::Int8(_))
            | (Precision::Bf16, Stored::Bf16(..)) => {}
        }
        Ok(())
    }

    /// Bytes of the panels (f32 or bf16) a tied projection keeps of its f32 table (0
    /// otherwise): memory the parameter walk, which reports the table once, does not count.
    pub(crate) fn tied_copy_bytes(&self) -> usize {
        match &self.weight {
            Stored::Rows(_, p) => p.len() * std::mem::size_of::<f32>(),
            Stored::Bf16(w, Some(_)) => w.bytes(),
            _ => 0,
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight, `[out, in]`: a copy in PyTorch's layout of the stored panels.
    pub fn weight(&self) -> Array2<f32> {
        self.weight_view().into_owned()
    }

    /// The weight, `[out, in]`: borrowed when tied, a copy of the panels otherwise.
    pub(crate) fn weight_view(&self) -> CowArray<'_, f32, Ix2> {
        match &self.weight {
            Stored::Panels(p) => ops::unpack_panels(p.view(), self.out_features).into(),
            Stored::Rows(w, _) => w.view().into(),
            Stored::Int8(q) | Stored::TiedInt8(q) => q.dequantize().into(),
            Stored::Bf16(w, _) => w.dequantize().into(),
        }
    }

    /// The weight as the kernels take it.
    fn kernel_weight(&self) -> ops::Weight<'_> {
        match &self.weight {
            Stored::Panels(p) => ops::Weight::Panels(p.view(), self.out_features),
            Stored::Rows(_, p) => ops::Weight::Panels(p.view(), self.out_features),
            Stored::Int8(q) | Stored::TiedInt8(q) => ops::Weight::Int8(q),
            Stored::Bf16(w, _) => ops::Weight::Bf16(w),
        }
    }

    /// The bias, `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_ref().map(|b| b.view())
    }

    /// Applies the layer over any leading batch dimensions.
    ///
    /// # Shapes
    /// - `x`: `[..., in]`
    /// - returns `[..., out]`
    ///
    /// # Errors
    /// [`Error::Shape`] if `x` has no axes or its last axis is not `in_features`.
    pub fn forward<D: Dimension>(&self, x: ArrayView<f32, D>) -> Result<Array<f32, D>> {
        let in_features = self.in_features();
        let Some((&last, lead)) = x.shape().split_last() else {
            return Err(Error::shape(
                "linear input",
                format!("[..., {in_features}]"),
                x.shape(),
            ));
        };
        if last != in_features {
            return Err(Error::shape(
                "linear input",
                format!("[..., {in_features}]"),
                x.shape(),
            ));
        }
        let rows: usize = lead.iter().product();
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("at least one axis") = self.out_features();
        let x = x.as_standard_layout();
        let x2 = x
            .view()
            .into_shape_with_order((rows, in_features))
            .expect("standard layout");
        let y = self.forward_2d(x2);
        Ok(y.into_shape_with_order(IxDyn(&out_shape))
            .expect("same element count")
            .into_dimensionality::<D>()
            .expect("same rank as the input"))
    }

    /// `[rows, in] → [rows, out]` without shape checks (callers have checked).
    pub(crate) fn forward_2d(&self, x: ArrayView2<f32>) -> Array2<f32> {
        self.forward_2d_with(x, ops::Epilogue::Bias)
    }

    /// `epilogue(x Wᵀ, b)`: the product, then bias and activation in one pass.
    pub(crate) fn forward_2d_with(
        &self,
        x: ArrayView2<f32>,
        epilogue: ops::Epilogue,
    ) -> Array2<f32> {
        ops::linear(x, self.kernel_weight(), self.bias(), epilogue)
    }

    /// `x Wᵀ + b` written into `y: [rows, out]` (any contents, overwritten).
    pub(crate) fn forward_2d_into(&self, x: ArrayView2<f32>, y: ArrayViewMut2<f32>) {
        ops::linear_into(x, self.kernel_weight(), self.bias(), ops::Epilogue::Bias, y)
    }
}

/// Converts every linear layer of `model` to `precision`, after checking that all of them can
/// take it (so that an error leaves the model unchanged). The callers check that the weights
/// are finite first, with the error naming the tensor in the model's own names.
pub(crate) fn quantize_linears(model: &mut dyn Linears, precision: Precision) -> Result<()> {
    check_int8_widths(model, precision)?;
    check_bf16_range(model, precision)?;
    model.linears_mut(&mut |l| l.quantize(precision))
}

/// Checks, before anything is converted, that every linear layer of `model` can take
/// `precision` (int8 sums hold at most [`ops::INT8_MAX_INPUTS`] inputs).
pub(crate) fn check_int8_widths(model: &mut dyn Linears, precision: Precision) -> Result<()> {
    if precision != Precision::Int8 {
        return Ok(());
    }
    model.linears_mut(&mut |l| {
        let inputs = l.in_features();
        if inputs > ops::INT8_MAX_INPUTS {
            return Err(Error::config(
                "precision",
                format!(
                    "int8 layers take at most {} inputs; one has {inputs}",
                    ops::INT8_MAX_INPUTS
                ),
            ));
        }
        Ok(())
    })
}

/// Checks, before anything is converted, that every weight of `model` is within bf16's range
/// when converting to [`Precision::Bf16`]: a finite f32 of magnitude 3.39e38 or more would
/// round to ±∞. Non-finite weights are left to the finiteness checks, which name them.
pub(crate) fn check_bf16_range(model: &mut dyn Linears, precision: Precision) -> Result<()> {
    if precision != Precision::Bf16 {
        return Ok(());
    }
    model.linears_mut(&mut |l| {
        if l.precision() == Precision::Bf16 {
            return Ok(());
        }
        match ops::bf16_first_out_of_range(l.weight_view().view()) {
            Some((index, value)) => Err(Error::config(
                "precision",
                format!("bf16 cannot hold the weight {value:e} at {index:?}; it would be ±∞"),
            )),
            None => Ok(()),
        }
    })
}

/// A layer that holds linear layers: the mutable walk that converts them in place
/// ([`Linear::quantize`]). Each layer calls `f` on its own linear layers and passes it to its
/// sub-layers, in the order of the parameter walk.
pub(crate) trait Linears {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()>;
}

impl Linears for Linear {
    fn linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        f(self)
    }
}

impl Parameters for Linear {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        match &self.weight {
            Stored::Panels(p) => f("weight", Tensor::Panels(p.view(), self.out_features)),
            Stored::Int8(q) => f("weight", Tensor::Int8(q)),
            Stored::Bf16(w, None) => f("weight", Tensor::Bf16(w)),
            // A tied weight is reported by the table that owns it.
            Stored::Rows(..) | Stored::TiedInt8(_) | Stored::Bf16(_, Some(_)) => {}
        }
        if let Some(b) = &self.bias {
            f("bias", Tensor::Plain(b.view().into_dyn()));
        }
    }
}

/// Moves the weights of `layers`, all of one shape, into one allocation: together they can be
/// large enough for 2 MiB pages (`src/huge_pages.rs`) where each alone is not (the four
/// `[512, 512]` projections of an attention layer are 1 MiB each). Values do not change.
pub(crate) fn pack_weights(layers: &mut [&mut Linear]) {
    let panels: Option<Vec<&ArcArray<f32, Ix3>>> = layers
        .iter()
        .map(|l| match &l.weight {
            Stored::Panels(p) => Some(p),
            Stored::Rows(..) | Stored::Int8(_) | Stored::TiedInt8(_) | Stored::Bf16(..) => None,
        })
        .collect();
    let Some(panels) = panels else {
        return;
    };
    let Some(shape) = panels.first().map(|p| p.dim()) else {
        return;
    };
    if panels.iter().any(|p| p.dim() != shape) {
        return;
    }
    let (count, rows, cols) = shape;
    let mut storage = huge_pages::zeros(Dim([layers.len(), count, rows, cols]));
    for (mut slot, p) in storage.outer_iter_mut().zip(panels) {
        slot.assign(p);
    }
    let storage = storage.into_shared();
    for (i, layer) in layers.iter_mut().enumerate() {
        layer.weight = Stored::Panels(storage.clone().index_axis_move(Axis(0), i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1, Array4};
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn works_over_any_leading_dims_and_without_bias() {
        let w = array![[1.0f32, 2.0], [3.0, 4.0]];
        let l = Linear::new(w, None).unwrap();
        let x = Array4::from_shape_fn((2, 3, 1, 2), |(a, b, _, d)| (a + b + d) as f32);
        let y = l.forward(x.view()).unwrap();
        assert_eq!(y.shape(), &[2, 3, 1, 2]);
        let (x0, x1) = (x[[1, 2, 0, 0]], x[[1, 2, 0, 1]]);
        assert_eq!(y[[1, 2, 0, 0]], x0 + 2.0 * x1);
        assert_eq!(y[[1, 2, 0, 1]], 3.0 * x0 + 4.0 * x1);
        // A 1-D input is one row.
        let v = l.forward(array![1.0f32, 1.0].view()).unwrap();
        assert_eq!(v, array![3.0, 7.0]);
    }

    #[test]
    fn packed_layers_keep_their_weights_and_outputs() {
        let mut rng = StdRng::seed_from_u64(3);
        let layers: Vec<Linear> = (0..3)
            .map(|_| Linear::init(600, 500, true, &mut rng))
            .collect();
        let mut packed = layers.clone();
        let [a, b, c] = &mut packed[..] else {
            unreachable!()
        };
        pack_weights(&mut [a, b, c]);
        let x = Array2::from_shape_fn((5, 600), |(i, j)| ((i * 31 + j) % 17) as f32 * 0.1);
        for (before, after) in layers.iter().zip(&packed) {
            assert_eq!(after, before);
            assert_eq!(after.forward_2d(x.view()), before.forward_2d(x.view()));
        }
        // One allocation, the layers one after the other (500 columns in 4 panels of 128).
        let stride = 4 * 600 * 128;
        let ptr = |l: &Linear| match &l.weight {
            Stored::Panels(p) => p.as_ptr(),
            _ => unreachable!("packed layers hold panels"),
        };
        let (p0, p2) = (ptr(&packed[0]), ptr(&packed[2]));
        assert_eq!(
            p2 as usize - p0 as usize,
            2 * stride * std::mem::size_of::<f32>()
        );
    }

    #[test]
    fn transposed_input_gives_the_same_result() {
        let l = Linear::init(3, 2, true, &mut StdRng::seed_from_u64(1));
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32);
        let xt = x.t().to_owned();
        let y1 = l.forward(xt.view()).unwrap();
        let y2 = l.forward(x.t()).unwrap();
        assert_eq!(y1, y2);
    }

    #[test]
    fn shape_errors_name_the_widths() {
        let l = Linear::init(3, 2, true, &mut StdRng::seed_from_u64(1));
        let err = l.forward(Array2::<f32>::zeros((2, 4)).view()).unwrap_err();
        assert!(
            err.to_string().contains("[2, 4]") && err.to_string().contains("[..., 3]"),
            "{err}"
        );
        let err = Linear::new(Array2::zeros((2, 3)), Some(Array1::zeros(3))).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}
