//! bfloat16 linear layers: weights stored as bf16, products accumulated in f32.
//!
//! A bf16 value is the upper half of an f32 (sign, the 8 exponent bits, 7 of the 23 fraction
//! bits): `W[o, i]` is rounded to the nearest bf16, ties to even, once, when a model is
//! converted, and widened back exactly (the 16 bits shifted into the top of an f32) when a
//! layer runs. Activations stay f32: this CPU family has no bf16 dot product before AVX-512
//! BF16 (`vdpbf16ps`, which takes bf16 on both sides), and rounding the activations as well
//! would add a second error for no speed on AVX2. So `y[r, o] = Σ_i x[r, i] · w̃[o, i] + b[o]`
//! with `w̃` the bf16 weight widened, every term an f32 product of exact operands.
//!
//! The weight keeps the panel layout of f32 weights (`super::panels`), in u16:
//! `[out.div_ceil(128), in, 128]`, each panel contiguous. Two kernels read it:
//!
//! - a few rows (a decoding step, a short sentence; at most [`FEW_ROWS`]): register tiles of
//!   4 rows × 16 columns widen 16 weights at a time (zero-extend, shift left by 16) and add
//!   them into f32 sums with FMA, walking each panel once, front to back, in blocks of
//!   [`BLOCK_K`] inputs that stay in L1 while every tile uses them. Each sum runs over the
//!   inputs in order, one fused multiply-add per term, so the AVX2 kernel, the plain loops and
//!   the scalar reference give the same bits, whatever the tiling and the thread count;
//! - a batch: each panel, widened into an f32 scratch buffer that stays in cache, goes to the
//!   blocked f32 kernel (`gemm`) with its block of up to 512 rows, as an f32 panel does. The
//!   widening costs one pass over the panel per 512 rows.
//!
//! `Linear` holds a [`Bf16Weight`] when its model is converted to bf16 and calls
//! [`bf16_linear`] through [`super::linear`].

use std::cell::RefCell;
use std::sync::Arc;

use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, ShapeBuilder};

use super::gemm::{blocked_product, threads_for_work};
use super::lanes::with_slice;
use super::panels::PANEL;

/// Output columns one register tile covers: 16 widened weights, two AVX2 registers.
const STRIP: usize = 16;
/// Strips across a panel.
const PANEL_STRIPS: usize = PANEL / STRIP;
/// Rows one register tile covers: 4 rows × 16 columns take 8 accumulators.
const TILE_ROWS: usize = 4;
/// Inputs of a panel the few-row kernel takes per visit: 64 × 128 bf16 (16 KiB) stay in L1
/// while every strip and row tile uses them.
const BLOCK_K: usize = 64;
/// Products of at most this many rows take the few-row kernel, which reads the weight once
/// for all rows; more rows take the blocked f32 kernel on widened panels.
pub(crate) const FEW_ROWS: usize = 32;
/// Rows of the input one batch piece takes, as in `super::panels`: 512 rows of 512 inputs
/// stay in a core's L2 from panel to panel.
const PIECE_ROWS: usize = 512;

/// A weight `W: [out, in]` as bf16 values ([`to_bf16`]), in the panel layout of f32 weights:
/// `[out.div_ceil(128), in, 128]`, the last panel padded with zeros. Shared (not copied) when a
/// layer is cloned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bf16Weight {
    panels: Arc<[u16]>,
    out: usize,
    inputs: usize,
}

impl Bf16Weight {
    /// `w: [out, in]` rounded to bf16, to the nearest, ties to even ([`to_bf16`]). A NaN
    /// stays NaN and a value beyond bf16's range becomes ±∞: the callers reject both first
    /// ([`first_out_of_range`]).
    pub(crate) fn from_f32(w: ArrayView2<f32>) -> Self {
        let (out, inputs) = w.dim();
        let mut panels = vec![0u16; out.div_ceil(PANEL) * inputs * PANEL];
        for (o, row) in w.rows().into_iter().enumerate() {
            let base = o / PANEL * inputs * PANEL + o % PANEL;
            for (i, &v) in row.iter().enumerate() {
                panels[base + i * PANEL] = to_bf16(v);
            }
        }
        Bf16Weight {
            panels: panels.into(),
            out,
            inputs,
        }
    }

