//! The DPO objective on the tiny fixture Llama (`LLMTUNE_FIXTURES`), with the fixture's PEFT
//! adapter as the policy and the bare base as the reference: the batched, padded loss of
//! `Dpo::pairs` equals the objective written out pair by pair from each row's unpadded full
//! logits (log-softmax and sums in f64 here), and a fresh adapter (LoRA B = 0) gives `log 2`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{apply_checkpoints, LoraConfig};
use llmtune_data::{DataArgs, Example, Stage};
use llmtune_models::{load_pretrained, CausalLm, Pretrained};
use llmtune_train::stages::dpo::{Dpo, REF_ADAPTER};

const BETA: f64 = 0.1;

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

/// The fixture Llama (f32, CPU) and its PEFT adapter's folder.
fn fixture_llama() -> Option<(Pretrained, PathBuf)> {
    let model_dir = fixtures()?.join("llama");
    let p = load_pretrained(model_dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    Some((p, model_dir.join("lora")))
}

/// The project's example preference pairs, encoded for `p` with the chatml template (no
/// cache).
fn pairs(p: &Pretrained, n: usize) -> Vec<Example> {
    let args = DataArgs {
        dataset: vec!["example_rm".into()],
        dataset_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/example"),
        template: "chatml".into(),
        max_source_length: 64,
        max_target_length: 64,
        max_samples: Some(n),
        disable_cache: true,
        ..Default::default()
    };
    let prepared = llmtune_data::prepare(&args, &p.tokenizer, Stage::Rm, false).unwrap();
    assert_eq!(prepared.examples.len(), n);
    prepared.examples
}

/// `log p(ids[from..] | ids[..t])` summed, from the full logits of one unpadded row.
fn answer_logp(model: &CausalLm, ids: &[u32], from: usize) -> f64 {
    let dev = model.device().clone();
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let (hidden, _) = model.forward_with_value(&input, None).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let rows: Vec<Vec<f32>> = logits
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    (from..ids.len())
        .map(|t| {
            let row = &rows[t - 1];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[ids[t] as usize] as f64 - lse
        })
        .sum()
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn pad_id(p: &Pretrained) -> u32 {
    p.tokenizer.pad_id().or(p.tokenizer.eos_id()).unwrap_or(0)
}

#[test]
fn batched_dpo_loss_equals_the_objective_written_out() {
    let Some((mut p, lora_dir)) = fixture_llama() else {
        return;
    };
    // The fixture's adapter, resumed as the trainable one: the policy.
    let lora_dir: &Path = &lora_dir;
    let ck = apply_checkpoints(&mut p.model, &[lora_dir], true, true).unwrap();
    ck.lora.set_training(false);
    let examples = pairs(&p, 3);
    let dpo = Dpo {
        model: &p.model,
        lora: &ck.lora,
        reference: None,
        beta: BETA,
        pad_id: pad_id(&p),
    };
    let rows: Vec<&Example> = examples.iter().collect();
    let got = dpo.pairs(&rows).unwrap();
    let loss = got
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();

    let mut want_loss = 0.0;
    let mut lens = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        let Example::Pair(pair) = e else {
            panic!("example {i} is not a pair")
        };
        let from = pair.prompt_len;
        let policy = (
            answer_logp(&p.model, &pair.chosen_ids, from),
            answer_logp(&p.model, &pair.rejected_ids, from),
        );
        let reference = {
            let _off = ck.lora.disabled();
            (
                answer_logp(&p.model, &pair.chosen_ids, from),
                answer_logp(&p.model, &pair.rejected_ids, from),
            )
        };
        let rc = BETA * (policy.0 - reference.0);
        let rr = BETA * (policy.1 - reference.1);
        want_loss += softplus(rr - rc) / examples.len() as f64;
        lens.push((pair.chosen_ids.len(), pair.rejected_ids.len()));
        // f32 sums over the answer tokens in the batch; f64 here.
        let (gc, gr) = got.logps[i];
        assert!(
            (gc - policy.0).abs() <= 1e-4 * policy.0.abs().max(1.0),
            "pair {i} logp chosen {gc} vs {}",
            policy.0
        );
        assert!(
            (gr - policy.1).abs() <= 1e-4 * policy.1.abs().max(1.0),
            "pair {i} logp rejected {gr} vs {}",
            policy.1
        );
        let (wc, wr) = got.rewards[i];
        assert!(
            (wc - rc).abs() <= 1e-4,
            "pair {i} reward chosen {wc} vs {rc}"
        );
        assert!(
            (wr - rr).abs() <= 1e-4,
            "pair {i} reward rejected {wr} vs {rr}"
        );
    }
    eprintln!("DPO loss {loss:.6} (written out {want_loss:.6}); rows {lens:?}");
    // The rows differ in length, so the batch was padded on both sides.
    assert!(lens.iter().any(|&(c, r)| c != r) || lens.windows(2).any(|w| w[0] != w[1]));
    assert!((loss - want_loss).abs() <= 1e-5, "{loss} vs {want_loss}");
    // The fixture adapter moves the policy off the reference.
    assert!(
        (want_loss - std::f64::consts::LN_2).abs() > 1e-4,
        "{want_loss}"
    );

    // The loss has a gradient in every LoRA matrix of the policy.
    let vars = ck.lora.trainable();
    assert!(!vars.is_empty());
    let grads = got.loss.backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn a_fresh_adapter_starts_at_log_2() {
    let Some((mut p, _)) = fixture_llama() else {
        return;
    };
    let mut ck = apply_checkpoints::<_, &str>(&mut p.model, &[], true, true).unwrap();
    let cfg = LoraConfig::new(4, 8.0, 0.0, "q_proj,v_proj").unwrap();
    ck.ensure_trainable(&mut p.model, &cfg, 7).unwrap();
    let examples = pairs(&p, 4);
    let dpo = Dpo {
        model: &p.model,
        lora: &ck.lora,
        reference: None,
        beta: BETA,
        pad_id: pad_id(&p),
    };
    let rows: Vec<&Example> = examples.iter().collect();
    let out = dpo.pairs(&rows).unwrap();
    let loss = out
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
    for (c, r) in &out.rewards {
        assert!(c.abs() < 1e-6 && r.abs() < 1e-6, "rewards {c} {r}");
    }
}

#[test]
fn a_continued_adapter_is_its_own_reference() {
    // `--resume_lora_training true`: the reference is a frozen copy of the adapter as loaded,
    // so training starts at log 2 however far the adapter is from the base.
    let Some((mut p, lora_dir)) = fixture_llama() else {
        return;
    };
    let lora_dir: &Path = &lora_dir;
    let mut ck = apply_checkpoints(&mut p.model, &[lora_dir], true, true).unwrap();
    let policy = ck.lora.active().expect("the resumed adapter is active");
    ck.lora
        .load_peft(&mut p.model, lora_dir, REF_ADAPTER, false)
        .unwrap();
    ck.lora.set_active(&policy).unwrap();
    ck.lora.set_training(false);
    let examples = pairs(&p, 3);
    let rows: Vec<&Example> = examples.iter().collect();
    let dpo = |reference| Dpo {
        model: &p.model,
        lora: &ck.lora,
        reference,
        beta: BETA,
        pad_id: pad_id(&p),
    };
    let own = dpo(Some(REF_ADAPTER)).pairs(&rows).unwrap();
    let loss = own
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
    // Against the bare base the same policy is not at log 2.
    let base = dpo(None).pairs(&rows).unwrap();
    let loss = base
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() > 1e-4, "{loss}");
}
