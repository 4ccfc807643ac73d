//! Tests on tiny random models built here (no fixtures needed): a central finite-difference
//! gradient check in f64, adapter switching, merging, dropout, initialisation, freeze/full,
//! and the exact error messages of the PEFT reader.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use llmtune_adapters::value_head::{gather_last, last_token_index};
use llmtune_adapters::{
    freeze, full, load_params, pairwise_ranking_loss, peft, save_params, Lora, LoraConfig,
    ModuleGroup, ValueHead, DEFAULT_ADAPTER,
};
use llmtune_models::Llama;

/// Gives every LoRA variable random values (a fresh adapter has B = 0, which would zero the
/// gradients of A).
fn randomize(lora: &Lora, seed: u64, std: f64) {
    let mut r = Rand::new(seed);
    for (_, v) in lora.trainable() {
        let t = r.tensor(v.dims(), std, v.dtype());
        v.set(&t).unwrap();
    }
}

fn logits_of(model: &Llama) -> Vec<f64> {
    let (ids, mask, _) = tiny_batch();
    let pos = arange_positions(&ids);
    let (logits, _) = model.forward(&ids, Some(&mask), Some(&pos), None).unwrap();
    let valid = valid_mask(&mask, model.cfg.vocab_size);
    flat_f64(&logits)
        .into_iter()
        .zip(valid)
        .filter(|(_, v)| *v)
        .map(|(x, _)| x)
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// SFT cross-entropy plus a reward-model ranking loss on the value head (and a small square of
/// the rewards), so one scalar exercises LoRA through the logits and the hidden states.
fn objective(model: &Llama, head: &ValueHead) -> Tensor {
    let (ids, mask, labels) = tiny_batch();
    let pos = arange_positions(&ids);
    let (logits, hidden) = model.forward(&ids, Some(&mask), Some(&pos), None).unwrap();
    let ce = causal_lm_loss(&logits, &labels);
    let values = head.forward(&hidden).unwrap();
    let last = last_token_index(&mask).unwrap();
    let r = gather_last(&values, &last).unwrap();
    let rank =
        pairwise_ranking_loss(&r.narrow(0, 0, 1).unwrap(), &r.narrow(0, 1, 1).unwrap()).unwrap();
    // The ranking loss does not see the bias (it cancels); a squared term does.
    let sq = (r.sqr().unwrap().mean_all().unwrap() * 0.1).unwrap();
    ((ce + rank).unwrap() + sq).unwrap()
}

fn gradient_check(qwen2: bool) {
    let mut model = tiny_llama(DType::F64, qwen2, 11);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(2, 4.0, 0.0, "all").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 5)
        .unwrap();
    randomize(&lora, 9, 0.3);
    let head = ValueHead::new(model.cfg.hidden_size, DType::F64, &Device::Cpu, 4).unwrap();
    let mut vars = lora.trainable();
    assert_eq!(vars.len(), 2 * 7 * 2, "A and B on 7 linears x 2 layers");
    vars.extend(head.trainable());
    for (_, v) in &vars {
        assert_eq!(v.dtype(), DType::F64);
    }
    let loss = objective(&model, &head);
    let grads = loss.backward().unwrap();
    for (name, t) in model.params_mut() {
        assert!(
            grads.get(t).is_none(),
            "base parameter {name} got a gradient"
        );
    }
    let f = |model: &Llama| scalar(&objective(model, &head));
    let h = 1e-5;
    let mut checked = 0;
    // A few elements of several tensors: A and B of attention and MLP layers, the value head.
    for (k, v) in vars.iter().filter(|(k, _)| {
        k.contains("layers.0.self_attn.q_proj")
            || k.contains("layers.1.self_attn.v_proj")
            || k.contains("layers.1.mlp.down_proj")
            || k.contains("layers.0.self_attn.o_proj")
            || k.starts_with("summary.")
    }) {
        let g = flat_f64(
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no grad")),
        );
        let base = flat_f64(v.as_tensor());
        let n = base.len();
        for &i in &[0, n / 3, n - 1] {
            let mut plus = base.clone();
            plus[i] += h;
            v.set(&Tensor::from_vec(plus, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let fp = f(&model);
            let mut minus = base.clone();
            minus[i] -= h;
            v.set(&Tensor::from_vec(minus, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let fm = f(&model);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-8 + 1e-5 * g[i].abs(),
                "{k}[{i}]: analytic {} vs finite difference {fd}",
                g[i]
            );
            assert!(g[i].abs() > 1e-9, "{k}[{i}]: zero gradient checks nothing");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * (4 * 2 + 2));
}

#[test]
fn finite_difference_gradients_llama_f64() {
    gradient_check(false);
}

#[test]
fn finite_difference_gradients_qwen2_f64() {
    gradient_check(true);
}

#[test]
fn fresh_adapter_is_kaiming_uniform_and_b_zero() {
    let mut model = tiny_llama(DType::F32, false, 1);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(8, 16.0, 0.0, "q_proj,v_proj").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 7)
        .unwrap();
    assert_eq!(
        lora.modules(DEFAULT_ADAPTER).unwrap(),
        vec![
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    );
    let mut all_a = Vec::new();
    for (k, t) in lora.weights(DEFAULT_ADAPTER).unwrap() {
        assert_eq!(t.dtype(), DType::F32);
        let v = flat_f64(&t);
        if k.ends_with("lora_B.weight") {
            assert!(v.iter().all(|&x| x == 0.0), "{k} is not zero");
        } else {
            assert_eq!(t.dims(), &[8, 16]);
            let bound = 1.0 / 16f64.sqrt();
            assert!(v.iter().all(|&x| x.abs() <= bound), "{k} out of bounds");
            all_a.extend(v);
        }
    }
    // Uniform(-b, b) has variance b^2/3 = 1/48.
    let n = all_a.len() as f64;
    let mean = all_a.iter().sum::<f64>() / n;
    let var = all_a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    assert!(
        mean.abs() < 0.02 && (var * 48.0 - 1.0).abs() < 0.2,
        "mean {mean} var {var}"
    );
    // A fresh adapter (B = 0) leaves the output unchanged.
    let base = tiny_llama(DType::F32, false, 1);
    assert_eq!(max_diff(&logits_of(&model), &logits_of(&base)), 0.0);
    // Same seed, same numbers; another seed, others.
    let mut m2 = tiny_llama(DType::F32, false, 1);
    let mut l2 = Lora::new();
    l2.add_adapter(&mut m2, DEFAULT_ADAPTER, &cfg, 7).unwrap();
    let mut m3 = tiny_llama(DType::F32, false, 1);
    let mut l3 = Lora::new();
    l3.add_adapter(&mut m3, DEFAULT_ADAPTER, &cfg, 8).unwrap();
    let w = |l: &Lora| flat_f64(&l.weights(DEFAULT_ADAPTER).unwrap()[0].1);
    assert_eq!(w(&lora), w(&l2));
    assert_ne!(w(&lora), w(&l3));
    assert_eq!(
        lora.num_params(DEFAULT_ADAPTER).unwrap(),
        2 * (8 * 16 + 16 * 8) + 2 * (8 * 16 + 8 * 8)
    );
}

#[test]
fn named_adapters_switch_disable_and_merge() {
    let base = tiny_llama(DType::F64, true, 2);
    let mut model = base.clone();
    let mut lora = Lora::new();
    let c1 = LoraConfig::new(2, 4.0, 0.0, "q_proj,v_proj").unwrap();
    let c2 = LoraConfig::new(3, 3.0, 0.0, "all").unwrap();
    lora.add_adapter(&mut model, "policy", &c1, 1).unwrap();
    randomize(&lora, 3, 0.5);
    lora.add_adapter(&mut model, "reward", &c2, 2).unwrap();
    // `trainable()` lists both adapters; give the second random values too.
    randomize(&lora, 4, 0.5);
    assert_eq!(lora.active().as_deref(), Some("policy"));
    let base_out = logits_of(&base);
    let policy_out = logits_of(&model);
    assert!(max_diff(&policy_out, &base_out) > 1e-3);
    {
        let _off = lora.disabled();
        assert_eq!(
            max_diff(&logits_of(&model), &base_out),
            0.0,
            "disabled = base"
        );
    }
    let reward_out = {
        let _g = lora.activated("reward").unwrap();
        logits_of(&model)
    };
    assert!(max_diff(&reward_out, &policy_out) > 1e-3);
    assert_eq!(
        max_diff(&logits_of(&model), &policy_out),
        0.0,
        "guard restored policy"
    );
    // Merging an adapter into a copy of the base gives the same outputs (f64: tight).
    let mut m_policy = base.clone();
    let mut l_policy = Lora::new();
    l_policy
        .insert_adapter(
            &mut m_policy,
            "policy",
            c1.clone(),
            pairs(&lora, "policy"),
            false,
        )
        .unwrap();
    assert!(max_diff(&logits_of(&m_policy), &policy_out) < 1e-12);
    l_policy.merge(&mut m_policy, "policy").unwrap();
    assert!(max_diff(&logits_of(&m_policy), &policy_out) < 1e-10);
    for (name, lin) in m_policy.linears_mut() {
        assert!(lin.adapter.is_none(), "{name} keeps a hook after merge");
    }
    // Merge "reward" on the shared model: "policy" still runs, on top of the merged weights.
    let reward_pairs = pairs(&lora, "reward");
    let policy_pairs = pairs(&lora, "policy");
    lora.merge(&mut model, "reward").unwrap();
    assert_eq!(lora.adapter_names(), vec!["policy"]);
    assert_eq!(lora.active().as_deref(), Some("policy"));
    let mut expect = base.clone();
    let mut le = Lora::new();
    le.insert_adapter(&mut expect, "reward", c2.clone(), reward_pairs, false)
        .unwrap();
    le.merge(&mut expect, "reward").unwrap();
    le.insert_adapter(&mut expect, "policy", c1.clone(), policy_pairs, false)
        .unwrap();
    assert!(max_diff(&logits_of(&model), &logits_of(&expect)) < 1e-10);
    // Merging the active adapter leaves none active.
    lora.merge(&mut model, "policy").unwrap();
    assert_eq!(lora.active(), None);
    assert!(max_diff(&logits_of(&model), &logits_of(&expect)) < 1e-10);
    // Errors.
    assert_eq!(
        lora.set_active("nope").unwrap_err().to_string(),
        "no LoRA adapter named \"nope\" (have: none)"
    );
    lora.add_adapter(&mut model, "policy", &c1, 0).unwrap();
    assert_eq!(
        lora.add_adapter(&mut model, "policy", &c1, 0)
            .unwrap_err()
            .to_string(),
        "a LoRA adapter named \"policy\" already exists"
    );
    assert_eq!(
        lora.set_active("nope").unwrap_err().to_string(),
        "no LoRA adapter named \"nope\" (have: policy)"
    );
    let mut other = Lora::new();
    assert_eq!(
        other
            .add_adapter(&mut model, "x", &c1, 0)
            .unwrap_err()
            .to_string(),
        "model.layers.0.self_attn.q_proj already carries an adapter from another LoRA set"
    );
    let bad = LoraConfig::new(2, 4.0, 0.0, "q_proj,query_key_value").unwrap();
    assert_eq!(
        Lora::new()
            .add_adapter(&mut base.clone(), "x", &bad, 0)
            .unwrap_err()
            .to_string(),
        "--lora_target: query_key_value matches no linear layer of the model (its linear \
         layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"
    );
}

/// `module -> (A, B)` of an adapter, from its saved keys.
fn pairs(lora: &Lora, name: &str) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut out: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (k, t) in lora.weights(name).unwrap() {
        let (m, is_b) = peft::parse_lora_key(&k).unwrap();
        let e = out.entry(m).or_default();
        if is_b {
            e.1 = Some(t.detach());
        } else {
            e.0 = Some(t.detach());
        }
    }
    out.into_iter()
        .map(|(m, (a, b))| (m, (a.unwrap(), b.unwrap())))
        .collect()
}

#[test]
fn dropout_only_in_training_mode_and_seeded() {
    let mut model = tiny_llama(DType::F32, false, 3);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(4, 8.0, 0.5, "all").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 1)
        .unwrap();
    randomize(&lora, 2, 0.5);
    let eval1 = logits_of(&model);
    assert_eq!(
        max_diff(&eval1, &logits_of(&model)),
        0.0,
        "no dropout in eval mode"
    );
    lora.set_training(true);
    lora.set_dropout_seed(5);
    let t1 = logits_of(&model);
    let t2 = logits_of(&model);
    assert!(
        max_diff(&t1, &eval1) > 1e-4,
        "dropout changes the output in training"
    );
    assert!(max_diff(&t1, &t2) > 1e-4, "a new mask each call");
    assert_eq!(
        lora.dropout_state(),
        (5, 2 * 7 * 2),
        "one mask per adapted layer call"
    );
    lora.set_dropout_state(5, 0);
    assert_eq!(
        max_diff(&t1, &logits_of(&model)),
        0.0,
        "same seed, same masks"
    );
    // Gradients still flow with dropout on.
    let (ids, mask, labels) = tiny_batch();
    let (logits, _) = model.forward(&ids, Some(&mask), None, None).unwrap();
    let grads = causal_lm_loss(&logits, &labels).backward().unwrap();
    for (k, v) in lora.trainable() {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "{k}: no gradient with dropout"
        );
    }
    lora.set_training(false);
    assert_eq!(max_diff(&eval1, &logits_of(&model)), 0.0);
}

#[test]
fn bf16_model_trains_f32_adapter() {
    let mut model = tiny_llama(DType::BF16, false, 4);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(2, 4.0, 0.0, "q_proj,v_proj").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 1)
        .unwrap();
    randomize(&lora, 2, 0.5);
    let (ids, mask, labels) = tiny_batch();
    let (logits, _) = model.forward(&ids, Some(&mask), None, None).unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let loss = causal_lm_loss(&logits.to_dtype(DType::F32).unwrap(), &labels);
    let grads = loss.backward().unwrap();
    for (k, v) in lora.trainable() {
        assert_eq!(v.dtype(), DType::F32, "{k}: master copy in f32");
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no grad"));
        assert_eq!(g.dtype(), DType::F32);
        assert!(flat_f64(g).iter().any(|&x| x != 0.0), "{k}: zero gradient");
    }
    // Merging casts the f32 delta into the bf16 weight.
    lora.merge(&mut model, DEFAULT_ADAPTER).unwrap();
    for (_, lin) in model.linears_mut() {
        assert_eq!(lin.weight.dtype(), DType::BF16);
    }
}