    /// `out`, the number of outputs.
    pub(crate) fn out_features(&self) -> usize {
        self.out
    }

    /// `in`, the number of inputs.
    pub(crate) fn in_features(&self) -> usize {
        self.inputs
    }

    /// The bf16 values as stored (in panels, with their padding).
    pub(crate) fn stored(&self) -> &[u16] {
        &self.panels
    }

    /// The weight the products use, widened to f32: `[out, in]`.
    pub(crate) fn dequantize(&self) -> Array2<f32> {
        let inputs = self.inputs;
        Array2::from_shape_fn((self.out, inputs), |(o, i)| {
            to_f32(self.panels[(o / PANEL * inputs + i) * PANEL + o % PANEL])
        })
    }

    /// Bytes the weight takes: two a value, with the padding of the last panel.
    pub(crate) fn bytes(&self) -> usize {
        2 * self.panels.len()
    }

    /// Panel `p`, `[in, 128]` in row-major order.
    fn panel(&self, p: usize) -> &[u16] {
        let len = self.inputs * PANEL;
        &self.panels[p * len..][..len]
    }
}

/// `v` rounded to the nearest bf16, ties to even (the rounding of PyTorch's
/// `tensor.to(torch.bfloat16)`): the upper 16 bits of `v` after adding half of the dropped
/// part's range, minus one unless the kept part is odd. A NaN stays a (quiet) NaN of the same
/// sign; a finite value of magnitude at least `0x7F7F8000` (3.39e38) becomes ±∞.
pub(crate) fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        // Truncating could drop every set fraction bit and give ∞: set the quiet bit.
        return ((bits >> 16) | 0x0040) as u16;
    }
    let odd = (bits >> 16) & 1;
    (bits.wrapping_add(0x7FFF + odd) >> 16) as u16
}

/// The f32 a bf16 stands for, exactly: its bits in the upper half.
#[inline(always)]
pub(crate) fn to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The first value of `w: [out, in]` (row-major order) that is finite but rounds to ±∞ in
/// bf16, with its index.
pub(crate) fn first_out_of_range(w: ArrayView2<f32>) -> Option<([usize; 2], f32)> {
    w.indexed_iter()
        .find(|(_, v)| v.is_finite() && !to_f32(to_bf16(**v)).is_finite())
        .map(|((o, i), &v)| ([o, i], v))
}

/// `y = x · W̃ᵀ + bias` for a bf16 weight (`W̃` widened to f32): `x: [rows, in]`, `y: [rows,
/// out]` (any contents, overwritten).
///
/// # Panics
/// If the shapes disagree (the callers check them).
pub(crate) fn bf16_linear(
    x: ArrayView2<f32>,
    w: &Bf16Weight,
    bias: Option<ArrayView1<f32>>,
    y: ArrayViewMut2<f32>,
) {
    assert_eq!(x.ncols(), w.inputs, "inputs agree");
    assert_eq!(y.dim(), (x.nrows(), w.out), "output is [rows, out]");
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
    if x.nrows() <= FEW_ROWS {
        few_rows(x, w, bias, y, Kernel::detect());
    } else {
        batch(x, w, bias, y);
    }
}

