//! Training-grade tensor ops for llmtune.
//!
//! Every function here is differentiable end to end with candle's autograd: on the training
//! path we never call candle's fused `rms_norm`, `softmax_last_dim` or `rope`, which drop
//! gradients silently (see the project notes). The public functions are the one entry point
//! the models use; [`reference`](mod@reference) keeps the plain composite versions that the fast kernels are
//! tested against.
//!
//! # Fast paths
//! Each op is a candle `CustomOp` with a forward **and** a backward:
//! * [`linear`] runs on every backend through the storage's own matmul. With a frozen
//!   (untracked) weight its backward computes only the input gradient; no weight gradient is
//!   ever computed or stored. A tracked weight (full fine-tuning, LoRA matrices) gets its
//!   gradient.
//! * The other ops have CPU kernels (f32, f64, bf16, f16; f32 accumulation, f64 for f64)
//!   that read strided inputs in place (any layout whose last dim is contiguous) and
//!   parallelise over rows. On other devices they take the [`reference`](mod@reference) path.
//! * Fused multi-op nodes for the CPU training step (f32 activations): [`attention`] (rope,
//!   grouped-head scores, masked softmax, values, head merge), [`lora_add`] (the LoRA update
//!   of a linear output) and [`swiglu_in`] (frozen gate/up projections and SwiGLU). Each
//!   replaces several candle nodes whose backward would zero-fill and add a gradient buffer
//!   per node; `LLMTUNE_FUSED=0` composes them from the single ops.
//!
//! "Tracked" means [`Tensor::track_op`]: a variable, or a tensor computed from one. A backward
//! never produces a gradient for an untracked input (candle's composite ops do: e.g. the
//! additive mask of an attention gets a full-size gradient). There is therefore no separate
//! `frozen_linear`: whether a weight is frozen is read from the tensor itself.
//!
//! # CPU kernels
//! The inner loops are compiled for the baseline target and for AVX2+FMA and AVX-512, and
//! picked at run time. The rows are split over candle's own CPU worker pool (the one its
//! elementwise ops use). Two environment variables exist for diagnosis:
//! `LLMTUNE_OPS_NO_SIMD=1` forces the baseline loops, `LLMTUNE_OPS_POOL=rayon` uses rayon's
//! global pool instead.

use candle_core::{DType, Device, Result, Tensor, D};

mod attention;
pub mod blas;
mod bmm;
mod cpu;
mod head_xent;
mod linear;
mod lora;
mod mlp;
mod norm;
pub mod quant;
pub mod reference;
mod rope;
pub mod rows;
mod softmax;
mod swiglu;
pub mod team;
mod xent;

pub use attention::{attention, AttentionHeads};
pub use bmm::matmul;
use cpu::last_dim_contiguous;

/// Whether the fused multi-op nodes ([`attention`], [`lora_add`], [`swiglu_in`]) are used;
/// `LLMTUNE_FUSED=0` composes the same computations from single ops instead (for A/B
/// measurements and to rule the fusions out when chasing a numerical difference).
pub(crate) fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LLMTUNE_FUSED").map_or(true, |v| v != "0"))
}
pub use lora::lora_add;
pub use mlp::{swiglu_in, swiglu_in_quant};

/// `x @ w^T (+ b)` where `w` is a weight of shape `[out, in]`.
///
/// `x` may have any number of leading dims. The gradient flows to `x`, and to `w`/`b` only
/// when they are tracked (variables or computed from variables, e.g. in full fine-tuning or
/// for LoRA matrices). A frozen `w` gets no gradient at all: the backward computes
/// `grad @ w` and nothing else. A frozen bias is added inside the op.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&inp) {
        candle_core::bail!("linear: input {dims:?} does not match weight [{out}, {inp}]")
    }
    let fast_device = matches!(x.device(), Device::Cpu | Device::Cuda(_));
    // An f32 input against a frozen bf16 weight on the CPU (bf16 compute, f32 activations):
    // MKL's bf16 product when loaded, else the weight converted per call.
    let mixed = x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::BF16
        && !w.track_op();
    if mixed && !blas::has_bf16_gemm() {
        return linear(x, &w.to_dtype(DType::F32)?, b);
    }
    if !fast_device || !x.device().same_device(w.device()) || (x.dtype() != w.dtype() && !mixed) {
        return reference::linear(x, w, b);
    }
    let b = match b {
        Some(b) if mixed && b.dtype() != DType::F32 => Some(b.to_dtype(DType::F32)?),
        b => b.cloned(),
    };
    let b = b.as_ref();
    let m: usize = dims[..dims.len() - 1].iter().product();
    // The op takes any rank >= 2 whose leading dims collapse to strided rows (no reshape
    // nodes in the graph); the CPU reads any 2-D strides, CUDA wants unit-stride rows.
    let nd = dims.len() >= 2
        && (x.device().is_cpu() || x.is_contiguous())
        && linear::rows_view(x.layout(), out).is_some();
    let x2 = if nd {
        x.clone()
    } else if dims.len() == 2 {
        x.contiguous()?
    } else {
        x.reshape((m, inp))? // a (tracked) copy: the strides do not collapse
    };
    let frozen_bias = b
        .filter(|b| !b.track_op())
        .map(|b| b.contiguous())
        .transpose()?;
    let y = if w.track_op() {
        x2.apply_op2(w, linear::TrainLinear { b: frozen_bias })?
    } else {
        x2.apply_op1(linear::FrozenLinear {
            w: w.clone(),
            b: frozen_bias,
        })?
    };
    let y = match b {
        Some(b) if b.track_op() => y.broadcast_add(b)?,
        _ => y,
    };
    if y.rank() == dims.len() {
        Ok(y)
    } else {
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(out);
        y.reshape(out_dims)
    }
}

