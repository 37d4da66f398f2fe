//! Large arrays on 2 MiB pages, where the operating system offers them.
//!
//! A decoding step reads every weight of the decoder once, front to back (154 MB for the
//! paper's base model), and so does a short encoder pass. On 4 KiB pages every page of that
//! stream needs its own address translation; on 2 MiB pages 512 times fewer, and the stream
//! reads faster (`docs/performance.md` has the figures). Large outputs (the logits of a whole
//! batch) also take 512 times fewer page faults on first write.
//!
//! On Linux the arrays made here start on a 2 MiB boundary and their memory is advised as
//! huge pages (`madvise(MADV_HUGEPAGE)`, which transparent huge pages honour in their default
//! `madvise` mode). Elsewhere, and for arrays under 2 MiB, they are ordinary arrays. Either
//! way the values are the same; only the speed of reading them changes.

use std::mem::MaybeUninit;

use ndarray::{s, Array, Array1, ArrayView, Dimension, RemoveAxis, Zip};
use rayon::prelude::*;

/// The page size asked for, and the smallest array that gets such pages: a smaller one would
/// still take a whole page.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed array of `dim`, in standard layout, on huge pages when it is at least 2 MiB.
pub(crate) fn zeros<D: Dimension>(dim: D) -> Array<f32, D> {
    // A zeroed allocation of this size comes as fresh pages, untouched until written.
    on_pages(dim, |len| vec![0.0; len])
}

/// [`zeros`] with the pages of a large array faulted in up front, by all threads
/// ([`populate`]): for an output allocated well before it is written.
pub(crate) fn zeros_faulted_in<D: Dimension>(dim: D) -> Array<f32, D> {
    fault_in(zeros(dim))
}

/// An uninitialised array of `dim`, in standard layout, on huge pages when it is at least
/// 2 MiB: for outputs that are written whole before they are read, so that no pass of ours
/// zeroes or fills them first.
///
/// The pages of a large one are faulted in up front, by all threads ([`populate`]).
pub(crate) fn uninit<D: Dimension>(dim: D) -> Array<MaybeUninit<f32>, D> {
    // Nothing written: a `vec!` of uninitialised values measured as a pass over them.
    fault_in(on_pages(dim, |len| {
        Box::<[f32]>::new_uninit_slice(len).into_vec()
    }))
}

/// `a` with the whole 2 MiB pages inside it faulted in ([`populate`]).
fn fault_in<T, D: Dimension>(mut a: Array<T, D>) -> Array<T, D> {
    let bytes = a.len() * std::mem::size_of::<T>();
    populate(a.as_mut_ptr() as usize, bytes);
    a
}

/// Faults in the whole 2 MiB pages of the `bytes` bytes from `addr`, split over the threads
/// (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14 and later; elsewhere nothing happens and the
/// first writes fault them in).
///
/// The kernel zeroes every fresh page, which on a virtual machine can be slow in a process's
/// first calls when the matrix product's own writes fault the pages in; faulted in here
/// first, by all threads, the projection to logits measured faster (`docs/performance.md`).
fn populate(addr: usize, bytes: usize) {
    let start = addr.next_multiple_of(HUGE_PAGE);
    let end = (addr + bytes) / HUGE_PAGE * HUGE_PAGE;
    if !cfg!(target_os = "linux") || end <= start {
        return;
    }
    let chunks: Vec<usize> = (start..end).step_by(POPULATE_CHUNK).collect();
    chunks
        .into_par_iter()
        .for_each(|chunk| advise_populate(chunk, POPULATE_CHUNK.min(end - chunk)));
}

/// Bytes one call of [`populate`] faults in: four huge pages.
const POPULATE_CHUNK: usize = 4 * HUGE_PAGE;