/// The few-row kernel ([`FEW_ROWS`] rows at most): threads take contiguous column ranges
/// (whole panels when there are enough), each reads its part of the weight once.
fn few_rows(
    x: ArrayView2<f32>,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    mut y: ArrayViewMut2<f32>,
    kernel: Kernel,
) {
    let (m, k) = x.dim();
    let n = w.out;
    let x = x.as_standard_layout();
    let rows: Vec<&[f32]> = x
        .rows()
        .into_iter()
        .map(|r| r.to_slice().expect("standard layout"))
        .collect();
    let threads = threads_for_work(m * k * n);
    let strips = n.div_ceil(STRIP);
    let mut unit_strips = strips.div_ceil(threads).max(1);
    if unit_strips >= PANEL_STRIPS {
        unit_strips = unit_strips.next_multiple_of(PANEL_STRIPS);
    }
    let width = unit_strips * STRIP;
    let units: Vec<(usize, ArrayViewMut2<f32>)> = y
        .axis_chunks_iter_mut(Axis(1), width)
        .enumerate()
        .map(|(u, block)| (u * width, block))
        .collect();
    let run = |(col0, block): (usize, ArrayViewMut2<f32>)| {
        few_rows_unit(&rows, w, bias, col0, block, kernel)
    };
    if units.len() > 1 {
        units.into_par_iter().for_each(run);
    } else {
        units.into_iter().for_each(run);
    }
}

/// The columns `col0 ..` of `y` (as many as `y` has) for the input rows `rows`: panel by
/// panel, each in blocks of [`BLOCK_K`] inputs, every register tile of the block's strips and
/// rows adding the block's terms to its sums, kept in `acc` between blocks.
fn few_rows_unit(
    rows: &[&[f32]],
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    col0: usize,
    mut y: ArrayViewMut2<f32>,
    kernel: Kernel,
) {
    let (m, k) = (rows.len(), w.inputs);
    let end = col0 + y.ncols();
    let mut acc: Vec<[f32; STRIP]> = Vec::new();
    let mut col = col0;
    while col < end {
        let p = col / PANEL;
        let stop = end.min((p + 1) * PANEL);
        // `col` starts a strip: units are whole strips and panels whole strips too.
        let first = (col - p * PANEL) / STRIP;
        let count = (stop - col).div_ceil(STRIP);
        acc.clear();
        acc.resize(m * count, [0.0; STRIP]);
        let panel = w.panel(p);
        for start in (0..k).step_by(BLOCK_K) {
            let kc = BLOCK_K.min(k - start);
            let block = &panel[start * PANEL..(start + kc) * PANEL];
            for s in 0..count {
                let strip = &block[(first + s) * STRIP..];
                let mut r = 0;
                while r < m {
                    let tile = TileAt {
                        rows,
                        row0: r,
                        start,
                        kc,
                        strip,
                        acc: &mut acc,
                        strips: count,
                        s,
                    };
                    r += match m - r {
                        1 => tile.run::<1>(kernel),
                        2 => tile.run::<2>(kernel),
                        3 => tile.run::<3>(kernel),
                        _ => tile.run::<TILE_ROWS>(kernel),
                    };
                }
            }
        }
        for r in 0..m {
            let out = y.slice_mut(ndarray::s![r, col - col0..stop - col0]);
            let sums = acc[r * count..(r + 1) * count].as_flattened();
            let bias = bias.map(|b| &b[col..stop]);
            with_slice(out, |out| add_bias(&sums[..out.len()], bias, out));
        }
        col = stop;
    }
}

/// `out = sums + bias`: the last rounding, the same on every path.
fn add_bias(sums: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    match bias {
        Some(b) => {
            for ((o, &s), &b) in out.iter_mut().zip(sums).zip(b) {
                *o = s + b;
            }
        }
        None => out.copy_from_slice(sums),
    }
}

/// One register tile of [`few_rows_unit`]: rows `row0 ..` of one strip, inputs `start ..
/// start + kc`.
struct TileAt<'t, 'r> {
    rows: &'t [&'r [f32]],
    row0: usize,
    start: usize,
    kc: usize,
    /// The block's weights from the strip's first column: input `i` at `strip[i · PANEL ..]`.
    strip: &'t [u16],
    acc: &'t mut [[f32; STRIP]],
    strips: usize,
    s: usize,
}

impl TileAt<'_, '_> {
    /// Adds the tile's terms for `R` rows into their sums; returns `R`.
    fn run<const R: usize>(self, kernel: Kernel) -> usize {
        let rows: [&[f32]; R] =
            std::array::from_fn(|i| &self.rows[self.row0 + i][self.start..self.start + self.kc]);
        let index = |i: usize| (self.row0 + i) * self.strips + self.s;
        let mut sums: [[f32; STRIP]; R] = std::array::from_fn(|i| self.acc[index(i)]);
        kernel.tile(rows, self.strip, &mut sums);
        for (i, sums) in sums.iter().enumerate() {
            self.acc[index(i)] = *sums;
        }
        R
    }
}

