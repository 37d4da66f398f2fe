//! The register-tile kernels for a few rows times a weight in panels (AVX-512 and AVX2).
//!
//! Short sequences and decoding steps: each panel is read once, front to back, while register
//! tiles accumulate partial sums kept in cache. [`super::panels`] calls them for the row
//! counts of [`TILE_ROWS`]; one driver, [`tile_product`], runs either instruction set's tile
//! ([`TileKernel`]): 8 × 32 sums on sixteen AVX-512 registers, or 6 × 16 on twelve AVX2 ones.

use super::panels::PANEL;
use ndarray::parallel::prelude::*;
use ndarray::{ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, Axis};

/// The tile kernel for a product of `m` rows with a `[k, n]` weight on this CPU, if
/// [`tile_product`] takes it.
#[cfg(target_arch = "x86_64")]
pub(super) fn tile_kernel_for(m: usize, k: usize, n: usize) -> Option<Tile> {
    if !TILE_ROWS.contains(&m) {
        return None;
    }
    if let Some(simd) = pulp::x86::V4::try_new() {
        return Some(Tile::Avx512(Avx512(simd)));
    }
    if m >= AVX2_MIN_ROWS && k * n >= AVX2_MIN_WEIGHT {
        return pulp::x86::V3::try_new().map(|simd| Tile::Avx2(Avx2(simd)));
    }
    None
}

/// Row counts [`tile_product`] takes (a short sequence or a batch of them): enough rows that the
/// weight, read once from memory, feeds several register tiles, few enough that the partial
/// sums stay in the core's cache.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: std::ops::RangeInclusive<usize> = 1..=64;

/// Below this many rows the AVX2 path keeps the streaming kernel of [`super::stream`], which
/// reads the weight once for all rows and is bound by memory there.
#[cfg(target_arch = "x86_64")]
const AVX2_MIN_ROWS: usize = 9;

/// Smaller weights (a d_model 64 or 256 layer) keep the kernels of [`super::gemm`] on AVX2:
/// there the tile's set-up (packing the rows, one pass per panel) measured up to a quarter
/// slower than `matrixmultiply`; from `512 × 256` up it was 15–25% faster
/// (`docs/performance.md`).
#[cfg(target_arch = "x86_64")]
const AVX2_MIN_WEIGHT: usize = 1 << 17;

/// Rows of `a` one AVX-512 register tile holds (the width of [`transpose_rows`]).
#[cfg(target_arch = "x86_64")]
pub(super) const TILE_M: usize = 8;

/// Rows of a panel a register tile takes per visit: the block (32 KiB) stays in L1 while every
/// tile uses it, and the partial sums are loaded and stored once per 64 multiply-adds each.
#[cfg(target_arch = "x86_64")]
const TILE_KC: usize = 64;

/// One instruction set's register tile: its shape, how `a` is laid out for it, and the walk
/// over one block of a panel.
#[cfg(target_arch = "x86_64")]
pub(super) trait TileKernel: Copy + Send + Sync {
    /// Rows of `a` a tile holds.
    const M: usize;
    /// Columns of `Wᵀ` a tile holds (a divisor of [`PANEL`]).
    const N: usize;
    /// One tile's partial sums, `[M][N]`.
    type Sums: Copy + Send;
    /// `M` values of `a` (one per row of a tile) at one `k`.
    type Group: Copy + Send + Sync;
    const ZERO: Self::Sums;
    /// Row `i` of a tile's sums.
    fn sums_row(sums: &Self::Sums, i: usize) -> &[f32];
    /// The rows of `a` as `[row tile][k]` groups, zero rows padding the last tile.
    fn pack_row_tiles(self, a: ArrayView2<f32>, row_tiles: usize) -> Vec<Self::Group>;
    /// Adds `a · block` to the sums of `strips` (consecutive, from `first`) of a panel, for
    /// every row tile: `block` is `kc` rows of the panel from row `r0`, `sums` is
    /// `[strip][row tile]`. `ahead` is the next block, asked for a share per call.
    #[allow(clippy::too_many_arguments)]
    fn walk_block(
        self,
        a_tiles: &[Self::Group],
        k: usize,
        r0: usize,
        block: &[f32],
        first: usize,
        sums: &mut [Self::Sums],
        ahead: *const i8,
        step: usize,
    ) {
        let kc = block.len() / PANEL;
        let row_tiles = a_tiles.len() / k;
        // One vectorised call per block, so that each tile inlines into it.
        self.vectorized(
            #[inline(always)]
            || {
                for (call, sums) in sums.iter_mut().enumerate() {
                    let (strip, tile) = (call / row_tiles, call % row_tiles);
                    self.tile(
                        &a_tiles[tile * k + r0..][..kc],
                        block,
                        first + strip,
                        sums,
                        ahead.wrapping_add(call * kc * step),
                        step,
                    );
                }
            },
        );
    }
    /// `op` compiled for this instruction set.
    fn vectorized(self, op: impl FnOnce());
    /// One register tile over a block: `sums[i][j] += Σ_r a[r][i] · block[r][strip][j]`.
    fn tile(
        self,
        a: &[Self::Group],
        block: &[f32],
        strip: usize,
        sums: &mut Self::Sums,
        ahead: *const i8,
        step: usize,
    );
}

