//! Softmax over the last dim, optionally fused with a scale and an additive mask:
//! `y = softmax(x * scale + mask)`.
//!
//! Without a mask it is a `CustomOp1` on `x`; with one, a `CustomOp2` on `(x, mask)` where
//! the mask is a (broadcast) view of `x`'s shape that is not tracked. The backward is
//! `dx = scale * y * (dy - sum(dy * y))`; only `y` (the op's own output) is needed, so the
//! scaled and masked scores are never materialised, in the forward or the backward.
//!
//! A row whose every entry is `-inf` (fully masked) gives zeros instead of NaN.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use num_traits::{Float, One};

use crate::cpu::{
    acc, dot, float_dispatch, for_each_row, for_each_row_scratch, last_dim_contiguous, max_map,
    simd_fn, sum_map, tensor_from_vec, with_cpu, zeros, Acc, Elem, Rows,
};

pub(crate) struct SoftmaxOp {
    pub(crate) scale: f64,
}

simd_fn! {
    /// One row of the forward; `z` is scratch space of the row's length.
    pub(crate) fn fwd_row<T: Elem>(x: &[T], mask: Option<&[T]>, scale: T::Acc, z: &mut [T::Acc], y: &mut [T]) {
        match mask {
            Some(m) => {
                for ((zv, &xv), &mv) in z.iter_mut().zip(x).zip(m) {
                    *zv = xv.to_acc() * scale + mv.to_acc();
                }
            }
            None => {
                for (zv, &xv) in z.iter_mut().zip(x) {
                    *zv = xv.to_acc() * scale;
                }
            }
        }
        let mx = max_map(z, |v: T::Acc| v);
        if mx == T::Acc::neg_infinity() {
            return; // fully masked row: zeros
        }
        for zv in z.iter_mut() {
            *zv = (*zv - mx).exp_fast();
        }
        let inv = T::Acc::one() / sum_map(z, |v: T::Acc| v);
        for (o, &zv) in y.iter_mut().zip(z.iter()) {
            *o = T::from_acc(zv * inv);
        }
    }
}

fn fwd<T: Elem>(x: &[T], xr: &Rows, mask: Option<(&[T], &Rows)>, scale: f64) -> Vec<T> {
    let d = xr.row_len();
    let mut y = zeros::<T>(xr.n_rows() * d);
    if d == 0 {
        return y;
    }
    let sc: T::Acc = acc(scale);
    for_each_row_scratch(&mut y, d, d, |r, yr, z: &mut [T::Acc]| {
        let m = mask.map(|(m, mr)| mr.row(m, r));
        fwd_row(xr.row(x, r), m, sc, z, yr)
    });
    y
}

simd_fn! {
    /// One row of the backward: `dx = scale * y * (dy - sum(dy * y))`.
    pub(crate) fn bwd_row<T: Elem>(y: &[T], dy: &[T], scale: T::Acc, dx: &mut [T]) {
        let s = dot(y, dy);
        for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(dy) {
            *o = T::from_acc(scale * yv.to_acc() * (gv.to_acc() - s));
        }
    }
}

/// `dx = scale * y * (dy - sum(dy * y))`, row by row.
fn bwd<T: Elem>(y: &[T], yr: &Rows, dy: &[T], dyr: &Rows, scale: f64) -> Vec<T> {
    let d = yr.row_len();
    let mut dx = zeros::<T>(yr.n_rows() * d);
    let sc: T::Acc = acc(scale);
    for_each_row(&mut dx, d, |r, out| {
        bwd_row(yr.row(y, r), dyr.row(dy, r), sc, out)
    });
    dx
}

fn fwd_storage(
    xs: &CpuStorage,
    xl: &Layout,
    mask: Option<(&CpuStorage, &Layout)>,
    scale: f64,
) -> Result<CpuStorage> {
    let xr = Rows::new(xl, "softmax")?;
    let mr = match mask {
        Some((_, ml)) => {
            if ml.dims() != xl.dims() {
                candle_core::bail!("softmax: mask {:?} vs scores {:?}", ml.dims(), xl.dims())
            }
            Some(Rows::new(ml, "softmax")?)
        }
        None => None,
    };
    Ok(float_dispatch!(xs, "softmax", |x: T| {
        let m = match (mask, &mr) {
            (Some((ms, _)), Some(mr)) => Some((T::cpu_storage_as_slice(ms)?, mr)),
            _ => None,
        };
        T::to_cpu_storage_owned(fwd::<T>(x, &xr, m, scale))
    }))
}

fn bwd_tensor(y: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    let grad = last_dim_contiguous(grad)?;
    with_cpu(y, "softmax", |ys, yl| {
        with_cpu(&grad, "softmax", |gs, gl| {
            let yr = Rows::new(yl, "softmax")?;
            let gr = Rows::new(gl, "softmax")?;
            float_dispatch!(ys, "softmax", |yv: T| {
                let gv = T::cpu_storage_as_slice(gs)?;
                tensor_from_vec(bwd::<T>(yv, &yr, gv, &gr, scale), y.dims())
            })
        })
    })
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((fwd_storage(s, l, None, self.scale)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(bwd_tensor(y, grad, self.scale)?))
    }
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            fwd_storage(s, l, Some((ms, ml)), self.scale)?,
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        Ok((Some(bwd_tensor(y, grad, self.scale)?), None))
    }
}
