//! Batch products on Intel's AMX tiles (Advanced Matrix Extensions) at f32 precision.
//!
//! AMX multiplies bfloat16 only, whose 8-bit significand would miss the parity tolerance by
//! far. Each f32 is split into three bfloat16 parts, `x = hi + mid + lo` (`hi = bf16(x)`,
//! `mid = bf16(x − hi)`, `lo = bf16(x − hi − mid)`, each difference exact in f32), and a
//! product sums six of the nine part products (all but `mid·lo`, `lo·mid` and `lo·lo`, each
//! below 2⁻²⁶ of `x·y`) into f32 accumulators: f32's accuracy at about twice the rate of the
//! AVX-512 kernels on these cores ("bf16x3", `docs/gemm_backends.md`, AMX tiles).
//!
//! The left operand (a batch's rows) is split once per product; each piece of the panel
//! products ([`super::panels::panel_pieces`]) splits its panel of the weight and runs over the tiles:
//! blocks of 32 × 32 sums in four accumulator tiles, `k` in chunks of 512 values.
//! `NDTRANSFORMER_AMX=0` in the environment turns the path off (the products then run on the
//! AVX-512 kernels of `gemm`; [`crate::cpu`] lists the crate's environment variables). One difference from f32 FMAs: an infinite input gives NaN, not
//! ±∞, since its parts meet zero parts of the other operand (∞ · 0).

use std::arch::asm;

use ndarray::ArrayView2;
use rayon::prelude::*;

/// Rows (and columns of f32 sums) of one tile.
const TILE: usize = 16;
/// Values of `k` one tile product takes: 16 rows of 64 bytes of bfloat16.
const KSTEP: usize = 32;
/// Rows and columns of sums one block keeps in the four accumulator tiles.
const BLOCK: usize = 2 * TILE;

/// Proof that the CPU has AMX with bfloat16 and that the kernel lets this process use it.
#[derive(Clone, Copy)]
struct Amx {
    simd: pulp::x86::V4,
}

impl Amx {
    /// `Some` on a CPU with AVX-512 where this process may use the tiles
    /// ([`crate::cpu::amx_granted`]: AMX-TILE and AMX-BF16, granted by the kernel, and not
    /// turned off by `NDTRANSFORMER_AMX=0`).
    fn try_new() -> Option<Self> {
        let simd = pulp::x86::V4::try_new()?;
        crate::cpu::amx_granted().then_some(Amx { simd })
    }
}

/// The bits of `x` (as u32) rounded to the nearest bfloat16, ties to even, in the high half.
#[inline(always)]
fn bf16_round(simd: pulp::x86::V4, bits: pulp::u32x16) -> pulp::u32x16 {
    let odd = simd.and_u32x16(simd.shr_const_u32x16::<16>(bits), simd.splat_u32x16(1));
    let up = simd.wrapping_add_u32x16(
        bits,
        simd.wrapping_add_u32x16(odd, simd.splat_u32x16(0x7FFF)),
    );
    simd.and_u32x16(up, simd.splat_u32x16(0xFFFF_0000))
}

/// The three bfloat16 parts of each lane (`hi`, `mid`, `lo`), in the high halves.
#[inline(always)]
fn split3(simd: pulp::x86::V4, x: pulp::f32x16) -> [pulp::u32x16; 3] {
    let hi = bf16_round(simd, pulp::cast(x));
    let rest = simd.sub_f32x16(x, pulp::cast(hi));
    let mid = bf16_round(simd, pulp::cast(rest));
    let lo = bf16_round(simd, pulp::cast(simd.sub_f32x16(rest, pulp::cast(mid))));
    [hi, mid, lo]
}

/// Sixteen bfloat16 pairs per part: pair `j` holds lane `j` of `first` (low half) and lane `j`
/// of `second` (high half). Within a step of 32 values of `k` the tiles pair `k = j` with
/// `k = j + 16` (any pairing works that both operands share), so no lanes are shuffled.
#[inline(always)]
fn split_pairs(
    simd: pulp::x86::V4,
    first: pulp::f32x16,
    second: pulp::f32x16,
) -> [pulp::u32x16; 3] {
    let (f, s) = (split3(simd, first), split3(simd, second));
    std::array::from_fn(|p| simd.or_u32x16(s[p], simd.shr_const_u32x16::<16>(f[p])))
}

