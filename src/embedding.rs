//! Token embeddings, scaled by √d_model (§3.4).
//!
//! "In the embedding layers, we multiply those weights by √d_model." The scale keeps the
//! embeddings on the same order as the positional encodings added next (§3.5).

use ndarray::{ArcArray, Array2, Array3, ArrayView2, Axis, Ix2};
use rand::Rng;

use crate::error::{Error, Result};
use crate::init;
use crate::parameters::{Parameters, Scope, Tensor, Visitor};

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
    weight: ArcArray<f32, Ix2>,
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
            weight: weight.into_shared(),
        })
    }

    /// Reads the `[vocab, d_model]` table `weight` from `scope`.
    pub(crate) fn load(scope: &mut Scope, vocab: usize, d_model: usize) -> Result<Self> {
        Self::new(scope.matrix("weight", vocab, d_model)?)
    }

    /// A freshly initialised `[vocab, d_model]` table (Xavier uniform).
    ///
    /// # Panics
    /// If `vocab × d_model` is more values than an array can address (ndarray's own rule);
    /// [`Transformer::new`](crate::Transformer::new) rejects such sizes with an error first.
    pub fn init<R: Rng + ?Sized>(vocab: usize, d_model: usize, rng: &mut R) -> Self {
        Embedding {
            weight: init::xavier_uniform(vocab, d_model, d_model, vocab, rng).into_shared(),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.weight.nrows()
    }

    /// Width of each vector.
    pub fn d_model(&self) -> usize {
        self.weight.ncols()
    }

    /// The table, `[vocab, d_model]`, unscaled.
    pub fn weight(&self) -> ArrayView2<'_, f32> {
        self.weight.view()
    }

    /// The table itself, shared: for a projection tied to it.
    pub(crate) fn shared_weight(&self) -> ArcArray<f32, Ix2> {
        self.weight.clone()
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
                v.zip_mut_with(&self.weight.row(id as usize), |o, &w| *o = w * scale);
            }
        }
        out
    }
}

impl Parameters for Embedding {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        f("weight", Tensor::Plain(self.weight.view().into_dyn()));
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
