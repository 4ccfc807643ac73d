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

/// Continuous batching: sequences of different prompt lengths join a running [`DecodeBatch`]
/// at different steps (those joining together prefilled as one left-padded batch) and leave after different numbers of tokens; every sequence's greedy
/// tokens equal `generate` on it alone and its logits stay within 1e-4 of decoding it alone.
fn continuous(arch: &str) {
    use llmtune_generate::DecodeBatch;
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
    let p0 = ids(&cases["gen.0.prompt_ids"]);
    let vocab = cfg.vocab_size as u32;
    // Prompts of lengths 1 .. 2x the fixture prompt; (prompt, join step, new tokens).
    let long: Vec<u32> = p0
        .iter()
        .chain(p0.iter())
        .map(|t| (t * 7 + 3) % vocab)
        .collect();
    let plan = [
        (p0.clone(), 0usize, 7usize),
        (p0[..p0.len() / 2].to_vec(), 1, 9),
        (long, 3, 4),
        (vec![p0[0]], 3, 6),
        (p0[1..].to_vec(), 8, 5),
    ];
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    // Alone: greedy tokens and per-token logits.
    let mut alone = Vec::new();
    for (p, _, n) in &plan {
        let (mut l, c) = DecodeBatch::prefill(&model, p).unwrap();
        let mut b = DecodeBatch::new(&model);
        b.join(&c, 1).unwrap();
        let (mut toks, mut logits) = (vec![], vec![]);
        loop {
            let t = argmax(&l);
            toks.push(t);
            logits.push(l.clone());
            if toks.len() == *n {
                break;
            }
            l = b.step(&model, &[t]).unwrap().remove(0);
        }
        let gc = GenerationConfig {
            do_sample: false,
            max_new_tokens: *n,
            ..Default::default()
        };
        let g = generate(&model, std::slice::from_ref(p), 0, &gc, |_, _| {}).unwrap();
        assert_eq!(
            g[0].tokens, toks,
            "{arch}: DecodeBatch alone equals generate"
        );
        alone.push((toks, logits));
    }
    // Together.
    let mut b = DecodeBatch::new(&model);
    let mut rows: Vec<(usize, u32)> = Vec::new(); // (sequence, next input)
    let mut got: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(vec![], vec![]); plan.len()];
    let mut worst = 0f32;
    let mut step = 0;
    while step < 64 {
        // Sequences joining at this step are prefilled together (left-padded).
        let joining: Vec<usize> = (0..plan.len()).filter(|&s| plan[s].1 == step).collect();
        if !joining.is_empty() {
            let prompts: Vec<&[u32]> = joining.iter().map(|&s| plan[s].0.as_slice()).collect();
            let pre = DecodeBatch::prefill_many(&model, &prompts).unwrap();
            let mut join = vec![];
            for (i, &s) in joining.iter().enumerate() {
                let l = pre.logits[i].clone();
                let t = argmax(&l);
                got[s].0.push(t);
                got[s].1.push(l);
                if got[s].0.len() < plan[s].2 {
                    join.push(i);
                    rows.push((s, t));
                }
            }
            b.join_rows(&pre, &join).unwrap();
        }
        if !rows.is_empty() {
            let inputs: Vec<u32> = rows.iter().map(|r| r.1).collect();
            let logits = b.step(&model, &inputs).unwrap();
            let mut keep = vec![];
            for (j, l) in logits.into_iter().enumerate() {
                let s = rows[j].0;
                let t = argmax(&l);
                got[s].0.push(t);
                got[s].1.push(l);
                rows[j].1 = t;
                keep.push(got[s].0.len() < plan[s].2);
            }
            b.retain(&keep).unwrap();
            rows = rows
                .into_iter()
                .zip(&keep)
                .filter(|x| *x.1)
                .map(|x| x.0)
                .collect();
            assert_eq!(b.len(), rows.len());
        }
        step += 1;
    }
    assert!(b.is_empty() && b.positions() == 0, "{arch}: batch empties");
    for (s, ((ta, la), (tg, lg))) in alone.iter().zip(&got).enumerate() {
        assert_eq!(ta, tg, "{arch}: sequence {s} tokens in the batch vs alone");
        for (x, y) in la.iter().zip(lg) {
            for (a, b) in x.iter().zip(y) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    eprintln!("{arch}: continuous batch vs alone, max |logit diff| = {worst:.3e}");
    assert!(worst < 1e-4, "{arch}: max |logit diff| {worst}");
}

#[test]
fn llama_continuous_batching() {
    continuous("llama");
}

#[test]
fn qwen2_continuous_batching() {
    continuous("qwen2");
}

/// Continuous batching on ChatGLM-6B (`LLMTUNE_FIXTURES` `chatglm1`): rows whose 2-D
/// positions and prefix masks come from each row's `[gMASK]`/`<sop>` layout join a running
/// batch at different steps (so caches are padded on the left under them) and still get the
/// logits (1e-4) and tokens each prompt gets alone, which equal `generate`'s.
#[test]
fn continuous_batching_chatglm1() {
    use llmtune_generate::DecodeBatch;
    let Some(dir) = fixtures() else { return };
    let dir = dir.join("chatglm1");
    let cfg = llmtune_models::ChatGlmConfig::from_file(&dir.join("config.json")).unwrap();
    let model: CausalLm = llmtune_models::ChatGlm::load(
        &cfg,
        loader::open_dir(&dir).unwrap().as_ref(),
        DType::F32,
        &test_device(),
    )
    .unwrap()
    .into();
    let (g, s) = (cfg.gmask_token_id, cfg.bos_token_id);
    // A long prompt joins last, so the running batch is padded under it too.
    let prompts: Vec<Vec<u32>> = vec![
        vec![10, 11, 12, 13, 14, g, s],
        vec![20, 21, g, s],
        vec![30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, g, s],
    ];
    let n = 5;
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    // Alone: tokens and logits per step; the tokens equal generate's.
    let mut alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![];
    for p in &prompts {
        let (mut l, c) = DecodeBatch::prefill(&model, p).unwrap();
        let mut b = DecodeBatch::new(&model);
        b.join(&c, 1).unwrap();
        let (mut toks, mut logits) = (vec![], vec![]);
        loop {
            toks.push(argmax(&l));
            logits.push(l.clone());
            if toks.len() == n {
                break;
            }
            l = b.step(&model, &[*toks.last().unwrap()]).unwrap().remove(0);
        }
        let gc = GenerationConfig {
            do_sample: false,
            max_new_tokens: n,
            ..Default::default()
        };
        let gen = generate(&model, std::slice::from_ref(p), 0, &gc, |_, _| {}).unwrap();
        assert_eq!(gen[0].tokens, toks, "DecodeBatch alone equals generate");
        alone.push((toks, logits));
    }
    // Together: prompt i joins at step i.
    let mut b = DecodeBatch::new(&model);
    let mut got: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(vec![], vec![]); prompts.len()];
    let mut rows: Vec<usize> = vec![];
    for step in 0..n + prompts.len() {
        if step < prompts.len() {
            let (l, c) = DecodeBatch::prefill(&model, &prompts[step]).unwrap();
            got[step].0.push(argmax(&l));
            got[step].1.push(l);
            b.join(&c, 1).unwrap();
            rows.push(step);
        }
        if rows.is_empty() {
            break;
        }
        let inputs: Vec<u32> = rows.iter().map(|&r| *got[r].0.last().unwrap()).collect();
        let logits = b.step(&model, &inputs).unwrap();
        let mut keep = vec![];
        for (j, l) in logits.into_iter().enumerate() {
            let r = rows[j];
            got[r].0.push(argmax(&l));
            got[r].1.push(l);
            keep.push(got[r].0.len() < n);
        }
        b.retain(&keep).unwrap();
        let mut k = keep.iter();
        rows.retain(|_| *k.next().unwrap());
    }
    let mut worst = 0f32;
    for (i, (a, c)) in alone.iter().zip(&got).enumerate() {
        assert_eq!(c.0, a.0, "prompt {i}: continuous batching vs alone");
        for (x, y) in a.1.iter().zip(&c.1) {
            for (u, v) in x.iter().zip(y) {
                worst = worst.max((u - v).abs());
            }
        }
    }
    assert!(
        worst <= 1e-4,
        "continuous vs alone logits differ by {worst}"
    );
}