/// An array of `dim` in a buffer from `buffer(len)`, in standard layout, on huge pages when it
/// is at least 2 MiB.
fn on_pages<T, D: Dimension>(dim: D, buffer: impl FnOnce(usize) -> Vec<T>) -> Array<T, D> {
    let len = dim.size();
    let size = std::mem::size_of::<T>();
    let bytes = len * size;
    if !cfg!(target_os = "linux") || bytes < HUGE_PAGE {
        return Array::from_shape_vec(dim, buffer(len)).expect("dim.size() values");
    }
    // Room to start on a page boundary and to end on one; the unused ends cost address space,
    // not memory, as long as nothing writes them.
    let buffer = buffer(len + 2 * HUGE_PAGE / size);
    let start = buffer.as_ptr() as usize;
    let offset = (start.next_multiple_of(HUGE_PAGE) - start) / size;
    advise_huge(start + offset * size, bytes.next_multiple_of(HUGE_PAGE));
    Array1::from(buffer)
        .slice_move(s![offset..offset + len])
        .into_shape_with_order(dim)
        .expect("a contiguous run of dim.size() values")
}

/// A copy of `a` in standard layout, on huge pages when it is at least 2 MiB; large copies
/// are split over the threads along the first axis (a transposing copy is bound by its
/// scattered reads, not by memory bandwidth).
pub(crate) fn standard_copy<D: RemoveAxis>(a: ArrayView<f32, D>) -> Array<f32, D> {
    let mut copy = zeros(a.raw_dim());
    if a.len() * std::mem::size_of::<f32>() >= HUGE_PAGE && a.ndim() > 1 && a.shape()[0] > 1 {
        Zip::from(copy.outer_iter_mut())
            .and(a.outer_iter())
            .par_for_each(|mut c, a| c.assign(&a));
    } else {
        copy.assign(&a);
    }
    copy
}

/// Advises `len` bytes from `addr`, both multiples of [`HUGE_PAGE`], as huge pages. Advice
/// only: a kernel without transparent huge pages refuses it, and nothing changes.
#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    // SAFETY: madvise with MADV_HUGEPAGE never reads, writes, maps or unmaps memory; it sets a
    // flag on the mappings in the range. The range lies inside one live allocation (`on_pages`
    // allocates `len` plus two pages of slack and `addr` is within the first page of it).
    let _ = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_addr: usize, _len: usize) {}

/// Asks the kernel to fault in, writable, the `len` bytes from `addr`. Advice only: a kernel
/// older than 5.14 refuses it, and the first writes fault the pages in instead.
#[cfg(target_os = "linux")]
fn advise_populate(addr: usize, len: usize) {
    // SAFETY: MADV_POPULATE_WRITE faults the pages in as a write fault would (fresh anonymous
    // pages come zeroed) without changing any value the program can observe: the range lies
    // inside one live allocation of uninitialised memory (`uninit`), not yet read or written,
    // and nothing else references it.
    let _ = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_populate(_addr: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    #[test]
    fn large_arrays_start_on_a_page_boundary_and_hold_the_values() {
        let a = Array2::from_shape_fn((700, 1000), |(i, j)| (i * 1000 + j) as f32);
        let copy = standard_copy(a.view());
        assert_eq!(copy, a);
        assert!(copy.is_standard_layout());
        if cfg!(target_os = "linux") {
            assert_eq!(copy.as_ptr() as usize % HUGE_PAGE, 0);
        }
        let transposed = standard_copy(a.t());
        assert_eq!(transposed, a.t());
        assert!(transposed.is_standard_layout());
    }

    #[test]
    fn faulting_pages_in_changes_no_value() {
        // 3 MiB and a bit: whole huge pages and a partial one.
        let len = (3 << 20) / 4 + 1000;
        let mut fresh = zeros(ndarray::Dim([len]));
        populate(fresh.as_mut_ptr() as usize, len * 4);
        assert!(fresh.iter().all(|&v| v == 0.0));
        let mut written = Array1::from_shape_fn(len, |i| i as f32);
        populate(written.as_mut_ptr() as usize, len * 4);
        assert!(written.iter().enumerate().all(|(i, &v)| v == i as f32));
        let zeroed = zeros_faulted_in(ndarray::Dim([len]));
        assert!(zeroed.iter().all(|&v| v == 0.0));
        let out = uninit(ndarray::Dim([len]));
        assert_eq!(out.len(), len);
        if cfg!(target_os = "linux") {
            assert_eq!(out.as_ptr() as usize % HUGE_PAGE, 0);
        }
    }

    #[test]
    fn small_arrays_are_ordinary_zeros() {
        let z: Array3<f32> = zeros(ndarray::Dim([2, 3, 4]));
        assert_eq!(z, Array3::<f32>::zeros((2, 3, 4)));
    }
}
