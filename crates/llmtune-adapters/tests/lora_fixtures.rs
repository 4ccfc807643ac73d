//! Parity with Python PEFT/TRL on the fixture models `llama` and `qwen2` (fixture README §3
//! (c) LoRA, (d) SFT, (e) RM): adapter logits, merging, disabling, LoRA gradients, the reward
//! model, PEFT round trips and `checkpoint_dir`. Tolerances from the fixture README.
//!
//! Run with `LLMTUNE_FIXTURES=/work/shared/fixtures cargo test -p llmtune-adapters` (and with
//! `fixtures-alt`); without the variable every test here prints `skipped` and passes.

mod common;

use candle_core::DType;
use common::*;
use llmtune_adapters::value_head::{gather_last, last_token_index};
use llmtune_adapters::{
    apply_checkpoints, pairwise_ranking_loss, peft, Lora, LoraConfig, ValueHead, DEFAULT_ADAPTER,
};

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

fn check_lora_logits_merge_disable(arch: &str) {
    let Some((mut model, c, dir)) = load_arch(arch) else {
        return;
    };
    let ids = &c["forward.input_ids"];
    let mask = &c["forward.attention_mask"];
    let pos = arange_positions(ids);
    let v = model.cfg.vocab_size;
    let valid = valid_mask(mask, v);
    let mut lora = Lora::new();
    let cfg = lora
        .load_peft(&mut model, &dir.join("lora"), DEFAULT_ADAPTER, false)
        .unwrap()
        .clone();
    assert!(cfg.r > 0);
    assert_eq!(lora.active().as_deref(), Some(DEFAULT_ADAPTER));
    assert!(
        lora.trainable().is_empty(),
        "a frozen adapter has no variables"
    );

    let (logits, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let d = assert_close(
        &format!("{arch} lora.logits"),
        &flat_f32(&logits),
        &flat_f32(&c["lora.logits"]),
        Some(&valid),
        ATOL,
        RTOL,
    );
    eprintln!("{arch}: LoRA logits max |diff| {d:.3e}");

    // Disabled adapter = the base model.
    {
        let _off = lora.disabled();
        assert!(!lora.is_enabled());
        let (base, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
        assert_close(
            &format!("{arch} disabled = forward.logits"),
            &flat_f32(&base),
            &flat_f32(&c["forward.logits"]),
            Some(&valid),
            ATOL,
            RTOL,
        );
    }
    assert!(lora.is_enabled(), "the guard restores the switch");
    lora.set_enabled(false);
    let (base2, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    assert_close(
        &format!("{arch} set_enabled(false) = forward.logits"),
        &flat_f32(&base2),
        &flat_f32(&c["forward.logits"]),
        Some(&valid),
        ATOL,
        RTOL,
    );
    lora.set_enabled(true);

    // Merge: weights and logits.
    let modules = lora.modules(DEFAULT_ADAPTER).unwrap();
    lora.merge(&mut model, DEFAULT_ADAPTER).unwrap();
    assert!(lora.adapter_names().is_empty());
    assert_eq!(lora.active(), None);
    let mut merged_checked = 0;
    for (name, lin) in model.linears_mut() {
        assert!(lin.adapter.is_none(), "{name}: hook left after merging");
        let key = format!("lora.merged.{name}.weight");
        if let Some(reference) = c.get(&key) {
            assert!(modules.contains(&name));
            assert_close(
                &format!("{arch} {key}"),
                &flat_f32(&lin.weight),
                &flat_f32(reference),
                None,
                1e-6,
                1e-5,
            );
            merged_checked += 1;
        }
    }
    assert_eq!(
        merged_checked,
        modules.len(),
        "every adapted module has a merged reference"
    );
    let (merged, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let d = assert_close(
        &format!("{arch} lora.merged_logits"),
        &flat_f32(&merged),
        &flat_f32(&c["lora.merged_logits"]),
        Some(&valid),
        ATOL,
        RTOL,
    );
    eprintln!("{arch}: merged logits max |diff| {d:.3e}");
}

#[test]
fn llama_lora_logits_merge_and_disable() {
    check_lora_logits_merge_disable("llama");
}

#[test]
fn qwen2_lora_logits_merge_and_disable() {
    check_lora_logits_merge_disable("qwen2");
}

/// Every trainable variable has a gradient; no base parameter has one.
fn check_grad_coverage(
    arch: &str,
    model: &mut llmtune_models::Llama,
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
) {
    for (k, v) in vars {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "{arch}: {k} has no gradient"
        );
    }
    for (name, t) in model.params_mut() {
        assert!(
            grads.get(t).is_none(),
            "{arch}: base parameter {name} got a gradient"
        );
    }
}

fn check_sft_grads(arch: &str) {
    let Some((mut model, c, dir)) = load_arch(arch) else {
        return;
    };
    let mut lora = Lora::new();
    lora.load_peft(&mut model, &dir.join("lora"), DEFAULT_ADAPTER, true)
        .unwrap();
    let vars = lora.trainable();
    // The optimizer order is the fixtures' `sft.param_names` (sorted PEFT keys).
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let names: Vec<String> = json["sft"]["param_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        vars.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        names
    );
    let ids = &c["sft.step1.input_ids"];
    let mask = &c["sft.step1.attention_mask"];
    let labels = &c["sft.step1.labels"];
    let pos = arange_positions(ids);
    let (logits, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let loss = causal_lm_loss(&logits, labels);
    let (ours, reference) = (scalar(&loss), scalar(&c["sft.step1.loss"]));
    assert!(
        (ours - reference).abs() <= 1e-5 + 1e-4 * reference.abs(),
        "{arch}: SFT loss {ours} vs {reference}"
    );
    let grads = loss.backward().unwrap();
    check_grad_coverage(arch, &mut model, &vars, &grads);
    let mut worst = 0f64;
    for (k, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let reference = &c[&format!("sft.step1.grad.{k}")];
        assert_eq!(g.dims(), reference.dims(), "{k}");
        worst = worst.max(assert_grad_close(
            &format!("{arch} grad {k}"),
            &flat_f32(g),
            &flat_f32(reference),
        ));
    }
    eprintln!("{arch}: SFT loss {ours} (ref {reference}); worst grad rel L2 {worst:.3e}");
}

#[test]
fn llama_sft_loss_and_lora_gradients() {
    check_sft_grads("llama");
}

#[test]
fn qwen2_sft_loss_and_lora_gradients() {
    check_sft_grads("qwen2");
}

fn check_rm(arch: &str) {
    let Some((mut model, c, dir)) = load_arch(arch) else {
        return;
    };
    let mut lora = Lora::new();
    lora.load_peft(&mut model, &dir.join("lora"), DEFAULT_ADAPTER, true)
        .unwrap();
    let head = ValueHead::load(
        &dir.join("value_head.safetensors"),
        DType::F32,
        model.device(),
        true,
    )
    .unwrap();
    assert_eq!(head.hidden_size(), model.cfg.hidden_size);
    let ids = &c["rm.input_ids"];
    let mask = &c["rm.attention_mask"];
    let pos = arange_positions(ids);
    let hidden = model
        .forward_hidden(ids, Some(mask), Some(&pos), None)
        .unwrap();
    let values = head.forward(&hidden).unwrap();
    assert_eq!(values.dims(), ids.dims());
    let d = assert_close(
        &format!("{arch} rm.values"),
        &flat_f32(&values),
        &flat_f32(&c["rm.values"]),
        Some(&valid_mask(mask, 1)),
        ATOL,
        RTOL,
    );
    eprintln!("{arch}: RM values max |diff| {d:.3e}");
    let last = last_token_index(mask).unwrap();
    let expected_last: Vec<usize> = c["rm.last_index"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    assert_eq!(last, expected_last);
    let rewards = gather_last(&values, &last).unwrap();
    assert_close(
        &format!("{arch} rm.rewards"),
        &flat_f32(&rewards),
        &flat_f32(&c["rm.rewards"]),
        None,
        1e-5,
        1e-4,
    );
    let n = rewards.dim(0).unwrap() / 2;
    let chosen = rewards.narrow(0, 0, n).unwrap();
    let rejected = rewards.narrow(0, n, n).unwrap();
    let loss = pairwise_ranking_loss(&chosen, &rejected).unwrap();
    let (ours, reference) = (scalar(&loss), scalar(&c["rm.loss"]));
    assert!(
        (ours - reference).abs() <= 1e-5 + 1e-4 * reference.abs(),
        "{arch}: RM loss {ours} vs {reference}"
    );
    let acc = {
        let (cv, rv) = (flat_f64(&chosen), flat_f64(&rejected));
        cv.iter().zip(&rv).filter(|(a, b)| a > b).count() as f64 / n as f64
    };
    assert_eq!(acc, scalar(&c["rm.accuracy"]), "{arch}: accuracy");
    let grads = loss.backward().unwrap();
    let mut vars = lora.trainable();
    vars.extend(head.trainable());
    check_grad_coverage(arch, &mut model, &vars, &grads);
    for (k, v) in &vars {
        let key = if k.starts_with("summary.") {
            format!("rm.grad.v_head.{k}")
        } else {
            format!("rm.grad.{k}")
        };
        assert_grad_close(
            &format!("{arch} {key}"),
            &flat_f32(grads.get(v.as_tensor()).unwrap()),
            &flat_f32(&c[&key]),
        );
    }
    assert_eq!(vars.len(), lora.trainable().len() + 2);
    eprintln!("{arch}: RM loss {ours} (ref {reference}), accuracy {acc}");
}

#[test]
fn llama_reward_model_values_loss_and_gradients() {
    check_rm("llama");
}

#[test]
fn qwen2_reward_model_values_loss_and_gradients() {
    check_rm("qwen2");
}

fn check_round_trip(arch: &str) {
    let Some((mut model, _c, dir)) = load_arch(arch) else {
        return;
    };
    let src = dir.join("lora");
    let mut lora = Lora::new();
    lora.load_peft(&mut model, &src, DEFAULT_ADAPTER, true)
        .unwrap();
    let out = scratch(&format!("roundtrip-{arch}"));
    lora.save_peft(DEFAULT_ADAPTER, &out, "..").unwrap();
    // Same keys as PEFT wrote.
    assert_eq!(
        safetensors_keys(&out.join(peft::WEIGHTS_NAME)),
        safetensors_keys(&src.join(peft::WEIGHTS_NAME))
    );
    // No temporary files left behind.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, vec![peft::CONFIG_NAME, peft::WEIGHTS_NAME]);
    // The config carries what PEFT needs, with the same values as the fixture's.
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG_NAME)).unwrap())
            .unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(peft::CONFIG_NAME)).unwrap())
            .unwrap();
    for k in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "task_type",
        "fan_in_fan_out",
        "base_model_name_or_path",
        "inference_mode",
        "use_rslora",
        "use_dora",
    ] {
        assert_eq!(ours[k], theirs[k], "{arch}: adapter_config.json field {k}");
    }
    // Reloading gives exactly the same tensors.
    let mut again = Lora::new();
    let mut model2 = load_model(&dir);
    again
        .load_peft(&mut model2, &out, DEFAULT_ADAPTER, false)
        .unwrap();
    let a = lora.weights(DEFAULT_ADAPTER).unwrap();
    let b = again.weights(DEFAULT_ADAPTER).unwrap();
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(
            flat_f32(ta),
            flat_f32(tb),
            "{arch}: {ka} changed in the round trip"
        );
    }
    assert_eq!(
        again.config(DEFAULT_ADAPTER).unwrap(),
        lora.config(DEFAULT_ADAPTER).unwrap()
    );
    // And the same values as the source file.
    let file =
        candle_core::safetensors::load(src.join(peft::WEIGHTS_NAME), &candle_core::Device::Cpu)
            .unwrap();
    for (k, t) in &b {
        assert_eq!(flat_f32(t), flat_f32(&file[k]), "{arch}: {k}");
    }
    // Value head: TRL names in, `summary.*` out, values exact.
    let head = ValueHead::load(&dir, DType::F32, &candle_core::Device::Cpu, false).unwrap();
    head.save(&out).unwrap();
    assert_eq!(
        safetensors_keys(&out.join("value_head.safetensors")),
        vec!["summary.bias", "summary.weight"]
    );
    let head2 = ValueHead::load(&out, DType::F32, &candle_core::Device::Cpu, false).unwrap();
    assert_eq!(flat_f32(head.weight()), flat_f32(head2.weight()));
    assert_eq!(flat_f32(head.bias()), flat_f32(head2.bias()));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn llama_peft_save_load_round_trip() {
    check_round_trip("llama");
}

