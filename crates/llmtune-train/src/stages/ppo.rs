//! `--stage ppo --do_train`: RLHF with PPO as the reference runs it (TRL 0.4.x's classic
//! `PPOTrainer`, SPEC §9).
//!
//! 1. Load the base model; merge the `--checkpoint_dir` adapters (with
//!    `--resume_lora_training false`), add a fresh trainable LoRA (the policy) and a fresh value
//!    head (the critic). The reference model is the same backbone with the policy adapter
//!    disabled: the SFT model, at no extra weight cost. With `--resume_lora_training true` the
//!    last checkpoint keeps training and the reference is the base without it.
//! 2. Load the reward model from `--reward_model`: its LoRA as a second, frozen adapter on the
//!    same backbone and its value head. It is swapped in to score and swapped out after.
//! 3. Per optimizer step, for each of `--gradient_accumulation_steps` batches: sample responses
//!    (`top_k 0`, `top_p 1`, temperature 1, max new tokens uniform in
//!    `[max_target_length / 2, max_target_length)`), batched with a KV cache; a response shorter
//!    than 2 tokens becomes `[eos, eos]`; score it with the reward model; compute the rollout
//!    log-probabilities and values (policy) and the reference log-probabilities.
//! 4. One PPO epoch over those batches, mini-batch = `--per_device_train_batch_size`: the
//!    clipped losses of [`crate::ppo::core`], gradients accumulated over the batches, clipped by
//!    `--max_grad_norm`, one AdamW step on the schedule; then the adaptive KL controller
//!    follows the measured KL.
//! 5. Logs (`loss`, `reward`, `kl`, `kl_coef`, `response_length`, `learning_rate`, `epoch`, and
//!    the time spent in rollout, scoring and optimisation), checkpoints (adapter, critic, optimizer,
//!    schedule, data position, KL coefficient, dropout streams) with exact resume, and the plots
//!    `training_loss.png` and `training_reward.png`.
//!
//! Rollouts run with the policy adapter folded into copies of the adapted weights (restored
//! bit for bit afterwards), so sampling costs what the plain model costs and builds no
//! autograd graph; the log-probabilities PPO uses are recomputed with the adapter, as TRL does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use llmtune_adapters::{apply_checkpoints, peft, Lora, LoraConfig, ValueHead};
use llmtune_data::{Example, Stage};
use llmtune_generate::{generate, GenerationConfig};
use llmtune_models::CausalLm;
use serde::{Deserialize, Serialize};

use crate::args::TrainArgs;
use crate::checkpoint::{
    load_checkpoint, rotate_checkpoints, save_checkpoint, CheckpointData, DataPosition,
};
use crate::error::{other, Error, Result};
use crate::io::{cleanup_stale_tmp, py_round};
use crate::log::{TrainerLog, TrainerLogLine};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, Gradients};
use crate::ppo::{
    compute_rewards, policy_forward, ppo_loss, reward_scores, KlController, MiniBatch, PpoHyper,
    Rows, SeqBatch,
};
use crate::progress::{Progress, StepStats};
use crate::rng::Rng;
use crate::schedule::{num_warmup_steps, LrScheduler};
use crate::state::{f64_value, save_metrics, speed_metrics, Metrics, TrainerState};
use crate::trainer::{finish_step, NonFinite};

/// Name of the reward model's adapter on the shared backbone.
pub const REWARD_ADAPTER: &str = "reward";
/// Prefix of the critic's variables in the optimizer (`v_head.summary.weight`, as TRL names them).
const CRITIC_PREFIX: &str = "v_head.";
/// PPO's own resumable state in a checkpoint.
const PPO_STATE: &str = "ppo_state.json";

/// The models of a PPO run on one backbone.
#[derive(Debug, Clone)]
pub struct PpoModels {
    /// Every adapter on the backbone: the trainable policy adapter and the frozen reward one.
    pub lora: Lora,
    /// Name of the policy adapter (active outside scoring).
    pub policy: String,
    /// The reward model's value head (frozen).
    pub reward_head: ValueHead,
    /// The critic (trainable).
    pub critic: ValueHead,
}

