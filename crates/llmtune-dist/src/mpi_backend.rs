//! The MPI backend: `MPI_COMM_WORLD` of the launcher that started us (`mpirun`, `srun`).

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::{Collective, Error, Result};

/// `MPI_COMM_WORLD`. MPI is initialized with `MPI_THREAD_SERIALIZED` and every call goes
/// through the mutex, so the communicator may be shared between threads.
pub struct MpiWorld {
    inner: Mutex<Option<(Universe, SimpleCommunicator)>>,
    rank: usize,
    size: usize,
}

// SAFETY: MPI runs with MPI_THREAD_SERIALIZED (checked in `init`) and every use of the
// communicator holds `inner`'s lock, so no two threads are ever inside MPI at once.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Env("MPI was already initialized".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Env(format!(
                "the MPI library offers thread support {threading:?}; llmtune needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiWorld {
            inner: Mutex::new(Some((universe, world))),
            rank,
            size,
        })
    }

    fn with<T>(&self, op: &'static str, f: impl FnOnce(&SimpleCommunicator) -> T) -> Result<T> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some((_, w)) => Ok(f(w)),
            None => Err(Error::Collective {
                backend: "mpi",
                op,
                rank: self.rank,
                msg: "MPI was already finalized".into(),
            }),
        }
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    // MPI's default error handler (MPI_ERRORS_ARE_FATAL) aborts the job on a failed call, so
    // the calls below have no error to return.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.with("all_reduce", |w| {
            let send = buf.to_vec();
            w.all_reduce_into(&send[..], buf, SystemOperation::sum());
        })
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.with("all_reduce", |w| {
            let send = buf.to_vec();
            w.all_reduce_into(&send[..], buf, SystemOperation::sum());
        })
    }
    fn all_reduce_max_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.with("all_reduce", |w| {
            let send = buf.to_vec();
            w.all_reduce_into(&send[..], buf, SystemOperation::max());
        })
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.with("broadcast", |w| {
            w.process_at_rank(root as i32).broadcast_into(buf);
        })
    }
    fn barrier(&self) -> Result<()> {
        self.with("barrier", |w| w.barrier())
    }
    fn all_gather_f64(&self, x: f64) -> Result<Vec<f64>> {
        self.with("all_gather", |w| {
            let mut out = vec![0f64; self.size];
            w.all_gather_into(&x, &mut out[..]);
            out
        })
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.with("all_gather", |w| {
            let n = bytes.len() as i32;
            let mut counts = vec![0i32; self.size];
            w.all_gather_into(&n, &mut counts[..]);
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |acc, &c| {
                    let d = *acc;
                    *acc += c;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut all = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                w.all_gather_varcount_into(bytes, &mut part);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect()
        })
    }
    fn abort(&self, code: i32) -> ! {
        // Without taking the lock: another thread may hold it inside a collective that will
        // never finish, which is exactly when aborting is needed.
        mpi::topology::SimpleCommunicator::world().abort(code)
    }
    fn finalize(&self) {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Dropping the universe calls MPI_Finalize.
        drop(taken);
    }
}
