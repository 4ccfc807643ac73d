//! The LoRA update of a linear layer's output as one graph node: `y = base + s * h @ b^T`,
//! where `h = dropout(x) @ a^T` (`[.., r]`) and `b` is the `[out, r]` up-projection.
//!
//! Composed from candle ops this is three `[.., out]` nodes (the product, the scaling, the
//! sum), each costing a zero-filled gradient buffer plus an add in candle's backward and a
//! pass in the forward. Here the forward copies `base` once and accumulates the product into
//! it (`beta = 1`); the backward passes the gradient to `base` unchanged and computes
//! `s * grad @ b` for `h` and `s * grad^T @ h` for `b`, each only when tracked.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::blas::{gemm_f32, Mat};
use crate::cpu::{contiguous_f32, with_cpu, write_only};

struct LoraAdd {
    scaling: f32,
}

/// `(rows, out, r)` of the operands, checked.
fn dims(bl: &Layout, hl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let (out, r) = wl.shape().dims2()?;
    let (bd, hd) = (bl.dims(), hl.dims());
    let n = bd.len();
    if n < 1 || hd.len() != n || bd[..n - 1] != hd[..n - 1] || bd[n - 1] != out || hd[n - 1] != r {
        candle_core::bail!(
            "lora: base {bd:?}, h {hd:?} and b {:?} do not fit y = base + h @ b^T",
            wl.dims()
        )
    }
    Ok((bl.shape().elem_count() / out.max(1), out, r))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    contiguous_f32(s, l, "lora", what)
}

impl CustomOp3 for LoraAdd {
    fn name(&self) -> &'static str {
        "lora-add"
    }

    fn cpu_fwd(
        &self,
        bs: &CpuStorage,
        bl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, out, r) = dims(bl, hl, wl)?;
        let base = f32_slice(bs, bl, "base")?;
        let (h, w) = (f32_slice(hs, hl, "h")?, f32_slice(ws, wl, "b")?);
        let mut y = base[..m * out].to_vec();
        gemm_f32(
            (m, out, r),
            self.scaling,
            Mat::new(h, 0, r, false),
            Mat::new(w, 0, r, true),
            1.0,
            &mut y,
            0,
            out,
        )?;
        Ok((CpuStorage::F32(y), bl.shape().clone()))
    }

    fn bwd(
        &self,
        base: &Tensor,
        h: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_base = base.track_op().then(|| grad.clone());
        let (need_h, need_w) = (h.track_op(), w.track_op());
        if !(need_h || need_w) {
            return Ok((d_base, None, None));
        }
        let (dh, dw) = with_cpu(&grad, "lora", |gs, gl| {
            with_cpu(h, "lora", |hs, hl| {
                with_cpu(w, "lora", |ws, wl| {
                    let (m, out, r) = dims(gl, hl, wl)?;
                    let g = f32_slice(gs, gl, "grad")?;
                    let (hv, wv) = (f32_slice(hs, hl, "h")?, f32_slice(ws, wl, "b")?);
                    let dh = if need_h {
                        // SAFETY: the product (beta = 0) writes all of it.
                        let mut dh = unsafe { write_only::<f32>(m * r) };
                        let (a, b) = (Mat::new(g, 0, out, false), Mat::new(wv, 0, r, false));
                        gemm_f32((m, r, out), self.scaling, a, b, 0.0, &mut dh, 0, r)?;
                        Some(dh)
                    } else {
                        None
                    };
                    let dw = if need_w {
                        // SAFETY: the product (beta = 0) writes all of it.
                        let mut dw = unsafe { write_only::<f32>(out * r) };
                        let (a, b) = (Mat::new(g, 0, out, true), Mat::new(hv, 0, r, false));
                        gemm_f32((out, r, m), self.scaling, a, b, 0.0, &mut dw, 0, r)?;
                        Some(dw)
                    } else {
                        None
                    };
                    Ok((dh, dw))
                })
            })
        })?;
        let dev = grad.device();
        let dh = dh.map(|v| Tensor::from_vec(v, h.dims(), dev)).transpose()?;
        let dw = dw.map(|v| Tensor::from_vec(v, w.dims(), dev)).transpose()?;
        Ok((d_base, dh, dw))
    }
}

/// `base + scaling * h @ b^T`: the LoRA update added to a linear layer's output (`base`
/// `[.., out]`, `h = x @ a^T` `[.., r]`, `b` `[out, r]`). One fused node on the CPU in f32
/// (see the module docs); elsewhere (or with `LLMTUNE_FUSED=0`) the same sum composed from
/// [`crate::linear`].
pub fn lora_add(base: &Tensor, h: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let fused = crate::fused_enabled()
        && [base, h, b]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        && b.rank() == 2
        && h.rank() == base.rank()
        && b.dims()[0] == base.dims().last().copied().unwrap_or(0);
    if !fused {
        return base + (crate::linear(h, b, None)? * scaling)?;
    }
    base.contiguous()?.apply_op3(
        &h.contiguous()?,
        &b.contiguous()?,
        LoraAdd {
            scaling: scaling as f32,
        },
    )
}
