//! Token embeddings, scaled by √d_model (§3.4).
//!
//! "In the embedding layers, we multiply those weights by √d_model." The scale keeps the
//! embeddings on the same order as the positional encodings added next (§3.5).

use ndarray::{ArcArray, Array2, Array3, ArrayView2, Axis, CowArray, Ix2};
use rand::Rng;

use crate::error::{Error, Result};
use crate::parameters::{first_non_finite, Matrix, Parameters, Scope, Tensor, Visitor};
use crate::precision::Precision;
use crate::{init, ops};

/// A lookup table from token ids to `d_model`-wide vectors, multiplied by √d_model.
///
/// ```
/// use ndarray::array;
/// use ndtransformer::Embedding;
/// let table = array![[0.0f32, 0.0], [1.0, -1.0], [0.5, 0.25]]; // [vocab 3, d_model 2]
/// let embedding = Embedding::new(table)?;
/// let x = embedding.forward(array![[1u32, 2]].view())?;      // [batch 1, seq 2, d_model 2]
/// assert_eq!(x[[0, 0, 0]], 2f32.sqrt());
/// assert!(embedding.forward(array![[3u32]].view()).is_err()); // id 3 ≥ vocab 3
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Shared (not copied) with an output projection tied to it.
    table: Table,
}

/// How an [`Embedding`] keeps its table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Table {
    /// `[vocab, d_model]` f32 values.
    F32(ArcArray<f32, Ix2>),
    /// int8 values with one scale per token's row ([`Precision::Int8`]).
    Int8(ops::Int8Weight),
}

impl Embedding {
    /// An embedding from a `[vocab, d_model]` table (PyTorch's `nn.Embedding.weight`).
    pub fn new(weight: Array2<f32>) -> Result<Self> {
        if weight.is_empty() {
            return Err(Error::Empty {
                what: "embedding table".into(),
                shape: weight.shape().to_vec(),
            });
        }
        Ok(Embedding {
            table: Table::F32(weight.into_shared()),
        })
    }

    /// Reads the `[vocab, d_model]` table `weight` from `scope`, in the precision the file
    /// stores it in.
    pub(crate) fn load(scope: &mut Scope, vocab: usize, d_model: usize) -> Result<Self> {
        match scope.stored_matrix("weight", vocab, d_model)? {
            Matrix::F32(w) => Self::new(w),
            Matrix::Int8(q) => Ok(Embedding {
                table: Table::Int8(q),
            }),
        }
    }

    /// A freshly initialised `[vocab, d_model]` table (Xavier uniform).
    ///
    /// # Panics
    /// If `vocab × d_model` is more values than an array can address (ndarray's own rule);
    /// [`Transformer::new`](crate::Transformer::new) rejects such sizes with an error first.
    pub fn init<R: Rng + ?Sized>(vocab: usize, d_model: usize, rng: &mut R) -> Self {
        Embedding {
            table: Table::F32(
                init::xavier_uniform(vocab, d_model, d_model, vocab, rng).into_shared(),
            ),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        match &self.table {
            Table::F32(w) => w.nrows(),
            Table::Int8(q) => q.out_features(),
        }
    }

    /// Width of each vector.
    pub fn d_model(&self) -> usize {
        match &self.table {
            Table::F32(w) => w.ncols(),
            Table::Int8(q) => q.in_features(),
        }
    }

    /// The table, `[vocab, d_model]`, unscaled: borrowed at f32, the int8 values times their
    /// scales (a copy) at int8.
    pub fn weight(&self) -> CowArray<'_, f32, Ix2> {
        match &self.table {
            Table::F32(w) => w.view().into(),
            Table::Int8(q) => q.dequantize().into(),
        }
    }

    /// The precision the table is stored in.
    pub fn precision(&self) -> Precision {
        match &self.table {
            Table::F32(_) => Precision::F32,
            Table::Int8(_) => Precision::Int8,
        }
    }

