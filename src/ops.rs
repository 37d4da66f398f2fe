//! The numerical kernels: every matrix product, softmax, LayerNorm and activation of the crate.
//!
//! Layers call these and never `dot` or a GEMM directly, so the choice of matrix-multiply
//! backend is made in this one file: the [`gemm`](https://docs.rs/gemm) crate, which picks its
//! AVX-512, AVX2 or scalar kernels at run time. All kernels work on `f32` and accept strided
//! views. The softmax kernels are public for decoding code and benchmarks; the rest is internal.
//!
//! ```
//! use ndarray::array;
//! let mut scores = array![[1.0f32, 2.0, f32::NEG_INFINITY]];
//! ndtransformer::ops::softmax_rows_inplace(scores.view_mut());
//! assert_eq!(scores[[0, 2]], 0.0);
//! ```

use multiversion::multiversion;
use ndarray::parallel::prelude::*;
use ndarray::{
    Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, Axis, Dim,
};

use crate::huge_pages;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

/// Batch products on Intel's AMX tiles, at f32 precision, where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod amx;

/// `c = alpha · a · b + beta · c`, with `a: [m, k]`, `b: [k, n]`, `c: [m, n]`, spread over the
/// threads of the current rayon pool when the product is large enough to be worth it.
///
/// Any strides are accepted, so a transposed weight (`w.t()`) or one head's slice of a
/// `[batch, len, num_heads, d_k]` tensor goes in without a copy. With `beta == 0` the old
/// contents of `c` are not read.
pub(crate) fn matmul_into(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    gemm_into(a, b, alpha, beta, c, threads_for(a, b));
}

/// The threads a product of `a` and `b` is spread over ([`threads_for_work`]).
fn threads_for(a: ArrayView2<f32>, b: ArrayView2<f32>) -> usize {
    threads_for_work(a.nrows() * a.ncols() * b.ncols())
}

/// As [`matmul_into`], on the calling thread only: for products that are themselves run in
/// parallel (one per batch row and head), so that two levels of threading do not fight.
pub(crate) fn matmul_into_serial(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    gemm_into(a, b, alpha, beta, c, 1);
}

/// Runs `f` on a thread of the current rayon pool while the pool's other threads stay awake,
/// polling for work, until `f` returns.
///
/// A model pass is a chain of many short parallel loops (a 32-token encoder pass has about 60,
/// a decoding step as many). Between them rayon's idle threads go to sleep, and waking one took
/// 60–100 µs on the 2-core machine measured: a fifth of a decoding step. This is what OpenMP
/// runtimes do with their spin time. Idle threads run pool work while they wait (through
/// `rayon::yield_now`), so `f`'s loops start at once; a thread already inside such a pass
/// never waits for another one's, so concurrent passes cannot block each other. Results do not
/// change: which thread runs a piece of work never changes the arithmetic.
pub(crate) fn with_warm_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| keep_warm(&done));
        }
        let result = {
            let _in_pass = InPass::enter();
            f()
        };
        done.store(true, Ordering::Release);
        result
    })
}

thread_local! {
    /// How many [`with_warm_pool`] passes this thread is running (nested calls count).
    static WARM_PASSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as running a pass until dropped (also when the pass panics).
struct InPass;

impl InPass {
    fn enter() -> Self {
        WARM_PASSES.with(|depth| depth.set(depth.get() + 1));
        InPass
    }
}

impl Drop for InPass {
    fn drop(&mut self) {
        WARM_PASSES.with(|depth| depth.set(depth.get() - 1));
    }
}

/// An idle thread's wait for the end of a pass: run pool work when there is some, else spin.
///
/// A thread that is itself running a pass returns at once (it must get back to it), and so does
/// one that finds no work for [`MAX_IDLE`]: a long serial stretch does not need it, and no
/// arrangement of waiting threads can hold it (or a pass waiting on it) longer than that.
fn keep_warm(done: &AtomicBool) {
    if WARM_PASSES.with(|depth| depth.get()) > 0 {
        return;
    }
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let now = std::time::Instant::now();
        match idle_since {
            None => idle_since = Some(now),
            Some(start) if now.duration_since(start) > MAX_IDLE => return,
            Some(_) => std::hint::spin_loop(),
        }
    }
}

/// How long [`keep_warm`] polls without finding work before it lets its thread sleep.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

/// Below this many multiply-adds a product runs on one thread (splitting costs more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

fn gemm_into(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(k, b.nrows(), "inner dimensions agree");
    assert_eq!((m, n), c.dim(), "output is [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    match kernel_for(a, b) {
        Kernel::FewRows => few_rows_product(a, b, alpha, beta, c),
        Kernel::Streaming => streaming_product(a, b, alpha, beta, c, threads),
        Kernel::Short => short_product(a, b, alpha, beta, c, threads),
        Kernel::Blocked => blocked_product(a, b, alpha, beta, c, threads),
    }
}

/// The kernels a product can take.
enum Kernel {
    FewRows,
    Streaming,
    Short,
    Blocked,
}

/// The kernel for `a · b`, chosen by the shapes and the CPU alone, never by the thread count,
/// so that a pool of any size computes the same sums in the same order (bit-identical results).
fn kernel_for(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Kernel {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    if m <= FEW_ROWS && k * n <= FEW_ROWS_MAX_WORK {
        return Kernel::FewRows;
    }
    if m <= STREAM_ROWS && b.strides()[1] == 1 && b.nrows() > 1 {
        return Kernel::Streaming;
    }
    if SHORT_ROWS.contains(&m) {
        return Kernel::Short;
    }
    Kernel::Blocked
}

/// Products with this many rows (a short sequence) that [`tile_product`] does not take (no
/// AVX-512, or a strided `b`) use `matrixmultiply`'s kernels, which measured faster than `gemm`'s
/// there (docs/gemm_backends.md; the encoder on one 32-token sequence went from 17.3 to 14.5 ms
/// at 2 threads).
const SHORT_ROWS: std::ops::RangeInclusive<usize> = 16..=32;

/// `c = alpha · a · b + beta · c` through `matrixmultiply` (via ndarray), column blocks of `b`
/// spread over `threads`.
fn short_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    let n = b.ncols();
    if threads <= 1 || n < 2 * SHORT_COLS {
        ndarray::linalg::general_mat_mul(alpha, &a, &b, beta, c);
        return;
    }
    let width = n.div_ceil(threads * 4).max(SHORT_COLS);
    c.axis_chunks_iter_mut(Axis(1), width)
        .into_par_iter()
        .zip(b.axis_chunks_iter(Axis(1), width))
        .for_each(|(mut c_block, b_block)| {
            ndarray::linalg::general_mat_mul(alpha, &a, &b_block, beta, &mut c_block)
        });
}

/// Narrowest column block [`short_product`] gives a thread.
const SHORT_COLS: usize = 128;

/// The `gemm` crate's blocked kernel (packing, AVX-512/AVX2 micro-kernels, `threads` threads).
fn blocked_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    // Checked here, not only by the callers: the unsafe call below relies on them.
    assert_eq!(b.nrows(), a.ncols(), "inner dimensions agree");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "output is [m, n]");
    let strides = [c.strides()[0], c.strides()[1]];
    // SAFETY: `c` is a live mutable view of [m, n] initialised f32s with these strides (the
    // asserts), so it is valid for the reads (beta ≠ 0) and writes `gemm_raw` makes, and no
    // other reference reaches its elements while the call runs.
    unsafe { gemm_raw(a, b, alpha, beta, c.as_mut_ptr(), strides, threads) }
}

/// `a · b` in a new array, computed by the blocked kernel into fresh memory that is written
/// once, never zeroed or filled first (the largest outputs on huge pages, [`huge_pages`]).
fn blocked_product_fresh(a: ArrayView2<f32>, b: ArrayView2<f32>, threads: usize) -> Array2<f32> {
    assert_eq!(b.nrows(), a.ncols(), "inner dimensions agree");
    let (m, n) = (a.nrows(), b.ncols());
    // The largest outputs (the logits) on huge pages; a layer's activations as the allocator
    // gives them, which reuses freed memory (huge pages there measured slower in generation).
    let mut c = if m * n >= PARALLEL_FILL {
        huge_pages::uninit(Dim([m, n]))
    } else {
        Array2::uninit((m, n))
    };
    let strides = [c.strides()[0], c.strides()[1]];
    // SAFETY: `c` is a new standard-layout [m, n] allocation that nothing else references,
    // valid for writes at these strides (`MaybeUninit<f32>` has the layout of `f32`). With
    // beta = 0, `gemm_raw` reads none of `c` and writes every element of it: the product's
    // sum, or zero when k = 0 (see the unit test `blocked_kernel_with_empty_inner_dimension_
    // scales_c`). So every element is initialised before `assume_init`.
    unsafe {
        gemm_raw(
            a,
            b,
            1.0,
            0.0,
            c.as_mut_ptr().cast::<f32>(),
            strides,
            threads,
        );
        c.assume_init()
    }
}

