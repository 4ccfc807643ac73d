//! Gradient checkpointing gives the same loss and gradients as one plain backward pass,
//! LoRA dropout included (the recomputation replays each layer's dropout masks). Runs on
//! `LLMTUNE_TEST_DEVICE` (default cpu; `cuda` needs `--features cuda`).

use candle_core::{DType, Tensor};
use llmtune_adapters::{Lora, LoraConfig};
use llmtune_models::loader::RandomSource;
use llmtune_models::{CausalLm, Llama, LlamaConfig};
use llmtune_train::checkpointing::checkpointed_grads;
use llmtune_train::optim::Gradients;
use llmtune_train::stages::sft::{causal_lm_loss, causal_lm_loss_from_hidden};

#[path = "../../../test-support/device.rs"]
mod device;
use device::test_device;

fn tiny(tied: bool) -> CausalLm {
    let cfg = LlamaConfig::from_json_str(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        })
        .to_string(),
    )
    .unwrap();
    Llama::load(
        &cfg,
        &RandomSource::new(&cfg, 0.2),
        DType::F32,
        &test_device(),
    )
    .unwrap()
    .into()
}

fn check(tied: bool, dropout: f64) {
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 5) % 97) as u32).collect();
    check_model(tiny(tied), ids, (b, t), dropout);
}

/// The fixture ChatGLM models (`LLMTUNE_FIXTURES`), as [`CausalLm`]s, with ids whose rows are
/// `[pads] source [gMASK] <sop> target` (v1 needs them; v2 takes them as any tokens).
fn check_chatglm(version: u32, dropout: f64) {
    let Some(fx) = std::env::var_os("LLMTUNE_FIXTURES").map(std::path::PathBuf::from) else {
        eprintln!("skipped: LLMTUNE_FIXTURES not set");
        return;
    };
    let dev = test_device();
    let (b, t) = (2, 9);
    let (model, gmask, sop): (CausalLm, u32, u32) = if version == 1 {
        let dir = fx.join("chatglm1");
        let cfg = llmtune_models::ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
        let src = llmtune_models::loader::open_dir(&dir).unwrap();
        let m = llmtune_models::ChatGlm::load(&cfg, src.as_ref(), DType::F32, &dev).unwrap();
        (m.into(), cfg.gmask_token_id, cfg.bos_token_id)
    } else {
        let dir = fx.join("chatglm2");
        let cfg = llmtune_models::ChatGlm2Config::from_file(&dir.join("config.json")).unwrap();
        let src = llmtune_models::loader::open_dir(&dir).unwrap();
        let m = llmtune_models::ChatGlm2::load(&cfg, src.as_ref(), DType::F32, &dev).unwrap();
        (m.into(), 5, 6)
    };
    let ids: Vec<u32> = (0..b * t)
        .map(|i| match i % t {
            5 => gmask,
            6 => sop,
            _ => ((i * 37 + 11) % 97) as u32 + 10,
        })
        .collect();
    check_model(model, ids, (b, t), dropout);
}

fn check_model(mut model: CausalLm, ids_v: Vec<u32>, (b, t): (usize, usize), dropout: f64) {
    let mut lora = Lora::new();
    let cfg = LoraConfig::new(4, 8.0, dropout, "all").unwrap();
    lora.add_adapter(&mut model, "default", &cfg, 3).unwrap();
    // Non-zero B so every LoRA tensor gets a non-zero gradient.
    for (_, v) in lora.trainable() {
        v.set(&Tensor::randn(0f32, 0.1, v.dims(), &test_device()).unwrap())
            .unwrap();
    }
    lora.set_training(true);
    lora.set_dropout_seed(11);
    let vars = lora.trainable();
    let ids = Tensor::from_vec(ids_v.clone(), (b, t), &test_device()).unwrap();
    // Left padding on row 1 (two pads), labels on the last five positions.
    let mask: Vec<i64> = (0..b * t)
        .map(|i| if i >= t && i < t + 2 { 0 } else { 1 })
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &test_device()).unwrap();
    let labels: Vec<i64> = (0..b * t)
        .map(|i| if i % t >= 4 { ids_v[i] as i64 } else { -100 })
        .collect();

    let state = lora.dropout_state();
    let (logits, _) = model.forward(&ids, Some(&mask), None).unwrap();
    let plain = causal_lm_loss(&logits, &labels, b, t).unwrap();
    let store = plain.backward().unwrap();
    let plain_grads = Gradients::from_grad_store(&store, &vars).unwrap();
    let after_plain = lora.dropout_state();

    lora.set_dropout_state(state.0, state.1);
    let (ck, ck_grads) = checkpointed_grads(&model, &ids, Some(&mask), Some(&lora), &vars, |h| {
        let logits = model.logits(h).unwrap();
        causal_lm_loss(&logits, &labels, b, t)
    })
    .unwrap();
    assert_eq!(
        lora.dropout_state(),
        after_plain,
        "the dropout stream ends where a plain pass leaves it"
    );
    same(&plain, &plain_grads, &ck, &ck_grads, vars.len());

    // The fused head + loss (no logits in the graph) on a plain pass: same loss and grads.
    assert!(
        model.plain_lm_head().is_some(),
        "LoRA `all` leaves the head plain, so the fused path is the one tested"
    );
    lora.set_dropout_state(state.0, state.1);
    let hidden = model.forward_hidden(&ids, Some(&mask), None).unwrap();
    let fused = causal_lm_loss_from_hidden(&model, &hidden, &labels, b, t).unwrap();
    let fused_grads = Gradients::from_grad_store(&fused.backward().unwrap(), &vars).unwrap();
    same(&plain, &plain_grads, &fused, &fused_grads, vars.len());
}

/// Same loss within 1e-6 relative, every gradient within 1e-5 relative L2.
fn same(
    plain: &Tensor,
    plain_grads: &Gradients,
    other: &Tensor,
    other_grads: &Gradients,
    n: usize,
) {
    let (l1, l2) = (
        plain.to_scalar::<f32>().unwrap(),
        other.to_scalar::<f32>().unwrap(),
    );
    assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "loss {l1} vs {l2}");
    assert_eq!(other_grads.len(), n);
    for (name, g) in plain_grads.iter() {
        let h = other_grads.get(name).unwrap();
        let a = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let err: f32 = a
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        assert!(
            err <= 1e-5 * norm,
            "{name}: relative L2 error {}",
            err / norm
        );
    }
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    check(true, 0.0);
}

#[test]
fn checkpointed_gradients_replay_lora_dropout() {
    check(false, 0.3);
}

#[test]
fn checkpointed_gradients_chatglm1() {
    check_chatglm(1, 0.3);
}

#[test]
fn checkpointed_gradients_chatglm2() {
    check_chatglm(2, 0.3);
}