/// The register-tile kernels this CPU can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX2 and FMA: 16 weights widened per step, fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain loops with `f32::mul_add` (the same roundings as the FMA kernel).
    Plain,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Plain
    }

    /// `sums[r][c] += Σ_i rows[r][i] · w̃[i, c]` over the `kc = rows[0].len()` inputs, in
    /// order, one fused multiply-add per term; input `i` of column `c` is `strip[i · PANEL +
    /// c]`.
    fn tile<const R: usize>(self, rows: [&[f32]; R], strip: &[u16], sums: &mut [[f32; STRIP]; R]) {
        let kc = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == kc), "rows of one length");
        if kc == 0 {
            return;
        }
        assert!(
            strip.len() >= (kc - 1) * PANEL + STRIP,
            "the strip holds kc inputs"
        );
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA are present (checked by `detect`) and the lengths are
            // checked above.
            Kernel::Avx2 => unsafe { tile_avx2(rows, strip, sums) },
            Kernel::Plain => tile_plain(rows, strip, sums),
        }
    }
}

/// The plain loops: each term `x · w̃` fused into its sum, inputs in order.
fn tile_plain<const R: usize>(rows: [&[f32]; R], strip: &[u16], sums: &mut [[f32; STRIP]; R]) {
    for i in 0..rows.first().map_or(0, |r| r.len()) {
        let w = &strip[i * PANEL..][..STRIP];
        for (row, sums) in rows.iter().zip(sums.iter_mut()) {
            let x = row[i];
            for (sum, &w) in sums.iter_mut().zip(w) {
                *sum = x.mul_add(to_f32(w), *sum);
            }
        }
    }
}

/// [`tile_plain`] on AVX2: per input, the strip's 16 bf16 weights zero-extended to 32 bits
/// and shifted left by 16 (exact f32s, two registers), each row's input broadcast, and one
/// `vfmadd231ps` per register of sums.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every row must hold the same number `kc > 0` of values and
/// `strip` at least `(kc − 1) · PANEL + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(
    rows: [&[f32]; R],
    strip: &[u16],
    sums: &mut [[f32; STRIP]; R],
) {
    use std::arch::x86_64::*;
    let kc = rows[0].len();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (acc, sums) in acc.iter_mut().zip(sums.iter()) {
        // SAFETY: each row of sums is 16 f32s.
        unsafe {
            acc[0] = _mm256_loadu_ps(sums.as_ptr());
            acc[1] = _mm256_loadu_ps(sums.as_ptr().add(8));
        }
    }
    let w = strip.as_ptr();
    for i in 0..kc {
        // SAFETY: input `i < kc` of the strip is 16 u16s from `w + i · PANEL`, within `strip`
        // (its length is at least `(kc − 1) · PANEL + 16`).
        let (lo, hi) = unsafe {
            let p = w.add(i * PANEL);
            (
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(8).cast())),
            )
        };
        let lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo));
        let hi = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi));
        for (acc, row) in acc.iter_mut().zip(rows.iter()) {
            // SAFETY: `i < kc`, the length of every row.
            let x = _mm256_set1_ps(unsafe { *row.get_unchecked(i) });
            acc[0] = _mm256_fmadd_ps(x, lo, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, hi, acc[1]);
        }
    }
    for (acc, sums) in acc.iter().zip(sums.iter_mut()) {
        // SAFETY: each row of sums is 16 f32s.
        unsafe {
            _mm256_storeu_ps(sums.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(sums.as_mut_ptr().add(8), acc[1]);
        }
    }
}

