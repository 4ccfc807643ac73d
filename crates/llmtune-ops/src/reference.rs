use candle_core::{DType, Result, Tensor, D};
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b { Some(b) => y.broadcast_add(b), None => Ok(y) }
}
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> { candle_nn::ops::silu(gate)?.mul(up) }
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let labels_v: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
    let keep: Vec<u32> = labels_v.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, _)| i as u32).collect();
    let n = keep.len();
    if n == 0 { return Ok((logits.sum_all()?.affine(0.0, 0.0)?.to_dtype(DType::F32)?, 0)); }
    let idx = Tensor::new(keep.as_slice(), logits.device())?;
    let tgt: Vec<u32> = labels_v.iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect();
    let tgt = Tensor::new(tgt.as_slice(), logits.device())?;
    let l = logits.index_select(&idx, 0)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&l, D::Minus1)?;
    Ok((logp.gather(&tgt.unsqueeze(1)?, 1)?.sum_all()?.neg()?, n))
}
