//! The decoder's key/value cache for generation, owned by the caller.
//!
//! Generating token `t` needs the decoder's self-attention keys and values of every earlier
//! target position, and the cross-attention keys and values of the encoder memory. Both stay
//! the same from step to step, so the cache keeps them: each step projects only the newest
//! token and appends its key and value. The layers never mutate themselves; the cache is a
//! value passed to [`Transformer::decode_step`](crate::Transformer::decode_step).

use ndarray::{s, Array3, Array4, ArrayView4, Axis, CowArray, Ix4};

use crate::error::{Error, Result};
use crate::huge_pages;
use crate::mask::KeyPaddingMask;

/// One attention's keys and values: values stored `[batch, num_heads, capacity, d_k]`, keys
/// transposed, `[batch, num_heads, d_k, capacity]`; both grown along the positions.
///
/// Head-major, so that one head's keys (and values) are a single block that a decoding step
/// reads once, front to back, which is what bounds its attention. Keys are stored transposed
/// so that the scores of one query, `q Kᵀ`, are a sum of `d_k` rows of `Kᵀ`, each scaled by one
/// entry of `q`: whole vectors of keys at a time, not one short dot product per key.
///
/// Slot `b` of the batch reads stored row `rows[b]`: a cache that is never appended to (the
/// memory's) is reordered by rewriting `rows` alone, so the beams of one source row share
/// its keys and values instead of each holding a copy.
#[derive(Debug, Clone)]
pub(crate) struct KeyValueCache {
    keys_t: Array4<f32>,
    values: Array4<f32>,
    len: usize,
    rows: Vec<usize>,
}

/// `[batch, len, heads, d_k]` → `[batch, heads, len, d_k]`.
const HEADS_FIRST: Ix4 = Ix4(0, 2, 1, 3);
/// `[batch, len, heads, d_k]` → `[batch, heads, d_k, len]`.
const HEADS_FIRST_T: Ix4 = Ix4(0, 2, 3, 1);

impl KeyValueCache {
    /// An empty cache with room for `capacity` positions.
    pub(crate) fn with_capacity(
        batch: usize,
        capacity: usize,
        num_heads: usize,
        d_k: usize,
    ) -> Self {
        KeyValueCache {
            keys_t: Array4::zeros((batch, num_heads, d_k, capacity)),
            values: Array4::zeros((batch, num_heads, capacity, d_k)),
            len: 0,
            rows: (0..batch).collect(),
        }
    }

    /// A full cache from keys and values `[batch, len, num_heads, d_k]` (the encoder memory's).
    pub(crate) fn from_full(keys: Array4<f32>, values: Array4<f32>) -> Self {
        let (batch, len) = (keys.shape()[0], keys.shape()[1]);
        let reorder =
            |a: Array4<f32>, axes: Ix4| huge_pages::standard_copy(a.view().permuted_axes(axes));
        KeyValueCache {
            keys_t: reorder(keys, HEADS_FIRST_T),
            values: reorder(values, HEADS_FIRST),
            len,
            rows: (0..batch).collect(),
        }
    }

    fn capacity(&self) -> usize {
        self.values.shape()[2]
    }

    /// Appends `new` positions, `[batch, new, num_heads, d_k]` each, growing the storage
    /// geometrically when full.
    pub(crate) fn append(&mut self, keys: ArrayView4<f32>, values: ArrayView4<f32>) {
        debug_assert!(
            self.is_identity(),
            "an appended cache holds one stored row a slot"
        );
        let new = keys.shape()[1];
        let end = self.len + new;
        if end > self.capacity() {
            let capacity = end.max(2 * self.capacity());
            self.keys_t = grow(&self.keys_t, Axis(3), self.len, capacity);
            self.values = grow(&self.values, Axis(2), self.len, capacity);
        }
        self.keys_t
            .slice_mut(s![.., .., .., self.len..end])
            .assign(&keys.permuted_axes(HEADS_FIRST_T));
        self.values
            .slice_mut(s![.., .., self.len..end, ..])
            .assign(&values.permuted_axes(HEADS_FIRST));
        self.len = end;
    }

    /// Keys and values so far as `[batch, num_heads, len, d_k]` (the keys' view strided,
    /// transposed back from their storage); copies, slot by slot, when slots share rows.
    pub(crate) fn heads(&self) -> (CowArray<'_, f32, Ix4>, CowArray<'_, f32, Ix4>) {
        let len = self.len;
        let k = self
            .keys_t
            .slice(s![.., .., .., ..len])
            .permuted_axes([0, 1, 3, 2]);
        let v = self.values.slice(s![.., .., ..len, ..]);
        if self.is_identity() {
            (k.into(), v.into())
        } else {
            let rows = &self.rows;
            (
                k.select(Axis(0), rows).into(),
                v.select(Axis(0), rows).into(),
            )
        }
    }

