//! `x @ w^T (+ b)` as custom ops whose backward computes only the gradients that are needed.
//!
//! * [`FrozenLinear`] (a `CustomOp1` on `x`) holds a weight that is not tracked by autograd
//!   (a frozen base weight in LoRA training). Its backward returns `grad @ w` and nothing else:
//!   no `[out, in]` weight gradient is computed or stored.
//! * [`TrainLinear`] (a `CustomOp2` on `(x, w)`) is used when `w` is tracked (full
//!   fine-tuning, LoRA matrices). Its backward computes `grad^T @ x` for `w`, and `grad @ w`
//!   for `x` only when `x` is tracked.
//!
//! An untracked bias is added inside the op (no gradient, no temporary); a tracked bias is
//! added outside with candle's `broadcast_add`, which gives it its gradient.
//!
//! The forward calls the storage's own `matmul` (`BackendStorage::matmul`) with the weight's
//! transposed layout, so the same code runs on every backend candle supports (CPU gemm,
//! cuBLAS with the `cuda` feature).

use crate::cpu::for_each_row;
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor,
};

/// `y = x @ w^T (+ b)` for a frozen `w` (`[out, in]`), applied to a 2-D `x` (`[m, in]`).
pub(crate) struct FrozenLinear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

/// `y = x @ w^T (+ b)` for a tracked `w`; `b` (if any) is frozen.
pub(crate) struct TrainLinear {
    pub(crate) b: Option<Tensor>,
}

/// The forward on any backend: `x [m, k] @ w^T` with `w [n, k]`, plus the bias.
fn fwd_generic<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
    b: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        bail!("linear: input has {k} features but the weight is [{n}, {k2}]")
    }
    let wt = wl.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), xl, &wt)?;
    let y = match b {
        None => y,
        Some((bs, bl)) => {
            let yl = Layout::contiguous((m, n));
            y.binary_impl::<Add>(bs, &yl, &bl.broadcast_as((m, n))?)?
        }
    };
    Ok((y, Shape::from((m, n))))
}

/// The `[m, k]` view of an input `[.., k]` whose leading dims collapse into one strided dim
/// (`None` otherwise), and the output shape `[.., n]`. An input of rank > 2 then goes into the
/// op as it is: no reshape nodes around the product in the autograd graph (each such node
/// costs a zero-filled buffer and an add in candle's backward).
pub(crate) fn rows_view(l: &Layout, n: usize) -> Option<(Layout, Shape)> {
    let d = l.dims();
    let st = l.stride();
    let r = d.len();
    if r < 2 {
        return None;
    }
    let k = d[r - 1];
    let m: usize = d[..r - 1].iter().product();
    let mut out = d.to_vec();
    out[r - 1] = n;
    if r == 2 {
        return Some((l.clone(), Shape::from(out)));
    }
    // The leading dims must step through rows of one stride: st[i] = st[i + 1] * d[i + 1]
    // (dims of size 1 do not matter).
    let row = st[r - 2];
    let mut expect = row * d[r - 2];
    for i in (0..r - 2).rev() {
        if d[i] > 1 && st[i] != expect {
            return None;
        }
        expect *= d[i];
    }
    let row = if m <= 1 { k.max(1) } else { row };
    let view = Layout::new(Shape::from((m, k)), vec![row, st[r - 1]], l.start_offset());
    Some((view, Shape::from(out)))
}

/// The 2-D view of the op's input, or an error for a layout `linear` does not hand over.
fn rows_or_err(l: &Layout, w: &Layout) -> Result<(Layout, Shape)> {
    let n = w.dims().first().copied().unwrap_or(0);
    rows_view(l, n).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "linear: input strides {:?} of {:?} do not collapse to rows",
            l.stride(),
            l.dims()
        ))
    })
}

/// `t` (`[.., c]`) as `[rows, c]` (a view when contiguous; used on detached values in backward).
fn as_rows(t: &Tensor) -> Result<Tensor> {
    let c = t.dims().last().copied().unwrap_or(1);
    if t.rank() == 2 {
        Ok(t.clone())
    } else {
        t.reshape((t.elem_count() / c.max(1), c))
    }
}

/// The forward of an input of any rank >= 2 on any backend (see [`rows_view`]): `fwd` runs on
/// the `[m, k]` view of `xl`, and its `[m, n]` result takes the shape `[.., n]`.
fn on_rows<S>(
    xl: &Layout,
    wl: &Layout,
    fwd: impl FnOnce(&Layout) -> Result<(S, Shape)>,
) -> Result<(S, Shape)> {
    let (x2, shape) = rows_or_err(xl, wl)?;
    let (y, _) = fwd(&x2)?;
    Ok((y, shape))
}

