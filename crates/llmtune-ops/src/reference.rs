//! Plain composite implementations built only from candle ops that have a backward.
//! They define the semantics the fast kernels must match, and they are the fallback on
//! devices and dtypes the fast kernels do not cover.

use candle_core::{DType, Result, Tensor, D};

/// `x @ w^T (+ b)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `w * x / sqrt(mean(x^2) + eps)`, normalised in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}

/// Rotate-half rotary embedding; `x [b, h, t, d]`, `cos`/`sin` `[b, t, d/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    // [b, t, half] -> [b, 1, t, half]
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// Interleaved rotary embedding (pairs `(x[2i], x[2i+1])`, ChatGLM2/3 and GPT-J style);
/// same shapes as [`rope`].
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let xs = x.reshape((b, h, t, d / 2, 2))?;
    let x0 = xs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = xs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
    Tensor::stack(&[r0, r1], D::Minus1)?.reshape((b, h, t, d))
}

/// Numerically stable softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `softmax(scores * scale + mask)` over the last dim; `mask` broadcasts to `scores`.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let z = if scale == 1.0 {
        scores.clone()
    } else {
        scores.affine(scale, 0.0)?
    };
    let z = match mask {
        Some(m) => z.broadcast_add(m)?,
        None => z,
    };
    softmax_last_dim(&z)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)?.mul(up)
}

/// Sum of token cross-entropies over labels `>= 0`, and their count.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let labels_v: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
    let keep: Vec<u32> = labels_v
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, _)| i as u32)
        .collect();
    let n = keep.len();
    if n == 0 {
        let zero = logits.sum_all()?.affine(0.0, 0.0)?.to_dtype(DType::F32)?;
        return Ok((zero, 0));
    }
    let idx = Tensor::new(keep.as_slice(), logits.device())?;
    let tgt: Vec<u32> = labels_v
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    let tgt = Tensor::new(tgt.as_slice(), logits.device())?;
    let l = logits.index_select(&idx, 0)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&l, D::Minus1)?;
    let picked = logp.gather(&tgt.unsqueeze(1)?, 1)?;
    Ok((picked.sum_all()?.neg()?, n))
}

/// `log softmax(logits)[target]` for `logits [.., vocab]` and `targets [..]`, in f32.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}
