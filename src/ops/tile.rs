//! The register-tile kernel for a few rows times a weight in panels (AVX-512).
//!
//! Short sequences and decoding steps: each panel is read once, front to back, while 8 × 32
//! register tiles accumulate partial sums kept in cache. [`super::panels`] calls it when the
//! CPU has AVX-512; elsewhere the products go to [`super::gemm`].

use super::panels::PANEL;
use ndarray::parallel::prelude::*;
use ndarray::{ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, Axis};

/// AVX-512, if the CPU has it and a product of `m` rows is one for [`tile_product`].
#[cfg(target_arch = "x86_64")]
pub(super) fn tile_simd(m: usize) -> Option<pulp::x86::V4> {
    if TILE_ROWS.contains(&m) {
        pulp::x86::V4::try_new()
    } else {
        None
    }
}

/// Rows of `a` and columns of `b` one register tile of [`tile_product`] holds: 8 × 32 sums are
/// sixteen AVX-512 registers.
#[cfg(target_arch = "x86_64")]
pub(super) const TILE_M: usize = 8;
#[cfg(target_arch = "x86_64")]
const TILE_N: usize = 32;
/// Register tiles across a panel.
#[cfg(target_arch = "x86_64")]
const PANEL_STRIPS: usize = PANEL / TILE_N;
/// Rows of a panel a register tile takes per visit: the block (32 KiB) stays in L1 while every
/// tile uses it, and the partial sums are loaded and stored once per 64 multiply-adds each.
#[cfg(target_arch = "x86_64")]
const TILE_KC: usize = 64;
/// Row counts [`tile_product`] takes (a short sequence or a batch of them): enough rows that the
/// weight, read once from memory, feeds several register tiles, few enough that the partial
/// sums stay in the core's cache.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: std::ops::RangeInclusive<usize> = 1..=64;