/// The CPU forward: the matmul, then the bias added in place (no second `[m, n]` buffer).
fn fwd_cpu(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    b: Option<&Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let (mut y, shape) = fwd_cpu_matmul(x, xl, w, wl)?;
    if let Some(b) = b {
        let n = shape.dims()[1];
        crate::cpu::with_cpu(b, "linear", |bs, bl| {
            let bias_off = bl.start_offset();
            if bl.dims() != [n] || (n > 1 && bl.stride() != [1]) {
                bail!(
                    "linear: bias must be a contiguous [{n}] tensor, got {:?}",
                    bl.dims()
                )
            }
            macro_rules! add_bias {
                ($yv:expr, $bv:expr) => {{
                    let bv = &$bv[bias_off..bias_off + n];
                    for_each_row($yv, n, |_, row| {
                        for (o, &bb) in row.iter_mut().zip(bv) {
                            *o += bb;
                        }
                    });
                }};
            }
            match (&mut y, bs) {
                (CpuStorage::F32(yv), CpuStorage::F32(bv)) => add_bias!(yv, bv),
                (CpuStorage::F64(yv), CpuStorage::F64(bv)) => add_bias!(yv, bv),
                (CpuStorage::BF16(yv), CpuStorage::BF16(bv)) => add_bias!(yv, bv),
                (CpuStorage::F16(yv), CpuStorage::F16(bv)) => add_bias!(yv, bv),
                (y, b) => bail!(
                    "linear: bias dtype {:?} does not match {:?}",
                    b.dtype(),
                    y.dtype()
                ),
            }
            Ok(())
        })?;
    }
    Ok((y, shape))
}

/// `x @ w^T` on the CPU: a BLAS for f32 when one is available ([`crate::blas`]), MKL's bf16
/// product for an f32 input against a bf16 (frozen) weight, else candle's gemm.
pub(crate) fn fwd_cpu_matmul(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (m, _) = xl.shape().dims2()?;
    let (n, _) = wl.shape().dims2()?;
    match (x, w) {
        (CpuStorage::F32(xv), CpuStorage::F32(wv)) => {
            if let Some(y) = crate::blas::sgemm(xv, xl, wv, &wl.transpose(0, 1)?) {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
            if let Some(y) = crate::blas::gemm_mixed_bf16(x, xl, w, &wl.transpose(0, 1)?) {
                let y = y.into_iter().map(half::bf16::from_f32).collect();
                return Ok((CpuStorage::BF16(y), Shape::from((m, n))));
            }
        }
        (CpuStorage::F32(_), CpuStorage::BF16(_)) => {
            return match crate::blas::gemm_mixed_bf16(x, xl, w, &wl.transpose(0, 1)?) {
                Some(y) => Ok((CpuStorage::F32(y), Shape::from((m, n)))),
                None => bail!("linear: f32 input with a bf16 weight needs MKL (LLMTUNE_MKL)"),
            };
        }
        _ => {}
    }
    fwd_generic(x, xl, w, wl, None)
}

/// `a @ b` for 2-D tensors inside a backward pass or on detached values: a BLAS for CPU f32
/// (and MKL's bf16 product for an f32/bf16 mix, f32 result), no autograd graph; else candle's
/// `matmul` (in `a`'s dtype).
pub(crate) fn matmul_2d(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(t) = crate::blas::matmul_no_graph(a, b) {
        return Ok(t);
    }
    if a.dtype() != b.dtype() {
        return a.matmul(&b.to_dtype(a.dtype())?);
    }
    a.matmul(b)
}

/// Runs `f` with the CUDA storage of `t` (errors on other devices).
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(s) => f(s, l),
        _ => bail!("linear: weight and input are on different devices"),
    }
}

/// The CUDA forward (compiles against candle's dummy CUDA backend without the `cuda` feature,
/// where it is never reached).
fn fwd_cuda(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    b: Option<&Tensor>,
) -> Result<(CudaStorage, Shape)> {
    match b {
        None => fwd_generic(x, xl, w, wl, None),
        Some(b) => with_cuda(b, |bs, bl| fwd_generic(x, xl, w, wl, Some((bs, bl)))),
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::cpu::with_cpu(&self.w, "linear", |ws, wl| {
            on_rows(l, wl, |x2| fwd_cpu(s, x2, ws, wl, self.b.as_ref()))
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        with_cuda(&self.w, |ws, wl| {
            on_rows(l, wl, |x2| fwd_cuda(s, x2, ws, wl, self.b.as_ref()))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // [m, n] @ [n, k]; `w` is not tracked, so this records no graph.
        Ok(Some(
            matmul_2d(&as_rows(grad)?, &self.w)?.reshape(x.dims())?,
        ))
    }
}

impl CustomOp2 for TrainLinear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_rows(xl, wl, |x2| fwd_cpu(xs, x2, ws, wl, self.b.as_ref()))
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        on_rows(xl, wl, |x2| fwd_cuda(xs, x2, ws, wl, self.b.as_ref()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = as_rows(grad)?;
        let dx = if x.track_op() {
            Some(matmul_2d(&g, &w.detach())?.reshape(x.dims())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(matmul_2d(&g.t()?, &as_rows(&x.detach())?)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}
