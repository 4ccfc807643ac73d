//! The attention core of a decoder layer as one graph node (f32, CPU): `q`, `k`, `v` straight
//! from their projections (`[b, t, heads * d]`), the rotary embedding ("rotate half") on `q`
//! and `k`, `softmax(q k^T * scale + mask) v` per query head with grouped KV heads, and the
//! heads merged back into `[b, t, n_head * d]` for the output projection.
//!
//! Why one node: written with candle ops, the same computation is about 18 graph nodes per
//! layer (head splits, transposes, a contiguous copy, two ropes, two batched products, the
//! softmax, the merge). candle's backward gives the first gradient of every node a zero-filled
//! buffer plus an add (`GradStore::or_insert`), and each view node materialises its gradient:
//! on the SmolLM2 training shape that is about 15M elements per layer and step, 20-30% of
//! the non-GEMM time of a step. Here the backward writes the three input gradients directly.
//!
//! The numerics are those of the composite path: the softmax and rope rows go through the
//! same kernels as [`crate::masked_softmax`] and [`crate::rope`]; only the summation order
//! inside the products can differ. The products are [`crate::blas::gemm_f32`] calls (MKL or
//! OpenBLAS when available, else the `gemm` crate), with the operands read in place: the
//! values `v` are never transposed, the output and the gradients are written straight into
//! the `[b, t, heads * d]` layouts.
//!
//! The forward keeps the rotated `q`/`k` and the probabilities for the backward, which takes
//! them (they are recomputed when a second backward runs over the same graph).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::blas::{gemm_f32, Mat};
use crate::cpu::{contiguous_f32, for_each_row, for_each_row_scratch, with_cpu, write_only, Rows};
use crate::rope::rotate_row;
use crate::softmax;

/// Head geometry of [`attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionHeads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple of it).
    pub n_kv: usize,
    /// Size of one head.
    pub head_dim: usize,
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
    scale: f32,
}

impl Geom {
    /// Query heads per KV head.
    fn rep(&self) -> usize {
        self.h / self.kvh
    }
}

/// What the forward keeps for the backward.
struct Saved {
    /// Rotated queries `[b, h, t, d]`.
    qr: Vec<f32>,
    /// Rotated keys `[b, kvh, t, d]`.
    kr: Vec<f32>,
    /// Probabilities `[b, h, t, t]`.
    p: Vec<f32>,
}

