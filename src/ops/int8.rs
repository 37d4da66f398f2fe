//! Int8 linear layers: weights quantized per output row, activations per row (per token) at
//! run time, in blocks of 32 inputs, products summed exactly in i32, then dequantized with both
//! scales.
//!
//! `y[r, o] = (Σ_b S_b[r, o] · sx_b[r]) · sw[o] + b[o]`, where `S_b` is the exact integer sum
//! `Σ_{i in block b} qx[r, i] · qw[o, i]`. The weight's `qw = round(W / sw)` has one symmetric
//! scale per output row, fixed when the model is quantized. Each block of 32 inputs of a row
//! gets its own scale `sx_b[r]` and an 8-bit grid (255 steps over `[min(x, 0), max(x, 0)]`),
//! computed on every call. Blocks keep one large activation (BERT's outlier features) from
//! coarsening a whole row: on all-MiniLM-L6-v2 one scale per row left the worst sentence at
//! cosine 0.993 with f32, blocks of 32 at 0.996. The integer sums are exact whatever the
//! order, so every path (AVX2 here, the plain loops elsewhere) gives the same bits as the
//! scalar reference; the f32 steps after them are the same on every path (each block's sum
//! enters the row's total as one fused multiply-add, `total = S_b · sx_b + total`, then
//! `total · sw + b`). `Linear` holds an
//! [`Int8Weight`] when its model is quantized and calls [`int8_linear`] through
//! [`super::linear`].
//!
//! AVX2 has no int8 dot product that cannot saturate: `vpmaddubsw` adds two u8 × s8 products
//! into an i16, which overflows for large values of both. The kernel widens the weights to
//! i16 instead and multiplies with `vpmaddwd` (i16 × i16 pairs into i32), which is exact for
//! the full int8 range. Products of up to 8 rows (decoding steps) take 8-row tiles of one
//! strip of 8 columns, so that each weight is widened once; taller ones take 6-row tiles of
//! two strips, where each broadcast input feeds two products.
//!
//! With AVX-512 VNNI (Intel since Cascade Lake, AMD Zen 4) the weight is packed for
//! `vpdpbusd` instead ([`Layout::Quads`]), which adds four u8 × s8 products into each i32 lane
//! without saturating. The activations enter as their u8 levels `u`, and each block's sum is
//! made exact by adding `−zero · Σ w` with the block's column sums, stored beside the weight
//! (the compensation oneDNN uses). On an Intel Xeon (Emerald Rapids, 2 threads) a 1024 × 512 →
//! 2048 product went from 12.8 ms on the AVX2 kernel to 5.1 ms.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Dim, ShapeBuilder};

use super::Epilogue;

/// Values of `k` one group of the packed layout holds: the pair of i16 inputs `vpmaddwd` adds
/// into one i32 lane.
const GROUP: usize = 2;
/// Output columns one strip of the packed layout holds (16 bytes a group: one AVX2 register
/// once widened to i16).
const STRIP: usize = 8;
/// Inputs one group of the VNNI layout holds: the four u8 × s8 products `vpdpbusd` adds into
/// one i32 lane.
const QUAD: usize = 4;
/// Output columns one strip of the VNNI layout holds: 16 i32 lanes, one AVX-512 register.
pub(super) const WIDE_STRIP: usize = 16;
/// Rows the largest register tile covers: 8 rows × 1 strip (8 accumulators), for products of
/// at most 8 rows (decoding steps), so that each weight is widened once.
const TILE_ROWS: usize = 8;
/// Rows of the tile for taller products: 6 rows × 2 strips take 12 accumulators, beside the
/// strips' two widened weights and one broadcast input.
const WIDE_ROWS: usize = 6;
/// Strips one register tile covers at most: 16 output columns, so that each broadcast input
/// feeds two products.
const TILE_STRIPS: usize = 2;
/// Rows of the input one unit of work takes: their quantized values (64 rows of 512 inputs,
/// 64 KiB) stay in L2 while the unit's strips pass through L1.
const CHUNK_ROWS: usize = 64;
/// Output columns one unit of work takes.
const UNIT_COLS: usize = 128;
/// The largest `k` whose sums cannot overflow an i32: `k · 128² ≤ 2³¹`.
pub(crate) const MAX_INPUTS: usize = 1 << 17;

/// A weight `W: [out, in]` as int8 values with one scale per output row: `W[o, i] ≈ sw[o] ·
/// q[o, i]`.
///
/// Stored as strips of 8 output columns, each strip's groups of 2 inputs one after another
/// (`[out / 8][in / 2][8][2]`, zero-padded), so that a product reads the weight once, front to
/// back, 16 bytes a step. Shared (not copied) when a layer is cloned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Int8Weight {
    packed: Arc<[i8]>,
    scales: Arc<[f32]>,
    /// [`Layout::Quads`] only: each block's column sums `Σ_{i in block} q[o, i]`, the
    /// compensation of the activations' zero points (`[out / 16][blocks / 2][16][2]`).
    sums: Arc<[i16]>,
    layout: Layout,
    out: usize,
    inputs: usize,
}

/// How an [`Int8Weight`]'s values are packed: for the AVX2 and scalar kernels, or for
/// AVX-512 VNNI. Chosen once, when the weight is packed, by the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Strips of 8 columns, groups of 2 inputs (`[out / 8][in / 2][8][2]`): `vpmaddwd` pairs.
    Pairs,
    /// Strips of 16 columns, groups of 4 inputs (`[out / 16][in / 4][16][4]`): one 64-byte
    /// AVX-512 register a group, the four u8 × s8 products `vpdpbusd` adds into each i32 lane.
    Quads,
}

impl Layout {
    /// The layout the fastest kernel this CPU has reads.
    pub(crate) fn detect() -> Self {
        if vnni() {
            Layout::Quads
        } else {
            Layout::Pairs
        }
    }

    /// Groups of inputs a strip holds for `inputs` inputs: whole blocks of 32 inputs for
    /// VNNI, so that the AMX tiles read whole blocks.
    fn groups(self, inputs: usize) -> usize {
        match self {
            Layout::Pairs => inputs.div_ceil(GROUP),
            Layout::Quads => inputs.div_ceil(BLOCK) * QUAD_BLOCK,
        }
    }

    /// Inputs one group holds.
    fn group(self) -> usize {
        match self {
            Layout::Pairs => GROUP,
            Layout::Quads => QUAD,
        }
    }

    /// Output columns one strip holds.
    fn strip(self) -> usize {
        match self {
            Layout::Pairs => STRIP,
            Layout::Quads => WIDE_STRIP,
        }
    }

    /// Where `q[o, i]` lies in the packed values of a weight with `groups` groups of inputs.
    fn index(self, groups: usize, o: usize, i: usize) -> usize {
        let (group, strip) = (self.group(), self.strip());
        ((o / strip * groups + i / group) * strip + o % strip) * group + i % group
    }
}

