//! The bottom of Figure 1: from token ids to the first layer's input (§3.4, §3.5).
//!
//! `x = E[id]·s + P[pos] (+ T[type])`, then an optional LayerNorm. The paper's model uses
//! `s = √d_model` and the sinusoidal `P`, with no token types and no norm; BERT-style encoders
//! use `s = 1`, a learned `P`, token types and a norm. One piece of code runs both, chosen by
//! [`EmbeddingConfig`](crate::EmbeddingConfig).

use ndarray::{Array3, ArrayView2, Axis, Zip};
use rand::Rng;

use crate::config::{Positions, TransformerConfig};
use crate::embedding::{check_ids, Embedding};
use crate::error::{Error, Result};
use crate::init;
use crate::layer_norm::LayerNorm;
use crate::parameters::{visit_child, Parameters, Scope, Visitor};
use crate::positional::PositionalEncoding;
use crate::residual::norm_inplace;

/// Everything added to (or applied after) the token embedding: the scale, the position table,
/// the token-type table and the embedding norm. The token table itself stays outside, so a
/// [`Transformer`](crate::Transformer) can run its source and target tables through one
/// instance.
///
/// ```
/// use ndarray::array;
/// use ndtransformer::{Embedding, InputEmbedding, PositionalEncoding};
/// let tokens = Embedding::new(array![[1.0f32, 0.0], [0.0, 1.0]])?;  // [vocab 2, d_model 2]
/// let input = InputEmbedding::new(PositionalEncoding::new(8, 2), None, None, false)?;
/// let x = input.forward(&tokens, array![[1u32, 0]].view(), None, 0)?; // [1, 2, 2]
/// assert_eq!(x[[0, 0, 1]], 1.0 + 1.0); // E[1] + cos(0)
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct InputEmbedding {
    positions: PositionalEncoding,
    token_types: Option<Embedding>,
    norm: Option<LayerNorm>,
    scale: bool,
}

impl InputEmbedding {
    /// From its parts; `scale` multiplies the token embeddings by √d_model (§3.4).
    ///
    /// # Errors
    /// [`Error::Shape`] if the token-type table or the norm is not as wide as the positions.
    pub fn new(
        positions: PositionalEncoding,
        token_types: Option<Embedding>,
        norm: Option<LayerNorm>,
        scale: bool,
    ) -> Result<Self> {
        let d_model = positions.d_model();
        if let Some(t) = &token_types {
            if t.d_model() != d_model {
                return Err(Error::shape(
                    "token-type embedding",
                    format!("[type_vocab, d_model {d_model}]"),
                    &[t.vocab(), t.d_model()],
                ));
            }
        }
        if let Some(n) = &norm {
            if n.d_model() != d_model {
                return Err(Error::shape(
                    "embedding norm",
                    format!("[d_model {d_model}]"),
                    &[n.d_model()],
                ));
            }
        }
        Ok(InputEmbedding {
            positions,
            token_types,
            norm,
            scale,
        })
    }

    /// Fresh parameters for `config.embedding` (learned tables Xavier-uniform, norm identity).
    pub(crate) fn init<R: Rng + ?Sized>(config: &TransformerConfig, rng: &mut R) -> Result<Self> {
        let (e, d) = (&config.embedding, config.d_model);
        let positions = match e.positions {
            Positions::Sinusoidal => PositionalEncoding::new(config.max_len, d),
            Positions::SinusoidalHalves => PositionalEncoding::halves(config.max_len, d),
            Positions::Learned => PositionalEncoding::learned(init::xavier_uniform(
                config.max_len,
                d,
                d,
                config.max_len,
                rng,
            ))?,
        };
        let token_types = (e.type_vocab > 0).then(|| Embedding::init(e.type_vocab, d, rng));
        let norm = if e.norm {
            Some(LayerNorm::identity(d, config.layer_norm_eps)?)
        } else {
            None
        };
        Self::new(positions, token_types, norm, e.scale)
    }