/// The tile kernel a product runs on.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) enum Tile {
    Avx512(Avx512),
    Avx2(Avx2),
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// [`tile_product`] on this tile kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn product(
        self,
        a: ArrayView2<f32>,
        panels: ArrayView3<f32>,
        n: usize,
        alpha: f32,
        beta: f32,
        c: &mut ArrayViewMut2<f32>,
        threads: usize,
    ) {
        match self {
            Tile::Avx512(t) => tile_product(t, a, panels, n, alpha, beta, c, threads),
            Tile::Avx2(t) => tile_product(t, a, panels, n, alpha, beta, c, threads),
        }
    }
}

/// `c = alpha · a · Wᵀ + beta · c` for a few rows of `a` and a weight in panels, reading each
/// panel once, front to back.
///
/// Each thread takes a run of whole panels (of tile-wide strips when there are fewer panels
/// than threads) and walks each panel in blocks of [`TILE_KC`] rows; within a block every
/// register tile adds its terms to partial sums kept in cache. While one block is in use the
/// tiles ask for the next one (the next [`TILE_KC`] · [`PANEL`] values, contiguous), a share
/// each, so that memory streams in while the arithmetic runs: with the hardware prefetchers
/// alone the two took turns. The requests go to L2: into L1 they stall on its few fill
/// buffers (`docs/performance.md` has the figures). Each sum runs over `k` in order whatever
/// the tiling and thread count, so results do not depend on either.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_product<K: TileKernel>(
    kernel: K,
    a: ArrayView2<f32>,
    panels: ArrayView3<f32>,
    n: usize,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    let (m, k) = a.dim();
    let weight = panels.as_slice().expect("panels in standard layout");
    let row_tiles = m.div_ceil(K::M);
    let panel_strips = PANEL / K::N;

    let strips = n.div_ceil(K::N);
    let mut strips_per_unit = strips.div_ceil(threads).max(1);
    if strips_per_unit >= panel_strips {
        strips_per_unit = strips_per_unit.next_multiple_of(panel_strips);
    }
    let unit_width = strips_per_unit * K::N;
    let run = |(unit, mut c_unit): (usize, ArrayViewMut2<f32>)| {
        // Each thread packs its own copy: one packed by another core would be read line by
        // line out of that core's cache.
        let a_tiles = kernel.pack_row_tiles(a, row_tiles);
        let first = unit * strips_per_unit;
        let unit_strips = c_unit.ncols().div_ceil(K::N);
        let mut sums = vec![K::ZERO; panel_strips * row_tiles];
        let mut s = 0;
        while s < unit_strips {
            // The strips of one panel in this unit.
            let panel = (first + s) / panel_strips;
            let end = ((panel + 1) * panel_strips - first).min(unit_strips);
            let in_panel = (first + s) % panel_strips;
            let count = end - s;
            let values = &weight[panel * k * PANEL..][..k * PANEL];
            let sums = &mut sums[..count * row_tiles];
            sums.fill(K::ZERO);
            // Bytes of the next block each kernel call asks for per row it reads.
            let step = PANEL * 4 / (count * row_tiles);
            for r0 in (0..k).step_by(TILE_KC) {
                let kc = (k - r0).min(TILE_KC);
                let next = values
                    .as_ptr()
                    .wrapping_add((r0 + TILE_KC) * PANEL)
                    .cast::<i8>();
                kernel.walk_block(
                    &a_tiles,
                    k,
                    r0,
                    &values[r0 * PANEL..][..kc * PANEL],
                    in_panel,
                    sums,
                    next,
                    step,
                );
            }
            for strip in 0..count {
                let j0 = (s + strip) * K::N;
                let width = (c_unit.ncols() - j0).min(K::N);
                for tile in 0..row_tiles {
                    let rows = (m - tile * K::M).min(K::M);
                    for ii in 0..rows {
                        let row_sums = K::sums_row(&sums[strip * row_tiles + tile], ii);
                        let mut c_row = c_unit.row_mut(tile * K::M + ii);
                        let piece = &row_sums[..width];
                        match c_row.as_slice_mut() {
                            Some(c_row) => {
                                store_sums_slice(&mut c_row[j0..j0 + width], piece, alpha, beta)
                            }
                            None => store_sums(
                                c_row.slice_mut(ndarray::s![j0..j0 + width]),
                                piece,
                                alpha,
                                beta,
                            ),
                        }
                    }
                }
            }
            s = end;
        }
    };
    let units = c.axis_chunks_iter_mut(Axis(1), unit_width);
    if threads > 1 {
        units.into_par_iter().enumerate().for_each(run);
    } else {
        units.enumerate().for_each(run);
    }
}