    /// Converts the table to `precision` in place: to int8 with one scale per token's row
    /// (chosen as for a linear layer's rows), or back to f32 as the int8 values times their
    /// scales. Any other precision keeps the table f32 (only int8 tables exist).
    ///
    /// # Errors
    /// [`Error::NonFinite`] (named `weight`) if the table holds NaN or ±∞; the table is
    /// unchanged then.
    pub fn quantize(&mut self, precision: Precision) -> Result<()> {
        match (&self.table, precision) {
            (Table::F32(w), Precision::Int8) => {
                first_non_finite("weight", w.view().into_dyn())?;
                let q = ops::Int8Weight::quantize(w.view()).expect("finite, checked above");
                self.table = Table::Int8(q);
            }
            (Table::Int8(q), p) if p != Precision::Int8 => {
                self.table = Table::F32(q.dequantize().into_shared());
            }
            _ => {}
        }
        Ok(())
    }

    /// The table itself, shared: for a projection tied to it.
    pub(crate) fn shared_table(&self) -> Table {
        self.table.clone()
    }

    /// Looks up `ids` and multiplies by √d_model.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`
    /// - returns `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`] for an id ≥ vocab, [`Error::Empty`] for an empty batch.
    pub fn forward(&self, ids: ArrayView2<u32>) -> Result<Array3<f32>> {
        check_ids(ids, self.vocab(), "token ids")?;
        Ok(self.lookup(ids, (self.d_model() as f32).sqrt()))
    }

    /// Rows of the table for ids already checked against the vocabulary, times `scale`
    /// (√d_model for the paper's model, 1 for BERT-style ones).
    pub(crate) fn lookup(&self, ids: ArrayView2<u32>, scale: f32) -> Array3<f32> {
        let (batch, seq) = ids.dim();
        let mut out = Array3::zeros((batch, seq, self.d_model()));
        for (mut out_row, id_row) in out.outer_iter_mut().zip(ids.outer_iter()) {
            for (mut v, &id) in out_row.axis_iter_mut(Axis(0)).zip(id_row.iter()) {
                match &self.table {
                    Table::F32(w) => v.zip_mut_with(&w.row(id as usize), |o, &w| *o = w * scale),
                    Table::Int8(q) => {
                        let v = v
                            .as_slice_mut()
                            .expect("a fresh array's rows are contiguous");
                        q.dequantize_row_into(id as usize, scale, v);
                    }
                }
            }
        }
        out
    }
}

impl Parameters for Embedding {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        match &self.table {
            Table::F32(w) => f("weight", Tensor::Plain(w.view().into_dyn())),
            Table::Int8(q) => f("weight", Tensor::Int8(q)),
        }
    }
}

/// Checks that `ids` is non-empty and every id is below `vocab`.
pub(crate) fn check_ids(ids: ArrayView2<u32>, vocab: usize, what: &str) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::Empty {
            what: what.into(),
            shape: ids.shape().to_vec(),
        });
    }
    if let Some(((batch, position), &id)) = ids.indexed_iter().find(|(_, &id)| id as usize >= vocab)
    {
        return Err(Error::TokenOutOfRange {
            id,
            vocab,
            batch,
            position,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn scales_by_sqrt_d_model() {
        let e = Embedding::new(array![[1.0f32, 2.0, 3.0, 4.0], [-1.0, 0.0, 0.5, 2.0]]).unwrap();
        let x = e.forward(array![[1u32, 0, 1]].view()).unwrap();
        assert_eq!(x.shape(), &[1, 3, 4]);
        assert_eq!(
            x.slice(ndarray::s![0, 1, ..]),
            array![2.0f32, 4.0, 6.0, 8.0]
        );
        assert_eq!(
            x.slice(ndarray::s![0, 2, ..]),
            array![-2.0f32, 0.0, 1.0, 4.0]
        );
    }

    #[test]
    fn out_of_range_id_names_its_place() {
        let e = Embedding::new(Array2::zeros((5, 2))).unwrap();
        let err = e.forward(array![[0u32, 1], [4, 5]].view()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token id 5 at batch row 1, position 1 is out of range for vocabulary size 5"
        );
        let err = e.forward(Array2::<u32>::zeros((0, 3)).view()).unwrap_err();
        assert!(matches!(err, Error::Empty { .. }));
    }
}