/// Whether this CPU has AVX-512 (F, BW) with VNNI, for [`Layout::Quads`].
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Int8Weight {
    /// `w: [out, in]` quantized per row: `sw[o] = max|w[o, :]| / 127`, `q = round(w / sw)` (to
    /// the nearest, ties to even; a row of zeros gets scale 0). `None` if a value is not
    /// finite.
    pub(crate) fn quantize(w: ArrayView2<f32>) -> Option<Self> {
        let (out, inputs) = w.dim();
        let mut q = Array2::<i8>::zeros((out, inputs));
        let mut scales = vec![0.0f32; out];
        let finite = AtomicBool::new(true);
        q.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(w.axis_iter(Axis(0)))
            .zip(scales.par_iter_mut())
            .for_each(|((mut q_row, row), scale)| {
                let row = row.to_vec();
                let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                if !max.is_finite() || row.iter().any(|v| v.is_nan()) {
                    finite.store(false, Ordering::Relaxed);
                    return;
                }
                let inv;
                (*scale, inv) = best_scale(&row, max);
                let q_row = q_row
                    .as_slice_mut()
                    .expect("a fresh array's rows are contiguous");
                quantize_row(&row, inv, q_row);
            });
        finite
            .into_inner()
            .then(|| Self::from_parts(q.view(), &scales))
    }

    /// A weight from its int8 values `q: [out, in]` and scales `[out]` (shapes checked by the
    /// caller).
    pub(crate) fn from_parts(q: ArrayView2<i8>, scales: &[f32]) -> Self {
        Self::from_parts_in(q, scales, Layout::detect())
    }

    /// [`from_parts`](Self::from_parts) packed in `layout` (which the CPU must be able to run).
    pub(crate) fn from_parts_in(q: ArrayView2<i8>, scales: &[f32], layout: Layout) -> Self {
        let (out, inputs) = q.dim();
        debug_assert_eq!(scales.len(), out);
        let (group, strip) = (layout.group(), layout.strip());
        let groups = layout.groups(inputs);
        let mut packed = vec![0i8; out.div_ceil(strip) * groups * strip * group];
        for ((o, i), &v) in q.indexed_iter() {
            packed[layout.index(groups, o, i)] = v;
        }
        let sums = match layout {
            Layout::Pairs => Vec::new(),
            Layout::Quads => {
                let pairs = inputs.div_ceil(BLOCK).div_ceil(2);
                let mut sums = vec![0i16; out.div_ceil(WIDE_STRIP) * pairs * WIDE_STRIP * 2];
                for ((o, i), &v) in q.indexed_iter() {
                    let b = i / BLOCK;
                    let at = ((o / WIDE_STRIP * pairs + b / 2) * WIDE_STRIP + o % WIDE_STRIP) * 2;
                    // At most 32 · 127 in magnitude: an i16.
                    sums[at + b % 2] += i16::from(v);
                }
                sums
            }
        };
        Int8Weight {
            packed: packed.into(),
            scales: scales.into(),
            sums: sums.into(),
            layout,
            out,
            inputs,
        }
    }

    /// Groups of inputs a strip holds in this weight's layout.
    fn groups(&self) -> usize {
        self.layout.groups(self.inputs)
    }

    /// [`Layout::Quads`]: the column sums one strip holds, 32 a pair of blocks.
    fn sums_len(&self) -> usize {
        self.inputs.div_ceil(BLOCK).div_ceil(2) * WIDE_STRIP * 2
    }

    /// `out`, the number of outputs.
    pub(crate) fn out_features(&self) -> usize {
        self.out
    }

    /// `in`, the number of inputs.
    pub(crate) fn in_features(&self) -> usize {
        self.inputs
    }

    /// The int8 values, `[out, in]`.
    pub(crate) fn values(&self) -> Array2<i8> {
        let groups = self.groups();
        Array2::from_shape_fn((self.out, self.inputs), |(o, i)| {
            self.packed[self.layout.index(groups, o, i)]
        })
    }

    /// The int8 values as stored (packed, with their padding).
    pub(crate) fn stored(&self) -> &[i8] {
        &self.packed
    }

    /// The scales, `[out]`.
    pub(crate) fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `sw[o] · q[o, i]`, `[out, in]`: the weight the products use, in f32.
    pub(crate) fn dequantize(&self) -> Array2<f32> {
        let mut w = self.values().mapv(f32::from);
        for (mut row, &s) in w.rows_mut().into_iter().zip(self.scales.iter()) {
            row.mapv_inplace(|q| q * s);
        }
        w
    }

    /// Row `o` of [`dequantize`](Self::dequantize) times `times`, into `out: [in]`: the same
    /// floats, `(sw[o] · q[o, i]) · times` (an int8 embedding table's lookup).
    pub(crate) fn dequantize_row_into(&self, o: usize, times: f32, out: &mut [f32]) {
        assert_eq!(out.len(), self.inputs, "a row is [in]");
        let (groups, s) = (self.groups(), self.scales[o]);
        for (i, v) in out.iter_mut().enumerate() {
            *v = f32::from(self.packed[self.layout.index(groups, o, i)]) * s * times;
        }
    }

    /// Bytes the weight takes: the int8 values (with their padding), the scales and (VNNI
    /// layout) the blocks' column sums.
    pub(crate) fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.scales.len() + 2 * self.sums.len()
    }
}

/// The scale `max / 127` of a row whose largest magnitude is `max`, and the factor `127 / max`
/// its values are multiplied by before rounding (0 for a row of zeros).
#[inline(always)]
fn scale_and_inverse(max: f32) -> (f32, f32) {
    if max > 0.0 {
        (max / 127.0, 127.0 / max)
    } else {
        (0.0, 0.0)
    }
}

/// The scale (and its inverse) of a weight row with the least squared rounding error, among
/// `max / 127` and the clipped ranges `c · max / 127` for `c` from 0.70 to 0.99 (values beyond
/// `127 · scale` saturate): a few large weights then cost less than the precision of all the
/// others. (Compiled for AVX2 too: without SSE4.1 each rounding is a library call.)
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn best_scale(row: &[f32], max: f32) -> (f32, f32) {
    let error = |(scale, inv): (f32, f32)| squared_error(row, scale, inv);
    let mut best = scale_and_inverse(max);
    let mut best_error = error(best);
    for step in 70..100 {
        let candidate = scale_and_inverse(max * step as f32 / 100.0);
        let e = error(candidate);
        if e < best_error {
            (best, best_error) = (candidate, e);
        }
    }
    best
}

/// `q = quantize_value(v, inv)` for each `v` of `row` (compiled for AVX2 too, for its rounding
/// instruction).
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn quantize_row(row: &[f32], inv: f32, q: &mut [i8]) {
    for (q, &v) in q.iter_mut().zip(row) {
        *q = quantize_value(v, inv);
    }
}

