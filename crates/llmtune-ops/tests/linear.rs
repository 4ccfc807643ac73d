//! `linear` against the reference and finite differences, and the frozen-weight contract: a
//! frozen weight gets no gradient, a tracked one does.

mod common;

use candle_core::{DType, Result, Tensor, Var, D};
use common::{compare, grad_check, rand_t, test_device, weighted_sum};
use llmtune_ops as ops;
use llmtune_ops::reference;

const TOL_REF: f64 = 1e-5;
const TOL_FD: f64 = 1e-7;

type View = fn(&Tensor) -> Result<Tensor>;

fn x_cases() -> Vec<(&'static str, Tensor, View)> {
    vec![
        ("3-d", rand_t(&[2, 5, 7], 1, 1.0), |x| Ok(x.clone())),
        ("2-d", rand_t(&[6, 7], 2, 1.0), |x| Ok(x.clone())),
        ("2-d transposed", rand_t(&[7, 6], 3, 1.0), |x| x.t()),
        ("3-d transposed", rand_t(&[5, 2, 7], 4, 1.0), |x| {
            x.transpose(0, 1)
        }),
        ("narrowed", rand_t(&[2, 5, 9], 5, 1.0), |x| {
            x.narrow(D::Minus1, 1, 7)
        }),
        ("1-d", rand_t(&[7], 6, 1.0), |x| Ok(x.clone())),
    ]
}

#[test]
fn linear_matches_reference_and_finite_differences() -> Result<()> {
    let w = rand_t(&[4, 7], 10, 0.5);
    let b = rand_t(&[4], 11, 0.5);
    for (name, x, view) in x_cases() {
        let inputs = vec![x, w.clone(), b.clone()];
        let fast = |t: &[Tensor]| ops::linear(&view(&t[0])?, &t[1], Some(&t[2]));
        let refr = |t: &[Tensor]| reference::linear(&view(&t[0])?, &t[1], Some(&t[2]));
        let fast_nb = |t: &[Tensor]| ops::linear(&view(&t[0])?, &t[1], None);
        let refr_nb = |t: &[Tensor]| reference::linear(&view(&t[0])?, &t[1], None);
        // (x, w, b) tracked: frozen weight and bias; full fine-tuning; LoRA-like (x frozen)
        // (the reference's broadcast_matmul rejects a 1-d input; ours treats it as one row)
        let tracked_sets: &[[bool; 3]] = if name == "1-d" {
            &[]
        } else {
            &[
                [true, false, false],
                [true, true, true],
                [false, true, false],
                [true, false, true],
            ]
        };
        for tracked in tracked_sets {
            let n = format!("linear {name} {tracked:?}");
            compare(&n, &inputs, tracked, &fast, &refr, TOL_REF)?;
            compare(
                &format!("{n} no bias"),
                &inputs[..2],
                &tracked[..2],
                &fast_nb,
                &refr_nb,
                TOL_REF,
            )?;
        }
        grad_check(
            &format!("linear {name}"),
            &inputs,
            &[true, true, true],
            &fast,
            TOL_FD,
        )?;
        grad_check(
            &format!("linear {name} frozen"),
            &inputs,
            &[true, false, false],
            &fast,
            TOL_FD,
        )?;
    }
    Ok(())
}

#[test]
fn frozen_weight_gets_no_gradient() -> Result<()> {
    let x0 = Var::from_tensor(&rand_t(&[3, 5, 8], 20, 1.0).to_dtype(DType::F32)?)?;
    let w = rand_t(&[6, 8], 21, 0.5).to_dtype(DType::F32)?;
    let b = rand_t(&[6], 22, 0.5).to_dtype(DType::F32)?;
    // x is computed from the variable, as an activation would be
    let x = (x0.as_tensor() * 2.0)?;
    let y = ops::linear(&x, &w, Some(&b))?;
    assert_eq!(y.dims(), &[3, 5, 6]);
    let grads = weighted_sum(&y, 1)?.backward()?;
    let gx = grads
        .get(x0.as_tensor())
        .expect("x's variable has a gradient");
    assert_eq!(gx.dims(), &[3, 5, 8]);
    assert!(
        grads.get(&w).is_none(),
        "a frozen weight must get no gradient"
    );
    assert!(
        grads.get(&b).is_none(),
        "a frozen bias must get no gradient"
    );
    // candle's own matmul computes and stores a gradient for the frozen operand: this is the
    // work and memory the op removes
    let wt = w.t()?;
    let grads_ref = weighted_sum(&x.broadcast_matmul(&wt)?, 1)?.backward()?;
    assert!(grads_ref.get(&wt).is_some());
    Ok(())
}

