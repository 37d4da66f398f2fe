//! Int8 products on Intel's AMX tiles (AMX-INT8, `tdpbusd`), for the batch products of an
//! int8 weight packed for VNNI ([`super::int8`], `Layout::Quads`).
//!
//! One `tdpbusd` multiplies a tile of 16 rows × 32 u8 levels (one activation block of 16
//! rows) by a tile of 8 × 64 int8 weights (the block's 8 groups of 4 inputs × 16 columns, as
//! the VNNI layout already stores them, 512 contiguous bytes) into 16 × 16 exact i32 sums:
//! 8192 products in one instruction, against 64 for `vpdpbusd`. Each block of 32 inputs has its
//! own activation scale, so the sums of each block leave the tiles, and the AVX-512 registers
//! finish them as the VNNI kernel does (`vpdpwssd` adds `−zero · Σ w`, then one fused
//! multiply-add takes the block's scale into the f32 totals, in the same order): the outputs
//! equal the VNNI kernel's and the scalar reference's bit for bit.
//!
//! A block of sums covers 32 rows × 32 columns in four accumulator tiles, from two tiles of
//! levels and two of weights. The levels' rows are padded to a multiple of 16 and their
//! blocks are whole (the caller's buffers), so every tile load reads inside them.
//! `NDTRANSFORMER_AMX=0` turns this path off with the f32 one ([`crate::cpu::amx_granted`]).

use std::arch::asm;
use std::arch::x86_64::*;

use super::amx::TileConfig;

// Rows of one tile of levels (and of sums); output columns of one tile of sums (one strip of
// the VNNI layout); inputs of one activation block (one tile product).
use super::int8::{AMX_ROWS as TILE_ROWS, BLOCK, WIDE_STRIP as STRIP};

/// Bytes of one block of a strip of weights: 8 groups of 4 inputs × 16 columns.
const BLOCK_BYTES: usize = BLOCK * STRIP;

/// Proof that this CPU has AMX-INT8 with AVX-512 VNNI and that the kernel lets this process
/// use the tiles.
#[derive(Clone, Copy)]
pub(super) struct Tiles(());

impl Tiles {
    /// `Some` where the tiles are granted ([`crate::cpu::amx_granted`]) and the CPU reports
    /// AMX-INT8 and AVX-512 F, BW and VNNI. Asked once per process: `cpuid` traps to the
    /// hypervisor in a virtual machine, which costs more than a small product.
    pub(super) fn try_new() -> Option<Self> {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let usable = *USABLE.get_or_init(|| {
            let features = crate::cpu::Features::detect();
            features.amx_int8
                && features.avx512
                && features.avx512_vnni
                && crate::cpu::amx_granted()
        });
        usable.then_some(Tiles(()))
    }
}

/// The tile configuration: `tmm0`–`tmm3` sums (16 rows × 16 i32), `tmm4`, `tmm5` levels (16
/// rows × 32 u8), `tmm6`, `tmm7` weights (8 rows × 64 bytes).
const CONFIG: TileConfig = TileConfig::new(
    [64, 64, 64, 64, 32, 32, 64, 64],
    [16, 16, 16, 16, 16, 16, 8, 8],
);

/// One unit's operands, as the int8 kernel holds them.
pub(super) struct Unit<'a> {
    /// The unit's levels: its first row first, rows of `width` u8 (a multiple of 32), at least
    /// `rows` rounded up to 16 rows.
    pub levels: &'a [u8],
    pub width: usize,
    /// Each row's block scales and zero words, `[rows][blocks]` from the unit's first row.
    pub scales: &'a [f32],
    pub zeros: &'a [i32],
    /// The unit's strips of weights, `strip_len` bytes apart (whole blocks each).
    pub strips: &'a [i8],
    pub strip_len: usize,
    /// The strips' column sums, `sums_len` values apart (32 a pair of blocks).
    pub sums: &'a [i16],
    pub sums_len: usize,
    pub rows: usize,
    pub cols: usize,
}