/// `Σ (v − scale · quantize_value(v, inv))²` over `row`, in eight partial sums so that it runs
/// in vector lanes. A function rather than a closure: closures do not inherit the caller's
/// target features, and this one must be compiled with them.
#[inline(always)]
fn squared_error(row: &[f32], scale: f32, inv: f32) -> f32 {
    let e = |v: f32| v - (v * inv).round_ties_even().clamp(-127.0, 127.0) * scale;
    let mut lanes = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| e(v) * e(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += e(v) * e(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `round(v · inv)` to the nearest integer, ties to even, within `[-127, 127]`.
#[inline(always)]
fn quantize_value(v: f32, inv: f32) -> i8 {
    (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Groups of inputs (2 each) that share one activation scale: blocks of 32 inputs.
const BLOCK_GROUPS: usize = 16;
/// Inputs per activation block.
pub(super) const BLOCK: usize = BLOCK_GROUPS * GROUP;
/// Groups of 4 inputs in a block ([`Layout::Quads`]).
const QUAD_BLOCK: usize = BLOCK / QUAD;

/// One row's share of [`quantize_rows`]' outputs: the input row, its levels, and its blocks'
/// scales and zero words.
type RowPieces<'a, T> = (
    ArrayView1<'a, f32>,
    (&'a mut [T], (&'a mut [f32], &'a mut [i32])),
);

/// Input rows quantized for a product: `q: [rows][width]` (zero-padded), one scale per block
/// of [`BLOCK`] inputs of each row, and each block's zero point as the word the VNNI kernel's
/// compensation multiplies ([`Level::zero_word`]).
struct QuantizedRows<T> {
    q: Vec<T>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
    width: usize,
    blocks: usize,
}

impl<T> QuantizedRows<T> {
    fn row(&self, r: usize) -> &[T] {
        &self.q[r * self.width..(r + 1) * self.width]
    }

    fn scales(&self, r: usize) -> &[f32] {
        &self.scales[r * self.blocks..(r + 1) * self.blocks]
    }

    fn zeros(&self, r: usize) -> &[i32] {
        &self.zeros[r * self.blocks..(r + 1) * self.blocks]
    }
}

/// How a level `u` of a block's 8-bit grid (zero point `zero`) is kept: as `d = u − zero` in
/// an i16 (the AVX2 and scalar kernels) or as the u8 `u` itself (VNNI, which subtracts
/// `zero · Σ w` afterwards).
trait Level: Copy + Default + Send + Sync {
    /// Whether the level is the u8 `u` (else the i16 `u − zero`).
    const UNSIGNED: bool;
    fn level(d: f32, zero: f32) -> Self;
}

impl Level for i16 {
    const UNSIGNED: bool = false;
    #[inline(always)]
    fn level(d: f32, _zero: f32) -> Self {
        d as i16
    }
}

impl Level for u8 {
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn level(d: f32, zero: f32) -> Self {
        (d + zero) as u8
    }
}

/// The i32 word whose i16 pair, multiplied by a block pair's column sums (`vpdpwssd`), gives
/// `−zero · Σ w` for block `b`: `−zero` in the low half for an even block, the high half for
/// an odd one.
fn zero_word(zero: f32, b: usize) -> i32 {
    let half = i32::from((-zero) as i16 as u16);
    if b.is_multiple_of(2) {
        half
    } else {
        half << 16
    }
}

/// `x: [rows, in]` quantized in blocks of [`BLOCK`] inputs ([`quantize_block`]) into rows of
/// `width ≥ in` levels, rows in parallel, followed by rows of zeros up to a multiple of
/// `pad_rows` rows (the AMX tiles load 16 rows at a time).
fn quantize_rows<T: Level>(x: ArrayView2<f32>, width: usize, pad_rows: usize) -> QuantizedRows<T> {
    let rows = x.nrows();
    let blocks = width.div_ceil(BLOCK);
    let stored = rows.next_multiple_of(pad_rows);
    let mut q = vec![T::default(); stored * width];
    let mut scales = vec![0.0f32; stored * blocks];
    let mut zeros = vec![0i32; stored * blocks];
    let avx512 = avx512bw();
    let work = |(row, (q, (scales, zeros))): RowPieces<T>| {
        let row = row.as_standard_layout();
        let row = row.as_slice().expect("standard layout");
        let blocks = row.chunks(BLOCK).zip(q.chunks_mut(BLOCK));
        for (b, ((x, q), (scale, zero))) in blocks.zip(scales.iter_mut().zip(zeros)).enumerate() {
            let z;
            (*scale, z) = quantize_levels(avx512, x, &mut q[..x.len()]);
            *zero = zero_word(z, b);
        }
    };
    let pieces = x.rows().into_iter().zip(
        q.chunks_mut(width.max(1)).zip(
            scales
                .chunks_mut(blocks.max(1))
                .zip(zeros.chunks_mut(blocks.max(1))),
        ),
    );
    if rows * width >= 1 << 16 {
        pieces.collect::<Vec<_>>().into_par_iter().for_each(work);
    } else {
        pieces.for_each(work);
    }
    QuantizedRows {
        q,
        scales,
        zeros,
        width,
        blocks,
    }
}

/// The 8-bit grid of a block with bounds `lo ≤ 0 ≤ hi`: the factor `255 / (hi − lo)` its
/// values are multiplied by and the zero point. `Err` with the block's (scale, zero point)
/// when all its levels are 0: a NaN scale for a block with a non-finite value (`nan`, or
/// infinite bounds), scale 0 for a block of zeros.
#[inline(always)]
fn grid(lo: f32, hi: f32, nan: bool) -> Result<(f32, f32), (f32, f32)> {
    if nan || !(hi - lo).is_finite() {
        return Err((f32::NAN, 0.0));
    }
    if hi == lo {
        return Err((0.0, 0.0));
    }
    let inv = 255.0 / (hi - lo);
    Ok((inv, (-lo * inv).round_ties_even()))
}

/// One block of a row as levels with `x ≈ scale · (u − zero)`; returns the scale and the zero
/// point.
///
/// The block's range `[min(x, 0), max(x, 0)]` is cut into 255 steps (u8 values with a zero
/// point, `d = u − zero` in `[−zero, 255 − zero]`), so a one-sided block (a GELU's or ReLU's
/// output) gets twice the resolution a symmetric ±127 grid gives it. A block with a non-finite
/// value gets a NaN scale, so that its row's outputs are NaN, as in f32.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn quantize_block<T: Level>(x: &[f32], q: &mut [T]) -> (f32, f32) {
    let (lo, hi) = x
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (inv, zero) = match grid(lo, hi, x.iter().any(|v| v.is_nan())) {
        Ok(grid) => grid,
        Err(flat) => {
            q.fill(T::level(0.0, 0.0));
            return flat;
        }
    };
    let (min, max) = (-zero, 255.0 - zero);
    for (q, &v) in q.iter_mut().zip(x) {
        *q = T::level((v * inv).round_ties_even().clamp(min, max), zero);
    }
    ((hi - lo) / 255.0, zero)
}

/// Whether this CPU has AVX-512 F and BW, for [`quantize_block_avx512`].
fn avx512bw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`quantize_block`], on AVX-512 where `avx512` says the CPU has it ([`avx512bw`]).
#[inline(always)]
fn quantize_levels<T: Level>(avx512: bool, x: &[f32], q: &mut [T]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512 && x.len() <= BLOCK {
        // SAFETY: the CPU has AVX-512 F and BW, and the block is at most 32 values.
        return unsafe { quantize_block_avx512(x, q) };
    }
    let _ = avx512;
    quantize_block(x, q)
}

/// [`quantize_block`] on AVX-512 (F, BW), for a block of at most 32 values: the same levels,
/// scale and zero point, bit for bit, the block in two registers. The grid's steps are the
/// same f32 operations (`v · inv` rounded to the nearest, ties to even, then clamped), and
/// the levels are exact small integers, so converting them cannot round.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `x` holds at most [`BLOCK`] values and `q` as many.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512<T: Level>(x: &[f32], q: &mut [T]) -> (f32, f32) {
    use std::arch::x86_64::*;
    const HALF: usize = BLOCK / 2;
    assert!(x.len() <= BLOCK && q.len() == x.len());
    let masks: [__mmask16; 2] = std::array::from_fn(|h| {
        let n = x.len().saturating_sub(h * HALF).min(HALF);
        ((1u32 << n) - 1) as __mmask16
    });
    // SAFETY: the masked loads read only the block's values (lanes past its end are zero).
    let v: [__m512; 2] = std::array::from_fn(|h| unsafe {
        _mm512_maskz_loadu_ps(masks[h], x.as_ptr().wrapping_add(h * HALF))
    });
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v[0], v[0])
        | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v[1], v[1]);
    // The zero lanes past the end change neither bound: both start at 0.
    let lo = _mm512_reduce_min_ps(_mm512_min_ps(v[0], v[1])).min(0.0);
    let hi = _mm512_reduce_max_ps(_mm512_max_ps(v[0], v[1])).max(0.0);
    let (inv, zero) = match grid(lo, hi, nan != 0) {
        Ok(grid) => grid,
        Err(flat) => {
            q.fill(T::level(0.0, 0.0));
            return flat;
        }
    };
    let (min, max) = (_mm512_set1_ps(-zero), _mm512_set1_ps(255.0 - zero));
    for (h, (&v, &mask)) in v.iter().zip(&masks).enumerate() {
        let d = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, _mm512_set1_ps(inv)),
        );
        let d = _mm512_min_ps(_mm512_max_ps(d, min), max);
        // SAFETY: the masked stores write only the block's levels.
        unsafe {
            if T::UNSIGNED {
                let u = _mm512_cvtps_epi32(_mm512_add_ps(d, _mm512_set1_ps(zero)));
                let at = q.as_mut_ptr().cast::<i8>().wrapping_add(h * HALF);
                _mm512_mask_cvtusepi32_storeu_epi8(at, mask, u);
            } else {
                let at = q.as_mut_ptr().cast::<i16>().wrapping_add(h * HALF);
                _mm512_mask_cvtsepi32_storeu_epi16(at, mask, _mm512_cvtps_epi32(d));
            }
        }
    }
    ((hi - lo) / 255.0, zero)
}

/// Calls `$dispatch!` with every register-tile shape `(rows, strips)` the kernels have: 8,
/// 6, 4, 2 or 1 rows × 1 strip ([`tile_shape`] for up to 8 rows) and 6, 4, 2 or 1 rows × 2
/// strips (taller products), as [`tile_rows`] picks them.
macro_rules! tile_shapes {
    ($dispatch:ident) => {
        $dispatch!(
            (6, 2),
            (4, 2),
            (2, 2),
            (1, 2),
            (8, 1),
            (6, 1),
            (4, 1),
            (2, 1),
            (1, 1)
        )
    };
}

thread_local! {
    /// Each thread's sums of one unit of [`int8_linear`], kept from unit to unit so that they
    /// are not fresh memory each time; every unit overwrites what it reads.
    static UNIT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with the first `len` values of this thread's [`UNIT`] buffer, grown if needed
/// (its contents are whatever the last unit left).
fn with_unit_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    UNIT.with(|unit| {
        let mut unit = unit.borrow_mut();
        if unit.len() < len {
            unit.resize(len, 0.0);
        }
        f(&mut unit[..len])
    })
}

