//! Parity with the original THUDM code on the fixture models `chatglm1` (ChatGLM-6B) and
//! `chatglm2` (ChatGLM2/3-6B), read from both `pytorch_model.bin` and `model.safetensors`
//! (fixture README_chatglm §3): derived and collator masks/positions (exact), logits and
//! hidden states at valid positions (max-abs 1e-4), the SFT loss (1e-5·max(1, |loss|)), left
//! padding, and greedy generation with a KV cache (scores 1e-4, ids exact, cached = uncached).
//!
//! Run with `LLMTUNE_FIXTURES=/work/shared/fixtures cargo test -p llmtune-models --test
//! chatglm_fixtures` (and with `fixtures-alt`); without the variable every test prints
//! `skipped` and passes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use llmtune_models::chatglm::{HiddenStates, RowLayout};
use llmtune_models::loader::{PthSource, SafetensorsSource, WeightSource};
use llmtune_models::{ChatGlm, ChatGlm2, ChatGlm2Config, ChatGlmConfig};

const TOL: f32 = 1e-4;

/// The two weight files of a fixture model.
const FORMATS: [&str; 2] = ["pytorch_model.bin", "model.safetensors"];

fn source(dir: &Path, file: &str) -> Box<dyn WeightSource> {
    let p = dir.join(file);
    if file.ends_with(".bin") {
        Box::new(PthSource::open_file(&p).unwrap())
    } else {
        Box::new(SafetensorsSource::open_file(&p).unwrap())
    }
}

fn fixture(arch: &str) -> Option<(PathBuf, HashMap<String, Tensor>)> {
    let dir = fixtures()?.join(arch);
    let c = cases(&dir);
    Some((dir, c))
}

fn i64_vec(t: &Tensor) -> Vec<i64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// Max-abs comparison (the fixture README's tolerance for logits and hidden states).
fn check(name: &str, ours: &Tensor, reference: &Tensor, valid: Option<&[bool]>) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let d = assert_close(name, &flat_f32(ours), &flat_f32(reference), valid, TOL, 0.0);
    eprintln!("{name}: max |diff| {d:.3e}");
    d
}

/// Mean token cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` (-100 ignored).
fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> f64 {
    let (b, t, v) = logits.dims3().unwrap();
    let l = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let y = labels.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let (sum, count) = llmtune_ops::cross_entropy_sum(&l, &y).unwrap();
    assert!(count > 0, "no label tokens");
    scalar(&sum) / count as f64
}

fn check_loss(name: &str, ours: f64, reference: &Tensor) {
    let r = scalar(reference);
    let d = (ours - r).abs();
    assert!(
        d <= 1e-5 * r.abs().max(1.0),
        "{name}: loss {ours} vs reference {r} (|diff| {d})"
    );
    eprintln!("{name}: loss {ours:.7} vs {r:.7} (|diff| {d:.3e})");
}

/// Compares the hidden-state stack `[L+1, b, t, h]` and the last hidden state.
fn check_hidden(
    name: &str,
    h: &HiddenStates,
    c: &HashMap<String, Tensor>,
    key: &str,
    valid: Option<&[bool]>,
) {
    let stack = &c[&format!("{key}.hidden_states")];
    assert_eq!(
        stack.dim(0).unwrap(),
        h.all.len(),
        "{name}: number of hidden states"
    );
    for (i, x) in h.all.iter().enumerate() {
        check(
            &format!("{name} {key}.hidden_states[{i}]"),
            x,
            &stack.get(i).unwrap(),
            valid,
        );
    }
    check(
        &format!("{name} {key}.last_hidden_state"),
        &h.last,
        &c[&format!("{key}.last_hidden_state")],
        valid,
    );
}

fn on_device(t: &Tensor) -> Tensor {
    t.to_device(&test_device()).unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
        .0 as u32
}

// ---------------------------------------------------------------------------------------
// ChatGLM-6B.