    /// The storage itself, keys `[rows, num_heads, d_k, capacity]` and values
    /// `[rows, num_heads, capacity, d_k]`, both in standard layout, how many positions of it
    /// are filled, and the stored row of each batch slot.
    pub(crate) fn storage(&self) -> (ArrayView4<'_, f32>, ArrayView4<'_, f32>, usize, &[usize]) {
        (self.keys_t.view(), self.values.view(), self.len, &self.rows)
    }

    /// Whether slot `b` reads stored row `b`, for every `b`.
    fn is_identity(&self) -> bool {
        self.rows.len() == self.keys_t.shape()[0]
            && self.rows.iter().enumerate().all(|(i, &r)| i == r)
    }

    /// Forgets every position from `len` on (the storage stays for reuse).
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keeps slots `rows`, copying their keys and values (a cache that grows): in place, only
    /// the slots whose source changes and only their filled positions, so that a beam-search
    /// step costs what its reordering moves, not the whole cache.
    fn select_rows(&mut self, rows: &[usize]) {
        debug_assert!(
            self.is_identity(),
            "a growing cache holds one stored row a slot"
        );
        let len = self.len;
        if rows.len() > self.keys_t.shape()[0] {
            // More slots than stored rows (beams opening): new storage, filled positions copied.
            let (_, heads, d_k, capacity) = self.keys_t.dim();
            let d_v = self.values.shape()[3];
            let mut keys_t = Array4::zeros((rows.len(), heads, d_k, capacity));
            let mut values = Array4::zeros((rows.len(), heads, capacity, d_v));
            for (i, &r) in rows.iter().enumerate() {
                keys_t
                    .slice_mut(s![i, .., .., ..len])
                    .assign(&self.keys_t.slice(s![r, .., .., ..len]));
                values
                    .slice_mut(s![i, .., ..len, ..])
                    .assign(&self.values.slice(s![r, .., ..len, ..]));
            }
            (self.keys_t, self.values) = (keys_t, values);
        } else {
            // A source that some slot overwrites is set aside before any slot is written.
            let overwritten = |r: usize| r < rows.len() && rows[r] != r;
            let mut kept: Vec<(usize, Array3<f32>, Array3<f32>)> = Vec::new();
            for (i, &r) in rows.iter().enumerate() {
                if r != i && overwritten(r) && !kept.iter().any(|(k, ..)| *k == r) {
                    let k = self.keys_t.slice(s![r, .., .., ..len]).to_owned();
                    let v = self.values.slice(s![r, .., ..len, ..]).to_owned();
                    kept.push((r, k, v));
                }
            }
            for (i, &r) in rows.iter().enumerate() {
                if r == i {
                    continue;
                }
                let (keys_t, values) = (&mut self.keys_t, &mut self.values);
                match kept.iter().find(|(k, ..)| *k == r) {
                    Some((_, k, v)) => {
                        keys_t.slice_mut(s![i, .., .., ..len]).assign(k);
                        values.slice_mut(s![i, .., ..len, ..]).assign(v);
                    }
                    None => {
                        let (mut to, from) =
                            keys_t.multi_slice_mut((s![i, .., .., ..len], s![r, .., .., ..len]));
                        to.assign(&from);
                        let (mut to, from) =
                            values.multi_slice_mut((s![i, .., ..len, ..], s![r, .., ..len, ..]));
                        to.assign(&from);
                    }
                }
            }
            self.keys_t.slice_collapse(s![..rows.len(), .., .., ..]);
            self.values.slice_collapse(s![..rows.len(), .., .., ..]);
        }
        self.rows = (0..rows.len()).collect();
    }

    /// Keeps slots `rows` by pointing them at the stored rows they read (a cache that never
    /// grows): no key or value moves. The storage is compacted when fewer than half of its
    /// rows are still read (finished batch rows).
    fn share_rows(&mut self, rows: &[usize]) {
        self.rows = rows.iter().map(|&r| self.rows[r]).collect();
        let mut read: Vec<usize> = self.rows.clone();
        read.sort_unstable();
        read.dedup();
        if 2 * read.len() < self.keys_t.shape()[0] {
            self.keys_t = self.keys_t.select(Axis(0), &read);
            self.values = self.values.select(Axis(0), &read);
            for r in &mut self.rows {
                *r = read.binary_search(r).expect("a row read is kept");
            }
        }
    }
}

