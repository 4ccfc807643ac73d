//! AdamW parity with torch on the fixtures' two SFT steps (README §3 (d)).
//!
//! Starts from `<arch>/lora/adapter_model.safetensors`, feeds the stored
//! gradients `sft.step{1,2}.grad.{P}` (lr 1e-3, betas 0.9/0.999, eps 1e-8,
//! weight decay 0) and compares with `sft.step{1,2}.param.{P}`.
//! Run against both fixture sets:
//! `LLMTUNE_FIXTURES=/work/shared/fixtures cargo test -p llmtune-train --test adamw_fixtures`
//! `LLMTUNE_FIXTURES=/work/shared/fixtures-alt cargo test -p llmtune-train --test adamw_fixtures`
//! The parameters and gradients live on `LLMTUNE_TEST_DEVICE` (default cpu; `cuda` needs
//! `--features cuda`); same tolerances on both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use llmtune_train::{AdamW, AdamWConfig, Gradients};

#[path = "../../../test-support/device.rs"]
mod device;
use device::test_device;

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

struct Comparison {
    /// Max |ours - torch| over elements whose gradient (at this step or any
    /// earlier one) is not tiny.
    max_abs: f64,
    /// Elements skipped because every gradient so far was below 1e-6.
    skipped: usize,
    /// ||ours_update - torch_update|| / ||torch_update||.
    rel_l2_update: f64,
}

fn compare(before: &[f32], ours: &[f32], torch: &[f32], max_grad_so_far: &[f32]) -> Comparison {
    let mut max_abs = 0f64;
    let mut skipped = 0;
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..ours.len() {
        let d = (ours[i] as f64 - torch[i] as f64).abs();
        if max_grad_so_far[i] < 1e-6 {
            skipped += 1;
        } else {
            max_abs = max_abs.max(d);
        }
        let upd_ours = ours[i] as f64 - before[i] as f64;
        let upd_torch = torch[i] as f64 - before[i] as f64;
        num += (upd_ours - upd_torch).powi(2);
        den += upd_torch.powi(2);
    }
    Comparison {
        max_abs,
        skipped,
        rel_l2_update: (num / den.max(1e-300)).sqrt(),
    }
}

fn run_arch(root: &Path, arch: &str) {
    let dir = root.join(arch);
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    let names: Vec<String> = cases["sft"]["param_names"]
        .as_array()
        .expect("sft.param_names")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!names.is_empty());
    let adapter =
        candle_core::safetensors::load(dir.join("lora/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            let t = adapter[n].to_device(&test_device()).unwrap();
            (n.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let config = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(vars.clone(), config).unwrap();
    let mut max_grad: HashMap<String, Vec<f32>> = names
        .iter()
        .map(|n| (n.clone(), vec![0f32; adapter[n].elem_count()]))
        .collect();
    for step in 1..=2 {
        let mut grads = Gradients::new();
        for n in &names {
            let g = &tensors[&format!("sft.step{step}.grad.{n}")];
            for (m, x) in max_grad.get_mut(n).unwrap().iter_mut().zip(f32s(g)) {
                *m = m.max(x.abs());
            }
            grads.insert(n.clone(), g.to_device(&test_device()).unwrap());
        }
        let before: Vec<Vec<f32>> = vars.iter().map(|(_, v)| f32s(v.as_tensor())).collect();
        opt.step(&grads).unwrap();
        for ((n, v), before) in vars.iter().zip(&before) {
            let torch = f32s(&tensors[&format!("sft.step{step}.param.{n}")]);
            let c = compare(before, &f32s(v.as_tensor()), &torch, &max_grad[n]);
            eprintln!(
                "{arch} step {step} {n}: max_abs {:.3e} (skipped {}), rel_l2_update {:.3e}",
                c.max_abs, c.skipped, c.rel_l2_update
            );
            assert!(
                c.max_abs <= 1e-6,
                "{arch} step {step} {n}: max |diff| {:.3e} > 1e-6",
                c.max_abs
            );
            assert!(
                c.rel_l2_update <= 1e-3,
                "{arch} step {step} {n}: relative L2 error of the update {:.3e} > 1e-3",
                c.rel_l2_update
            );
        }
    }
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn adamw_matches_torch_llama() {
    if let Some(root) = fixtures() {
        run_arch(&root, "llama");
    }
}

#[test]
fn adamw_matches_torch_qwen2() {
    if let Some(root) = fixtures() {
        run_arch(&root, "qwen2");
    }
}
