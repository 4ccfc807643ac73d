//! The input half of a SwiGLU MLP as one graph node: `silu(x @ wg^T) * (x @ wu^T)` for frozen
//! gate and up weights (f32, bf16 through MKL's bf16 product, or GGML-quantized), f32 `x` on
//! the CPU.
//!
//! Composed, the two projections are two `[.., inter]` nodes whose first gradients candle's
//! backward zero-fills and adds (and `x` gets two gradients to sum), and candle holds them
//! until the whole backward is done. Here the forward keeps the two projections for the
//! backward, which writes `dx = dg @ wg + du @ wu` directly and frees them as it goes: the
//! peak of a step falls by two `[tokens, inter]` buffers per layer.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::cpu::{for_each_row, for_each_row2, with_cpu, write_only, Rows};
use crate::linear::{fwd_cpu_matmul, matmul_2d, rows_view};
use crate::quant::QMatrix;
use crate::swiglu::{bwd_both_row, fwd_row};

/// A frozen projection weight `[inter, hidden]`.
enum Proj {
    /// f32, or bf16 through MKL.
    Float(Tensor),
    /// GGML blocks (`--quantization_bit`): forward on the quantized kernels (activations in
    /// 8-bit blocks, as [`crate::quant::quant_linear`]), backward on the dequantized weight.
    Quant(Arc<QMatrix>),
}

impl Proj {
    fn rows(&self) -> Result<usize> {
        match self {
            Proj::Float(w) => w.dim(0),
            Proj::Quant(q) => Ok(q.rows()),
        }
    }

    /// `x2 @ w^T` for the `[m, hidden]` rows `x2` of `xs`.
    fn project(&self, xs: &CpuStorage, x2: &Layout) -> Result<Vec<f32>> {
        match self {
            Proj::Float(w) => with_cpu(w, "swiglu_in", |ws, wl| {
                match fwd_cpu_matmul(xs, x2, ws, wl)?.0 {
                    CpuStorage::F32(v) => Ok(v),
                    _ => candle_core::bail!("swiglu_in: the projection is not f32"),
                }
            }),
            Proj::Quant(q) => {
                let (CpuStorage::F32(v), Some((a, b))) = (xs, x2.contiguous_offsets()) else {
                    candle_core::bail!(
                        "swiglu_in: a quantized projection needs contiguous f32 rows"
                    )
                };
                let x = &v[a..b];
                let mut out = vec![0f32; x.len() / q.cols() * q.rows()];
                q.matmul(x, &mut out);
                Ok(out)
            }
        }
    }

    /// `d @ w` for `d` `[m, inter]`.
    fn input_grad(&self, d: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Float(w) => matmul_2d(d, w),
            Proj::Quant(q) => {
                let w = Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), d.device())?;
                matmul_2d(d, &w)
            }
        }
    }
}

struct SwigluIn {
    wg: Proj,
    wu: Proj,
    /// Whether `x` is tracked (only then are the projections kept for a backward).
    keep: bool,
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl SwigluIn {
    /// The two projections of the `[m, hidden]` rows of `x`, each `[m, inter]`.
    fn project(&self, xs: &CpuStorage, x2: &Layout) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.wg.project(xs, x2)?, self.wu.project(xs, x2)?))
    }
}

impl CustomOp1 for SwigluIn {
    fn name(&self) -> &'static str {
        "swiglu-in"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let inter = self.wg.rows()?;
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
        let inter = self.wg.rows()?;
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
        let dx = (self.wg.input_grad(&dg)? + self.wu.input_grad(&du)?)?;
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
        wg: Proj::Float(wg.contiguous()?),
        wu: Proj::Float(wu.contiguous()?),
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.apply_op1(op)?))
}

/// [`swiglu_in`] for quantized gate and up weights (LoRA on a `--quantization_bit` base):
/// the same products as `swiglu(quant_linear(x, wg), quant_linear(x, wu))`, as one node whose
/// backward frees the two projections as it goes. `None` when it does not apply (not on the
/// CPU, `x` not f32, other shapes, `LLMTUNE_FUSED=0`): the caller then composes.
pub fn swiglu_in_quant(x: &Tensor, wg: &Arc<QMatrix>, wu: &Arc<QMatrix>) -> Result<Option<Tensor>> {
    let applies = crate::fused_enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && (wg.rows(), wg.cols()) == (wu.rows(), wu.cols())
        && x.dims().last() == Some(&wg.cols())
        && x.rank() >= 2;
    if !applies {
        return Ok(None);
    }
    let op = SwigluIn {
        wg: Proj::Quant(wg.clone()),
        wu: Proj::Quant(wu.clone()),
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}