/// Checks that `dir` holds a reward model (a PEFT adapter and a value head); the messages name
/// `--reward_model` and the missing file.
pub fn check_reward_model(dir: &Path) -> Result<()> {
    let flag =
        |msg: String| Error::InvalidArgument(format!("--reward_model {}: {msg}", dir.display()));
    if !dir.is_dir() {
        return Err(flag(
            "no such folder (give the output_dir of --stage rm)".into(),
        ));
    }
    if !dir.join("adapter_config.json").is_file() {
        return Err(flag(
            "no adapter_config.json: not a LoRA reward model (train one with --stage rm)".into(),
        ));
    }
    let heads = ["value_head.safetensors", "value_head.bin"];
    if !heads.iter().any(|h| dir.join(h).is_file()) {
        return Err(flag(
            "no value_head.safetensors (or value_head.bin): the reward model's value head is \
             missing (train it with --stage rm)"
                .into(),
        ));
    }
    Ok(())
}

/// Loading (SPEC §9): applies `checkpoint_dirs` (merging them, or resuming the last one with
/// `resume_lora_training`), makes sure a trainable policy adapter exists (fresh from
/// `lora_cfg` and `seed` otherwise), loads the reward adapter and head from `reward_model`,
/// and creates a fresh critic. The policy adapter is left active.
pub fn load_models<P: AsRef<Path>>(
    model: &mut CausalLm,
    checkpoint_dirs: &[P],
    resume_lora_training: bool,
    lora_cfg: &LoraConfig,
    reward_model: &Path,
    seed: u64,
) -> Result<PpoModels> {
    check_reward_model(reward_model)?;
    let mut ck =
        apply_checkpoints(model, checkpoint_dirs, resume_lora_training, true).map_err(other)?;
    let policy = ck
        .ensure_trainable(model, lora_cfg, seed)
        .map_err(other)?
        .to_string();
    let mut lora = ck.lora;
    lora.load_peft(model, reward_model, REWARD_ADAPTER, false)
        .map_err(|e| other(format!("--reward_model {}: {e}", reward_model.display())))?;
    lora.set_active(&policy).map_err(other)?;
    let master = llmtune_adapters::master_dtype(model.dtype());
    let reward_head = ValueHead::load(reward_model, master, model.device(), false)
        .map_err(|e| other(format!("--reward_model {}: {e}", reward_model.display())))?;
    let hidden = model.hidden_size();
    if reward_head.hidden_size() != hidden {
        return Err(Error::InvalidArgument(format!(
            "--reward_model {}: its value head reads {} hidden features, the model has {hidden} \
             (was it trained on another model?)",
            reward_model.display(),
            reward_head.hidden_size()
        )));
    }
    let critic =
        ValueHead::new(hidden, master, model.device(), seed ^ 0x5EED_C817).map_err(other)?;
    Ok(PpoModels {
        lora,
        policy,
        reward_head,
        critic,
    })
}

/// Runs `f` on the model with adapter `adapter` folded into copies of the weights it adapts
/// (every adapter disabled meanwhile, so the hooks cost nothing and no graph is built); the
/// original weight tensors are put back afterwards, bit for bit.
pub fn with_merged_adapter<R>(
    model: &mut CausalLm,
    lora: &Lora,
    adapter: &str,
    f: impl FnOnce(&CausalLm) -> R,
) -> Result<R> {
    let modules = lora.modules(adapter).map_err(other)?;
    let weights: HashMap<String, Tensor> =
        lora.weights(adapter).map_err(other)?.into_iter().collect();
    let cfg = lora.config(adapter).map_err(other)?.clone();
    let mut saved: HashMap<String, Tensor> = HashMap::new();
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    for (name, lin) in model.linears_mut() {
        if !modules.contains(&name) {
            continue;
        }
        let get = |b: bool| {
            let key = peft::lora_key(&name, b);
            weights
                .get(&key)
                .map(|t| t.detach())
                .ok_or_else(|| other(format!("adapter {adapter:?}: no {key}")))
        };
        let (a, b) = (get(false)?, get(true)?);
        let w = &lin.weight;
        let acc = llmtune_adapters::master_dtype(w.dtype());
        let delta = (b.to_dtype(acc)?.matmul(&a.to_dtype(acc)?)? * cfg.scaling_for(&name))?;
        merged.insert(
            name.clone(),
            (w.detach().to_dtype(acc)? + delta)?.to_dtype(w.dtype())?,
        );
        saved.insert(name, w.clone());
    }
    for (name, lin) in model.linears_mut() {
        if let Some(w) = merged.remove(&name) {
            lin.weight = w;
        }
    }
    let out = {
        let _off = lora.disabled();
        f(model)
    };
    for (name, lin) in model.linears_mut() {
        if let Some(w) = saved.remove(&name) {
            lin.weight = w;
        }
    }
    Ok(out)
}

