//! Snapshot of the reference ops (lead's build mirror only).
use candle_core::{DType, Result, Tensor, D};
pub mod reference;
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> { reference::linear(x, w, b) }
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> { reference::rms_norm(x, w, eps) }
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> { reference::rope(x, cos, sin) }
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> { reference::softmax_last_dim(x) }
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> { reference::swiglu(gate, up) }
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> { reference::cross_entropy_sum(logits, labels) }
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)
}
