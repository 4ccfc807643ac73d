//! Supervised fine-tuning (LoRA, freeze or full): the next-token loss over the response tokens.
//!
//! 1. Load the base model and tokenizer.
//! 2. Apply the `--checkpoint_dir` adapters and add (or resume) the trainable LoRA.
//! 3. Encode the datasets and hold out `--dev_ratio`.
//! 4. Train with the shared loop.
//! 5. Save the adapter, results and plots.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use llmtune_adapters::{Lora, ModuleGroup};
use llmtune_data::{collate, CollateArgs, Example, Stage};
use llmtune_models::CausalLm;

use crate::args::{FinetuningType, TrainArgs};
use crate::checkpointing::checkpointed_grads;
use crate::error::{other, Result};
use crate::optim::Gradients;
use crate::trainer::{plain_loss_and_grads, train, Task};

/// What the run trains.
enum Trained {
    /// A LoRA adapter (saved in PEFT's layout).
    Lora { lora: Lora, adapter: String },
    /// Base tensors (`freeze`, `full`), saved as `model.safetensors`.
    Params(Vec<(String, Var)>),
}

struct SftTask<'a> {
    model: &'a CausalLm,
    trained: Trained,
    base_name: String,
    train: Vec<Example>,
    eval: Vec<Example>,
    collate: CollateArgs,
    device: Device,
    /// `--gradient_checkpointing`: recompute each layer in the backward pass.
    checkpointing: bool,
}

impl SftTask<'_> {
    fn batch(&self, batch: &[usize], eval: bool) -> Result<(Tensor, Tensor, llmtune_data::Batch)> {
        let set = if eval { &self.eval } else { &self.train };
        let rows: Vec<&Example> = batch.iter().map(|&i| &set[i]).collect();
        let b = collate(&rows, &self.collate).map_err(other)?;
        let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), &self.device)?;
        let mask = Tensor::from_vec(b.attention_mask.clone(), (b.rows, b.seq_len), &self.device)?;
        Ok((ids, mask, b))
    }
}

/// `labels[:, 1:]` of a `[rows, len]` batch, flattened: the next-token targets.
fn shifted_labels(labels: &[i64], rows: usize, len: usize, device: &Device) -> Result<Tensor> {
    let mut shifted = Vec::with_capacity(rows * (len - 1));
    for r in 0..rows {
        shifted.extend_from_slice(&labels[r * len + 1..(r + 1) * len]);
    }
    let n = shifted.len();
    Ok(Tensor::from_vec(shifted, n, device)?)
}

/// Mean next-token cross-entropy over label tokens (`logits[:, :-1]` vs `labels[:, 1:]`).
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64], rows: usize, len: usize) -> Result<Tensor> {
    let v = logits.dim(2)?;
    let l = logits
        .narrow(1, 0, len - 1)?
        .reshape((rows * (len - 1), v))?;
    let labels_t = shifted_labels(labels, rows, len, logits.device())?;
    let (sum, count) = llmtune_ops::cross_entropy_sum(&l, &labels_t)?;
    Ok((sum / count.max(1) as f64)?)
}

/// [`causal_lm_loss`] from the final hidden states `[rows, len, hidden]`. When the LM head is a
/// plain linear (no adapter on it), head and loss are fused
/// ([`llmtune_ops::linear_cross_entropy_sum`]): no `[tokens, vocab]` logits stay in the graph
/// and none are computed for ignored (prompt) tokens. Same value and gradients.
pub fn causal_lm_loss_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    labels: &[i64],
    rows: usize,
    len: usize,
) -> Result<Tensor> {
    let Some(w) = model.plain_lm_head() else {
        let logits = model.logits(hidden).map_err(other)?.to_dtype(DType::F32)?;
        return causal_lm_loss(&logits, labels, rows, len);
    };
    let d = hidden.dim(2)?;
    let h = hidden
        .narrow(1, 0, len - 1)?
        .reshape((rows * (len - 1), d))?;
    let labels_t = shifted_labels(labels, rows, len, hidden.device())?;
    let (sum, count) = llmtune_ops::linear_cross_entropy_sum(&h, w, &labels_t)?;
    Ok((sum / count.max(1) as f64)?)
}