/// What PPO keeps between steps and restores on resume (besides the trainer files).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PpoState {
    kl_ctl: KlController,
    lora_dropout: (u64, u64),
    critic_dropout: (u64, u64),
}

/// The rollout settings.
#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// Ids that end a response.
    pub stop_ids: Vec<u32>,
    /// The eos id (`[eos, eos]` replaces a too-short response).
    pub eos_id: u32,
    /// Padding id.
    pub pad_id: u32,
    /// `--max_target_length`: max new tokens are drawn from `[m / 2, m)`.
    pub max_target_length: usize,
    /// Only ids below this are sampled (the tokenizer's vocabulary).
    pub vocab_size: Option<usize>,
}

impl RolloutConfig {
    /// The max new tokens for one rollout batch, uniform in `[m / 2, m)` (TRL's
    /// `LengthSampler(m // 2, m)`), at least 1.
    pub fn draw_max_new(&self, rng: &mut Rng) -> usize {
        let lo = (self.max_target_length / 2) as u64;
        let hi = self.max_target_length as u64;
        (rng.range(lo, hi) as usize).max(1)
    }

    /// The response PPO trains on from generated tokens: generation never pads, so the tokens
    /// are kept as sampled (the stop token included, as the reference keeps the eos); fewer
    /// than 2 tokens become `[eos, eos]`.
    pub fn response(&self, tokens: &[u32]) -> Vec<u32> {
        if tokens.len() < 2 {
            vec![self.eos_id, self.eos_id]
        } else {
            tokens.to_vec()
        }
    }
}

/// One scored batch of rollouts.
struct Rollout {
    batch: SeqBatch,
    mb: MiniBatch,
    scores: Vec<f64>,
    /// Per response: sum over its tokens of `logprob - ref_logprob`.
    kl: Vec<f64>,
    generated: usize,
}

/// Seconds spent per phase.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    rollout: f64,
    scoring: f64,
    optimization: f64,
}

impl Times {
    fn add(&mut self, o: &Times) {
        self.rollout += o.rollout;
        self.scoring += o.scoring;
        self.optimization += o.optimization;
    }
}

/// Log values averaged over a logging window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    steps: u64,
    loss: f64,
    reward: f64,
    kl: f64,
    response_length: f64,
    times: Times,
    generated: u64,
}

