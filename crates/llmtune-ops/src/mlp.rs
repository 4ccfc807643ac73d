//! The input half of a SwiGLU MLP as one graph node: `silu(x @ wg^T) * (x @ wu^T)` for frozen
//! gate and up weights (f32, or bf16 through MKL's bf16 product), f32 `x` on the CPU.
//!
//! Composed, the two projections are two `[.., inter]` nodes whose first gradients candle's
//! backward zero-fills and adds (and `x` gets two gradients to sum). Here the forward keeps
//! the two projections for the backward, which writes `dx = dg @ wg + du @ wu` directly.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::cpu::{for_each_row, for_each_row2, with_cpu, write_only, Rows};
use crate::linear::{fwd_cpu_matmul, matmul_2d, rows_view};
use crate::swiglu::{bwd_both_row, fwd_row};

struct SwigluIn {
    wg: Tensor,
    wu: Tensor,
    /// Whether `x` is tracked (only then are the projections kept for a backward).
    keep: bool,
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl SwigluIn {
    /// The two projections of the `[m, hidden]` rows of `x`, each `[m, inter]`.
    fn project(&self, xs: &CpuStorage, x2: &Layout) -> Result<(Vec<f32>, Vec<f32>)> {
        let one = |w: &Tensor| {
            with_cpu(w, "swiglu_in", |ws, wl| {
                match fwd_cpu_matmul(xs, x2, ws, wl)?.0 {
                    CpuStorage::F32(v) => Ok(v),
                    _ => candle_core::bail!("swiglu_in: the projection is not f32"),
                }
            })
        };
        Ok((one(&self.wg)?, one(&self.wu)?))
    }
}

impl CustomOp1 for SwigluIn {
    fn name(&self) -> &'static str {
        "swiglu-in"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let inter = self.wg.dim(0)?;
        let Some((x2, shape)) = rows_view(xl, inter) else {
            candle_core::bail!(
                "swiglu_in: input strides {:?} do not collapse to rows",
                xl.stride()
            )
        };
        let (g, u) = self.project(xs, &x2)?;
        // SAFETY: fwd_row writes every element of every row.
        let mut y = unsafe { write_only::<f32>(g.len()) };
        for_each_row(&mut y, inter, |r, yr| {
            fwd_row(
                &g[r * inter..(r + 1) * inter],
                &u[r * inter..(r + 1) * inter],
                yr,
            )
        });
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((g, u));
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let inter = self.wg.dim(0)?;
        let taken = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (g, u) = match taken {
            Some(s) => s,
            None => with_cpu(x, "swiglu_in", |xs, xl| match rows_view(xl, inter) {
                Some((x2, _)) => self.project(xs, &x2),
                None => candle_core::bail!("swiglu_in: input strides do not collapse to rows"),
            })?,
        };
        let grad = crate::last_dim_contiguous(grad)?;
        // SAFETY: bwd_both_row writes every element of every row of both.
        let (mut dg, mut du) = unsafe { (write_only::<f32>(g.len()), write_only::<f32>(g.len())) };
        with_cpu(&grad, "swiglu_in", |gs, gl| {
            let dy = match gs {
                CpuStorage::F32(v) => v.as_slice(),
                _ => candle_core::bail!("swiglu_in: gradient is not f32"),
            };
            let dyr = Rows::new(gl, "swiglu_in")?;
            for_each_row2(&mut dg, &mut du, inter, |r, dgr, dur| {
                let span = r * inter..(r + 1) * inter;
                bwd_both_row(&g[span.clone()], &u[span], dyr.row(dy, r), dgr, dur)
            });
            Ok(())
        })?;
        drop((g, u));
        let m = dg.len() / inter.max(1);
        let dev = x.device();
        let dg = Tensor::from_vec(dg, (m, inter), dev)?;
        let du = Tensor::from_vec(du, (m, inter), dev)?;
        let dx = (matmul_2d(&dg, &self.wg)? + matmul_2d(&du, &self.wu)?)?;
        Ok(Some(dx.reshape(x.dims())?))
    }
}

/// `silu(x @ wg^T) * (x @ wu^T)` for frozen `wg`, `wu` (`[inter, hidden]`), as one node (see
/// the module docs), or `None` when the fused path does not apply (not on the CPU, `x` not
/// f32, a tracked weight, bf16 weights without MKL, other shapes, `LLMTUNE_FUSED=0`): the
/// caller then composes [`crate::linear`] and [`crate::swiglu`].
pub fn swiglu_in(x: &Tensor, wg: &Tensor, wu: &Tensor) -> Result<Option<Tensor>> {
    let weight_ok = |w: &Tensor| {
        w.device().is_cpu()
            && !w.track_op()
            && (w.dtype() == DType::F32
                || (w.dtype() == DType::BF16 && crate::blas::has_bf16_gemm()))
    };
    let applies = crate::fused_enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight_ok(wg)
        && weight_ok(wu)
        && wg.rank() == 2
        && wg.dims() == wu.dims()
        && x.dims().last() == wg.dims().get(1)
        && rows_view(x.layout(), wg.dims()[0]).is_some();
    if !applies {
        return Ok(None);
    }
    let op = SwigluIn {
        wg: wg.contiguous()?,
        wu: wu.contiguous()?,
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.apply_op1(op)?))
}
