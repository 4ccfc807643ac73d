//! `--stage sft --do_predict --predict_with_generate`: sample a reply for every test prompt
//! with the `--checkpoint_dir` adapters merged, write `generated_predictions.jsonl` and score
//! it with BLEU-4 and ROUGE-1/2/L exactly as the Python reference does.
//!
//! With several ranks, each generates a contiguous run of the batches (the same batches, with
//! the same per-batch seeds, as one process), rank 0 gathers them in rank order, which is
//! input order, and alone writes the file and the scores.

use std::io::Write;
use std::time::Instant;

use candle_core::Device;
use llmtune_data::{Example, Stage};
use llmtune_generate::{generate, GenerationConfig};

use crate::args::TrainArgs;
use crate::error::{other, Error, Result};
use crate::state::{f64_value, save_metrics, speed_metrics};

/// Runs prediction and scoring.
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    let out = super::output_dir(args, false)?;
    let (mut p, _) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let mut ck = super::apply_checkpoint_dirs(args, &mut p.model, false)?;
    // Inference: fold every adapter into the base weights (no per-token adapter cost).
    ck.lora.merge_all(&mut p.model).map_err(other)?;
    super::quantize_base(args, &mut p.model)?;
    let prepared = super::prepare(args, &p.tokenizer, template.clone(), Stage::Sft, true)?;
    let rt = prepared.template.resolve(&p.tokenizer).map_err(other)?;
    let prompts: Vec<(Vec<u32>, Vec<u32>)> = prepared
        .examples
        .into_iter()
        .map(|e| match e {
            Example::Prompt(p) => Ok((p.input_ids, p.target_ids)),
            _ => Err(Error::InvalidArgument(
                "predict needs prompt encodings".into(),
            )),
        })
        .collect::<Result<_>>()?;
    let max_new = args
        .max_new_tokens
        .or(args.generation_max_length)
        .unwrap_or(args.max_target_length + 1);
    let gcfg = GenerationConfig {
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        max_new_tokens: max_new,
        stop_ids: rt.stop_ids().to_vec(),
        seed: args.seed,
        vocab_size: p.model.is_chatglm().then(|| p.tokenizer.vocab_size()),
    };
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    let bs = args.per_device_eval_batch_size.max(1);
    let t0 = Instant::now();
    let world = crate::dist::world();
    let n_batches = prompts.len().div_ceil(bs);
    let (first, last) = llmtune_dist::shard_range(n_batches, world.rank(), world.world_size());
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(prompts.len());
    let mut steps = 0u64;
    for (bi, chunk) in prompts.chunks(bs).enumerate() {
        if bi < first || bi >= last {
            continue;
        }
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|(i, _)| i.clone()).collect();
        let cfg = GenerationConfig {
            seed: args.seed.wrapping_add(bi as u64),
            ..gcfg.clone()
        };
        let gen = generate(&p.model, &inputs, pad, &cfg, |_, _| {}).map_err(other)?;
        for (g, (_, label)) in gen.iter().zip(chunk) {
            let pred = p
                .tokenizer
                .decode(g.content_tokens(), true)
                .map_err(other)?;
            let lab = p.tokenizer.decode(label, true).map_err(other)?;
            pairs.push((pred, lab));
        }
        steps += 1;
        if world.world_size() > 1 {
            eprintln!(
                "predict (rank {}): {}/{} of its samples",
                world.rank(),
                pairs.len(),
                prompts[(first * bs).min(prompts.len())..(last * bs).min(prompts.len())].len()
            );
        } else {
            eprintln!("predict: {}/{} samples", pairs.len(), prompts.len());
        }
    }
    if world.world_size() > 1 {
        pairs = gather_pairs(&pairs)?;
        steps = n_batches as u64;
        if !crate::dist::is_main() {
            world.barrier()?;
            return Ok(());
        }
    }
    let runtime = t0.elapsed().as_secs_f64();
    // generated_predictions.jsonl: {"label", "predict"} per line, input order, UTF-8 unescaped.
    let mut text = Vec::new();
    for (pred, lab) in &pairs {
        let line = serde_json::json!({"label": lab, "predict": pred});
        writeln!(text, "{line}")
            .map_err(|e| Error::io_public("write", out.join("generated_predictions.jsonl"), e))?;
    }
    crate::io::atomic_write(&out.join("generated_predictions.jsonl"), &text)?;
    let summary = llmtune_metrics::score_corpus(&pairs);
    let mut m = speed_metrics("predict", runtime, Some(pairs.len() as u64), Some(steps));
    if let serde_json::Value::Object(scores) = llmtune_metrics::summary_json(&summary, "predict") {
        for (k, v) in scores {
            m.insert(k, v);
        }
    }
    m.insert("predict_samples".into(), f64_value(pairs.len() as f64));
    save_metrics(&out, "predict", &m)?;
    println!("{summary}");
    eprintln!("predictions and scores written to {}", out.display());
    world.barrier()?;
    Ok(())
}

/// Every rank's `(predict, label)` pairs, concatenated in rank order.
fn gather_pairs(mine: &[(String, String)]) -> Result<Vec<(String, String)>> {
    let bytes = serde_json::to_vec(mine).map_err(|e| other(format!("predictions: {e}")))?;
    let mut all = Vec::new();
    for (r, b) in crate::dist::world()
        .all_gather_bytes(&bytes)?
        .into_iter()
        .enumerate()
    {
        let part: Vec<(String, String)> = serde_json::from_slice(&b)
            .map_err(|e| other(format!("predictions from rank {r}: {e}")))?;
        all.extend(part);
    }
    Ok(all)
}
