//! Shared helpers for fixture tests: locating `LLMTUNE_FIXTURES` and comparing tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

#[path = "../../../../test-support/device.rs"]
mod device;
#[allow(unused_imports)] // not every test binary that includes `common` uses each one
pub use device::{device_name, on_cpu, test_device};

/// The fixtures dir, or `None` (after printing why the test is skipped).
pub fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

pub fn cases(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu)
        .expect("cases.safetensors")
}

/// `|a - b| <= atol + rtol * |b|` elementwise where `valid` (if given) is true.
/// Returns the max abs difference.
pub fn assert_close(
    name: &str,
    a: &[f32],
    b: &[f32],
    valid: Option<&[bool]>,
    atol: f32,
    rtol: f32,
) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "{name}: length {} vs {}",
        a.len(),
        b.len()
    );
    let mut worst = 0f32;
    let mut checked = 0usize;
    for i in 0..a.len() {
        if let Some(v) = valid {
            if !v[i] {
                continue;
            }
        }
        checked += 1;
        let d = (a[i] - b[i]).abs();
        worst = worst.max(d);
        assert!(
            d <= atol + rtol * b[i].abs(),
            "{name}[{i}]: ours {} vs reference {} (|diff| {d})",
            a[i],
            b[i]
        );
    }
    assert!(checked > 0, "{name}: nothing compared");
    worst
}

pub fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn ids_vec(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Per-element validity for a `[b, t, inner]` tensor from an attention mask `[b, t]`.
pub fn valid_mask(mask: &Tensor, inner: usize) -> Vec<bool> {
    let m: Vec<i64> = mask
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap();
    m.iter()
        .flat_map(|&x| std::iter::repeat_n(x == 1, inner))
        .collect()
}
