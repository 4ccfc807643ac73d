//! LoRA and the value head on ChatGLM-6B (`chatglm1`) and ChatGLM2/3-6B (`chatglm2`), against
//! PEFT 0.5.0 / TRL on the original THUDM code (fixture README_chatglm §3 `lora.*`,
//! `value.*`): the PEFT adapter (target `query_key_value`) loads from safetensors and `.bin`,
//! LoRA logits (max-abs 1e-4), loss and base loss (1e-5·max(1, |loss|)), LoRA gradients
//! (max-abs <= 1e-5 + 1e-3·max-abs(reference) per tensor), and the value head on the hidden
//! state TRL reads.
//!
//! Run with `LLMTUNE_FIXTURES=/work/shared/fixtures cargo test -p llmtune-adapters --test
//! chatglm_lora` (and with `fixtures-alt`); without the variable every test prints `skipped`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use common::*;
use llmtune_adapters::{Backbone, Lora, ValueHead, DEFAULT_ADAPTER};
use llmtune_models::chatglm::HiddenStates;
use llmtune_models::loader::{SafetensorsSource, WeightSource};
use llmtune_models::{ChatGlm, ChatGlm2, ChatGlm2Config, ChatGlmConfig};

const TOL: f32 = 1e-4;

/// The two fixture models behind one interface: a forward on the fixture's `batch`.
enum Model {
    V1(ChatGlm),
    V2(ChatGlm2),
}

impl Model {
    fn load(dir: &Path) -> Self {
        Self::load_as(dir, DType::F32)
    }

    fn load_as(dir: &Path, dtype: DType) -> Self {
        let src = SafetensorsSource::open_file(&dir.join("model.safetensors")).unwrap();
        let src: &dyn WeightSource = &src;
        if dir.ends_with("chatglm1") {
            let cfg = ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
            Model::V1(ChatGlm::load(&cfg, src, dtype, &test_device()).unwrap())
        } else {
            let cfg = ChatGlm2Config::from_file(&dir.join("config.json")).unwrap();
            Model::V2(ChatGlm2::load(&cfg, src, dtype, &test_device()).unwrap())
        }
    }

    fn backbone(&mut self) -> &mut dyn Backbone {
        match self {
            Model::V1(m) => m,
            Model::V2(m) => m,
        }
    }

    /// Hidden states and logits of the fixture's left-padded `batch` with the training
    /// inputs (v1: the collator's mask and positions from the padding; v2: the padding mask
    /// and the collator's positions).
    fn batch(&self, c: &HashMap<String, Tensor>) -> (HiddenStates, Tensor) {
        let dev = test_device();
        let ids = c["batch.input_ids"].to_device(&dev).unwrap();
        match self {
            Model::V1(m) => {
                let valid = c["batch.valid_mask"].to_device(&dev).unwrap();
                let h = m.forward_hidden_states(&ids, Some(&valid), None).unwrap();
                let logits = m.logits(&h.last).unwrap();
                (h, logits)
            }
            Model::V2(m) => {
                let mask = c["batch.attention_mask"].to_device(&dev).unwrap();
                let pos: Vec<Vec<i64>> = c["batch.position_ids"]
                    .to_dtype(DType::I64)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                let h = m
                    .forward_hidden_states(&ids, Some(&mask), Some(&pos), None)
                    .unwrap();
                let logits = m.logits(&h.last).unwrap();
                (h, logits)
            }
        }
    }

    fn vocab(&self) -> usize {
        match self {
            Model::V1(m) => m.cfg.vocab_size,
            Model::V2(m) => m.cfg.padded_vocab_size,
        }
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, x| a.max(x.abs()))
}

fn check_logits(name: &str, ours: &Tensor, reference: &Tensor, valid: &[bool]) -> f32 {
    let d = assert_close(
        name,
        &flat_f32(ours),
        &flat_f32(reference),
        Some(valid),
        TOL,
        0.0,
    );
    eprintln!("{name}: max |diff| {d:.3e}");
    d
}

fn check_loss(name: &str, ours: f64, reference: &Tensor) {
    let r = scalar(reference);
    let d = (ours - r).abs();
    assert!(
        d <= 1e-5 * r.abs().max(1.0),
        "{name}: {ours} vs reference {r} (|diff| {d})"
    );
    eprintln!("{name}: {ours:.7} vs {r:.7} (|diff| {d:.3e})");
}

