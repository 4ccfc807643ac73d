//! Reward modelling with LoRA (SPEC §8): the backbone plus a value head `Linear(hidden, 1)`
//! scores a sequence by the value at its last token; the loss ranks the chosen answer of each
//! preference pair above the rejected one.
//!
//! 1. Load the base model and tokenizer.
//! 2. Apply the `--checkpoint_dir` adapters (the seed merges its SFT adapter with
//!    `--resume_lora_training False`) and add (or resume) the trainable LoRA.
//! 3. Add the value head (f32, dropout 0.1 before it in training): read from the last
//!    `--checkpoint_dir` when it holds one (as the reference does), else fresh.
//! 4. Encode the preference pairs and hold out `--dev_ratio`.
//! 5. Train with the shared loop: a micro-batch of n pairs is 2n left-padded rows (the n
//!    chosen, then the n rejected); loss = mean of `-log sigmoid(r_chosen - r_rejected)`,
//!    evaluation adds `eval_accuracy` (share of pairs with `r_chosen > r_rejected`).
//! 6. Save the adapter (PEFT layout) and `value_head.safetensors`, results and plots.
//!
//! `--do_predict` (or `--do_eval`) without `--do_train` scores every pair of the dataset with
//! the reward model of `--checkpoint_dir` (the adapters before the last merged, the last one
//! and its value head on top): see [`load_reward_model`] and [`predict`].
//!
//! Positions follow the attention mask (0 from each row's first real token), so a pair scores
//! the same whatever it is batched with.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use llmtune_adapters::value_head::{gather_last, last_token_index, VALUE_HEAD_NAME};
use llmtune_adapters::{apply_checkpoints, pairwise_ranking_loss, Lora, ValueHead};
use llmtune_data::{collate, CollateArgs, Example, Stage};
use llmtune_models::{CausalLm, Pretrained};

use crate::args::TrainArgs;
use crate::checkpointing::checkpointed_value_grads;
use crate::error::{other, Error, Result};
use crate::optim::Gradients;
use crate::state::{f64_value, save_metrics, speed_metrics};
use crate::trainer::{plain_loss_and_grads, train, Task, TrainOutcome};

/// Optimizer names of the value head's variables (TRL's `v_head.summary.*`).
const HEAD_PREFIX: &str = "v_head.";
/// Mixed into `--seed` for the value head's initialisation and dropout, so they do not reuse
/// the LoRA streams.
const HEAD_SEED: u64 = 0x7661_6c75_655f_6864;

/// A backbone (with whatever adapters are active or merged) and a value head: scores
/// preference pairs.
pub struct RewardModel<'a> {
    pub model: &'a CausalLm,
    pub head: ValueHead,
    pub collate: CollateArgs,
}

/// The rewards of a batch of pairs, `[n]` each, f32.
pub struct PairRewards {
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// Real (non-padding) tokens of the 2n rows.
    pub tokens: u64,
}

impl PairRewards {
    /// `(chosen, rejected)` per pair.
    pub fn to_vec(&self) -> Result<Vec<(f32, f32)>> {
        let c: Vec<f32> = self.chosen.to_dtype(DType::F32)?.to_vec1()?;
        let r: Vec<f32> = self.rejected.to_dtype(DType::F32)?.to_vec1()?;
        Ok(c.into_iter().zip(r).collect())
    }
}

