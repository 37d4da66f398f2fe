//! One walk over a model's parameters, the way PyTorch's `named_parameters()` works.
//!
//! Every layer reports its own tensors under names relative to itself (`weight`, `bias`,
//! `q_proj.weight`, …) and its sub-layers under theirs (`self_attn.q_proj.weight`), so a model's
//! names come from its layers alone: `encoder.layers.0.self_attn.q_proj.weight`. The same
//! names are the ones a layer asks a [`Scope`] for when it is built from a weights file. The
//! file formats (`weights.rs` for PyTorch's `nn.Transformer`, `bert.rs` for Hugging Face's
//! BERT) are tables that rename these paths, plus the tensors they store fused; counting
//! parameters and checking them for NaN walk the same tree.
//!
//! This module sits below the layers (beside `ops`) and knows none of them.

use ndarray::{Array1, Array2, ArrayD, ArrayView2, ArrayView3, ArrayViewD, CowArray, IxDyn};

use crate::error::{Error, Result};
use crate::ops;
use crate::precision::Precision;

/// A parameter as its layer stores it.
#[derive(Debug, Clone)]
pub(crate) enum Tensor<'a> {
    /// Stored in the layout PyTorch gives it (a table, a bias, a norm's γ or β).
    Plain(ArrayViewD<'a, f32>),
    /// A linear layer's weight `[out, in]`, stored transposed in panels (`ops::pack_panels`).
    Panels(ArrayView3<'a, f32>, usize),
    /// A linear layer's weight `[out, in]` as int8 values with one scale per output row.
    Int8(&'a ops::Int8Weight),
    /// A linear layer's weight `[out, in]` as bf16 values, in panels.
    Bf16(&'a ops::Bf16Weight),
}

impl<'a> Tensor<'a> {
    /// The shape in PyTorch's layout (`[out, in]` for a linear weight).
    pub(crate) fn shape(&self) -> Vec<usize> {
        match self {
            Tensor::Plain(t) => t.shape().to_vec(),
            Tensor::Panels(p, out) => vec![*out, p.shape()[1]],
            Tensor::Int8(q) => vec![q.out_features(), q.in_features()],
            Tensor::Bf16(w) => vec![w.out_features(), w.in_features()],
        }
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// Bytes the tensor takes as stored (panels with their padding, int8 values with their
    /// scales, bf16 values two bytes each).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Tensor::Plain(t) => 4 * t.len(),
            Tensor::Panels(p, _) => 4 * p.len(),
            Tensor::Int8(q) => q.bytes(),
            Tensor::Bf16(w) => w.bytes(),
        }
    }

    /// The values in PyTorch's layout: borrowed when stored that way, a copy for panels.
    pub(crate) fn values(&self) -> CowArray<'a, f32, IxDyn> {
        match self {
            Tensor::Plain(t) => t.clone().into(),
            Tensor::Panels(p, out) => ops::unpack_panels(*p, *out).into_dyn().into(),
            Tensor::Int8(q) => q.dequantize().into_dyn().into(),
            Tensor::Bf16(w) => w.dequantize().into_dyn().into(),
        }
    }

    /// Hashes every `step`-th value as stored, in storage order (panels included, int8 values
    /// with their scales), never copying: equal tensors stored alike hash alike.
    pub(crate) fn hash_sample(&self, step: usize, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        let floats = match self {
            Tensor::Plain(t) => t.clone(),
            Tensor::Panels(p, _) => p.into_dyn(),
            Tensor::Int8(q) => {
                q.stored().iter().step_by(step).for_each(|v| v.hash(h));
                ndarray::ArrayView1::from(q.scales()).into_dyn()
            }
            Tensor::Bf16(w) => {
                w.stored().iter().step_by(step).for_each(|v| v.hash(h));
                return;
            }
        };
        floats
            .iter()
            .step_by(step)
            .for_each(|v| v.to_bits().hash(h));
    }
}

/// Receives each parameter with its name.
pub(crate) type Visitor<'v, 'a> = dyn FnMut(&str, Tensor<'a>) + 'v;

/// A layer that holds parameters.
pub(crate) trait Parameters {
    /// Calls `f` with each parameter of the layer and of its sub-layers, once each, under its
    /// name relative to the layer. A tensor shared with another layer (a tied projection) is
    /// reported by the layer that owns it only.
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>);
}

/// Reports `child`'s parameters under `{name}.…`.
pub(crate) fn visit_child<'a>(f: &mut Visitor<'_, 'a>, name: &str, child: &'a dyn Parameters) {
    child.visit(&mut |leaf, t| f(&format!("{name}.{leaf}"), t));
}

/// Every parameter of `model` with its full name and its values, in walk order.
pub(crate) fn named_values(model: &dyn Parameters) -> Vec<(String, CowArray<'_, f32, IxDyn>)> {
    let mut all = Vec::new();
    model.visit(&mut |name, t| all.push((name.to_string(), t.values())));
    all
}

/// The number of values over all parameters (a shared tensor once).
pub(crate) fn count(model: &dyn Parameters) -> usize {
    let mut n = 0;
    model.visit(&mut |_, t| n += t.len());
    n
}