/// Sixteen values from `values[at..]`, zeros past its end.
#[inline(always)]
fn load16(values: &[f32], at: usize) -> pulp::f32x16 {
    match values.get(at..at + 16) {
        Some(v) => pulp::cast(*<&[f32; 16]>::try_from(v).expect("16 values")),
        None => {
            let mut v = [0.0f32; 16];
            for (d, s) in v.iter_mut().zip(values.get(at..).unwrap_or(&[])) {
                *d = *s;
            }
            pulp::cast(v)
        }
    }
}

/// Writes the 16 pairs of `words` into `out[at..at + 16]`.
#[inline(always)]
fn store16(out: &mut [u32], at: usize, words: pulp::u32x16) {
    let words: [u32; 16] = pulp::cast(words);
    out[at..at + 16].copy_from_slice(&words);
}

/// One cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A buffer of `T` that starts on a 64-byte boundary: a tile row that straddles two cache
/// lines loads several times slower.
struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy> Aligned<T> {
    const fn new() -> Self {
        Aligned {
            lines: Vec::new(),
            len: 0,
            _t: std::marker::PhantomData,
        }
    }

    /// Makes the buffer `len` values long, keeping its memory (new values are zero bits).
    fn set_len(&mut self, len: usize) {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if self.lines.len() < lines {
            // Exactly what is asked: a doubling growth would keep up to twice the largest split.
            self.lines.reserve_exact(lines - self.lines.len());
            self.lines.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }
}

impl<T: Copy> Default for Aligned<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `set_len` keeps at least `len` values of `T` in `lines`, whose alignment
        // (64) is more than `T`'s; `T` is u32 or f32, for which any bits are a value.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// The rows of a product's left operand in three bfloat16 parts, tile by tile: part `p` holds,
/// for each 16 rows and each step of 32 values of `k`, one contiguous 1 KiB tile of 16 rows of
/// 16 pairs ([`split_pairs`]), zeros past the ends.
pub(crate) struct SplitRows {
    amx: Amx,
    parts: [Aligned<u32>; 3],
    k_steps: usize,
}

/// bfloat16 pairs (u32 words) in one tile: 16 rows of 64 bytes.
const TILE_WORDS: usize = TILE * TILE;

thread_local! {
    /// The calling thread's buffers for [`SplitRows`], kept from product to product so that
    /// they are not fresh pages each time.
    static ROWS: std::cell::RefCell<[Aligned<u32>; 3]> = const { std::cell::RefCell::new([Aligned::new(), Aligned::new(), Aligned::new()]) };
}

impl Drop for SplitRows {
    fn drop(&mut self) {
        let parts = std::mem::take(&mut self.parts);
        ROWS.with(|pool| *pool.borrow_mut() = parts);
    }
}

/// Products smaller than this (`m · k · n`) stay on `gemm`: splitting the operands and starting
/// the tiles cost more than the tiles save (the products measured on both sides of the
/// threshold are in `docs/performance.md`).
const MIN_TILE_WORK: usize = 1 << 26;

/// Whether a product `[m, k] · [k, n]` runs on the tiles where they are available: enough work
/// ([`MIN_TILE_WORK`]), `k` of at least 128 (four steps of 32: with fewer, each block of sums
/// spends more on starting and storing its tiles than on products), and `n` of at least 256:
/// splitting the input costs the same whatever `n`, and with 64 outputs (the date model's
/// feed-forward) the tiles measured slower than `gemm`.
pub(crate) fn takes_tiles(m: usize, k: usize, n: usize) -> bool {
    k >= 128 && n >= 256 && m.saturating_mul(k).saturating_mul(n) >= MIN_TILE_WORK
}

/// Whether this CPU and kernel offer the tiles (and `NDTRANSFORMER_AMX` does not turn them off).
#[cfg(test)]
pub(crate) fn available() -> bool {
    Amx::try_new().is_some()
}

impl SplitRows {
    /// `a: [m, k]` split for a product with `n` output columns on the tiles, tiles of rows in
    /// parallel; `None` where the tiles are not available ([`Amx::try_new`]), where the product
    /// is too small to gain from them ([`takes_tiles`]), or for an `a` whose rows are not
    /// contiguous.
    pub(crate) fn for_product(a: ArrayView2<f32>, n: usize) -> Option<Self> {
        let amx = Amx::try_new()?;
        let takes = takes_tiles(a.nrows(), a.ncols(), n) && super::attention::rows_contiguous(a);
        takes.then(|| Self::new(amx, a))
    }

    fn new(amx: Amx, a: ArrayView2<f32>) -> Self {
        let (m, k) = a.dim();
        let k_steps = k.div_ceil(KSTEP);
        let per_tile = k_steps * TILE_WORDS;
        let len = m.next_multiple_of(BLOCK) / TILE * per_tile;
        let mut parts = ROWS.with(|pool| std::mem::take(&mut *pool.borrow_mut()));
        for part in &mut parts {
            part.set_len(len);
        }
        let [hi, mid, lo] = &mut parts;
        hi.par_chunks_mut(per_tile)
            .zip(mid.par_chunks_mut(per_tile))
            .zip(lo.par_chunks_mut(per_tile))
            .enumerate()
            .for_each(|(t, ((hi, mid), lo))| {
                let simd = amx.simd;
                simd.vectorize(
                    #[inline(always)]
                    || {
                        for r in 0..TILE {
                            let i = t * TILE + r;
                            let row = if i < m {
                                a.row(i).to_slice().expect("contiguous rows, checked")
                            } else {
                                &[][..]
                            };
                            for s in 0..k_steps {
                                let at = s * TILE_WORDS + r * TILE;
                                let words = split_pairs(
                                    simd,
                                    load16(row, s * KSTEP),
                                    load16(row, s * KSTEP + TILE),
                                );
                                store16(hi, at, words[0]);
                                store16(mid, at, words[1]);
                                store16(lo, at, words[2]);
                            }
                        }
                    },
                )
            });
        SplitRows {
            amx,
            parts,
            k_steps,
        }
    }
}

/// One panel of a weight (`[k, 128]`, row-major) in three bfloat16 parts, laid out as AMX reads
/// its right operand, tile by tile: for each 16 columns and each step of 32 values of `k`, one
/// contiguous tile of 16 rows of 16 pairs, row `j` pairing the step's rows `j` and `j + 16` of
/// the panel ([`split_pairs`]), zeros past the end of `k`.
struct SplitPanel {
    parts: [Aligned<u32>; 3],
    k_steps: usize,
}

/// Columns of a panel.
const PANEL: usize = super::panels::PANEL;

impl SplitPanel {
    /// Splits `panel` (`[k, 128]`) into `self`, reusing its buffers.
    fn fill(&mut self, amx: Amx, panel: &[f32], k: usize) {
        assert_eq!(panel.len(), k * PANEL, "a panel is [k, 128]");
        let k_steps = k.div_ceil(KSTEP);
        let len = PANEL / TILE * k_steps * TILE * TILE;
        for part in &mut self.parts {
            part.set_len(len);
        }
        self.k_steps = k_steps;
        let zeros = [0.0f32; PANEL];
        let row = |i: usize| {
            if i < k {
                &panel[i * PANEL..][..PANEL]
            } else {
                &zeros[..]
            }
        };
        let [hi, mid, lo] = &mut self.parts;
        let simd = amx.simd;
        simd.vectorize(
            #[inline(always)]
            || {
                for s in 0..k_steps {
                    for j in 0..TILE {
                        let (first, second) = (row(s * KSTEP + j), row(s * KSTEP + j + TILE));
                        for ct in 0..PANEL / TILE {
                            let at = (ct * k_steps + s) * TILE_WORDS + j * TILE;
                            let words = split_pairs(
                                simd,
                                load16(first, ct * TILE),
                                load16(second, ct * TILE),
                            );
                            store16(hi, at, words[0]);
                            store16(mid, at, words[1]);
                            store16(lo, at, words[2]);
                        }
                    }
                }
            },
        );
    }
}

/// A tile configuration (palette 1), the 64 bytes `ldtilecfg` reads: each of the first eight
/// tiles' bytes a row and rows.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Palette 1 with tiles `tmm0`–`tmm7` of `rows[t]` rows of `bytes[t]` bytes.
    pub(super) const fn new(bytes: [u16; 8], rows: [u8; 8]) -> Self {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        let mut t = 0;
        while t < 8 {
            config.bytes_per_row[t] = bytes[t];
            config.rows[t] = rows[t];
            t += 1;
        }
        config
    }
}