#[test]
fn tracked_weight_gets_its_gradient() -> Result<()> {
    let x = Var::from_tensor(&rand_t(&[4, 8], 30, 1.0).to_dtype(DType::F32)?)?;
    let w = Var::from_tensor(&rand_t(&[6, 8], 31, 0.5).to_dtype(DType::F32)?)?;
    let b = Var::from_tensor(&rand_t(&[6], 32, 0.5).to_dtype(DType::F32)?)?;
    let y = ops::linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()))?;
    let grads = y.sum_all()?.backward()?;
    // d sum(x w^T + b) / dw[o, i] = sum_r x[r, i]; / db[o] = rows
    let gw = grads
        .get(w.as_tensor())
        .expect("w has a gradient")
        .to_vec2::<f32>()?;
    let col_sums = x.as_tensor().sum(0)?.to_vec1::<f32>()?;
    for row in &gw {
        for (a, b) in row.iter().zip(&col_sums) {
            assert!((a - b).abs() < 1e-5);
        }
    }
    let gb = grads
        .get(b.as_tensor())
        .expect("b has a gradient")
        .to_vec1::<f32>()?;
    assert!(gb.iter().all(|&v| (v - 4.0).abs() < 1e-6));
    assert!(grads.get(x.as_tensor()).is_some());

    // a weight computed from a variable (e.g. a merged LoRA weight) is tracked too
    let base = rand_t(&[6, 8], 33, 0.5).to_dtype(DType::F32)?;
    let merged = (base + w.as_tensor())?;
    let y = ops::linear(x.as_tensor(), &merged, None)?;
    let grads = y.sum_all()?.backward()?;
    assert!(
        grads.get(w.as_tensor()).is_some(),
        "gradient through a derived weight"
    );
    Ok(())
}

#[test]
fn lora_style_graph_gets_exactly_the_adapter_gradients() -> Result<()> {
    // y = x W^T + (x A^T) B^T with W frozen and A, B variables, x frozen input
    let x = rand_t(&[2, 3, 8], 40, 1.0).to_dtype(DType::F32)?;
    let w = rand_t(&[8, 8], 41, 0.5).to_dtype(DType::F32)?;
    let a = Var::from_tensor(&rand_t(&[2, 8], 42, 0.5).to_dtype(DType::F32)?)?;
    let bm = Var::from_tensor(&rand_t(&[8, 2], 43, 0.5).to_dtype(DType::F32)?)?;
    let lora = |f: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>| -> Result<Tensor> {
        let h = f(&x, &w, None)?;
        let d = f(&f(&x, a.as_tensor(), None)?, bm.as_tensor(), None)?;
        h + d
    };
    let y_fast = lora(ops::linear)?;
    let y_ref = lora(reference::linear)?;
    assert!(common::rel_diff(&y_fast, &y_ref) < TOL_REF);
    let gf = weighted_sum(&y_fast, 2)?.backward()?;
    let gr = weighted_sum(&y_ref, 2)?.backward()?;
    for v in [&a, &bm] {
        let d = common::rel_diff(
            gf.get(v.as_tensor()).expect("fast"),
            gr.get(v.as_tensor()).expect("ref"),
        );
        assert!(d < TOL_REF, "adapter gradient differs by {d}");
    }
    assert!(gf.get(&w).is_none() && gf.get(&x).is_none());
    Ok(())
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let x = Tensor::zeros((2, 5), DType::F32, &test_device()).expect("x");
    let w = Tensor::zeros((3, 4), DType::F32, &test_device()).expect("w");
    let err = ops::linear(&x, &w, None).unwrap_err().to_string();
    assert!(
        err.contains("linear: input [2, 5] does not match weight [3, 4]"),
        "{err}"
    );
}

/// bf16 compute with f32 activations: an f32 input against a frozen bf16 weight (and an f32
/// bias) gives the f32 product of the bf16-rounded input and weight, and the input gradient
/// `grad @ w` of the bf16-rounded gradient: through MKL's bf16 GEMM when `LLMTUNE_MKL` is
/// set, through the weight converted to f32 otherwise. Tolerances: bf16 rounding of x (and of
/// the gradient) is up to 2^-9 relative; over 70 terms of size ~0.5 that is < 0.05.
#[test]
fn f32_input_with_bf16_weight() -> Result<()> {
    let f32 = |t: Tensor| t.to_dtype(DType::F32);
    let x = Var::from_tensor(&f32(rand_t(&[3, 11, 70], 20, 1.0))?)?;
    let w = rand_t(&[19, 70], 21, 0.5).to_dtype(DType::BF16)?;
    let b = f32(rand_t(&[19], 22, 0.5))?;
    let y = ops::linear(x.as_tensor(), &w, Some(&b))?;
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(y.dims(), &[3, 11, 19]);
    let wf = w.to_dtype(DType::F32)?;
    let want = reference::linear(
        &x.as_tensor().to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        &wf,
        Some(&b),
    )?;
    let d = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let tol = if llmtune_ops::blas::has_bf16_gemm() {
        1e-4
    } else {
        0.05
    };
    assert!(d < tol, "forward max |diff| {d} (tol {tol})");
    let gw = f32(rand_t(&[3, 11, 19], 23, 1.0))?;
    let g = (y * &gw)?.sum_all()?.backward()?;
    let gx = g.get(x.as_tensor()).expect("input gradient");
    assert_eq!(gx.dtype(), DType::F32);
    let want = gw.matmul(&wf.unsqueeze(0)?.broadcast_as((3, 19, 70))?)?;
    let d = (gx - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 0.05, "input gradient max |diff| {d}");
    assert!(g.get(&w).is_none(), "a bf16 base weight gets no gradient");
    Ok(())
}
