//! LM head + token cross-entropy in one step, without a `[n, vocab]` tensor in the graph.
//!
//! For a frozen head weight `w [vocab, hidden]` the loss `sum_i -log softmax(h_i w^T)[y_i]`
//! has the input gradient `(softmax - onehot) w`, which does not depend on anything but
//! `h` and `w`. So the forward computes it right away, a chunk of rows at a time (the
//! logits of one chunk live only while that chunk is processed), and the graph keeps only
//! the `[kept rows, hidden]` gradient: no logits, no logits gradient. Rows whose label is
//! ignored (`< 0`, e.g. the prompt in SFT) are skipped entirely: no logits are computed for
//! them. The costs are those of the unfused head (one `h w^T`, one `g w`) without its
//! `[n, vocab]` memory (four such tensors for a 1024 x 49152 batch: about 800 MB in f32).
//!
//! The result is attached to the graph as `total + s - detach(s)` with `s = sum(h_k * G)`:
//! its value is `total` and its gradient with respect to `h_k` is `G`, on any device.

use candle_core::{DType, Result, Tensor, Var};

/// Rows per chunk: about 32 MB of f32 logits per chunk.
fn chunk_rows(vocab: usize) -> usize {
    ((8usize << 20) / vocab.max(1)).clamp(16, 4096)
}

pub(crate) fn linear_cross_entropy_sum(
    h: &Tensor,
    w: &Tensor,
    labels: &[i64],
    chunk: Option<usize>,
) -> Result<(Tensor, usize)> {
    let (n, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d {
        candle_core::bail!("linear_cross_entropy_sum: hidden [{n}, {d}] vs head [{vocab}, {wd}]")
    }
    if labels.len() != n {
        candle_core::bail!(
            "linear_cross_entropy_sum: {n} rows of hidden states but {} labels",
            labels.len()
        )
    }
    crate::xent::check_targets(labels, vocab, crate::xent::Pick::CrossEntropySum)?;
    let kept: Vec<u32> = (0..n as u32).filter(|&i| labels[i as usize] >= 0).collect();
    let count = kept.len();
    let out_dtype = if h.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if count == 0 {
        // Zero loss, zero gradient, still connected to the graph.
        return Ok(((h.sum_all()? * 0.0)?.to_dtype(out_dtype)?, 0));
    }
    let dev = h.device();
    let hk = if count == n {
        h.clone()
    } else {
        let idx = Tensor::from_vec(kept.clone(), count, dev)?;
        h.contiguous()?.index_select(&idx, 0)?
    };
    let want_grad = hk.track_op();
    let hd = hk.detach();
    let kept_labels: Vec<i64> = kept.iter().map(|&i| labels[i as usize]).collect();
    let step = chunk.unwrap_or_else(|| chunk_rows(vocab)).max(1);
    let mut total = 0f64;
    let mut grads = Vec::new();
    let mut start = 0;
    while start < count {
        let len = step.min(count - start);
        let hc = hd.narrow(0, start, len)?;
        let yc = Tensor::from_vec(kept_labels[start..start + len].to_vec(), len, dev)?;
        let logits = crate::linear(&hc, w, None)?.to_dtype(out_dtype)?;
        if want_grad {
            let v = Var::from_tensor(&logits)?;
            drop(logits);
            let (s, _) = crate::cross_entropy_sum(v.as_tensor(), &yc)?;
            total += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let store = s.backward()?;
            let gl = store
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no logits gradient".into()))?;
            // [len, vocab] x [vocab, hidden]
            // An f32 gradient against a bf16 head stays f32 (MKL's mixed product).
            let gl = if gl.dtype() == DType::F32 && w.dtype() == DType::BF16 {
                gl.clone()
            } else {
                gl.to_dtype(w.dtype())?
            };
            grads.push(crate::linear::matmul_2d(&gl, w)?.to_dtype(h.dtype())?);
        } else {
            let (s, _) = crate::cross_entropy_sum(&logits, &yc)?;
            total += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        start += len;
    }
    let total_t = Tensor::new(total, dev)?.to_dtype(out_dtype)?;
    if !want_grad {
        return Ok((total_t, count));
    }
    let g = Tensor::cat(&grads, 0)?;
    let s = (&hk * &g)?.sum_all()?.to_dtype(out_dtype)?;
    // `s - detach(s)` is exactly zero, so the value is `total` to the bit.
    let loss = ((&s - s.detach())? + total_t)?;
    Ok((loss, count))
}