impl RewardModel<'_> {
    /// Scores `pairs` (all [`Example::Pair`]) in one batch: rows = the chosen answers, then
    /// the rejected ones, left-padded; each row's reward is the value head's output at its
    /// last real token (the eos). Differentiable in the adapter and the head.
    pub fn rewards(&self, pairs: &[&Example]) -> Result<PairRewards> {
        let (ids, mask, tokens) = self.inputs(pairs)?;
        let (_, hidden) = self
            .model
            .forward_with_value(&ids, Some(&mask))
            .map_err(other)?;
        self.rewards_from_hidden(&hidden, &mask, pairs.len(), tokens)
    }

    /// The batch of `pairs` as model inputs: ids and mask `[2n, T]` (the chosen answers, then
    /// the rejected ones, left-padded) and the number of real tokens.
    pub fn inputs(&self, pairs: &[&Example]) -> Result<(Tensor, Tensor, u64)> {
        if let Some(i) = pairs.iter().position(|e| !matches!(e, Example::Pair(_))) {
            return Err(Error::InvalidArgument(format!(
                "the reward model scores preference pairs; example {i} of the batch is {:?}",
                pairs[i].mode()
            )));
        }
        let b = collate(pairs, &self.collate).map_err(other)?;
        let device = self.model.device();
        let tokens = b.attention_mask.iter().map(|&m| m as u64).sum();
        let ids = Tensor::from_vec(b.input_ids, (b.rows, b.seq_len), device)?;
        let mask = Tensor::from_vec(b.attention_mask, (b.rows, b.seq_len), device)?;
        Ok((ids, mask, tokens))
    }

    /// The value head on the value hidden states `[2n, T, H]` (see
    /// [`CausalLm::forward_with_value`]) of [`RewardModel::inputs`]: each
    /// row's reward is the head's output at its last real token (the eos).
    pub fn rewards_from_hidden(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        n: usize,
        tokens: u64,
    ) -> Result<PairRewards> {
        let values = self.head.forward(hidden).map_err(other)?;
        let last = last_token_index(mask).map_err(other)?;
        let rewards = gather_last(&values, &last).map_err(other)?;
        Ok(PairRewards {
            chosen: rewards.narrow(0, 0, n)?,
            rejected: rewards.narrow(0, n, n)?,
            tokens,
        })
    }

    /// Scores every pair of `examples`, `batch_size` pairs at a time: `(chosen, rejected)`
    /// per pair, in order.
    pub fn score(&self, examples: &[Example], batch_size: usize) -> Result<Vec<(f32, f32)>> {
        let mut out = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(batch_size.max(1)) {
            let rows: Vec<&Example> = chunk.iter().collect();
            out.extend(self.rewards(&rows)?.to_vec()?);
        }
        Ok(out)
    }
}

/// The mean of `-log sigmoid(chosen - rejected)` over pairs, in f64, stable for any margin.
pub fn pair_loss(chosen: f32, rejected: f32) -> f64 {
    let x = rejected as f64 - chosen as f64;
    // softplus(x) = max(x, 0) + ln(1 + e^{-|x|})
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

struct RmTask<'a> {
    rm: RewardModel<'a>,
    lora: Lora,
    adapter: String,
    base_name: String,
    train: Vec<Example>,
    eval: Vec<Example>,
    /// Over the current evaluation pass: pairs with r_chosen > r_rejected, pairs seen.
    eval_correct: usize,
    eval_pairs: usize,
    /// `--gradient_checkpointing`: recompute each layer in the backward pass.
    checkpointing: bool,
}

impl Task for RmTask<'_> {
    fn loss_and_grads(
        &mut self,
        batch: &[usize],
        scale: f64,
        vars: &[(String, Var)],
    ) -> Result<(f64, u64, Option<Gradients>)> {
        if !self.checkpointing {
            return plain_loss_and_grads(self, batch, scale, vars);
        }
        let rows: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
        let (ids, mask, tokens) = self.rm.inputs(&rows)?;
        let rm = &self.rm;
        let (loss, grads) =
            checkpointed_value_grads(rm.model, &ids, Some(&mask), Some(&self.lora), vars, |h| {
                let r = rm.rewards_from_hidden(h, &mask, rows.len(), tokens)?;
                let loss = pairwise_ranking_loss(&r.chosen, &r.rejected).map_err(other)?;
                Ok((loss * scale)?)
            })?;
        let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / scale;
        Ok((lv, tokens, Some(grads).filter(|_| lv.is_finite())))
    }

    fn loss(&mut self, batch: &[usize], eval: bool) -> Result<(Tensor, u64)> {
        let set = if eval { &self.eval } else { &self.train };
        let rows: Vec<&Example> = batch.iter().map(|&i| &set[i]).collect();
        let r = self.rm.rewards(&rows)?;
        let loss = pairwise_ranking_loss(&r.chosen, &r.rejected).map_err(other)?;
        if eval {
            let v = r.to_vec()?;
            self.eval_correct += v.iter().filter(|(c, r)| c > r).count();
            self.eval_pairs += v.len();
        }
        Ok((loss, r.tokens))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.lora
            .save_peft(&self.adapter, dir, &self.base_name)
            .map_err(other)?;
        self.rm.head.save(dir).map_err(other)
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        self.lora
            .load_weights_into(&self.adapter, dir)
            .map_err(other)?;
        self.rm.head.load_weights_into(dir).map_err(other)
    }

    fn set_training(&mut self, training: bool) {
        self.lora.set_training(training);
        self.rm.head.set_training(training);
    }

    fn state(&self) -> serde_json::Value {
        let (seed, calls) = self.lora.dropout_state();
        let (hseed, hcalls) = self.rm.head.dropout_state();
        serde_json::json!({
            "lora_dropout_seed": seed,
            "lora_dropout_calls": calls,
            "value_head_dropout_seed": hseed,
            "value_head_dropout_calls": hcalls,
        })
    }

    fn restore_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| other(format!("task_state.json: no {k}")))
        };
        self.lora
            .set_dropout_state(get("lora_dropout_seed")?, get("lora_dropout_calls")?);
        self.rm.head.set_dropout_state(
            get("value_head_dropout_seed")?,
            get("value_head_dropout_calls")?,
        );
        Ok(())
    }

    fn eval_begin(&mut self) {
        self.eval_correct = 0;
        self.eval_pairs = 0;
    }

    fn eval_metrics(&mut self) -> Vec<(String, f64)> {
        if self.eval_pairs == 0 {
            return Vec::new();
        }
        vec![(
            "accuracy".into(),
            self.eval_correct as f64 / self.eval_pairs as f64,
        )]
    }
}

