//! The warm thread pool: a model pass runs with rayon's other threads kept awake.
//!
//! `Transformer`, `EncoderModel` and the decoding loops wrap each pass in [`with_warm_pool`].
//! The pass count it keeps per thread is one of the crate's process-wide states
//! ([`crate::cpu`] lists them).

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on a thread of the current rayon pool while the pool's other threads stay awake,
/// polling for work, until `f` returns.
///
/// A model pass is a chain of many short parallel loops (a 32-token encoder pass has about 60,
/// a decoding step as many). Between them rayon's idle threads go to sleep, and waking one costs
/// a sizeable part of a decoding step (`docs/performance.md`). This is what OpenMP
/// runtimes do with their spin time. Idle threads run pool work while they wait (through
/// `rayon::yield_now`), so `f`'s loops start at once; a thread already inside such a pass
/// never waits for another one's, so concurrent passes cannot block each other. Results do not
/// change: which thread runs a piece of work never changes the arithmetic.
pub(crate) fn with_warm_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        // Still on the pool's thread: each parallel loop started from outside the pool hands
        // its work to that thread and sleeps until it is done, a wake-up per loop.
        return rayon::scope(|_| f());
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

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

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
}