/// Bytes `model`'s parameters take as stored.
pub(crate) fn bytes(model: &dyn Parameters) -> usize {
    let mut n = 0;
    model.visit(&mut |_, t| n += t.bytes());
    n
}

/// [`Precision::Int8`] if `model` holds an int8 tensor, [`Precision::Bf16`] if a bf16 one,
/// else [`Precision::F32`].
pub(crate) fn precision(model: &dyn Parameters) -> Precision {
    let mut precision = Precision::F32;
    model.visit(&mut |_, t| match t {
        Tensor::Int8(_) => precision = Precision::Int8,
        Tensor::Bf16(_) => precision = Precision::Bf16,
        _ => {}
    });
    precision
}

/// The first NaN or infinity of `tensor` (in row-major order) as an [`Error::NonFinite`].
pub(crate) fn first_non_finite(name: &str, tensor: ArrayViewD<f32>) -> Result<()> {
    let Some((flat, &value)) = tensor.iter().enumerate().find(|(_, v)| !v.is_finite()) else {
        return Ok(());
    };
    // Row-major unravelling of the logical position (iter() runs in logical order).
    let mut index = vec![0; tensor.ndim()];
    let mut rest = flat;
    for (i, &len) in tensor.shape().iter().enumerate().rev() {
        index[i] = rest % len;
        rest /= len;
    }
    Err(Error::NonFinite {
        name: name.to_string(),
        index,
        value,
    })
}

/// Where a layer being built reads its tensors: a weights file, by the names of the walk.
pub(crate) trait Source {
    /// The tensor at the walk name `name`, which must have `shape` (PyTorch's layout).
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>>;
    /// Checks that the tensor at `name`, if the source holds one, equals `expected`: a shared
    /// or tied matrix (known by its walk name `of`) that a file stores a second time.
    fn check_alias(&mut self, name: &str, of: &str, expected: ArrayView2<f32>) -> Result<()>;
    /// The matrix at `name` as int8 values with one scale per row, if the source stores it
    /// so (`None` if it stores floats, which [`tensor`](Self::tensor) reads).
    fn int8(&mut self, name: &str, shape: [usize; 2]) -> Result<Option<ops::Int8Weight>>;
}

/// A matrix as a [`Source`] stores it.
pub(crate) enum Matrix {
    F32(Array2<f32>),
    Int8(ops::Int8Weight),
}

/// A [`Source`] seen from inside one layer: names relative to the layer, as in
/// [`Parameters::visit`].
pub(crate) struct Scope<'s> {
    source: &'s mut dyn Source,
    prefix: String,
}

impl<'s> Scope<'s> {
    /// The whole model's scope.
    pub(crate) fn root(source: &'s mut dyn Source) -> Self {
        Scope {
            source,
            prefix: String::new(),
        }
    }

    /// The scope of the sub-layer `name`.
    pub(crate) fn child(&mut self, name: &str) -> Scope<'_> {
        Scope {
            prefix: self.path(name),
            source: &mut *self.source,
        }
    }

    fn path(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// The matrix `leaf`, `[rows, cols]`.
    pub(crate) fn matrix(&mut self, leaf: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let name = self.path(leaf);
        let t = self.source.tensor(&name, &[rows, cols])?;
        // The source has checked the shape, so the conversion cannot fail.
        t.into_dimensionality()
            .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
    }

    /// The matrix `leaf`, `[rows, cols]`, as the source stores it: int8 values with their
    /// scales, or f32 (widened from half precision if need be).
    pub(crate) fn stored_matrix(&mut self, leaf: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let name = self.path(leaf);
        match self.source.int8(&name, [rows, cols])? {
            Some(q) => Ok(Matrix::Int8(q)),
            None => self.matrix(leaf, rows, cols).map(Matrix::F32),
        }
    }

    /// The vector `leaf`, `[len]`.
    pub(crate) fn vector(&mut self, leaf: &str, len: usize) -> Result<Array1<f32>> {
        let name = self.path(leaf);
        let t = self.source.tensor(&name, &[len])?;
        t.into_dimensionality()
            .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
    }

    /// [`Source::check_alias`] for `leaf` against the tensor `of`, both in this scope.
    pub(crate) fn check_alias(
        &mut self,
        leaf: &str,
        of: &str,
        expected: ArrayView2<f32>,
    ) -> Result<()> {
        let (name, of) = (self.path(leaf), self.path(of));
        self.source.check_alias(&name, &of, expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_gives_the_row_major_index() {
        let mut t = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4]));
        assert!(first_non_finite("t", t.view()).is_ok());
        t[[1, 2, 0]] = f32::INFINITY;
        t[[1, 2, 3]] = f32::NAN;
        let err = first_non_finite("t", t.view()).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { index, value, .. } if index == &[1, 2, 0] && *value == f32::INFINITY),
            "{err}"
        );
        // A transposed view reports the index in its own (logical) shape.
        let err = first_non_finite("t", t.view().reversed_axes()).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { index, .. } if index == &[0, 2, 1]),
            "{err}"
        );
    }
}