/// What [`train_rm`] leaves in memory: the model with the trained adapter active (not merged),
/// the trained head in evaluation mode, and the held-out pairs.
pub struct TrainedRm {
    pub pretrained: Pretrained,
    pub lora: Lora,
    pub head: ValueHead,
    pub collate: CollateArgs,
    pub train_set: Vec<Example>,
    pub eval_set: Vec<Example>,
    pub outcome: TrainOutcome,
    pub output_dir: PathBuf,
}

impl TrainedRm {
    /// The reward model as it stands at the end of training.
    pub fn reward_model(&self) -> RewardModel<'_> {
        RewardModel {
            model: &self.pretrained.model,
            head: self.head.clone(),
            collate: self.collate,
        }
    }
}

/// Counts the pairs whose chosen and rejected answers encode identically (kept: they carry
/// no preference, the loss is log 2 and they never count as correct).
fn report_identical(examples: &[Example]) {
    let same = examples
        .iter()
        .filter(|e| matches!(e, Example::Pair(p) if p.chosen_ids == p.rejected_ids))
        .count();
    if same > 0 {
        eprintln!(
            "note: {same} of {} pairs have chosen == rejected (kept; `llmtune data inspect --stage rm` lists them)",
            examples.len()
        );
    }
}

/// The training half of `llmtune train --stage rm --do_train`: trains, saves and returns the
/// trained model in memory (for callers that score with it afterwards).
pub fn train_rm(args: &TrainArgs, device: &Device) -> Result<Option<TrainedRm>> {
    super::check_finetuning(args)?;
    let out = super::output_dir(args, true)?;
    let (mut p, base_name) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let dirs = args.checkpoint_dirs();
    let mut ck =
        apply_checkpoints(&mut p.model, &dirs, args.resume_lora_training, true).map_err(other)?;
    super::quantize_base(args, &mut p.model)?;
    let adapter = super::trainable_lora(args, &mut p.model, &mut ck)?;
    // The value head: the last checkpoint_dir's when it has one (the reference loads it too),
    // else a fresh one.
    let hidden = p.model.hidden_size();
    let head_dir = dirs.last().map(PathBuf::from).filter(|d| has_value_head(d));
    let head = match &head_dir {
        Some(d) => {
            eprintln!("value head: continuing from {}", d.display());
            ValueHead::load(d, DType::F32, device, true)
                .map_err(|e| other(format!("--checkpoint_dir {}: {e}", d.display())))?
        }
        None => ValueHead::new(hidden, DType::F32, device, args.seed ^ HEAD_SEED).map_err(other)?,
    };
    if head.hidden_size() != hidden {
        return Err(Error::InvalidArgument(format!(
            "--checkpoint_dir {}: the value head reads {} features but the model's hidden size is {hidden}",
            head_dir.as_deref().unwrap_or(Path::new("")).display(),
            head.hidden_size()
        )));
    }
    head.set_dropout_seed(args.seed ^ HEAD_SEED);
    head.set_training(true);
    let mut vars = ck.lora.trainable();
    let n_lora: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    vars.extend(
        head.trainable()
            .into_iter()
            .map(|(k, v)| (format!("{HEAD_PREFIX}{k}"), v)),
    );
    eprintln!(
        "model {base_name} ({} layers), template {template}, LoRA r={} alpha={} on {}: {n_lora} trainable parameters, value head {}",
        p.model.num_layers(),
        args.lora_rank,
        args.lora_alpha,
        super::lora_target(args, &p.model),
        hidden + 1
    );
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Rm, false)?;
    super::report_data(&prepared, "pairs", "answers");
    report_identical(&prepared.examples);
    let (train_set, eval_set, lens) = super::split_train_eval(args, prepared.examples)?;
    let collate_args = CollateArgs::new(&p.tokenizer, true, false).map_err(other)?;
    let tcfg = super::trainer_config(args, &out)?;
    let (nt, ne) = (train_set.len(), eval_set.len());
    let mut task = RmTask {
        rm: RewardModel {
            model: &p.model,
            head: head.clone(),
            collate: collate_args,
        },
        lora: ck.lora.clone(),
        adapter,
        base_name,
        train: train_set,
        eval: eval_set,
        eval_correct: 0,
        eval_pairs: 0,
        checkpointing: args.gradient_checkpointing,
    };
    if args.estimate_memory {
        let e = crate::memory::estimate(&tcfg, vars, &mut task, &lens)?;
        println!("{}", e.report());
        return Ok(None);
    }
    if crate::dist::is_main() {
        super::save_args(args, &out)?;
    }
    let outcome = train(&tcfg, vars, &mut task, nt, ne)?;
    let RmTask {
        train: train_set,
        eval: eval_set,
        ..
    } = task;
    let lora = ck.lora.clone();
    lora.set_training(false);
    head.set_training(false);
    Ok(Some(TrainedRm {
        pretrained: p,
        lora,
        head,
        collate: collate_args,
        train_set,
        eval_set,
        outcome,
        output_dir: out,
    }))
}

