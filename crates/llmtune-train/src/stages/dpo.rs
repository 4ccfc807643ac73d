//! Direct preference optimisation with LoRA (SPEC §12; Rafailov et al. 2023), as TRL's
//! `DPOTrainer` with `loss_type="sigmoid"` runs it for a PEFT model without a separate
//! reference model (LLaMA-Factory's `--stage dpo`).
//!
//! 1. Load the base model and tokenizer.
//! 2. Apply the `--checkpoint_dir` adapters (the SFT adapter, merged with
//!    `--resume_lora_training false`, or continued) and add (or resume) the trainable LoRA.
//! 3. The reference model is the model the run starts from, at no extra weight cost: the same
//!    backbone with every adapter disabled, or, when the trainable adapter continues a
//!    `--checkpoint_dir` one (`--resume_lora_training true`), with a frozen copy of that
//!    adapter as it was loaded swapped in (TRL's `ref` adapter).
//! 4. Encode the preference pairs (the rm stage's data: `output` = `[chosen, rejected]`) and
//!    hold out `--dev_ratio`.
//! 5. Train with the shared loop. A micro-batch of n pairs is 2n rows (the n chosen, then
//!    the n rejected), each `prompt ++ answer ++ eos` left-padded as a whole (as TRL's
//!    collator does for a left-padding tokenizer; ChatGLM needs it). A row's
//!    log-probability `log p(answer | prompt)` is the sum over its answer tokens; with
//!    `pi` the policy's and `ref` the reference's, the rewards are
//!    `beta (pi - ref)` per row and the loss is the mean over pairs of
//!    `-log sigmoid(reward_chosen - reward_rejected)`. Dropout is off (TRL's
//!    `disable_dropout`): the reference and policy passes see the same network.
//!    Evaluation adds TRL's `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//!    `rewards/margins`, `logps/chosen` and `logps/rejected` (as `eval_...`).
//! 6. Save the adapter (PEFT layout), results and plots.
//!
//! At the first step the policy is the reference (a fresh LoRA B is zero), so every pair's
//! loss is `log 2`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{pairwise_ranking_loss, Lora};
use llmtune_data::{Example, Stage};
use llmtune_models::CausalLm;

use crate::args::TrainArgs;
use crate::error::{other, Error, Result};
use crate::trainer::{train, Task};

/// Sums over the evaluation pass (per pair).
#[derive(Debug, Default, Clone, Copy)]
struct EvalSums {
    pairs: usize,
    correct: usize,
    chosen: f64,
    rejected: f64,
    logps_chosen: f64,
    logps_rejected: f64,
}

/// What one micro-batch of pairs gives: the loss and, per pair, the rewards and the policy's
/// log-probabilities.
pub struct DpoOutput {
    /// Mean over the pairs of `-log sigmoid(reward_chosen - reward_rejected)`; differentiable
    /// in the trainable adapter.
    pub loss: Tensor,
    /// Real (non-padding) tokens of the 2n rows.
    pub tokens: u64,
    /// `(chosen, rejected)` per pair: `beta (policy - reference)` log-probability.
    pub rewards: Vec<(f64, f64)>,
    /// `(chosen, rejected)` per pair: the policy's log-probability of the answer.
    pub logps: Vec<(f64, f64)>,
}

/// The name of the frozen copy of a resumed adapter that serves as the reference.
pub const REF_ADAPTER: &str = "ref";

/// The DPO objective on a model whose active adapter makes the policy.
pub struct Dpo<'a> {
    pub model: &'a CausalLm,
    pub lora: &'a Lora,
    /// The reference: this adapter of `lora` active instead of the policy's, or (`None`) every
    /// adapter disabled.
    pub reference: Option<&'a str>,
    pub beta: f64,
    /// Fills the padding (masked out).
    pub pad_id: u32,
}

struct DpoTask<'a> {
    dpo: Dpo<'a>,
    adapter: String,
    base_name: String,
    train: Vec<Example>,
    eval: Vec<Example>,
    sums: EvalSums,
}

/// The 2n rows of a micro-batch of n pairs (the chosen answers, then the rejected ones),
/// each `prompt ++ answer` left-padded as a whole (ChatGLM accepts no padding after the first
/// token; positions follow the mask, so padding does not shift a row). Every answer then ends
/// at the last column: the logits of the last `width + 1` columns but one score all of them.
struct PairBatch {
    /// `[2n, T]` (u32).
    input_ids: Tensor,
    /// `[2n, T]` (u32), 1 = real token.
    attention_mask: Tensor,
    /// The longest answer.
    width: usize,
    /// `[2n, width]` (u32): each row's answer right-aligned, 0 before it.
    targets: Tensor,
    /// `[2n, width]` (f32): 1 on the answer tokens.
    answer_mask: Tensor,
    tokens: u64,
}