fn glm1(dir: &Path, file: &str) -> ChatGlm {
    let cfg = ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
    ChatGlm::load(&cfg, source(dir, file).as_ref(), DType::F32, &test_device()).unwrap()
}

#[test]
fn chatglm1_rotary_frequencies_are_fp16_rounded() {
    let Some((dir, c)) = fixture("chatglm1") else {
        return;
    };
    let cfg = ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.inv_freq(), flat_f32(&c["rope.inv_freq"]));
}

#[test]
fn chatglm1_masks_and_positions_match_the_original() {
    let Some((dir, c)) = fixture("chatglm1") else {
        return;
    };
    let model = glm1(&dir, FORMATS[1]);
    // Derived by the model from the ids alone.
    for key in ["single", "prompt"] {
        let (mask, pos) = model
            .masks_and_positions(&c[&format!("{key}.input_ids")], None)
            .unwrap();
        assert_eq!(
            i64_vec(&mask),
            i64_vec(&c[&format!("{key}.attention_mask")]),
            "{key} mask"
        );
        assert_eq!(
            i64_vec(&pos),
            i64_vec(&c[&format!("{key}.position_ids")]),
            "{key} positions"
        );
    }
    let ids = &c["batch.input_ids"];
    let (mask, pos) = model.masks_and_positions(ids, None).unwrap();
    assert_eq!(
        i64_vec(&mask),
        i64_vec(&c["batch.model_default.attention_mask"])
    );
    assert_eq!(
        i64_vec(&pos),
        i64_vec(&c["batch.model_default.position_ids"])
    );
    // The training collator's (left padding skipped).
    let valid = &c["batch.valid_mask"];
    let (mask, pos) = model.masks_and_positions(ids, Some(valid)).unwrap();
    assert_eq!(
        i64_vec(&mask),
        i64_vec(&c["batch.attention_mask"]),
        "collator mask"
    );
    assert_eq!(
        i64_vec(&pos),
        i64_vec(&c["batch.position_ids"]),
        "collator positions"
    );
    assert_eq!(
        i64_vec(&pos),
        i64_vec(&c["batch.tokenizer_pad.position_ids"]),
        "tokenizer positions"
    );
    // Generation: prompt positions, then [mask position, 2, 3, ...].
    let prompt = ids_vec(&c["generate.prompt_ids"]);
    let (_, pos) = model
        .masks_and_positions(&c["generate.prompt_ids"], None)
        .unwrap();
    assert_eq!(i64_vec(&pos), i64_vec(&c["generate.prompt_position_ids"]));
    let layout = RowLayout::from_ids(&prompt, 0, &model.cfg, 0).unwrap();
    let steps = &c["generate.step_position_ids"];
    let n = steps.dim(0).unwrap();
    let mut ours = Vec::new();
    for s in 0..n {
        let a = prompt.len() + s;
        ours.extend([layout.position(a), layout.block_position(a)]);
    }
    assert_eq!(ours, i64_vec(steps), "generation step positions");
}