struct AttentionOp {
    g: Geom,
    /// `[b, t, d/2]` (views; broadcast leading dims allowed), f32.
    cos: Tensor,
    sin: Tensor,
    /// `[b, t, t]` additive mask (view), f32.
    mask: Tensor,
    /// Whether any input is tracked (only then is anything kept for a backward).
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// `softmax(q k^T * scale + mask) v` with rope on `q` and `k`, for a full sequence (no KV
/// cache): `q` `[b, t, n_head * d]`, `k`/`v` `[b, t, n_kv * d]`, `rope` = `(cos, sin)`, each
/// `[b or 1, t, d/2]`,
/// `mask` additive, `[b or 1, 1, t, t]`. Returns `[b, t, n_head * d]`, or `None` when the
/// fused path does not apply (not all on the CPU, not f32, a tracked `cos`/`sin`/`mask`, other
/// shapes, or `LLMTUNE_FUSED=0`); the caller then composes the same computation
/// from [`crate::rope`], [`crate::matmul`] and [`crate::masked_softmax`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    heads: AttentionHeads,
    scale: f64,
) -> Result<Option<Tensor>> {
    let AttentionHeads {
        n_head: h,
        n_kv: kvh,
        head_dim: d,
    } = heads;
    let all = [q, k, v, cos, sin, mask];
    let applies = crate::fused_enabled()
        && all.iter().all(|t| t.device().is_cpu())
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && ![cos, sin, mask].iter().any(|t| t.track_op())
        && kvh > 0
        && h.is_multiple_of(kvh)
        && d > 0
        && d.is_multiple_of(2);
    if !applies {
        return Ok(None);
    }
    let (b, t, qw) = q.dims3()?;
    if qw != h * d || k.dims() != [b, t, kvh * d] || v.dims() != [b, t, kvh * d] {
        return Ok(None);
    }
    let f32_view = |x: &Tensor, shape: &[usize]| -> Result<Tensor> {
        let x = if x.dtype() == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        crate::last_dim_contiguous(&x.broadcast_as(shape)?)
    };
    let cos = f32_view(cos, &[b, t, d / 2])?;
    let sin = f32_view(sin, &[b, t, d / 2])?;
    let mask = f32_view(mask, &[b, 1, t, t])?.squeeze(1)?;
    let op = AttentionOp {
        g: Geom {
            b,
            t,
            h,
            kvh,
            d,
            scale: scale as f32,
        },
        cos,
        sin,
        mask,
        keep: q.track_op() || k.track_op() || v.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

/// The f32 slice of a contiguous CPU operand, from its start offset.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    contiguous_f32(s, l, "attention", what)
}

/// Rotates the heads of `x` (`[b, t, heads * d]`) into `[b, heads, t, d]`.
fn rope_split(x: &[f32], heads: usize, g: &Geom, tabs: &Tables) -> Vec<f32> {
    let (t, d) = (g.t, g.d);
    // SAFETY: for_each_row hands every row to rotate_row, which writes all of it.
    let mut y = unsafe { write_only::<f32>(g.b * heads * t * d) };
    for_each_row(&mut y, d, |r, yr| {
        let (i, hi, bi) = (r % t, (r / t) % heads, r / (t * heads));
        let src = ((bi * t + i) * heads + hi) * d;
        let pos = bi * t + i;
        rotate_row(
            &x[src..src + d],
            tabs.cos(pos),
            tabs.sin(pos),
            false,
            false,
            yr,
        );
    });
    y
}

/// The backward of [`rope_split`]: `dy` `[b, heads, t, d]` rotated back into `[b, t, heads * d]`.
fn rope_merge_back(dy: &[f32], heads: usize, g: &Geom, tabs: &Tables) -> Vec<f32> {
    let (t, d) = (g.t, g.d);
    // SAFETY: as in rope_split.
    let mut dx = unsafe { write_only::<f32>(g.b * t * heads * d) };
    for_each_row(&mut dx, d, |r, out| {
        let (hi, pos) = (r % heads, r / heads);
        let (bi, i) = (pos / t, pos % t);
        let src = ((bi * heads + hi) * t + i) * d;
        rotate_row(
            &dy[src..src + d],
            tabs.cos(pos),
            tabs.sin(pos),
            false,
            true,
            out,
        );
    });
    dx
}

/// Row access to the rope tables and the mask.
struct Tables<'a> {
    cos: (&'a [f32], Rows),
    sin: (&'a [f32], Rows),
    mask: (&'a [f32], Rows),
}

impl Tables<'_> {
    fn cos(&self, pos: usize) -> &[f32] {
        self.cos.1.row(self.cos.0, pos)
    }
    fn sin(&self, pos: usize) -> &[f32] {
        self.sin.1.row(self.sin.0, pos)
    }
    fn mask(&self, pos: usize) -> &[f32] {
        self.mask.1.row(self.mask.0, pos)
    }
}

impl AttentionOp {
    /// Calls `f` with the row access to the tables.
    fn with_tables<R>(&self, f: impl FnOnce(&Tables) -> Result<R>) -> Result<R> {
        fn f32s(s: &CpuStorage) -> Result<&[f32]> {
            match s {
                CpuStorage::F32(v) => Ok(v.as_slice()),
                _ => candle_core::bail!("attention: rope tables and mask must be f32"),
            }
        }
        with_cpu(&self.cos, "attention", |cs, cl| {
            with_cpu(&self.sin, "attention", |ss, sl| {
                with_cpu(&self.mask, "attention", |ms, ml| {
                    let tabs = Tables {
                        cos: (f32s(cs)?, Rows::new(cl, "attention")?),
                        sin: (f32s(ss)?, Rows::new(sl, "attention")?),
                        mask: (f32s(ms)?, Rows::new(ml, "attention")?),
                    };
                    f(&tabs)
                })
            })
        })
    }

    /// The forward: the merged output `[b, t, h * d]` and what the backward needs.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let g = self.g;
        let (b, t, h, kvh, d, rep) = (g.b, g.t, g.h, g.kvh, g.d, g.rep());
        let (hd, kd) = (h * d, kvh * d);
        self.with_tables(|tabs| {
            let qr = rope_split(q, h, &g, tabs);
            let kr = rope_split(k, kvh, &g, tabs);
            // Scores of the `rep` query heads of each KV head at once: [rep * t, t].
            // SAFETY: the products below (beta = 0) write every [rep * t, t] block.
            let mut p = unsafe { write_only::<f32>(b * h * t * t) };
            for bi in 0..b {
                for gi in 0..kvh {
                    let (qo, ko) = ((bi * h + gi * rep) * t * d, (bi * kvh + gi) * t * d);
                    gemm_f32(
                        (rep * t, t, d),
                        1.0,
                        Mat::new(&qr, qo, d, false),
                        Mat::new(&kr, ko, d, true),
                        0.0,
                        &mut p,
                        (bi * h + gi * rep) * t * t,
                        t,
                    )?;
                }
            }
            // softmax(scores * scale + mask), in place (scratch: the scores row, the exps).
            for_each_row_scratch(&mut p, t, 2 * t, |r, row, scratch: &mut [f32]| {
                let (x, z) = scratch.split_at_mut(t);
                x.copy_from_slice(row);
                row.fill(0.0); // a fully masked row stays zero
                let pos = (r / (h * t)) * t + r % t;
                softmax::fwd_row(&*x, Some(tabs.mask(pos)), g.scale, z, row);
            });
            // out[b, i, head] = P_head @ V_group, V read in place from [b, t, kvh * d].
            // SAFETY: the products (beta = 0) write every head's [t, d] block.
            let mut out = unsafe { write_only::<f32>(b * t * hd) };
            for bi in 0..b {
                for hi in 0..h {
                    gemm_f32(
                        (t, d, t),
                        1.0,
                        Mat::new(&p, (bi * h + hi) * t * t, t, false),
                        Mat::new(v, bi * t * kd + (hi / rep) * d, kd, false),
                        0.0,
                        &mut out,
                        bi * t * hd + hi * d,
                        hd,
                    )?;
                }
            }
            Ok((out, Saved { qr, kr, p }))
        })
    }

    /// The backward: gradients of `q`, `k`, `v` (each only when `need` says so).
    fn backward(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        grad: &[f32],
        need: [bool; 3],
    ) -> Result<[Option<Vec<f32>>; 3]> {
        let g = self.g;
        let (b, t, h, kvh, d, rep) = (g.b, g.t, g.h, g.kvh, g.d, g.rep());
        let (hd, kd) = (h * d, kvh * d);
        let taken = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Saved { qr, kr, p } = match taken {
            Some(s) => s,
            None => self.forward(q, k, v)?.1,
        };
        // dV[group] = sum over its query heads of P_head^T @ dOut_head.
        let dv = if need[2] {
            // SAFETY: the first query head of each group writes its block (beta = 0) before
            // the others accumulate into it.
            let mut dv = unsafe { write_only::<f32>(b * t * kd) };
            for bi in 0..b {
                for hi in 0..h {
                    gemm_f32(
                        (t, d, t),
                        1.0,
                        Mat::new(&p, (bi * h + hi) * t * t, t, true),
                        Mat::new(grad, bi * t * hd + hi * d, hd, false),
                        if hi % rep == 0 { 0.0 } else { 1.0 },
                        &mut dv,
                        bi * t * kd + (hi / rep) * d,
                        kd,
                    )?;
                }
            }
            Some(dv)
        } else {
            None
        };
        if !(need[0] || need[1]) {
            return Ok([None, None, dv]);
        }
        // dP = dOut @ V^T, then the softmax backward in place: dS = scale * P * (dP - <dP, P>).
        // SAFETY: the products (beta = 0) write every head's [t, t] block.
        let mut ds = unsafe { write_only::<f32>(b * h * t * t) };
        for bi in 0..b {
            for hi in 0..h {
                gemm_f32(
                    (t, t, d),
                    1.0,
                    Mat::new(grad, bi * t * hd + hi * d, hd, false),
                    Mat::new(v, bi * t * kd + (hi / rep) * d, kd, true),
                    0.0,
                    &mut ds,
                    (bi * h + hi) * t * t,
                    t,
                )?;
            }
        }
        for_each_row_scratch(&mut ds, t, t, |r, row, dp: &mut [f32]| {
            dp.copy_from_slice(row);
            softmax::bwd_row(&p[r * t..(r + 1) * t], dp, g.scale, row);
        });
        drop(p);
        let (dq, dk) = self.with_tables(|tabs| {
            // dQr = dS @ Kr, per KV head for its `rep` query heads at once.
            let dq = if need[0] {
                // SAFETY: the products (beta = 0) write every group's block.
                let mut dqr = unsafe { write_only::<f32>(b * h * t * d) };
                for bi in 0..b {
                    for gi in 0..kvh {
                        let so = (bi * h + gi * rep) * t * t;
                        gemm_f32(
                            (rep * t, d, t),
                            1.0,
                            Mat::new(&ds, so, t, false),
                            Mat::new(&kr, (bi * kvh + gi) * t * d, d, false),
                            0.0,
                            &mut dqr,
                            (bi * h + gi * rep) * t * d,
                            d,
                        )?;
                    }
                }
                Some(rope_merge_back(&dqr, h, &g, tabs))
            } else {
                None
            };
            // dKr = dS^T @ Qr (summing over the group's query heads).
            let dk = if need[1] {
                // SAFETY: the products (beta = 0) write every group's block.
                let mut dkr = unsafe { write_only::<f32>(b * kvh * t * d) };
                for bi in 0..b {
                    for gi in 0..kvh {
                        let so = (bi * h + gi * rep) * t * t;
                        gemm_f32(
                            (t, d, rep * t),
                            1.0,
                            Mat::new(&ds, so, t, true),
                            Mat::new(&qr, (bi * h + gi * rep) * t * d, d, false),
                            0.0,
                            &mut dkr,
                            (bi * kvh + gi) * t * d,
                            d,
                        )?;
                    }
                }
                Some(rope_merge_back(&dkr, kvh, &g, tabs))
            } else {
                None
            };
            Ok((dq, dk))
        })?;
        Ok([dq, dk, dv])
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(qs, ql, "q")?,
            slice(ks, kl, "k")?,
            slice(vs, vl, "v")?,
        );
        let (out, saved) = self.forward(q, k, v)?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
        let g = self.g;
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.h * g.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = [q.track_op(), k.track_op(), v.track_op()];
        if !need.iter().any(|&n| n) {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        let [dq, dk, dv] = with_cpu(q, "attention", |qs, ql| {
            with_cpu(k, "attention", |ks, kl| {
                with_cpu(v, "attention", |vs, vl| {
                    with_cpu(&grad, "attention", |gs, gl| {
                        let ins = (
                            slice(qs, ql, "q")?,
                            slice(ks, kl, "k")?,
                            slice(vs, vl, "v")?,
                        );
                        self.backward(ins, slice(gs, gl, "grad")?, need)
                    })
                })
            })
        })?;
        let dev = q.device();
        let wrap = |x: Option<Vec<f32>>, like: &Tensor| -> Result<Option<Tensor>> {
            x.map(|x| Tensor::from_vec(x, like.dims(), dev)).transpose()
        };
        Ok((wrap(dq, q)?, wrap(dk, k)?, wrap(dv, v)?))
    }
}