/// The rows of `a` as `[row tile][k]` groups of `M` values (one per row of the tile), zero
/// rows padding the last tile.
fn pack_row_tiles_plain<const M: usize>(a: ArrayView2<f32>, row_tiles: usize) -> Vec<[f32; M]> {
    let k = a.ncols();
    let mut tiles = vec![[0.0f32; M]; row_tiles * k];
    for (tile, rows) in tiles
        .chunks_exact_mut(k.max(1))
        .zip(a.axis_chunks_iter(Axis(0), M))
    {
        for (i, row) in rows.rows().into_iter().enumerate() {
            match row.as_slice() {
                // Contiguous rows (the usual case): no index checks, so the loop stays tight.
                Some(row) => tile.iter_mut().zip(row).for_each(|(g, &v)| g[i] = v),
                None => tile.iter_mut().zip(row).for_each(|(g, &v)| g[i] = v),
            }
        }
    }
    tiles
}

/// The AVX-512 tile: 8 rows × 32 columns, sixteen registers of sums.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx512(pub(super) pulp::x86::V4);

/// One AVX-512 tile's partial sums, on a cache line boundary so that each of its sixteen
/// loads and stores touches one line, not two.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Sums512([[f32; 32]; TILE_M]);

#[cfg(target_arch = "x86_64")]
impl TileKernel for Avx512 {
    const M: usize = TILE_M;
    const N: usize = 32;
    type Sums = Sums512;
    type Group = [f32; TILE_M];
    const ZERO: Sums512 = Sums512([[0.0; 32]; TILE_M]);

    fn sums_row(sums: &Sums512, i: usize) -> &[f32] {
        &sums.0[i]
    }

    /// Full tiles of contiguous rows by register transposition ([`transpose_rows`]).
    fn pack_row_tiles(self, a: ArrayView2<f32>, row_tiles: usize) -> Vec<[f32; TILE_M]> {
        let k = a.ncols();
        let mut tiles = pack_row_tiles_plain::<TILE_M>(a, row_tiles);
        for (tile, rows) in tiles
            .chunks_exact_mut(k.max(1))
            .zip(a.axis_chunks_iter(Axis(0), TILE_M))
        {
            let slices: Option<Vec<&[f32]>> =
                rows.rows().into_iter().map(|r| r.to_slice()).collect();
            if let Some(full) = slices.and_then(|s| <[&[f32]; TILE_M]>::try_from(s).ok()) {
                transpose_rows(self.0, full, tile);
            }
        }
        tiles
    }

    fn vectorized(self, op: impl FnOnce()) {
        self.0.vectorize(op)
    }

    #[inline(always)]
    fn tile(
        self,
        a: &[[f32; TILE_M]],
        block: &[f32],
        strip: usize,
        sums: &mut Sums512,
        ahead: *const i8,
        step: usize,
    ) {
        let rows: &[[[f32; 32]; PANEL / 32]] = pulp::bytemuck::cast_slice(block);
        kernel_512(self.0, a, rows, strip, &mut sums.0, ahead, step);
    }
}