thread_local! {
    /// The widened panel of the batch piece a thread is working on.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The batch kernel: one product per panel and per [`PIECE_ROWS`] rows, listed row block by
/// row block and spread over the threads; each widens its panel into the thread's scratch
/// buffer and runs the blocked f32 kernel on it, on one thread. The split depends on the
/// shapes alone, so results do not depend on the thread count.
fn batch(x: ArrayView2<f32>, w: &Bf16Weight, bias: Option<&[f32]>, y: ArrayViewMut2<f32>) {
    let (m, k) = x.dim();
    let mut pieces = Vec::new();
    let (mut x_rest, mut y_rest) = (x, y);
    while x_rest.nrows() > 0 {
        let take = PIECE_ROWS.min(x_rest.nrows());
        let (x_rows, x_tail) = x_rest.split_at(Axis(0), take);
        let (mut y_rows, y_tail) = y_rest.split_at(Axis(0), take);
        (x_rest, y_rest) = (x_tail, y_tail);
        let mut p = 0;
        while y_rows.ncols() > 0 {
            let width = PANEL.min(y_rows.ncols());
            let (block, cols) = y_rows.split_at(Axis(1), width);
            y_rows = cols;
            pieces.push((x_rows, p, block));
            p += 1;
        }
    }
    let run = |(a, p, mut c): (ArrayView2<f32>, usize, ArrayViewMut2<f32>)| {
        let mut product = |scratch: &mut Vec<f32>| {
            // At least one row of values: ndarray rejects an empty slice even for k = 0.
            scratch.resize(k.max(1) * PANEL, 0.0);
            widen(w.panel(p), scratch);
            let panel = ArrayView2::from_shape((k, c.ncols()).strides((PANEL, 1)), &scratch[..])
                .expect("a [k, ≤ 128] matrix at row stride 128 lies in max(k, 1) · 128 values");
            // beta = 0: `c` is only written, whatever it held.
            blocked_product(a, panel, 1.0, 0.0, &mut c, 1);
        };
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut scratch) => product(&mut scratch),
            // Only if a piece ever ran inside another on one thread: a buffer of its own.
            Err(_) => product(&mut Vec::new()),
        });
        let col0 = p * PANEL;
        let bias = bias.map(|b| &b[col0..col0 + c.ncols()]);
        if let Some(b) = bias {
            for row in c.rows_mut() {
                with_slice(row, |row| {
                    for (v, &b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                });
            }
        }
    };
    if threads_for_work(m * k * w.out) > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

/// `dst[j] = w̃[j]`: bf16 values widened to f32 (exact; the compiler vectorises it as
/// zero-extensions and shifts).
#[multiversion::multiversion(targets("x86_64+avx2"))]
fn widen(src: &[u16], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    let (src, dst) = (&src[..len], &mut dst[..len]);
    // Fixed-length chunks, which the compiler turns into whole-register steps.
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (d, s) in d.by_ref().zip(s.by_ref()) {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = to_f32(s);
        }
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = to_f32(s);
    }
}

#[cfg(test)]
mod tests {
    use super::super::panels::{pack_panels, panels_product_biased_into};
    use super::super::testing::{same_sums, values_with_outliers};
    use super::super::Epilogue;
    use super::*;
    use ndarray::Array1;

    /// A `[rows, cols]` matrix of varied values, a few of them large.
    fn values(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        values_with_outliers(rows, cols, seed, 48.3)
    }

    /// The product by definition: for each output, the terms `x · w̃` fused into one sum in
    /// input order, then the bias.
    fn reference(x: ArrayView2<f32>, w: &Bf16Weight, bias: Option<&[f32]>) -> Array2<f32> {
        let wd = w.dequantize();
        Array2::from_shape_fn((x.nrows(), w.out), |(r, o)| {
            let sum = (0..w.inputs).fold(0.0f32, |acc, i| x[[r, i]].mul_add(wd[[o, i]], acc));
            match bias {
                Some(b) => sum + b[o],
                None => sum,
            }
        })
    }