    /// Reads the parts `config.embedding` asks for from `scope`: `positions.weight` when
    /// learned, `token_types.weight` and `norm.{weight,bias}` when present.
    pub(crate) fn load(scope: &mut Scope, config: &TransformerConfig) -> Result<Self> {
        let (e, d) = (&config.embedding, config.d_model);
        let positions = match e.positions {
            Positions::Sinusoidal => PositionalEncoding::new(config.max_len, d),
            Positions::SinusoidalHalves => PositionalEncoding::halves(config.max_len, d),
            Positions::Learned => PositionalEncoding::learned(scope.child("positions").matrix(
                "weight",
                config.max_len,
                d,
            )?)?,
        };
        let token_types = (e.type_vocab > 0)
            .then(|| Embedding::load(&mut scope.child("token_types"), e.type_vocab, d))
            .transpose()?;
        let norm = e
            .norm
            .then(|| LayerNorm::load(&mut scope.child("norm"), d, config.layer_norm_eps))
            .transpose()?;
        Self::new(positions, token_types, norm, e.scale)
    }

    /// The position table (sinusoidal or learned).
    pub fn positions(&self) -> &PositionalEncoding {
        &self.positions
    }

    /// The token-type table `[type_vocab, d_model]`, if any.
    pub fn token_types(&self) -> Option<&Embedding> {
        self.token_types.as_ref()
    }

    /// The LayerNorm applied to the sum, if any.
    pub fn norm(&self) -> Option<&LayerNorm> {
        self.norm.as_ref()
    }

    /// Whether token embeddings are multiplied by √d_model.
    pub fn scales(&self) -> bool {
        self.scale
    }

