//! Parity with TRL 0.4.x's `PPOTrainer` math on the fixture models (fixture README §3 (f)):
//!
//! * `ppo_synth.*`: the pure formulas with perturbed log-probabilities and values, so both clip
//!   branches fire;
//! * `ppo.*`: the model case: policy log-probabilities (adapter on), reference log-probabilities
//!   (adapter disabled), critic values, every intermediate and statistic, and the gradients of
//!   the loss for every LoRA matrix and the value head.
//!
//! Run with `LLMTUNE_FIXTURES=/work/shared/fixtures cargo test -p llmtune-train --test
//! ppo_fixtures` (and with `fixtures-alt`); without the variable every test prints `skipped`.
//! Shapes and hyperparameters are read from the fixture files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{Lora, ValueHead, DEFAULT_ADAPTER};
use llmtune_models::{config::LlamaConfig, loader, CausalLm, Llama};
use llmtune_train::ppo::{
    compute_rewards, policy_forward, ppo_loss, MiniBatch, PpoHyper, PpoLoss, Rewards, Rows,
    SeqBatch,
};

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn load(arch: &str) -> Option<(PathBuf, HashMap<String, Tensor>, serde_json::Value)> {
    let dir = fixtures()?.join(arch);
    let cases = candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu)
        .expect("cases.safetensors");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    Some((dir, cases, json))
}

fn load_model(dir: &Path) -> CausalLm {
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let src = loader::open_dir(dir).unwrap();
    Llama::load(&cfg, src.as_ref(), DType::F32, &Device::Cpu)
        .unwrap()
        .into()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn hyper(json: &serde_json::Value) -> (PpoHyper, f64, f64) {
    let h = &json["ppo"]["hyperparameters"];
    let f = |k: &str| {
        h[k].as_f64()
            .unwrap_or_else(|| panic!("hyperparameter {k}"))
    };
    (
        PpoHyper {
            gamma: f("gamma"),
            lam: f("lam"),
            cliprange: f("cliprange"),
            cliprange_value: f("cliprange_value"),
            vf_coef: f("vf_coef"),
        },
        f("kl_coef"),
        f("score"),
    )
}

/// Losses, rewards, PPO scalars: `1e-5` absolute + `1e-4` relative (fixture README §5).
fn close(name: &str, ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{name}: length");
    let mut worst = 0f64;
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let d = (a - b).abs();
        worst = worst.max(d);
        assert!(
            d <= 1e-5 + 1e-4 * b.abs(),
            "{name}[{i}]: ours {a} vs reference {b} (|diff| {d:.3e})"
        );
    }
    worst
}

/// Gradients: `|a-b| <= 1e-6 + 1e-3|b|` elementwise, or relative L2 error <= 1e-4.
fn grad_close(name: &str, ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{name}: length");
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    let rel = (num / den.max(1e-300)).sqrt();
    let elementwise = ours
        .iter()
        .zip(reference)
        .all(|(a, b)| (a - b).abs() <= 1e-6 + 1e-3 * b.abs());
    assert!(
        elementwise || rel <= 1e-4,
        "{name}: relative L2 error {rel:.3e}"
    );
    assert!(den > 0.0, "{name}: the reference gradient is zero");
    rel
}

fn check_intermediates(prefix: &str, c: &HashMap<String, Tensor>, r: &Rewards, out: &PpoLoss) {
    let rows: [(&str, &Rows); 12] = [
        ("kl", &r.kl),
        ("non_score_reward", &r.non_score_reward),
        ("rewards", &r.rewards),
        ("advantages_raw", &out.advantages_raw),
        ("returns", &out.returns),
        ("advantages", &out.advantages),
        ("vpredclipped", &out.vpredclipped),
        ("vf_losses1", &out.vf_losses1),
        ("vf_losses2", &out.vf_losses2),
        ("ratio", &out.ratio),
        ("pg_losses", &out.pg_losses),
        ("pg_losses2", &out.pg_losses2),
    ];
    for (k, v) in rows {
        let key = format!("{prefix}.{k}");
        close(&key, &v.valid(), &flat(&c[&key]));
    }
    let s = &out.stats;
    let scalars = [
        ("adv_mean", s.adv_mean),
        ("adv_var", s.adv_var),
        ("vf_loss", s.vf_loss),
        ("vf_clipfrac", s.vf_clipfrac),
        ("pg_loss", s.pg_loss),
        ("pg_clipfrac", s.pg_clipfrac),
        ("loss", s.loss),
        ("approxkl", s.approxkl),
        ("policykl", s.policykl),
        ("returns_mean", s.returns_mean),
        ("returns_var", s.returns_var),
        ("values_mean", s.values_mean),
        ("values_var", s.values_var),
    ];
    for (k, v) in scalars {
        let key = format!("{prefix}.{k}");
        close(&key, &[v], &flat(&c[&key]));
    }
}

fn one_row(t: &Tensor) -> Rows {
    Rows::from_rows(&[flat(t)])
}

