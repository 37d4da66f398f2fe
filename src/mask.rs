//! Attention masks with one convention: a mask says which keys a query may **not** see.
//!
//! Three kinds combine (by OR) into one [`Mask`] for an attention call:
//! - **causal** (look-ahead, §3.2.3): in the decoder, position `i` must not attend to later
//!   positions, "to preserve the auto-regressive property";
//! - **key padding** ([`KeyPaddingMask`]): per batch row, which key positions are padding;
//! - an arbitrary `[tgt_len, src_len]` pattern ([`AttnMask`]), shared over the batch and heads.
//!
//! Each constructor's name says what `true` means (`from_padding_flags`: true = padding;
//! `from_valid_flags`: true = real token), so a boolean's meaning cannot be misread.
//!
//! **Fully masked rows.** If a query can see no key at all, its attention weights are all zero
//! and its attention output is the zero vector (PyTorch returns NaN there). Every code path,
//! including the weights returned to the caller, follows this rule.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2};

use crate::error::{Error, Result};

/// Which key positions of each batch row are padding, `[batch, src_len]`, true = padding.
///
/// ```
/// use ndtransformer::KeyPaddingMask;
/// let mask = KeyPaddingMask::from_lengths(&[3, 1], 4)?;
/// assert_eq!(mask.is_padding().row(1).to_vec(), vec![false, true, true, true]);
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPaddingMask {
    is_padding: Array2<bool>,
}

impl KeyPaddingMask {
    /// Right padding from each row's real length: positions `len..max_len` are padding.
    ///
    /// # Errors
    /// [`Error::Shape`] if a length exceeds `max_len`, or if `[batch, max_len]` is more flags
    /// than an array can address.
    pub fn from_lengths(lengths: &[usize], max_len: usize) -> Result<Self> {
        if let Some((row, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > max_len) {
            return Err(Error::shape(
                format!("length {len} of batch row {row}"),
                format!("at most max_len {max_len}"),
                &[len],
            ));
        }
        let batch = lengths.len();
        if batch
            .checked_mul(max_len)
            .is_none_or(|n| n > isize::MAX as usize)
        {
            return Err(Error::shape(
                "key padding mask",
                format!("[batch, max_len] with at most {} flags", isize::MAX),
                &[batch, max_len],
            ));
        }
        let is_padding = Array2::from_shape_fn((lengths.len(), max_len), |(b, j)| j >= lengths[b]);
        Ok(KeyPaddingMask { is_padding })
    }

    /// From flags where `true` marks a padding position (PyTorch's `key_padding_mask`).
    pub fn from_padding_flags(is_padding: Array2<bool>) -> Self {
        KeyPaddingMask { is_padding }
    }

    /// From flags where `true` marks a real token (Hugging Face's `attention_mask`).
    pub fn from_valid_flags(is_valid: ArrayView2<bool>) -> Self {
        KeyPaddingMask {
            is_padding: is_valid.mapv(|v| !v),
        }
    }

    /// From a tokenizer's `attention_mask` `[batch, seq]` of integers: non-zero marks a real
    /// token, zero a padding position (Hugging Face's convention).
    ///
    /// ```
    /// use ndarray::array;
    /// use ndtransformer::KeyPaddingMask;
    /// let mask = KeyPaddingMask::from_attention_mask(array![[1u32, 1, 0]].view());
    /// assert_eq!(mask.is_padding(), array![[false, false, true]]);
    /// ```
    pub fn from_attention_mask<T: Copy + PartialEq + Default>(mask: ArrayView2<T>) -> Self {
        let zero = T::default();
        KeyPaddingMask {
            is_padding: mask.mapv(|v| v == zero),
        }
    }

    /// The flags, `[batch, src_len]`, true = padding.
    pub fn is_padding(&self) -> ArrayView2<'_, bool> {
        self.is_padding.view()
    }

    /// `(batch, src_len)`.
    pub fn dim(&self) -> (usize, usize) {
        self.is_padding.dim()
    }

    /// Number of real (non-padding) positions in each row.
    pub fn lengths(&self) -> Vec<usize> {
        self.is_padding
            .rows()
            .into_iter()
            .map(|r| r.iter().filter(|&&p| !p).count())
            .collect()
    }

    /// Checks the mask is `[batch, len]`.
    pub(crate) fn check(&self, batch: usize, len: usize, what: &str) -> Result<()> {
        if self.dim() != (batch, len) {
            return Err(Error::shape(
                what,
                format!("[batch, len] = [{batch}, {len}]"),
                self.is_padding.shape(),
            ));
        }
        Ok(())
    }
}

/// A pattern shared over batch and heads, `[tgt_len, src_len]`, true = query `i` may not see key `j`.
///
/// ```
/// use ndarray::array;
/// use ndtransformer::AttnMask;
/// let m = AttnMask::from_allowed(array![[true, false], [true, true]].view());
/// assert_eq!(m.blocked(), array![[false, true], [false, false]].view());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnMask {
    blocked: Array2<bool>,
}

