//! Shared helpers: fixtures (`LLMTUNE_FIXTURES`), tensor comparison, tiny random models.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmtune_models::{config::LlamaConfig, loader, Llama};

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

pub fn cases(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu)
        .expect("cases.safetensors")
}

/// The fixture model `<fixtures>/<arch>` in f32 on `LLMTUNE_TEST_DEVICE` (default cpu) with
/// its cases (on the CPU), or `None` when skipped.
pub fn load_arch(arch: &str) -> Option<(Llama, HashMap<String, Tensor>, PathBuf)> {
    let dir = fixtures()?.join(arch);
    let model = load_model(&dir);
    Some((model, cases(&dir), dir))
}

pub fn load_model(dir: &Path) -> Llama {
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let src = loader::open_dir(dir).unwrap();
    Llama::load(&cfg, src.as_ref(), DType::F32, &test_device()).unwrap()
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
        if valid.is_some_and(|v| !v[i]) {
            continue;
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

/// The fixtures' gradient tolerance: elementwise `|a-b| <= 1e-6 + 1e-3|b|`, or else a relative
/// L2 error `||a-b|| / ||b|| <= 1e-4` for the tensor. Returns the relative L2 error. (A zero
/// reference, e.g. the value-head bias under a pairwise loss where it cancels, is checked
/// elementwise.)
pub fn assert_grad_close(name: &str, a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "{name}: length {} vs {}",
        a.len(),
        b.len()
    );
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let rel = (num / den.max(1e-300)).sqrt();
    let elementwise = a
        .iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= 1e-6 + 1e-3 * y.abs());
    assert!(
        elementwise || rel <= 1e-4,
        "{name}: gradient differs (relative L2 error {rel:.3e}; ours {:?}... vs {:?}...)",
        &a[..a.len().min(4)],
        &b[..b.len().min(4)]
    );
    rel
}

pub fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    flat_f64(t)[0]
}

/// Per-element validity for a `[b, t, inner]` tensor from an attention mask `[b, t]`.
pub fn valid_mask(mask: &Tensor, inner: usize) -> Vec<bool> {
    let m: Vec<i64> = mask
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap();
    m.iter()
        .flat_map(|&x| std::iter::repeat_n(x == 1, inner))
        .collect()
}

/// Position ids `0..t-1` for every row (the fixtures' convention for right padding).
pub fn arange_positions(ids: &Tensor) -> Vec<Vec<i64>> {
    let (b, t) = ids.dims2().unwrap();
    vec![(0..t as i64).collect(); b]
}

/// Mean token cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` (-100 ignored).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let l = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let y = labels.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let (sum, count) = llmtune_ops::cross_entropy_sum(&l, &y).unwrap();
    assert!(count > 0, "no label tokens");
    (sum / count as f64).unwrap()
}

/// A fresh scratch folder under the system temp dir (removed first if it exists).
pub fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "llmtune-adapters-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// The tensor names in a safetensors file's header, sorted.
pub fn safetensors_keys(path: &Path) -> Vec<String> {
    let mut k: Vec<String> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    k.sort();
    k
}

// ---------------------------------------------------------------------------------------
// Tiny random models.

/// Deterministic normal-ish numbers (sum of uniforms) from a seed.
pub struct Rand(u64);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn uniform(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately N(0, std^2).
    pub fn normal(&mut self, std: f64) -> f64 {
        let s: f64 = (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0;
        s * std
    }
    pub fn tensor(&mut self, shape: &[usize], std: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal(std)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

/// A tiny random Llama (or Qwen2 with `qkv_bias`): hidden 16, 2 layers, 4 heads / 2 KV heads,
/// FFN 24, vocab 37, untied head.
pub fn tiny_llama(dtype: DType, qwen2: bool, seed: u64) -> Llama {
    let json = format!(
        r#"{{"model_type": "{}", "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false}}"#,
        if qwen2 { "qwen2" } else { "llama" }
    );
    let cfg = LlamaConfig::from_json_str(&json).unwrap();
    let mut r = Rand::new(seed);
    let (h, f, v) = (16usize, 24usize, 37usize);
    let (q, kv) = (16usize, 8usize);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f64, r: &mut Rand| {
        w.insert(name, r.tensor(shape, std, dtype));
    };
    put("model.embed_tokens.weight".into(), &[v, h], 0.5, &mut r);
    put("lm_head.weight".into(), &[v, h], 0.5, &mut r);
    let norm = |r: &mut Rand| {
        let v: Vec<f64> = (0..h).map(|_| 1.0 + r.normal(0.1)).collect();
        Tensor::from_vec(v, h, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let mut norms = vec![("model.norm.weight".to_string(), norm(&mut r))];
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        norms.push((format!("{p}.input_layernorm.weight"), norm(&mut r)));
        norms.push((format!("{p}.post_attention_layernorm.weight"), norm(&mut r)));
        let sd = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[q, h],
            sd(h),
            &mut r,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv, h],
            sd(h),
            &mut r,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv, h],
            sd(h),
            &mut r,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q],
            sd(q),
            &mut r,
        );
        if qwen2 {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.1, &mut r);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.1, &mut r);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.1, &mut r);
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[f, h], sd(h), &mut r);
        put(format!("{p}.mlp.up_proj.weight"), &[f, h], sd(h), &mut r);
        put(format!("{p}.mlp.down_proj.weight"), &[h, f], sd(f), &mut r);
    }
    w.extend(norms);
    let src = loader::MapSource::new(w, "tiny");
    Llama::load(&cfg, &src, dtype, &Device::Cpu).unwrap()
}

/// A right-padded batch for the tiny model: `(ids [2, 7], mask [2, 7], labels [2, 7])`.
pub fn tiny_batch() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[3i64, 17, 5, 9, 30, 2, 11], [8, 1, 36, 4, 0, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &dev).unwrap();
    let labels = Tensor::new(
        &[
            [-100i64, -100, 5, 9, 30, 2, 11],
            [-100, 1, 36, 4, -100, -100, -100],
        ],
        &dev,
    )
    .unwrap();
    (ids, mask, labels)
}
