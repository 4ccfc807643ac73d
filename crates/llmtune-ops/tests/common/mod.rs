//! Shared helpers of the op tests: deterministic random tensors, comparison against the
//! composite reference (forward and gradients), and central finite-difference checks in f64.
#![allow(dead_code)]

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

#[path = "../../../../test-support/device.rs"]
mod device;
#[allow(unused_imports)] // not every test binary that includes `common` uses each one
pub use device::{device_name, on_cpu, test_device};

/// A deterministic pseudo-random vector in `[-scale, scale)` (xorshift; no dependency).
pub fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

/// A deterministic random f64 tensor of `shape`.
pub fn rand_t(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rand_vec(n, seed, scale), shape, &test_device()).expect("tensor")
}

/// `max |a - b| / max |b|` (the relative error used by every comparison).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f64> = flat(a);
    let b: Vec<f64> = flat(b);
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| {
        if x.is_nan() || y.is_nan() {
            f64::NAN
        } else {
            m.max((x - y).abs())
        }
    });
    diff / scale
}

/// All elements as f64.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("flatten")
}

/// An op under test: maps its inputs (leaves, possibly variables) to one output tensor.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Builds the leaves: variables where `tracked[i]`, plain tensors elsewhere, in `dtype`.
pub fn leaves(
    inputs: &[Tensor],
    tracked: &[bool],
    dtype: DType,
) -> Result<(Vec<Tensor>, Vec<Option<Var>>)> {
    let mut ts = Vec::new();
    let mut vars = Vec::new();
    for (t, &tr) in inputs.iter().zip(tracked) {
        let t = t.to_dtype(dtype)?;
        if tr {
            let v = Var::from_tensor(&t)?;
            ts.push(v.as_tensor().clone());
            vars.push(Some(v));
        } else {
            ts.push(t);
            vars.push(None);
        }
    }
    Ok((ts, vars))
}

/// `sum(y * r)` for a fixed random `r`, so that every output element has its own weight.
pub fn weighted_sum(y: &Tensor, seed: u64) -> Result<Tensor> {
    let r = rand_t(y.dims(), seed, 1.0).to_dtype(y.dtype())?;
    (y * r)?.sum_all()
}

/// Runs `f` and its backward; returns the output and the gradient store.
pub fn run(f: OpFn, ts: &[Tensor]) -> Result<(Tensor, GradStore)> {
    let y = f(ts)?;
    let loss = weighted_sum(&y, 99)?;
    let grads = loss.backward()?;
    Ok((y, grads))
}

/// Compares `fast` with `reference` in f32: forward and the gradient of every tracked input,
/// each within `tol` relative. Returns the largest relative error seen.
pub fn compare(
    name: &str,
    inputs: &[Tensor],
    tracked: &[bool],
    fast: OpFn,
    reference: OpFn,
    tol: f64,
) -> Result<f64> {
    let (ts, vars) = leaves(inputs, tracked, DType::F32)?;
    let (yf, gf) = run(fast, &ts)?;
    let (yr, gr) = run(reference, &ts)?;
    let mut worst = rel_diff(&yf, &yr);
    assert!(
        worst <= tol,
        "{name}: forward differs from reference by {worst:e} (tol {tol:e})"
    );
    for (i, v) in vars.iter().enumerate() {
        if let Some(v) = v {
            let a = gf
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no fast gradient for input {i}"));
            let b = gr
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no reference gradient for input {i}"));
            let d = rel_diff(a, b);
            assert!(
                d <= tol,
                "{name}: gradient of input {i} differs by {d:e} (tol {tol:e})"
            );
            worst = worst.max(d);
        }
    }
    Ok(worst)
}

/// Central finite-difference check in f64 of the gradient of `sum(f(inputs) * r)` with
/// respect to every tracked input. Returns the largest error seen, relative to
/// `max(1, max |numeric gradient|)`.
pub fn grad_check(
    name: &str,
    inputs: &[Tensor],
    tracked: &[bool],
    f: OpFn,
    tol: f64,
) -> Result<f64> {
    let (ts, vars) = leaves(inputs, tracked, DType::F64)?;
    let (_, grads) = run(f, &ts)?;
    let h = 1e-5;
    let mut worst = 0f64;
    for (i, v) in vars.iter().enumerate() {
        let Some(v) = v else { continue };
        let analytic = flat(
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for input {i}")),
        );
        let base = flat(&inputs[i].to_dtype(DType::F64)?);
        let mut numeric = Vec::with_capacity(base.len());
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let mut args: Vec<Tensor> = ts.iter().map(|t| t.detach()).collect();
                args[i] = Tensor::from_vec(p, inputs[i].dims(), &test_device())?;
                weighted_sum(&f(&args)?, 99)?.to_scalar::<f64>()
            };
            numeric.push((eval(h)? - eval(-h)?) / (2.0 * h));
        }
        let scale = numeric.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (j, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            let e = (a - n).abs() / scale;
            assert!(
                e <= tol,
                "{name}: input {i} element {j}: analytic {a} vs numeric {n} (err {e:e})"
            );
            worst = worst.max(e);
        }
    }
    Ok(worst)
}