fn check_synth(arch: &str) {
    let Some((_, c, json)) = load(arch) else {
        return;
    };
    let (hp, kl_coef, score) = hyper(&json);
    // The score enters as the float32 tensor the reference used.
    let stored = flat(&c["ppo.score"])[0];
    assert!((stored - score).abs() < 1e-6, "{stored} vs {score}");
    let score = stored;
    let old = one_row(&c["ppo.logprobs"]);
    let reference = one_row(&c["ppo.ref_logprobs"]);
    let values = one_row(&c["ppo.values"]);
    let r = compute_rewards(&[score], &old, &reference, kl_coef).unwrap();
    let mb = MiniBatch {
        old_logprobs: old,
        values,
        rewards: r.rewards.clone(),
    };
    let n = mb.old_logprobs.width;
    let new_lp = c["ppo_synth.new_logprobs"].reshape((1, n)).unwrap();
    let vpreds = c["ppo_synth.vpreds"].reshape((1, n)).unwrap();
    let out = ppo_loss(&mb, &new_lp, &vpreds, None, &hp).unwrap();
    check_intermediates("ppo_synth", &c, &r, &out);
    // The perturbation makes clipping fire (which branches, and how often, is the fixture's).
    assert!(
        out.stats.pg_clipfrac + out.stats.vf_clipfrac > 0.0,
        "no clipping in the synthetic case"
    );
    eprintln!(
        "{arch}: ppo_synth loss {} pg {} vf {} (clipfrac pg {} vf {})",
        out.stats.loss,
        out.stats.pg_loss,
        out.stats.vf_loss,
        out.stats.pg_clipfrac,
        out.stats.vf_clipfrac
    );
}

#[test]
fn llama_ppo_synthetic_formulas() {
    check_synth("llama");
}

#[test]
fn qwen2_ppo_synthetic_formulas() {
    check_synth("qwen2");
}

fn ids(t: &Tensor) -> Vec<u32> {
    flat(t).into_iter().map(|x| x as u32).collect()
}

fn check_model(arch: &str) {
    let Some((dir, c, json)) = load(arch) else {
        return;
    };
    let (hp, kl_coef, _) = hyper(&json);
    let score = flat(&c["ppo.score"])[0];
    let mut model = load_model(&dir);
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
    let query = ids(&c["ppo.query_ids"]);
    let response = ids(&c["ppo.response_ids"]);
    let mut joined = query.clone();
    joined.extend(&response);
    assert_eq!(joined, ids(&c["ppo.input_ids"]));
    let batch = SeqBatch::new(&[query], &[response], 0, &Device::Cpu).unwrap();

    // Reference: the adapter disabled.
    let reference = {
        let _off = lora.disabled();
        policy_forward(&model, None, &batch).unwrap().logprobs
    };
    let d = close(
        &format!("{arch} ppo.ref_logprobs"),
        &flat(&reference),
        &flat(&c["ppo.ref_logprobs"]),
    );
    eprintln!("{arch}: ref logprobs max |diff| {d:.2e}");
    // Policy: adapter on, one forward giving logprobs, values and logits.
    let pol = policy_forward(&model, Some(&head), &batch).unwrap();
    let values = pol.values.clone().unwrap();
    let d = close(
        &format!("{arch} ppo.logprobs"),
        &flat(&pol.logprobs),
        &flat(&c["ppo.logprobs"]),
    );
    eprintln!("{arch}: policy logprobs max |diff| {d:.2e}");
    close(
        &format!("{arch} ppo.values"),
        &flat(&values),
        &flat(&c["ppo.values"]),
    );

    let lens = batch.response_lens.clone();
    let old = Rows::from_tensor(&pol.logprobs.detach(), &lens).unwrap();
    let vals = Rows::from_tensor(&values.detach(), &lens).unwrap();
    let refr = Rows::from_tensor(&reference, &lens).unwrap();
    let r = compute_rewards(&[score], &old, &refr, kl_coef).unwrap();
    let mb = MiniBatch {
        old_logprobs: old,
        values: vals,
        rewards: r.rewards.clone(),
    };
    // First mini-batch: the current policy is the rollout policy (ratio 1, no clipping).
    let out = ppo_loss(&mb, &pol.logprobs, &values, Some(&pol.logits), &hp).unwrap();
    check_intermediates("ppo", &c, &r, &out);
    close(
        &format!("{arch} ppo.entropy"),
        &out.entropy.as_ref().unwrap().valid(),
        &flat(&c["ppo.entropy"]),
    );
    close(
        &format!("{arch} ppo.entropy_mean"),
        &[out.stats.entropy_mean],
        &flat(&c["ppo.entropy_mean"]),
    );
    assert!(out.ratio.valid().iter().all(|&x| x == 1.0));

    let grads = out.loss.backward().unwrap();
    let mut vars = lora.trainable();
    vars.extend(head.trainable());
    let mut checked = 0;
    let mut worst = 0f64;
    for (k, v) in &vars {
        let key = if k.starts_with("summary.") {
            format!("ppo.grad.v_head.{k}")
        } else {
            format!("ppo.grad.{k}")
        };
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: {k} has no gradient"));
        worst = worst.max(grad_close(
            &format!("{arch} {key}"),
            &flat(g),
            &flat(&c[&key]),
        ));
        checked += 1;
    }
    let expected = c.keys().filter(|k| k.starts_with("ppo.grad.")).count();
    assert_eq!(checked, expected, "every ppo.grad.* key is checked");
    eprintln!(
        "{arch}: PPO loss {} (ref {}), {checked} gradients, worst relative L2 {worst:.2e}",
        out.stats.loss,
        flat(&c["ppo.loss"])[0]
    );
}

#[test]
fn llama_ppo_model_case_and_gradients() {
    check_model("llama");
}

#[test]
fn qwen2_ppo_model_case_and_gradients() {
    check_model("qwen2");
}