/// `y = epilogue(x · Wᵀ + bias)`, dequantized, for an int8 weight: `x: [rows, in]`, `y: [rows,
/// out]` (any contents, overwritten). The bias and the activation are applied to each row of a
/// unit as its sums are stored.
///
/// # Panics
/// If the shapes disagree or `in` exceeds [`MAX_INPUTS`] (the callers check both).
pub(crate) fn int8_linear(
    x: ArrayView2<f32>,
    w: &Int8Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    if y.strides().iter().any(|&s| s < 0) {
        // A reversed view (none of the crate's own): written whole into fresh memory first.
        let mut fresh = Array2::uninit(y.raw_dim());
        int8_linear_uninit(x, w, bias, epilogue, fresh.view_mut());
        // SAFETY: `int8_linear_uninit` wrote every element.
        y.assign(&unsafe { fresh.assume_init() });
        return;
    }
    let (dim, strides) = (y.raw_dim(), y.strides().to_vec());
    let strides = Dim([strides[0] as usize, strides[1] as usize]);
    // SAFETY: the same elements, at the same (non-negative, checked above) strides, seen
    // as `MaybeUninit<f32>`, which has the layout of `f32`; `y` is borrowed for the call.
    let y = unsafe {
        ArrayViewMut2::from_shape_ptr(
            dim.strides(strides),
            y.as_mut_ptr().cast::<MaybeUninit<f32>>(),
        )
    };
    int8_linear_uninit(x, w, bias, epilogue, y);
}

/// [`int8_linear`] into `y` whose values may be uninitialised: it writes every one of them.
pub(crate) fn int8_linear_uninit(
    x: ArrayView2<f32>,
    w: &Int8Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<MaybeUninit<f32>>,
) {
    assert_eq!(x.ncols(), w.inputs, "inputs agree");
    assert_eq!(y.dim(), (x.nrows(), w.out), "output is [rows, out]");
    assert!(w.inputs <= MAX_INPUTS, "at most {MAX_INPUTS} inputs");
    if let Some(b) = bias {
        assert_eq!(b.len(), w.out, "bias is [out]");
    }
    if y.is_empty() {
        return;
    }
    let bias = bias.as_ref().map(|b| b.as_standard_layout());
    let bias = bias
        .as_ref()
        .map(|b| b.as_slice().expect("standard layout"));
    let groups = w.groups();
    let width = groups * w.layout.group();
    let rows = match w.layout {
        Layout::Pairs => Rows::Pairs(quantize_rows(x, width, 1), Kernel::detect()),
        Layout::Quads => {
            let tiles = amx_tiles(x.nrows());
            let pad = if tiles.is_some() { AMX_ROWS } else { 1 };
            Rows::Quads(quantize_rows(x, width, pad), tiles)
        }
    };
    let mut units = Vec::new();
    for (chunk, y_rows) in y.axis_chunks_iter_mut(Axis(0), CHUNK_ROWS).enumerate() {
        let mut rest = y_rows;
        let mut col0 = 0;
        while rest.ncols() > 0 {
            let width = UNIT_COLS.min(rest.ncols());
            let (block, tail) = rest.split_at(Axis(1), width);
            units.push((chunk * CHUNK_ROWS, col0, block));
            col0 += UNIT_COLS;
            rest = tail;
        }
    }
    let run = |(row0, col0, mut y_block): (usize, usize, ArrayViewMut2<MaybeUninit<f32>>)| {
        let (rows_here, cols) = y_block.dim();
        let (sw, bias) = (
            &w.scales[col0..col0 + cols],
            bias.map(|b| &b[col0..col0 + cols]),
        );
        if let Rows::Quads(xq, tiles) = &rows {
            if tiles.is_none() || rows_here < AMX_ROWS {
                let unit = Unit {
                    row0,
                    rows: rows_here,
                    col0,
                    cols,
                    sw,
                    bias,
                };
                return vnni_unit(xq, w, &unit, epilogue, y_block);
            }
        }
        // The unit's sums, `[rows, cols]`, dequantized into `y` row by row at the end.
        // (Every unit writes all of it before reading it, so the buffer is not zeroed.)
        with_unit_buffer(rows_here * cols, |unit| {
            match &rows {
                Rows::Pairs(xq, kernel) => {
                    pairs_unit(xq, *kernel, w, row0, rows_here, col0, cols, unit)
                }
                Rows::Quads(xq, tiles) => {
                    let tiles = tiles.expect("units of the VNNI tiles return above");
                    amx_unit(xq, tiles, w, row0, rows_here, col0, cols, unit)
                }
            }
            // Finished in the unit's buffer (in L1), then copied out.
            for (out, sums) in y_block.rows_mut().into_iter().zip(unit.chunks_mut(cols)) {
                dequantize_in_place(sums, sw, bias);
                super::activation::activate(sums, epilogue);
                write_row(out, sums);
            }
        })
    };
    if units.len() > 1 && x.nrows() * w.inputs * w.out >= 1 << 18 {
        units.into_par_iter().for_each(run);
    } else {
        units.into_iter().for_each(run);
    }
}

/// The quantized input of a product, in the form its weight's layout reads.
enum Rows {
    /// Levels as i16 `u − zero`, for the AVX2 or scalar kernel.
    Pairs(QuantizedRows<i16>, Kernel),
    /// Levels as u8 `u`, for the VNNI kernel, and the AMX tiles where the product takes them.
    Quads(QuantizedRows<u8>, Option<Tiles>),
}

/// The AMX tiles, for the VNNI layout's products of at least [`AMX_ROWS`] rows, where the CPU
/// has AMX-INT8 (a proof of nothing elsewhere).
#[cfg(target_arch = "x86_64")]
type Tiles = super::int8_amx::Tiles;
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
enum Tiles {}

/// Rows from which a unit of a VNNI-layout product runs on the AMX tiles: one tile of levels.
/// Fewer rows (a decoding step of a few sentences) stream the weight through the registers.
pub(super) const AMX_ROWS: usize = 16;

/// The tiles for a product of `rows` rows, where they are available and it has enough rows.
fn amx_tiles(rows: usize) -> Option<Tiles> {
    #[cfg(target_arch = "x86_64")]
    if rows >= AMX_ROWS {
        return Tiles::try_new();
    }
    let _ = rows;
    None
}

/// The register tiles of one unit of `rows × cols` sums, into `unit: [rows, cols]`: strips of
/// `W` columns, [`tile_shape`] strips and [`tile_rows`] rows at a time. `tiles(r, strips,
/// out)` computes the tile of unit rows `r..r + out.len()` × unit strips `strips`.
fn unit_tiles<const W: usize>(
    rows: usize,
    cols: usize,
    unit: &mut [f32],
    mut tiles: impl FnMut(usize, Range<usize>, &mut [[[f32; W]; TILE_STRIPS]]),
) {
    let mut tile = [[[0.0f32; W]; TILE_STRIPS]; TILE_ROWS];
    let strips = cols.div_ceil(W);
    let (most_strips, most_rows) = tile_shape(rows);
    let mut s = 0;
    while s < strips {
        let take_strips = (strips - s).min(most_strips);
        let (c0, width) = (s * W, (cols - s * W).min(take_strips * W));
        let mut r = 0;
        while r < rows {
            let take = tile_rows(rows - r, most_rows);
            tiles(r, s..s + take_strips, &mut tile[..take]);
            for (i, tile) in tile[..take].iter().enumerate() {
                unit[(r + i) * cols + c0..][..width].copy_from_slice(&tile.as_flattened()[..width]);
            }
            r += take;
        }
        s += take_strips;
    }
}

/// A fixed-size array on the stack of the `strips` (at most [`TILE_STRIPS`]) of `len` values
/// from strip `strip0` of `values`; a lone last strip fills both slots, and only the first
/// `strips.len()` are passed on.
fn strip_slices<'a, T>(
    values: &'a [T],
    len: usize,
    strip0: usize,
    strips: &Range<usize>,
) -> [&'a [T]; TILE_STRIPS] {
    std::array::from_fn(|i| {
        let strip = strip0 + strips.start + i.min(strips.len() - 1);
        &values[strip * len..][..len]
    })
}

/// The sums of one unit, rows `row0..row0 + rows` × columns `col0..col0 + cols` of a
/// [`Layout::Pairs`] weight, into `unit: [rows, cols]`.
#[allow(clippy::too_many_arguments)]
fn pairs_unit(
    xq: &QuantizedRows<i16>,
    kernel: Kernel,
    w: &Int8Weight,
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    unit: &mut [f32],
) {
    let groups = w.groups();
    let strip_len = groups * STRIP * GROUP;
    unit_tiles::<STRIP>(rows, cols, unit, |r, strips, tile| {
        let weights = strip_slices(&w.packed, strip_len, col0 / STRIP, &strips);
        kernel.tiles(xq, row0 + r, &weights[..strips.len()], groups, tile);
    });
}