impl PairBatch {
    fn new(rows: &[(&[u32], usize)], pad_id: u32, device: &Device) -> Result<Self> {
        let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let width = rows.iter().map(|(ids, p)| ids.len() - p).max().unwrap_or(0);
        if let Some(i) = rows.iter().position(|(ids, p)| *p == 0 || *p >= ids.len()) {
            return Err(Error::InvalidArgument(format!(
                "DPO row {i}: the prompt or the answer is empty"
            )));
        }
        let b = rows.len();
        let (mut ids, mut mask) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        let (mut targets, mut amask) =
            (Vec::with_capacity(b * width), Vec::with_capacity(b * width));
        for (row, prompt_len) in rows {
            let pad = t - row.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(row);
            mask.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            let answer = &row[*prompt_len..];
            targets.extend(std::iter::repeat_n(0u32, width - answer.len()));
            targets.extend_from_slice(answer);
            amask.extend(std::iter::repeat_n(0f32, width - answer.len()));
            amask.extend(std::iter::repeat_n(1f32, answer.len()));
        }
        let tokens = mask.iter().map(|&m| m as u64).sum();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            width,
            targets: Tensor::from_vec(targets, (b, width), device)?,
            answer_mask: Tensor::from_vec(amask, (b, width), device)?,
            tokens,
        })
    }

    /// `[2n]`: each row's `log p(answer | prompt)` under `model` as it is switched now.
    fn answer_logps(&self, model: &CausalLm) -> Result<Tensor> {
        let (hidden, _) = model
            .forward_with_value(&self.input_ids, Some(&self.attention_mask))
            .map_err(other)?;
        let t = hidden.dim(1)?;
        let slice = hidden.narrow(1, t - self.width - 1, self.width)?;
        let logits = model.logits(&slice).map_err(other)?;
        let lp = llmtune_ops::gather_logprobs(&logits, &self.targets)?;
        let mask = self.answer_mask.to_dtype(lp.dtype())?;
        Ok((lp * mask)?.sum(1)?)
    }
}

impl Dpo<'_> {
    /// The 2n rows of `pairs` (the chosen answers, then the rejected ones).
    fn batch(&self, pairs: &[&Example]) -> Result<PairBatch> {
        let mut rows = Vec::with_capacity(2 * pairs.len());
        for pick_chosen in [true, false] {
            for (i, e) in pairs.iter().enumerate() {
                let Example::Pair(p) = e else {
                    return Err(Error::InvalidArgument(format!(
                        "DPO trains on preference pairs; example {i} of the batch is {:?}",
                        e.mode()
                    )));
                };
                let ids = if pick_chosen {
                    &p.chosen_ids
                } else {
                    &p.rejected_ids
                };
                rows.push((ids.as_slice(), p.prompt_len));
            }
        }
        PairBatch::new(&rows, self.pad_id, self.model.device())
    }

    /// The loss, rewards and log-probabilities of `pairs` (all [`Example::Pair`]), as one
    /// batch: a reference pass without a graph, then the policy pass.
    pub fn pairs(&self, pairs: &[&Example]) -> Result<DpoOutput> {
        let n = pairs.len();
        let batch = self.batch(pairs)?;
        let reference = {
            let _switch = match self.reference {
                Some(name) => self.lora.activated(name).map_err(other)?,
                None => self.lora.disabled(),
            };
            batch
                .answer_logps(self.model)?
                .detach()
                .to_dtype(DType::F32)?
        };
        let policy = batch.answer_logps(self.model)?.to_dtype(DType::F32)?;
        let rewards = ((&policy - &reference)? * self.beta)?;
        let (chosen, rejected) = (rewards.narrow(0, 0, n)?, rewards.narrow(0, n, n)?);
        let loss = pairwise_ranking_loss(&chosen, &rejected).map_err(other)?;
        let rv: Vec<f64> = rewards.to_dtype(DType::F64)?.to_vec1()?;
        let pv: Vec<f64> = policy.to_dtype(DType::F64)?.to_vec1()?;
        Ok(DpoOutput {
            loss,
            tokens: batch.tokens,
            rewards: (0..n).map(|i| (rv[i], rv[n + i])).collect(),
            logps: (0..n).map(|i| (pv[i], pv[n + i])).collect(),
        })
    }
}