/// The AVX2 tile: 6 rows × 16 columns, twelve registers of sums (of sixteen), the shape of
/// the classic AVX2 matrix-product micro-kernels.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx2(pub(super) pulp::x86::V3);

/// Rows of an AVX2 tile.
#[cfg(target_arch = "x86_64")]
const AVX2_M: usize = 6;

/// One AVX2 tile's partial sums: each row of 16 is one cache line.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Sums256([[f32; 16]; AVX2_M]);

#[cfg(target_arch = "x86_64")]
impl TileKernel for Avx2 {
    const M: usize = AVX2_M;
    const N: usize = 16;
    type Sums = Sums256;
    type Group = [f32; AVX2_M];
    const ZERO: Sums256 = Sums256([[0.0; 16]; AVX2_M]);

    fn sums_row(sums: &Sums256, i: usize) -> &[f32] {
        &sums.0[i]
    }

    fn pack_row_tiles(self, a: ArrayView2<f32>, row_tiles: usize) -> Vec<[f32; AVX2_M]> {
        pack_row_tiles_plain::<AVX2_M>(a, row_tiles)
    }

    fn vectorized(self, op: impl FnOnce()) {
        self.0.vectorize(op)
    }

    #[inline(always)]
    fn tile(
        self,
        a: &[[f32; AVX2_M]],
        block: &[f32],
        strip: usize,
        sums: &mut Sums256,
        ahead: *const i8,
        step: usize,
    ) {
        let rows: &[[[f32; 16]; PANEL / 16]] = pulp::bytemuck::cast_slice(block);
        kernel_256(self.0, a, rows, strip, &mut sums.0, ahead, step);
    }
}

