//! Collectives for data-parallel training, on the engines clusters already run:
//!
//! - [`SingleProcess`]: world size 1, every collective a no-op (the default).
//! - `mpi` (feature `mpi`): MPI through [rsmpi](https://docs.rs/mpi) for CPU collectives and
//!   for launching with `mpirun`/`srun`. Rank and world size come from the MPI launcher.
//! - `nccl` (feature `nccl`): NCCL through cudarc for GPU collectives, bootstrapped from the
//!   torchrun environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! The process-wide communicator is set once by [`init`] (the CLI does it before a command
//! runs) and read anywhere with [`world`], the way `torch.distributed` keeps a default process
//! group. Before [`init`], [`world`] is the single-process backend, so library code and tests
//! need nothing.
//!
//! Collectives are blocking and must be called by every rank in the same order. A rank that
//! fails must not simply return: [`abort`] ends the whole job (MPI: `MPI_Abort`, which makes
//! `mpirun` kill every rank; NCCL: `ncclCommAbort` and exit), so that no rank waits forever
//! in a collective.

use std::sync::OnceLock;
use std::time::Duration;

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;

/// Errors of the collectives and of bootstrapping.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The launcher's environment is missing or malformed.
    #[error("distributed launch: {0}")]
    Env(String),
    /// The asked-for backend was not compiled in.
    #[error("--ddp_backend {0}: this llmtune was built without the `{0}` feature (rebuild with `--features {0}`)")]
    NotCompiled(&'static str),
    /// A collective failed (message from the backend).
    #[error("{backend} collective {op} failed on rank {rank}: {msg}")]
    Collective {
        backend: &'static str,
        op: &'static str,
        rank: usize,
        msg: String,
    },
    /// [`init`] was called twice.
    #[error("the distributed backend is already initialized")]
    AlreadyInitialized,
}

pub type Result<T> = std::result::Result<T, Error>;

/// The collectives the trainer needs. Every rank must call the same collectives in the same
/// order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Backend name (`single`, `mpi`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Overwrites `buf` on every rank with `root`'s.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Waits until every rank got here.
    fn barrier(&self) -> Result<()>;
    /// Every rank's `x`, in rank order.
    fn all_gather_f64(&self, x: f64) -> Result<Vec<f64>>;
    /// Every rank's bytes (lengths may differ), in rank order.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Ends the whole job with `code` (every rank, not just this one). Never returns.
    fn abort(&self, code: i32) -> !;
    /// Clean shutdown (MPI_Finalize); collectives must not be called afterwards.
    fn finalize(&self) {}
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_f64(&self, x: f64) -> Result<Vec<f64>> {
        Ok(vec![x])
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Which backend [`init`] sets up (`--ddp_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MPI when launched by an MPI launcher and built with `mpi`; NCCL when the torchrun
    /// environment says `WORLD_SIZE` > 1 on a CUDA device and built with `nccl`; else single.
    Auto,
    /// One process, no communication.
    Single,
    /// MPI (feature `mpi`).
    Mpi,
    /// NCCL (feature `nccl`), one GPU per rank.
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Backend::Auto),
            "none" | "single" => Ok(Backend::Single),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            other => Err(format!(
                "unknown --ddp_backend {other:?} (expected auto, mpi, nccl or none)"
            )),
        }
    }
}

/// How [`init`] connects.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub backend: Backend,
    /// Whether the run uses a CUDA device (NCCL needs one; `Auto` only picks NCCL then).
    pub cuda: bool,
    /// NCCL: how long a collective may take before the communicator is aborted
    /// (`--ddp_timeout`, HF's default 1800 s).
    pub timeout: Duration,
}

/// Whether an MPI launcher (`mpirun`/`mpiexec` of OpenMPI or MPICH, or `srun --mpi=pmix`)
/// started this process.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|k| std::env::var_os(k).is_some())
}

/// The torchrun environment: `(rank, world_size, local_rank)` when `WORLD_SIZE` is set.
pub fn torchrun_env() -> Result<Option<TorchrunEnv>> {
    let Some(ws) = std::env::var_os("WORLD_SIZE") else {
        return Ok(None);
    };
    let num = |k: &str, v: Option<std::ffi::OsString>| -> Result<usize> {
        let v = v.ok_or_else(|| Error::Env(format!("WORLD_SIZE is set but {k} is not")))?;
        v.to_string_lossy()
            .trim()
            .parse()
            .map_err(|_| Error::Env(format!("{k}={v:?} is not a number")))
    };
    let world_size = num("WORLD_SIZE", Some(ws))?;
    let rank = num("RANK", std::env::var_os("RANK"))?;
    let local_rank = match std::env::var_os("LOCAL_RANK") {
        Some(v) => num("LOCAL_RANK", Some(v))?,
        None => rank,
    };
    if world_size == 0 || rank >= world_size {
        return Err(Error::Env(format!(
            "RANK={rank} must be below WORLD_SIZE={world_size}"
        )));
    }
    let master = match (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
        (Ok(a), Ok(p)) => Some(format!("{a}:{p}")),
        _ => None,
    };
    Ok(Some(TorchrunEnv {
        rank,
        world_size,
        local_rank,
        master,
    }))
}

/// What torchrun (or a Slurm script mimicking it) exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchrunEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`.
    pub master: Option<String>,
}

/// The GPU ordinal this process should use: `LOCAL_RANK` (torchrun),
/// `OMPI_COMM_WORLD_LOCAL_RANK` (mpirun) or `SLURM_LOCALID` (srun), else 0.
pub fn local_rank() -> usize {
    ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Sets up the process-wide communicator. Call once, before any collective.
pub fn init(opts: &InitOptions) -> Result<&'static dyn Collective> {
    if WORLD.get().is_some() {
        return Err(Error::AlreadyInitialized);
    }
    let backend = match opts.backend {
        Backend::Auto => {
            let torchrun_multi = torchrun_env()?.is_some_and(|e| e.world_size > 1);
            if launched_by_mpi() && cfg!(feature = "mpi") {
                Backend::Mpi
            } else if torchrun_multi && opts.cuda && cfg!(feature = "nccl") {
                Backend::Nccl
            } else if launched_by_mpi() || torchrun_multi {
                let what = if launched_by_mpi() {
                    "an MPI launcher started this process, but this llmtune was built without the \
                     `mpi` feature"
                } else if !opts.cuda {
                    "WORLD_SIZE > 1 asks for NCCL, which needs a CUDA device (on CPUs launch \
                     with mpirun and the `mpi` feature)"
                } else {
                    "WORLD_SIZE > 1 asks for NCCL, but this llmtune was built without the \
                     `nccl` feature"
                };
                return Err(Error::Env(format!(
                    "{what}; refusing to run the same training independently in every process"
                )));
            } else {
                Backend::Single
            }
        }
        b => b,
    };
    let c: Box<dyn Collective> = match backend {
        Backend::Auto | Backend::Single => Box::new(SingleProcess),
        Backend::Mpi => mpi_world()?,
        Backend::Nccl => nccl_world(opts)?,
    };
    WORLD.set(c).map_err(|_| Error::AlreadyInitialized)?;
    Ok(world())
}

#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_backend::MpiWorld::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Box<dyn Collective>> {
    Err(Error::NotCompiled("mpi"))
}

