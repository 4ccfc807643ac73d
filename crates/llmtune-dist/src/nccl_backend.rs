//! The NCCL backend (cudarc's bindings): one GPU per rank, bootstrapped from the torchrun
//! environment.
//!
//! Bootstrap: NCCL's own `NCCL_COMM_ID=host:port` mechanism. Every rank sets it to
//! `MASTER_ADDR:MASTER_PORT` (unless already set) and calls `ncclGetUniqueId`, which then
//! encodes that address instead of opening a random port; `ncclCommInitRank` on rank 0 hosts
//! the bootstrap root there and the other ranks connect to it. No side channel of our own.
//!
//! Failures: collectives are enqueued on a stream and waited for by polling the stream and
//! `ncclCommGetAsyncError`; an asynchronous error (a peer died, a network failure) or a
//! collective still running after `--ddp_timeout` aborts the communicator with
//! `ncclCommAbort` and returns an error naming the rank, so no rank waits forever.
//!
//! Buffers are staged through host memory (the trait takes host slices): gradients of LoRA
//! adapters are small; a device-resident path is future work.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use cudarc::nccl::{result, sys};

use crate::{Collective, Error, InitOptions, Result};

struct RawComm(sys::ncclComm_t);
// SAFETY: the handle is only used under `NcclWorld::comm`'s lock (and by `abort`, which ends
// the process).
unsafe impl Send for RawComm {}

pub struct NcclWorld {
    comm: Mutex<Option<RawComm>>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: see `RawComm`; the stream is cudarc's thread-safe handle.
unsafe impl Sync for NcclWorld {}

fn err(op: &'static str, rank: usize, msg: impl std::fmt::Display) -> Error {
    Error::Collective {
        backend: "nccl",
        op,
        rank,
        msg: msg.to_string(),
    }
}

impl NcclWorld {
    pub fn init(opts: &InitOptions) -> Result<Self> {
        let env = crate::torchrun_env()?.ok_or_else(|| {
            Error::Env(
                "--ddp_backend nccl needs the torchrun environment (WORLD_SIZE, RANK, \
                 LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
                    .into(),
            )
        })?;
        if std::env::var_os("NCCL_COMM_ID").is_none() {
            let master = env.master.clone().ok_or_else(|| {
                Error::Env("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not".into())
            })?;
            // Before any thread of ours exists: NCCL reads it in ncclGetUniqueId and
            // ncclCommInitRank below.
            std::env::set_var("NCCL_COMM_ID", master);
        }
        let rank = env.rank;
        // cudarc loads libcuda and libnccl on first use and panics when they are missing:
        // turn that into an error naming the library instead.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(|| Self::connect(&env, opts));
        std::panic::set_hook(prev);
        r.unwrap_or_else(|payload| {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            Err(err(
                "init",
                rank,
                format!(
                    "loading CUDA/NCCL: {}",
                    msg.lines().next().unwrap_or_default()
                ),
            ))
        })
    }