#[test]
fn freeze_selects_last_layers_and_trains_only_them() {
    let mut model = tiny_llama(DType::F32, true, 5);
    let vars = freeze(&mut model, 1, ModuleGroup::Qkv).unwrap();
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "model.layers.1.self_attn.k_proj.bias",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.q_proj.bias",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.v_proj.bias",
            "model.layers.1.self_attn.v_proj.weight",
        ]
    );
    let (ids, mask, labels) = tiny_batch();
    let (logits, _) = model.forward(&ids, Some(&mask), None, None).unwrap();
    let grads = causal_lm_loss(&logits, &labels).backward().unwrap();
    for (name, t) in model.params_mut() {
        let trained = names.contains(&name.as_str());
        assert_eq!(
            grads.get(t).is_some(),
            trained,
            "{name}: gradient iff trainable"
        );
    }
    let mut m2 = tiny_llama(DType::F32, false, 5);
    let mlp = freeze(&mut m2, 2, ModuleGroup::Mlp).unwrap();
    assert_eq!(mlp.len(), 6);
    assert!(mlp.iter().all(|(k, _)| k.contains(".mlp.")));
    assert_eq!(
        freeze(&mut m2, 3, ModuleGroup::Mlp)
            .unwrap_err()
            .to_string(),
        "--num_layer_trainable must be between 1 and the model's 2 layers, got 3"
    );
}

