//! Data parallelism over the process-wide communicator of `llmtune-dist`
//! ([`llmtune_dist::world`]): every rank holds the whole model, takes its own share of each
//! global batch, and the ranks sum their gradients before every optimizer step.
//!
//! With one process every function here returns at once without touching the tensors, so the
//! single-process path is exactly what it was.

use candle_core::{DType, Tensor, Var};
use llmtune_dist::Collective;

use crate::error::Result;
use crate::optim::Gradients;

/// Gradients are summed in buckets of at most this many `f32`s (25 MiB, DDP's
/// `bucket_cap_mb` default): a LoRA adapter is one bucket, a full model several, and no
/// host copy of the whole model's gradients is made at once.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// The communicator.
pub fn world() -> &'static dyn Collective {
    llmtune_dist::world()
}

/// Whether this is rank 0 (the only one that writes files).
pub fn is_main() -> bool {
    llmtune_dist::is_main()
}

/// Sums `grads` over the ranks in place (each rank scaled its loss by `1 / (accumulation *
/// world_size)`, so the sum is the global mean). Tensors are packed into buckets of at most
/// [`BUCKET_ELEMS`] values and each bucket is one all-reduce.
pub fn all_reduce_gradients(grads: &mut Gradients) -> Result<()> {
    let w = world();
    if w.world_size() == 1 {
        return Ok(());
    }
    let entries: Vec<(String, Tensor)> = grads
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let mut start = 0;
    while start < entries.len() {
        // Greedy bucket: at least one tensor, then as many as fit.
        let mut end = start + 1;
        let mut elems = entries[start].1.elem_count();
        while end < entries.len() && elems + entries[end].1.elem_count() <= BUCKET_ELEMS {
            elems += entries[end].1.elem_count();
            end += 1;
        }
        let mut flat: Vec<f32> = Vec::with_capacity(elems);
        for (_, t) in &entries[start..end] {
            flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        w.all_reduce_sum_f32(&mut flat)?;
        let mut off = 0;
        for (name, t) in &entries[start..end] {
            let n = t.elem_count();
            let summed = Tensor::from_slice(&flat[off..off + n], t.shape(), t.device())?
                .to_dtype(t.dtype())?;
            grads.insert(name.clone(), summed);
            off += n;
        }
        start = end;
    }
    Ok(())
}

/// Zero gradients for `vars` (a rank whose share of a short last batch was empty).
pub fn zero_gradients(vars: &[(String, Var)]) -> Result<Gradients> {
    let mut g = Gradients::new();
    for (name, v) in vars {
        g.insert(name.clone(), v.as_tensor().zeros_like()?);
    }
    Ok(g)
}

/// Overwrites every variable with rank 0's value, so all ranks start from the same weights
/// (LoRA's random `A` matrices, a resumed adapter).
pub fn broadcast_vars(vars: &[(String, Var)]) -> Result<()> {
    let w = world();
    if w.world_size() == 1 {
        return Ok(());
    }
    for (_, v) in vars {
        let t = v.as_tensor();
        let mut flat = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        w.broadcast_f32(&mut flat, 0)?;
        v.set(&Tensor::from_vec(flat, t.shape(), t.device())?.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// Sums `values` over the ranks (identity with one process).
pub fn sum_f64<const N: usize>(mut values: [f64; N]) -> Result<[f64; N]> {
    world().all_reduce_sum_f64(&mut values)?;
    Ok(values)
}