impl AttnMask {
    /// From flags where `true` means "blocked" (PyTorch's bool `attn_mask` in `nn.MultiheadAttention`).
    pub fn from_blocked(blocked: Array2<bool>) -> Self {
        AttnMask { blocked }
    }

    /// From flags where `true` means "may attend" (SDPA's bool `attn_mask`).
    pub fn from_allowed(allowed: ArrayView2<bool>) -> Self {
        AttnMask {
            blocked: allowed.mapv(|a| !a),
        }
    }

    /// The flags, `[tgt_len, src_len]`, true = blocked.
    pub fn blocked(&self) -> ArrayView2<'_, bool> {
        self.blocked.view()
    }
}

/// Everything that hides keys from queries in one attention call; the parts combine by OR.
///
/// ```
/// use ndtransformer::{KeyPaddingMask, Mask};
/// let padding = KeyPaddingMask::from_lengths(&[2, 3], 3)?;
/// let mask = Mask::causal().with_key_padding(&padding);
/// // Batch row 0, query 2 cannot see key 2 (padding); query 0 cannot see key 1 (the future).
/// assert!(mask.is_blocked(0, 2, 2, 3, 3) && mask.is_blocked(1, 0, 1, 3, 3));
/// assert!(!mask.is_blocked(1, 2, 2, 3, 3));
/// # Ok::<(), ndtransformer::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Mask<'a> {
    causal: bool,
    key_padding: Option<&'a KeyPaddingMask>,
    attn: Option<&'a AttnMask>,
}

impl<'a> Mask<'a> {
    /// No masking: every query sees every key.
    pub fn none() -> Self {
        Mask::default()
    }

    /// The look-ahead mask: query `i` sees key `j` only if `j ≤ i + (src_len − tgt_len)`.
    ///
    /// With equal lengths this is the usual `j ≤ i`. Aligning the last query with the last key
    /// is what incremental decoding needs: one new query at position `t` sees keys `0..=t`.
    pub fn causal() -> Self {
        Mask {
            causal: true,
            ..Mask::default()
        }
    }

    /// Adds the look-ahead rule.
    pub fn with_causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Adds a key padding mask, `[batch, src_len]`.
    pub fn with_key_padding(mut self, key_padding: &'a KeyPaddingMask) -> Self {
        self.key_padding = Some(key_padding);
        self
    }

    /// Adds an optional key padding mask (no-op for `None`).
    pub fn with_key_padding_opt(mut self, key_padding: Option<&'a KeyPaddingMask>) -> Self {
        self.key_padding = key_padding.or(self.key_padding);
        self
    }

    /// Adds a `[tgt_len, src_len]` pattern.
    pub fn with_attn_mask(mut self, attn: &'a AttnMask) -> Self {
        self.attn = Some(attn);
        self
    }

