//! Large arrays on 2 MiB pages, where the operating system offers them.
//!
//! A decoding step reads every weight of the decoder once, front to back (154 MB for the
//! paper's base model), and so does a short encoder pass. On 4 KiB pages every page of that
//! stream needs its own address translation; on 2 MiB pages 512 times fewer. Measured on the
//! 2-core machine of the README, summing 160 MB at 2 threads: 35 GB/s on 4 KiB pages, 46 GB/s on
//! 2 MiB pages (64 MB: 43 → 54 GB/s; 1 GiB: 24 → 28 GB/s). Large outputs (the logits of a
//! whole batch) also take 512 times fewer page faults on first write.
//!
//! On Linux the arrays made here start on a 2 MiB boundary and their memory is advised as
//! huge pages (`madvise(MADV_HUGEPAGE)`, which transparent huge pages honour in their default
//! `madvise` mode). Elsewhere, and for arrays under 2 MiB, they are ordinary arrays. Either
//! way the values are the same; only the speed of reading them changes.

use std::mem::MaybeUninit;

use ndarray::{s, Array, Array1, ArrayView, Dimension, RemoveAxis, Zip};

/// The page size asked for, and the smallest array that gets such pages: a smaller one would
/// still take a whole page.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed array of `dim`, in standard layout, on huge pages when it is at least 2 MiB.
pub(crate) fn zeros<D: Dimension>(dim: D) -> Array<f32, D> {
    // A zeroed allocation of this size comes as fresh pages, untouched until written.
    on_pages(dim, |len| vec![0.0; len])
}

/// An uninitialised array of `dim`, in standard layout, on huge pages when it is at least
/// 2 MiB: for outputs that are written whole before they are read, so that no pass zeroes or
/// fills them first (the pages are first touched by the writes themselves).
pub(crate) fn uninit<D: Dimension>(dim: D) -> Array<MaybeUninit<f32>, D> {
    // Nothing written: a `vec!` of uninitialised values measured as a pass over them.
    on_pages(dim, |len| Box::<[f32]>::new_uninit_slice(len).into_vec())
}

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
    fn small_arrays_are_ordinary_zeros() {
        let z: Array3<f32> = zeros(ndarray::Dim([2, 3, 4]));
        assert_eq!(z, Array3::<f32>::zeros((2, 3, 4)));
    }
}