/// The configuration of the bf16 products: eight tiles of 16 rows of 64 bytes.
const CONFIG: TileConfig = TileConfig::new([64; 8], [16; 8]);

/// Tile steps of `k` (32 values each) per chunk, over which a block of sums stays in its tiles.
/// A 32-row block of `a` takes 96 KiB a chunk and the panel 384 KiB, both in a core's L2; 8
/// steps and 64 measured slower (`docs/performance.md`).
const CHUNK: usize = 16;

thread_local! {
    /// Each thread's panel split and partial sums, kept from piece to piece.
    static SCRATCH: std::cell::RefCell<(SplitPanel, Aligned<f32>)> = const {
        std::cell::RefCell::new((
            SplitPanel { parts: [Aligned::new(), Aligned::new(), Aligned::new()], k_steps: 0 },
            Aligned::new(),
        ))
    };
}

impl SplitRows {
    /// `c = a[row0 .. row0 + rows] · panel[.., ..cols]` for a panel of the weight (`[k, 128]`,
    /// standard layout), written into `c` at row stride `c_stride` floats.
    ///
    /// # Safety
    /// `c` must be valid for writes of `rows` rows of `cols` floats at stride `c_stride`, and
    /// nothing else may access them during the call.
    pub(crate) unsafe fn product(
        &self,
        row0: usize,
        rows: usize,
        panel: ArrayView2<f32>,
        cols: usize,
        c: *mut f32,
        c_stride: usize,
    ) {
        let k = panel.nrows();
        let values = panel.to_slice().expect("panels in standard layout");
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (split, acc) = &mut *scratch;
            split.fill(self.amx, values, k);
            // SAFETY: the caller's guarantee.
            unsafe { product_split(self, row0, rows, split, cols, c, c_stride, acc) }
        })
    }
}