#[test]
fn qwen2_peft_save_load_round_trip() {
    check_round_trip("qwen2");
}

fn check_checkpoint_dirs(arch: &str) {
    let Some((mut model, c, dir)) = load_arch(arch) else {
        return;
    };
    let ids = &c["forward.input_ids"];
    let mask = &c["forward.attention_mask"];
    let pos = arange_positions(ids);
    let valid = valid_mask(mask, model.cfg.vocab_size);
    let ad = dir.join("lora");

    // Inference with one folder: merged = `lora.merged_logits`.
    let ck = apply_checkpoints(&mut model, &[&ad], true, false).unwrap();
    assert_eq!(ck.merged, vec![ad.clone()]);
    assert!(ck.resumed.is_none());
    assert!(ck.lora.adapter_names().is_empty());
    let (merged, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    assert_close(
        &format!("{arch} checkpoint_dir merged"),
        &flat_f32(&merged),
        &flat_f32(&c["lora.merged_logits"]),
        Some(&valid),
        ATOL,
        RTOL,
    );

    // Training with resume: merge the first, continue training the second. The forward is
    // W + 2 * delta either way, so it equals merging both.
    let mut m_resume = load_model(&dir);
    let mut ck = apply_checkpoints(&mut m_resume, &[&ad, &ad], true, true).unwrap();
    assert_eq!(ck.merged, vec![ad.clone()]);
    assert_eq!(ck.resumed.as_deref(), Some(ad.as_path()));
    assert_eq!(ck.lora.adapter_names(), vec![DEFAULT_ADAPTER]);
    let fresh_cfg = LoraConfig::new(8, 16.0, 0.0, "all").unwrap();
    let name = ck.ensure_trainable(&mut m_resume, &fresh_cfg, 1).unwrap();
    assert_eq!(name, DEFAULT_ADAPTER);
    // The resumed adapter keeps its own config, not the fresh one.
    assert_ne!(ck.lora.config(DEFAULT_ADAPTER).unwrap(), &fresh_cfg);
    let vars = ck.lora.trainable();
    let file =
        candle_core::safetensors::load(ad.join(peft::WEIGHTS_NAME), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(vars.len(), file.len());
    for (k, v) in &vars {
        assert_eq!(
            flat_f32(v.as_tensor()),
            flat_f32(&file[k]),
            "{arch}: resumed {k}"
        );
    }
    let (resumed, _) = m_resume.forward(ids, Some(mask), Some(&pos), None).unwrap();

    let mut m_merge = load_model(&dir);
    let mut ck2 = apply_checkpoints(&mut m_merge, &[&ad, &ad], false, true).unwrap();
    assert_eq!(ck2.merged, vec![ad.clone(), ad.clone()]);
    assert!(ck2.resumed.is_none());
    assert!(ck2.lora.trainable().is_empty());
    // Training without resume: a fresh adapter (B = 0) does not change the output.
    ck2.ensure_trainable(&mut m_merge, &fresh_cfg, 1).unwrap();
    assert_eq!(ck2.lora.config(DEFAULT_ADAPTER).unwrap(), &fresh_cfg);
    assert_eq!(
        ck2.lora.modules(DEFAULT_ADAPTER).unwrap().len(),
        7 * model.cfg.num_hidden_layers,
        "`all` targets every linear layer but lm_head"
    );
    let (both, _) = m_merge.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let d = assert_close(
        &format!("{arch} resume vs merge-all"),
        &flat_f32(&resumed),
        &flat_f32(&both),
        Some(&valid),
        ATOL,
        RTOL,
    );
    // ... and it differs from a single merge (the second adapter is really applied).
    let single = flat_f32(&merged);
    let twice = flat_f32(&both);
    let diff = single
        .iter()
        .zip(&twice)
        .zip(&valid)
        .filter(|(_, &v)| v)
        .map(|((a, b), _)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-2,
        "{arch}: the second checkpoint changed nothing ({diff})"
    );
    eprintln!("{arch}: resume vs merge-all max |diff| {d:.3e}");
}

#[test]
fn llama_checkpoint_dir_semantics() {
    check_checkpoint_dirs("llama");
}

#[test]
fn qwen2_checkpoint_dir_semantics() {
    check_checkpoint_dirs("qwen2");
}

/// PEFT's `.bin` weights (torch zip pickle) read as the same tensors as its `.safetensors`
/// (the ChatGLM fixtures ship both).
#[test]
fn peft_bin_and_safetensors_agree() {
    let Some(root) = fixtures() else {
        return;
    };
    let mut checked = 0;
    for arch in ["chatglm1", "chatglm2"] {
        let src = root.join(arch).join("lora");
        if !src.join(peft::WEIGHTS_NAME_BIN).exists() {
            continue;
        }
        let bin_only = scratch(&format!("bin-{arch}"));
        std::fs::copy(
            src.join(peft::CONFIG_NAME),
            bin_only.join(peft::CONFIG_NAME),
        )
        .unwrap();
        std::fs::copy(
            src.join(peft::WEIGHTS_NAME_BIN),
            bin_only.join(peft::WEIGHTS_NAME_BIN),
        )
        .unwrap();
        let a = peft::read_adapter(&src).unwrap();
        let b = peft::read_adapter(&bin_only).unwrap();
        assert_eq!(a.weights_file, src.join(peft::WEIGHTS_NAME));
        assert_eq!(b.weights_file, bin_only.join(peft::WEIGHTS_NAME_BIN));
        assert_eq!(a.config, b.config);
        assert!(!a.weights.is_empty());
        assert_eq!(
            a.weights.keys().collect::<Vec<_>>(),
            b.weights.keys().collect::<Vec<_>>()
        );
        for (m, (aa, ab)) in &a.weights {
            let (ba, bb) = &b.weights[m];
            assert_eq!(flat_f32(aa), flat_f32(ba), "{arch} {m} lora_A");
            assert_eq!(flat_f32(ab), flat_f32(bb), "{arch} {m} lora_B");
        }
        let _ = std::fs::remove_dir_all(&bin_only);
        checked += 1;
    }
    if checked == 0 {
        eprintln!("skipped: no chatglm*/lora/adapter_model.bin in the fixtures");
    }
}

/// Two named adapters on one backbone: the fixture adapter as "reward", a fresh trainable
/// "default"; swapping gives each one's logits without rebuilding (PPO's reward swap).
fn check_swap(arch: &str) {
    let Some((mut model, c, dir)) = load_arch(arch) else {
        return;
    };
    let ids = &c["forward.input_ids"];
    let mask = &c["forward.attention_mask"];
    let pos = arange_positions(ids);
    let valid = valid_mask(mask, model.cfg.vocab_size);
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(4, 8.0, 0.1, "q_proj,v_proj").unwrap();
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &cfg, 3)
        .unwrap();
    lora.load_peft(&mut model, &dir.join("lora"), "reward", false)
        .unwrap();
    assert_eq!(lora.active().as_deref(), Some(DEFAULT_ADAPTER));
    // Fresh adapter (B = 0): base logits.
    let (l0, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    assert_close(
        "fresh adapter",
        &flat_f32(&l0),
        &flat_f32(&c["forward.logits"]),
        Some(&valid),
        ATOL,
        RTOL,
    );
    {
        let _reward = lora.activated("reward").unwrap();
        let (l1, _) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
        assert_close(
            "reward adapter swapped in",
            &flat_f32(&l1),
            &flat_f32(&c["lora.logits"]),
            Some(&valid),
            ATOL,
            RTOL,
        );
    }
    assert_eq!(lora.active().as_deref(), Some(DEFAULT_ADAPTER));
    // Only the fresh adapter is trainable.
    assert_eq!(
        lora.trainable().len(),
        2 * lora.modules(DEFAULT_ADAPTER).unwrap().len()
    );
    assert!(!lora.is_trainable("reward").unwrap());
}

#[test]
fn llama_named_adapters_swap() {
    check_swap("llama");
}

#[test]
fn qwen2_named_adapters_swap() {
    check_swap("qwen2");
}
