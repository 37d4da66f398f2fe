//! Positional encoding (§3.5): the paper's sinusoidal table, or a learned one.
//!
//! `PE(pos, 2i) = sin(pos / 10000^(2i/d_model))`, `PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))`.
//! Attention itself is blind to order; adding these fixed waves gives each position a signature
//! from which relative offsets are linear functions, so the model can attend by position.
//! The paper also tried a learned table "and found that the two versions produced nearly
//! identical results" (Table 3, row E); BERT-style encoders use one, so the same type holds
//! either, and both are added to the embeddings the same way.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut3};

use crate::error::{Error, Result};
use crate::parameters::{Parameters, Tensor, Visitor};

/// A `[max_len, d_model]` table of position vectors added to the embeddings: the sinusoids of
/// §3.5 (sin and cos interleaved), precomputed, or a learned table.
///
/// ```
/// use ndtransformer::PositionalEncoding;
/// let pe = PositionalEncoding::new(100, 8);
/// let table = pe.table(10)?; // [10, d_model 8]
/// assert_eq!(table[[0, 0]], 0.0); // sin(0)
/// assert_eq!(table[[0, 1]], 1.0); // cos(0)
/// assert!(pe.table(101).is_err());
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PositionalEncoding {
    table: Array2<f32>,
    /// A learned table is a parameter; the sinusoids are computed, like a PyTorch buffer.
    learned: bool,
}

impl PositionalEncoding {
    /// The table for `max_len` positions of width `d_model`, computed in f64 and rounded once.
    ///
    /// # Panics
    /// If `max_len × d_model` is more values than an array can address (ndarray's own rule);
    /// [`Transformer::new`](crate::Transformer::new) rejects such sizes with an error first.
    pub fn new(max_len: usize, d_model: usize) -> Self {
        Self::sinusoids(max_len, d_model, |dim| (dim / 2, dim % 2 == 0))
    }

    /// The same sinusoids with every sine first and every cosine after (Hugging Face's Marian,
    /// `MarianSinusoidalPositionalEmbedding`): column `i < ⌈d/2⌉` is `PE(pos, 2i)`, column
    /// `⌈d/2⌉ + i` is `PE(pos, 2i + 1)`.
    ///
    /// ```
    /// use ndtransformer::PositionalEncoding;
    /// let (paper, halves) = (PositionalEncoding::new(50, 8), PositionalEncoding::halves(50, 8));
    /// let (p, h) = (paper.table(50)?, halves.table(50)?);
    /// assert_eq!(h[[7, 1]], p[[7, 2]]); // the second sine
    /// assert_eq!(h[[7, 5]], p[[7, 3]]); // the second cosine
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    ///
    /// # Panics
    /// As [`new`](Self::new).
    pub fn halves(max_len: usize, d_model: usize) -> Self {
        let sines = d_model.div_ceil(2);
        Self::sinusoids(max_len, d_model, |dim| {
            if dim < sines {
                (dim, true)
            } else {
                (dim - sines, false)
            }
        })
    }

    /// The `[max_len, d_model]` table whose column `dim` is wave `i` of §3.5 (`sin` when the
    /// flag is set, else `cos`) for `(i, sin) = wave(dim)`, in f64 rounded once.
    fn sinusoids(max_len: usize, d_model: usize, wave: impl Fn(usize) -> (usize, bool)) -> Self {
        let table = Array2::from_shape_fn((max_len, d_model), |(pos, dim)| {
            let (i, sin) = wave(dim);
            let angle = pos as f64 / 10000f64.powf((2 * i) as f64 / d_model as f64);
            let v = if sin { angle.sin() } else { angle.cos() };
            v as f32
        });
        PositionalEncoding {
            table,
            learned: false,
        }
    }