/// [`pairs_unit`] for a [`Layout::Quads`] weight on the AMX tiles (a unit of at least
/// [`AMX_ROWS`] rows where the CPU has them).
#[allow(clippy::too_many_arguments)]
fn amx_unit(
    xq: &QuantizedRows<u8>,
    tiles: Tiles,
    w: &Int8Weight,
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    unit: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let quads = w.groups();
        let (strip_len, sums_len) = (quads * WIDE_STRIP * QUAD, w.sums_len());
        let (blocks, first) = (xq.blocks, col0 / WIDE_STRIP);
        let operands = super::int8_amx::Unit {
            levels: &xq.q[row0 * xq.width..],
            width: xq.width,
            scales: &xq.scales[row0 * blocks..],
            zeros: &xq.zeros[row0 * blocks..],
            strips: &w.packed[first * strip_len..],
            strip_len,
            sums: &w.sums[first * sums_len..],
            sums_len,
            rows,
            cols,
        };
        super::int8_amx::unit_sums(tiles, &operands, unit);
    }
    #[cfg(not(target_arch = "x86_64"))]
    match tiles {}
}

/// One unit of work of a product: output rows `row0..row0 + rows` × columns `col0..col0 +
/// cols`, with the weight's scales and the bias of those columns.
struct Unit<'a> {
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    sw: &'a [f32],
    bias: Option<&'a [f32]>,
}

/// One unit of a [`Layout::Quads`] product on the VNNI register tiles (8 rows × 1 strip of 16
/// columns for products of up to 8 rows, 6 rows × 2 strips for taller ones), dequantized in
/// the registers and stored straight into `y: [rows, cols]`, then activated in place. A `y`
/// whose columns are not contiguous gets its rows through the unit's buffer.
fn vnni_unit(
    xq: &QuantizedRows<u8>,
    w: &Int8Weight,
    unit: &Unit,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<MaybeUninit<f32>>,
) {
    let (rows, cols) = (unit.rows, unit.cols);
    let activate = |row: &mut [f32]| super::activation::activate(row, epilogue);
    if y.strides()[1] == 1 && y.strides()[0] >= 0 {
        let stride = y.strides()[0] as usize;
        let dest = Dest {
            ptr: y.as_mut_ptr().cast(),
            stride,
        };
        // SAFETY: `y` holds `rows` rows of `cols` contiguous f32s `stride` apart, borrowed
        // mutably for the call.
        unsafe { vnni_tiles_into(xq, w, unit, dest) };
        if epilogue != Epilogue::Bias {
            for r in 0..rows {
                // SAFETY: row `r` of `y`, every value of which the tiles have just written.
                activate(unsafe { std::slice::from_raw_parts_mut(dest.ptr.add(r * stride), cols) });
            }
        }
        return;
    }
    with_unit_buffer(rows * cols, |buffer| {
        let dest = Dest {
            ptr: buffer.as_mut_ptr(),
            stride: cols,
        };
        // SAFETY: the buffer holds `rows × cols` f32s, borrowed mutably for the call.
        unsafe { vnni_tiles_into(xq, w, unit, dest) };
        for (out, values) in y.rows_mut().into_iter().zip(buffer.chunks_mut(cols)) {
            activate(values);
            write_row(out, values);
        }
    })
}

/// Where a register tile stores its dequantized rows: row `r` at `ptr + r · stride`.
#[derive(Clone, Copy)]
struct Dest {
    ptr: *mut f32,
    stride: usize,
}

impl Dest {
    /// The destination of the tile from row `r`, column `c` on.
    fn at(self, r: usize, c: usize) -> Dest {
        Dest {
            ptr: self.ptr.wrapping_add(r * self.stride + c),
            stride: self.stride,
        }
    }
}

/// The VNNI tiles of one unit, dequantized (`sum · sw + b`) into `dest`: strips of 16
/// columns, [`tile_shape`] strips and [`tile_rows`] rows at a time.
///
/// # Safety
/// `dest` must be valid for writes of `unit.rows` rows of `unit.cols` f32s.
unsafe fn vnni_tiles_into(xq: &QuantizedRows<u8>, w: &Int8Weight, unit: &Unit, dest: Dest) {
    let quads = w.groups();
    let (strip_len, sums_len) = (quads * WIDE_STRIP * QUAD, w.sums_len());
    let (rows, cols, first) = (unit.rows, unit.cols, unit.col0 / WIDE_STRIP);
    let strips = cols.div_ceil(WIDE_STRIP);
    let (most_strips, most_rows) = tile_shape(rows);
    // The values of strip `s` of the unit in a per-column slice of it.
    fn columns(v: &[f32], s: usize) -> &[f32] {
        &v[s * WIDE_STRIP..v.len().min((s + 1) * WIDE_STRIP)]
    }
    let mut s = 0;
    while s < strips {
        let n = (strips - s).min(most_strips);
        let taken = s..s + n;
        let weights = strip_slices(&w.packed, strip_len, first, &taken);
        let sums = strip_slices(&w.sums, sums_len, first, &taken);
        let last = |i: usize| s + i.min(n - 1);
        let sw: [&[f32]; TILE_STRIPS] = std::array::from_fn(|i| columns(unit.sw, last(i)));
        let bias = unit
            .bias
            .map(|b| -> [&[f32]; TILE_STRIPS] { std::array::from_fn(|i| columns(b, last(i))) });
        let mut r = 0;
        while r < rows {
            let take = tile_rows(rows - r, most_rows);
            let tile = Tile {
                first: unit.row0 + r,
                rows: take,
                strips: &weights[..n],
                sums: &sums[..n],
                sw: &sw[..n],
                bias: bias.as_ref().map(|b| &b[..n]),
            };
            // SAFETY: rows `r..r + take`, columns from `16 s` of the unit lie within `dest`.
            unsafe { vnni_tile(xq, &tile, quads, dest.at(r, s * WIDE_STRIP)) };
            r += take;
        }
        s += n;
    }
}

/// One VNNI register tile's operands: quantized rows `first..first + rows`, up to
/// [`TILE_STRIPS`] strips of the weight with their block column sums, and the strips' weight
/// scales and bias (16 columns a strip, fewer in the last one).
struct Tile<'a> {
    first: usize,
    rows: usize,
    strips: &'a [&'a [i8]],
    sums: &'a [&'a [i16]],
    sw: &'a [&'a [f32]],
    bias: Option<&'a [&'a [f32]]>,
}