    #[test]
    fn rounding_is_to_the_nearest_bf16_with_ties_to_even() {
        let ulp = 2f32.powi(-7); // of bf16 at 1.0
                                 // Halfway between 1 and 1 + ulp: to 1 (even); between 1 + ulp and 1 + 2 ulp: up (even).
        assert_eq!(to_f32(to_bf16(1.0 + ulp / 2.0)), 1.0);
        assert_eq!(to_f32(to_bf16(1.0 + 1.5 * ulp)), 1.0 + 2.0 * ulp);
        assert_eq!(to_f32(to_bf16(-(1.0 + 1.5 * ulp))), -(1.0 + 2.0 * ulp));
        // Just off the tie goes to the nearer one.
        let above = f32::from_bits((1.0f32 + ulp / 2.0).to_bits() + 1);
        assert_eq!(to_f32(to_bf16(above)), 1.0 + ulp);
        let below = f32::from_bits((1.0f32 + 1.5 * ulp).to_bits() - 1);
        assert_eq!(to_f32(to_bf16(below)), 1.0 + ulp);
        // Exact values, zeros, infinities and subnormals keep their value; NaNs stay NaN, even
        // one whose set fraction bits are all in the dropped half.
        for v in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
        ] {
            let back = to_f32(to_bf16(v));
            assert_eq!(back.to_bits() >> 16, v.to_bits() >> 16, "{v}");
        }
        assert!(to_f32(to_bf16(f32::from_bits(0x7F80_0001))).is_nan());
        assert!(to_f32(to_bf16(-f32::NAN)).is_nan());
        // The largest finite f32 is beyond bf16's range; the largest bf16 is not.
        assert_eq!(to_f32(to_bf16(f32::MAX)), f32::INFINITY);
        assert!(
            first_out_of_range(ndarray::array![[1.0, f32::MAX]].view()) == Some(([0, 1], f32::MAX))
        );
        assert_eq!(
            first_out_of_range(ndarray::array![[f32::from_bits(0x7F7F_7FFF)]].view()),
            None
        );
        // The `half` crate's rounding agrees on a sweep of bit patterns, ties included.
        for bits in (0..=u32::MAX)
            .step_by(65_521)
            .chain((0..4096).map(|i| 0x3F80_8000 + (i << 16)))
        {
            let v = f32::from_bits(bits);
            let ours = to_f32(to_bf16(v));
            let theirs = half::bf16::from_f32(v).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{bits:#x}"
            );
        }
    }

    #[test]
    fn widening_is_exact_and_the_error_at_most_2_to_the_minus_8_relative_per_weight() {
        let w = values(141, 37, 3);
        let q = Bf16Weight::from_f32(w.view());
        let back = q.dequantize();
        for (&v, &b) in w.iter().zip(&back) {
            assert!((v - b).abs() <= v.abs() * 2f32.powi(-8), "{v} → {b}");
            assert_eq!(b, to_f32(to_bf16(v)));
        }
        // bf16 values survive the round trip; the layout and the bytes are those of panels.
        assert_eq!(Bf16Weight::from_f32(back.view()), q);
        assert_eq!(q.bytes(), 2 * 2 * 37 * PANEL);
        let mut wide = vec![0.0; q.stored().len()];
        widen(q.stored(), &mut wide);
        let wide = Array1::from(wide)
            .into_shape_with_order((2, 37, PANEL))
            .unwrap();
        assert_eq!(wide, pack_panels(back.t()));
    }

    #[test]
    fn the_few_row_kernel_equals_the_reference_bit_for_bit_on_edge_shapes() {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 7, 9),
            (2, 1, 300),
            (3, 5, 17),
            (4, 64, 16),
            (5, 65, 130),
            (7, 200, 129),
            (8, 512, 24),
            (32, 67, 257),
            (1, 300, 2100),
            (1, 0, 5),
        ] {
            let x = values(m, k, 1);
            let w = Bf16Weight::from_f32(values(n, k, 2).view());
            let bias: Vec<f32> = (0..n).map(|o| o as f32 * 0.01 - 0.3).collect();
            for b in [None, Some(&bias[..])] {
                let expected = reference(x.view(), &w, b);
                for kernel in [Kernel::detect(), Kernel::Plain] {
                    let mut y = Array2::from_elem((m, n), f32::NAN);
                    few_rows(x.view(), &w, b, y.view_mut(), kernel);
                    assert_eq!(
                        y,
                        expected,
                        "{kernel:?} {m} × {k} × {n}, bias {}",
                        b.is_some()
                    );
                }
                let mut y = Array2::from_elem((m, n), f32::NAN);
                bf16_linear(x.view(), &w, b.map(ArrayView1::from), y.view_mut());
                assert_eq!(y, expected, "{m} × {k} × {n}");
            }
        }
        // The tile itself, AVX2 against the plain loops, from sums that are not zero.
        let x = values(4, 64, 5);
        let w = Bf16Weight::from_f32(values(128, 64, 6).view());
        let rows: [&[f32]; 4] = std::array::from_fn(|r| x.row(r).to_slice().unwrap());
        let start: [[f32; STRIP]; 4] =
            std::array::from_fn(|r| std::array::from_fn(|c| (r * 16 + c) as f32 * 0.37));
        let (mut a, mut b) = (start, start);
        Kernel::detect().tile(rows, &w.panel(0)[STRIP..], &mut a);
        tile_plain(rows, &w.panel(0)[STRIP..], &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn the_batch_kernel_equals_an_f32_panel_product_of_the_widened_weight() {
        for (m, k, n) in [
            (33, 5, 17),
            (600, 40, 300),
            (100, 1, 129),
            (513, 130, 128),
            (40, 0, 3),
        ] {
            let x = values(m, k, 3);
            let w = Bf16Weight::from_f32(values(n, k, 4).view());
            let bias: Vec<f32> = (0..n).map(|o| o as f32 * 0.01 - 0.3).collect();
            let mut y = Array2::from_elem((m, n), f32::NAN);
            bf16_linear(
                x.view(),
                &w,
                Some(ArrayView1::from(&bias[..])),
                y.view_mut(),
            );
            // The same pieces on f32 panels of the widened weight: the same floats where both
            // run on `gemm`'s kernels.
            let panels = pack_panels(w.dequantize().t());
            let mut expected = Array2::from_elem((m, n), f32::NAN);
            panels_product_biased_into(
                x.view(),
                panels.view(),
                n,
                Some(ArrayView1::from(&bias[..])),
                Epilogue::Bias,
                expected.view_mut(),
            );
            same_sums(&y, &expected, k);
            // Against the reference's order: within the rounding bound of two k-term sums,
            // 2 · k · 2⁻²⁴ · Σ|x · w̃| (and the bias's rounding).
            let reference = reference(x.view(), &w, Some(&bias));
            let wd = w.dequantize();
            for ((r, o), &v) in y.indexed_iter() {
                let magnitude: f32 = (0..k).map(|i| (x[[r, i]] * wd[[o, i]]).abs()).sum();
                let bound = 2.0 * k as f32 * 2f32.powi(-24) * magnitude * 1.01
                    + 2f32.powi(-23) * (magnitude + bias[o].abs());
                assert!(
                    (v - reference[[r, o]]).abs() <= bound,
                    "[{r}, {o}] of {m} × {k} × {n}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count_and_nan_inputs_give_nan() {
        let w = Bf16Weight::from_f32(values(700, 300, 7).view());
        for m in [1, 8, 32, 600] {
            let x = values(m, 300, 8);
            let product = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = Array2::zeros((m, 700));
                pool.install(|| bf16_linear(x.view(), &w, None, y.view_mut()));
                y
            };
            assert_eq!(product(1), product(2), "{m} rows");
            assert_eq!(product(1), product(3), "{m} rows");
        }
        for m in [3, 40] {
            let mut x = values(m, 300, 9);
            x[[2, 17]] = f32::NAN;
            let mut y = Array2::zeros((m, 700));
            bf16_linear(x.view(), &w, None, y.view_mut());
            assert!(y.row(2).iter().all(|v| v.is_nan()), "{m} rows");
            assert!(y.row(1).iter().all(|v| v.is_finite()), "{m} rows");
        }
    }
}
