//! The decoder's key/value cache for generation, owned by the caller.
//!
//! Generating token `t` needs the decoder's self-attention keys and values of every earlier
//! target position, and the cross-attention keys and values of the encoder memory. Both stay
//! the same from step to step, so the cache keeps them: each step projects only the newest
//! token and appends its key and value. The layers never mutate themselves; the cache is a
//! value passed to [`Transformer::decode_step`](crate::Transformer::decode_step).

use ndarray::{s, Array4, ArrayView4, Axis, Ix4};

use crate::error::{Error, Result};
use crate::mask::KeyPaddingMask;

/// One attention's keys and values, stored `[batch, num_heads, capacity, d_k]` and grown along
/// the positions.
///
/// Head-major, so that one head's keys (and values) are a single contiguous block: a decoding
/// step reads each of them once, front to back, which is what bounds its attention.
#[derive(Debug, Clone)]
pub(crate) struct KeyValueCache {
    keys: Array4<f32>,
    values: Array4<f32>,
    len: usize,
}

/// `[batch, len, heads, d_k]` ↔ `[batch, heads, len, d_k]`.
const HEADS_FIRST: Ix4 = Ix4(0, 2, 1, 3);

impl KeyValueCache {
    /// An empty cache with room for `capacity` positions.
    pub(crate) fn with_capacity(
        batch: usize,
        capacity: usize,
        num_heads: usize,
        d_k: usize,
    ) -> Self {
        KeyValueCache {
            keys: Array4::zeros((batch, num_heads, capacity, d_k)),
            values: Array4::zeros((batch, num_heads, capacity, d_k)),
            len: 0,
        }
    }

    /// A full cache from keys and values `[batch, len, num_heads, d_k]` (the encoder memory's).
    pub(crate) fn from_full(keys: Array4<f32>, values: Array4<f32>) -> Self {
        let len = keys.shape()[1];
        let heads_first = |a: Array4<f32>| {
            a.permuted_axes(HEADS_FIRST)
                .as_standard_layout()
                .into_owned()
        };
        KeyValueCache {
            keys: heads_first(keys),
            values: heads_first(values),
            len,
        }
    }

    /// Appends `new` positions, `[batch, new, num_heads, d_k]` each, growing the storage
    /// geometrically when full.
    pub(crate) fn append(&mut self, keys: ArrayView4<f32>, values: ArrayView4<f32>) {
        let new = keys.shape()[1];
        let end = self.len + new;
        if end > self.keys.shape()[2] {
            let capacity = end.max(2 * self.keys.shape()[2]);
            self.keys = grow(&self.keys, self.len, capacity);
            self.values = grow(&self.values, self.len, capacity);
        }
        self.keys
            .slice_mut(s![.., .., self.len..end, ..])
            .assign(&keys.permuted_axes(HEADS_FIRST));
        self.values
            .slice_mut(s![.., .., self.len..end, ..])
            .assign(&values.permuted_axes(HEADS_FIRST));
        self.len = end;
    }

    /// Keys and values so far as `[batch, num_heads, len, d_k]` views.
    pub(crate) fn heads(&self) -> (ArrayView4<'_, f32>, ArrayView4<'_, f32>) {
        let len = self.len;
        (
            self.keys.slice(s![.., .., ..len, ..]),
            self.values.slice(s![.., .., ..len, ..]),
        )
    }

    /// Forgets every position from `len` on (the storage stays for reuse).
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn select_rows(&mut self, rows: &[usize]) {
        self.keys = self.keys.select(Axis(0), rows);
        self.values = self.values.select(Axis(0), rows);
    }
}

fn grow(a: &Array4<f32>, len: usize, capacity: usize) -> Array4<f32> {
    let (b, h, _, d) = a.dim();
    let mut bigger = Array4::zeros((b, h, capacity, d));
    bigger
        .slice_mut(s![.., .., ..len, ..])
        .assign(&a.slice(s![.., .., ..len, ..]));
    bigger
}

/// The caches of one decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    /// Self-attention keys and values of the target positions so far.
    pub(crate) self_attn: KeyValueCache,
    /// Cross-attention keys and values of the encoder memory, computed once.
    pub(crate) cross_attn: KeyValueCache,
}

/// Everything the decoder keeps between generation steps, for every batch row.
///
/// Made by [`Transformer::start_decoding`](crate::Transformer::start_decoding); advanced by
/// [`Transformer::decode_step`](crate::Transformer::decode_step). Rows can be reordered,
/// repeated or dropped with [`select_rows`](Self::select_rows) (beam search, finished rows).
#[derive(Debug, Clone)]
pub struct DecoderCache {
    pub(crate) model_fingerprint: u64,
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) memory_padding: Option<KeyPaddingMask>,
    pub(crate) batch: usize,
    pub(crate) len: usize,
}

impl DecoderCache {
    /// Number of batch rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of target positions decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no target position has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rewinds the cache to its first `len` target positions, as if only those had been
    /// decoded: the next [`decode_step`](crate::Transformer::decode_step) feeds position `len`.
    /// For re-decoding from a shared prefix (or discarding rejected draft tokens) without
    /// starting over; the storage is kept.
    ///
    /// # Errors
    /// [`Error::CacheMismatch`] if `len` is more than the positions decoded so far.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::CacheMismatch {
                reason: format!(
                    "cannot truncate to {len} positions: the cache holds {}",
                    self.len
                ),
            });
        }
        for layer in &mut self.layers {
            layer.self_attn.truncate(len);
        }
        self.len = len;
        Ok(())
    }

    /// Source length of the memory the cache attends to.
    pub fn src_len(&self) -> usize {
        self.layers[0].cross_attn.len
    }

    /// Keeps the batch rows `rows`, in that order; a row may appear several times (a beam that
    /// splits) or not at all (a finished row).
    ///
    /// # Errors
    /// [`Error::Empty`] for no rows; [`Error::CacheMismatch`] for a row index ≥ batch.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            return Err(Error::Empty {
                what: "row selection".into(),
                shape: vec![0],
            });
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::CacheMismatch {
                reason: format!(
                    "row index {bad} is out of range for the cache's batch {}",
                    self.batch
                ),
            });
        }
        for layer in &mut self.layers {
            layer.self_attn.select_rows(rows);
            layer.cross_attn.select_rows(rows);
        }
        if let Some(m) = &self.memory_padding {
            self.memory_padding = Some(KeyPaddingMask::from_padding_flags(
                m.is_padding().select(Axis(0), rows),
            ));
        }
        self.batch = rows.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_grows_and_views_heads() {
        let mut c = KeyValueCache::with_capacity(2, 1, 3, 4);
        for t in 0..5 {
            let k = Array4::from_elem((2, 1, 3, 4), t as f32);
            c.append(k.view(), k.view());
        }
        let (k, v) = c.heads();
        assert_eq!(k.shape(), &[2, 3, 5, 4]);
        assert_eq!(k[[1, 2, 3, 0]], 3.0);
        assert_eq!(v[[0, 0, 4, 3]], 4.0);
        c.select_rows(&[1, 1, 0]);
        assert_eq!(c.heads().0.shape(), &[3, 3, 5, 4]);
    }
}
