//! A small persistent team of worker threads for fork-join steps that last microseconds
//! (the products of one decoded token).
//!
//! [`Team::run`] hands one closure to every member (the calling thread is member 0 and works
//! too) and returns when all are done. Between steps the workers wait on a shared step
//! counter: they spin for a short while (a step follows the previous one within
//! microseconds while a token is decoded), then yield their core for a while (so that a
//! worker whose partner was descheduled by a competing process does not burn the core the
//! partner needs), then park until the next step wakes them (between requests). The caller
//! waits for the workers the same way, minus the parking. Rayon's pool costs a sleep and a
//! wake-up per hand-off instead, which at ~200 hand-offs per token eats the gain of a
//! second core.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long a waiting thread spins before it starts yielding its core.
const SPIN: Duration = Duration::from_micros(50);
/// How long a waiting worker yields before it parks.
const YIELD: Duration = Duration::from_millis(3);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented (by the caller) to start a step.
    step: AtomicUsize,
    /// Workers still running the current step.
    pending: AtomicUsize,
    /// The current step's closure; written only while no worker runs one.
    job: UnsafeCell<Option<Job>>,
    quit: AtomicBool,
    panicked: AtomicBool,
    /// Per worker: whether it is parked (or about to park) and needs an unpark.
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written by the caller only between steps (no worker reads it then: every
// worker has decremented `pending` after its last read), and read by workers only after the
// `step` increment that publishes it (release/acquire).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A team of `threads` members: the calling thread and `threads - 1` workers.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<(Thread, JoinHandle<()>)>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.threads())
    }
}

/// Waits until `done()` holds: spins, then yields, then (when `park` is set) parks after
/// flagging `sleeping`.
#[inline]
fn wait_until(done: impl Fn() -> bool, park: Option<&AtomicBool>, quit: &AtomicBool) {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if done() || quit.load(Ordering::Relaxed) {
            return;
        }
        n = n.wrapping_add(1);
        if !n.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let waited = start.elapsed();
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < SPIN + YIELD || park.is_none() {
            std::thread::yield_now();
        } else if let Some(flag) = park {
            flag.store(true, Ordering::SeqCst);
            // Checked again after the flag is visible: the caller stores the step, then reads
            // the flag (both SeqCst), so one of the two sees the other.
            if !done() && !quit.load(Ordering::SeqCst) {
                std::thread::park();
            }
            flag.store(false, Ordering::SeqCst);
        }
    }
}

impl Team {
    /// A team of `threads` (at least 1) members; `threads - 1` worker threads are started.
    pub fn new(threads: usize) -> Self {
        let workers_n = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            step: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            quit: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers_n).map(|_| AtomicBool::new(false)).collect(),
        });
        let workers = (0..workers_n)
            .map(|w| {
                let sh = shared.clone();
                let h = std::thread::Builder::new()
                    .name(format!("llmtune-team-{}", w + 1))
                    .spawn(move || worker(sh, w))
                    .expect("cannot start a worker thread");
                (h.thread().clone(), h)
            })
            .collect();
        Self { shared, workers }
    }

    /// A team of [`default_threads`] members.
    pub fn with_default_threads() -> Self {
        Self::new(default_threads())
    }

    /// Members, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(member)` on every member (`0` = the calling thread) and returns when all have
    /// finished. A panic in a worker is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let sh = &*self.shared;
        // SAFETY: no worker is running a step (the previous `run` waited for all of them),
        // and the closure outlives every use: this function does not return (or unwind)
        // before `pending` is back to 0.
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
            *sh.job.get() = Some(job);
        }
        sh.pending.store(self.workers.len(), Ordering::Relaxed);
        sh.step.fetch_add(1, Ordering::SeqCst);
        for (w, (t, _)) in self.workers.iter().enumerate() {
            if sh.sleeping[w].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        struct WaitGuard<'a>(&'a Shared);
        impl Drop for WaitGuard<'_> {
            fn drop(&mut self) {
                let sh = self.0;
                wait_until(
                    || sh.pending.load(Ordering::Acquire) == 0,
                    None,
                    &AtomicBool::new(false),
                );
            }
        }
        {
            let _wait = WaitGuard(sh);
            f(0);
        }
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("a team worker panicked");
        }
    }
}

fn worker(sh: Arc<Shared>, w: usize) {
    let mut seen = 0usize;
    loop {
        wait_until(
            || sh.step.load(Ordering::Acquire) != seen,
            Some(&sh.sleeping[w]),
            &sh.quit,
        );
        if sh.quit.load(Ordering::Acquire) {
            return;
        }
        seen = sh.step.load(Ordering::Acquire);
        // SAFETY: published by the `step` increment just observed; the caller keeps the
        // closure alive until `pending` reaches 0.
        let job = unsafe { (*sh.job.get()).expect("a step without a job") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(w + 1) }));
        if r.is_err() {
            sh.panicked.store(true, Ordering::Relaxed);
        }
        sh.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        for (t, _) in &self.workers {
            t.unpark();
        }
        for (_, h) in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// As many members as rayon's global pool has threads (`RAYON_NUM_THREADS`, else the number
/// of cores), as the other CPU products use.
pub fn default_threads() -> usize {
    rayon::current_num_threads()
}

/// Splits `0..n` items among `parts` members as evenly as possible: member `p`'s range.
pub fn split(n: usize, parts: usize, p: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    (n * p / parts)..(n * (p + 1) / parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_each_step_once() {
        for threads in [1, 2, 3] {
            let team = Team::new(threads);
            assert_eq!(team.threads(), threads);
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..1000 {
                team.run(&|m| {
                    hits[m].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn wakes_parked_workers() {
        let team = Team::new(2);
        let sum = AtomicUsize::new(0);
        team.run(&|m| {
            sum.fetch_add(m + 1, Ordering::Relaxed);
        });
        // Long enough for the worker to spin, yield and park.
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(20));
        team.run(&|m| {
            sum.fetch_add(m + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn worker_panic_is_reported() {
        let team = Team::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|m| {
                if m == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        team.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_covers_all_items() {
        for n in 0..20 {
            for parts in 1..5 {
                let mut next = 0;
                for p in 0..parts {
                    let r = split(n, parts, p);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
