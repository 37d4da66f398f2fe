//! The matrix products of plain (strided) operands and the choice of kernel for each.
//!
//! `c = alpha · a · b + beta · c` goes to one of four kernels chosen by the shapes and the CPU
//! alone ([`Kernel`]): the few-row and streaming kernels of [`super::stream`], `matrixmultiply`
//! for short sequences, and the [`gemm`](https://docs.rs/gemm) crate's blocked kernel
//! (packing, AVX-512/AVX2 micro-kernels) for the rest. Attention ([`super::attention`]) and the
//! linear layers ([`super::linear`], through [`super::panels`]) call these.

use super::stream::{
    few_rows_product, streaming_product, FEW_ROWS, FEW_ROWS_MAX_WORK, STREAM_ROWS,
};
use super::PARALLEL_FILL;
use crate::huge_pages;
use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, Dim};

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
pub(super) fn threads_for(a: ArrayView2<f32>, b: ArrayView2<f32>) -> usize {
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

/// Below this many multiply-adds a product runs on one thread (splitting costs more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

pub(super) fn gemm_into(
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
pub(super) enum Kernel {
    FewRows,
    Streaming,
    Short,
    Blocked,
}

/// The kernel for `a · b`, chosen by the shapes and the CPU alone, never by the thread count,
/// so that a pool of any size computes the same sums in the same order (bit-identical results).
pub(super) fn kernel_for(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Kernel {
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

/// Products with this many rows (a short sequence) that the register tiles of
/// [`super::tile`] do not take (a small weight without AVX-512, or a strided `b`) use
/// `matrixmultiply`'s kernels, which measured faster than `gemm`'s
/// there (`docs/gemm_backends.md`, `docs/performance.md`).
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
pub(super) fn blocked_product(
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
pub(super) fn blocked_product_fresh(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    threads: usize,
) -> Array2<f32> {
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
pub(super) unsafe fn gemm_raw(
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

/// The threads a product of `work` multiply-adds is spread over: all of the pool's, unless it
/// is too small to be worth splitting.
pub(super) fn threads_for_work(work: usize) -> usize {
    if work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::naive_product;
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{s, Array1, Array2};

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
