//! Supervised fine-tuning with LoRA: the next-token loss over the response tokens.
//!
//! 1. Load the base model and tokenizer.
//! 2. Apply the `--checkpoint_dir` adapters and add (or resume) the trainable LoRA.
//! 3. Encode the datasets and hold out `--dev_ratio`.
//! 4. Train with the shared loop.
//! 5. Save the adapter, results and plots.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{apply_checkpoints, Lora, LoraConfig};
use llmtune_data::{collate, split_dev, CollateArgs, Example, Stage};
use llmtune_models::Llama;

use crate::args::TrainArgs;
use crate::error::{other, Result};
use crate::trainer::{train, Task};

struct SftTask<'a> {
    model: &'a Llama,
    lora: Lora,
    adapter: String,
    base_name: String,
    train: Vec<Example>,
    eval: Vec<Example>,
    collate: CollateArgs,
    device: Device,
}

/// Mean next-token cross-entropy over label tokens (`logits[:, :-1]` vs `labels[:, 1:]`).
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64], rows: usize, len: usize) -> Result<Tensor> {
    let v = logits.dim(2)?;
    let l = logits
        .narrow(1, 0, len - 1)?
        .reshape((rows * (len - 1), v))?;
    let mut shifted = Vec::with_capacity(rows * (len - 1));
    for r in 0..rows {
        shifted.extend_from_slice(&labels[r * len + 1..(r + 1) * len]);
    }
    let n = shifted.len();
    let labels_t = Tensor::from_vec(shifted, n, logits.device())?;
    let (sum, count) = llmtune_ops::cross_entropy_sum(&l, &labels_t)?;
    Ok((sum / count.max(1) as f64)?)
}

impl Task for SftTask<'_> {
    fn loss(&mut self, batch: &[usize], eval: bool) -> Result<(Tensor, u64)> {
        let set = if eval { &self.eval } else { &self.train };
        let rows: Vec<&Example> = batch.iter().map(|&i| &set[i]).collect();
        let b = collate(&rows, &self.collate).map_err(other)?;
        let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), &self.device)?;
        let mask = Tensor::from_vec(b.attention_mask.clone(), (b.rows, b.seq_len), &self.device)?;
        let (logits, _) = self
            .model
            .forward(&ids, Some(&mask), None, None)
            .map_err(other)?;
        let labels = b
            .labels
            .as_ref()
            .ok_or_else(|| other("SFT batch without labels"))?;
        let loss = causal_lm_loss(&logits.to_dtype(DType::F32)?, labels, b.rows, b.seq_len)?;
        let tokens = b.attention_mask.iter().map(|&m| m as u64).sum();
        Ok((loss, tokens))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.lora
            .save_peft(&self.adapter, dir, &self.base_name)
            .map_err(other)
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        self.lora
            .load_weights_into(&self.adapter, dir)
            .map_err(other)
    }

    fn set_training(&mut self, training: bool) {
        self.lora.set_training(training);
    }

    fn state(&self) -> serde_json::Value {
        let (seed, calls) = self.lora.dropout_state();
        serde_json::json!({"lora_dropout_seed": seed, "lora_dropout_calls": calls})
    }

    fn restore_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| other(format!("task_state.json: no {k}")))
        };
        self.lora
            .set_dropout_state(get("lora_dropout_seed")?, get("lora_dropout_calls")?);
        Ok(())
    }
}

/// `llmtune train --stage sft --do_train ...`
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    super::check_finetuning(args)?;
    let out = super::output_dir(args, true)?;
    let (mut p, base_name) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let dirs = args.checkpoint_dirs();
    let mut ck =
        apply_checkpoints(&mut p.model, &dirs, args.resume_lora_training, true).map_err(other)?;
    let cfg = LoraConfig::new(
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        &super::lora_target(args),
    )
    .map_err(other)?;
    let adapter = ck
        .ensure_trainable(&mut p.model, &cfg, args.seed)
        .map_err(other)?
        .to_string();
    ck.lora.set_dropout_seed(args.seed);
    ck.lora.set_training(true);
    let vars = ck.lora.trainable();
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "model {base_name} ({} layers), template {template}, LoRA r={} alpha={} on {}: {n_params} trainable parameters",
        p.model.cfg.num_hidden_layers,
        args.lora_rank,
        args.lora_alpha,
        super::lora_target(args)
    );
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Sft, false)?;
    eprintln!(
        "data: {} examples ({} prompts truncated, {} targets cut, {} dropped as over length)",
        prepared.examples.len(),
        prepared.stats.source_truncated,
        prepared.stats.target_truncated,
        prepared.stats.dropped_over_length
    );
    let (train_set, eval_set) =
        split_dev(prepared.examples, args.dev_ratio, args.seed).map_err(other)?;
    super::save_args(args, &out)?;
    let collate_args =
        CollateArgs::new(&p.tokenizer, args.ignore_pad_token_for_loss, false).map_err(other)?;
    let tcfg = super::trainer_config(args, &out)?;
    let (nt, ne) = (train_set.len(), eval_set.len());
    let mut task = SftTask {
        model: &p.model,
        lora: ck.lora.clone(),
        adapter,
        base_name,
        train: train_set,
        eval: eval_set,
        collate: collate_args,
        device: device.clone(),
    };
    let outcome = train(&tcfg, vars, &mut task, nt, ne)?;
    eprintln!(
        "done: {} steps in {:.1}s, train_loss {:.4}{}",
        outcome.global_step,
        outcome.runtime_secs,
        outcome.train_loss,
        outcome
            .eval_loss
            .map(|e| format!(", eval_loss {e:.4}"))
            .unwrap_or_default()
    );
    if args.plot_loss {
        crate::plot::plot_loss(&out, &["loss", "eval_loss"])?;
    }
    eprintln!("adapter saved to {}", out.display());
    Ok(())
}
