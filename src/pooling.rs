//! From token vectors to one sentence vector: pooling and L2 normalisation.
//!
//! An encoder gives one vector per token, `[batch, seq, d_model]`; sentence-embedding models
//! reduce them to `[batch, d_model]` over the real (non-padding) tokens, the way
//! sentence-transformers' `Pooling` module does, and usually scale each to unit length so that
//! a dot product is the cosine similarity.

use ndarray::{s, Array2, ArrayView3, ArrayViewMut2, Axis};

use crate::error::{Error, Result};
use crate::mask::KeyPaddingMask;

/// One way of reducing a sequence of token vectors to one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's vector (BERT's `[CLS]`).
    Cls,
    /// The element-wise maximum over real tokens.
    Max,
    /// The mean over real tokens.
    Mean,
    /// The sum over real tokens divided by √(number of real tokens).
    MeanSqrtLen,
}

impl Pooling {
    /// The modes switched on in a sentence-transformers `Pooling` config
    /// (`1_Pooling/config.json`), in the order sentence-transformers concatenates them.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid JSON, no mode switched on, or a mode this crate does not
    /// implement (`weightedmean`, `lasttoken`), naming it.
    pub fn from_sentence_transformers_json(text: &str) -> Result<Vec<Pooling>> {
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config("pooling config", format!("not valid JSON: {e}")))?;
        let on = |key: &str| json.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
        for key in ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"] {
            if on(key) {
                return Err(Error::config(
                    "pooling config",
                    format!("{key} is not supported (cls, max, mean and mean_sqrt_len are)"),
                ));
            }
        }
        let modes: Vec<Pooling> = [
            ("pooling_mode_cls_token", Pooling::Cls),
            ("pooling_mode_max_tokens", Pooling::Max),
            ("pooling_mode_mean_tokens", Pooling::Mean),
            ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
        ]
        .into_iter()
        .filter(|(key, _)| on(key))
        .map(|(_, mode)| mode)
        .collect();
        if modes.is_empty() {
            return Err(Error::config(
                "pooling config",
                "no pooling_mode_* is true".to_string(),
            ));
        }
        Ok(modes)
    }
}