/// `llmtune train --stage ppo --do_train ...`
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    super::check_finetuning(args)?;
    let reward_dir = PathBuf::from(args.reward_model.as_deref().ok_or_else(|| {
        Error::InvalidArgument(
            "--stage ppo needs --reward_model (the reward model's output_dir)".into(),
        )
    })?);
    check_reward_model(&reward_dir)?;
    let out = super::output_dir(args, true)?;
    let (mut p, base_name) = super::load_model(args, device)?;
    let template = super::template_name(args, &p);
    let lora_cfg = super::lora_config(args, &p.model)?;
    let dirs = args.checkpoint_dirs();
    let models = load_models(
        &mut p.model,
        &dirs,
        args.resume_lora_training,
        &lora_cfg,
        &reward_dir,
        args.seed,
    )?;
    models.lora.set_dropout_seed(args.seed);
    models.critic.set_dropout_seed(args.seed ^ 0xC817);
    let mut vars = models.lora.trainable();
    vars.extend(
        models
            .critic
            .trainable()
            .into_iter()
            .map(|(k, v)| (format!("{CRITIC_PREFIX}{k}"), v)),
    );
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "model {base_name} ({} layers), template {template}; policy LoRA r={} alpha={} on {} + critic head: \
         {n_params} trainable parameters; reward model {} ({} modules); reference = {}",
        p.model.num_layers(),
        args.lora_rank,
        args.lora_alpha,
        super::lora_target(args, &p.model),
        reward_dir.display(),
        models.lora.modules(REWARD_ADAPTER).map_err(other)?.len(),
        if dirs.is_empty() {
            "the base model".to_string()
        } else if args.resume_lora_training {
            "the base model without the resumed adapter".to_string()
        } else {
            format!("the base with {} merged", dirs.join(","))
        }
    );
    let prepared = super::prepare(args, &p.tokenizer, template, Stage::Ppo, false)?;
    let rt = prepared.template.resolve(&p.tokenizer).map_err(other)?;
    let queries: Vec<Vec<u32>> = prepared
        .examples
        .iter()
        .filter_map(|e| match e {
            Example::Prompt(p) if !p.input_ids.is_empty() => Some(p.input_ids.clone()),
            _ => None,
        })
        .collect();
    eprintln!(
        "data: {} prompts ({} truncated)",
        queries.len(),
        prepared.stats.source_truncated
    );
    if queries.is_empty() {
        return Err(Error::InvalidArgument(
            "--stage ppo: no prompts left after encoding".into(),
        ));
    }
    let rollout = RolloutConfig {
        stop_ids: rt.stop_ids().to_vec(),
        eos_id: rt.eos_id(),
        pad_id: p.tokenizer.pad_id().unwrap_or(rt.eos_id()),
        max_target_length: args.max_target_length.max(1),
        vocab_size: p.model.is_chatglm().then(|| p.tokenizer.vocab_size()),
    };
    if crate::dist::is_main() {
        super::save_args(args, &out)?;
    }
    let mut model = p.model;
    train_ppo(
        args, &out, &base_name, &mut model, models, vars, &queries, &rollout,
    )
}