/// One VNNI register tile ([`Tile`]), dequantized into `dest`: 8, 6, 4, 2 or 1 rows × 1
/// strip, or 6, 4, 2 or 1 rows × 2 strips.
///
/// # Safety
/// `dest` must be valid for writes of `tile.rows` rows of the strips' columns.
unsafe fn vnni_tile(xq: &QuantizedRows<u8>, tile: &Tile, quads: usize, dest: Dest) {
    /// # Safety
    /// As [`vnni_tile`], with `R` rows and `S` strips.
    unsafe fn one<const R: usize, const S: usize>(
        xq: &QuantizedRows<u8>,
        tile: &Tile,
        quads: usize,
        dest: Dest,
    ) {
        let first = tile.first;
        let rows: [&[u8]; R] = std::array::from_fn(|i| xq.row(first + i));
        let zeros: [&[i32]; R] = std::array::from_fn(|i| xq.zeros(first + i));
        let scales: [&[f32]; R] = std::array::from_fn(|i| xq.scales(first + i));
        let strips: [&[i8]; S] = std::array::from_fn(|i| tile.strips[i]);
        let sums: [&[i16]; S] = std::array::from_fn(|i| tile.sums[i]);
        let sw: [&[f32]; S] = std::array::from_fn(|i| tile.sw[i]);
        let bias: Option<[&[f32]; S]> = tile.bias.map(|b| std::array::from_fn(|i| b[i]));
        let blocks = quads.div_ceil(QUAD_BLOCK);
        assert!(
            vnni(),
            "the VNNI layout is packed only where the CPU has VNNI"
        );
        assert!(strips.iter().all(|s| s.len() >= quads * WIDE_STRIP * QUAD));
        assert!(sums
            .iter()
            .all(|s| s.len() >= blocks.div_ceil(2) * WIDE_STRIP * 2));
        assert!(rows.iter().all(|r| r.len() >= quads * QUAD));
        assert!(scales.iter().all(|s| s.len() >= blocks));
        assert!(zeros.iter().all(|z| z.len() >= blocks));
        assert!(sw.iter().all(|c| (1..=WIDE_STRIP).contains(&c.len())));
        assert!(bias.is_none_or(|b| b.iter().zip(&sw).all(|(b, c)| b.len() == c.len())));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F, BW and VNNI, the lengths are checked above and
        // `dest` is valid for the tile's rows (the caller's promise).
        unsafe {
            tile_vnni::<R, S>(rows, zeros, scales, strips, sums, quads, (sw, bias), dest)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{:?}", dest.ptr);
    }
    macro_rules! dispatch {
        ($(($r:literal, $s:literal)),*) => {
            match (tile.rows, tile.strips.len()) {
                // SAFETY: the caller's promise.
                $(($r, $s) => unsafe { one::<$r, $s>(xq, tile, quads, dest) },)*
                (r, s) => unreachable!("no tile of {r} rows × {s} strips"),
            }
        };
    }
    tile_shapes!(dispatch);
}

/// The scales and the bias of a VNNI tile's strips: 16 columns each, fewer in the last one.
type StripFactors<'a, const S: usize> = ([&'a [f32]; S], Option<[&'a [f32]; S]>);

/// The VNNI register tile: `R` rows × `S` strips of 16 columns. Per group of 4 inputs, each
/// strip's 64 weights are loaded once and each row's 4 u8 levels broadcast once, and
/// `vpdpbusd` adds the 4 products of each column into its i32 lane. At the end of a block,
/// `vpdpwssd` adds `−zero · Σ w` (the zero point times the block's column sums), which makes
/// each lane the exact sum `Σ (u − zero) · w` the other paths compute; it is then converted
/// and added, times the block's scale, to the row's f32 sums in one fused multiply-add, as on
/// the other paths. The sums leave the registers dequantized, `sum · sw + b` (a product, then
/// a sum, as [`dequantize_in_place`] rounds them), stored under a mask in the last strip.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; each row must hold at least `quads · 4` levels,
/// each scale and zero row one value a block of 8 groups, each strip `quads · 64` values,
/// each sums slice 32 values a pair of blocks, and each strip's scales (and bias) 1 to 16
/// values; `dest` must be valid for writes of `R` rows of the strips' columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_vnni<const R: usize, const S: usize>(
    rows: [&[u8]; R],
    zeros: [&[i32]; R],
    scales: [&[f32]; R],
    strips: [&[i8]; S],
    sums: [&[i16]; S],
    quads: usize,
    (sw, bias): StripFactors<S>,
    dest: Dest,
) {
    use std::arch::x86_64::*;
    let mut total = [[_mm512_setzero_ps(); S]; R];
    for (b, start) in (0..quads).step_by(QUAD_BLOCK).enumerate() {
        let mut acc = [[_mm512_setzero_si512(); S]; R];
        for g in start..(start + QUAD_BLOCK).min(quads) {
            // SAFETY: group `g` of a strip is 64 bytes from `strip + 64 g`, within it.
            let wg: [__m512i; S] = std::array::from_fn(|s| unsafe {
                _mm512_loadu_si512(strips[s].as_ptr().add(g * WIDE_STRIP * QUAD).cast())
            });
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                // SAFETY: the row's group `g` is four u8s from `row + 4 g`, within the row.
                let x = unsafe { row.as_ptr().add(g * QUAD).cast::<i32>().read_unaligned() };
                let x = _mm512_set1_epi32(x);
                for (acc, &wg) in acc.iter_mut().zip(&wg) {
                    *acc = _mm512_dpbusd_epi32(*acc, x, wg);
                }
            }
        }
        // SAFETY: the block pair's column sums are 32 i16s from `sums + 32 (b / 2)`.
        let cs: [__m512i; S] = std::array::from_fn(|s| unsafe {
            _mm512_loadu_si512(sums[s].as_ptr().add(b / 2 * WIDE_STRIP * 2).cast())
        });
        for r in 0..R {
            let zero = _mm512_set1_epi32(zeros[r][b]);
            let scale = _mm512_set1_ps(scales[r][b]);
            for s in 0..S {
                let exact = _mm512_dpwssd_epi32(acc[r][s], zero, cs[s]);
                total[r][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, total[r][s]);
            }
        }
    }
    for s in 0..S {
        let mask = (u32::MAX >> (32 - sw[s].len())) as __mmask16;
        // SAFETY: the masked loads read the strip's 1 to 16 scales and biases only.
        let (scale, b) = unsafe {
            let b = bias.map(|b| _mm512_maskz_loadu_ps(mask, b[s].as_ptr()));
            (_mm512_maskz_loadu_ps(mask, sw[s].as_ptr()), b)
        };
        for (r, total) in total.iter().enumerate() {
            let v = _mm512_mul_ps(total[s], scale);
            let v = b.map_or(v, |b| _mm512_add_ps(v, b));
            // SAFETY: row `r`'s columns of strip `s` lie within `dest` (the caller's promise).
            unsafe { _mm512_mask_storeu_ps(dest.at(r, s * WIDE_STRIP).ptr, mask, v) };
        }
    }
}

/// The tile shape for a unit of `rows` rows: the strips a tile covers and the rows the
/// largest one takes.
///
/// Up to 8 rows (a decoding step, bound by reading the weights) take tiles of one strip and all
/// the rows, so that each weight is read and widened once; taller units (bound by the
/// products) take 6 × 2-strip tiles, where each broadcast input feeds two products.
fn tile_shape(rows: usize) -> (usize, usize) {
    if rows <= TILE_ROWS {
        (1, TILE_ROWS)
    } else {
        (TILE_STRIPS, WIDE_ROWS)
    }
}

/// The rows the next tile takes when `rows` remain and tiles take at most `most` (8 or 6):
/// the most, then 4, 2 and 1 for the last ones, so that no tile computes a row twice.
fn tile_rows(rows: usize, most: usize) -> usize {
    match rows {
        r if r >= most => most,
        4.. => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// Writes `values` into `out` (of the same length), whose values may be uninitialised.
#[inline(always)]
fn write_row(mut out: ndarray::ArrayViewMut1<MaybeUninit<f32>>, values: &[f32]) {
    assert_eq!(out.len(), values.len());
    match out.as_slice_mut() {
        Some(out) => {
            // SAFETY: `out` holds `values.len()` elements with the layout of `f32`, and does
            // not overlap `values` (the unit's buffer).
            unsafe {
                std::ptr::copy_nonoverlapping(values.as_ptr(), out.as_mut_ptr().cast(), out.len())
            }
        }
        None => out.iter_mut().zip(values).for_each(|(o, &v)| {
            o.write(v);
        }),
    }
}

/// `sums[c] = sums[c] · sw[c] + b[c]`, in place: the last f32 roundings, the same on every
/// path.
#[inline(always)]
fn dequantize_in_place(sums: &mut [f32], sw: &[f32], bias: Option<&[f32]>) {
    match bias {
        Some(b) => {
            for ((s, &w), &b) in sums.iter_mut().zip(sw).zip(b) {
                *s = *s * w + b;
            }
        }
        None => {
            for (s, &w) in sums.iter_mut().zip(sw) {
                *s *= w;
            }
        }
    }
}

/// The register-tile kernels this CPU can run.
#[derive(Clone, Copy)]
enum Kernel {
    /// AVX2: i16 pairs multiplied and added into i32 (`vpmaddwd`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain loops (the scalar reference).
    Plain,
}

/// The sums of one register tile: `Σ_b S_b · sx_b` for `R` rows × `S` strips of 8 columns,
/// `S_b` a block's exact integer sum and `sx_b` the row's scale for that block, added block by
/// block in order.
type TileSums<const R: usize, const S: usize> = [[[f32; STRIP]; S]; R];

/// One tile's output as the product loop keeps it: up to [`TILE_STRIPS`] strips a row.
type TileOut = [[f32; STRIP]; TILE_STRIPS];

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Plain
    }

    /// The sums of rows `first..first + out.len()` × `strips`: 8, 6, 4, 2 or 1 rows × 1 strip,
    /// or 6, 4, 2 or 1 rows × 2 strips; into the first `strips.len()` strips of each row of
    /// `out`.
    fn tiles(
        self,
        xq: &QuantizedRows<i16>,
        first: usize,
        strips: &[&[i8]],
        groups: usize,
        out: &mut [TileOut],
    ) {
        fn put<const R: usize, const S: usize>(sums: TileSums<R, S>, out: &mut [TileOut]) {
            for (out, sums) in out.iter_mut().zip(sums) {
                out[..S].copy_from_slice(&sums);
            }
        }
        macro_rules! dispatch {
            ($(($r:literal, $s:literal)),*) => {
                match (out.len(), strips.len()) {
                    $(($r, $s) => put(
                        self.tile::<$r, $s>(xq, first, std::array::from_fn(|i| strips[i]), groups),
                        out,
                    ),)*
                    (r, s) => unreachable!("no tile of {r} rows × {s} strips"),
                }
            };
        }
        tile_shapes!(dispatch);
    }

    /// The sums of rows `first..first + R` × `S` strips of 8 columns over all `groups` groups
    /// of inputs.
    fn tile<const R: usize, const S: usize>(
        self,
        xq: &QuantizedRows<i16>,
        first: usize,
        strips: [&[i8]; S],
        groups: usize,
    ) -> TileSums<R, S> {
        let rows: [&[i16]; R] = std::array::from_fn(|i| xq.row(first + i));
        let scales: [&[f32]; R] = std::array::from_fn(|i| xq.scales(first + i));
        assert!(strips.iter().all(|s| s.len() >= groups * STRIP * GROUP));
        assert!(rows.iter().all(|r| r.len() >= groups * GROUP));
        assert!(scales
            .iter()
            .all(|s| s.len() >= groups.div_ceil(BLOCK_GROUPS)));
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (checked by `detect`) and the lengths are checked above.
            Kernel::Avx2 => unsafe { tile_avx2(rows, scales, strips, groups) },
            Kernel::Plain => {
                let each: [TileSums<R, 1>; S] =
                    std::array::from_fn(|s| tile_plain(rows, scales, strips[s], groups));
                std::array::from_fn(|r| std::array::from_fn(|s| each[s][r][0]))
            }
        }
    }
}