/// Whether the fast CPU kernels handle tensors of this device and dtype.
fn cpu_float(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
}

/// `t` converted to `dtype` when it differs (used for untracked side inputs only).
fn as_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// RMSNorm over the last dim: `w * x / sqrt(mean(x^2) + eps)`, computed in f32 (f64 for
/// f64 tensors). `w` is `[d]`; both `x` and `w` get gradients when tracked.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !cpu_float(x) || w.dtype() != x.dtype() || !w.device().is_cpu() {
        return reference::rms_norm(x, w, eps);
    }
    let x = last_dim_contiguous(x)?;
    let w = w.contiguous()?;
    x.apply_op2(&w, norm::RmsNormOp { eps })
}

/// Shared entry of both rope layouts.
fn rope_impl(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let fallback = if interleaved {
        reference::rope_interleaved
    } else {
        reference::rope
    };
    if !cpu_float(x) || !cos.device().is_cpu() || cos.track_op() || sin.track_op() {
        return fallback(x, cos, sin);
    }
    let (b, _h, t, d) = x.dims4()?;
    if !d.is_multiple_of(2) {
        candle_core::bail!("rope: odd head dim {d}")
    }
    let shape = (b, t, d / 2);
    let cos = as_dtype(&last_dim_contiguous(cos)?, x.dtype())?.broadcast_as(shape)?;
    let sin = as_dtype(&last_dim_contiguous(sin)?, x.dtype())?.broadcast_as(shape)?;
    let x = last_dim_contiguous(x)?;
    x.apply_op3(&cos, &sin, rope::RopeOp { interleaved })
}

/// Rotary embedding, "rotate half" layout (Llama/Qwen2 as in transformers).
///
/// `x`: `[b, heads, t, head_dim]`; `cos`/`sin`: `[b, t, head_dim/2]` (per-row positions; a
/// batch dim of 1 broadcasts). `x` may be a strided view (e.g. after a transpose). The
/// gradient flows to `x`; `cos`/`sin` are constants (when tracked, the composite reference
/// runs instead so that they get theirs).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_impl(x, cos, sin, false)
}

/// Rotary embedding, interleaved layout: pair `(x[2i], x[2i+1])` is rotated by angle `i`
/// (ChatGLM2/3, GPT-J). Same shapes and gradients as [`rope`]. For a partial rotary dim
/// (ChatGLM2 rotates the first half of each head), narrow `x` to the rotated dims, apply
/// this and concatenate the rest back.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_impl(x, cos, sin, true)
}

/// Softmax over the last dim (numerically stable).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !cpu_float(x) {
        return reference::softmax_last_dim(x);
    }
    last_dim_contiguous(x)?.apply_op1(softmax::SoftmaxOp { scale: 1.0 })
}

/// `softmax(scores * scale + mask)` over the last dim, fused: neither the scaled nor the
/// masked scores are materialised, and the (untracked) mask gets no gradient.
///
/// `mask` is additive (`0` to keep, a large negative value or `-inf` to drop) and broadcasts
/// to `scores` (e.g. `[b, 1, t, t]` or `[t, t]` for `[b, h, t, t]` scores). A row whose
/// entries are all `-inf` gives zeros. A tracked mask takes the composite path.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let tracked_mask = mask.is_some_and(|m| m.track_op());
    let mask_on_cpu = mask.is_none_or(|m| m.device().is_cpu());
    if !cpu_float(scores) || tracked_mask || !mask_on_cpu {
        return reference::masked_softmax(scores, mask, scale);
    }
    let x = last_dim_contiguous(scores)?;
    match mask {
        None => x.apply_op1(softmax::SoftmaxOp { scale }),
        Some(m) => {
            let m = as_dtype(m, x.dtype())?.broadcast_as(x.shape())?;
            let m = last_dim_contiguous(&m)?;
            x.apply_op2(&m, softmax::SoftmaxOp { scale })
        }
    }
}

