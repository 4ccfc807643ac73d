//! RMSNorm as a `CustomOp2` on `(x, w)` with forward and backward, computed in the
//! accumulator type (`f32`, or `f64` for `f64` tensors).
//!
//! Forward, per row of `d` elements: `r = 1 / sqrt(mean(x^2) + eps)`, `y = (x r) * w` (the
//! normalised value is rounded to the tensor dtype before the multiplication by `w`, as in
//! the reference). Backward with `g = dy * w` and `xh = x r`:
//! `dx = r (g - xh mean(g xh))`, `dw = sum over rows of dy xh`. `r` is recomputed in the
//! backward (one cheap pass) instead of being stored.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;

use crate::cpu::{
    acc, float_dispatch, for_each_row, for_each_row_sum, simd_fn, sum_map3, sum_sq,
    tensor_from_vec, with_cpu, zeros, Elem, Rows,
};

pub(crate) struct RmsNormOp {
    pub(crate) eps: f64,
}

/// Checks that `w` is a `[d]` tensor matching the rows and returns its offset.
fn weight_offset(wl: &Layout, d: usize) -> Result<usize> {
    if wl.dims() != [d] || (d > 1 && wl.stride() != [1]) {
        bail!(
            "rms_norm: weight must be a contiguous [{d}] tensor, got {:?}",
            wl.dims()
        )
    }
    Ok(wl.start_offset())
}

#[inline(always)]
fn rstd<A: Float>(ss: A, d: usize, eps: f64) -> A {
    A::one() / (ss / acc(d as f64) + acc(eps)).sqrt()
}

simd_fn! {
    /// One row of the forward.
    pub(crate) fn fwd_row<T: Elem>(x: &[T], w: &[T], eps: f64, y: &mut [T]) {
        let s = rstd(sum_sq(x), x.len(), eps);
        for ((o, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
            let xh = T::from_acc(xv.to_acc() * s);
            *o = T::from_acc(xh.to_acc() * wv.to_acc());
        }
    }
}

simd_fn! {
    /// One row of the backward: writes `dx` and adds this row's `dy * xh` into `dw`.
    fn bwd_row<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f64, dx: &mut [T], dw: Option<&mut [T::Acc]>) {
        let d = x.len();
        let s = rstd(sum_sq(x), d, eps);
        // mean(g * xh) = s * sum(dy * w * x) / d
        let gx = sum_map3(x, w, dy, |xv: T, wv: T, gv: T| {
            xv.to_acc() * wv.to_acc() * gv.to_acc()
        });
        let c = gx * s * s / acc(d as f64);
        for (((o, &xv), &wv), &gv) in dx.iter_mut().zip(x).zip(w).zip(dy) {
            let g = gv.to_acc() * wv.to_acc();
            *o = T::from_acc(s * (g - xv.to_acc() * c));
        }
        if let Some(dw) = dw {
            for ((a, &xv), &gv) in dw.iter_mut().zip(x).zip(dy) {
                *a += gv.to_acc() * T::from_acc(xv.to_acc() * s).to_acc();
            }
        }
    }
}

fn fwd<T: Elem>(x: &[T], xr: &Rows, w: &[T], eps: f64) -> Vec<T> {
    let d = xr.row_len();
    let mut y = zeros::<T>(xr.n_rows() * d);
    for_each_row(&mut y, d, |r, yr| fwd_row(xr.row(x, r), w, eps, yr));
    y
}

/// Returns `(dx, dw)`; `dw` only when `want_dw`.
fn bwd<T: Elem>(
    x: &[T],
    xr: &Rows,
    w: &[T],
    dy: &[T],
    dyr: &Rows,
    eps: f64,
    want_dw: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let d = xr.row_len();
    let n = xr.n_rows();
    let mut dx = zeros::<T>(n * d);
    if !want_dw {
        for_each_row(&mut dx, d, |r, dxr| {
            bwd_row(xr.row(x, r), w, dyr.row(dy, r), eps, dxr, None)
        });
        return (dx, None);
    }
    let dw_acc = for_each_row_sum(&mut dx, d, d, |r, dxr, part: &mut [T::Acc]| {
        bwd_row(xr.row(x, r), w, dyr.row(dy, r), eps, dxr, Some(part))
    });
    (dx, Some(dw_acc.into_iter().map(T::from_acc).collect()))
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xr = Rows::new(xl, "rms_norm")?;
        let wo = weight_offset(wl, xr.row_len())?;
        let d = xr.row_len();
        let y = float_dispatch!(xs, "rms_norm", |x: T| {
            let w = <T as candle_core::WithDType>::cpu_storage_as_slice(ws)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(fwd::<T>(
                x,
                &xr,
                &w[wo..wo + d],
                self.eps,
            ))
        });
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_dx = x.track_op();
        let want_dw = w.track_op();
        if !want_dx && !want_dw {
            return Ok((None, None));
        }
        with_cpu(x, "rms_norm", |xs, xl| {
            with_cpu(w, "rms_norm", |ws, wl| {
                with_cpu(grad, "rms_norm", |gs, gl| {
                    let xr = Rows::new(xl, "rms_norm")?;
                    let gr = Rows::new(gl, "rms_norm")?;
                    let d = xr.row_len();
                    let wo = weight_offset(wl, d)?;
                    float_dispatch!(xs, "rms_norm", |xv: T| {
                        let wv = <T as candle_core::WithDType>::cpu_storage_as_slice(ws)?;
                        let gv = <T as candle_core::WithDType>::cpu_storage_as_slice(gs)?;
                        let (dx, dw) =
                            bwd::<T>(xv, &xr, &wv[wo..wo + d], gv, &gr, self.eps, want_dw);
                        let dx = if want_dx {
                            Some(tensor_from_vec(dx, x.dims())?)
                        } else {
                            None
                        };
                        let dw = match dw {
                            Some(v) => Some(tensor_from_vec(v, &[d])?),
                            None => None,
                        };
                        Ok((dx, dw))
                    })
                })
            })
        })
    }
}