fn lora_parity(arch: &str) {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join(arch);
    let c = cases(&dir);
    let mut model = Model::load(&dir);
    let valid = valid_mask(&c["batch.valid_mask"], model.vocab());
    let labels = &c["batch.labels"];

    let mut lora = Lora::new();
    let cfg = lora
        .load_peft(model.backbone(), &dir.join("lora"), DEFAULT_ADAPTER, true)
        .unwrap()
        .clone();
    assert_eq!(cfg.r, 4);
    let vars = lora.trainable();
    assert_eq!(vars.len(), 2 * model.backbone().num_layers());
    let (_, logits) = model.batch(&c);
    check_logits(
        &format!("{arch} lora.logits"),
        &logits,
        &c["lora.logits"],
        &valid,
    );
    let loss = causal_lm_loss(&logits, labels);
    check_loss(&format!("{arch} lora.loss"), scalar(&loss), &c["lora.loss"]);

    let grads = loss.backward().unwrap();
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: {k} has no gradient"));
        let reference = &c[&format!("lora.grad.{k}")];
        assert_eq!(g.dims(), reference.dims(), "{k}");
        let (ours, r) = (flat_f32(g), flat_f32(reference));
        let tol = 1e-5 + 1e-3 * max_abs(&r);
        let d = ours
            .iter()
            .zip(&r)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(d <= tol, "{arch} grad {k}: max |diff| {d} > {tol}");
        eprintln!("{arch} grad {k}: max |diff| {d:.3e} (tolerance {tol:.3e})");
    }
    for (name, t) in model.backbone().params_mut() {
        assert!(
            grads.get(t).is_none(),
            "{arch}: base parameter {name} got a gradient"
        );
    }

    // Disabled = the base model.
    {
        let _off = lora.disabled();
        let (_, base) = model.batch(&c);
        check_loss(
            &format!("{arch} lora.base_loss"),
            scalar(&causal_lm_loss(&base, labels)),
            &c["lora.base_loss"],
        );
        check_logits(
            &format!("{arch} disabled = batch.logits"),
            &base,
            &c["batch.logits"],
            &valid,
        );
    }

    // PEFT's older adapter_model.bin gives the same adapter.
    let bin_dir = scratch(&format!("{arch}-lora-bin"));
    for f in ["adapter_config.json", "adapter_model.bin"] {
        std::fs::copy(dir.join("lora").join(f), bin_dir.join(f)).unwrap();
    }
    let mut model2 = Model::load(&dir);
    let mut lora2 = Lora::new();
    lora2
        .load_peft(model2.backbone(), &bin_dir, DEFAULT_ADAPTER, false)
        .unwrap();
    let (_, logits2) = model2.batch(&c);
    check_logits(
        &format!("{arch} lora from .bin"),
        &logits2,
        &c["lora.logits"],
        &valid,
    );
    std::fs::remove_dir_all(&bin_dir).ok();
}

#[test]
fn chatglm1_lora_logits_loss_and_gradients() {
    lora_parity("chatglm1");
}

#[test]
fn chatglm2_lora_logits_loss_and_gradients() {
    lora_parity("chatglm2");
}

fn value_head_parity(arch: &str) {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join(arch);
    let c = cases(&dir);
    let model = Model::load(&dir);
    let head = ValueHead::load(
        &dir.join("value_head.safetensors"),
        DType::F32,
        &test_device(),
        false,
    )
    .unwrap();
    let (h, _) = model.batch(&c);
    let valid = valid_mask(&c["batch.valid_mask"], 1);
    // TRL reads hidden_states[-1] (for ChatGLM2/3: before the final RMSNorm).
    let values = head.forward(h.all.last().unwrap()).unwrap();
    check_logits(
        &format!("{arch} value.values"),
        &values,
        &c["value.values"],
        &valid,
    );
    let t = values.dim(1).unwrap();
    let last = values.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
    let d = assert_close(
        &format!("{arch} value.value_last"),
        &flat_f32(&last),
        &flat_f32(&c["value.value_last"]),
        None,
        TOL,
        0.0,
    );
    eprintln!("{arch} value.value_last: max |diff| {d:.3e}");
    let post = head.forward(&h.last).unwrap();
    check_logits(
        &format!("{arch} value.values_post_final_norm"),
        &post,
        &c["value.values_post_final_norm"],
        &valid,
    );
}