/// Pools every batch row over its real tokens; several modes are concatenated in order.
///
/// # Shapes
/// - `hidden`: `[batch, seq, d_model]`
/// - `padding`: `[batch, seq]`, true = padding; `None` means every token is real
/// - returns `[batch, modes.len() · d_model]`
///
/// A row whose tokens are all padding pools to zeros (sentence-transformers divides by a count
/// clamped to 1e-9, which gives the same zeros).
///
/// # Errors
/// [`Error::Shape`] if the mask does not fit `hidden`; [`Error::Empty`] for no modes or an
/// empty batch or sequence.
pub fn pool(
    hidden: ArrayView3<f32>,
    padding: Option<&KeyPaddingMask>,
    modes: &[Pooling],
) -> Result<Array2<f32>> {
    let (batch, seq, d_model) = hidden.dim();
    if modes.is_empty() || batch == 0 || seq == 0 {
        return Err(Error::Empty {
            what: if modes.is_empty() {
                "pooling modes".into()
            } else {
                "hidden states".into()
            },
            shape: hidden.shape().to_vec(),
        });
    }
    if let Some(p) = padding {
        if p.dim() != (batch, seq) {
            return Err(Error::shape(
                "key padding mask",
                format!("[batch, seq] = [{batch}, {seq}]"),
                &[p.dim().0, p.dim().1],
            ));
        }
    }
    let mut out = Array2::zeros((batch, modes.len() * d_model));
    for b in 0..batch {
        let real = |j: usize| padding.is_none_or(|p| !p.is_padding()[[b, j]]);
        let count = (0..seq).filter(|&j| real(j)).count();
        for (m, mode) in modes.iter().enumerate() {
            let mut o = out.slice_mut(s![b, m * d_model..(m + 1) * d_model]);
            match mode {
                Pooling::Cls => o.assign(&hidden.slice(s![b, 0, ..])),
                Pooling::Max => {
                    if count > 0 {
                        o.fill(f32::NEG_INFINITY);
                        for j in (0..seq).filter(|&j| real(j)) {
                            o.zip_mut_with(&hidden.slice(s![b, j, ..]), |a, &v| *a = a.max(v));
                        }
                    }
                }
                Pooling::Mean | Pooling::MeanSqrtLen => {
                    for j in (0..seq).filter(|&j| real(j)) {
                        o += &hidden.slice(s![b, j, ..]);
                    }
                    if count > 0 {
                        let n = count as f32;
                        o /= if *mode == Pooling::Mean { n } else { n.sqrt() };
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Scales every row to unit L2 norm, as `torch.nn.functional.normalize(x, p=2, dim=1)`: a row
/// is divided by `max(‖row‖, 1e-12)`, so a zero row stays zero.
///
/// # Shapes
/// - `x`: `[batch, dim]`, changed in place
pub fn l2_normalize(mut x: ArrayViewMut2<f32>) {
    for mut row in x.axis_iter_mut(Axis(0)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row /= norm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn hidden() -> ndarray::Array3<f32> {
        array![
            [[1.0f32, -2.0], [3.0, 4.0], [100.0, 100.0]],
            [[0.5, 0.5], [-1.0, 7.0], [2.0, -3.0]]
        ]
    }

    #[test]
    fn modes_ignore_padding() {
        let padding = KeyPaddingMask::from_lengths(&[2, 3], 3).unwrap();
        let h = hidden();
        let mean = pool(h.view(), Some(&padding), &[Pooling::Mean]).unwrap();
        assert_eq!(mean, array![[2.0f32, 1.0], [0.5, 1.5]]);
        let max = pool(h.view(), Some(&padding), &[Pooling::Max]).unwrap();
        assert_eq!(max, array![[3.0f32, 4.0], [2.0, 7.0]]);
        let cls_sqrt = pool(
            h.view(),
            Some(&padding),
            &[Pooling::Cls, Pooling::MeanSqrtLen],
        )
        .unwrap();
        let r2 = 2f32.sqrt();
        assert_eq!(cls_sqrt.row(0), array![1.0f32, -2.0, 4.0 / r2, 2.0 / r2]);
        let all = pool(h.view(), None, &[Pooling::Mean]).unwrap();
        assert_eq!(all.row(0), array![104.0f32 / 3.0, 34.0]);
    }

    #[test]
    fn fully_padded_rows_pool_to_zero_and_stay_zero() {
        let padding =
            KeyPaddingMask::from_padding_flags(array![[true, true, true], [false, true, true]]);
        let mut out = pool(
            hidden().view(),
            Some(&padding),
            &[Pooling::Mean, Pooling::Max],
        )
        .unwrap();
        assert_eq!(out.row(0), array![0.0f32, 0.0, 0.0, 0.0]);
        l2_normalize(out.view_mut());
        assert_eq!(out.row(0), array![0.0f32, 0.0, 0.0, 0.0]);
        let n: f32 = out.row(1).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-6);
    }

    #[test]
    fn reads_sentence_transformers_config() {
        let text = r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false}"#;
        assert_eq!(
            Pooling::from_sentence_transformers_json(text).unwrap(),
            vec![Pooling::Mean]
        );
        let err = Pooling::from_sentence_transformers_json(r#"{"pooling_mode_lasttoken": true}"#)
            .unwrap_err();
        assert!(err.to_string().contains("pooling_mode_lasttoken"), "{err}");
        assert!(Pooling::from_sentence_transformers_json("{}").is_err());
        assert!(Pooling::from_sentence_transformers_json("not json").is_err());
        let padding = KeyPaddingMask::from_lengths(&[1], 2).unwrap();
        assert!(pool(hidden().view(), Some(&padding), &[Pooling::Mean]).is_err());
    }
}