#[test]
fn chatglm1_rows_without_sop_or_mask_are_refused() {
    let Some((dir, _)) = fixture("chatglm1") else {
        return;
    };
    let model = glm1(&dir, FORMATS[1]);
    let cfg = &model.cfg;
    let no_sop = Tensor::new(&[[5u32, 6, cfg.gmask_token_id]], &Device::Cpu).unwrap();
    let e = model.forward(&no_sop, None, None).unwrap_err().to_string();
    assert!(e.contains("row 0 has no <sop>"), "{e}");
    let no_mask = Tensor::new(&[[5u32, 6, cfg.bos_token_id]], &Device::Cpu).unwrap();
    let e = model.forward(&no_mask, None, None).unwrap_err().to_string();
    assert!(e.contains("no [gMASK]"), "{e}");
    let ids = Tensor::new(
        &[[5u32, cfg.gmask_token_id, cfg.bos_token_id]],
        &Device::Cpu,
    )
    .unwrap();
    let holed = Tensor::new(&[[1u32, 0, 1]], &Device::Cpu).unwrap();
    let e = model
        .forward(&ids, Some(&holed), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be left-padded"), "{e}");
}

/// Padding after a row's last token (DPO's and PPO's rows of unequal answers) changes no real
/// token's logits in a full pass; with a KV cache (decoding would attend it) it is refused.
#[test]
fn chatglm1_trailing_padding_leaves_the_real_tokens_alone() {
    let Some((dir, _)) = fixture("chatglm1") else {
        return;
    };
    let model = glm1(&dir, FORMATS[1]);
    let cfg = &model.cfg;
    let (g, sop, pad) = (cfg.gmask_token_id, cfg.bos_token_id, cfg.pad_token_id);
    let dev = Device::Cpu;
    let short = [5u32, 6, g, sop, 9];
    let long = [7u32, g, sop, 11, 12, 13, 14];
    // Row 0: 2 pads on the left and 1 after its last token; row 1: 1 pad on the left.
    let layout = [(&short[..], 2usize, 1usize), (&long[..], 1, 0)];
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (row, left, right) in layout {
        ids.extend(std::iter::repeat_n(pad, left));
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, right));
        mask.extend(std::iter::repeat_n(0u32, left));
        mask.extend(std::iter::repeat_n(1u32, row.len()));
        mask.extend(std::iter::repeat_n(0u32, right));
    }
    let ids = Tensor::from_vec(ids, (2, 8), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (2, 8), &dev).unwrap();
    let (batched, _) = model.forward(&ids, Some(&mask), None).unwrap();
    let alone = |row: &[u32]| -> Vec<Vec<f32>> {
        let t = Tensor::new(row, &dev).unwrap().unsqueeze(0).unwrap();
        let (l, _) = model.forward(&t, None, None).unwrap();
        l.squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let b: Vec<Vec<Vec<f32>>> = batched.to_dtype(DType::F32).unwrap().to_vec3().unwrap();
    let mut worst = 0f32;
    for (r, (row, start, _)) in layout.into_iter().enumerate() {
        for (j, want) in alone(row).iter().enumerate() {
            for (x, y) in b[r][start + j].iter().zip(want) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    eprintln!("chatglm1 trailing padding: max |diff| {worst:.3e}");
    assert!(worst <= TOL, "{worst}");
    let mut cache = model.new_cache();
    let e = model
        .forward(&ids, Some(&mask), Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be left-padded"), "{e}");
}

fn chatglm1_forward(file: &str) {
    let Some((dir, c)) = fixture("chatglm1") else {
        return;
    };
    let model = glm1(&dir, file);
    let (v, hs) = (model.cfg.vocab_size, model.cfg.hidden_size);
    let name = format!("chatglm1 ({file})");
    // Unpadded rows, mask and positions derived from the ids.
    for key in ["single", "prompt"] {
        let ids = on_device(&c[&format!("{key}.input_ids")]);
        let h = model.forward_hidden_states(&ids, None, None).unwrap();
        check_hidden(&name, &h, &c, key, None);
        let logits = model.logits(&h.last).unwrap();
        check(
            &format!("{name} {key}.logits"),
            &logits,
            &c[&format!("{key}.logits")],
            None,
        );
    }
    // Left-padded batch with the collator's mask and positions (derived from the padding).
    let ids = on_device(&c["batch.input_ids"]);
    let valid = on_device(&c["batch.valid_mask"]);
    let vl = valid_mask(&c["batch.valid_mask"], v);
    let vh = valid_mask(&c["batch.valid_mask"], hs);
    let h = model
        .forward_hidden_states(&ids, Some(&valid), None)
        .unwrap();
    check_hidden(&name, &h, &c, "batch", Some(&vh));
    let logits = model.logits(&h.last).unwrap();
    check(
        &format!("{name} batch.logits"),
        &logits,
        &c["batch.logits"],
        Some(&vl),
    );
    check_loss(
        &format!("{name} batch.loss"),
        causal_lm_loss(&logits, &c["batch.labels"]),
        &c["batch.loss"],
    );
    let (logits2, _) = model.forward(&ids, Some(&valid), None).unwrap();
    check(
        &format!("{name} forward = forward_hidden_states"),
        &logits2,
        &logits,
        None,
    );
    // The same with the original's explicit inputs: collator's and tokenizer's.
    for key in ["batch", "batch.tokenizer_pad"] {
        let h = model
            .forward_hidden_states_explicit(
                &ids,
                &c[&format!("{key}.attention_mask")],
                &c[&format!("{key}.position_ids")],
                None,
            )
            .unwrap();
        check(
            &format!("{name} {key} explicit logits"),
            &model.logits(&h.last).unwrap(),
            &c["batch.logits"],
            Some(&vl),
        );
    }
    // Without the padding mask the model treats the pads as prefix, as the original does.
    let (logits, _) = model.forward(&ids, None, None).unwrap();
    let d = check(
        &format!("{name} batch.model_default.logits"),
        &logits,
        &c["batch.model_default.logits"],
        Some(&vl),
    );
    assert!(d <= TOL);
    let diff = flat_f32(&logits)
        .iter()
        .zip(flat_f32(&c["batch.logits"]))
        .zip(&vl)
        .filter(|(_, &ok)| ok)
        .map(|((a, b), _)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-2, "padding must matter without the mask ({diff})");
}

#[test]
fn chatglm1_forward_matches_reference_bin() {
    chatglm1_forward(FORMATS[0]);
}

#[test]
fn chatglm1_forward_matches_reference_safetensors() {
    chatglm1_forward(FORMATS[1]);
}

/// Greedy decoding through the KV cache: step scores, ids, and cached = full recompute.
fn check_generation<F, G>(
    name: &str,
    c: &HashMap<String, Tensor>,
    eos: &[u32],
    mut cached: F,
    mut full: G,
) where
    F: FnMut(&Tensor, Option<&Tensor>) -> Tensor,
    G: FnMut(&Tensor) -> Tensor,
{
    let prompt = ids_vec(&c["generate.prompt_ids"]);
    let expected = ids_vec(&c["generate.output_ids"]);
    let scores = &c["generate.scores"];
    let steps = scores.dim(0).unwrap();
    let dev = test_device();
    let mut seq = prompt.clone();
    let mut input = Tensor::new(prompt.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut worst = 0f32;
    let mut worst_cache = 0f32;
    for s in 0..steps {
        let mask = Tensor::ones((1, seq.len()), DType::U32, &dev).unwrap();
        let l = cached(&input, Some(&mask));
        let lf = flat_f32(&l);
        worst = worst.max(assert_close(
            &format!("{name} step {s} scores"),
            &lf,
            &flat_f32(&scores.get(s).unwrap()),
            None,
            TOL,
            0.0,
        ));
        let all = Tensor::new(seq.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        worst_cache = worst_cache.max(assert_close(
            &format!("{name} step {s} cached vs uncached"),
            &lf,
            &flat_f32(&full(&all)),
            None,
            TOL,
            0.0,
        ));
        let tok = argmax(&lf);
        assert!(
            !eos.contains(&tok),
            "{name}: the fixture's generation has no eos"
        );
        seq.push(tok);
        input = Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap();
    }
    assert_eq!(seq, expected, "{name}: greedy ids");
    eprintln!(
        "{name}: {steps} greedy tokens equal; scores max |diff| {worst:.3e}; cached vs \
         uncached {worst_cache:.3e}"
    );
}

fn chatglm1_generation(file: &str) {
    let Some((dir, c)) = fixture("chatglm1") else {
        return;
    };
    let model = glm1(&dir, file);
    let mut cache = model.new_cache();
    check_generation(
        &format!("chatglm1 ({file})"),
        &c,
        &[model.cfg.eos_token_id],
        |ids, mask| model.forward_last(ids, mask, Some(&mut cache)).unwrap(),
        |ids| model.forward_last(ids, None, None).unwrap(),
    );
}

#[test]
fn chatglm1_greedy_generation_matches_reference_bin() {
    chatglm1_generation(FORMATS[0]);
}

#[test]
fn chatglm1_greedy_generation_matches_reference_safetensors() {
    chatglm1_generation(FORMATS[1]);
}

// ---------------------------------------------------------------------------------------
// ChatGLM2/3-6B.

fn glm2(dir: &Path, file: &str) -> ChatGlm2 {
    let cfg = ChatGlm2Config::from_file(&dir.join("config.json")).unwrap();
    ChatGlm2::load(&cfg, source(dir, file).as_ref(), DType::F32, &test_device()).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2().unwrap()
}

#[test]
fn chatglm2_rotary_table_matches_reference() {
    let Some((dir, c)) = fixture("chatglm2") else {
        return;
    };
    let cfg = ChatGlm2Config::from_file(&dir.join("config.json")).unwrap();
    let model = ChatGlm2::load(
        &cfg,
        source(&dir, FORMATS[1]).as_ref(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let table = &c["rope.cache"]; // [seq_length, kv_channels/4, 2]
    let n = table.dim(0).unwrap();
    assert_eq!(n, cfg.seq_length);
    let (cos, sin) = model.cos_sin(&[(0..n as i64).collect()]).unwrap();
    let cos_ref = table
        .narrow(2, 0, 1)
        .unwrap()
        .squeeze(2)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let sin_ref = table
        .narrow(2, 1, 1)
        .unwrap()
        .squeeze(2)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // Angles up to seq_length rad: f32 rounding of the angle alone is ~1e-5.
    check("chatglm2 rope cos", &cos, &cos_ref, None);
    check("chatglm2 rope sin", &sin, &sin_ref, None);
}

#[test]
fn chatglm2_masks_match_the_original() {
    let Some((dir, c)) = fixture("chatglm2") else {
        return;
    };
    let model = glm2(&dir, FORMATS[1]);
    let pad = &c["batch.attention_mask"];
    let (b, t) = pad.dims2().unwrap();
    let ctx = model.layer_context(b, t, 0, Some(pad), None).unwrap();
    let ours: Vec<i64> = flat_f32(&ctx.mask)
        .iter()
        .map(|&x| (x < -1e30) as i64)
        .collect();
    assert_eq!(ours, i64_vec(&c["batch.full_attention_mask"]));
    assert_eq!(
        i64_vec(pad),
        i64_vec(&c["batch.tokenizer_pad.attention_mask"])
    );
    assert_eq!(
        i64_vec(&c["batch.position_ids"]),
        i64_vec(&c["batch.tokenizer_pad.position_ids"])
    );
    let arange: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
    assert_eq!(i64_vec(&c["batch.model_default.position_ids"]), arange);
}

fn chatglm2_forward(file: &str) {
    let Some((dir, c)) = fixture("chatglm2") else {
        return;
    };
    let model = glm2(&dir, file);
    let (v, hs) = (model.cfg.padded_vocab_size, model.cfg.hidden_size);
    let name = format!("chatglm2 ({file})");
    for key in ["single", "prompt"] {
        let ids = on_device(&c[&format!("{key}.input_ids")]);
        let h = model.forward_hidden_states(&ids, None, None, None).unwrap();
        check_hidden(&name, &h, &c, key, None);
        let logits = model.logits(&h.last).unwrap();
        check(
            &format!("{name} {key}.logits"),
            &logits,
            &c[&format!("{key}.logits")],
            None,
        );
        // Explicit arange positions are the default.
        let pos = rows(&c[&format!("{key}.position_ids")]);
        let (logits2, _) = model.forward(&ids, None, Some(&pos), None).unwrap();
        check(
            &format!("{name} {key} explicit positions"),
            &logits2,
            &logits,
            None,
        );
    }
    let ids = on_device(&c["batch.input_ids"]);
    let mask = on_device(&c["batch.attention_mask"]);
    let vl = valid_mask(&c["batch.valid_mask"], v);
    let vh = valid_mask(&c["batch.valid_mask"], hs);
    let pos = rows(&c["batch.position_ids"]);
    let h = model
        .forward_hidden_states(&ids, Some(&mask), Some(&pos), None)
        .unwrap();
    check_hidden(&name, &h, &c, "batch", Some(&vh));
    let logits = model.logits(&h.last).unwrap();
    check(
        &format!("{name} batch.logits"),
        &logits,
        &c["batch.logits"],
        Some(&vl),
    );
    check_loss(
        &format!("{name} batch.loss"),
        causal_lm_loss(&logits, &c["batch.labels"]),
        &c["batch.loss"],
    );
    // Positions derived by the model (arange over the padded row).
    let (logits, _) = model.forward(&ids, Some(&mask), None, None).unwrap();
    check(
        &format!("{name} batch.model_default.logits"),
        &logits,
        &c["batch.model_default.logits"],
        Some(&vl),
    );
}

#[test]
fn chatglm2_forward_matches_reference_bin() {
    chatglm2_forward(FORMATS[0]);
}

#[test]
fn chatglm2_forward_matches_reference_safetensors() {
    chatglm2_forward(FORMATS[1]);
}

fn chatglm2_generation(file: &str) {
    let Some((dir, c)) = fixture("chatglm2") else {
        return;
    };
    let model = glm2(&dir, file);
    // Positions of the first step and of each later token are the arange index.
    let prompt_len = c["generate.prompt_ids"].dim(1).unwrap() as i64;
    let arange: Vec<i64> = (0..prompt_len).collect();
    assert_eq!(i64_vec(&c["generate.prompt_position_ids"]), arange);
    let steps: Vec<i64> =
        (prompt_len..prompt_len + c["generate.step_position_ids"].dim(0).unwrap() as i64).collect();
    assert_eq!(i64_vec(&c["generate.step_position_ids"]), steps);
    let mut cache = model.new_cache();
    check_generation(
        &format!("chatglm2 ({file})"),
        &c,
        &model.cfg.eos_token_ids(),
        |ids, mask| model.forward_last(ids, mask, Some(&mut cache)).unwrap(),
        |ids| model.forward_last(ids, None, None).unwrap(),
    );
}

#[test]
fn chatglm2_greedy_generation_matches_reference_bin() {
    chatglm2_generation(FORMATS[0]);
}

#[test]
fn chatglm2_greedy_generation_matches_reference_safetensors() {
    chatglm2_generation(FORMATS[1]);
}

#[test]
fn configs_refuse_unsupported_settings() {
    let e = ChatGlmConfig::from_json_str(r#"{"position_encoding_2d": false}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("position_encoding_2d false is not supported"),
        "{e}"
    );
    let e = ChatGlmConfig::from_json_str(r#"{"quantization_bit": 4}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantization_bit 4"), "{e}");
    let e = ChatGlm2Config::from_json_str(r#"{"multi_query_attention": false}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("multi_query_attention false is not supported"),
        "{e}"
    );
    // Defaults are the released models'.
    let c = ChatGlm2Config::from_json_str(
        r#"{"multi_query_attention": true, "multi_query_group_num": 2}"#,
    )
    .unwrap();
    assert_eq!(
        (c.hidden_size, c.kv_channels, c.num_layers),
        (4096, 128, 28)
    );
    assert_eq!(c.qkv_size(), 4608);
    let c = ChatGlmConfig::from_json_str("{}").unwrap();
    assert_eq!(
        (c.bos_token_id, c.gmask_token_id, c.inner_hidden_size),
        (130004, 130001, 16384)
    );
    assert_eq!(c.inv_freq().len(), 32);
}

/// A sharded `.bin` checkpoint with `pytorch_model.bin.index.json`: the two fixture
/// checkpoints have disjoint tensor names, so they serve as two shards of one folder from
/// which both models load (each reading only its own tensors) and give the fixture logits.
#[test]
fn sharded_pytorch_bin_with_index_loads_both_models() {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("llmtune-glm-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut map = serde_json::Map::new();
    for (i, arch) in ["chatglm1", "chatglm2"].iter().enumerate() {
        let file = format!("pytorch_model-0000{}-of-00002.bin", i + 1);
        std::fs::copy(fx.join(arch).join("pytorch_model.bin"), dir.join(&file)).unwrap();
        for name in source(&fx.join(arch), FORMATS[0]).names() {
            map.insert(name, serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("pytorch_model.bin.index.json"), index.to_string()).unwrap();
    let src = llmtune_models::loader::open_dir(&dir).unwrap();
    assert_eq!(src.names().len(), map.len());
    let (c1, c2) = (cases(&fx.join("chatglm1")), cases(&fx.join("chatglm2")));
    let cfg1 = ChatGlmConfig::from_file(&fx.join("chatglm1/config.json")).unwrap();
    let m1 = ChatGlm::load(&cfg1, src.as_ref(), DType::F32, &test_device()).unwrap();
    let (l1, _) = m1
        .forward(&on_device(&c1["single.input_ids"]), None, None)
        .unwrap();
    check(
        "chatglm1 from shards: single.logits",
        &l1,
        &c1["single.logits"],
        None,
    );
    let cfg2 = ChatGlm2Config::from_file(&fx.join("chatglm2/config.json")).unwrap();
    let m2 = ChatGlm2::load(&cfg2, src.as_ref(), DType::F32, &test_device()).unwrap();
    let (l2, _) = m2
        .forward(&on_device(&c2["single.input_ids"]), None, None, None)
        .unwrap();
    check(
        "chatglm2 from shards: single.logits",
        &l2,
        &c2["single.logits"],
        None,
    );
    // An index that names the wrong shard is refused with the tensor and file named.
    let mut bad = map.clone();
    bad.insert(
        "lm_head.weight".into(),
        serde_json::Value::String("pytorch_model-00002-of-00002.bin".into()),
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": bad});
    std::fs::write(dir.join("pytorch_model.bin.index.json"), index.to_string()).unwrap();
    let e = llmtune_models::loader::open_dir(&dir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tensor lm_head.weight in pytorch_model-00002-of-00002.bin"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bf16 model runs and stays close to the f32 reference (weights converted tensor by
/// tensor while loading).
#[test]
fn chatglm_models_run_in_bf16() {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join("chatglm1");
    let c = cases(&dir);
    let cfg = ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
    let m = ChatGlm::load(
        &cfg,
        source(&dir, FORMATS[0]).as_ref(),
        DType::BF16,
        &test_device(),
    )
    .unwrap();
    assert_eq!(m.word_embeddings.dtype(), DType::BF16);
    let l = m
        .forward_last(&on_device(&c["single.input_ids"]), None, None)
        .unwrap();
    let r = c["single.logits"].get(0).unwrap();
    let t = r.dim(0).unwrap();
    let r = r.get(t - 1).unwrap();
    let d = assert_close(
        "chatglm1 bf16 last logits",
        &flat_f32(&l),
        &flat_f32(&r),
        None,
        0.5,
        0.05,
    );
    eprintln!("chatglm1 bf16 vs f32 reference: max |diff| {d:.3e}");
    let dir = fx.join("chatglm2");
    let c = cases(&dir);
    let cfg = ChatGlm2Config::from_file(&dir.join("config.json")).unwrap();
    let m = ChatGlm2::load(
        &cfg,
        source(&dir, FORMATS[1]).as_ref(),
        DType::BF16,
        &test_device(),
    )
    .unwrap();
    let l = m
        .forward_last(&on_device(&c["single.input_ids"]), None, None)
        .unwrap();
    let r = c["single.logits"].get(0).unwrap();
    let t = r.dim(0).unwrap();
    let r = r.get(t - 1).unwrap();
    let d = assert_close(
        "chatglm2 bf16 last logits",
        &flat_f32(&l),
        &flat_f32(&r),
        None,
        0.5,
        0.05,
    );
    eprintln!("chatglm2 bf16 vs f32 reference: max |diff| {d:.3e}");
}

/// The prompts of the fixture's batch rows (v1: `source [gMASK] <sop>`; v2: `[gMASK] sop
/// source`), from `cases.json`.
fn batch_prompts(dir: &Path) -> Vec<Vec<u32>> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]["batch"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let full = ids(&r["input_ids"]);
            let target = ids(&r["target_ids"]);
            // Drop the target and the closing eos.
            full[..full.len() - target.len() - 1].to_vec()
        })
        .collect()
}

/// Greedy decoding of a left-padded batch through the KV cache gives, row by row, the
/// logits of decoding each row alone.
fn check_batched_generation<F>(
    name: &str,
    prompts: &[Vec<u32>],
    pad: u32,
    steps: usize,
    mut step: F,
) where
    F: FnMut(&Tensor, &Tensor, bool) -> Tensor,
{
    let dev = test_device();
    let b = prompts.len();
    let width = prompts.iter().map(|p| p.len()).max().unwrap();
    // Each row alone.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    for p in prompts {
        let mut out = Vec::new();
        let mut input = Tensor::new(p.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for s in 0..steps {
            let mask = Tensor::ones((1, p.len() + s), DType::U32, &dev).unwrap();
            let l = flat_f32(&step(&input, &mask, s == 0));
            let tok = argmax(&l);
            out.push(l);
            input = Tensor::new(&[[tok]], &dev).unwrap();
        }
        alone.push(out);
    }
    // Left-padded together.
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for p in prompts {
        let n = width - p.len();
        ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, n).chain(std::iter::repeat_n(1, p.len())));
    }
    let mut input = Tensor::from_vec(ids, (b, width), &dev).unwrap();
    let mut mask = Tensor::from_vec(mask, (b, width), &dev).unwrap();
    let mut worst = 0f32;
    for s in 0..steps {
        let l = step(&input, &mask, s == 0);
        let mut next = Vec::new();
        for (r, row) in alone.iter().enumerate() {
            let ours = flat_f32(&l.get(r).unwrap());
            worst = worst.max(assert_close(
                &format!("{name} row {r} step {s}: batched vs alone"),
                &ours,
                &row[s],
                None,
                TOL,
                0.0,
            ));
            next.push(argmax(&ours));
        }
        input = Tensor::from_vec(next, (b, 1), &dev).unwrap();
        let ones = Tensor::ones((b, 1), DType::U32, &dev).unwrap();
        mask = Tensor::cat(&[&mask, &ones], 1).unwrap();
    }
    eprintln!("{name}: left-padded batched decoding = row by row (max |diff| {worst:.3e})");
}

#[test]
fn chatglm_batched_left_padded_generation_equals_rows_alone() {
    let Some(fx) = fixtures() else {
        return;
    };
    let dir = fx.join("chatglm1");
    let m1 = glm1(&dir, FORMATS[1]);
    let prompts = batch_prompts(&dir);
    assert!(prompts
        .iter()
        .all(|p| p.ends_with(&[m1.cfg.gmask_token_id, m1.cfg.bos_token_id])));
    let mut cache = m1.new_cache();
    check_batched_generation(
        "chatglm1",
        &prompts,
        m1.cfg.pad_token_id,
        4,
        |ids, mask, first| {
            if first {
                cache = m1.new_cache();
            }
            m1.forward_last(ids, Some(mask), Some(&mut cache)).unwrap()
        },
    );
    let dir = fx.join("chatglm2");
    let m2 = glm2(&dir, FORMATS[1]);
    let prompts = batch_prompts(&dir);
    let mut cache = m2.new_cache();
    let pad = m2.cfg.pad_token_id.unwrap_or(0);
    check_batched_generation("chatglm2", &prompts, pad, 4, |ids, mask, first| {
        if first {
            cache = m2.new_cache();
        }
        m2.forward_last(ids, Some(mask), Some(&mut cache)).unwrap()
    });
}