#[test]
fn full_trains_everything_and_params_round_trip() {
    let mut model = tiny_llama(DType::F32, true, 6);
    let n_params = model.params_mut().len();
    let vars = full(&mut model).unwrap();
    assert_eq!(vars.len(), n_params);
    let (ids, mask, labels) = tiny_batch();
    let (logits, _) = model.forward(&ids, Some(&mask), None, None).unwrap();
    let grads = causal_lm_loss(&logits, &labels).backward().unwrap();
    for (k, v) in &vars {
        assert!(grads.get(v.as_tensor()).is_some(), "{k}: no gradient");
    }
    // Change the values, save, load into a fresh model: identical parameters and outputs.
    let mut r = Rand::new(1);
    for (_, v) in &vars {
        v.set(&(v.as_tensor() + r.tensor(v.dims(), 0.01, DType::F32)).unwrap())
            .unwrap();
    }
    let dir = scratch("full");
    let path = dir.join(llmtune_adapters::tune::PARAMS_NAME);
    save_params(&path, &vars).unwrap();
    let mut fresh = tiny_llama(DType::F32, true, 6);
    let loaded = load_params(&mut fresh, &dir).unwrap();
    assert_eq!(loaded.len(), n_params);
    let want: BTreeMap<String, Vec<f64>> = model
        .params_mut()
        .into_iter()
        .map(|(k, t)| (k, flat_f64(t)))
        .collect();
    for (k, t) in fresh.params_mut() {
        assert_eq!(flat_f64(t), want[&k], "{k}");
    }
    assert_eq!(max_diff(&logits_of(&fresh), &logits_of(&model)), 0.0);
    // A file naming a tensor the model lacks is refused, naming file and key.
    let bogus = dir.join("bogus.safetensors");
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.nope", t)]),
        &bogus,
    )
    .unwrap();
    assert_eq!(
        load_params(&mut fresh, &bogus).unwrap_err().to_string(),
        format!(
            "{}: tensor model.nope: the model has no parameter of that name",
            bogus.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn load_weights_into_keeps_the_variables() {
    let mut model = tiny_llama(DType::F32, false, 7);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(2, 4.0, 0.1, "all").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 1)
        .unwrap();
    randomize(&lora, 2, 0.5);
    let dir = scratch("best");
    lora.save_peft(DEFAULT_ADAPTER, &dir, "tiny").unwrap();
    let saved = lora.weights(DEFAULT_ADAPTER).unwrap();
    let before: Vec<(String, Var)> = lora.trainable();
    randomize(&lora, 3, 0.5);
    lora.load_weights_into(DEFAULT_ADAPTER, &dir).unwrap();
    let after = lora.trainable();
    for (((k, v0), (_, v1)), (_, t)) in before.iter().zip(&after).zip(&saved) {
        assert_eq!(
            v0.as_tensor().id(),
            v1.as_tensor().id(),
            "{k}: a new variable"
        );
        assert_eq!(flat_f64(v1.as_tensor()), flat_f64(t), "{k}: not restored");
    }
    // The saved config: `all` written as the adapted modules' names, alpha as an integer.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(peft::CONFIG_NAME)).unwrap())
            .unwrap();
    assert_eq!(
        cfg_json["target_modules"],
        serde_json::json!([
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ])
    );
    assert_eq!(cfg_json["lora_alpha"], serde_json::json!(4));
    assert_eq!(cfg_json["lora_dropout"], serde_json::json!(0.1));
    assert_eq!(
        cfg_json["base_model_name_or_path"],
        serde_json::json!("tiny")
    );
    assert_eq!(cfg_json["peft_type"], serde_json::json!("LORA"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes an adapter folder with the given tensors and config text.
fn write_raw(dir: &std::path::Path, tensors: Vec<(String, Tensor)>, config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join(peft::WEIGHTS_NAME)).unwrap();
    std::fs::write(dir.join(peft::CONFIG_NAME), config).unwrap();
}

#[test]
fn peft_reader_errors_name_file_and_key() {
    let dir = scratch("errors");
    let z = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
    let q = "model.layers.0.self_attn.q_proj";
    let cfg4 = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
    let load = |d: &std::path::Path| {
        let mut m = tiny_llama(DType::F32, false, 8);
        Lora::new()
            .load_peft(&mut m, d, DEFAULT_ADAPTER, false)
            .cloned()
            .unwrap_err()
            .to_string()
    };
    let file = |d: &std::path::Path| d.join(peft::WEIGHTS_NAME).display().to_string();

    // `.default.` keys (PEFT's in-memory names) are accepted.
    let ok = dir.join("default-names");
    write_raw(
        &ok,
        vec![
            (
                format!("base_model.model.{q}.lora_A.default.weight"),
                z(2, 16),
            ),
            (
                format!("base_model.model.{q}.lora_B.default.weight"),
                z(16, 2),
            ),
        ],
        cfg4,
    );
    let mut m = tiny_llama(DType::F32, false, 8);
    let mut l = Lora::new();
    l.load_peft(&mut m, &ok, DEFAULT_ADAPTER, false).unwrap();
    assert_eq!(l.modules(DEFAULT_ADAPTER).unwrap(), vec![q]);
    assert_eq!(l.config(DEFAULT_ADAPTER).unwrap().scaling_for(q), 2.0);

    let missing = dir.join("absent");
    assert_eq!(
        load(&missing),
        format!("cannot read {}: no such adapter folder", missing.display())
    );

    let d = dir.join("bad-key");
    write_raw(
        &d,
        vec![
            (format!("base_model.model.{q}.lora_A.weight"), z(2, 16)),
            (format!("base_model.model.{q}.lora_B.weight"), z(16, 2)),
            ("base_model.model.model.norm.weight".into(), z(1, 16)),
        ],
        cfg4,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: tensor base_model.model.model.norm.weight: not a LoRA matrix (expected \
             base_model.model.<module>.lora_A.weight or .lora_B.weight)",
            file(&d)
        )
    );

    let d = dir.join("rank");
    write_raw(
        &d,
        vec![
            (format!("base_model.model.{q}.lora_A.weight"), z(3, 16)),
            (format!("base_model.model.{q}.lora_B.weight"), z(16, 3)),
        ],
        cfg4,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: tensor base_model.model.{q}.lora_A.weight: shape [3, 16] has rank 3, but \
             adapter_config.json says r = 2",
            file(&d)
        )
    );

    let d = dir.join("missing-b");
    write_raw(
        &d,
        vec![(format!("base_model.model.{q}.lora_A.weight"), z(2, 16))],
        cfg4,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: tensor base_model.model.{q}.lora_B.weight: missing (its lora_A is present)",
            file(&d)
        )
    );

    let d = dir.join("no-module");
    let q9 = "model.layers.9.self_attn.q_proj";
    write_raw(
        &d,
        vec![
            (format!("base_model.model.{q9}.lora_A.weight"), z(2, 16)),
            (format!("base_model.model.{q9}.lora_B.weight"), z(16, 2)),
        ],
        cfg4,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: tensor base_model.model.{q9}.lora_A.weight: the model has no linear layer of \
             that name",
            file(&d)
        )
    );

    let d = dir.join("in-features");
    write_raw(
        &d,
        vec![
            (format!("base_model.model.{q}.lora_A.weight"), z(2, 17)),
            (format!("base_model.model.{q}.lora_B.weight"), z(16, 2)),
        ],
        cfg4,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: tensor base_model.model.{q}.lora_A.weight: shape [2, 17] does not fit the \
             layer's 16 inputs",
            file(&d)
        )
    );

    let d = dir.join("dora");
    write_raw(
        &d,
        vec![],
        r#"{"peft_type": "LORA", "r": 2, "use_dora": true}"#,
    );
    assert_eq!(
        load(&d),
        format!(
            "{}: field \"use_dora\": DoRA adapters are not supported",
            d.join(peft::CONFIG_NAME).display()
        )
    );

    let d = dir.join("prefix");
    write_raw(&d, vec![], r#"{"peft_type": "PREFIX_TUNING"}"#);
    assert_eq!(
        load(&d),
        format!(
            "{}: field \"peft_type\": \"PREFIX_TUNING\" is not supported (only LORA adapters)",
            d.join(peft::CONFIG_NAME).display()
        )
    );

    let d = dir.join("no-weights");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(peft::CONFIG_NAME), cfg4).unwrap();
    assert_eq!(
        load(&d),
        format!(
            "{}: no adapter_model.safetensors or adapter_model.bin in this adapter folder",
            d.display()
        )
    );

    let d = dir.join("truncated");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(peft::CONFIG_NAME), cfg4).unwrap();
    std::fs::write(d.join(peft::WEIGHTS_NAME), b"\x10\x00\x00").unwrap();
    assert!(load(&d).starts_with(&format!(
        "{}: not a valid safetensors file (truncated or corrupt?)",
        file(&d)
    )));

    // Value head files.
    let vh = dir.join("vh.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("v_head.summary.weight", z(1, 16))]),
        &vh,
    )
    .unwrap();
    assert_eq!(
        ValueHead::load(&vh, DType::F32, &Device::Cpu, false)
            .unwrap_err()
            .to_string(),
        format!("{}: tensor summary.bias: missing", vh.display())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PyTorch `.bin` files (torch zip pickles, see `tests/data/README.md`): the reference's
/// `value_head.bin` with TRL names, and a PEFT folder with `adapter_model.bin` and in-memory
/// `.default.` key names.
#[test]
fn pytorch_bin_files_are_read() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let head =
        ValueHead::load(&data.join("value_head.bin"), DType::F32, &Device::Cpu, true).unwrap();
    assert_eq!(flat_f32(head.weight()), vec![0.5, -0.25, 1.0, 2.0]);
    assert_eq!(flat_f32(head.bias()), vec![0.125]);
    // A folder with only the `.bin` is found too.
    let dir = scratch("vh-bin");
    std::fs::copy(data.join("value_head.bin"), dir.join("value_head.bin")).unwrap();
    let h2 = ValueHead::load(&dir, DType::F32, &Device::Cpu, false).unwrap();
    assert_eq!(flat_f32(h2.weight()), vec![0.5, -0.25, 1.0, 2.0]);
    assert!(h2.trainable().is_empty());
    assert_eq!(head.trainable().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
    // values = hidden . w + b
    let hidden = Tensor::new(&[[[1f32, 2., 3., 4.]]], &Device::Cpu).unwrap();
    assert_eq!(
        flat_f32(&head.forward(&hidden).unwrap()),
        vec![0.5 - 0.5 + 3.0 + 8.0 + 0.125]
    );

    let ad = peft::read_adapter(&data.join("peft_bin")).unwrap();
    assert_eq!(
        ad.weights_file,
        data.join("peft_bin").join(peft::WEIGHTS_NAME_BIN)
    );
    let q = "model.layers.0.self_attn.q_proj";
    assert_eq!(ad.weights.keys().collect::<Vec<_>>(), vec![q]);
    let (a, b) = &ad.weights[q];
    assert_eq!(a.dims(), &[2, 16]);
    assert_eq!(b.dims(), &[16, 2]);
    let want_a: Vec<f32> = (0..32).map(|i| i as f32 * 0.01).collect();
    let want_b: Vec<f32> = (0..32).map(|i| i as f32 * -0.02).collect();
    assert_eq!(flat_f32(a), want_a);
    assert_eq!(flat_f32(b), want_b);
    // On a model: the saved keys drop `.default`, as PEFT saves them.
    let mut m = tiny_llama(DType::F32, false, 9);
    let mut l = Lora::new();
    l.load_peft(&mut m, &data.join("peft_bin"), DEFAULT_ADAPTER, false)
        .unwrap();
    assert_eq!(
        l.weights(DEFAULT_ADAPTER)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        vec![peft::lora_key(q, false), peft::lora_key(q, true)]
    );
}