/// `out[r][i] = rows[i][r]` for the [`TILE_M`] (eight) rows of a full tile, eight columns at a
/// time by register shuffles: element by element, packing took about a tenth of a 32-token
/// encoder pass (`docs/performance.md`).
#[cfg(target_arch = "x86_64")]
pub(super) fn transpose_rows(
    simd: pulp::x86::V4,
    rows: [&[f32]; TILE_M],
    out: &mut [[f32; TILE_M]],
) {
    use pulp::bytemuck::cast;
    use std::arch::x86_64::__m256;
    let avx = simd.avx;
    let full = out.len() / TILE_M * TILE_M;
    simd.vectorize(
        #[inline(always)]
        || {
            for (r0, out) in (0..full).step_by(TILE_M).zip(out.chunks_exact_mut(TILE_M)) {
                let r: [__m256; TILE_M] = rows.map(|row| {
                    let values: [f32; TILE_M] = row[r0..r0 + TILE_M].try_into().expect("8 values");
                    cast(values)
                });
                // Pairs, then quads, then halves: the classic 8 × 8 transposition.
                let t = [
                    avx._mm256_unpacklo_ps(r[0], r[1]),
                    avx._mm256_unpackhi_ps(r[0], r[1]),
                    avx._mm256_unpacklo_ps(r[2], r[3]),
                    avx._mm256_unpackhi_ps(r[2], r[3]),
                    avx._mm256_unpacklo_ps(r[4], r[5]),
                    avx._mm256_unpackhi_ps(r[4], r[5]),
                    avx._mm256_unpacklo_ps(r[6], r[7]),
                    avx._mm256_unpackhi_ps(r[6], r[7]),
                ];
                let q = [
                    avx._mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    avx._mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    avx._mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    avx._mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    avx._mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    avx._mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    avx._mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    avx._mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                let columns: [__m256; TILE_M] = [
                    avx._mm256_permute2f128_ps::<0x20>(q[0], q[4]),
                    avx._mm256_permute2f128_ps::<0x20>(q[1], q[5]),
                    avx._mm256_permute2f128_ps::<0x20>(q[2], q[6]),
                    avx._mm256_permute2f128_ps::<0x20>(q[3], q[7]),
                    avx._mm256_permute2f128_ps::<0x31>(q[0], q[4]),
                    avx._mm256_permute2f128_ps::<0x31>(q[1], q[5]),
                    avx._mm256_permute2f128_ps::<0x31>(q[2], q[6]),
                    avx._mm256_permute2f128_ps::<0x31>(q[3], q[7]),
                ];
                for (out_r, column) in out.iter_mut().zip(columns) {
                    *out_r = cast(column);
                }
            }
        },
    );
    for (r, out_r) in out.iter_mut().enumerate().skip(full) {
        for (i, row) in rows.iter().enumerate() {
            out_r[i] = row[r];
        }
    }
}

/// Defines one register tile of `$m` rows × two `$vector`s: `sums[i][j] += Σ_r a[r][i] ·
/// rows[r][strip][j]` over the rows of a block, one fused multiply-add per term, in order of
/// `r` (through `pulp`'s safe SIMD types). Per row it also asks for the cache line at
/// `ahead + r · step` (and the next one when `step` spans two) to be brought into L2. Called
/// inside `simd.vectorize`, where it inlines with that instruction set's code generation.
macro_rules! register_tile {
    ($(#[$doc:meta])* $name:ident, $simd:ty, $vector:ident, $splat:ident, $mul_add:ident, $m:expr, $n:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        fn $name(
            simd: $simd,
            a: &[[f32; $m]],
            rows: &[[[f32; $n]; PANEL / $n]],
            strip: usize,
            sums: &mut [[f32; $n]; $m],
            ahead: *const i8,
            step: usize,
        ) {
            use pulp::{bytemuck::cast, $vector};
            use std::arch::x86_64::_MM_HINT_T1;
            let mut acc: [[$vector; 2]; $m] = cast(*sums);
            for (r, (row, a_r)) in rows.iter().zip(a).enumerate() {
                // A hint only: never faults, even past the end of the weight.
                let line = ahead.wrapping_add(r * step);
                simd.sse._mm_prefetch::<_MM_HINT_T1>(line);
                if step > 64 {
                    simd.sse._mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
                }
                let halves: [$vector; 2] = cast(row[strip]);
                for (acc_i, &a_ri) in acc.iter_mut().zip(a_r) {
                    let s = simd.$splat(a_ri);
                    acc_i[0] = simd.$mul_add(s, halves[0], acc_i[0]);
                    acc_i[1] = simd.$mul_add(s, halves[1], acc_i[1]);
                }
            }
            *sums = cast(acc);
        }
    };
}

register_tile!(
    /// The AVX-512 tile: 8 × 32 sums on sixteen registers.
    kernel_512, pulp::x86::V4, f32x16, splat_f32x16, mul_add_f32x16, TILE_M, 32
);
register_tile!(
    /// The AVX2 tile: 6 × 16 sums on twelve registers.
    kernel_256, pulp::x86::V3, f32x8, splat_f32x8, mul_add_f32x8, AVX2_M, 16
);

/// [`store_sums`] on a contiguous row piece.
fn store_sums_slice(c: &mut [f32], sums: &[f32], alpha: f32, beta: f32) {
    if beta == 0.0 {
        for (c, &s) in c.iter_mut().zip(sums) {
            *c = alpha * s;
        }
    } else {
        for (c, &s) in c.iter_mut().zip(sums) {
            *c = alpha * s + beta * *c;
        }
    }
}

/// `c = alpha · sums + beta · c` for one row piece; with `beta == 0` the old `c` is not read.
pub(super) fn store_sums(mut c: ArrayViewMut1<f32>, sums: &[f32], alpha: f32, beta: f32) {
    let sums = ArrayView1::from(sums);
    if beta == 0.0 {
        c.zip_mut_with(&sums, |c, &s| *c = alpha * s);
    } else {
        c.zip_mut_with(&sums, |c, &s| *c = alpha * s + beta * *c);
    }
}

#[cfg(test)]
mod tests {
    use super::super::panels::pack_panels;
    use super::super::testing::{naive_product, operands};
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::Array2;

    /// Every tile kernel this CPU runs.
    #[cfg(target_arch = "x86_64")]
    fn kernels() -> Vec<Tile> {
        let mut all = Vec::new();
        if let Some(simd) = pulp::x86::V4::try_new() {
            all.push(Tile::Avx512(Avx512(simd)));
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            all.push(Tile::Avx2(Avx2(simd)));
        }
        all
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn products_take_the_tile_of_the_cpu() {
        let avx512 = pulp::x86::V4::try_new().is_some();
        let avx2 = pulp::x86::V3::try_new().is_some();
        let kind = |m, k, n| match tile_kernel_for(m, k, n) {
            Some(Tile::Avx512(_)) => "avx512",
            Some(Tile::Avx2(_)) => "avx2",
            None => "none",
        };
        // A decoding step of 32 rows through a base-model layer; a small layer; few rows.
        for (m, k, n) in [
            (32, 512, 2048),
            (64, 512, 512),
            (32, 64, 256),
            (4, 512, 512),
        ] {
            let expected = if avx512 {
                "avx512"
            } else if avx2 && m >= AVX2_MIN_ROWS && k * n >= AVX2_MIN_WEIGHT {
                "avx2"
            } else {
                "none"
            };
            assert_eq!(kind(m, k, n), expected, "{m}x{k}x{n}");
        }
        assert_eq!(kind(65, 512, 512), "none");
        if avx2 && !avx512 {
            assert_eq!(kind(32, 512, 2048), "avx2");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tile_products_match_the_naive_product_whatever_the_thread_count() {
        let kernels = kernels();
        if pulp::x86::V3::try_new().is_some() {
            assert!(!kernels.is_empty());
        }
        // Partial row tiles, a narrow last strip, k not a multiple of the block; β = 0 and β ≠ 0.
        for tile in kernels {
            let name = match tile {
                Tile::Avx512(_) => "AVX-512",
                Tile::Avx2(_) => "AVX2",
            };
            for (m, k, n) in [
                (1, 300, 2100),
                (8, 37, 64),
                (13, 130, 70),
                (64, 17, 33),
                (30, 512, 96),
                (7, 64, 16),
            ] {
                let (a, w) = operands(m, k, n);
                let panels = pack_panels(w.view());
                let panels = panels.view();
                for beta in [0.0, 2.0] {
                    let start = Array2::from_shape_fn((m, n), |(i, j)| (i + 2 * j) as f32 * 0.01);
                    let expected = naive_product(a.view(), w.view(), 0.5, beta, start.view());
                    let mut one = start.clone();
                    tile.product(a.view(), panels, n, 0.5, beta, &mut one.view_mut(), 1);
                    assert_abs_diff_eq!(one, expected, epsilon = 1e-4);
                    for threads in [2, 3] {
                        let mut many = start.clone();
                        tile.product(
                            a.view(),
                            panels,
                            n,
                            0.5,
                            beta,
                            &mut many.view_mut(),
                            threads,
                        );
                        assert_eq!(many, one, "{name} {m}x{k}x{n} on {threads} threads");
                    }
                }
            }
        }
    }

    /// Both kernels add the terms of each sum in order of `k`, with one fused multiply-add
    /// each: the same bits, so a model gives the same outputs on either instruction set.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_kernels_agree_bit_for_bit() {
        let kernels = kernels();
        let Some((first, rest)) = kernels.split_first() else {
            return;
        };
        for (m, k, n) in [(9, 300, 200), (32, 512, 130)] {
            let (a, w) = operands(m, k, n);
            let panels = pack_panels(w.view());
            let mut want = Array2::zeros((m, n));
            first.product(
                a.view(),
                panels.view(),
                n,
                1.0,
                0.0,
                &mut want.view_mut(),
                1,
            );
            for other in rest {
                let mut got = Array2::zeros((m, n));
                other.product(a.view(), panels.view(), n, 1.0, 0.0, &mut got.view_mut(), 2);
                assert_eq!(got, want, "{m}x{k}x{n}");
            }
        }
    }

    #[test]
    fn row_tiles_hold_each_row_tile_transposed_whatever_the_layout() {
        let Some(simd) = pulp::x86::V4::try_new() else {
            return; // no AVX-512 here: tile_product never runs
        };
        for (m, k) in [(8, 16), (13, 37), (3, 5), (20, 512)] {
            let a = Array2::from_shape_fn((m, k), |(i, r)| (i * 1000 + r) as f32);
            let columns = a.t().as_standard_layout().into_owned();
            let strided = columns.t();
            assert!(strided.row(0).as_slice().is_none());
            let tiles = Avx512(simd).pack_row_tiles(a.view(), m.div_ceil(TILE_M));
            assert_eq!(tiles, pack_row_tiles_plain(strided, m.div_ceil(TILE_M)));
            for (t, tile) in tiles.chunks_exact(k).enumerate() {
                for (r, group) in tile.iter().enumerate() {
                    for (i, &v) in group.iter().enumerate() {
                        let row = t * TILE_M + i;
                        let expected = if row < m { a[[row, r]] } else { 0.0 };
                        assert_eq!(v, expected, "{m}x{k}: tile {t}, column {r}, row {i}");
                    }
                }
            }
        }
    }
}
