//! Weights in panels: the layout every linear layer's `Wᵀ` is stored in, and its products.
//!
//! A panel is `[k, PANEL]` columns of `Wᵀ`, contiguous, so that a few-row product reads the
//! weight front to back ([`super::tile`]) and the blocked kernel ([`super::gemm`]) takes a
//! panel as an ordinary matrix. `Linear` packs its weight with [`pack_panels`].

use super::activation::{activate, add_bias_activate};
#[cfg(target_arch = "x86_64")]
use super::amx;
use super::gemm::{blocked_product, gemm_into, gemm_raw, threads_for_work};
use super::lanes::with_slice;
use super::tile::tile_kernel_for;
use super::{Epilogue, PARALLEL_FILL};
use crate::huge_pages;
use ndarray::parallel::prelude::*;
use ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, Axis, Dim};
use std::mem::MaybeUninit;

/// Columns of `Wᵀ` per panel of the weight layout the products read ([`pack_panels`]).
///
/// Each panel is `[k, PANEL]`, contiguous, so a product of a few rows reads a weight as one
/// front-to-back stream and the blocked kernel takes a panel as an ordinary strided matrix.
/// The plain `[k, n]` matrix reads slower: its rows, a power of two apart, share L1 sets, and
/// the prefetchers follow its many short runs badly. 128 is the narrowest panel with which the
/// blocked kernel, called once per panel, keeps its speed (`docs/performance.md`, figures
/// behind code decisions).
pub(crate) const PANEL: usize = 128;

/// `Wᵀ` (`w_t: [k, n]`) in panels: `[n.div_ceil(PANEL), k, PANEL]`, panel `p` holding columns
/// `p·PANEL ..` of `w_t`, the last one padded with zeros. On huge pages when large.
pub(crate) fn pack_panels(w_t: ArrayView2<f32>) -> Array3<f32> {
    let (k, n) = w_t.dim();
    let mut panels = huge_pages::zeros(Dim([n.div_ceil(PANEL), k, PANEL]));
    for (mut panel, cols) in panels
        .outer_iter_mut()
        .zip(w_t.axis_chunks_iter(Axis(1), PANEL))
    {
        panel
            .slice_mut(ndarray::s![.., ..cols.ncols()])
            .assign(&cols);
    }
    panels
}

/// Panel `p` of `panels` as the `[k, width]` matrix it holds (without its padding), for a
/// weight of `n` columns.
pub(super) fn panel_view(panels: ArrayView3<f32>, n: usize, p: usize) -> ArrayView2<f32> {
    let width = (n - p * PANEL).min(PANEL);
    panels
        .index_axis_move(Axis(0), p)
        .slice_move(ndarray::s![.., ..width])
}

/// `W` back from the panels of `Wᵀ` (`n` columns): `[n, k]`, PyTorch's layout, standard.
pub(crate) fn unpack_panels(panels: ArrayView3<f32>, n: usize) -> Array2<f32> {
    let k = panels.shape()[1];
    let mut w = Array2::zeros((n, k));
    for (p, mut rows) in w.axis_chunks_iter_mut(Axis(0), PANEL).enumerate() {
        rows.assign(&panel_view(panels, n, p).t());
    }
    w
}

