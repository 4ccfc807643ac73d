//! Rotary position embedding as a `CustomOp3` on `(x, cos, sin)` with forward and backward.
//!
//! `x` is `[b, h, t, d]`, `cos`/`sin` are (views broadcast to) `[b, t, d/2]`. Two layouts:
//! * rotate-half (Llama, Qwen2): pair `(x[i], x[i + d/2])` is rotated by angle `i`;
//! * interleaved (ChatGLM2/3, GPT-J): pair `(x[2i], x[2i + 1])` is rotated by angle `i`.
//!
//! Each pair is multiplied by the rotation `[[c, -s], [s, c]]`; the backward multiplies the
//! output gradient by the transposed matrix, i.e. the rotation by the opposite angle. The op
//! gives no gradient to `cos`/`sin` (the public function takes the composite path when they
//! are tracked).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use num_traits::One;

use crate::cpu::{
    float_dispatch, for_each_row, simd_fn, tensor_from_vec, with_cpu, zeros, Elem, Rows,
};

pub(crate) struct RopeOp {
    pub(crate) interleaved: bool,
}

/// Geometry shared by the forward and the backward.
struct Geom {
    h: usize,
    t: usize,
    half: usize,
}

impl Geom {
    fn new(xl: &Layout, cl: &Layout) -> Result<Self> {
        let (b, h, t, d) = xl.shape().dims4()?;
        let (cb, ct, ch) = cl.shape().dims3()?;
        if !d.is_multiple_of(2) || (cb, ct, ch) != (b, t, d / 2) {
            candle_core::bail!(
                "rope: x {:?} needs an even head dim and cos/sin [{b}, {t}, {}], got {:?}",
                xl.dims(),
                d / 2,
                cl.dims()
            )
        }
        Ok(Self { h, t, half: d / 2 })
    }
}

simd_fn! {
    /// Rotates the pairs of one row; `sin` is negated for the backward (`neg`).
    pub(crate) fn rotate_row<T: Elem>(x: &[T], c: &[T], s: &[T], interleaved: bool, neg: bool, y: &mut [T]) {
        let sign = if neg { -T::Acc::one() } else { T::Acc::one() };
        if interleaved {
            for (((yp, xp), &cv), &sv) in y.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(c).zip(s) {
                let (cv, sv) = (cv.to_acc(), sign * sv.to_acc());
                let (x0, x1) = (xp[0].to_acc(), xp[1].to_acc());
                yp[0] = T::from_acc(x0 * cv - x1 * sv);
                yp[1] = T::from_acc(x1 * cv + x0 * sv);
            }
        } else {
            let half = c.len();
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            let pairs = y1.iter_mut().zip(y2.iter_mut()).zip(x1.iter().zip(x2));
            for (((o1, o2), (&a, &b)), (&cv, &sv)) in pairs.zip(c.iter().zip(s)) {
                let (cv, sv) = (cv.to_acc(), sign * sv.to_acc());
                let (a, b) = (a.to_acc(), b.to_acc());
                *o1 = T::from_acc(a * cv - b * sv);
                *o2 = T::from_acc(b * cv + a * sv);
            }
        }
    }
}

/// Rotates every pair of every row of `x` by the angle of its position; `sign = -1` rotates
/// by the opposite angle (the backward).
#[allow(clippy::too_many_arguments)]
fn rotate<T: Elem>(
    x: &[T],
    xr: &Rows,
    cos: &[T],
    cr: &Rows,
    sin: &[T],
    sr: &Rows,
    g: &Geom,
    interleaved: bool,
    sign: f64,
) -> Vec<T> {
    let d = 2 * g.half;
    let mut y = zeros::<T>(xr.n_rows() * d);
    let neg = sign < 0.0;
    for_each_row(&mut y, d, |r, yr| {
        let (bi, ti) = (r / (g.h * g.t), r % g.t);
        let pos = bi * g.t + ti;
        rotate_row(
            xr.row(x, r),
            cr.row(cos, pos),
            sr.row(sin, pos),
            interleaved,
            neg,
            yr,
        );
    });
    y
}

/// Applies [`rotate`] to CPU storages.
#[allow(clippy::too_many_arguments)]
fn rotate_storage(
    xs: &CpuStorage,
    xl: &Layout,
    cs: &CpuStorage,
    cl: &Layout,
    ss: &CpuStorage,
    sl: &Layout,
    interleaved: bool,
    sign: f64,
) -> Result<CpuStorage> {
    let g = Geom::new(xl, cl)?;
    if sl.dims() != cl.dims() {
        candle_core::bail!("rope: cos {:?} and sin {:?} differ", cl.dims(), sl.dims())
    }
    let xr = Rows::new(xl, "rope")?;
    let cr = Rows::new(cl, "rope")?;
    let sr = Rows::new(sl, "rope")?;
    Ok(float_dispatch!(xs, "rope", |x: T| {
        let c = T::cpu_storage_as_slice(cs)?;
        let s = T::cpu_storage_as_slice(ss)?;
        T::to_cpu_storage_owned(rotate::<T>(x, &xr, c, &cr, s, &sr, &g, interleaved, sign))
    }))
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        if self.interleaved {
            "rope-interleaved"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = rotate_storage(xs, xl, cs, cl, ss, sl, self.interleaved, 1.0)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let grad = crate::cpu::last_dim_contiguous(grad)?;
        let dx = with_cpu(&grad, "rope", |gs, gl| {
            with_cpu(cos, "rope", |cs, cl| {
                with_cpu(sin, "rope", |ss, sl| {
                    rotate_storage(gs, gl, cs, cl, ss, sl, self.interleaved, -1.0)
                })
            })
        })?;
        let dx = float_dispatch!(dx, "rope", |v: T| tensor_from_vec(v, x.dims())?);
        Ok((Some(dx), None, None))
    }
}