/// `c = alpha · a · b + beta · c` through `gemm::gemm`, for `c` given as a pointer to its first
/// element and its row and column strides (in elements); with `beta == 0` `c` is only written.
///
/// # Safety
/// `c` must point to an `[a.nrows(), b.ncols()]` array with these strides, valid for writes,
/// and for reads of initialised `f32`s when `beta ≠ 0`; no other reference may access its
/// elements during the call, and distinct indices must address distinct elements.
unsafe fn gemm_raw(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: *mut f32,
    [c_rs, c_cs]: [isize; 2],
    threads: usize,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(b.nrows(), k, "inner dimensions agree");
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let [a_rs, a_cs] = [a.strides()[0], a.strides()[1]];
    let [b_rs, b_cs] = [b.strides()[0], b.strides()[1]];
    // SAFETY: `gemm::gemm` computes `dst := alpha·dst + beta·lhs·rhs` (alpha and beta swapped
    // from BLAS's), reading dst only when `read_dst`, over m × n × k elements addressed as
    // `ptr + row·rs + col·cs`.
    // - In bounds: `a` and `b` are live ndarray views, of shapes [m, k] and [k, n] (asserted),
    //   and the caller guarantees `c` is an [m, n] array with strides `c_rs`, `c_cs`. Negative
    //   strides are fine (gemm flips them first), and so are zero strides of `a` and `b`
    //   (broadcast reads). m = 0 or n = 0 makes no access; k = 0 reads neither `a` nor `b`,
    //   whose pointers may then dangle, and only zeroes or scales `c` (gemm-common 0.19,
    //   `gemm_basic_generic`).
    // - No aliasing: the caller guarantees `c`'s elements are distinct and reached by no other
    //   reference, so they are disjoint from `a`'s and `b`'s, which are only read. With
    //   `Parallelism::Rayon` the threads write disjoint blocks of `c`, and gemm returns when
    //   they are done, while the borrows of `a` and `b` are still live.
    // - `c` is read only when `beta ≠ 0`, and then holds initialised f32s (the caller's
    //   guarantee).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Columns of `Wᵀ` per panel of the weight layout the products read ([`pack_panels`]).
///
/// Each panel is `[k, PANEL]`, contiguous, so a product of a few rows reads a weight as one
/// front-to-back stream and the blocked kernel takes a panel as an ordinary strided matrix.
/// Measured on the README's machine with a standalone copy of the few-row kernel (1 thread,
/// 32 rows × 512 → 2048): with panels of 32, 64 and 128 columns it ran at 140, 134 and 130
/// GFLOP/s against 93 reading the plain `[k, n]` matrix (whose rows, a power of two apart,
/// share L1 sets, and whose many short runs the prefetchers follow badly); the blocked kernel
/// called once per panel kept its speed with 128 columns (1024 rows: 284–302 GFLOP/s at 2
/// threads against 276–306 for one call on the plain matrix) but lost 5–10% with 64 and 25%
/// with 32.
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
fn panel_view(panels: ArrayView3<f32>, n: usize, p: usize) -> ArrayView2<f32> {
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
/// A few rows (a short sequence, a decoding step) go through [`tile_product`] where the CPU
/// has AVX-512; otherwise each panel is one product of the kernels of [`gemm_into`], panels
/// spread over the threads. The kernels depend on the shapes alone, so results do not depend
/// on the thread count.
fn panels_product_into(
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
    if let Some(simd) = tile_simd(m) {
        return tile_product(simd, a, panels, n, alpha, beta, c, threads);
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
fn panels_product_fresh(
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
fn panels_product_biased_into(
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
/// core's L2 from panel to panel. The full forward of the README's batch measured 462–472 ms
/// with 512, 476–483 with 256, 496 with 128 and 488 with the whole batch in one piece (runs
/// alternating them in one process).
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
/// its rows of `a` staying in cache from panel to panel: with 256-row pieces the full forward
/// of the README's batch measured 475 and 486 ms against 503 and 504 listing them panel by
/// panel (all rows in one piece when there are eight panels or more), in runs alternating the
/// two in one process. The split depends on the shapes alone, so results do not depend on the
/// thread count.
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

/// The threads a product of `work` multiply-adds is spread over: all of the pool's, unless it
/// is too small to be worth splitting.
fn threads_for_work(work: usize) -> usize {
    if work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// AVX-512, if the CPU has it and a product of `m` rows is one for [`tile_product`].
#[cfg(target_arch = "x86_64")]
fn tile_simd(m: usize) -> Option<pulp::x86::V4> {
    if TILE_ROWS.contains(&m) {
        pulp::x86::V4::try_new()
    } else {
        None
    }
}

/// Rows of `a` and columns of `b` one register tile of [`tile_product`] holds: 8 × 32 sums are
/// sixteen AVX-512 registers.
#[cfg(target_arch = "x86_64")]
const TILE_M: usize = 8;
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
/// hardware prefetchers alone the two took turns. With the panels and these requests a linear
/// layer of 32 rows × 512 → 2048 on 1 thread ran at 139 GFLOP/s with its weight in cache and
/// 112 with 40 weights in turn (160 MB), against 97 for both reading the plain `[k, n]` matrix. The requests go to L2: into L1 they stalled on its few
/// fill buffers, and a decoding step (one row tile) took about 20% longer. Each sum runs over `k` in
/// order whatever the tiling and thread count, so results do not depend on either.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tile_product(
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
        // line out of that core's cache (3% of a decoding step, measured).
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
/// time by register shuffles. Element by element, packing took about a tenth of a 32-token
/// encoder pass; with the shuffles the pass measured 5.62 → 5.19 ms at 2 threads.
#[cfg(target_arch = "x86_64")]
fn transpose_rows(simd: pulp::x86::V4, rows: [&[f32]; TILE_M], out: &mut [[f32; TILE_M]]) {
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
fn store_sums(mut c: ArrayViewMut1<f32>, sums: &[f32], alpha: f32, beta: f32) {
    let sums = ArrayView1::from(sums);
    if beta == 0.0 {
        c.zip_mut_with(&sums, |c, &s| *c = alpha * s);
    } else {
        c.zip_mut_with(&sums, |c, &s| *c = alpha * s + beta * *c);
    }
}

/// At most this many rows times a row-major weight (a decoding step's projections) go through
/// [`streaming_product`]: such a product is bound by reading the weight once, which the blocked
/// kernel's packing does in pieces the prefetchers follow badly.
const STREAM_ROWS: usize = 8;
/// Widest column block of `b` a thread takes in [`streaming_product`]: four 4 KiB row pieces
/// and one accumulator row stay in L1.
const STREAM_COLS: usize = 1024;

/// `c = alpha · a · b + beta · c` for at most [`STREAM_ROWS`] rows of `a` and a `b` whose rows
/// are contiguous: `b` is read once, row after row, in runs of up to 4 KiB, and never packed.
///
/// Threads take column blocks of `b`; every column sums over the rows of `b` in the same order
/// whatever the block width, so the result does not depend on the thread count.
fn streaming_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
    threads: usize,
) {
    let m = a.nrows();
    let n = b.ncols();
    // aᵀ as [k, m]: the m multipliers of one row of b sit together.
    let a_t: Vec<f32> = a.t().iter().copied().collect();
    let width = n
        .div_ceil(2 * threads)
        .next_multiple_of(LANES)
        .clamp(64, STREAM_COLS);
    c.axis_chunks_iter_mut(Axis(1), width)
        .into_par_iter()
        .zip(b.axis_chunks_iter(Axis(1), width))
        .for_each(|(mut c_block, b_block)| {
            let w = b_block.ncols();
            let rows: Vec<&[f32]> = b_block
                .rows()
                .into_iter()
                .map(|row| row.to_slice().expect("rows of b are contiguous"))
                .collect();
            let mut acc = vec![0.0f32; m * w];
            stream_block(&a_t, m, &rows, &mut acc, w);
            for (i, c_row) in c_block.rows_mut().into_iter().enumerate() {
                store_sums(c_row, &acc[i * w..(i + 1) * w], alpha, beta);
            }
        });
}

/// `acc[i, :] += Σ_r a_t[r, i] · b_rows[r]` for one work unit of [`streaming_product`], four
/// rows of `b` at a time so that each accumulator load and store carries four multiply-adds.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn stream_block(a_t: &[f32], m: usize, rows: &[&[f32]], acc: &mut [f32], width: usize) {
    let mut groups = rows.chunks_exact(4);
    let mut r = 0;
    for g in groups.by_ref() {
        let (b0, b1, b2, b3) = (
            &g[0][..width],
            &g[1][..width],
            &g[2][..width],
            &g[3][..width],
        );
        for i in 0..m {
            let s = [
                a_t[r * m + i],
                a_t[(r + 1) * m + i],
                a_t[(r + 2) * m + i],
                a_t[(r + 3) * m + i],
            ];
            let acc_i = &mut acc[i * width..(i + 1) * width];
            for j in 0..width {
                acc_i[j] += s[0] * b0[j] + s[1] * b1[j] + s[2] * b2[j] + s[3] * b3[j];
            }
        }
        r += 4;
    }
    for row in groups.remainder() {
        let row = &row[..width];
        for i in 0..m {
            let s = a_t[r * m + i];
            for (acc_ij, &b_j) in acc[i * width..(i + 1) * width].iter_mut().zip(row) {
                *acc_ij += s * b_j;
            }
        }
        r += 1;
    }
}

/// At most this many rows (one decoding step's queries per head) go through
/// [`few_rows_product`] instead of the blocked kernel, whose packing costs more than it saves.
const FEW_ROWS: usize = 4;
/// ... as long as the other operand is small (an attention head's keys or values).
const FEW_ROWS_MAX_WORK: usize = 1 << 16;

/// `c = alpha · a · b + beta · c` for a few rows of `a`, row by row: dot products with the
/// columns of `b` when those are contiguous (`b = Kᵀ`), else scaled sums of the rows of `b`
/// (`b = V`).
fn few_rows_product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    for (a_row, mut c_row) in a.rows().into_iter().zip(c.rows_mut()) {
        if beta == 0.0 {
            c_row.fill(0.0);
        } else if beta != 1.0 {
            c_row *= beta;
        }
        if b.strides()[0] == 1 {
            for (c_ij, b_col) in c_row.iter_mut().zip(b.columns()) {
                *c_ij += alpha * dot(a_row, b_col);
            }
        } else {
            for (&a_il, b_row) in a_row.iter().zip(b.rows()) {
                if a_il != 0.0 {
                    match (c_row.as_slice_mut(), b_row.as_slice()) {
                        (Some(c), Some(b)) => axpy_slices(alpha * a_il, b, c),
                        _ => c_row.scaled_add(alpha * a_il, &b_row),
                    }
                }
            }
        }
    }
}

/// `y += s · x`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn axpy_slices(s: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += s * x;
    }
}

/// Rows ahead of the one being read that a step's attention asks the cache for: the keys and
/// values come from memory, and the hardware prefetchers alone left it waiting (a decoding step
/// 6% faster with 16 rows ahead than without; 4 and 32 rows measured slower than 16).
const PREFETCH_ROWS: usize = 16;

/// Asks the CPU to start loading the cache lines of `len` floats from `p`. A hint only: it
/// never faults and reads nothing the program sees, so an address past the data is harmless.
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(sse) = pulp::core_arch::x86::Sse::try_new() {
        for i in (0..len).step_by(16) {
            sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(i).cast());
        }
    }
}

/// One query's scores against keys stored transposed, `keys_t` `[d_k][stride]` with the keys
/// along each row: `scores[j] = Σ_d (scale · q[d]) · keys_t[d·stride + j]` for
/// `j < scores.len()`, summed over `d` in order and skipping zero entries of `q`, the arithmetic
/// [`matmul_into`] does for `q Kᵀ` on that layout.
pub(crate) fn query_scores(
    q: &[f32],
    scale: f32,
    keys_t: &[f32],
    stride: usize,
    scores: &mut [f32],
) {
    scaled_row_sum(q, scale, keys_t, stride, scores);
}

/// `out = Σ_j w[j] · rows[j]` for rows of `out.len()` values laid end to end in `rows` (one
/// query's attention output from its weights and the values), in order of `j` and skipping
/// zero weights, as [`matmul_into`] does for `w V`.
pub(crate) fn weighted_rows(w: &[f32], rows: &[f32], out: &mut [f32]) {
    scaled_row_sum(w, 1.0, rows, out.len(), out);
}

/// Query rows one register tile of the attention kernels ([`head_scores`], [`head_values`])
/// covers.
#[cfg(target_arch = "x86_64")]
const HEAD_TILE_M: usize = 6;
/// AVX-512 vectors across a register tile: [`HEAD_TILE_N`] keys (scores) or value columns
/// (outputs). 6 × 4 sums take 24 of the 32 registers, and each step loads ten values for 24
/// fused multiply-adds.
#[cfg(target_arch = "x86_64")]
const HEAD_VECTORS: usize = 4;
#[cfg(target_arch = "x86_64")]
const HEAD_TILE_N: usize = 16 * HEAD_VECTORS;

/// Memory the attention kernels reuse from head to head (one per task).
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct HeadScratch {
    /// The head's keys transposed, strip by strip: `[src_len / HEAD_TILE_N][d_k][HEAD_TILE_N]`
    /// (rounded up), so that a register tile reads one contiguous block.
    keys_t: Vec<f32>,
    /// The head's values as a contiguous `[src_len, d_v]` matrix.
    values: Vec<f32>,
    /// Zeros standing in for the rows past the last one of a partial register tile.
    zeros: Vec<f32>,
    /// Eight keys transposed, `[d_k][8]`, on their way into `keys_t`.
    block: Vec<[f32; 8]>,
}

/// Keys query `i` of `tgt_len` sees out of `src_len` under a causal mask (bottom-right aligned,
/// as [`crate::Mask`]): those up to its own position.
#[cfg(target_arch = "x86_64")]
fn visible_keys(i: usize, tgt_len: usize, src_len: usize) -> usize {
    (i + src_len + 1).saturating_sub(tgt_len).min(src_len)
}

/// One head's scores, `s = scale · q kᵀ` (§3.2.1), with `q: [tgt_len, d_k]`,
/// `k: [src_len, d_k]`, `s: [tgt_len, src_len]`.
///
/// With `causal`, scores of keys in a query's future (which the mask hides anyway) need not be
/// computed. On AVX-512 with contiguous rows the product then runs on the crate's register tiles
/// ([`head_scores_tiles`]), which skip whole tiles of them and set those to `-inf`, leaving the
/// rest to the mask; otherwise on [`gemm_into`]'s kernels. On the README's machine (64 heads of
/// 128 × 128 × 64, heads-strided, scores to outputs) the tiles took 1.48 ms against 1.73–1.77
/// for `gemm` with a causal mask, and 1.79–1.82 against 1.73–1.75 without one, hence only
/// there. Both sum each score over `d_k` in order; they gave bit-identical results.
pub(crate) fn head_scores(
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    scale: f32,
    causal: bool,
    scratch: &mut HeadScratch,
    s: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(q.ncols(), k.ncols(), "queries and keys have the same width");
    assert_eq!(
        s.dim(),
        (q.nrows(), k.nrows()),
        "scores are [tgt_len, src_len]"
    );
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(simd), true, true, Some(s)) = (
        causal,
        pulp::x86::V4::try_new(),
        rows_contiguous(q),
        rows_contiguous(k),
        s.as_slice_mut(),
    ) {
        return head_scores_tiles(simd, q, k, scale, scratch, s);
    }
    matmul_into_serial(q, k.t(), scale, 0.0, s);
}