/// `c = alpha · a · Wᵀ + beta · c` for a weight in panels ([`pack_panels`]) with `n` columns:
/// `a: [m, k]`, `c: [m, n]`.
///
/// A few rows (a short sequence, a decoding step) go through the register tiles of
/// [`super::tile`] (AVX-512, or AVX2 from 9 rows and a large enough weight); otherwise each panel is one product of the kernels of [`gemm_into`], panels
/// spread over the threads. The kernels depend on the shapes alone, so results do not depend
/// on the thread count.
pub(super) fn panels_product_into(
    a: ArrayView2<f32>,
    panels: ArrayView3<f32>,
    n: usize,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    assert_eq!(panels.shape()[1], k, "inner dimensions agree");
    assert_eq!(c.dim(), (m, n), "output is [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let threads = threads_for_work(m * k * n);
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = tile_kernel_for(m, k, n) {
        return tile.product(a, panels, n, alpha, beta, c, threads);
    }
    let pieces = panel_pieces(a, panels, n, c.view_mut());
    for_each_piece(
        pieces,
        threads,
        |Piece {
             a, panel, mut c, ..
         }| { gemm_into(a, panel, alpha, beta, &mut c, 1) },
    );
}

/// `run` on every piece, spread over `threads` threads (in list order when there is one).
fn for_each_piece<T: Send>(
    pieces: Vec<Piece<'_, '_, T>>,
    threads: usize,
    run: impl Fn(Piece<'_, '_, T>) + Send + Sync,
) {
    if threads > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

/// `epilogue(a · Wᵀ + bias)` in a new array for a weight in panels, written once into fresh
/// memory by the blocked kernel, one panel and row block per product (the largest outputs on
/// huge pages). Each block gets its bias and activation right after its product, while it is
/// still in cache, instead of in a pass over the whole output.
pub(super) fn panels_product_fresh(
    a: ArrayView2<f32>,
    panels: ArrayView3<f32>,
    n: usize,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
) -> Array2<f32> {
    let (m, k) = a.dim();
    assert_eq!(panels.shape()[1], k, "inner dimensions agree");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "one bias per output");
    }
    let mut c = if m * n >= PARALLEL_FILL {
        huge_pages::uninit(Dim([m, n]))
    } else {
        Array2::uninit((m, n))
    };
    let pieces = panel_pieces(a, panels, n, c.view_mut());
    #[cfg(target_arch = "x86_64")]
    let split = amx::SplitRows::for_product(a, n);
    let run = |piece: Piece<MaybeUninit<f32>>| {
        let Piece {
            a,
            panel,
            mut c,
            cols,
            row0,
        } = piece;
        #[cfg(target_arch = "x86_64")]
        if let Some(split) = &split {
            let panel = panels.index_axis(Axis(0), cols.start / PANEL);
            let stride = c.strides()[0] as usize;
            // SAFETY: as for `gemm_raw` below: the piece is `[a.nrows(), cols.len()]` at row
            // stride `stride` and unit column stride (a standard-layout array), valid for
            // writes and referenced by nothing else; `product` writes every element of it.
            unsafe {
                split.product(
                    row0,
                    a.nrows(),
                    panel,
                    cols.len(),
                    c.as_mut_ptr().cast(),
                    stride,
                )
            };
            // SAFETY: every element of the piece was written just above.
            finish_piece(unsafe { c.assume_init() }, bias, cols, epilogue);
            return;
        }
        let strides = [c.strides()[0], c.strides()[1]];
        // SAFETY: `c` is a piece of a new [m, n] allocation that nothing else references,
        // `[a.nrows(), panel.ncols()]` at these strides and disjoint from every other piece
        // (`panel_pieces` splits it), valid for writes (`MaybeUninit<f32>` has the layout of
        // `f32`). With beta = 0 `gemm_raw` reads none of it and writes every element: the
        // product's sum, or zero when k = 0.
        unsafe { gemm_raw(a, panel, 1.0, 0.0, c.as_mut_ptr().cast::<f32>(), strides, 1) }
        // SAFETY: every element of the piece was written just above.
        finish_piece(unsafe { c.assume_init() }, bias, cols, epilogue);
    };
    for_each_piece(pieces, threads_for_work(m * k * n), run);
    // SAFETY: the pieces cover every element of `c` (every panel, every row block), and each
    // was written above.
    unsafe { c.assume_init() }
}

/// `epilogue(x · wᵀ + bias)` written into `y` (any contents, overwritten) for a weight in
/// panels and a batch of rows: the same pieces and the same floats as
/// [`panels_product_fresh`], into the caller's memory.
pub(super) fn panels_product_biased_into(
    a: ArrayView2<f32>,
    panels: ArrayView3<f32>,
    n: usize,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    y: ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    // The tiles store whole rows of 16 floats: `y` needs unit column stride.
    #[cfg(target_arch = "x86_64")]
    let split = if y.strides()[1] == 1 && y.strides()[0] >= 0 {
        amx::SplitRows::for_product(a, n)
    } else {
        None
    };
    let run = |Piece {
                   a,
                   panel,
                   mut c,
                   cols,
                   row0,
               }: Piece<f32>| {
        #[cfg(target_arch = "x86_64")]
        if let Some(split) = &split {
            let panel = panels.index_axis(Axis(0), cols.start / PANEL);
            let stride = c.strides()[0] as usize;
            // SAFETY: the piece is `[a.nrows(), cols.len()]` of `y` at row stride `stride` and
            // unit column stride (checked above), borrowed mutably, so valid for writes and
            // referenced by nothing else during the call.
            unsafe { split.product(row0, a.nrows(), panel, cols.len(), c.as_mut_ptr(), stride) };
            finish_piece(c, bias, cols, epilogue);
            return;
        }
        // beta = 0: `c` is only written, whatever it held.
        blocked_product(a, panel, 1.0, 0.0, &mut c, 1);
        finish_piece(c, bias, cols, epilogue);
    };
    for_each_piece(
        panel_pieces(a, panels, n, y),
        threads_for_work(m * k * n),
        run,
    );
}