/// The PPO loop (see the module docs).
#[allow(clippy::too_many_arguments)]
fn train_ppo(
    args: &TrainArgs,
    out: &Path,
    base_name: &str,
    model: &mut CausalLm,
    models: PpoModels,
    vars: Vec<(String, Var)>,
    queries: &[Vec<u32>],
    rollout: &RolloutConfig,
) -> Result<()> {
    // Data parallelism: every step takes `world_size` consecutive rollout batches per
    // accumulation slot; rank `r` rolls out and scores its own one, the gradients are summed
    // over the ranks and the statistics (reward, KL, lengths) reduced, so the KL controller
    // and the logs see the global batch.
    let world = crate::dist::world();
    let (rank, ws) = (world.rank(), world.world_size());
    let main = rank == 0;
    if main {
        cleanup_stale_tmp(out)?;
    }
    let PpoModels {
        lora,
        policy,
        reward_head,
        mut critic,
    } = models;
    let hp = PpoHyper::default();
    let bs = args.per_device_train_batch_size.max(1);
    let accum = args.gradient_accumulation_steps.max(1);
    // TRL's dataloader drops the last partial batch (a set smaller than a batch is one batch).
    let batches_per_epoch = (queries.len() / (bs * ws)).max(1);
    let steps_per_epoch = (batches_per_epoch / accum).max(1);
    let total_steps = if args.max_steps > 0 {
        args.max_steps as u64
    } else {
        (args.num_train_epochs * steps_per_epoch as f64)
            .ceil()
            .max(1.0) as u64
    };
    let tcfg = super::trainer_config(args, out)?;
    let warmup = num_warmup_steps(total_steps, args.warmup_steps as u64, args.warmup_ratio)?;
    let mut sched = LrScheduler::new(
        args.lr_scheduler_type,
        args.learning_rate,
        total_steps,
        warmup,
    )?;
    let adam = AdamWConfig {
        lr: args.learning_rate,
        beta1: args.adam_beta1,
        beta2: args.adam_beta2,
        eps: args.adam_epsilon,
        weight_decay: args.weight_decay,
    };
    let mut opt = AdamW::with_no_decay(vars.clone(), adam, crate::optim::is_no_decay_default)?;
    let mut state = TrainerState {
        max_steps: total_steps,
        logging_steps: args.logging_steps as u64,
        save_steps: args.save_steps as u64,
        eval_steps: 0,
        train_batch_size: Some(bs as u64),
        num_train_epochs: args.num_train_epochs.ceil() as u64,
        ..Default::default()
    };
    let mut pos = DataPosition {
        epoch: 0,
        step_in_epoch: 0,
        batch_in_epoch: 0,
        permutation_seed: args.seed,
    };
    let mut kl_ctl = KlController::default();
    let log = TrainerLog::new(out);
    let mut start_step = 0u64;
    if let Some(ck) = &tcfg.resume_from_checkpoint {
        let loaded = load_checkpoint(ck, &mut opt)?;
        lora.load_weights_into(&policy, ck).map_err(other)?;
        critic.load_weights_into(ck).map_err(other)?;
        let ps: PpoState = crate::io::read_json(&ck.join(PPO_STATE))?;
        kl_ctl = ps.kl_ctl;
        lora.set_dropout_state(ps.lora_dropout.0, ps.lora_dropout.1);
        critic.set_dropout_state(ps.critic_dropout.0, ps.critic_dropout.1);
        sched = loaded.scheduler;
        state = loaded.trainer_state;
        pos = loaded.data_position;
        start_step = state.global_step;
        if main {
            log.truncate_after(start_step)?;
            eprintln!("resuming from {} at step {start_step}", ck.display());
        }
    } else if main {
        log.reset()?;
    }
    crate::dist::broadcast_vars(&vars)?;
    if main {
        eprintln!(
            "ppo: {} prompts, batch {bs} x {accum} accumulation{}, {total_steps} steps \
             ({steps_per_epoch} per epoch), max new tokens in [{}, {})",
            queries.len(),
            if ws > 1 {
                format!(" x {ws} ranks ({})", world.backend())
            } else {
                String::new()
            },
            rollout.max_target_length / 2,
            rollout.max_target_length
        );
    }

    let save = |dir: &Path, kl_ctl: &KlController| -> Result<()> {
        lora.save_peft(&policy, dir, base_name).map_err(other)?;
        critic.save(dir).map_err(other)?;
        let ps = PpoState {
            kl_ctl: *kl_ctl,
            lora_dropout: lora.dropout_state(),
            critic_dropout: critic.dropout_state(),
        };
        crate::io::write_json_sorted(&dir.join(PPO_STATE), &ps)
    };

    let mut acc = GradAccumulator::new(vars.clone());
    let mut progress = if main {
        Progress::new(total_steps, args.logging_steps.max(1) as u64, start_step)
    } else {
        Progress::with_mode(
            total_steps,
            args.logging_steps.max(1) as u64,
            start_step,
            crate::progress::ProgressMode::Silent,
        )
    };
    let t0 = Instant::now();
    let mut window = Window::default();
    let mut totals = Times::default();
    let mut total_loss = 0.0;
    let mut total_reward = 0.0;
    let mut loss_steps = 0u64;
    let mut total_generated = 0u64;
    let mut perm_epoch = u64::MAX;
    let mut perm: Vec<usize> = Vec::new();
    let mut last_good_checkpoint: Option<PathBuf> = None;

    while state.global_step < total_steps {
        let step = state.global_step;
        let mut times = Times::default();
        // ---- rollouts ----
        lora.set_training(false);
        critic.set_training(false);
        let mut rollouts: Vec<Rollout> = Vec::with_capacity(accum);
        for k in 0..accum {
            if pos.batch_in_epoch as usize >= batches_per_epoch {
                pos.epoch += 1;
                pos.batch_in_epoch = 0;
                pos.step_in_epoch = 0;
            }
            if perm_epoch != pos.epoch {
                perm = (0..queries.len()).collect();
                Rng::from_seeds(&[pos.permutation_seed, pos.epoch]).shuffle(&mut perm);
                perm_epoch = pos.epoch;
            }
            // Global rollout batch `b * ws + rank` (wrapping when the set is smaller than
            // one global batch).
            let b = pos.batch_in_epoch as usize * ws + rank;
            let idx: Vec<usize> = if ws == 1 {
                perm[b * bs..((b + 1) * bs).min(perm.len())].to_vec()
            } else {
                (b * bs..(b + 1) * bs)
                    .map(|i| perm[i % perm.len()])
                    .collect()
            };
            pos.batch_in_epoch += 1;
            let qs: Vec<Vec<u32>> = idx.iter().map(|&i| queries[i].clone()).collect();
            let slot = (k * ws + rank) as u64;
            let mut rng = Rng::from_seeds(&[args.seed, 0x0070_706F, step, slot]);
            let gcfg = GenerationConfig {
                do_sample: true,
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                repetition_penalty: 1.0,
                max_new_tokens: rollout.draw_max_new(&mut rng),
                stop_ids: rollout.stop_ids.clone(),
                seed: rng.next_u64(),
                vocab_size: rollout.vocab_size,
            };
            let t = Instant::now();
            let gen = with_merged_adapter(model, &lora, &policy, |m| {
                generate(m, &qs, rollout.pad_id, &gcfg, |_, _| {})
            })?
            .map_err(other)?;
            times.rollout += t.elapsed().as_secs_f64();
            let generated: usize = gen.iter().map(|g| g.tokens.len()).sum();
            let responses: Vec<Vec<u32>> =
                gen.iter().map(|g| rollout.response(&g.tokens)).collect();
            let batch = SeqBatch::new(&qs, &responses, rollout.pad_id, model.device())?;
            let t = Instant::now();
            let scores = reward_scores(model, &lora, REWARD_ADAPTER, &reward_head, &batch)?;
            times.scoring += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let pol = policy_forward(model, Some(&critic), &batch)?;
            let lens = batch.response_lens.clone();
            let old = Rows::from_tensor(&pol.logprobs.detach(), &lens)?;
            let values = Rows::from_tensor(
                &pol.values
                    .as_ref()
                    .ok_or_else(|| other("policy forward without values"))?
                    .detach(),
                &lens,
            )?;
            drop(pol);
            let reference = {
                let _off = lora.disabled();
                policy_forward(model, None, &batch)?.logprobs
            };
            let reference = Rows::from_tensor(&reference, &lens)?;
            let rw = compute_rewards(&scores, &old, &reference, kl_ctl.value)?;
            let kl: Vec<f64> = (0..rw.kl.rows())
                .map(|i| rw.kl.row(i).iter().sum())
                .collect();
            times.optimization += t.elapsed().as_secs_f64();
            rollouts.push(Rollout {
                batch,
                mb: MiniBatch {
                    old_logprobs: old,
                    values,
                    rewards: rw.rewards,
                },
                scores,
                kl,
                generated,
            });
        }
        // ---- one PPO epoch, mini-batch = one rollout batch, gradients accumulated ----
        let t = Instant::now();
        lora.set_training(true);
        critic.set_training(true);
        let mut step_loss = 0.0;
        let mut step_tokens = 0u64;
        let mut bad: Option<NonFinite> = None;
        for (mi, ro) in rollouts.iter().enumerate() {
            let pol = policy_forward(model, Some(&critic), &ro.batch)?;
            let vpreds = pol
                .values
                .as_ref()
                .ok_or_else(|| other("policy forward without values"))?;
            let out = ppo_loss(&ro.mb, &pol.logprobs, vpreds, Some(&pol.logits), &hp)?;
            let lv = out.stats.loss;
            if !lv.is_finite() {
                bad = Some(NonFinite::Here(mi, lv));
                break;
            }
            let grads = (out.loss / (accum * ws) as f64)?.backward()?;
            acc.add(&grads)?;
            step_loss += lv / (rollouts.len() * ws) as f64;
            step_tokens += ro.batch.tokens()?;
        }
        finish_step(
            &mut step_loss,
            &mut step_tokens,
            bad,
            last_good_checkpoint.as_deref(),
            |bad| match bad {
                NonFinite::Here(mi, lv) => format!(
                    "the PPO loss became {lv} at step {} (mini-batch {mi})",
                    step + 1
                ),
                NonFinite::OtherRank => "the PPO loss became non-finite on another rank".into(),
            },
        )?;
        let mut g: Gradients = acc.finish()?;
        crate::dist::all_reduce_gradients(&mut g)?;
        if args.max_grad_norm > 0.0 {
            g.clip_global_norm(args.max_grad_norm)?;
        }
        let lr = sched.lr_at(step);
        opt.set_lr(lr);
        opt.step(&g)?;
        sched.step();
        lora.set_training(false);
        critic.set_training(false);
        times.optimization += t.elapsed().as_secs_f64();

        // ---- statistics, KL controller ----
        let sum = |f: &dyn Fn(&Rollout) -> f64| rollouts.iter().map(f).sum::<f64>();
        let [n_resp, reward_sum, kl_sum, len_sum, generated] = crate::dist::sum_f64([
            sum(&|r| r.scores.len() as f64),
            sum(&|r| r.scores.iter().sum()),
            sum(&|r| r.kl.iter().sum()),
            sum(&|r| r.batch.response_lens.iter().sum::<usize>() as f64),
            sum(&|r| r.generated as f64),
        ])?;
        let (n_resp, generated) = (n_resp as usize, generated as usize);
        let reward = reward_sum / n_resp as f64;
        let kl = kl_sum / n_resp as f64;
        let resp_len = len_sum / n_resp as f64;
        let kl_coef_used = kl_ctl.value;
        kl_ctl.update(kl, n_resp);

        state.global_step += 1;
        pos.step_in_epoch += 1;
        let epoch_f = state.global_step as f64 / steps_per_epoch as f64;
        state.epoch = Some(epoch_f);
        window.steps += 1;
        window.loss += step_loss;
        window.reward += reward;
        window.kl += kl;
        window.response_length += resp_len;
        window.times.add(&times);
        window.generated += generated as u64;
        totals.add(&times);
        total_loss += step_loss;
        total_reward += reward;
        loss_steps += 1;
        total_generated += generated as u64;
        progress.update(&StepStats {
            step: state.global_step,
            loss: Some(step_loss),
            learning_rate: Some(lr),
            tokens: step_tokens,
        });
        let gstep = state.global_step;
        let elapsed = t0.elapsed().as_secs_f64();
        if args.logging_steps > 0 && gstep % args.logging_steps as u64 == 0 {
            let n = window.steps.max(1) as f64;
            let r4 = |x: f64| py_round(x, 4);
            let (loss, reward, kl) = (
                r4(window.loss / n),
                r4(window.reward / n),
                r4(window.kl / n),
            );
            let resp = r4(window.response_length / n);
            let wt = window.times;
            state.log(&[
                ("loss", loss),
                ("reward", reward),
                ("kl", kl),
                ("kl_coef", kl_coef_used),
                ("response_length", resp),
                ("learning_rate", lr),
                ("time_rollout", r4(wt.rollout)),
                ("time_scoring", r4(wt.scoring)),
                ("time_optimization", r4(wt.optimization)),
            ]);
            let mut line = TrainerLogLine::new(gstep, total_steps, gstep - start_step, elapsed);
            line.loss = Some(loss);
            line.reward = Some(reward);
            line.learning_rate = Some(lr);
            line.epoch = Some(py_round(epoch_f, 2));
            if main {
                log.append(&line)?;
            }
            progress.println(&format!(
                "step {gstep}/{total_steps}: loss {loss} reward {reward} kl {kl} kl_coef {} \
                 response_length {resp} | rollout {:.1}s ({:.1} tok/s) scoring {:.1}s optimization {:.1}s",
                py_round(kl_coef_used, 6),
                wt.rollout,
                window.generated as f64 / wt.rollout.max(1e-9),
                wt.scoring,
                wt.optimization
            ));
            window = Window::default();
        }
        if main && args.save_steps > 0 && gstep % args.save_steps as u64 == 0 {
            let rngs = BTreeMap::new();
            let dir = save_checkpoint(
                out,
                gstep,
                &CheckpointData {
                    optimizer: &opt,
                    scheduler: &sched,
                    rngs: &rngs,
                    trainer_state: &state,
                    data_position: &pos,
                },
                |d| save(d, &kl_ctl),
            )?;
            rotate_checkpoints(out, args.save_total_limit, None)?;
            last_good_checkpoint = Some(dir);
        }
    }
    progress.finish();
    let runtime = t0.elapsed().as_secs_f64();
    if main {
        save(out, &kl_ctl)?;
    }
    let train_loss = if loss_steps > 0 {
        total_loss / loss_steps as f64
    } else {
        f64::NAN
    };
    let steps_run = state.global_step - start_step;
    let mut m: Metrics = speed_metrics(
        "train",
        runtime,
        Some(steps_run * (bs * accum * ws) as u64),
        Some(steps_run),
    );
    let epoch = state.epoch.unwrap_or(0.0);
    m.insert("train_loss".into(), f64_value(train_loss));
    m.insert("epoch".into(), f64_value(epoch));
    m.insert(
        "train_reward".into(),
        f64_value(if loss_steps > 0 {
            total_reward / loss_steps as f64
        } else {
            f64::NAN
        }),
    );
    for (k, v) in [
        ("train_rollout_runtime", totals.rollout),
        ("train_scoring_runtime", totals.scoring),
        ("train_optimization_runtime", totals.optimization),
    ] {
        m.insert(k.into(), f64_value(py_round(v, 4)));
    }
    m.insert(
        "train_rollout_tokens_per_second".into(),
        f64_value(py_round(
            total_generated as f64 / totals.rollout.max(1e-9),
            3,
        )),
    );
    if main {
        save_metrics(out, "train", &m)?;
    }
    state.log(&[
        ("train_loss", train_loss),
        ("train_runtime", py_round(runtime, 4)),
    ]);
    if main {
        state.save(&out.join(crate::state::TRAINER_STATE_NAME))?;
    }
    eprintln!(
        "done: {} steps in {runtime:.1}s (rollout {:.1}s, scoring {:.1}s, optimization {:.1}s), \
         train_loss {train_loss:.4}, final kl_coef {:.6}",
        state.global_step, totals.rollout, totals.scoring, totals.optimization, kl_ctl.value
    );
    if args.plot_loss && main {
        crate::plot::plot_loss(out, &["loss", "reward"])?;
    }
    if main {
        eprintln!("policy adapter and critic saved to {}", out.display());
    }
    world.barrier()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(m: usize) -> RolloutConfig {
        RolloutConfig {
            stop_ids: vec![2],
            eos_id: 2,
            pad_id: 0,
            max_target_length: m,
            vocab_size: None,
        }
    }

    #[test]
    fn max_new_tokens_uniform_in_half_open_range() {
        let c = cfg(32);
        let mut rng = Rng::seed_from_u64(1);
        let draws: Vec<usize> = (0..2000).map(|_| c.draw_max_new(&mut rng)).collect();
        assert!(draws.iter().all(|d| (16..32).contains(d)), "{draws:?}");
        assert!(draws.contains(&16) && draws.contains(&31));
        assert_eq!(cfg(1).draw_max_new(&mut rng), 1);
        assert_eq!(cfg(2).draw_max_new(&mut rng), 1);
    }

    #[test]
    fn short_responses_become_eos_eos() {
        let c = cfg(8);
        assert_eq!(c.response(&[]), vec![2, 2]);
        assert_eq!(c.response(&[7]), vec![2, 2]);
        assert_eq!(c.response(&[7, 2]), vec![7, 2]);
        assert_eq!(c.response(&[7, 8, 9]), vec![7, 8, 9]);
    }
}