#[cfg(feature = "nccl")]
fn nccl_world(opts: &InitOptions) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl_backend::NcclWorld::init(opts)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_world(_opts: &InitOptions) -> Result<Box<dyn Collective>> {
    Err(Error::NotCompiled("nccl"))
}

/// The process-wide communicator ([`SingleProcess`] until [`init`]).
pub fn world() -> &'static dyn Collective {
    static SINGLE: SingleProcess = SingleProcess;
    match WORLD.get() {
        Some(c) => c.as_ref(),
        None => &SINGLE,
    }
}

/// Whether this is rank 0, the one that writes logs, plots, checkpoints and outputs.
pub fn is_main() -> bool {
    world().rank() == 0
}

/// Ends the whole job after `msg` (printed with this rank's name) when more than one process
/// runs; returns otherwise so the caller reports the error itself.
pub fn abort_if_distributed(msg: &str, code: i32) {
    let w = world();
    if w.world_size() > 1 {
        let text = format!(
            "error on rank {} of {}: {msg}\nllmtune: rank {} failed; aborting all {} ranks ({})\n",
            w.rank(),
            w.world_size(),
            w.rank(),
            w.world_size(),
            w.backend()
        );
        // One write, so the lines of several failing ranks do not interleave.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
        w.abort(code);
    }
}

/// Clean shutdown of the communicator (MPI_Finalize). Call once at the end of `main`.
pub fn finalize() {
    world().finalize();
}

/// The contiguous share `[start, end)` of `n` items that `rank` of `world` takes: the first
/// `n % world` ranks get one more. Concatenating the shares in rank order gives `0..n`.
pub fn shard_range(n: usize, rank: usize, world: usize) -> (usize, usize) {
    let world = world.max(1);
    let base = n / world;
    let extra = n % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    (start, start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_collectives_are_identity() {
        let w = SingleProcess;
        let mut a = [1.5f32, -2.0];
        w.all_reduce_sum_f32(&mut a).unwrap();
        assert_eq!(a, [1.5, -2.0]);
        assert_eq!(w.all_gather_f64(3.0).unwrap(), vec![3.0]);
        assert_eq!(w.all_gather_bytes(b"ab").unwrap(), vec![b"ab".to_vec()]);
        assert_eq!((w.rank(), w.world_size()), (0, 1));
    }

    #[test]
    fn shards_cover_in_order_without_overlap() {
        for n in 0..12 {
            for world in 1..5 {
                let mut next = 0;
                for r in 0..world {
                    let (s, e) = shard_range(n, r, world);
                    assert_eq!(s, next, "n={n} world={world} rank={r}");
                    assert!(e - s <= n.div_ceil(world));
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
        assert_eq!(shard_range(5, 0, 2), (0, 3));
        assert_eq!(shard_range(5, 1, 2), (3, 5));
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("MPI".parse::<Backend>().unwrap(), Backend::Mpi);
        assert_eq!("nccl".parse::<Backend>().unwrap(), Backend::Nccl);
        assert_eq!("none".parse::<Backend>().unwrap(), Backend::Single);
        let e = "gloo".parse::<Backend>().unwrap_err();
        assert!(e.contains("gloo") && e.contains("expected"), "{e}");
    }
}
