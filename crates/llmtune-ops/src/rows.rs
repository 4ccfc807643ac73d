//! The f32 CPU kernels of [`rms_norm`](crate::rms_norm), [`masked_softmax`](crate::masked_softmax),
//! [`swiglu`](crate::swiglu) and [`rope`](crate::rope) on one row of plain slices, for code
//! that runs without tensors (the batch-1 decode engine). They are the very row functions the
//! tensor ops run, so the results are bit-identical to the ops' for the same row.

/// `y = x / sqrt(mean(x^2) + eps) * w` (as [`crate::rms_norm`]).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64, y: &mut [f32]) {
    assert!(
        x.len() == w.len() && x.len() == y.len(),
        "rows::rms_norm: lengths"
    );
    crate::norm::fwd_row::<f32>(x, w, eps, y)
}

/// `y = softmax(x * scale)` (as [`crate::masked_softmax`] with no masked key); `z` is scratch
/// of the row's length.
pub fn softmax(x: &[f32], scale: f32, z: &mut [f32], y: &mut [f32]) {
    assert!(
        x.len() == z.len() && x.len() == y.len(),
        "rows::softmax: lengths"
    );
    crate::softmax::fwd_row::<f32>(x, None, scale, z, y)
}

/// `y = silu(g) * u` (as [`crate::swiglu`]).
pub fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    assert!(
        g.len() == u.len() && g.len() == y.len(),
        "rows::swiglu: lengths"
    );
    crate::swiglu::fwd_row::<f32>(g, u, y)
}

/// Rotates one head row `x` (`2 * cos.len()` long) by halves (as [`crate::rope`]):
/// `y[i] = x[i] cos[i] - x[i + h] sin[i]`, `y[i + h] = x[i + h] cos[i] + x[i] sin[i]`.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    assert!(
        x.len() == 2 * cos.len() && cos.len() == sin.len() && y.len() == x.len(),
        "rows::rope: lengths"
    );
    crate::rope::rotate_row::<f32>(x, cos, sin, false, false, y)
}