impl Task for SftTask<'_> {
    fn loss_and_grads(
        &mut self,
        batch: &[usize],
        scale: f64,
        vars: &[(String, Var)],
    ) -> Result<(f64, u64, Option<Gradients>)> {
        if !self.checkpointing {
            return plain_loss_and_grads(self, batch, scale, vars);
        }
        let (ids, mask, b) = self.batch(batch, false)?;
        let labels = b
            .labels
            .as_ref()
            .ok_or_else(|| other("SFT batch without labels"))?;
        let model = self.model;
        let lora = match &self.trained {
            Trained::Lora { lora, .. } => Some(lora),
            Trained::Params(_) => None,
        };
        let (loss, grads) = checkpointed_grads(model, &ids, Some(&mask), lora, vars, |h| {
            Ok((causal_lm_loss_from_hidden(model, h, labels, b.rows, b.seq_len)? * scale)?)
        })?;
        let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / scale;
        let tokens = b.attention_mask.iter().map(|&m| m as u64).sum();
        Ok((lv, tokens, Some(grads).filter(|_| lv.is_finite())))
    }

    fn loss(&mut self, batch: &[usize], eval: bool) -> Result<(Tensor, u64)> {
        let (ids, mask, b) = self.batch(batch, eval)?;
        let hidden = self
            .model
            .forward_hidden(&ids, Some(&mask), None)
            .map_err(other)?;
        let labels = b
            .labels
            .as_ref()
            .ok_or_else(|| other("SFT batch without labels"))?;
        let loss = causal_lm_loss_from_hidden(self.model, &hidden, labels, b.rows, b.seq_len)?;
        let tokens = b.attention_mask.iter().map(|&m| m as u64).sum();
        Ok((loss, tokens))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        match &self.trained {
            Trained::Lora { lora, adapter } => {
                lora.save_peft(adapter, dir, &self.base_name).map_err(other)
            }
            Trained::Params(vars) => {
                llmtune_adapters::save_params(&dir.join(llmtune_adapters::tune::PARAMS_NAME), vars)
                    .map_err(other)
            }
        }
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        match &self.trained {
            Trained::Lora { lora, adapter } => lora.load_weights_into(adapter, dir).map_err(other),
            Trained::Params(vars) => {
                let file = dir.join(llmtune_adapters::tune::PARAMS_NAME);
                let saved = candle_core::safetensors::load(&file, &self.device)
                    .map_err(|e| other(format!("{}: {e}", file.display())))?;
                for (name, var) in vars {
                    let t = saved
                        .get(name)
                        .ok_or_else(|| other(format!("{}: no tensor {name}", file.display())))?;
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
                Ok(())
            }
        }
    }

    fn set_training(&mut self, training: bool) {
        if let Trained::Lora { lora, .. } = &self.trained {
            lora.set_training(training);
        }
    }

    fn state(&self) -> serde_json::Value {
        match &self.trained {
            Trained::Lora { lora, .. } => {
                let (seed, calls) = lora.dropout_state();
                serde_json::json!({"lora_dropout_seed": seed, "lora_dropout_calls": calls})
            }
            Trained::Params(_) => serde_json::Value::Null,
        }
    }

    fn restore_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let Trained::Lora { lora, .. } = &self.trained else {
            return Ok(());
        };
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| other(format!("task_state.json: no {k}")))
        };
        lora.set_dropout_state(get("lora_dropout_seed")?, get("lora_dropout_calls")?);
        Ok(())
    }
}

/// `llmtune train --stage sft --do_train ...`
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    super::check_finetuning(args)?;
    let out = super::output_dir(args, true)?;
    let (mut p, base_name) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let mut ck = super::apply_checkpoint_dirs(args, &mut p.model, true)?;
    super::quantize_base(args, &mut p.model)?;
    let (trained, vars) = match args.finetuning_type {
        FinetuningType::Freeze | FinetuningType::Full => {
            let vars = if args.finetuning_type == FinetuningType::Full {
                llmtune_adapters::full(&mut p.model)
            } else {
                let group = ModuleGroup::parse(&args.name_module_trainable).map_err(other)?;
                llmtune_adapters::freeze(&mut p.model, args.num_layer_trainable, group)
            }
            .map_err(other)?;
            let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            eprintln!(
                "model {base_name} ({} layers), template {template}, --finetuning_type {:?}: {n} trainable parameters in {} tensors",
                p.model.num_layers(),
                args.finetuning_type,
                vars.len()
            );
            (Trained::Params(vars.clone()), vars)
        }
        _ => {
            let adapter = super::trainable_lora(args, &mut p.model, &mut ck)?;
            let vars = ck.lora.trainable();
            let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            eprintln!(
                "model {base_name} ({} layers), template {template}, LoRA r={} alpha={} on {}: {n_params} trainable parameters",
                p.model.num_layers(),
                args.lora_rank,
                args.lora_alpha,
                super::lora_target(args, &p.model)
            );
            (
                Trained::Lora {
                    lora: ck.lora.clone(),
                    adapter,
                },
                vars,
            )
        }
    };
    super::cpu_bf16(args, device, &mut p.model)?;
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Sft, false)?;
    super::report_data(&prepared, "examples", "targets");
    let (train_set, eval_set, lens) = super::split_train_eval(args, prepared.examples)?;
    let collate_args =
        CollateArgs::new(&p.tokenizer, args.ignore_pad_token_for_loss, false).map_err(other)?;
    let tcfg = super::trainer_config(args, &out)?;
    let (nt, ne) = (train_set.len(), eval_set.len());
    let mut task = SftTask {
        model: &p.model,
        trained,
        base_name,
        train: train_set,
        eval: eval_set,
        collate: collate_args,
        device: device.clone(),
        checkpointing: args.gradient_checkpointing,
    };
    if args.estimate_memory {
        let e = crate::memory::estimate(&tcfg, vars, &mut task, &lens)?;
        println!("{}", e.report());
        return Ok(());
    }
    if crate::dist::is_main() {
        super::save_args(args, &out)?;
    }
    let outcome = train(&tcfg, vars, &mut task, nt, ne)?;
    super::report_done(args, &out, &outcome, None)?;
    eprintln!("trained weights saved to {}", out.display());
    Ok(())
}
