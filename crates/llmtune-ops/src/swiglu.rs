//! SwiGLU, `silu(gate) * up`, as a `CustomOp2` on `(gate, up)` with forward and backward.
//!
//! With `s = sigmoid(g)`: `y = g s u`, `dg = dy u s (1 + g (1 - s))`, `du = dy g s`. The
//! backward recomputes `s` from `gate` and computes only the gradients of tracked inputs.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use num_traits::One;

use crate::cpu::{
    float_dispatch, for_each_row, for_each_row2, last_dim_contiguous, simd_fn, tensor_from_vec,
    with_cpu, zeros, Acc, Elem, Rows,
};

pub(crate) struct SwigluOp;

#[inline(always)]
fn sigmoid<A: Acc>(g: A) -> A {
    A::one() / (A::one() + (-g).exp_fast())
}

simd_fn! {
    pub(crate) fn fwd_row<T: Elem>(g: &[T], u: &[T], y: &mut [T]) {
        for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            let ga = gv.to_acc();
            // silu is rounded to the dtype before the product, as in the reference
            let silu = T::from_acc(ga * sigmoid(ga));
            *o = T::from_acc(silu.to_acc() * uv.to_acc());
        }
    }
}

simd_fn! {
    pub(crate) fn bwd_both_row<T: Elem>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
        let one = T::Acc::one();
        let outs = dg.iter_mut().zip(du.iter_mut());
        for (((o_g, o_u), &gv), (&uv, &yv)) in outs.zip(g).zip(u.iter().zip(dy)) {
            let (ga, ua, ya) = (gv.to_acc(), uv.to_acc(), yv.to_acc());
            let s = sigmoid(ga);
            *o_g = T::from_acc(ya * ua * s * (one + ga * (one - s)));
            *o_u = T::from_acc(ya * ga * s);
        }
    }
}

simd_fn! {
    fn bwd_gate_row<T: Elem>(g: &[T], u: &[T], dy: &[T], dg: &mut [T]) {
        let one = T::Acc::one();
        for (((o, &gv), &uv), &yv) in dg.iter_mut().zip(g).zip(u).zip(dy) {
            let (ga, s) = (gv.to_acc(), sigmoid(gv.to_acc()));
            *o = T::from_acc(yv.to_acc() * uv.to_acc() * s * (one + ga * (one - s)));
        }
    }
}

simd_fn! {
    fn bwd_up_row<T: Elem>(g: &[T], dy: &[T], du: &mut [T]) {
        for ((o, &gv), &yv) in du.iter_mut().zip(g).zip(dy) {
            let ga = gv.to_acc();
            *o = T::from_acc(yv.to_acc() * ga * sigmoid(ga));
        }
    }
}

fn fwd<T: Elem>(g: &[T], gr: &Rows, u: &[T], ur: &Rows) -> Vec<T> {
    let d = gr.row_len();
    let mut y = zeros::<T>(gr.n_rows() * d);
    for_each_row(&mut y, d, |r, yr| fwd_row(gr.row(g, r), ur.row(u, r), yr));
    y
}

/// Returns `(dgate, dup)` for the requested ones.
fn bwd<T: Elem>(
    g: &[T],
    gr: &Rows,
    u: &[T],
    ur: &Rows,
    dy: &[T],
    dyr: &Rows,
    want: (bool, bool),
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let d = gr.row_len();
    let n = gr.n_rows() * d;
    match want {
        (true, true) => {
            let mut dg = zeros::<T>(n);
            let mut du = zeros::<T>(n);
            for_each_row2(&mut dg, &mut du, d, |r, dgr, dur| {
                bwd_both_row(gr.row(g, r), ur.row(u, r), dyr.row(dy, r), dgr, dur)
            });
            (Some(dg), Some(du))
        }
        (true, false) => {
            let mut dg = zeros::<T>(n);
            for_each_row(&mut dg, d, |r, dgr| {
                bwd_gate_row(gr.row(g, r), ur.row(u, r), dyr.row(dy, r), dgr)
            });
            (Some(dg), None)
        }
        (false, true) => {
            let mut du = zeros::<T>(n);
            for_each_row(&mut du, d, |r, dur| {
                bwd_up_row(gr.row(g, r), dyr.row(dy, r), dur)
            });
            (None, Some(du))
        }
        (false, false) => (None, None),
    }
}

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", gl.dims(), ul.dims())
        }
        let gr = Rows::new(gl, "swiglu")?;
        let ur = Rows::new(ul, "swiglu")?;
        let y = float_dispatch!(gs, "swiglu", |g: T| {
            let u = T::cpu_storage_as_slice(us)?;
            T::to_cpu_storage_owned(fwd::<T>(g, &gr, u, &ur))
        });
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want = (gate.track_op(), up.track_op());
        if want == (false, false) {
            return Ok((None, None));
        }
        let grad = last_dim_contiguous(grad)?;
        with_cpu(gate, "swiglu", |gs, gl| {
            with_cpu(up, "swiglu", |us, ul| {
                with_cpu(&grad, "swiglu", |ys, yl| {
                    let gr = Rows::new(gl, "swiglu")?;
                    let ur = Rows::new(ul, "swiglu")?;
                    let yr = Rows::new(yl, "swiglu")?;
                    float_dispatch!(gs, "swiglu", |g: T| {
                        let u = T::cpu_storage_as_slice(us)?;
                        let y = T::cpu_storage_as_slice(ys)?;
                        let (dg, du) = bwd::<T>(g, &gr, u, &ur, y, &yr, want);
                        let wrap = |v: Option<Vec<T>>| -> Result<Option<Tensor>> {
                            v.map(|v| tensor_from_vec(v, gate.dims())).transpose()
                        };
                        Ok((wrap(dg)?, wrap(du)?))
                    })
                })
            })
        })
    }
}