/// Which tiles [`load_tiles`] loads before it multiplies.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Rows,
    Columns,
    Both,
}

/// Loads two row tiles of one part of `a` into `tmm4`, `tmm5` and/or two column tiles of one
/// part of the panel into `tmm6`, `tmm7` (each 16 rows of 64 bytes, 64 bytes apart), then adds
/// the four products of row and column tiles into the accumulators `tmm0`–`tmm3`.
///
/// # Safety
/// The tile state must be configured ([`CONFIG`]), and each pointer it loads from must start
/// 1 KiB of readable memory.
#[inline(always)]
unsafe fn load_tiles(rows: (*const u32, *const u32), cols: (*const u32, *const u32), load: Load) {
    // SAFETY: the caller's guarantee; the instructions write only the tile registers.
    unsafe {
        // Two tiles of 16 rows of 64 bytes, 64 bytes apart, into the named tile registers.
        macro_rules! load_pair {
            ($t0:literal, $t1:literal, $tiles:expr) => {
                asm!(
                    concat!("tileloadd ", $t0, ", [{p0} + {stride}]"),
                    concat!("tileloadd ", $t1, ", [{p1} + {stride}]"),
                    p0 = in(reg) $tiles.0,
                    p1 = in(reg) $tiles.1,
                    stride = in(reg) 64usize,
                    options(nostack, readonly),
                )
            };
        }
        if load != Load::Columns {
            load_pair!("tmm4", "tmm5", rows);
        }
        if load != Load::Rows {
            load_pair!("tmm6", "tmm7", cols);
        }
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    }
}