/// One head's outputs, `out = p v` (§3.2.1), from its attention weights `p: [tgt_len, src_len]`
/// and values `v: [src_len, d_v]`; `out: [tgt_len, d_v]`.
///
/// With `causal`, the weights of keys in a query's future must be 0 (a soft-maxed masked row):
/// on AVX-512 the register tiles of [`head_values_tiles`] skip the keys no query of theirs
/// sees, as dropping a term whose weight is 0 leaves a sum unchanged; otherwise, and without a
/// causal mask, [`gemm_into`]'s kernels (see [`head_scores`]). Each output sums over the keys
/// in order.
pub(crate) fn head_values(
    p: ArrayView2<f32>,
    v: ArrayView2<f32>,
    causal: bool,
    scratch: &mut HeadScratch,
    out: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(p.ncols(), v.nrows(), "one weight per value");
    assert_eq!(
        out.dim(),
        (p.nrows(), v.ncols()),
        "output is [tgt_len, d_v]"
    );
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(simd), Some(p), true, 0) = (
        causal,
        pulp::x86::V4::try_new(),
        p.as_slice(),
        rows_contiguous(v) && rows_contiguous(out.view()),
        v.ncols() % HEAD_TILE_N,
    ) {
        return head_values_tiles(simd, p, v, scratch, out);
    }
    matmul_into_serial(p, v, 1.0, 0.0, out);
}

/// Whether every row of `x` is a contiguous slice.
#[cfg(target_arch = "x86_64")]
fn rows_contiguous(x: ArrayView2<f32>) -> bool {
    x.ncols() <= 1 || x.strides()[1] == 1
}

/// [`head_scores`] under a causal mask on AVX-512 register tiles of [`HEAD_TILE_M`] queries ×
/// [`HEAD_TILE_N`] keys, skipping the tiles whose keys no query of the tile sees; `s` is the
/// standard-layout score matrix.
#[cfg(target_arch = "x86_64")]
fn head_scores_tiles(
    simd: pulp::x86::V4,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    scale: f32,
    scratch: &mut HeadScratch,
    s: &mut [f32],
) {
    let ((tgt_len, d_k), src_len) = (q.dim(), k.nrows());
    let HeadScratch {
        keys_t,
        zeros,
        block,
        ..
    } = scratch;
    let keys_t = transpose_keys(simd, k, keys_t, block);
    if zeros.len() < d_k {
        zeros.resize(d_k, 0.0);
    }
    let zeros = &zeros[..d_k];
    let strip_len = d_k * HEAD_TILE_N;
    let scale = simd.splat_f32x16(scale);
    simd.vectorize(
        #[inline(always)]
        || {
            for i0 in (0..tgt_len).step_by(HEAD_TILE_M) {
                let rows = (tgt_len - i0).min(HEAD_TILE_M);
                let q_rows: [&[f32]; HEAD_TILE_M] = std::array::from_fn(|r| {
                    if r < rows {
                        q.row(i0 + r).to_slice().expect("contiguous rows")
                    } else {
                        zeros
                    }
                });
                // Keys the tile's last (most advanced) query sees.
                let limit = visible_keys(i0 + rows - 1, tgt_len, src_len);
                for (strip, keys) in keys_t
                    .chunks_exact(strip_len)
                    .take(limit.div_ceil(HEAD_TILE_N))
                    .enumerate()
                {
                    let sums = score_tile(simd, &q_rows, keys);
                    let j0 = strip * HEAD_TILE_N;
                    let cols = (src_len - j0).min(HEAD_TILE_N);
                    for (r, sums) in sums.iter().enumerate().take(rows) {
                        let sums: [f32; HEAD_TILE_N] =
                            pulp::bytemuck::cast(sums.map(|x| simd.mul_f32x16(scale, x)));
                        let start = (i0 + r) * src_len + j0;
                        s[start..start + cols].copy_from_slice(&sums[..cols]);
                    }
                }
                let computed = limit.next_multiple_of(HEAD_TILE_N).min(src_len);
                for r in 0..rows {
                    let row = (i0 + r) * src_len;
                    s[row + computed..row + src_len].fill(f32::NEG_INFINITY);
                }
            }
        },
    );
}