    /// Whether the look-ahead rule is on.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// The key padding part, if any.
    pub fn key_padding(&self) -> Option<&'a KeyPaddingMask> {
        self.key_padding
    }

    /// Whether query `i` of batch row `b` may not see key `j`, for `tgt_len` queries and
    /// `src_len` keys.
    ///
    /// # Panics
    /// Like indexing an array, if the key padding part is set and `(b, j)` is outside its
    /// `[batch, src_len]`, or the attention-mask part is set and `(i, j)` is outside its
    /// `[tgt_len, src_len]`. The model never calls this; it is for inspecting a mask.
    pub fn is_blocked(&self, b: usize, i: usize, j: usize, tgt_len: usize, src_len: usize) -> bool {
        (self.causal && j + tgt_len > i + src_len)
            || self.key_padding.is_some_and(|m| m.is_padding[[b, j]])
            || self.attn.is_some_and(|m| m.blocked[[i, j]])
    }

    /// Checks every part against `batch`, `tgt_len` queries and `src_len` keys.
    pub(crate) fn check(&self, batch: usize, tgt_len: usize, src_len: usize) -> Result<()> {
        if let Some(kp) = self.key_padding {
            kp.check(batch, src_len, "key padding mask")?;
        }
        if let Some(am) = self.attn {
            if am.blocked.dim() != (tgt_len, src_len) {
                return Err(Error::shape(
                    "attention mask",
                    format!("[tgt_len, src_len] = [{tgt_len}, {src_len}]"),
                    am.blocked.shape(),
                ));
            }
        }
        Ok(())
    }

    /// Sets the blocked entries of batch row `b`'s `[tgt_len, src_len]` scores to `-inf`.
    pub(crate) fn apply(&self, b: usize, scores: ArrayViewMut2<f32>) {
        let src_len = scores.ncols();
        self.apply_keys(b, scores, 0, src_len);
    }

    /// As [`apply`](Self::apply) for the block of keys `key_start..key_start + scores.ncols()`
    /// out of `src_len` (the streaming attention kernel works one key block at a time).
    pub(crate) fn apply_keys(
        &self,
        b: usize,
        mut scores: ArrayViewMut2<f32>,
        key_start: usize,
        src_len: usize,
    ) {
        let (tgt_len, width) = scores.dim();
        let keys = key_start..key_start + width;
        if self.causal {
            for (i, mut row) in scores.rows_mut().into_iter().enumerate() {
                // Keys j with j + tgt_len > i + src_len are in the future of query i.
                let first_hidden = (i + src_len + 1).saturating_sub(tgt_len);
                let from = first_hidden.saturating_sub(key_start).min(width);
                row.slice_mut(s![from..]).fill(f32::NEG_INFINITY);
            }
        }
        if let Some(kp) = self.key_padding {
            let pad = kp.is_padding.slice(s![b, keys.clone()]);
            for mut row in scores.rows_mut() {
                row.zip_mut_with(&pad, |v, &p| {
                    if p {
                        *v = f32::NEG_INFINITY
                    }
                });
            }
        }
        if let Some(am) = self.attn {
            scores.zip_mut_with(&am.blocked.slice(s![.., keys]), |v, &blocked| {
                if blocked {
                    *v = f32::NEG_INFINITY
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn blocked_pattern(mask: &Mask, b: usize, tgt_len: usize, src_len: usize) -> Array2<bool> {
        let mut s = Array2::<f32>::zeros((tgt_len, src_len));
        mask.apply(b, s.view_mut());
        let applied = s.mapv(|v| v == f32::NEG_INFINITY);
        let by_rule = Array2::from_shape_fn((tgt_len, src_len), |(i, j)| {
            mask.is_blocked(b, i, j, tgt_len, src_len)
        });
        assert_eq!(applied, by_rule, "apply() and is_blocked() agree");
        applied
    }

    #[test]
    fn causal_is_upper_triangle_and_bottom_right_aligned() {
        let m = Mask::causal();
        assert_eq!(
            blocked_pattern(&m, 0, 3, 3),
            array![
                [false, true, true],
                [false, false, true],
                [false, false, false]
            ]
        );
        // One new query over 4 cached keys sees them all.
        assert_eq!(
            blocked_pattern(&m, 0, 1, 4),
            array![[false, false, false, false]]
        );
        assert_eq!(
            blocked_pattern(&m, 0, 2, 4),
            array![[false, false, false, true], [false, false, false, false]]
        );
    }

    #[test]
    fn parts_combine_by_or() {
        let kp = KeyPaddingMask::from_lengths(&[3, 2], 3).unwrap();
        let am = AttnMask::from_blocked(array![
            [false, false, true],
            [true, false, false],
            [false, false, false]
        ]);
        let m = Mask::causal().with_key_padding(&kp).with_attn_mask(&am);
        assert_eq!(
            blocked_pattern(&m, 1, 3, 3),
            array![
                [false, true, true],
                [true, false, true],
                [false, false, true]
            ]
        );
    }

    #[test]
    fn named_constructors_agree() {
        let a = KeyPaddingMask::from_lengths(&[1, 2], 2).unwrap();
        let b = KeyPaddingMask::from_padding_flags(array![[false, true], [false, false]]);
        let c = KeyPaddingMask::from_valid_flags(array![[true, false], [true, true]].view());
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.lengths(), vec![1, 2]);
        assert!(KeyPaddingMask::from_lengths(&[3], 2).is_err());
    }

    #[test]
    fn shape_checks() {
        let kp = KeyPaddingMask::from_lengths(&[1, 2], 2).unwrap();
        assert!(Mask::none().with_key_padding(&kp).check(2, 5, 2).is_ok());
        let err = Mask::none()
            .with_key_padding(&kp)
            .check(3, 5, 2)
            .unwrap_err();
        assert!(err.to_string().contains("[3, 2]"), "{err}");
        let am = AttnMask::from_blocked(Array2::from_elem((2, 3), false));
        assert!(Mask::none().with_attn_mask(&am).check(1, 2, 3).is_ok());
        assert!(Mask::none().with_attn_mask(&am).check(1, 3, 2).is_err());
    }

    #[test]
    fn key_blocks_reassemble_the_whole_mask() {
        let kp = KeyPaddingMask::from_lengths(&[5, 3], 7).unwrap();
        let am =
            AttnMask::from_blocked(Array2::from_shape_fn((4, 7), |(i, j)| (i + 2 * j) % 5 == 0));
        let m = Mask::causal().with_key_padding(&kp).with_attn_mask(&am);
        for b in 0..2 {
            let whole = blocked_pattern(&m, b, 4, 7);
            let mut pieces = Array2::<f32>::zeros((4, 7));
            for start in [0, 3, 6] {
                let end = (start + 3).min(7);
                m.apply_keys(b, pieces.slice_mut(s![.., start..end]), start, 7);
            }
            assert_eq!(pieces.mapv(|v| v == f32::NEG_INFINITY), whole);
        }
    }
}