/// The f32 sums `Σ_b sx_b · Σ_{i in b} (u − zero) · w` of a unit, `[rows, cols]` into `out`.
///
/// # Panics
/// If a buffer is shorter than the unit's shape asks.
pub(super) fn unit_sums(_tiles: Tiles, unit: &Unit, out: &mut [f32]) {
    let blocks = unit.width / BLOCK;
    assert_eq!(unit.width % BLOCK, 0, "whole blocks of levels");
    assert!(unit.levels.len() >= unit.rows.next_multiple_of(TILE_ROWS) * unit.width);
    assert!(unit.scales.len() >= unit.rows.next_multiple_of(TILE_ROWS) * blocks);
    assert!(unit.zeros.len() >= unit.rows.next_multiple_of(TILE_ROWS) * blocks);
    let strips = unit.cols.div_ceil(STRIP);
    assert!(unit.strip_len >= blocks * BLOCK_BYTES);
    assert!(unit.strips.len() >= (strips - 1) * unit.strip_len + blocks * BLOCK_BYTES);
    assert!(unit.sums_len >= blocks.div_ceil(2) * 2 * STRIP);
    assert!(unit.sums.len() >= (strips - 1) * unit.sums_len + blocks.div_ceil(2) * 2 * STRIP);
    assert_eq!(out.len(), unit.rows * unit.cols);
    // SAFETY: `Tiles` proves the CPU and the kernel let the process use AMX-INT8 and AVX-512
    // VNNI; the lengths are checked above.
    unsafe { sums_on_tiles(unit, blocks, out) }
}

/// Four tiles of sums (two row tiles × two strips), one block's exact i32 sums, as stored.
#[repr(C, align(64))]
struct BlockSums([[[i32; STRIP]; TILE_ROWS]; 4]);

/// Where a block of sums lies in its unit: rows from `r0` (one or two tiles), columns from
/// `c0` (one or two strips), and the unit's blocks of inputs.
struct Place {
    r0: usize,
    c0: usize,
    row_tiles: usize,
    strips: usize,
    blocks: usize,
}

/// The exact i32 sums of input block `b` for the block of sums at `at`, into `sums`. A lone
/// last strip is multiplied twice (its second copy is never stored); a lone row tile leaves
/// tiles 2 and 3 of `sums` as they were.
///
/// # Safety
/// The tiles must be configured ([`CONFIG`]), and the buffers as [`unit_sums`] checks them.
#[inline(always)]
unsafe fn tile_block(unit: &Unit, at: &Place, b: usize, sums: &mut BlockSums) {
    let a = |t: usize| unit.levels[(at.r0 + t * TILE_ROWS) * unit.width + b * BLOCK..].as_ptr();
    let w = |s: usize| {
        let s = (at.c0 / STRIP + s.min(at.strips - 1)) * unit.strip_len;
        unit.strips[s + b * BLOCK_BYTES..].as_ptr()
    };
    let c: [*mut i32; 4] = std::array::from_fn(|t| sums.0[t].as_mut_ptr().cast());
    // SAFETY: each tile load reads 16 rows of 32 levels at the rows' stride inside `levels`
    // (rows padded to 16, whole blocks) or 8 rows of 64 bytes of one block of a strip; the
    // stores write the tiles of `sums`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tileloadd tmm4, [{a0} + {stride}]",
            "tileloadd tmm6, [{w0} + {wide}]",
            "tileloadd tmm7, [{w1} + {wide}]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm4, tmm7",
            "tilestored [{c0} + {wide}], tmm0",
            "tilestored [{c1} + {wide}], tmm1",
            a0 = in(reg) a(0),
            w0 = in(reg) w(0),
            w1 = in(reg) w(1),
            c0 = in(reg) c[0],
            c1 = in(reg) c[1],
            stride = in(reg) unit.width,
            wide = in(reg) 64usize,
            options(nostack),
        );
        if at.row_tiles == 2 {
            asm!(
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm5, [{a1} + {stride}]",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                "tilestored [{c2} + {wide}], tmm2",
                "tilestored [{c3} + {wide}], tmm3",
                a1 = in(reg) a(1),
                c2 = in(reg) c[2],
                c3 = in(reg) c[3],
                stride = in(reg) unit.width,
                wide = in(reg) 64usize,
                options(nostack),
            );
        }
    }
}