/// The reference, one strip: each block's sum in plain integer arithmetic, then scaled and
/// added.
fn tile_plain<const R: usize>(
    rows: [&[i16]; R],
    scales: [&[f32]; R],
    strip: &[i8],
    groups: usize,
) -> TileSums<R, 1> {
    let mut sums = [[[0.0f32; STRIP]; 1]; R];
    for (b, start) in (0..groups).step_by(BLOCK_GROUPS).enumerate() {
        for r in 0..R {
            for (c, sum) in sums[r][0].iter_mut().enumerate() {
                let mut block = 0i32;
                for g in start..(start + BLOCK_GROUPS).min(groups) {
                    let w = &strip[(g * STRIP + c) * GROUP..][..GROUP];
                    let x = &rows[r][g * GROUP..][..GROUP];
                    block += (0..GROUP)
                        .map(|j| i32::from(x[j]) * i32::from(w[j]))
                        .sum::<i32>();
                }
                *sum = (block as f32).mul_add(scales[r][b], *sum);
            }
        }
    }
    sums
}

/// [`tile_plain`] on AVX2 for `S` strips at once: per group, each strip's 16 weights widened
/// once to i16 (8 columns × 2 inputs), each row's two inputs broadcast once for all strips,
/// and `vpmaddwd` adding the pair of products of each column into its i32 lane; at the end of
/// a block each row's lanes are converted and added, times the block's scale, to its f32 sums
/// (one fused multiply-add, as on every path).
///
/// Tall products take two strips a tile (6 × 16) rather than one (8 × 8): each broadcast
/// then feeds two products, and on Zen 3 (AVX2) a 1024 × 512 → 2048 product went from 20.8
/// to 18.3 ms (2 threads; `cargo bench --bench forward -- linear_1024x512_to_2048_int8`).
///
/// # Safety
/// The CPU must have AVX2 and FMA; each row must hold at least `groups · 2` values, each
/// scale row `groups / 16` (rounded up) and each strip `groups · 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const S: usize>(
    rows: [&[i16]; R],
    scales: [&[f32]; R],
    strips: [&[i8]; S],
    groups: usize,
) -> TileSums<R, S> {
    use std::arch::x86_64::*;
    let mut sums = [[_mm256_setzero_ps(); S]; R];
    for (b, start) in (0..groups).step_by(BLOCK_GROUPS).enumerate() {
        let mut acc = [[_mm256_setzero_si256(); S]; R];
        for g in start..(start + BLOCK_GROUPS).min(groups) {
            let mut wg = [_mm256_setzero_si256(); S];
            for (wg, strip) in wg.iter_mut().zip(strips) {
                // SAFETY: group `g` of a strip is 16 bytes from `strip + 16 g`, within it.
                *wg = unsafe {
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(
                        strip.as_ptr().add(g * STRIP * GROUP).cast(),
                    ))
                };
            }
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                // SAFETY: the row's group `g` is two i16s from `row + 2 g`, within the row.
                let x = unsafe { row.as_ptr().add(g * GROUP).cast::<i32>().read_unaligned() };
                let x = _mm256_set1_epi32(x);
                for (acc, &wg) in acc.iter_mut().zip(&wg) {
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(x, wg));
                }
            }
        }
        for r in 0..R {
            let scale = _mm256_set1_ps(scales[r][b]);
            for s in 0..S {
                sums[r][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][s]), scale, sums[r][s]);
            }
        }
    }
    let mut out = [[[0.0f32; STRIP]; S]; R];
    for (sums, out) in sums.iter().zip(out.iter_mut()) {
        for (sums, out) in sums.iter().zip(out.iter_mut()) {
            // SAFETY: `out` is 8 f32s.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *sums) };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testing::values_with_outliers;
    use super::*;
    use ndarray::Array1;

    /// A `[rows, cols]` matrix of varied values with a few large ones.
    fn values(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        values_with_outliers(rows, cols, seed, 48.0)
    }

    /// The product by definition, from the unpacked int8 values.
    fn reference(x: ArrayView2<f32>, w: &Int8Weight, bias: Option<&[f32]>) -> Array2<f32> {
        let q = w.values();
        let xq = quantize_rows::<i16>(x, w.inputs, 1);
        let mut y = Array2::zeros((x.nrows(), w.out));
        for r in 0..x.nrows() {
            let sums: Vec<f32> = (0..w.out)
                .map(|o| {
                    let mut sum = 0.0f32;
                    for (b, start) in (0..w.inputs).step_by(BLOCK).enumerate() {
                        let block: i32 = (start..(start + BLOCK).min(w.inputs))
                            .map(|i| i32::from(xq.row(r)[i]) * i32::from(q[[o, i]]))
                            .sum();
                        sum = (block as f32).mul_add(xq.scales(r)[b], sum);
                    }
                    sum
                })
                .collect();
            let mut out = sums;
            dequantize_in_place(&mut out, w.scales(), bias);
            y.row_mut(r).assign(&Array1::from(out));
        }
        y
    }

    /// The layouts this CPU's kernels read: pairs always, quads where it has VNNI.
    fn layouts() -> Vec<Layout> {
        let mut layouts = vec![Layout::Pairs];
        if vnni() {
            layouts.push(Layout::Quads);
        }
        layouts
    }

    /// `quantize_block_avx512` against `quantize_block` for levels of type `T`, on blocks of
    /// every length with one-sided, symmetric, all-zero, tied and non-finite values.
    #[cfg(target_arch = "x86_64")]
    fn avx512_blocks_match<T: Level + PartialEq + std::fmt::Debug>() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e30,
            -1e-30,
        ];
        for len in 1..=BLOCK {
            for case in 0..12usize {
                let mut x: Vec<f32> = (0..len)
                    .map(|i| {
                        let v = ((i * 37 + case * 11) % 23) as f32 - 9.0;
                        match case % 4 {
                            0 => v * 0.173,
                            1 => v.abs() * 0.5,
                            2 => -v.abs() * 2.5,
                            // Multiples of 1/2 meet the grid's ties.
                            _ => (v * 0.5).round() / 2.0 + 0.25,
                        }
                    })
                    .collect();
                if case >= 8 {
                    x[(case * 7) % len] = specials[case - 8 + len % 3];
                }
                if case == 4 {
                    x.fill(0.0);
                }
                let (mut plain, mut fast) = (vec![T::default(); len], vec![T::default(); len]);
                let expected = quantize_block(&x, &mut plain);
                // SAFETY: checked that the CPU has AVX-512 F and BW; len ≤ 32.
                let got = unsafe { quantize_block_avx512(&x, &mut fast) };
                assert_eq!(fast, plain, "levels of {x:?}");
                assert_eq!(got.0.to_bits(), expected.0.to_bits(), "scale of {x:?}");
                assert_eq!(got.1, expected.1, "zero point of {x:?}");
            }
        }
    }

    #[test]
    fn avx512_activation_quantizer_equals_the_plain_one_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if avx512bw() {
            avx512_blocks_match::<i16>();
            avx512_blocks_match::<u8>();
        }
    }

    #[test]
    fn reversed_and_transposed_outputs_get_the_same_values() {
        let (x, w) = (values(19, 40, 5), values(33, 40, 6));
        let w = Int8Weight::quantize(w.view()).unwrap();
        let mut plain = Array2::zeros((19, 33));
        int8_linear(x.view(), &w, None, Epilogue::Bias, plain.view_mut());
        let mut reversed = Array2::zeros((19, 33));
        let mut view = reversed.view_mut();
        view.invert_axis(Axis(1));
        int8_linear(x.view(), &w, None, Epilogue::Bias, view);
        reversed.invert_axis(Axis(1));
        assert_eq!(reversed, plain);
        let mut transposed = Array2::zeros((33, 19));
        int8_linear(
            x.view(),
            &w,
            None,
            Epilogue::Bias,
            transposed.view_mut().reversed_axes(),
        );
        assert_eq!(transposed.t(), plain);
    }

    #[test]
    fn an_activation_applied_with_the_sums_equals_one_applied_afterwards() {
        let (x, w) = (values(37, 70, 3), values(150, 70, 4));
        let w = Int8Weight::quantize(w.view()).unwrap();
        let bias: Vec<f32> = (0..150).map(|o| o as f32 * 0.02 - 1.0).collect();
        let bias = Some(ArrayView1::from(&bias[..]));
        let mut plain = Array2::zeros((37, 150));
        int8_linear(x.view(), &w, bias, Epilogue::Bias, plain.view_mut());
        for epilogue in [Epilogue::BiasRelu, Epilogue::BiasGelu, Epilogue::BiasSilu] {
            let mut expected = plain.clone();
            expected.rows_mut().into_iter().for_each(|mut row| {
                super::super::activation::activate(row.as_slice_mut().unwrap(), epilogue)
            });
            let mut fused = Array2::zeros((37, 150));
            int8_linear(x.view(), &w, bias, epilogue, fused.view_mut());
            let bits = |a: &Array2<f32>| a.mapv(f32::to_bits);
            assert_eq!(bits(&fused), bits(&expected), "{epilogue:?}");
            assert_ne!(
                bits(&fused),
                bits(&plain),
                "{epilogue:?} changes some values"
            );
        }
    }

    #[test]
    fn every_path_equals_the_reference_bit_for_bit_on_edge_shapes() {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 7, 9),
            (3, 5, 17),
            (4, 64, 8),
            (5, 33, 130),
            (70, 67, 129),
            (7, 63, 16),
            (8, 512, 40),
            (9, 512, 24),
            (15, 100, 33),
            // 16 rows and more take the AMX tiles where the CPU has them: one tile of rows,
            // a second tile partly filled, a lone 16-row tile after a 32-row block.
            (16, 32, 16),
            (20, 64, 48),
            (40, 96, 80),
            (130, 40, 300),
        ] {
            let x = values(m, k, 1);
            let quantized = Int8Weight::quantize(values(n, k, 2).view()).unwrap();
            let bias: Vec<f32> = (0..n).map(|o| o as f32 * 0.01 - 0.3).collect();
            for b in [None, Some(&bias[..])] {
                let expected = reference(x.view(), &quantized, b);
                for layout in layouts() {
                    let w = Int8Weight::from_parts_in(
                        quantized.values().view(),
                        quantized.scales(),
                        layout,
                    );
                    assert_eq!(w.values(), quantized.values());
                    let mut y = Array2::from_elem((m, n), f32::NAN);
                    int8_linear(
                        x.view(),
                        &w,
                        b.map(ArrayView1::from),
                        Epilogue::Bias,
                        y.view_mut(),
                    );
                    let shape = format!("{m} × {k} × {n}, bias {}", b.is_some());
                    assert_eq!(y, expected, "{layout:?}, {shape}");
                }
                let w = Int8Weight::from_parts_in(
                    quantized.values().view(),
                    quantized.scales(),
                    Layout::Pairs,
                );
                let groups = k.div_ceil(GROUP);
                let xq = quantize_rows(x.view(), groups * GROUP, 1);
                let strip_len = groups * STRIP * GROUP;
                let count = n.div_ceil(STRIP);
                let last: Vec<&[i8]> = (count.saturating_sub(TILE_STRIPS)..count)
                    .map(|s| &w.packed[s * strip_len..][..strip_len])
                    .collect();
                for strips in (1..=last.len()).map(|t| &last[last.len() - t..]) {
                    let most = if strips.len() == 1 {
                        TILE_ROWS
                    } else {
                        WIDE_ROWS
                    };
                    let mut r = 0;
                    while r < m {
                        let take = tile_rows(m - r, most);
                        let mut tile = [[[0.0f32; STRIP]; TILE_STRIPS]; TILE_ROWS];
                        Kernel::detect().tiles(&xq, r, strips, groups, &mut tile[..take]);
                        let mut plain = [[[0.0f32; STRIP]; TILE_STRIPS]; TILE_ROWS];
                        Kernel::Plain.tiles(&xq, r, strips, groups, &mut plain[..take]);
                        let shape = format!("{m} × {k} × {n}, {} strips", strips.len());
                        assert_eq!(tile, plain, "tile of {shape}, rows from {r}");
                        for (i, tile) in tile[..take].iter().enumerate() {
                            for (j, strip) in strips.iter().enumerate() {
                                let (rows, scales) = ([xq.row(r + i)], [xq.scales(r + i)]);
                                let one = tile_plain(rows, scales, strip, groups);
                                assert_eq!(tile[j], one[0][0], "{shape}, row {}", r + i);
                            }
                        }
                        r += take;
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // All inputs and weights at ±127: the largest sums a product can have.
        let k = 1000;
        let x = Array2::from_shape_fn((3, k), |(i, j)| if (i + j) % 2 == 0 { 1.0 } else { -1.0 });
        let w = Array2::from_shape_fn((9, k), |(o, j)| if (o + j) % 2 == 0 { 2.0 } else { -2.0 });
        let q = Int8Weight::quantize(w.view()).unwrap();
        let mut y = Array2::zeros((3, 9));
        for layout in layouts() {
            let w = Int8Weight::from_parts_in(q.values().view(), q.scales(), layout);
            int8_linear(x.view(), &w, None, Epilogue::Bias, y.view_mut());
            assert_eq!(y, reference(x.view(), &w, None), "{layout:?}");
        }
        // Same signs give +k·2, opposite −k·2, exactly (127 · 127 · k fits in an i32).
        for ((r, o), &v) in y.indexed_iter() {
            let want = if (r + o) % 2 == 0 {
                2.0 * k as f32
            } else {
                -2.0 * k as f32
            };
            assert!((v - want).abs() <= want.abs() * 1e-6, "{v} against {want}");
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step_per_value() {
        let w = values(37, 91, 3);
        let q = Int8Weight::quantize(w.view()).unwrap();
        let back = q.dequantize();
        for (o, (row, back)) in w.rows().into_iter().zip(back.rows()).enumerate() {
            let step = q.scales()[o];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(step, max / 127.0);
            for (&v, &b) in row.iter().zip(back) {
                assert!(
                    (v - b).abs() <= 0.5 * step * (1.0 + 1e-5),
                    "row {o}: {v} → {b}"
                );
            }
        }
        assert_eq!(Int8Weight::from_parts(q.values().view(), q.scales()), q);
        // A zero row has scale 0 and gives zeros; a NaN refuses to quantize.
        let zero = Int8Weight::quantize(Array2::zeros((2, 5)).view()).unwrap();
        assert_eq!(zero.scales(), &[0.0, 0.0]);
        let mut bad = w.clone();
        bad[[3, 4]] = f32::NAN;
        assert!(Int8Weight::quantize(bad.view()).is_none());
    }

    #[test]
    fn products_stay_close_to_the_f32_ones_and_nan_inputs_give_nan() {
        let (x, w) = (values(6, 256, 4), values(40, 256, 5));
        let q = Int8Weight::quantize(w.view()).unwrap();
        let mut y = Array2::zeros((6, 40));
        int8_linear(x.view(), &q, None, Epilogue::Bias, y.view_mut());
        let exact = x.dot(&w.t());
        // Each term is off by at most half a step of each operand: a bound per output.
        for ((r, o), &v) in y.indexed_iter() {
            let (sx, sw) = (
                x.row(r).iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0,
                q.scales()[o],
            );
            let bound: f32 = (0..256)
                .map(|i| 0.5 * sx * w[[o, i]].abs() + 0.5 * sw * x[[r, i]].abs() + 0.25 * sx * sw)
                .sum();
            assert!((v - exact[[r, o]]).abs() <= bound * 1.01, "[{r}, {o}]");
        }
        let mut nan = x.clone();
        nan[[2, 7]] = f32::NAN;
        int8_linear(nan.view(), &q, None, Epilogue::Bias, y.view_mut());
        assert!(y.row(2).iter().all(|v| v.is_nan()));
        assert!(y.row(1).iter().all(|v| v.is_finite()));
    }
}