#[test]
fn chatglm1_value_head_matches_trl() {
    value_head_parity("chatglm1");
}

#[test]
fn chatglm2_value_head_matches_trl() {
    value_head_parity("chatglm2");
}

/// `--finetuning_type full`: every parameter becomes a variable and gets a gradient (the
/// LayerNorm, RMSNorm, rotary and attention paths all have a backward); `freeze` on `qkv`
/// selects the fused `query_key_value` of the last layers.
fn full_and_freeze_gradients(arch: &str) {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join(arch);
    let c = cases(&dir);
    let mut model = Model::load(&dir);
    let n_params = model.backbone().params_mut().len();
    let vars = llmtune_adapters::full(model.backbone()).unwrap();
    assert_eq!(vars.len(), n_params);
    let (_, logits) = model.batch(&c);
    let loss = causal_lm_loss(&logits, &c["batch.labels"]);
    check_loss(
        &format!("{arch} full: batch.loss"),
        scalar(&loss),
        &c["batch.loss"],
    );
    let grads = loss.backward().unwrap();
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: {k} has no gradient"));
        let norm = flat_f32(g).iter().map(|x| x * x).sum::<f32>();
        // Rotary buffers are not parameters; every parameter influences the loss.
        assert!(norm > 0.0, "{arch}: {k} has an all-zero gradient");
    }
    eprintln!("{arch}: all {} parameters have gradients", vars.len());

    let mut model = Model::load(&dir);
    let frozen =
        llmtune_adapters::freeze(model.backbone(), 1, llmtune_adapters::ModuleGroup::Qkv).unwrap();
    let names: Vec<&str> = frozen.iter().map(|(k, _)| k.as_str()).collect();
    let last = model.backbone().num_layers() - 1;
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|k| k.contains(&format!("layers.{last}.")) && k.contains(".query_key_value.")),
        "{names:?}"
    );
}

#[test]
fn chatglm1_full_and_freeze_gradients() {
    full_and_freeze_gradients("chatglm1");
}

#[test]
fn chatglm2_full_and_freeze_gradients() {
    full_and_freeze_gradients("chatglm2");
}

/// Analytic gradients of the full model equal central finite differences in f64 for a few
/// entries of every parameter of the first block and the final norm (the composite
/// LayerNorm and the 2-D rotary included).
fn finite_differences(arch: &str) {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join(arch);
    let c = cases(&dir);
    let mut model = Model::load_as(&dir, DType::F64);
    let vars = llmtune_adapters::full(model.backbone()).unwrap();
    let labels = &c["batch.labels"];
    let loss_of = |m: &Model| scalar(&causal_lm_loss(&m.batch(&c).1, labels));
    let loss = causal_lm_loss(&model.batch(&c).1, labels);
    let grads = loss.backward().unwrap();
    let eps = 1e-5;
    let mut checked = 0;
    for (k, v) in &vars {
        if !(k.contains("layers.0.") || k.contains("final_layernorm")) {
            continue;
        }
        let g = flat_f64(grads.get(v.as_tensor()).unwrap());
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let mut plus = base.clone();
            plus[i] += eps;
            v.set(
                &Tensor::new(plus, v.device())
                    .unwrap()
                    .reshape(v.dims())
                    .unwrap(),
            )
            .unwrap();
            let lp = loss_of(&model);
            let mut minus = base.clone();
            minus[i] -= eps;
            v.set(
                &Tensor::new(minus, v.device())
                    .unwrap()
                    .reshape(v.dims())
                    .unwrap(),
            )
            .unwrap();
            let lm = loss_of(&model);
            v.set(
                &Tensor::new(base.clone(), v.device())
                    .unwrap()
                    .reshape(v.dims())
                    .unwrap(),
            )
            .unwrap();
            let num = (lp - lm) / (2.0 * eps);
            assert!(
                (num - g[i]).abs() <= 1e-6 + 1e-4 * num.abs(),
                "{arch} {k}[{i}]: analytic {} vs numeric {num}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 24, "{arch}: only {checked} entries checked");
    eprintln!("{arch}: {checked} gradient entries equal finite differences");
}

#[test]
fn chatglm1_gradients_match_finite_differences() {
    finite_differences("chatglm1");
}

#[test]
fn chatglm2_gradients_match_finite_differences() {
    finite_differences("chatglm2");
}
