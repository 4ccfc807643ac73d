//! Batched `a @ b` (`[.., m, k] x [.., k, n]`, same leading dims) whose CPU products go
//! through the BLAS of [`crate::blas`] (the attention scores and the mixing of values): one
//! `sgemm` per batch entry, forward and backward, reading transposed views in place.
//!
//! The backward computes `grad @ b^T` for `a` and `a^T @ grad` for `b`, each only when that
//! input is tracked. Without a BLAS (or off the CPU, or not f32) [`matmul`] is candle's own.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

struct BatchMatmul;

fn out_shape(al: &Layout, bl: &Layout) -> Shape {
    let mut d = al.dims().to_vec();
    let r = d.len();
    d[r - 1] = bl.dims()[r - 1];
    Shape::from(d)
}

impl CustomOp2 for BatchMatmul {
    fn name(&self) -> &'static str {
        "blas-batch-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (a, b) {
            (CpuStorage::F32(av), CpuStorage::F32(bv)) => {
                match crate::blas::sgemm_batched(av, al, bv, bl) {
                    Some(c) => Ok((CpuStorage::F32(c), out_shape(al, bl))),
                    None => candle_core::bail!(
                        "matmul: layouts {:?} x {:?} do not fit a BLAS product",
                        al.stride(),
                        bl.stride()
                    ),
                }
            }
            _ => candle_core::bail!("matmul: the BLAS path takes f32 only"),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = a.rank();
        let ga = if a.track_op() {
            Some(matmul_no_graph(grad, &b.detach().transpose(r - 2, r - 1)?)?)
        } else {
            None
        };
        let gb = if b.track_op() {
            Some(matmul_no_graph(&a.detach().transpose(r - 2, r - 1)?, grad)?)
        } else {
            None
        };
        Ok((ga, gb))
    }
}

/// Whether [`matmul`] takes the BLAS path for these operands.
fn blas_applies(a: &Tensor, b: &Tensor) -> bool {
    let r = a.rank();
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && r >= 2
        && b.rank() == r
        && a.dims()[..r - 2] == b.dims()[..r - 2]
        && a.dims()[r - 1] == b.dims()[r - 2]
        && crate::blas::has_sgemm()
}

/// `a @ b` on detached values (inside a backward pass).
fn matmul_no_graph(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if blas_applies(a, b) {
        let a = last_two_fit(a)?;
        let b = last_two_fit(b)?;
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        if let (
            candle_core::Storage::Cpu(CpuStorage::F32(av)),
            candle_core::Storage::Cpu(CpuStorage::F32(bv)),
        ) = (&*sa, &*sb)
        {
            if let Some(c) = crate::blas::sgemm_batched(av, la, bv, lb) {
                let shape = out_shape(la, lb);
                return Tensor::from_vec(c, shape, a.device());
            }
        }
    }
    a.matmul(b)
}

/// `t` itself when its last two dims have a unit stride (as a BLAS operand needs), else a
/// contiguous copy (recorded in the graph like any copy).
fn last_two_fit(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    let st = t.stride();
    let d = t.dims();
    let fits =
        (st[r - 1] == 1 && st[r - 2] >= d[r - 1]) || (st[r - 2] == 1 && st[r - 1] >= d[r - 2]);
    if fits {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Batched `a @ b` with autograd: `[.., m, k] x [.., k, n] -> [.., m, n]`, the leading dims
/// equal (no broadcasting). CPU f32 products go through the BLAS when one is available (see
/// [`crate::blas`]); otherwise this is candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !blas_applies(a, b) {
        return a.matmul(b);
    }
    let a = last_two_fit(a)?;
    let b = last_two_fit(b)?;
    a.apply_op2(&b, BatchMatmul)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Values and both gradients against candle's matmul, for a transposed right operand
    /// (the attention's `q @ k^T`) and a contiguous one (`probs @ v`).
    #[test]
    fn matches_candle_matmul_and_its_gradients() -> candle_core::Result<()> {
        if !crate::blas::has_sgemm() {
            eprintln!("skipped: no BLAS in this process (set LLMTUNE_MKL or --features openblas)");
            return Ok(());
        }
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let run = |ours: bool| -> candle_core::Result<Vec<Tensor>> {
            let mm = |x: &Tensor, y: &Tensor| {
                if ours {
                    super::matmul(x, y)
                } else {
                    x.matmul(y)
                }
            };
            let s = mm(a.as_tensor(), &k.as_tensor().t()?)?;
            assert!(!ours || s.is_contiguous());
            let o = mm(&s, v.as_tensor())?;
            let loss = (o * &w)?.sum_all()?;
            let g = loss.backward()?;
            Ok(vec![
                s,
                g.get(a.as_tensor()).unwrap().clone(),
                g.get(k.as_tensor()).unwrap().clone(),
                g.get(v.as_tensor()).unwrap().clone(),
            ])
        };
        let (ours, want) = (run(true)?, run(false)?);
        for (name, (x, y)) in ["scores", "d a", "d k", "d v"]
            .iter()
            .zip(ours.iter().zip(&want))
        {
            assert_eq!(x.dims(), y.dims(), "{name}");
            let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{name}: max |diff| {d}");
        }
        Ok(())
    }
}