/// `k: [src_len, d_k]` into `keys_t` as `[strip][d_k][HEAD_TILE_N]`, returned: strip `t`, row
/// `d` holds `k[t·HEAD_TILE_N + j][d]` for `j < HEAD_TILE_N` (slots past the last key keep
/// what the buffer held: the sums they feed are never stored). Eight keys at a time go through
/// the register transposition of [`transpose_rows`].
#[cfg(target_arch = "x86_64")]
fn transpose_keys<'a>(
    simd: pulp::x86::V4,
    k: ArrayView2<f32>,
    keys_t: &'a mut Vec<f32>,
    block: &mut Vec<[f32; TILE_M]>,
) -> &'a [f32] {
    let (src_len, d_k) = k.dim();
    let strips = src_len.div_ceil(HEAD_TILE_N);
    // Every key's slots are written below; the padding's only feed sums that are never stored,
    // so the buffer is not cleared from head to head.
    let len = strips * d_k * HEAD_TILE_N;
    if keys_t.len() < len {
        keys_t.resize(len, 0.0);
    }
    let keys_t = &mut keys_t[..len];
    block.resize(d_k, [0.0; TILE_M]);
    for (g, keys) in k.axis_chunks_iter(Axis(0), TILE_M).enumerate() {
        let (strip, offset) = (g * TILE_M / HEAD_TILE_N, g * TILE_M % HEAD_TILE_N);
        let out = &mut keys_t[strip * d_k * HEAD_TILE_N..][..d_k * HEAD_TILE_N];
        let row = |j: usize| keys.row(j).to_slice().expect("contiguous rows");
        if keys.nrows() == TILE_M {
            transpose_rows(simd, std::array::from_fn(row), block);
            for (d, values) in block.iter().enumerate() {
                out[d * HEAD_TILE_N + offset..][..TILE_M].copy_from_slice(values);
            }
        } else {
            for j in 0..keys.nrows() {
                for (d, &x) in row(j).iter().enumerate() {
                    out[d * HEAD_TILE_N + offset + j] = x;
                }
            }
        }
    }
    keys_t
}

/// One register tile of [`head_scores_tiles`]: `sums[r][j] = Σ_d q_rows[r][d] · keys[d][j]`
/// for the strip `keys: [d_k][HEAD_TILE_N]`, over `d` in order, one fused multiply-add a term.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn score_tile(
    simd: pulp::x86::V4,
    q_rows: &[&[f32]; HEAD_TILE_M],
    keys: &[f32],
) -> [[pulp::f32x16; HEAD_VECTORS]; HEAD_TILE_M] {
    let mut acc = [[simd.splat_f32x16(0.0); HEAD_VECTORS]; HEAD_TILE_M];
    for (d, keys) in keys.chunks_exact(HEAD_TILE_N).enumerate() {
        let keys: [pulp::f32x16; HEAD_VECTORS] =
            pulp::bytemuck::cast(*<&[f32; HEAD_TILE_N]>::try_from(keys).expect("a strip row"));
        for (acc_r, q_row) in acc.iter_mut().zip(q_rows) {
            let x = simd.splat_f32x16(q_row[d]);
            for (acc, &keys) in acc_r.iter_mut().zip(&keys) {
                *acc = simd.mul_add_f32x16(x, keys, *acc);
            }
        }
    }
    acc
}

/// [`head_values`] under a causal mask on AVX-512 register tiles of [`HEAD_TILE_M`] queries ×
/// [`HEAD_TILE_N`] value columns, each summing over the keys its queries see; `p` is the
/// standard-layout weight matrix. Values with strided rows (one head of a projection) are
/// copied into one contiguous block first: read in place, their rows, a power of two apart,
/// share a few L1 sets.
#[cfg(target_arch = "x86_64")]
fn head_values_tiles(
    simd: pulp::x86::V4,
    p: &[f32],
    v: ArrayView2<f32>,
    scratch: &mut HeadScratch,
    out: &mut ArrayViewMut2<f32>,
) {
    let (src_len, d_v) = v.dim();
    let tgt_len = out.nrows();
    let HeadScratch { values, zeros, .. } = scratch;
    let values: &[f32] = match v.as_slice() {
        Some(values) => values,
        None => {
            values.clear();
            for row in v.rows() {
                values.extend_from_slice(row.to_slice().expect("contiguous rows"));
            }
            values
        }
    };
    if zeros.len() < src_len {
        zeros.resize(src_len, 0.0);
    }
    let zeros = &zeros[..src_len];
    simd.vectorize(
        #[inline(always)]
        || {
            for i0 in (0..tgt_len).step_by(HEAD_TILE_M) {
                let rows = (tgt_len - i0).min(HEAD_TILE_M);
                let limit = visible_keys(i0 + rows - 1, tgt_len, src_len);
                let p_rows: [&[f32]; HEAD_TILE_M] = std::array::from_fn(|r| {
                    if r < rows {
                        &p[(i0 + r) * src_len..][..limit]
                    } else {
                        &zeros[..limit]
                    }
                });
                for c0 in (0..d_v).step_by(HEAD_TILE_N) {
                    let sums = value_tile(simd, &p_rows, &values[c0..], d_v);
                    for (r, sums) in sums.iter().enumerate().take(rows) {
                        let sums: [f32; HEAD_TILE_N] = pulp::bytemuck::cast(*sums);
                        let mut row = out.row_mut(i0 + r);
                        let row = row.as_slice_mut().expect("contiguous output rows");
                        row[c0..c0 + HEAD_TILE_N].copy_from_slice(&sums);
                    }
                }
            }
        },
    );
}

/// One register tile of [`head_values_tiles`]:
/// `sums[r][c] = Σ_j p_rows[r][j] · values[j·d_v + c]` for `c < HEAD_TILE_N`, over `j` in
/// order, one fused multiply-add a term.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn value_tile(
    simd: pulp::x86::V4,
    p_rows: &[&[f32]; HEAD_TILE_M],
    values: &[f32],
    d_v: usize,
) -> [[pulp::f32x16; HEAD_VECTORS]; HEAD_TILE_M] {
    let mut acc = [[simd.splat_f32x16(0.0); HEAD_VECTORS]; HEAD_TILE_M];
    let keys = p_rows[0].len();
    for (j, value) in values.chunks(d_v).take(keys).enumerate() {
        let value: [pulp::f32x16; HEAD_VECTORS] = pulp::bytemuck::cast(
            *<&[f32; HEAD_TILE_N]>::try_from(&value[..HEAD_TILE_N]).expect("a strip"),
        );
        for (acc_r, p_row) in acc.iter_mut().zip(p_rows) {
            let w = simd.splat_f32x16(p_row[j]);
            for (acc, &value) in acc_r.iter_mut().zip(&value) {
                *acc = simd.mul_add_f32x16(w, value, *acc);
            }
        }
    }
    acc
}

/// `out = Σ_r (scale · c[r]) · rows[r·stride..][..out.len()]`, in order of `r`, skipping zero
/// coefficients, asking for the row [`PREFETCH_ROWS`] ahead as it goes (both kernels of a
/// step's single-query attention).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn scaled_row_sum(c: &[f32], scale: f32, rows: &[f32], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    let width = out.len();
    for (r, (&c_r, row)) in c.iter().zip(rows.chunks(stride)).enumerate() {
        prefetch(
            rows.as_ptr().wrapping_add((r + PREFETCH_ROWS) * stride),
            width,
        );
        if c_r != 0.0 {
            let s = scale * c_r;
            for (o, &x) in out.iter_mut().zip(&row[..width]) {
                *o += s * x;
            }
        }
    }
}