/// `silu(gate) * up` (elementwise; same shapes). Either input may be a strided view, e.g.
/// the two halves of a fused gate/up projection.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !cpu_float(gate) || up.dtype() != gate.dtype() || !up.device().is_cpu() {
        return reference::swiglu(gate, up);
    }
    let g = last_dim_contiguous(gate)?;
    let u = last_dim_contiguous(up)?;
    g.apply_op2(&u, swiglu::SwigluOp)
}

/// Reads integer targets to the host as `i64`.
fn targets_i64(t: &Tensor) -> Result<Vec<i64>> {
    t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()
}

/// Token-level cross-entropy of `logits [n, vocab]` against `labels [n]` (integer, `-100` =
/// ignored; any negative label is ignored). Returns `(sum of losses over kept tokens, number
/// of kept tokens)`; the mean loss is `sum / count`. The sum is an f32 scalar (f64 for f64
/// logits).
///
/// Fused: the backward writes `g * (softmax - onehot)` for kept rows and zeros for ignored
/// ones, and no `[n, vocab]` log-softmax is kept between forward and backward.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    if !cpu_float(logits) {
        let vocab = logits.dim(D::Minus1)?;
        xent::check_targets(&targets_i64(labels)?, vocab, xent::Pick::CrossEntropySum)?;
        return reference::cross_entropy_sum(logits, labels);
    }
    let (n, vocab) = logits.dims2()?;
    let labels = targets_i64(labels)?;
    if labels.len() != n {
        candle_core::bail!(
            "cross_entropy_sum: {n} rows of logits but {} labels",
            labels.len()
        )
    }
    let count = labels.iter().filter(|&&l| l >= 0).count();
    let op = xent::LogSoftmaxPick::new(labels, vocab, xent::Pick::CrossEntropySum)?;
    let sum = last_dim_contiguous(logits)?.apply_op1(op)?;
    Ok((sum, count))
}

/// [`cross_entropy_sum`] of `linear(h, w)`: `h [n, hidden]`, a head weight `w [vocab,
/// hidden]`, `labels [n]` (negative = ignored). Returns `(sum over kept rows, kept rows)`.
///
/// With a frozen `w` the logits never enter the graph: rows with an ignored label are
/// skipped, the others are processed in chunks whose logits are freed at once, and the input
/// gradient is computed in the forward (see `head_xent.rs`). Same value and gradient as the
/// unfused composition, which a tracked `w` (full fine-tuning of the head) still takes.
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, usize)> {
    linear_cross_entropy_sum_chunked(h, w, labels, None)
}

/// [`linear_cross_entropy_sum`] with `chunk` rows per chunk (default: about 32 MB of f32
/// logits); for tests of the chunking.
#[doc(hidden)]
pub fn linear_cross_entropy_sum_chunked(
    h: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    chunk: Option<usize>,
) -> Result<(Tensor, usize)> {
    if w.track_op() {
        let logits = linear(h, w, None)?;
        let logits = if logits.dtype() == DType::F64 {
            logits
        } else {
            logits.to_dtype(DType::F32)?
        };
        return cross_entropy_sum(&logits, labels);
    }
    head_xent::linear_cross_entropy_sum(h, w, &targets_i64(labels)?, chunk)
}

/// Log-probability of `targets [b, t]` under `logits [b, t, vocab]` (for PPO/DPO), as f32
/// (f64 for f64 logits). Fused like [`cross_entropy_sum`].
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !cpu_float(logits) {
        let vocab = logits.dim(D::Minus1)?;
        xent::check_targets(&targets_i64(targets)?, vocab, xent::Pick::LogProbs)?;
        return reference::gather_logprobs(logits, targets);
    }
    let dims = logits.dims();
    let vocab = logits.dim(D::Minus1)?;
    if targets.dims() != &dims[..dims.len() - 1] {
        candle_core::bail!(
            "gather_logprobs: targets {:?} do not match logits {dims:?}",
            targets.dims()
        )
    }
    let op = xent::LogSoftmaxPick::new(targets_i64(targets)?, vocab, xent::Pick::LogProbs)?;
    last_dim_contiguous(logits)?.apply_op1(op)
}