fn has_value_head(dir: &Path) -> bool {
    [
        VALUE_HEAD_NAME,
        llmtune_adapters::value_head::VALUE_HEAD_NAME_BIN,
    ]
    .iter()
    .any(|f| dir.join(f).is_file())
}

/// `llmtune train --stage rm --do_train ...` (then `--do_predict` on the saved model, if
/// asked).
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    let Some(t) = train_rm(args, device)? else {
        return Ok(()); // --estimate_memory
    };
    super::report_done(args, &t.output_dir, &t.outcome, Some("eval_accuracy"))?;
    eprintln!("adapter and value head saved to {}", t.output_dir.display());
    let out = t.output_dir.clone();
    drop(t);
    if args.do_predict {
        // Score with what was just saved: the merged checkpoint_dirs, then this run's output
        // (which replaces the last checkpoint_dir when its adapter was continued).
        let mut dirs = args.checkpoint_dirs();
        if args.resume_lora_training && !dirs.is_empty() {
            dirs.pop();
        }
        dirs.push(out.to_string_lossy().into_owned());
        let mut pa = args.clone();
        pa.checkpoint_dir = Some(dirs.join(","));
        pa.do_eval = false;
        predict(&pa, device)?;
    }
    Ok(())
}

/// The name of the reward model's adapter when loaded for scoring.
pub const REWARD_ADAPTER: &str = "reward";

/// Loads the reward model of `--checkpoint_dir` onto the base model: the adapters of every
/// folder but the last merged into the base weights, in order (as training merged them), and
/// the last folder's adapter (the reward model's own) active on top, unmerged, with its value
/// head (`value_head.safetensors`, or the reference's `value_head.bin`). Scoring then runs the
/// very computation of training (no merge rounding), so the rewards equal those at the end of
/// training bit for bit. Returns the head (evaluation mode) and the adapter set, which must be
/// kept while scoring.
pub fn load_reward_model(p: &mut Pretrained, dirs: &[String]) -> Result<(ValueHead, Lora)> {
    let (last, before) = dirs.split_last().ok_or_else(|| {
        Error::InvalidArgument(
            "--stage rm without --do_train needs --checkpoint_dir (the reward model's output_dir, \
             holding its adapter and value_head.safetensors)"
                .into(),
        )
    })?;
    let device = p.model.device().clone();
    let head = ValueHead::load(Path::new(last), DType::F32, &device, false).map_err(|e| {
        Error::InvalidArgument(format!(
            "--checkpoint_dir {last}: the last folder must hold the reward model's value head: {e}"
        ))
    })?;
    if head.hidden_size() != p.model.hidden_size() {
        return Err(Error::InvalidArgument(format!(
            "--checkpoint_dir {last}: the value head reads {} features but the model's hidden size is {}",
            head.hidden_size(),
            p.model.hidden_size()
        )));
    }
    let mut lora = apply_checkpoints(&mut p.model, before, false, false)
        .map_err(other)?
        .lora;
    lora.load_peft(&mut p.model, Path::new(last), REWARD_ADAPTER, false)
        .map_err(|e| other(format!("--checkpoint_dir {last}: {e}")))?;
    lora.set_active(REWARD_ADAPTER).map_err(other)?;
    lora.set_training(false);
    Ok((head, lora))
}