/// `x · y` with [`LANES`] partial sums when both are contiguous.
fn dot(x: ArrayView1<f32>, y: ArrayView1<f32>) -> f32 {
    match (x.as_slice(), y.as_slice()) {
        (Some(x), Some(y)) => dot_slices(x, y),
        _ => x.dot(&y),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn dot_slices(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xc, yc) in xs.zip(ys) {
        for ((a, &p), &q) in acc.iter_mut().zip(xc).zip(yc) {
            *a += p * q;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// What [`linear`] does after the product: the bias (folded into the product) and an activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `y + b`
    Bias,
    /// `max(0, y + b)`
    BiasRelu,
    /// `gelu(y + b)`, exact
    BiasGelu,
}

/// A weight as [`linear`] takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weight<'a> {
    /// `W`, `[out, in]` (PyTorch's layout), any strides: a tied embedding table.
    Plain(ArrayView2<'a, f32>),
    /// `Wᵀ` in panels ([`pack_panels`]), with its number of columns (`out`).
    Panels(ArrayView3<'a, f32>, usize),
}

impl Weight<'_> {
    /// `out`, the number of outputs.
    fn out_features(&self) -> usize {
        match self {
            Weight::Plain(w) => w.nrows(),
            Weight::Panels(_, n) => *n,
        }
    }
}

/// `epilogue(x · wᵀ, bias)`, with `x: [rows, in]`, `w: [out, in]`; returns `[rows, out]`.
///
/// Products of many rows are written once into fresh memory, and the bias and activation
/// added to each block of it right after its product (weights in panels) or in one pass over
/// it by all threads (a plain weight). Otherwise the output starts as the bias, repeated
/// on every row, and the product is added to it (`beta = 1`): the sum `x · wᵀ + b` is the same
/// float either way, and this saves a zeroing pass and a bias pass over the output. An
/// activation, if any, is one more pass.
pub(crate) fn linear(
    x: ArrayView2<f32>,
    w: Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
) -> Array2<f32> {
    let (rows, out) = (x.nrows(), w.out_features());
    if rows * out > 0 && takes_blocked(x, w) {
        return match w {
            Weight::Plain(w) => {
                let mut y = blocked_product_fresh(x, w.t(), threads_for(x, w.t()));
                bias_activate_rows(y.view_mut(), bias, epilogue);
                y
            }
            Weight::Panels(panels, n) => panels_product_fresh(x, panels, n, bias, epilogue),
        };
    }
    let mut y = match bias {
        // Large outputs of few rows (a wide vocabulary's logits in a step) come as fresh zeroed
        // huge pages and are filled by all threads.
        Some(b) if rows * out >= PARALLEL_FILL => {
            let mut y = huge_pages::zeros(Dim([rows, out]));
            fill_rows(y.view_mut(), b);
            y
        }
        Some(b) => {
            let b = b.to_vec();
            let mut data = Vec::with_capacity(rows * out);
            for _ in 0..rows {
                data.extend_from_slice(&b);
            }
            Array2::from_shape_vec((rows, out), data).expect("rows × out values")
        }
        None => huge_pages::zeros(Dim([rows, out])),
    };
    add_product(x, w, bias.is_some(), epilogue, y.view_mut());
    y
}

/// [`linear`] written into `y: [rows, out]` (whatever it holds), the same floats: for a caller
/// that keeps its output buffer from call to call (a batch's logits are 131 MB, which fresh
/// memory must have the kernel zero first, page by page).
pub(crate) fn linear_into(
    x: ArrayView2<f32>,
    w: Weight,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    let (rows, out) = (x.nrows(), w.out_features());
    assert_eq!(y.dim(), (rows, out), "output is [rows, out]");
    if rows * out == 0 {
        return;
    }
    if takes_blocked(x, w) {
        match w {
            Weight::Plain(w) => {
                blocked_product(x, w.t(), 1.0, 0.0, &mut y, threads_for(x, w.t()));
                bias_activate_rows(y, bias, epilogue);
            }
            Weight::Panels(panels, n) => {
                panels_product_biased_into(x, panels, n, bias, epilogue, y)
            }
        }
        return;
    }
    // Few rows: the bias first, the product added to it, as in `linear`.
    match bias {
        Some(b) => fill_rows(y.view_mut(), b),
        None => y.fill(0.0),
    }
    add_product(x, w, bias.is_some(), epilogue, y);
}

/// Whether `x · wᵀ` takes the blocked kernel (a batch of rows), whose output [`linear`] writes
/// once into fresh memory; the choice depends on the shapes alone.
fn takes_blocked(x: ArrayView2<f32>, w: Weight) -> bool {
    match w {
        Weight::Plain(w) => matches!(kernel_for(x, w.t()), Kernel::Blocked),
        Weight::Panels(panels, n) => {
            !uses_tile(x.nrows())
                && matches!(kernel_for(x, panel_view(panels, n, 0)), Kernel::Blocked)
        }
    }
}

/// Every row of `y` set to `b`, rows in parallel.
fn fill_rows(mut y: ArrayViewMut2<f32>, b: ArrayView1<f32>) {
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .with_min_len(16)
        .for_each(|mut row| row.assign(&b));
}

/// `y = epilogue(y + bias)` on every row of `y`, which holds `x · wᵀ`; rows in parallel.
fn bias_activate_rows(
    mut y: ArrayViewMut2<f32>,
    bias: Option<ArrayView1<f32>>,
    epilogue: Epilogue,
) {
    match bias {
        Some(b) => y
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .with_min_len(16)
            .for_each(|row| with_slice(row, |row| add_bias_activate(row, b, epilogue))),
        None if epilogue != Epilogue::Bias => activate_rows(y, epilogue),
        None => {}
    }
}

/// `y = epilogue(y + x · wᵀ)` when `y` holds the bias (`onto_bias`), else `epilogue(x · wᵀ)`
/// over whatever `y` holds.
fn add_product(
    x: ArrayView2<f32>,
    w: Weight,
    onto_bias: bool,
    epilogue: Epilogue,
    mut y: ArrayViewMut2<f32>,
) {
    let beta = if onto_bias { 1.0 } else { 0.0 };
    match w {
        Weight::Plain(w) => matmul_into(x, w.t(), 1.0, beta, &mut y),
        Weight::Panels(panels, n) => panels_product_into(x, panels, n, 1.0, beta, &mut y),
    }
    if epilogue != Epilogue::Bias {
        activate_rows(y, epilogue);
    }
}

/// Whether a product of `rows` rows with a weight in panels runs on [`tile_product`].
fn uses_tile(rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tile_simd(rows).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rows;
        false
    }
}

/// Outputs of at least this many values lie on huge pages and, when they start as the bias,
/// get it written by all threads.
const PARALLEL_FILL: usize = 1 << 22;

/// The epilogue's activation on every row of `y`, which already holds `x · wᵀ + b`; rows in
/// parallel.
fn activate_rows(mut y: ArrayViewMut2<f32>, epilogue: Epilogue) {
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .with_min_len(16)
        .for_each(|row| with_slice(row, |row| activate(row, epilogue)));
}

/// `row = epilogue(row + bias)`: the bias added to the product's sum, then the activation.
fn add_bias_activate(row: &mut [f32], bias: ArrayView1<f32>, epilogue: Epilogue) {
    add_row(row, bias);
    activate(row, epilogue);
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn activate(row: &mut [f32], epilogue: Epilogue) {
    match epilogue {
        Epilogue::Bias => {}
        Epilogue::BiasRelu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
        Epilogue::BiasGelu => row.iter_mut().for_each(|v| *v = gelu(*v)),
    }
}

/// Numerically stable softmax of each row, in place (§3.2.1).
///
/// Entries equal to `-inf` are masked keys and get probability exactly 0. A row whose entries
/// are all `-inf` (every key masked) becomes all zeros instead of NaN: the crate's one rule for
/// a fully masked row, so the attention output of such a query is the zero vector.
pub fn softmax_rows_inplace(mut scores: ArrayViewMut2<f32>) {
    for row in scores.rows_mut() {
        with_slice(row, softmax_slice);
    }
}

/// Log-softmax of each row in place: `x - max - ln Σ exp(x - max)`, stable for large logits.
pub fn log_softmax_rows_inplace(mut x: ArrayViewMut2<f32>) {
    for row in x.rows_mut() {
        with_slice(row, log_softmax_slice);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn log_softmax_slice(row: &mut [f32]) {
    let max = max_lanes(row);
    let sum: f32 = sum_lanes_map(row, |v| exp(v - max));
    let shift = max + sum.ln();
    row.iter_mut().for_each(|v| *v -= shift);
}

/// LayerNorm of each row of `x` `[rows, d]` in place, `(x - mean) / sqrt(var + eps) * gamma +
/// beta` with the biased variance and eps inside the square root, as PyTorch computes it; rows
/// spread over the threads. With `y` `[rows, d]`, `LayerNorm(x + y)`: a residual connection and
/// its norm (§5.4) in one pass, the same floats as adding first and normalising after.
pub(crate) fn layer_norm_rows_inplace(
    mut x: ArrayViewMut2<f32>,
    y: Option<ArrayView2<f32>>,
    gamma: ArrayView1<f32>,
    beta: ArrayView1<f32>,
    eps: f32,
) {
    let (gamma, beta) = (gamma.to_vec(), beta.to_vec());
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .with_min_len(16)
        .for_each(|(i, row)| {
            with_slice(row, |row| {
                if let Some(y) = y {
                    add_row(row, y.row(i));
                }
                layer_norm_slice(row, &gamma, &beta, eps)
            })
        });
}

/// `x += y` for `x`, `y` `[rows, d]`, rows spread over the threads (a pre-LN residual).
pub(crate) fn add_rows_inplace(mut x: ArrayViewMut2<f32>, y: ArrayView2<f32>) {
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(y.axis_iter(Axis(0)))
        .with_min_len(16)
        .for_each(|(row, y)| with_slice(row, |row| add_row(row, y)));
}

/// `row += y` (scaled by 1, which leaves every value as it is).
fn add_row(row: &mut [f32], y: ArrayView1<f32>) {
    match y.as_slice() {
        Some(y) => axpy_slices(1.0, y, row),
        None => row.iter_mut().zip(y).for_each(|(v, &y)| *v += y),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn layer_norm_slice(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = sum_lanes_map(row, |v| v) / n;
    let var = sum_lanes_map(row, |v| (v - mean) * (v - mean)) / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv_std * g + b;
    }
}

/// Softmax of one contiguous row; see [`softmax_rows_inplace`] for the masked-row rule.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn softmax_slice(row: &mut [f32]) {
    let max = max_lanes(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Fused multiply-adds in `exp` where the CPU has them: half the polynomial's instructions.
    const FMA: bool = multiversion::target::selected_target!().supports_feature_str("fma");
    let sum = if FMA {
        exp_in_place::<true>(row, max)
    } else {
        exp_in_place::<false>(row, max)
    };
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `row[i] = e^(row[i] − max)` in one pass, returning their sum (with [`LANES`] partial sums,
/// as [`sum_lanes_map`] adds).
#[inline(always)]
fn exp_in_place<const FUSED: bool>(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *v = exp_with::<FUSED>(*v - max);
            *a += *v;
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|v| {
            *v = exp_with::<FUSED>(*v - max);
            *v
        })
        .sum();
    fold_lanes(acc, |a, b| a + b) + tail
}

/// One step of the online (streaming) softmax over a block of a row's scores.
///
/// `running_max` and `running_sum` carry the row's maximum and `Σ exp(score − max)` over the
/// blocks seen so far. The block's scores become `exp(score − new max)`, and the returned factor
/// `exp(old max − new max)` rescales everything accumulated from earlier blocks. Masked (`-inf`)
/// scores contribute exactly 0; a row that has seen only masked scores keeps a sum of 0.
pub(crate) fn online_softmax_update(
    mut row: ArrayViewMut1<f32>,
    running_max: &mut f32,
    running_sum: &mut f32,
) -> f32 {
    let mut correction = 1.0;
    with_slice(row.view_mut(), |row| {
        correction = online_softmax_slice(row, running_max, running_sum)
    });
    correction
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn online_softmax_slice(row: &mut [f32], running_max: &mut f32, running_sum: &mut f32) -> f32 {
    let new_max = max_lanes(row).max(*running_max);
    if new_max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 1.0;
    }
    let correction = exp(*running_max - new_max);
    row.iter_mut().for_each(|v| *v = exp(*v - new_max));
    *running_sum = *running_sum * correction + sum_lanes_map(row, |v| v);
    *running_max = new_max;
    correction
}

/// Runs `f` on the row as a slice, copying it only if it is not contiguous.
fn with_slice(mut row: ArrayViewMut1<f32>, f: impl FnOnce(&mut [f32])) {
    match row.as_slice_mut() {
        Some(slice) => f(slice),
        None => {
            let mut copy = row.to_vec();
            f(&mut copy);
            row.assign(&ArrayView1::from(&copy));
        }
    }
}

/// Width of the independent accumulators below: enough lanes for the loops to vectorise.
const LANES: usize = 16;

/// `Σ f(x)` with [`LANES`] partial sums.
#[inline(always)]
fn sum_lanes_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    fold_lanes(acc, |a, b| a + b) + tail
}

/// The [`LANES`] partial results combined pairwise (lane `i` with lane `i + width`, halving
/// the width): four dependent vector steps, where a fold from the first lane to the last is
/// fifteen dependent scalar ones, most of a short row's softmax.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

/// The largest entry (`-inf` for an empty or fully masked row).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    let max = fold_lanes(acc, |a, b| if b > a { b } else { a });
    if tail > max {
        tail
    } else {
        max
    }
}

/// `eˣ` for `x ≤ 0` in a form the compiler vectorises, to within 2 ulp of `f32::exp`;
/// `-inf` (a masked score) gives exactly 0.
///
/// Cody–Waite reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, then a degree-7 Taylor polynomial for
/// `eʳ` (truncation error below 1e-9) and `2ⁿ` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `a · b + c`, fused into one rounding when `FUSED` (for callers compiled with FMA, where it is
/// one instruction instead of two; elsewhere it is a slow library call).
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`], with fused multiply-adds when `FUSED`.
#[inline(always)]
fn exp_with<const FUSED: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below this eˣ is under f32's smallest normal; the softmax treats it as 0.
    const MIN: f32 = -87.0;
    const TAYLOR: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let clamped = x.clamp(MIN, 88.0);
    // Adding 1.5·2²³ rounds x·log₂e to the nearest integer n and leaves n in the low mantissa
    // bits; subtracting it again gives n as a float. Plain vector arithmetic, where `round`
    // and a float-to-int cast would not vectorise.
    const ROUND: f32 = 12_582_912.0;
    let shifted = madd::<FUSED>(clamped, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = madd::<FUSED>(-n, LN2_LO, madd::<FUSED>(-n, LN2_HI, clamped));
    let p = TAYLOR[..7]
        .iter()
        .rev()
        .fold(TAYLOR[7], |acc, &c| madd::<FUSED>(acc, r, c));
    // 2ⁿ: n + 127 in the exponent field.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    );
    if x < MIN {
        0.0
    } else {
        p * scale
    }
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))` (PyTorch's `approximate="none"`), in f32 arithmetic the
/// compiler vectorises, with fused multiply-adds: call it from code compiled for FMA.
///
/// erf comes from Abramowitz & Stegun 7.1.26, `1 − t·P(t)·e^(−z²)` with `t = 1/(1 + p|z|)`
/// (absolute error ≤ 1.5e-7), the formula of PyTorch's own vectorised CPU kernel; the result is
/// within 5e-7 of the correctly rounded GELU for |x| ≤ 10 (tested). A libm `erf` in f64 cost
/// 15–30 ns an element, most of a BERT-style encoder's time.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / madd::<true>(P, a, 1.0);
    let poly = A[..4]
        .iter()
        .rev()
        .fold(A[4], |acc, &c| madd::<true>(acc, t, c))
        * t;
    let erf = madd::<true>(-poly, exp_with::<true>(-(a * a)), 1.0).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// Index of the largest entry of each row; ties go to the lowest index.
pub(crate) fn argmax_rows(x: ArrayView2<f32>) -> Vec<usize> {
    x.rows()
        .into_iter()
        .map(|row| match row.as_slice() {
            Some(row) => argmax_slice(row),
            None => argmax_slice(&row.to_vec()),
        })
        .collect()
}

/// [`argmax_rows`] on one row, in [`LANES`] running maxima: each lane keeps the first index of
/// its largest value (strict `>`), so the smallest index among the lanes holding the overall
/// largest value is the row's first one. NaNs are never chosen over a number.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn argmax_slice(x: &[f32]) -> usize {
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [0usize; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail_start = x.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        for (lane, &v) in chunk.iter().enumerate() {
            if v > best[lane] {
                best[lane] = v;
                at[lane] = c * LANES + lane;
            }
        }
    }
    let (mut max, mut index) = (f32::NEG_INFINITY, 0);
    for (&v, &i) in best.iter().zip(&at) {
        if v > max || (v == max && i < index) {
            (max, index) = (v, i);
        }
    }
    for (i, &v) in x.iter().enumerate().skip(tail_start) {
        if v > max {
            (max, index) = (v, i);
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{array, s, Array1, Array2};

    /// Whether a batch product `[m, k] · [k, n]` over panels runs on the AMX tiles here.
    fn on_amx_tiles(m: usize, k: usize, n: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            amx::takes_tiles(m, k, n) && amx::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `y: [m, n]` against `expected`, a batch product with `k` inputs over panels against the
    /// `gemm` path: the same floats where both run on `gemm`'s kernels, within f32 rounding
    /// where the batch product sums on the AMX tiles in another order.
    fn same_sums(y: &Array2<f32>, expected: &Array2<f32>, k: usize) {
        let (m, n) = y.dim();
        if on_amx_tiles(m, k, n) {
            assert_eq!(y.dim(), expected.dim());
            for (y, e) in y.iter().zip(expected) {
                assert!((y - e).abs() <= 1e-6 * e.abs().max(1.0), "{y} against {e}");
            }
        } else {
            assert_eq!(y, expected);
        }
    }

    #[test]
    fn residual_add_and_norm_in_one_pass_equals_add_then_norm() {
        let x = Array2::from_shape_fn((40, 24), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.3 - 1.0);
        // A transposed copy: `y` as a strided view, its rows not contiguous.
        let y_t = Array2::from_shape_fn((24, 40), |(j, i)| ((i * 5 + j) % 13) as f32 * 0.2);
        let y = y_t.t();
        let gamma = Array1::from_shape_fn(24, |j| 1.0 + j as f32 * 0.01);
        let beta = Array1::from_shape_fn(24, |j| j as f32 * -0.02);
        let mut expected = &x + &y;
        layer_norm_rows_inplace(expected.view_mut(), None, gamma.view(), beta.view(), 1e-5);
        let mut fused = x.clone();
        layer_norm_rows_inplace(fused.view_mut(), Some(y), gamma.view(), beta.view(), 1e-5);
        assert_eq!(fused, expected);
        let mut added = x.clone();
        add_rows_inplace(added.view_mut(), y);
        assert_eq!(added, &x + &y);
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut x = array![
            [1.0f32, 2.0, 3.0],
            [1000.0, 1000.0, -1000.0],
            [-5.0, 0.0, 5.0]
        ];
        softmax_rows_inplace(x.view_mut());
        for row in x.rows() {
            assert_abs_diff_eq!(row.sum(), 1.0, epsilon = 1e-6);
            assert!(row.iter().all(|&p| (0.0..=1.0).contains(&p)));
        }
        assert_abs_diff_eq!(x[[1, 0]], 0.5, epsilon = 1e-6);
        assert!(x[[0, 2]] > x[[0, 1]] && x[[0, 1]] > x[[0, 0]]);
    }

    #[test]
    fn masked_entries_get_zero_and_fully_masked_rows_are_zero() {
        let ninf = f32::NEG_INFINITY;
        let mut x = array![[0.0f32, ninf, 0.0], [ninf, ninf, ninf]];
        softmax_rows_inplace(x.view_mut());
        assert_eq!(x.row(0).to_vec(), vec![0.5, 0.0, 0.5]);
        assert_eq!(x.row(1).to_vec(), vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn log_softmax_is_log_of_softmax_and_stable() {
        let x = array![[1.0f32, 2.0, 3.0], [1e4, 0.0, -1e4]];
        let mut lp = x.clone();
        log_softmax_rows_inplace(lp.view_mut());
        let mut p = x.clone();
        softmax_rows_inplace(p.view_mut());
        assert_abs_diff_eq!(lp.row(0).mapv(f32::exp), p.row(0), epsilon = 1e-6);
        assert!(lp.iter().all(|v| v.is_finite()));
        assert_abs_diff_eq!(lp[[1, 0]], 0.0, epsilon = 1e-6);
    }

    #[test]
    fn layer_norm_normalises_with_eps_on_variance() {
        let mut x = array![[1.0f32, 2.0, 3.0, 4.0]];
        let eps = 0.5;
        layer_norm_rows_inplace(
            x.view_mut(),
            None,
            array![1.0f32, 1.0, 1.0, 1.0].view(),
            array![0.0f32, 0.0, 0.0, 0.0].view(),
            eps,
        );
        // mean 2.5, biased variance 1.25: eps is added to the variance, not the std.
        let inv = 1.0 / (1.25f32 + eps).sqrt();
        assert_abs_diff_eq!(
            x,
            array![[-1.5 * inv, -0.5 * inv, 0.5 * inv, 1.5 * inv]],
            epsilon = 1e-6
        );
    }

    #[test]
    fn linear_matches_naive_product() {
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 * 0.1);
        let w = Array2::from_shape_fn((2, 4), |(o, i)| (o as f32 - i as f32) * 0.3);
        let b = array![0.5f32, -1.0];
        let panels = pack_panels(w.t());
        for weight in [Weight::Plain(w.view()), Weight::Panels(panels.view(), 2)] {
            let y = linear(x.view(), weight, Some(b.view()), Epilogue::Bias);
            for r in 0..3 {
                for o in 0..2 {
                    let expect: f32 = (0..4).map(|i| x[[r, i]] * w[[o, i]]).sum::<f32>() + b[o];
                    assert_abs_diff_eq!(y[[r, o]], expect, epsilon = 1e-5);
                }
            }
        }
    }

    /// A `[m, k]` input and a `[k, n]` weight `Wᵀ` of small, varied values.
    fn operands(m: usize, k: usize, n: usize) -> (Array2<f32>, Array2<f32>) {
        let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let w_t = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
        (a, w_t)
    }

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

    #[test]
    fn batch_linear_layers_written_into_fresh_memory_match_the_filled_path() {
        // 600 rows take the blocked kernel's fresh-output path; the reference fills the bias
        // first and adds the product (beta = 1), the path of fewer rows. Same floats expected.
        let x = Array2::from_shape_fn((600, 40), |(i, j)| {
            ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5
        });
        let w = Array2::from_shape_fn((2000, 40), |(o, i)| ((o * 5 + i) % 13) as f32 * 0.05 - 0.3);
        let b = Array1::from_shape_fn(2000, |o| (o % 7) as f32 * 0.25 - 0.75);
        let panels = pack_panels(w.t());
        for epilogue in [Epilogue::Bias, Epilogue::BiasRelu, Epilogue::BiasGelu] {
            let y = linear(x.view(), Weight::Plain(w.view()), Some(b.view()), epilogue);
            let mut expected = Array2::from_shape_fn((600, 2000), |(_, o)| b[o]);
            blocked_product(x.view(), w.t(), 1.0, 1.0, &mut expected.view_mut(), 2);
            activate_rows(expected.view_mut(), epilogue);
            assert_eq!(y, expected, "{epilogue:?}");
            assert!(y.is_standard_layout());
            let y = linear(
                x.view(),
                Weight::Panels(panels.view(), 2000),
                Some(b.view()),
                epilogue,
            );
            let mut expected = Array2::from_shape_fn((600, 2000), |(_, o)| b[o]);
            panels_product_into(
                x.view(),
                panels.view(),
                2000,
                1.0,
                1.0,
                &mut expected.view_mut(),
            );
            activate_rows(expected.view_mut(), epilogue);
            same_sums(&y, &expected, 40);
        }
        let no_bias = linear(x.view(), Weight::Plain(w.view()), None, Epilogue::Bias);
        let mut expected = Array2::zeros((600, 2000));
        blocked_product(x.view(), w.t(), 1.0, 0.0, &mut expected.view_mut(), 1);
        assert_eq!(no_bias, expected);
        for weight in [
            Weight::Plain(Array2::zeros((5, 0)).view()),
            Weight::Panels(pack_panels(Array2::zeros((0, 5)).view()).view(), 5),
        ] {
            let empty = linear(Array2::zeros((300, 0)).view(), weight, None, Epilogue::Bias);
            assert_eq!(empty, Array2::<f32>::zeros((300, 5)), "k = 0 writes zeros");
        }
    }

    #[test]
    fn gelu_is_within_5e7_of_the_f64_formula() {
        let mut worst = 0f64;
        let mut x = -10.0f32;
        while x <= 10.0 {
            let x64 = x as f64;
            let exact = 0.5 * x64 * (1.0 + libm::erf(x64 * std::f64::consts::FRAC_1_SQRT_2));
            worst = worst.max((gelu(x) as f64 - exact).abs());
            x += 1.0 / 1024.0;
        }
        assert!(worst < 5e-7, "worst abs error {worst:e}");
        // Large inputs saturate cleanly.
        assert_eq!(gelu(-100.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
    }

    #[test]
    fn gelu_matches_known_values() {
        let x = array![-1.0f32, 0.0, 1.0, 3.0].mapv(gelu);
        assert_abs_diff_eq!(
            x,
            array![-0.158_655_26f32, 0.0, 0.841_344_7, 2.995_950_3],
            epsilon = 1e-6
        );
        // The epilogues add the bias before activating.
        let x = array![[1.0f32, -2.0]];
        let w = array![[1.0f32, 0.0], [0.0, 1.0]];
        let b = array![0.5f32, 1.0];
        let w = Weight::Plain(w.view());
        let y = linear(x.view(), w, Some(b.view()), Epilogue::BiasRelu);
        assert_eq!(y, array![[1.5f32, 0.0]]);
        let y = linear(x.view(), w, Some(b.view()), Epilogue::BiasGelu);
        assert_abs_diff_eq!(y, array![[gelu(1.5), gelu(-1.0)]], epsilon = 0.0);
        let y = linear(x.view(), w, None, Epilogue::BiasRelu);
        assert_eq!(y, array![[1.0f32, 0.0]]);
    }

    #[test]
    fn argmax_breaks_ties_to_lowest_id() {
        let x = array![[1.0f32, 3.0, 3.0], [2.0, 2.0, 2.0]];
        assert_eq!(argmax_rows(x.view()), vec![1, 0]);
        // Many ties, lengths around the lane width, contiguous and strided rows, -inf rows.
        let first_max = |row: &[f32]| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter().position(|&v| v == max).unwrap()
        };
        for len in [1, 15, 16, 17, 33, 100, 1000] {
            let x = Array2::from_shape_fn((4, len), |(i, j)| ((j * 7 + i * 3) % 5) as f32);
            let want: Vec<usize> = x
                .rows()
                .into_iter()
                .map(|r| first_max(&r.to_vec()))
                .collect();
            assert_eq!(argmax_rows(x.view()), want, "len {len}");
            assert_eq!(argmax_rows(x.t().t()), want);
            let strided = x.t().to_owned();
            assert_eq!(argmax_rows(strided.t()), want, "strided, len {len}");
        }
        let masked = Array2::from_elem((2, 40), f32::NEG_INFINITY);
        assert_eq!(argmax_rows(masked.view()), vec![0, 0]);
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_and_zero_for_masked() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5 * f32::EPSILON, "max relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn strided_rows_take_the_copy_path() {
        let x = Array2::from_shape_fn((5, 3), |(i, j)| (i * 3 + j) as f32 * 0.3);
        let mut t = x.t().to_owned();
        softmax_rows_inplace(t.view_mut());
        let mut strided = x.clone();
        softmax_rows_inplace(strided.view_mut().reversed_axes());
        assert_abs_diff_eq!(strided.t(), t.view(), epsilon = 1e-7);
    }

    #[test]
    fn few_rows_path_matches_the_blocked_kernel() {
        let a = Array2::from_shape_fn((3, 70), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let k = Array2::from_shape_fn((40, 70), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
        let v = Array2::from_shape_fn((70, 24), |(i, j)| ((i + 2 * j) % 7) as f32 * 0.2 - 0.6);
        for b in [k.t(), v.view()] {
            let mut small = Array2::from_elem((3, b.ncols()), 1.0f32);
            let mut big = small.clone();
            few_rows_product(a.view(), b, 0.5, 2.0, &mut small.view_mut());
            blocked_product(a.view(), b, 0.5, 2.0, &mut big.view_mut(), 2);
            assert_abs_diff_eq!(small, big, epsilon = 1e-5);
        }
    }

    #[test]
    fn streaming_products_match_the_blocked_kernel() {
        // Sizes with partial row and column blocks; β = 0 and β ≠ 0.
        for (m, k, n, threads) in [(1, 300, 2100, 2), (8, 130, 70, 1), (5, 7, 1030, 3)] {
            let a =
                Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
            let w = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
            for beta in [0.0, 2.0] {
                let mut streamed = Array2::from_elem((m, n), 1.0f32);
                let mut blocked = streamed.clone();
                streaming_product(
                    a.view(),
                    w.view(),
                    0.5,
                    beta,
                    &mut streamed.view_mut(),
                    threads,
                );
                blocked_product(a.view(), w.view(), 0.5, beta, &mut blocked.view_mut(), 1);
                assert_abs_diff_eq!(streamed, blocked, epsilon = 1e-4);
            }
        }
    }

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

    /// A `[len, 3·d]` matrix whose middle `d` columns serve as one head: rows strided, as the
    /// heads of a projection are.
    fn head_source(len: usize, d: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((len, 3 * d), |(i, j)| {
            ((i * 31 + j * 17 + seed * 7) % 23) as f32 * 0.1 - 1.1
        })
    }

    /// Equal within `eps`, or both `-inf` (masked scores).
    fn assert_scores_eq(a: ArrayView2<f32>, b: ArrayView2<f32>, eps: f32) {
        assert_eq!(a.dim(), b.dim());
        for (((i, j), &x), &y) in a.indexed_iter().zip(b.iter()) {
            let masked = x == f32::NEG_INFINITY && y == f32::NEG_INFINITY;
            assert!(masked || (x - y).abs() <= eps, "({i}, {j}): {x} vs {y}");
        }
    }

    #[test]
    fn head_kernels_equal_the_general_products_with_and_without_a_causal_mask() {
        // One scratch for every shape, largest first, so that stale contents would show; more
        // queries than keys (fully masked rows), partial tiles, a d_v the tiles do not take.
        let mut scratch = HeadScratch::default();
        for (t, n, d_k, d_v) in [
            (128, 128, 64, 64),
            (70, 70, 64, 128),
            (9, 200, 8, 64),
            (13, 45, 24, 64),
            (20, 7, 16, 64),
            (1, 9, 3, 64),
            (5, 5, 4, 32),
        ] {
            let (q, k, v) = (
                head_source(t, d_k, 1),
                head_source(n, d_k, 2),
                head_source(n, d_v, 3),
            );
            let q = q.slice(s![.., d_k..2 * d_k]);
            let k = k.slice(s![.., d_k..2 * d_k]);
            let v = v.slice(s![.., d_v..2 * d_v]);
            for mask in [crate::Mask::none(), crate::Mask::causal()] {
                let causal = mask.is_causal();
                let mut expected = Array2::zeros((t, n));
                matmul_into_serial(q, k.t(), 0.125, 0.0, &mut expected.view_mut());
                mask.apply(0, expected.view_mut());
                let mut scores = Array2::from_elem((t, n), f32::NAN);
                head_scores(q, k, 0.125, causal, &mut scratch, &mut scores.view_mut());
                mask.apply(0, scores.view_mut());
                assert_scores_eq(scores.view(), expected.view(), 1e-5);

                softmax_rows_inplace(expected.view_mut());
                softmax_rows_inplace(scores.view_mut());
                let mut expected_out = Array2::zeros((t, d_v));
                matmul_into_serial(expected.view(), v, 1.0, 0.0, &mut expected_out.view_mut());
                // Written into strided rows, as into the concatenation of the heads.
                let mut out = Array2::from_elem((t, 2 * d_v), f32::NAN);
                let mut head = out.slice_mut(s![.., d_v..]);
                head_values(scores.view(), v, causal, &mut scratch, &mut head);
                assert_abs_diff_eq!(head, expected_out, epsilon = 1e-5);
                assert!(out.slice(s![.., ..d_v]).iter().all(|x| x.is_nan()));
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

    #[test]
    fn warm_passes_nest_and_run_concurrently_without_blocking() {
        // Passes started from inside other passes and from every thread of pools of several
        // sizes, each with parallel loops of its own, all finish with the right sums.
        let work = |seed: usize| -> usize {
            with_warm_pool(|| {
                let inner: usize =
                    with_warm_pool(|| (0..1000usize).into_par_iter().map(|i| i ^ seed).sum());
                inner
                    + (0..100usize)
                        .into_par_iter()
                        .map(|i| i * seed)
                        .sum::<usize>()
            })
        };
        let expected: Vec<usize> = (0..16)
            .map(|seed| {
                (0..1000usize).map(|i| i ^ seed).sum::<usize>()
                    + (0..100usize).map(|i| i * seed).sum::<usize>()
            })
            .collect();
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got: Vec<usize> = pool.install(|| (0..16).into_par_iter().map(work).collect());
            assert_eq!(got, expected, "{threads} threads");
            let outside: Vec<usize> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|seed| {
                        let (pool, work) = (&pool, &work);
                        s.spawn(move || pool.install(|| work(seed)))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                outside,
                expected[..4],
                "{threads} threads, callers outside the pool"
            );
        }
    }

    #[test]
    fn short_products_match_the_blocked_kernel() {
        let a = Array2::from_shape_fn((20, 70), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let w = Array2::from_shape_fn((600, 70), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.05 - 0.3);
        for (beta, threads) in [(0.0, 1), (2.0, 2)] {
            let mut short = Array2::from_elem((20, 600), 1.0f32);
            let mut blocked = short.clone();
            short_product(a.view(), w.t(), 0.5, beta, &mut short.view_mut(), threads);
            blocked_product(a.view(), w.t(), 0.5, beta, &mut blocked.view_mut(), threads);
            assert_abs_diff_eq!(short, blocked, epsilon = 1e-5);
        }
    }

    /// `alpha · a · b + beta · c` with loops, for any strides.
    fn naive_product(
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        alpha: f32,
        beta: f32,
        c: ArrayView2<f32>,
    ) -> Array2<f32> {
        Array2::from_shape_fn(c.dim(), |(i, j)| {
            let dot: f32 = (0..a.ncols()).map(|l| a[[i, l]] * b[[l, j]]).sum();
            alpha * dot + beta * c[[i, j]]
        })
    }

    #[test]
    fn blocked_kernel_takes_negative_and_zero_strides() {
        let a = Array2::from_shape_fn((6, 5), |(i, j)| (i * 5 + j) as f32 * 0.1 - 1.0);
        let b = Array2::from_shape_fn((5, 7), |(i, j)| (i + 2 * j) as f32 * 0.05 - 0.2);
        let row = Array1::from_shape_fn(7, |j| j as f32 * 0.3 - 1.0);
        let broadcast = row.broadcast((5, 7)).unwrap(); // row stride 0
        for threads in [1, 2] {
            for b in [b.slice(s![..;-1, ..;-1]), broadcast.view()] {
                let a = a.slice(s![..;-1, ..]);
                let mut c = Array2::from_shape_fn((6, 7), |(i, j)| (i * j) as f32 * 0.01);
                let expected = naive_product(a, b, 0.5, 2.0, c.slice(s![..;-1, ..;-1]));
                let mut reversed = c.slice_mut(s![..;-1, ..;-1]);
                blocked_product(a, b, 0.5, 2.0, &mut reversed, threads);
                assert_abs_diff_eq!(reversed, expected.view(), epsilon = 1e-5);
            }
        }
    }

    #[test]
    fn blocked_kernel_with_empty_inner_dimension_scales_c() {
        let (a, b) = (Array2::<f32>::zeros((3, 0)), Array2::<f32>::zeros((0, 4)));
        let mut c = Array2::from_elem((3, 4), 1.5f32);
        blocked_product(a.view(), b.view(), 1.0, 2.0, &mut c.view_mut(), 1);
        assert_eq!(c, Array2::from_elem((3, 4), 3.0f32));
        c.fill(f32::NAN);
        blocked_product(a.view(), b.view(), 1.0, 0.0, &mut c.view_mut(), 1);
        assert_eq!(c, Array2::<f32>::zeros((3, 4)), "beta 0 does not read c");
    }

    #[test]
    #[should_panic(expected = "output is [m, n]")]
    fn blocked_kernel_checks_shapes_itself() {
        let (a, b) = (Array2::<f32>::ones((3, 2)), Array2::<f32>::ones((2, 4)));
        let mut c = Array2::<f32>::zeros((3, 5));
        blocked_product(a.view(), b.view(), 1.0, 0.0, &mut c.view_mut(), 1);
    }
}