    /// A learned table `[max_len, d_model]` (e.g. BERT's `position_embeddings.weight`).
    ///
    /// # Errors
    /// [`Error::Empty`] if the table has no rows or columns.
    pub fn learned(table: Array2<f32>) -> Result<Self> {
        if table.is_empty() {
            return Err(Error::Empty {
                what: "learned position table".into(),
                shape: table.shape().to_vec(),
            });
        }
        Ok(PositionalEncoding {
            table,
            learned: true,
        })
    }

    /// Number of positions the table covers.
    pub fn max_len(&self) -> usize {
        self.table.nrows()
    }

    /// Width of each position vector.
    pub fn d_model(&self) -> usize {
        self.table.ncols()
    }

    /// The first `len` rows, `[len, d_model]`.
    ///
    /// # Errors
    /// [`Error::SequenceTooLong`] if `len > max_len`.
    pub fn table(&self, len: usize) -> Result<ArrayView2<'_, f32>> {
        self.rows(0, len)
    }

    /// Rows `offset..offset + len` (positions of a chunk that starts at `offset`).
    fn rows(&self, offset: usize, len: usize) -> Result<ArrayView2<'_, f32>> {
        let end = offset.saturating_add(len);
        if end > self.max_len() {
            return Err(Error::SequenceTooLong {
                len: end,
                max_len: self.max_len(),
            });
        }
        Ok(self.table.slice(s![offset..end, ..]))
    }

    /// `x + PE`, positions counted from 0.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`Error::SequenceTooLong`] if `seq > max_len`; [`Error::Shape`] if the width differs.
    pub fn forward(&self, x: ArrayView3<f32>) -> Result<Array3<f32>> {
        let mut out = x.to_owned();
        self.add_at(out.view_mut(), 0)?;
        Ok(out)
    }

    /// Adds the encodings of positions `offset..offset + seq` to `x` in place.
    pub(crate) fn add_at(&self, mut x: ArrayViewMut3<f32>, offset: usize) -> Result<()> {
        let d_model = self.table.ncols();
        if x.shape()[2] != d_model {
            return Err(Error::shape(
                "positional-encoding input",
                format!("[batch, seq, {d_model}]"),
                x.shape(),
            ));
        }
        let rows = self.rows(offset, x.shape()[1])?;
        for mut b in x.outer_iter_mut() {
            b += &rows;
        }
        Ok(())
    }
}

/// A learned table as `weight`; the sinusoidal one has no parameters.
impl Parameters for PositionalEncoding {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        if self.learned {
            f("weight", Tensor::Plain(self.table.view().into_dyn()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_section_3_5() {
        let d = 6;
        let pe = PositionalEncoding::new(50, d);
        let t = pe.table(50).unwrap();
        for pos in [0usize, 1, 7, 49] {
            for i in 0..d / 2 {
                let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
                assert!((t[[pos, 2 * i]] as f64 - angle.sin()).abs() < 1e-7);
                assert!((t[[pos, 2 * i + 1]] as f64 - angle.cos()).abs() < 1e-7);
            }
        }
        // Every value is a sine or cosine.
        assert!(t.iter().all(|v| v.abs() <= 1.0));
    }

    #[test]
    fn odd_width_ends_with_a_sine() {
        let t = PositionalEncoding::new(3, 5);
        let row = t.table(3).unwrap().row(2).to_owned();
        let angle = 2.0f64 / 10000f64.powf(4.0 / 5.0);
        assert!((row[4] as f64 - angle.sin()).abs() < 1e-7);
    }

    #[test]
    fn too_long_is_an_error_and_offsets_continue_the_table() {
        let pe = PositionalEncoding::new(4, 2);
        assert_eq!(
            pe.table(5).unwrap_err().to_string(),
            "sequence length 5 exceeds the positional-encoding table's max_len 4"
        );
        let mut x = Array3::zeros((1, 1, 2));
        pe.add_at(x.view_mut(), 3).unwrap();
        assert_eq!(x.slice(s![0, 0, ..]), pe.table(4).unwrap().row(3));
        assert!(pe.add_at(x.view_mut(), 4).is_err());
    }
}
