//! Batched generation on the fixture models: greedy outputs equal the reference token for
//! token, and a left-padded batch gives each row what it gives alone. The model runs on
//! `LLMTUNE_TEST_DEVICE` (default cpu; `cuda` needs `--features cuda`).

use std::path::PathBuf;

use candle_core::{DType, Device};

#[path = "../../../test-support/device.rs"]
mod device;
use device::test_device;
use llmtune_generate::{generate, FinishReason, GenerationConfig};
use llmtune_models::{config::LlamaConfig, loader, CausalLm, Llama};

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn ids(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn run(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let dir = dir.join(arch);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let model: CausalLm = Llama::load(
        &cfg,
        loader::open_dir(&dir).unwrap().as_ref(),
        DType::F32,
        &test_device(),
    )
    .unwrap()
    .into();
    let cases =
        candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let mut prompts = Vec::new();
    let mut expected = Vec::new();
    let mut g = 0;
    while let Some(p) = cases.get(&format!("gen.{g}.prompt_ids")) {
        prompts.push(ids(p));
        expected.push(ids(&cases[&format!("gen.{g}.generated_ids")]));
        g += 1;
    }
    assert!(g > 0);
    let gc = GenerationConfig {
        do_sample: false,
        max_new_tokens: 24,
        stop_ids: cfg.eos_token_ids.clone(),
        ..Default::default()
    };
    let pad = cfg.pad_token_id.unwrap_or(0);
    // Also a shortened prompt so the batch really needs left padding.
    let mut batch = prompts.clone();
    batch.push(prompts[0][..prompts[0].len() / 2].to_vec());
    let mut streamed = vec![Vec::new(); batch.len()];
    let out = generate(&model, &batch, pad, &gc, |row, tok| streamed[row].push(tok)).unwrap();
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&out[i].tokens, e, "{arch}: batched greedy row {i}");
        assert_eq!(
            out[i].tokens, streamed[i],
            "{arch}: streamed tokens of row {i}"
        );
        let stopped = e.last().map(|t| gc.stop_ids.contains(t)).unwrap_or(false);
        assert_eq!(out[i].finish == FinishReason::Stop, stopped);
    }
    let alone = generate(&model, &batch[batch.len() - 1..], pad, &gc, |_, _| {}).unwrap();
    assert_eq!(
        out[batch.len() - 1].tokens,
        alone[0].tokens,
        "{arch}: padded row equals the row alone"
    );
}

#[test]
fn llama_batched_greedy() {
    run("llama");
}

#[test]
fn qwen2_batched_greedy() {
    run("qwen2");
}