    fn connect(env: &crate::TorchrunEnv, opts: &InitOptions) -> Result<Self> {
        let rank = env.rank;
        let ctx = CudaContext::new(env.local_rank)
            .map_err(|e| err("init", rank, format!("CUDA device {}: {e}", env.local_rank)))?;
        let stream = ctx.new_stream().map_err(|e| err("init", rank, e))?;
        let id = result::get_uniqueid().map_err(|e| err("init", rank, format!("{e:?}")))?;
        let mut comm = MaybeUninit::uninit();
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), env.world_size as i32, id, rank as i32)
                .map_err(|e| {
                    err(
                        "init",
                        rank,
                        format!("ncclCommInitRank (NCCL_COMM_ID {:?}): {e:?}", env.master),
                    )
                })?;
            comm.assume_init()
        };
        Ok(NcclWorld {
            comm: Mutex::new(Some(RawComm(comm))),
            stream,
            rank,
            size: env.world_size,
            timeout: opts.timeout,
        })
    }

    /// Runs `enqueue` (which launches NCCL work on the stream) and waits for it with the
    /// watchdog described in the module documentation.
    fn run(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let mut g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = g
            .as_ref()
            .ok_or_else(|| err(op, self.rank, "the communicator was aborted or finalized"))?
            .0;
        enqueue(comm, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|m| err(op, self.rank, m))?;
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| err(op, self.rank, e))?;
        let t0 = Instant::now();
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(err(op, self.rank, e)),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            unsafe { sys::ncclCommGetAsyncError(comm, &mut async_err) };
            let failure = if async_err != sys::ncclResult_t::ncclSuccess
                && async_err != sys::ncclResult_t::ncclInProgress
            {
                Some(format!(
                    "asynchronous NCCL error {async_err:?} (another rank died or the network failed)"
                ))
            } else if t0.elapsed() > self.timeout {
                Some(format!(
                    "no progress for {} s (--ddp_timeout): another rank is gone or stuck",
                    self.timeout.as_secs()
                ))
            } else {
                None
            };
            if let Some(msg) = failure {
                unsafe {
                    let _ = result::comm_abort(comm);
                }
                *g = None;
                return Err(err(op, self.rank, format!("{msg}; ncclCommAbort called")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn to_device<T: DeviceRepr>(
        &self,
        op: &'static str,
        host: &[T],
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| err(op, self.rank, e))
    }

    fn to_host<T: DeviceRepr>(
        &self,
        op: &'static str,
        dev: &cudarc::driver::CudaSlice<T>,
        host: &mut [T],
    ) -> Result<()> {
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(|e| err(op, self.rank, e))?;
        self.stream.synchronize().map_err(|e| err(op, self.rank, e))
    }

    fn all_reduce<T: DeviceRepr>(
        &self,
        buf: &mut [T],
        dtype: sys::ncclDataType_t,
        red: sys::ncclRedOp_t,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.to_device("all_reduce", buf)?;
        let n = buf.len();
        self.run("all_reduce", |comm, stream| {
            let (p, _sync) = d.device_ptr_mut(&self.stream);
            unsafe {
                result::all_reduce(p as _, p as _, n, dtype, red, comm, stream)
                    .map(|_| ())
                    .map_err(|e| format!("{e:?}"))
            }
        })?;
        self.to_host("all_reduce", &d, buf)
    }
}

impl Collective for NcclWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(
            buf,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclSum,
        )
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(
            buf,
            sys::ncclDataType_t::ncclFloat64,
            sys::ncclRedOp_t::ncclSum,
        )
    }
    fn all_reduce_max_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(
            buf,
            sys::ncclDataType_t::ncclFloat64,
            sys::ncclRedOp_t::ncclMax,
        )
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.to_device("broadcast", buf)?;
        let n = buf.len();
        self.run("broadcast", |comm, stream| {
            let (p, _sync) = d.device_ptr_mut(&self.stream);
            unsafe {
                result::broadcast(
                    p as _,
                    p as _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    root as i32,
                    comm,
                    stream,
                )
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
            }
        })?;
        self.to_host("broadcast", &d, buf)
    }
    fn barrier(&self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum_f32(&mut one)
    }
    fn all_gather_f64(&self, x: f64) -> Result<Vec<f64>> {
        let src = self.to_device("all_gather", &[x])?;
        let mut dst = self
            .stream
            .alloc_zeros::<f64>(self.size)
            .map_err(|e| err("all_gather", self.rank, e))?;
        self.run("all_gather", |comm, stream| {
            let (s, _s1) = src.device_ptr(&self.stream);
            let (d, _s2) = dst.device_ptr_mut(&self.stream);
            unsafe {
                result::all_gather(
                    s as _,
                    d as _,
                    1,
                    sys::ncclDataType_t::ncclFloat64,
                    comm,
                    stream,
                )
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
            }
        })?;
        let mut out = vec![0f64; self.size];
        self.to_host("all_gather", &dst, &mut out)?;
        Ok(out)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        // Lengths first, then every rank's bytes padded to the longest.
        let lens: Vec<usize> = self
            .all_gather_f64(bytes.len() as f64)?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let src = self.to_device("all_gather", &padded)?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(max * self.size)
            .map_err(|e| err("all_gather", self.rank, e))?;
        self.run("all_gather", |comm, stream| {
            let (s, _s1) = src.device_ptr(&self.stream);
            let (d, _s2) = dst.device_ptr_mut(&self.stream);
            unsafe {
                result::all_gather(
                    s as _,
                    d as _,
                    max,
                    sys::ncclDataType_t::ncclUint8,
                    comm,
                    stream,
                )
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
            }
        })?;
        let mut all = vec![0u8; max * self.size];
        self.to_host("all_gather", &dst, &mut all)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all[r * max..r * max + l].to_vec())
            .collect())
    }
    fn abort(&self, code: i32) -> ! {
        // try_lock: a thread stuck in a collective may hold the lock; the process is ending
        // and NCCL's resources go with it either way.
        if let Ok(mut g) = self.comm.try_lock() {
            if let Some(c) = g.take() {
                unsafe {
                    let _ = result::comm_abort(c.0);
                }
            }
        }
        std::process::exit(code)
    }
    fn finalize(&self) {
        let taken = self.comm.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = taken {
            unsafe {
                let _ = result::comm_finalize(c.0);
                let _ = result::comm_destroy(c.0);
            }
        }
    }
}