/// [`SplitRows::product`] over a split panel, `acc` the partial sums between chunks of `k`
/// (and the tiles past the edges of `c`). Each step of 32 values of `k` runs the six part
/// products (`hi·hi`, `hi·mid`, `mid·hi`, `hi·lo`, `mid·mid`, `lo·hi`), each two row tiles of a
/// part of `a` against two column tiles of a part of the panel: 24 tile products into four
/// accumulators. Ordered so that each product reuses one operand of the one before, they take
/// 14 tile loads a step instead of 18.
///
/// # Safety
/// As for [`SplitRows::product`].
#[allow(clippy::too_many_arguments)]
unsafe fn product_split(
    a: &SplitRows,
    row0: usize,
    rows: usize,
    panel: &SplitPanel,
    cols: usize,
    c: *mut f32,
    c_stride: usize,
    acc: &mut Aligned<f32>,
) {
    assert_eq!(a.k_steps, panel.k_steps, "a and the panel share k");
    assert!(cols <= PANEL);
    assert_eq!(row0 % BLOCK, 0, "pieces start on a block of rows");
    let rows_pad = rows.next_multiple_of(BLOCK);
    assert!((row0 + rows_pad) / TILE * a.k_steps * TILE_WORDS <= a.parts[0].len());
    acc.set_len(rows_pad * PANEL);
    let acc_stride = PANEL * 4;
    let col_end = cols.next_multiple_of(BLOCK);
    // SAFETY: loads the constant configuration above (64 bytes, aligned).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for s0 in (0..panel.k_steps).step_by(CHUNK) {
        let s1 = (s0 + CHUNK).min(panel.k_steps);
        for r0 in (0..rows_pad).step_by(BLOCK) {
            for c0 in (0..col_end).step_by(BLOCK) {
                let a_at = |part: usize, half: usize, step: usize| {
                    let tile = (row0 + r0) / TILE + half;
                    a.parts[part][(tile * a.k_steps + step) * TILE_WORDS..].as_ptr()
                };
                let b_at = |part: usize, half: usize, step: usize| {
                    let tile = c0 / TILE + half;
                    panel.parts[part][(tile * panel.k_steps + step) * TILE * TILE..].as_ptr()
                };
                let acc_at = |i: usize, j: usize| (r0 + i * TILE) * PANEL + c0 + j * TILE;
                let accp = acc.as_mut_ptr();
                // SAFETY: tile loads read 16 rows of 64 bytes at the given strides inside the
                // split rows (whole blocks, asserted), the split panel (whole steps, c0 + 32 ≤
                // 128) and `acc` (rows_pad × 128); stores write `acc` the same way.
                unsafe {
                    if s0 == 0 {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm0, [{p0} + {st}]",
                            "tileloadd tmm1, [{p1} + {st}]",
                            "tileloadd tmm2, [{p2} + {st}]",
                            "tileloadd tmm3, [{p3} + {st}]",
                            p0 = in(reg) accp.add(acc_at(0, 0)),
                            p1 = in(reg) accp.add(acc_at(0, 1)),
                            p2 = in(reg) accp.add(acc_at(1, 0)),
                            p3 = in(reg) accp.add(acc_at(1, 1)),
                            st = in(reg) acc_stride,
                            options(nostack, readonly),
                        );
                    }
                    for step in s0..s1 {
                        let rows = |part| (a_at(part, 0, step), a_at(part, 1, step));
                        let cols = |part| (b_at(part, 0, step), b_at(part, 1, step));
                        // hi·lo, hi·mid, mid·mid, mid·hi, hi·hi, lo·hi: each load reused by
                        // the next product where it can, 14 tile loads a step instead of 18.
                        load_tiles(rows(0), cols(2), Load::Both);
                        load_tiles(rows(0), cols(1), Load::Columns);
                        load_tiles(rows(1), cols(1), Load::Rows);
                        load_tiles(rows(1), cols(0), Load::Columns);
                        load_tiles(rows(0), cols(0), Load::Rows);
                        load_tiles(rows(2), cols(0), Load::Rows);
                    }
                    // On the last chunk whole tiles go straight into `c`, the rest into `acc`.
                    let last = s1 == panel.k_steps;
                    let dst = |i: usize, j: usize| {
                        let (tr, tc) = (r0 + i * TILE, c0 + j * TILE);
                        if last && tr + TILE <= rows && tc + TILE <= cols {
                            (c.add(tr * c_stride + tc), c_stride * 4)
                        } else {
                            (accp.add(acc_at(i, j)), acc_stride)
                        }
                    };
                    let (d0, s0_) = dst(0, 0);
                    let (d1, s1_) = dst(0, 1);
                    let (d2, s2_) = dst(1, 0);
                    let (d3, s3_) = dst(1, 1);
                    asm!(
                        "tilestored [{p0} + {q0}], tmm0",
                        "tilestored [{p1} + {q1}], tmm1",
                        "tilestored [{p2} + {q2}], tmm2",
                        "tilestored [{p3} + {q3}], tmm3",
                        p0 = in(reg) d0,
                        p1 = in(reg) d1,
                        p2 = in(reg) d2,
                        p3 = in(reg) d3,
                        q0 = in(reg) s0_,
                        q1 = in(reg) s1_,
                        q2 = in(reg) s2_,
                        q3 = in(reg) s3_,
                        options(nostack),
                    );
                }
            }
        }
    }
    // SAFETY: releases the tile state this thread configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    // The edges: rows and columns past the last whole tile.
    let (whole_rows, whole_cols) = (rows / TILE * TILE, cols / TILE * TILE);
    for (i, sums) in acc.chunks_exact(PANEL).take(rows).enumerate() {
        let from = if i < whole_rows { whole_cols } else { 0 };
        // SAFETY: row i < rows, columns from .. cols, the caller's guarantee.
        let out =
            unsafe { std::slice::from_raw_parts_mut(c.add(i * c_stride + from), cols - from) };
        out.copy_from_slice(&sums[from..cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn three_bfloat16_parts_sum_to_the_float_exactly() {
        let Some(simd) = pulp::x86::V4::try_new() else {
            return;
        };
        let mut x = 0x1234_5678_u32;
        for _ in 0..4096 {
            // Random bits with exponents within ±60 of 1.0.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let exponent = 127 - 60 + (x >> 23) % 120;
            let values: [f32; 16] = std::array::from_fn(|i| {
                let bits = x.rotate_left(i as u32 * 7);
                f32::from_bits((bits & 0x807F_FFFF) | (exponent << 23))
            });
            let parts: [[u32; 16]; 3] = split3(simd, pulp::cast(values)).map(pulp::cast);
            for (i, &v) in values.iter().enumerate() {
                let [hi, mid, lo] = parts.map(|p| p[i]);
                for p in [hi, mid, lo] {
                    assert_eq!(p & 0xFFFF, 0, "a part is a bfloat16");
                }
                let sum = [hi, mid, lo]
                    .map(|p| f32::from_bits(p) as f64)
                    .iter()
                    .sum::<f64>();
                assert_eq!(sum, v as f64, "{v:e} = {hi:#x} + {mid:#x} + {lo:#x}");
            }
        }
    }

    #[test]
    fn products_on_the_tiles_are_as_accurate_as_f32_ones() {
        let Some(amx) = Amx::try_new() else {
            eprintln!("no AMX tiles here: nothing to compare");
            return;
        };
        // Rows and columns off the 32 × 32 blocks and 16 × 16 tiles, `k` off the 32-value steps
        // and over several chunks of 512.
        for (m, k, n) in [(37, 1, 1), (70, 33, 130), (100, 600, 47), (33, 1100, 128)] {
            let a = Array2::from_shape_fn((m, k), |(i, j)| {
                (((i * 37 + j * 11) % 101) as f32 / 50.0 - 1.0) * 1.000_123
            });
            let w_t = Array2::from_shape_fn((k, n), |(i, j)| {
                (((i * 13 + j * 29) % 97) as f32 / 48.0 - 1.0) / (k as f32).sqrt()
            });
            let exact = a.mapv(f64::from).dot(&w_t.mapv(f64::from));
            let panels = super::super::panels::pack_panels(w_t.view());
            let split = SplitRows::new(amx, a.view());
            let mut c = Array2::from_elem((m, n), f32::NAN);
            for (p, panel) in panels.outer_iter().enumerate() {
                let cols = (n - p * PANEL).min(PANEL);
                // SAFETY: rows 0..m, columns p·128 .. p·128 + cols of `c` (standard layout).
                unsafe { split.product(0, m, panel, cols, c.as_mut_ptr().add(p * PANEL), n) };
            }
            let mut f32_product = Array2::zeros((m, n));
            super::super::gemm::blocked_product(
                a.view(),
                w_t.view(),
                1.0,
                0.0,
                &mut f32_product.view_mut(),
                1,
            );
            let error = |y: &Array2<f32>| {
                y.iter()
                    .zip(&exact)
                    .map(|(&y, &e)| (y as f64 - e).abs())
                    .fold(0.0, f64::max)
            };
            let (tiles, f32_error) = (error(&c), error(&f32_product));
            assert!(
                tiles <= 2.0 * f32_error + 1e-7,
                "{m} × {k} × {n}: error {tiles:e} on the tiles, {f32_error:e} in f32"
            );
        }
    }
}