/// Adds block `b`'s sums (`sums`, from [`tile_block`]) to the f32 totals of the block of sums
/// at `at`: `vpdpwssd` adds `−zero · Σ w`, then each exact sum is converted and added, times
/// the row's block scale, in one fused multiply-add, as the VNNI kernel does.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn finish_block(
    unit: &Unit,
    at: &Place,
    b: usize,
    sums: &BlockSums,
    total: &mut [[__m512; 2]; 2 * TILE_ROWS],
) {
    // The block pair's column sums of each strip (a lone last strip reads its own twice).
    let cs: [__m512i; 2] = std::array::from_fn(|s| {
        let s = (at.c0 / STRIP + s.min(at.strips - 1)) * unit.sums_len;
        let pair = &unit.sums[s + b / 2 * 2 * STRIP..][..2 * STRIP];
        // SAFETY: 32 i16 (the slice above), and the CPU has AVX-512 (the caller's `Tiles`).
        unsafe { _mm512_loadu_si512(pair.as_ptr().cast()) }
    });
    for (r, total) in total.iter_mut().enumerate().take(at.row_tiles * TILE_ROWS) {
        let i = (at.r0 + r) * at.blocks + b;
        // SAFETY (this block): the CPU has AVX-512 F, BW and VNNI (the caller's `Tiles`), and
        // each load reads 16 i32 of one row of a stored tile (aligned).
        unsafe {
            let zero = _mm512_set1_epi32(unit.zeros[i]);
            let scale = _mm512_set1_ps(unit.scales[i]);
            for (s, total) in total.iter_mut().enumerate() {
                let tile = &sums.0[r / TILE_ROWS * 2 + s][r % TILE_ROWS];
                let raw = _mm512_load_si512(tile.as_ptr().cast());
                let exact = _mm512_dpwssd_epi32(raw, zero, cs[s]);
                *total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *total);
            }
        }
    }
}

/// [`unit_sums`] on the tiles.
///
/// # Safety
/// The CPU must have AMX-INT8 (granted) and AVX-512 F, BW and VNNI; the buffers as
/// [`unit_sums`] checks them.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn sums_on_tiles(unit: &Unit, blocks: usize, out: &mut [f32]) {
    let mut sums = [
        BlockSums([[[0; STRIP]; TILE_ROWS]; 4]),
        BlockSums([[[0; STRIP]; TILE_ROWS]; 4]),
    ];
    // SAFETY: loads the constant configuration above (64 bytes, aligned).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for r0 in (0..unit.rows).step_by(2 * TILE_ROWS) {
        let row_tiles = if unit.rows - r0 > TILE_ROWS { 2 } else { 1 };
        for c0 in (0..unit.cols).step_by(2 * STRIP) {
            let strips = if unit.cols - c0 > STRIP { 2 } else { 1 };
            let at = Place {
                r0,
                c0,
                row_tiles,
                strips,
                blocks,
            };
            let mut total = [[_mm512_setzero_ps(); 2]; 2 * TILE_ROWS];
            // One block behind: the tiles multiply block b while the registers finish block
            // b − 1, from the other buffer.
            for b in 0..=blocks {
                if b < blocks {
                    // SAFETY: the caller's guarantee (the buffers' lengths).
                    unsafe { tile_block(unit, &at, b, &mut sums[b % 2]) };
                }
                if b > 0 {
                    finish_block(unit, &at, b - 1, &sums[(b - 1) % 2], &mut total);
                }
            }
            let width = (unit.cols - c0).min(2 * STRIP);
            for (r, total) in total
                .iter()
                .enumerate()
                .take((unit.rows - r0).min(2 * TILE_ROWS))
            {
                let mut row = [0.0f32; 2 * STRIP];
                for (s, t) in total.iter().enumerate() {
                    // SAFETY: 16 f32 into the row's half `s`.
                    unsafe { _mm512_storeu_ps(row[s * STRIP..].as_mut_ptr(), *t) };
                }
                out[(r0 + r) * unit.cols + c0..][..width].copy_from_slice(&row[..width]);
            }
        }
    }
    // SAFETY: releases the tile state this thread configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}
