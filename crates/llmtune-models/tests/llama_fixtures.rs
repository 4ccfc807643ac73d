//! Parity with the Python reference (transformers) on the fixture models `llama` and `qwen2`:
//! logits, hidden states, left padding and greedy generation. Tolerances from the fixture
//! README: logits/hidden `1e-4 + 1e-4·|b|`; token ids exact. The model runs on
//! `LLMTUNE_TEST_DEVICE` (default cpu; `cuda` needs `--features cuda`), in f32 on both, with
//! the same tolerances; the reference tensors are read on the CPU.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use llmtune_models::{config::LlamaConfig, loader, Llama};

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

fn load(
    arch: &str,
) -> Option<(
    Llama,
    std::collections::HashMap<String, Tensor>,
    std::path::PathBuf,
)> {
    let dir = fixtures()?.join(arch);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let src = loader::open_dir(&dir).unwrap();
    let model = Llama::load(&cfg, src.as_ref(), DType::F32, &test_device()).unwrap();
    Some((model, cases(&dir), dir))
}

fn check_forward(arch: &str) {
    let Some((model, c, _)) = load(arch) else {
        return;
    };
    let ids = &c["forward.input_ids"];
    let mask = &c["forward.attention_mask"];
    let (b, t) = ids.dims2().unwrap();
    let v = model.cfg.vocab_size;
    let h = model.cfg.hidden_size;
    // Right-padded batch, position ids 0..T-1 for every row (as the reference).
    let pos: Vec<Vec<i64>> = vec![(0..t as i64).collect(); b];
    let (logits, hidden) = model.forward(ids, Some(mask), Some(&pos), None).unwrap();
    let d = assert_close(
        &format!("{arch} logits"),
        &flat_f32(&logits),
        &flat_f32(&c["forward.logits"]),
        Some(&valid_mask(mask, v)),
        ATOL,
        RTOL,
    );
    eprintln!("{arch}: forward logits max |diff| {d:.3e}");
    assert_close(
        &format!("{arch} final_hidden"),
        &flat_f32(&hidden),
        &flat_f32(&c["forward.final_hidden"]),
        Some(&valid_mask(mask, h)),
        ATOL,
        RTOL,
    );
    // Per-layer residual streams.
    let layers = model.forward_layers(ids, Some(mask)).unwrap();
    let reference = &c["forward.layer_outputs"];
    assert_eq!(reference.dim(0).unwrap(), layers.len());
    for (i, l) in layers.iter().enumerate() {
        assert_close(
            &format!("{arch} layer {i}"),
            &flat_f32(l),
            &flat_f32(&reference.get(i).unwrap()),
            Some(&valid_mask(mask, h)),
            ATOL,
            RTOL,
        );
    }
    // Left-padded batch, positions from the mask.
    let lids = &c["forward.left.input_ids"];
    let lmask = &c["forward.left.attention_mask"];
    let lpos: Vec<Vec<i64>> = c["forward.left.position_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (llogits, _) = model.forward(lids, Some(lmask), None, None).unwrap();
    let d = assert_close(
        &format!("{arch} left logits"),
        &flat_f32(&llogits),
        &flat_f32(&c["forward.left.logits"]),
        Some(&valid_mask(lmask, v)),
        ATOL,
        RTOL,
    );
    eprintln!("{arch}: left-padded logits max |diff| {d:.3e}");
    // Explicit position ids give the same result.
    let (llogits2, _) = model.forward(lids, Some(lmask), Some(&lpos), None).unwrap();
    assert_close(
        &format!("{arch} left logits (explicit positions)"),
        &flat_f32(&llogits2),
        &flat_f32(&c["forward.left.logits"]),
        Some(&valid_mask(lmask, v)),
        ATOL,
        RTOL,
    );
}

fn check_generation(arch: &str) {
    let Some((model, c, dir)) = load(arch) else {
        return;
    };
    let gen_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    let stop: Vec<u32> = match &gen_cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        x => vec![x.as_u64().unwrap() as u32],
    };
    let mut g = 0;
    while let Some(prompt) = c.get(&format!("gen.{g}.prompt_ids")) {
        let prompt = ids_vec(prompt);
        let expected = ids_vec(&c[&format!("gen.{g}.generated_ids")]);
        // Step logits through the KV-cache path, token by token.
        let mut cache = model.new_cache();
        let mut input = Tensor::new(prompt.as_slice(), model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let step_ref = &c[&format!("gen.{g}.step_logits")];
        let mut produced = Vec::new();
        for step in 0..expected.len() {
            let total = prompt.len() + step;
            let mask = Tensor::ones((1, total), DType::U32, model.device()).unwrap();
            let logits = model
                .forward_last(&input, Some(&mask), Some(&mut cache))
                .unwrap();
            let l = flat_f32(&logits);
            assert_close(
                &format!("{arch} gen {g} step {step} logits"),
                &l,
                &flat_f32(&step_ref.get(step).unwrap()),
                None,
                ATOL,
                RTOL,
            );
            if step == 0 {
                assert_close(
                    &format!("{arch} gen {g} first logits"),
                    &l,
                    &flat_f32(&c[&format!("gen.{g}.first_logits")]),
                    None,
                    ATOL,
                    RTOL,
                );
            }
            let tok = l
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
                .0 as u32;
            produced.push(tok);
            if stop.contains(&tok) {
                break;
            }
            input = Tensor::new(&[tok], model.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
        assert_eq!(produced, expected, "{arch} gen {g}: greedy tokens");
        eprintln!("{arch}: gen {g}: {} tokens equal", produced.len());
        g += 1;
    }
    assert!(g > 0, "no generation cases in {}", dir.display());
}

#[test]
fn llama_forward_matches_reference() {
    check_forward("llama");
}

#[test]
fn qwen2_forward_matches_reference() {
    check_forward("qwen2");
}

#[test]
fn llama_greedy_generation_matches_reference() {
    check_generation("llama");
}

#[test]
fn qwen2_greedy_generation_matches_reference() {
    check_generation("qwen2");
}