impl Task for DpoTask<'_> {
    fn loss(&mut self, batch: &[usize], eval: bool) -> Result<(Tensor, u64)> {
        let set = if eval { &self.eval } else { &self.train };
        let rows: Vec<&Example> = batch.iter().map(|&i| &set[i]).collect();
        let out = self.dpo.pairs(&rows)?;
        if eval {
            let s = &mut self.sums;
            for (&(c, r), &(lc, lr)) in out.rewards.iter().zip(&out.logps) {
                s.pairs += 1;
                s.correct += usize::from(c > r);
                s.chosen += c;
                s.rejected += r;
                s.logps_chosen += lc;
                s.logps_rejected += lr;
            }
        }
        Ok((out.loss, out.tokens))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.dpo
            .lora
            .save_peft(&self.adapter, dir, &self.base_name)
            .map_err(other)
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        self.dpo
            .lora
            .load_weights_into(&self.adapter, dir)
            .map_err(other)
    }

    /// Dropout stays off in both modes (TRL disables it for DPO).
    fn set_training(&mut self, _training: bool) {
        self.dpo.lora.set_training(false);
    }

    fn eval_begin(&mut self) {
        self.sums = EvalSums::default();
    }

    fn eval_metrics(&mut self) -> Vec<(String, f64)> {
        let s = self.sums;
        if s.pairs == 0 {
            return Vec::new();
        }
        let n = s.pairs as f64;
        vec![
            ("rewards/chosen".into(), s.chosen / n),
            ("rewards/rejected".into(), s.rejected / n),
            ("rewards/accuracies".into(), s.correct as f64 / n),
            ("rewards/margins".into(), (s.chosen - s.rejected) / n),
            ("logps/chosen".into(), s.logps_chosen / n),
            ("logps/rejected".into(), s.logps_rejected / n),
        ]
    }
}

/// `llmtune train --stage dpo --do_train ...`.
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    super::check_finetuning(args)?;
    let out = super::output_dir(args, true)?;
    let (mut p, base_name) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let mut ck = llmtune_adapters::apply_checkpoints(
        &mut p.model,
        &args.checkpoint_dirs(),
        args.resume_lora_training,
        true,
    )
    .map_err(other)?;
    super::quantize_base(args, &mut p.model)?;
    let adapter = super::trainable_lora(args, &mut p.model, &mut ck)?;
    // A continued adapter: its starting point (a frozen copy) is the reference.
    let reference = match ck.resumed.clone() {
        Some(dir) => {
            ck.lora
                .load_peft(&mut p.model, &dir, REF_ADAPTER, false)
                .map_err(|e| other(format!("--checkpoint_dir {}: {e}", dir.display())))?;
            ck.lora.set_active(&adapter).map_err(other)?;
            Some(format!(
                "the model with {}'s adapter as loaded (a frozen copy)",
                dir.display()
            ))
        }
        None => None,
    };
    ck.lora.set_training(false);
    let vars = ck.lora.trainable();
    let n_lora: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "model {base_name} ({} layers), template {template}, LoRA r={} alpha={} on {}: {n_lora} trainable parameters; DPO beta {}, reference = {}",
        p.model.num_layers(),
        args.lora_rank,
        args.lora_alpha,
        super::lora_target(args, &p.model),
        args.dpo_beta,
        reference
            .as_deref()
            .unwrap_or("the model without the trained adapter")
    );
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Rm, false)?;
    super::report_data(&prepared, "pairs", "answers");
    let (train_set, eval_set, lens) = super::split_train_eval(args, prepared.examples)?;
    let tcfg = super::trainer_config(args, &out)?;
    let (nt, ne) = (train_set.len(), eval_set.len());
    let pad_id = p.tokenizer.pad_id().or(p.tokenizer.eos_id()).unwrap_or(0);
    let mut task = DpoTask {
        dpo: Dpo {
            model: &p.model,
            lora: &ck.lora,
            reference: reference.as_ref().map(|_| REF_ADAPTER),
            beta: args.dpo_beta,
            pad_id,
        },
        adapter,
        base_name,
        train: train_set,
        eval: eval_set,
        sums: EvalSums::default(),
    };
    if args.estimate_memory {
        let e = crate::memory::estimate(&tcfg, vars, &mut task, &lens)?;
        println!("{}", e.report());
        return Ok(());
    }
    if crate::dist::is_main() {
        super::save_args(args, &out)?;
    }
    let o = train(&tcfg, vars, &mut task, nt, ne)?;
    super::report_done(args, &out, &o, Some("eval_rewards/accuracies"))?;
    eprintln!("adapter saved to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_rows_are_left_padded_with_answers_right_aligned() {
        let dev = Device::Cpu;
        let a = [1u32, 2, 3, 4, 5];
        let b = [6u32, 7, 8];
        let batch = PairBatch::new(&[(&a, 2), (&b, 2)], 0, &dev).unwrap();
        let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![1, 2, 3, 4, 5], vec![0, 0, 6, 7, 8]]);
        let mask: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
        assert_eq!(mask, vec![vec![1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1]]);
        assert_eq!(batch.width, 3);
        let t: Vec<Vec<u32>> = batch.targets.to_vec2().unwrap();
        assert_eq!(t, vec![vec![3, 4, 5], vec![0, 0, 8]]);
        let m: Vec<Vec<f32>> = batch.answer_mask.to_vec2().unwrap();
        assert_eq!(m, vec![vec![1., 1., 1.], vec![0., 0., 1.]]);
        assert_eq!(batch.tokens, 8);
        let err = PairBatch::new(&[(&a, 5)], 0, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("the prompt or the answer is empty"), "{err}");
    }
}