/// A piece's bias (its columns `cols` of it) and activation, added right after its product.
fn finish_piece(
    mut c: ArrayViewMut2<f32>,
    bias: Option<ArrayView1<f32>>,
    cols: std::ops::Range<usize>,
    epilogue: Epilogue,
) {
    match bias {
        Some(b) => {
            let b = b.slice(ndarray::s![cols]);
            for row in c.rows_mut() {
                with_slice(row, |row| add_bias_activate(row, b, epilogue));
            }
        }
        None if epilogue != Epilogue::Bias => {
            for row in c.rows_mut() {
                with_slice(row, |row| activate(row, epilogue));
            }
        }
        None => {}
    }
}

/// Rows of `a` one piece of [`panel_pieces`] takes: 512 rows of 512 inputs (1 MiB) stay in a
/// core's L2 from panel to panel; 256, 128 and the whole batch in one piece measured slower
/// (`docs/performance.md`).
const PIECE_ROWS: usize = 512;

/// One product of [`panel_pieces`]: `c = a · panel`, where `panel` holds the output columns
/// `cols`.
struct Piece<'a, 'c, T> {
    a: ArrayView2<'a, f32>,
    panel: ArrayView2<'a, f32>,
    c: ArrayViewMut2<'c, T>,
    cols: std::ops::Range<usize>,
    /// The index of `a`'s first row in the whole product's rows.
    row0: usize,
}

/// The products `a · panel` a weight in panels splits into, with the block of `c` each writes:
/// one per panel and per [`PIECE_ROWS`] rows of `a`, listed block of rows by block of rows.
/// Spread over the threads in that order, each thread works through whole rows of the output,
/// its rows of `a` staying in cache from panel to panel, which measured faster than listing
/// them panel by panel (`docs/performance.md`). The split depends on the shapes alone, so
/// results do not depend on the thread count.
fn panel_pieces<'a, 'c, T>(
    a: ArrayView2<'a, f32>,
    panels: ArrayView3<'a, f32>,
    n: usize,
    c: ArrayViewMut2<'c, T>,
) -> Vec<Piece<'a, 'c, T>> {
    let count = n.div_ceil(PANEL);
    let mut pieces = Vec::new();
    let mut a_rest = a;
    let mut c_rest = c;
    let mut row0 = 0;
    while a_rest.nrows() > 0 {
        let take = PIECE_ROWS.min(a_rest.nrows());
        let (a_rows, a_tail) = a_rest.split_at(Axis(0), take);
        let (mut c_rows, c_tail) = c_rest.split_at(Axis(0), take);
        (a_rest, c_rest) = (a_tail, c_tail);
        for p in 0..count {
            let panel = panel_view(panels, n, p);
            let (c_block, c_cols) = c_rows.split_at(Axis(1), panel.ncols());
            c_rows = c_cols;
            let start = p * PANEL;
            pieces.push(Piece {
                a: a_rows,
                panel,
                c: c_block,
                cols: start..start + panel.ncols(),
                row0,
            });
        }
        row0 += take;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::super::testing::{operands, same_sums};
    use super::super::{linear, Weight};
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::Array2;

    #[test]
    fn panels_hold_the_weight_and_products_over_them_match_the_plain_ones() {
        // Widths around the panel width; 300 and 600 rows (one and two row blocks) take the
        // blocked kernel piece by piece (600 × 200 × 600 the AMX tiles where there are some), the others the tile kernel (with AVX-512) or the other
        // kernels panel by panel.
        for (m, k, n) in [
            (600, 200, 600),
            (300, 40, 2000),
            (600, 9, 300),
            (300, 7, 130),
            (20, 33, 129),
            (3, 5, 1),
            (64, 16, 256),
            (300, 5, 0),
            (3, 5, 0),
        ] {
            let (a, w_t) = operands(m, k, n);
            let panels = pack_panels(w_t.view());
            assert_eq!(panels.dim(), (n.div_ceil(PANEL), k, PANEL));
            assert_eq!(unpack_panels(panels.view(), n), w_t.t());
            let mut expected = Array2::zeros((m, n));
            blocked_product(a.view(), w_t.view(), 1.0, 0.0, &mut expected.view_mut(), 1);
            let mut y = Array2::from_elem((m, n), f32::NAN);
            panels_product_into(a.view(), panels.view(), n, 1.0, 0.0, &mut y.view_mut());
            assert_abs_diff_eq!(y, expected, epsilon = 1e-4);
            if m > 64 {
                let fresh = panels_product_fresh(a.view(), panels.view(), n, None, Epilogue::Bias);
                same_sums(&fresh, &y, k);
                let relu =
                    panels_product_fresh(a.view(), panels.view(), n, None, Epilogue::BiasRelu);
                same_sums(&relu, &y.mapv(|v| v.max(0.0)), k);
            }
            let y = linear(
                a.view(),
                Weight::Panels(panels.view(), n),
                None,
                Epilogue::Bias,
            );
            assert_abs_diff_eq!(y, expected, epsilon = 1e-4);
        }
    }
}