/// `--stage rm --do_predict` (or `--do_eval`): scores every pair of the dataset (no dev split)
/// with the reward model of `--checkpoint_dir` ([`load_reward_model`]).
///
/// * `--do_predict`: `generated_predictions.jsonl`, one `{"chosen": x, "rejected": y}` line
///   per pair in dataset order (f32 rewards, shortest exact decimal), and
///   `predict_results.json` with `predict_loss`, `predict_accuracy`, `predict_samples` and
///   the speed metrics.
/// * `--do_eval`: `eval_results.json` with `eval_loss`, `eval_accuracy` and the same.
///
/// Both also merge into `all_results.json`.
pub fn predict(args: &TrainArgs, device: &Device) -> Result<()> {
    let out = super::output_dir(args, false)?;
    let (mut p, _) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let (head, _lora) = load_reward_model(&mut p, &args.checkpoint_dirs())?;
    super::quantize_base(args, &mut p.model)?;
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Rm, false)?;
    report_identical(&prepared.examples);
    let rm = RewardModel {
        model: &p.model,
        head,
        collate: CollateArgs::new(&p.tokenizer, true, false).map_err(other)?,
    };
    let bs = args.per_device_eval_batch_size.max(1);
    let t0 = Instant::now();
    let mut scores = Vec::with_capacity(prepared.examples.len());
    let mut steps = 0u64;
    // Several ranks: each scores a contiguous run of the batches; rank 0 gathers them in
    // rank (= input) order and alone writes.
    let world = crate::dist::world();
    let n_batches = prepared.examples.len().div_ceil(bs);
    let (first, last) = llmtune_dist::shard_range(n_batches, world.rank(), world.world_size());
    for (bi, chunk) in prepared.examples.chunks(bs).enumerate() {
        if bi < first || bi >= last {
            continue;
        }
        let rows: Vec<&Example> = chunk.iter().collect();
        scores.extend(rm.rewards(&rows)?.to_vec()?);
        steps += 1;
        if steps % 10 == 0 || scores.len() == prepared.examples.len() {
            eprintln!(
                "rm: {}/{} pairs scored",
                scores.len(),
                prepared.examples.len()
            );
        }
    }
    if world.world_size() > 1 {
        let bytes = serde_json::to_vec(&scores).map_err(|e| other(format!("rewards: {e}")))?;
        let mut all = Vec::with_capacity(prepared.examples.len());
        for (r, b) in world.all_gather_bytes(&bytes)?.into_iter().enumerate() {
            let part: Vec<(f32, f32)> = serde_json::from_slice(&b)
                .map_err(|e| other(format!("rewards from rank {r}: {e}")))?;
            all.extend(part);
        }
        scores = all;
        steps = n_batches as u64;
        if !crate::dist::is_main() {
            world.barrier()?;
            return Ok(());
        }
    }
    let runtime = t0.elapsed().as_secs_f64();
    let n = scores.len();
    let loss = scores.iter().map(|&(c, r)| pair_loss(c, r)).sum::<f64>() / n.max(1) as f64;
    let correct = scores.iter().filter(|(c, r)| c > r).count();
    let accuracy = correct as f64 / n.max(1) as f64;
    let splits: &[&str] = match (args.do_predict, args.do_eval) {
        (true, true) => &["eval", "predict"],
        (true, false) => &["predict"],
        _ => &["eval"],
    };
    if args.do_predict {
        #[derive(serde::Serialize)]
        struct Line {
            chosen: f32,
            rejected: f32,
        }
        let path = out.join("generated_predictions.jsonl");
        let mut text = Vec::new();
        for &(chosen, rejected) in &scores {
            let line = serde_json::to_string(&Line { chosen, rejected })
                .map_err(|e| other(format!("{}: {e}", path.display())))?;
            writeln!(text, "{line}").map_err(|e| Error::io_public("write", &path, e))?;
        }
        crate::io::atomic_write(&path, &text)?;
    }
    for split in splits {
        let mut m = speed_metrics(split, runtime, Some(n as u64), Some(steps));
        m.insert(format!("{split}_loss"), f64_value(loss));
        m.insert(format!("{split}_accuracy"), f64_value(accuracy));
        m.insert(format!("{split}_samples"), f64_value(n as f64));
        save_metrics(&out, split, &m)?;
    }
    println!(
        "{n} pairs: accuracy {accuracy:.4} ({correct} with chosen > rejected), loss {loss:.4}"
    );
    eprintln!("rewards and metrics written to {}", out.display());
    world.barrier()?;
    Ok(())
}