/// `a` with its positions axis `axis` grown to `capacity`, the first `len` positions kept.
fn grow(a: &Array4<f32>, axis: Axis, len: usize, capacity: usize) -> Array4<f32> {
    let mut shape = a.raw_dim();
    shape[axis.index()] = capacity;
    let mut bigger = Array4::zeros(shape);
    bigger
        .slice_axis_mut(axis, (..len).into())
        .assign(&a.slice_axis(axis, (..len).into()));
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
            layer.cross_attn.share_rows(rows);
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
        // Every value names its position, batch row, head and channel.
        let value =
            |t: usize, b: usize, h: usize, d: usize| (1000 * t + 100 * b + 10 * h + d) as f32;
        let mut c = KeyValueCache::with_capacity(2, 1, 3, 4);
        for t in 0..5 {
            let k = Array4::from_shape_fn((2, 1, 3, 4), |(b, _, h, d)| value(t, b, h, d));
            c.append(k.view(), (-&k).view());
        }
        let (k, v) = c.heads();
        assert_eq!(k.shape(), &[2, 3, 5, 4]);
        assert_eq!(v.shape(), &[2, 3, 5, 4]);
        for ((b, h, t, d), &key) in k.indexed_iter() {
            assert_eq!(key, value(t, b, h, d));
            assert_eq!(v[[b, h, t, d]], -value(t, b, h, d));
        }
        c.select_rows(&[1, 1, 0]);
        let (k, v) = c.heads();
        assert_eq!(k.shape(), &[3, 3, 5, 4]);
        assert_eq!(k[[2, 1, 3, 2]], value(3, 0, 1, 2));
        assert_eq!(v[[0, 2, 4, 1]], -value(4, 1, 2, 1));
    }

    #[test]
    fn reordering_in_place_moves_what_a_copy_would() {
        let value =
            |t: usize, b: usize, h: usize, d: usize| (1000 * t + 100 * b + 10 * h + d) as f32;
        let mut c = KeyValueCache::with_capacity(3, 8, 2, 4);
        for t in 0..3 {
            let k = Array4::from_shape_fn((3, 1, 2, 4), |(b, _, h, d)| value(t, b, h, d));
            c.append(k.view(), (-&k).view());
        }
        // Reference: the rows each slot holds, followed through every selection.
        let mut holds: Vec<usize> = vec![0, 1, 2];
        for rows in [
            &[1, 0, 2][..],
            &[2, 2, 0],
            &[0, 0, 1, 1, 2],
            &[4, 1],
            &[1, 1, 0],
        ] {
            c.select_rows(rows);
            holds = rows.iter().map(|&r| holds[r]).collect();
            let (k, v) = c.heads();
            assert_eq!(k.shape(), &[rows.len(), 2, 3, 4]);
            for ((slot, h, t, d), &key) in k.indexed_iter() {
                assert_eq!(key, value(t, holds[slot], h, d), "after {rows:?}");
                assert_eq!(v[[slot, h, t, d]], -key);
            }
        }
        // Appending after the reorders writes each slot's new position.
        let k = Array4::from_shape_fn((3, 1, 2, 4), |(b, _, h, d)| value(3, 10 + b, h, d));
        c.append(k.view(), (-&k).view());
        let (k, _) = c.heads();
        assert_eq!(k[[2, 1, 3, 0]], value(3, 12, 1, 0));
        assert_eq!(k[[2, 1, 2, 0]], value(2, holds[2], 1, 0));
    }

    #[test]
    fn shared_rows_read_as_copies_would_and_unread_rows_are_dropped() {
        let keys = Array4::from_shape_fn((3, 5, 2, 4), |(b, t, h, d)| {
            (1000 * t + 100 * b + 10 * h + d) as f32
        });
        let full = |rows: &[usize]| {
            let k = keys.select(Axis(0), rows);
            (
                k.clone().permuted_axes([0, 2, 1, 3]),
                (-k).permuted_axes([0, 2, 1, 3]),
            )
        };
        let mut c = KeyValueCache::from_full(keys.clone(), keys.mapv(|x| -x));
        // Beams: slots 0, 1 read row 2; slots 2, 3 read row 0; row 1 is finished.
        c.share_rows(&[2, 2, 0, 0]);
        let (k, v) = c.heads();
        assert_eq!((k.into_owned(), v.into_owned()), full(&[2, 2, 0, 0]));
        assert_eq!(c.keys_t.shape()[0], 3, "two of three rows read: no copy");
        c.share_rows(&[3, 0]);
        let (k, v) = c.heads();
        assert_eq!((k.into_owned(), v.into_owned()), full(&[0, 2]));
        c.share_rows(&[1]);
        assert_eq!(c.keys_t.shape()[0], 1, "one of three rows read: compacted");
        let (k, v) = c.heads();
        assert_eq!((k.into_owned(), v.into_owned()), full(&[2]));
    }

    #[test]
    fn a_full_cache_views_its_keys_and_values_per_head() {
        let keys = Array4::from_shape_fn((2, 5, 3, 4), |(b, t, h, d)| {
            (1000 * t + 100 * b + 10 * h + d) as f32
        });
        let c = KeyValueCache::from_full(keys.clone(), keys.mapv(|x| -x));
        let (k, v) = c.heads();
        assert_eq!(k, keys.view().permuted_axes([0, 2, 1, 3]));
        assert_eq!(v, keys.mapv(|x| -x).permuted_axes([0, 2, 1, 3]));
    }
}