    /// Embeds `ids` whose first position is `offset` (0 for a whole sequence, the cache length
    /// for one decoding step).
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`
    /// - `token_types`: `[batch, seq]`, or `None` for type 0 everywhere (BERT's default)
    /// - returns `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::TokenOutOfRange`] for an id or a type id out of range,
    /// [`Error::SequenceTooLong`] past the position table, [`Error::Shape`] if `token_types` or
    /// `tokens` does not fit.
    pub fn forward(
        &self,
        tokens: &Embedding,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
        offset: usize,
    ) -> Result<Array3<f32>> {
        self.embed(tokens, ids, token_types, offset, "token ids")
    }

    /// [`forward`](Self::forward), naming the ids `what` in errors (e.g. `"source ids"`).
    pub(crate) fn embed(
        &self,
        tokens: &Embedding,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
        offset: usize,
        what: &str,
    ) -> Result<Array3<f32>> {
        if tokens.d_model() != self.positions.d_model() {
            return Err(Error::shape(
                "token embedding",
                format!("[vocab, d_model {}]", self.positions.d_model()),
                &[tokens.vocab(), tokens.d_model()],
            ));
        }
        check_ids(ids, tokens.vocab(), what)?;
        let end = offset.saturating_add(ids.ncols());
        if end > self.positions.max_len() {
            return Err(Error::SequenceTooLong {
                len: end,
                max_len: self.positions.max_len(),
            });
        }
        if let Some(types) = token_types {
            if types.dim() != ids.dim() {
                return Err(Error::shape(
                    "token type ids",
                    format!("[batch, seq] = {:?}", [ids.nrows(), ids.ncols()]),
                    types.shape(),
                ));
            }
            match &self.token_types {
                Some(table) => check_ids(types, table.vocab(), "token type ids")?,
                None => {
                    if let Some(((batch, position), &id)) =
                        types.indexed_iter().find(|(_, &t)| t != 0)
                    {
                        return Err(Error::TokenOutOfRange {
                            id,
                            vocab: 1,
                            batch,
                            position,
                        });
                    }
                }
            }
        }
        Ok(self.forward_unchecked(tokens, ids, token_types, offset))
    }

    /// As [`forward`](Self::forward) for inputs already checked.
    pub(crate) fn forward_unchecked(
        &self,
        tokens: &Embedding,
        ids: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
        offset: usize,
    ) -> Array3<f32> {
        let scale = if self.scale {
            (tokens.d_model() as f32).sqrt()
        } else {
            1.0
        };
        let mut x = tokens.lookup(ids, scale);
        self.positions
            .add_at(x.view_mut(), offset)
            .expect("checked: width and length fit the table");
        if let Some(table) = &self.token_types {
            let table = table.weight();
            match token_types {
                Some(types) => Zip::from(x.lanes_mut(Axis(2)))
                    .and(types)
                    .for_each(|mut v, &t| v += &table.row(t as usize)),
                None => {
                    let zero = table.row(0);
                    for mut v in x.lanes_mut(Axis(2)) {
                        v += &zero;
                    }
                }
            }
        }
        if let Some(norm) = &self.norm {
            norm_inplace(norm, &mut x);
        }
        x
    }
}

impl Parameters for InputEmbedding {
    fn visit<'a>(&'a self, f: &mut Visitor<'_, 'a>) {
        visit_child(f, "positions", &self.positions);
        if let Some(t) = &self.token_types {
            visit_child(f, "token_types", t);
        }
        if let Some(n) = &self.norm {
            visit_child(f, "norm", n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};

    fn tokens() -> Embedding {
        Embedding::new(array![[1.0f32, 2.0], [3.0, -1.0], [0.5, 0.5]]).unwrap()
    }

    #[test]
    fn paper_recipe_scales_and_adds_sinusoids() {
        let input = InputEmbedding::new(PositionalEncoding::new(4, 2), None, None, true).unwrap();
        let x = input
            .forward(&tokens(), array![[1u32, 2]].view(), None, 0)
            .unwrap();
        let s = 2f32.sqrt();
        let pe = PositionalEncoding::new(4, 2);
        let pe = pe.table(2).unwrap();
        assert_eq!(x[[0, 0, 0]], 3.0 * s + pe[[0, 0]]);
        assert_eq!(x[[0, 1, 1]], 0.5 * s + pe[[1, 1]]);
    }

    #[test]
    fn bert_recipe_adds_learned_positions_and_types_then_norms() {
        let positions = PositionalEncoding::learned(array![[0.0f32, 0.0], [10.0, 20.0]]).unwrap();
        let types = Embedding::new(array![[0.0f32, 0.0], [100.0, 0.0]]).unwrap();
        let input =
            InputEmbedding::new(positions.clone(), Some(types.clone()), None, false).unwrap();
        let x = input
            .forward(
                &tokens(),
                array![[0u32, 1]].view(),
                Some(array![[1u32, 0]].view()),
                0,
            )
            .unwrap();
        assert_eq!(
            x.slice(ndarray::s![0, .., ..]),
            array![[101.0f32, 2.0], [13.0, 19.0]]
        );
        // No type ids means type 0 everywhere.
        let x0 = input
            .forward(&tokens(), array![[0u32, 1]].view(), None, 0)
            .unwrap();
        assert_eq!(
            x0.slice(ndarray::s![0, .., ..]),
            array![[1.0f32, 2.0], [13.0, 19.0]]
        );
        // With a norm every vector has zero mean.
        let norm = LayerNorm::new(Array1::ones(2), Array1::zeros(2), 1e-12).unwrap();
        let input = InputEmbedding::new(positions, Some(types), Some(norm), false).unwrap();
        let x = input
            .forward(&tokens(), array![[0u32, 1]].view(), None, 0)
            .unwrap();
        for v in x.lanes(Axis(2)) {
            assert!(v.sum().abs() < 1e-6 && (v[0] + 1.0).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn errors_name_the_bad_value() {
        let input = InputEmbedding::new(PositionalEncoding::new(2, 2), None, None, true).unwrap();
        let err = input
            .forward(&tokens(), array![[0u32, 1, 2]].view(), None, 0)
            .unwrap_err();
        assert!(matches!(err, Error::SequenceTooLong { len: 3, max_len: 2 }));
        let err = input
            .forward(&tokens(), array![[0u32]].view(), None, 2)
            .unwrap_err();
        assert!(matches!(err, Error::SequenceTooLong { len: 3, max_len: 2 }));
        let err = input
            .forward(
                &tokens(),
                array![[0u32]].view(),
                Some(array![[1u32]].view()),
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("token id 1"), "{err}");
        let err = input
            .forward(
                &tokens(),
                array![[0u32]].view(),
                Some(array![[0u32, 0]].view()),
                0,
            )
            .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}
