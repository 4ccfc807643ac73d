//! Fused log-softmax + pick over a large vocabulary: token cross-entropy (summed over kept
//! tokens) and per-token log-probabilities, as a `CustomOp1` on the logits.
//!
//! The forward makes two passes over each row (max, then sum of exponentials) and keeps only
//! the per-row log-sum-exp (`n` values); no `[n, vocab]` log-softmax is materialised. The
//! backward writes the single `[n, vocab]` gradient directly:
//! * cross-entropy: `g * (softmax - onehot(label))` for kept rows, `0` for ignored ones;
//! * log-probs: `g_r * (onehot(target_r) - softmax)`.
//!
//! The result is `f32` (`f64` for `f64` logits), the gradient has the logits' dtype.

use std::sync::Mutex;

use candle_core::backend::BackendStorage as _;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use num_traits::{Float, ToPrimitive};

use crate::cpu::{
    float_dispatch, for_each_row, last_dim_contiguous, map_rows, max_acc, simd_fn, sum_map,
    tensor_from_vec, with_cpu, zeros, Acc, Elem, Rows,
};

/// What the op returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// `sum over rows with target >= 0 of -log p(target)`, a scalar.
    CrossEntropySum,
    /// `log p(target)` for every row (leading dims of the logits).
    LogProbs,
}

pub(crate) struct LogSoftmaxPick {
    pub(crate) targets: Vec<i64>,
    pub(crate) pick: Pick,
    /// Per-row log-sum-exp saved by the forward for the backward.
    lse: Mutex<Option<Vec<f64>>>,
}

/// Errors on a target outside `[0, vocab)` (`-100`-style negatives are allowed, and ignored,
/// only for the cross-entropy). Also run before the composite path on other devices, whose
/// gather does not check its indices on the GPU.
pub(crate) fn check_targets(targets: &[i64], vocab: usize, pick: Pick) -> Result<()> {
    for (i, &t) in targets.iter().enumerate() {
        let ok = match pick {
            Pick::CrossEntropySum => t < vocab as i64,
            Pick::LogProbs => t >= 0 && t < vocab as i64,
        };
        if !ok {
            bail!("target {t} at position {i} is out of range for a vocabulary of {vocab}")
        }
    }
    Ok(())
}

impl LogSoftmaxPick {
    /// Validates `targets` against the vocabulary size (`-100`-style negatives are allowed,
    /// and ignored, only for the cross-entropy).
    pub(crate) fn new(targets: Vec<i64>, vocab: usize, pick: Pick) -> Result<Self> {
        check_targets(&targets, vocab, pick)?;
        Ok(Self {
            targets,
            pick,
            lse: Mutex::new(None),
        })
    }
}

/// Output dtype for logits of dtype `dt`.
fn out_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

simd_fn! {
    /// Log-sum-exp of one row in the accumulator type.
    fn row_lse<T: Elem>(row: &[T]) -> T::Acc {
        let mx = max_acc(row);
        if mx == T::Acc::neg_infinity() {
            return mx;
        }
        mx + sum_map(row, |v: T| (v.to_acc() - mx).exp_fast()).ln()
    }
}

simd_fn! {
    /// `out = c * exp(row - lse)` (the scaled softmax of one row).
    fn scaled_softmax_row<T: Elem>(row: &[T], lse: T::Acc, c: T::Acc, out: &mut [T]) {
        for (o, &xv) in out.iter_mut().zip(row) {
            *o = T::from_acc(c * (xv.to_acc() - lse).exp_fast());
        }
    }
}

/// Returns `(lse per row, picked log-prob per row)`; rows with a negative target get `0`.
fn fwd<T: Elem>(x: &[T], xr: &Rows, targets: &[i64]) -> (Vec<f64>, Vec<f64>) {
    let n = xr.n_rows();
    let res: Vec<(f64, f64)> = map_rows(n, xr.row_len(), |r| {
        let row = xr.row(x, r);
        let lse = row_lse(row);
        let lse64 = lse.to_f64().unwrap_or(f64::NAN);
        let t = targets[r];
        let lp = if t >= 0 {
            (row[t as usize].to_acc() - lse)
                .to_f64()
                .unwrap_or(f64::NAN)
        } else {
            0.0
        };
        (lse64, lp)
    });
    res.into_iter().unzip()
}

/// The gradient of the logits: `coef_r * (softmax_r - onehot(target_r))` per row, zero rows
/// where `coef_r` is `None`.
fn bwd<T: Elem>(x: &[T], xr: &Rows, lse: &[f64], targets: &[i64], coef: &[f64]) -> Vec<T> {
    let v = xr.row_len();
    let mut dx = zeros::<T>(xr.n_rows() * v);
    for_each_row(&mut dx, v, |r, out| {
        let (t, c) = (targets[r], coef[r]);
        if t < 0 || c == 0.0 {
            return;
        }
        let ca: T::Acc = crate::cpu::acc(c);
        scaled_softmax_row(xr.row(x, r), crate::cpu::acc(lse[r]), ca, out);
        let t = t as usize;
        out[t] = T::from_acc(out[t].to_acc() - ca);
    });
    dx
}

impl CustomOp1 for LogSoftmaxPick {
    fn name(&self) -> &'static str {
        match self.pick {
            Pick::CrossEntropySum => "cross-entropy-sum",
            Pick::LogProbs => "gather-logprobs",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xr = Rows::new(l, "cross_entropy")?;
        if xr.n_rows() != self.targets.len() {
            bail!(
                "cross_entropy: {} rows of logits but {} targets",
                xr.n_rows(),
                self.targets.len()
            )
        }
        let (lse, lp) = float_dispatch!(s, "cross_entropy", |x: T| fwd::<T>(x, &xr, &self.targets));
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        let dims = l.dims();
        let (vals, shape): (Vec<f64>, Shape) = match self.pick {
            Pick::CrossEntropySum => (vec![-lp.iter().sum::<f64>()], Shape::from(())),
            Pick::LogProbs => (lp, Shape::from(&dims[..dims.len() - 1])),
        };
        let out = match out_dtype(s.dtype()) {
            DType::F64 => CpuStorage::F64(vals),
            _ => CpuStorage::F32(vals.into_iter().map(|v| v as f32).collect()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g: Vec<f64> = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let n = self.targets.len();
        let coef: Vec<f64> = match self.pick {
            // d(-log p_t)/dx = softmax - onehot
            Pick::CrossEntropySum => vec![g.first().copied().unwrap_or(0.0); n],
            // d(log p_t)/dx = onehot - softmax
            Pick::LogProbs => g.iter().map(|v| -v).collect(),
        };
        let lse = match self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(lse) => lse,
            None => bail!("cross_entropy: backward before forward"),
        };
        let x = last_dim_contiguous(x)?;
        with_cpu(&x, "cross_entropy", |xs, xl| {
            let xr = Rows::new(xl, "cross_entropy")?;
            float_dispatch!(xs, "cross_entropy", |xv: T| {
                tensor_from_vec(bwd::<T>(xv, &xr, &lse, &self.targets, &coef), x.dims())
            })
        })
        .map(Some)
    }
}