/// `c = alpha · a · Wᵀ + beta · c` for a few rows of `a` and a weight in panels, reading each
/// panel once, front to back.
///
/// Each thread takes a run of whole panels (of 32-column strips when there are fewer panels
/// than threads) and walks each panel in blocks of [`TILE_KC`] rows; within a block every
/// register tile ([`TILE_M`] × [`TILE_N`]) adds its terms to partial sums kept in cache. While
/// one block is in use the tiles ask for the next one (the next [`TILE_KC`] · [`PANEL`] values,
/// contiguous), a share each, so that memory streams in while the arithmetic runs: with the
/// hardware prefetchers alone the two took turns. The requests go to L2: into L1 they stall on
/// its few fill buffers (`docs/performance.md` has the figures). Each sum runs over `k` in order
/// whatever the tiling and thread count, so results do not depend on either.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_product(
    simd: pulp::x86::V4,
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
    let row_tiles = m.div_ceil(TILE_M);

    let strips = n.div_ceil(TILE_N);
    let mut strips_per_unit = strips.div_ceil(threads).max(1);
    if strips_per_unit >= PANEL_STRIPS {
        strips_per_unit = strips_per_unit.next_multiple_of(PANEL_STRIPS);
    }
    let unit_width = strips_per_unit * TILE_N;
    let run = |(unit, mut c_unit): (usize, ArrayViewMut2<f32>)| {
        // Each thread packs its own copy: one packed by another core would be read line by
        // line out of that core's cache.
        let a_tiles = pack_row_tiles(simd, a, row_tiles);
        let first = unit * strips_per_unit;
        let unit_strips = c_unit.ncols().div_ceil(TILE_N);
        let mut sums = vec![TileSums::ZERO; PANEL_STRIPS * row_tiles];
        let mut s = 0;
        while s < unit_strips {
            // The strips of one panel in this unit.
            let panel = (first + s) / PANEL_STRIPS;
            let end = ((panel + 1) * PANEL_STRIPS - first).min(unit_strips);
            let in_panel = (first + s) % PANEL_STRIPS;
            let count = end - s;
            let values = &weight[panel * k * PANEL..][..k * PANEL];
            sums[..count * row_tiles].fill(TileSums::ZERO);
            // Bytes of the next block each kernel call asks for per row it reads.
            let step = PANEL * 4 / (count * row_tiles);
            // The whole walk is one vectorised call, so that each kernel inlines into it.
            simd.vectorize(
                #[inline(always)]
                || {
                    for r0 in (0..k).step_by(TILE_KC) {
                        let kc = (k - r0).min(TILE_KC);
                        let rows: &[[[f32; TILE_N]; PANEL_STRIPS]] =
                            pulp::bytemuck::cast_slice(&values[r0 * PANEL..][..kc * PANEL]);
                        let next = values
                            .as_ptr()
                            .wrapping_add((r0 + TILE_KC) * PANEL)
                            .cast::<i8>();
                        for strip in 0..count {
                            for tile in 0..row_tiles {
                                let call = strip * row_tiles + tile;
                                tile_kernel(
                                    simd,
                                    &a_tiles[tile * k + r0..][..kc],
                                    rows,
                                    in_panel + strip,
                                    &mut sums[call].0,
                                    next.wrapping_add(call * kc * step),
                                    step,
                                );
                            }
                        }
                    }
                },
            );
            for strip in 0..count {
                let j0 = (s + strip) * TILE_N;
                let width = (c_unit.ncols() - j0).min(TILE_N);
                for tile in 0..row_tiles {
                    let rows = (m - tile * TILE_M).min(TILE_M);
                    for (ii, row_sums) in
                        sums[strip * row_tiles + tile].0[..rows].iter().enumerate()
                    {
                        let mut c_row = c_unit.row_mut(tile * TILE_M + ii);
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

/// The rows of `a` as `[row tile][k]` groups of [`TILE_M`] values (one per row of the tile),
/// zero rows padding the last tile.
#[cfg(target_arch = "x86_64")]
fn pack_row_tiles(simd: pulp::x86::V4, a: ArrayView2<f32>, row_tiles: usize) -> Vec<[f32; TILE_M]> {
    let k = a.ncols();
    let mut tiles = vec![[0.0f32; TILE_M]; row_tiles * k];
    for (tile, rows) in tiles
        .chunks_exact_mut(k.max(1))
        .zip(a.axis_chunks_iter(Axis(0), TILE_M))
    {
        let slices: Option<Vec<&[f32]>> = rows.rows().into_iter().map(|r| r.to_slice()).collect();
        match slices.and_then(|s| <[&[f32]; TILE_M]>::try_from(s).ok()) {
            Some(full) => transpose_rows(simd, full, tile),
            None => {
                for (i, row) in rows.rows().into_iter().enumerate() {
                    for (group, &v) in tile.iter_mut().zip(row) {
                        group[i] = v;
                    }
                }
            }
        }
    }
    tiles
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

/// One register tile's partial sums, on a cache line boundary so that each of its sixteen
/// AVX-512 loads and stores touches one line, not two.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TileSums([[f32; TILE_N]; TILE_M]);

#[cfg(target_arch = "x86_64")]
impl TileSums {
    const ZERO: Self = TileSums([[0.0; TILE_N]; TILE_M]);
}

/// One register tile: `sums[i][j] += Σ_r a[r][i] · rows[r][strip][j]` for `i < TILE_M`,
/// `j < TILE_N` over the rows of a block: one fused multiply-add per term, in order of `r`, on
/// sixteen AVX-512 registers (through `pulp`'s safe SIMD types). Per row it also asks for the
/// cache line at `ahead + r · step` (and the next one when `step` spans two) to be brought into
/// L2. Called inside
/// `simd.vectorize`, where it inlines with the AVX-512 code generation.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tile_kernel(
    simd: pulp::x86::V4,
    a: &[[f32; TILE_M]],
    rows: &[[[f32; TILE_N]; PANEL_STRIPS]],
    strip: usize,
    sums: &mut [[f32; TILE_N]; TILE_M],
    ahead: *const i8,
    step: usize,
) {
    use pulp::{bytemuck::cast, f32x16};
    use std::arch::x86_64::_MM_HINT_T1;
    let mut acc: [[f32x16; 2]; TILE_M] = cast(*sums);
    for (r, (row, a_r)) in rows.iter().zip(a).enumerate() {
        // A hint only: never faults, even past the end of the weight.
        let line = ahead.wrapping_add(r * step);
        simd.sse._mm_prefetch::<_MM_HINT_T1>(line);
        if step > 64 {
            simd.sse._mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
        }
        let halves: [f32x16; 2] = cast(row[strip]);
        for (acc_i, &a_ri) in acc.iter_mut().zip(a_r) {
            let s = simd.splat_f32x16(a_ri);
            acc_i[0] = simd.mul_add_f32x16(s, halves[0], acc_i[0]);
            acc_i[1] = simd.mul_add_f32x16(s, halves[1], acc_i[1]);
        }
    }
    *sums = cast(acc);
}

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

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tile_products_match_the_naive_product_whatever_the_thread_count() {
        let Some(simd) = pulp::x86::V4::try_new() else {
            return; // no AVX-512 here: gemm_into never takes this kernel
        };
        // Partial row tiles, a narrow last strip, k not a multiple of the block; β = 0 and β ≠ 0.
        for (m, k, n) in [
            (1, 300, 2100),
            (8, 37, 64),
            (13, 130, 70),
            (64, 17, 33),
            (30, 512, 96),
        ] {
            let (a, w) = operands(m, k, n);
            let panels = pack_panels(w.view());
            let panels = panels.view();
            for beta in [0.0, 2.0] {
                let start = Array2::from_shape_fn((m, n), |(i, j)| (i + 2 * j) as f32 * 0.01);
                let expected = naive_product(a.view(), w.view(), 0.5, beta, start.view());
                let mut one = start.clone();
                tile_product(simd, a.view(), panels, n, 0.5, beta, &mut one.view_mut(), 1);
                assert_abs_diff_eq!(one, expected, epsilon = 1e-4);
                for threads in [2, 3] {
                    let mut many = start.clone();
                    tile_product(
                        simd,
                        a.view(),
                        panels,
                        n,
                        0.5,
                        beta,
                        &mut many.view_mut(),
                        threads,
                    );
                    assert_eq!(many, one, "{m}x{k}x{n} on {threads} threads");
                }
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
            let tiles = pack_row_tiles(simd, a.view(), m.div_ceil(TILE_M));
            assert_eq!(tiles, pack_row_tiles(simd, strided, m.div_ceil(TILE_M)));
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
