//! The training loop shared by the stages: micro-batches, gradient accumulation, clipping,
//! AdamW, the schedule, logging, evaluation, checkpoints (with exact resume) and the final
//! results. A stage supplies a [`Task`]: how to compute a batch's loss and what to save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::checkpoint::{
    load_checkpoint, rotate_checkpoints, save_checkpoint, CheckpointData, DataPosition,
};
use crate::error::{Error, Result};
use crate::io::cleanup_stale_tmp;
use crate::log::{TrainerLog, TrainerLogLine};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, Gradients};
use crate::progress::{Progress, StepStats};
use crate::rng::Rng;
use crate::schedule::{num_warmup_steps, LrScheduler, SchedulerType};
use crate::state::{save_metrics, speed_metrics, Metrics, TrainerState};

/// What a stage plugs into the loop.
pub trait Task {
    /// Mean loss of micro-batch `batch` (indices into the training or evaluation set) and the
    /// number of tokens it processed. The loss must depend on the trainable variables.
    fn loss(&mut self, batch: &[usize], eval: bool) -> Result<(Tensor, u64)>;
    /// Training micro-batch `batch`: the loss value, its token count and the gradients of
    /// `loss * scale` for `vars` (`None` when the loss is not finite). The default runs
    /// [`Task::loss`] and one backward pass; a task overrides it to get its gradients another
    /// way (gradient checkpointing).
    fn loss_and_grads(
        &mut self,
        batch: &[usize],
        scale: f64,
        vars: &[(String, Var)],
    ) -> Result<(f64, u64, Option<Gradients>)> {
        plain_loss_and_grads(self, batch, scale, vars)
    }
    /// Writes the trained weights (adapter, value head) into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restores the trained weights from `dir` (load_best_model_at_end).
    fn load(&mut self, dir: &Path) -> Result<()>;
    /// Switches dropout on (training) or off (evaluation).
    fn set_training(&mut self, training: bool);
    /// Extra state to restore on resume (e.g. dropout RNG positions).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores what [`Task::state`] returned.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Called before each pass over the evaluation set: reset what
    /// [`Task::eval_metrics`] accumulates.
    fn eval_begin(&mut self) {}
    /// Metrics beyond the loss, accumulated by [`Task::loss`] over the evaluation pass since
    /// [`Task::eval_begin`], named without the `eval_` prefix (the reward model's
    /// `("accuracy", 0.75)`). The trainer logs them as `eval_{name}` next to `eval_loss`, as
    /// HF's Trainer does with `compute_metrics`.
    fn eval_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

/// [`Task::loss_and_grads`] by one backward pass through [`Task::loss`].
pub fn plain_loss_and_grads<T: Task + ?Sized>(
    task: &mut T,
    batch: &[usize],
    scale: f64,
    vars: &[(String, Var)],
) -> Result<(f64, u64, Option<Gradients>)> {
    let (loss, tokens) = task.loss(batch, false)?;
    let lv = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    if !lv.is_finite() {
        return Ok((lv, tokens, None));
    }
    let store = (loss * scale)?.backward()?;
    Ok((lv, tokens, Some(Gradients::from_grad_store(&store, vars)?)))
}

const TASK_STATE: &str = "task_state.json";

/// Loop settings (from the HF training arguments).
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub output_dir: PathBuf,
    pub train_batch_size: usize,
    pub eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// > 0 overrides the epochs.
    pub max_steps: i64,
    pub learning_rate: f64,
    pub scheduler: SchedulerType,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    /// Evaluate every N steps (None = never, except at the end when a dev set exists).
    pub eval_steps: Option<usize>,
    pub load_best_model_at_end: bool,
    pub seed: u64,
    pub resume_from_checkpoint: Option<PathBuf>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub global_step: u64,
    pub train_loss: f64,
    pub eval_loss: Option<f64>,
    /// The final evaluation's further metrics, with their `eval_` prefix (`eval_accuracy`).
    pub eval_metrics: BTreeMap<String, f64>,
    pub runtime_secs: f64,
}

/// One pass over the evaluation set: the mean of the batch losses and the task's further
/// metrics, named `eval_{name}`. With several ranks, rank `r` evaluates the batches `b` with
/// `b % world_size == r`; the batch losses are summed over the ranks and the further metrics
/// (means over examples) are combined weighted by each rank's number of examples, which gives
/// the one-process values.
fn evaluate(task: &mut dyn Task, eval_set: usize, bs: usize) -> Result<(f64, Vec<(String, f64)>)> {
    let world = crate::dist::world();
    let (rank, ws) = (world.rank(), world.world_size());
    task.set_training(false);
    task.eval_begin();
    let idx: Vec<usize> = (0..eval_set).collect();
    let mut sum = 0.0;
    let mut n = 0usize;
    let mut examples = 0usize;
    for (bi, chunk) in idx.chunks(bs.max(1)).enumerate() {
        if bi % ws != rank {
            continue;
        }
        let (loss, _) = task.loss(chunk, true)?;
        sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n += 1;
        examples += chunk.len();
    }
    let mut metrics: Vec<(String, f64)> = task
        .eval_metrics()
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    task.set_training(true);
    if ws > 1 {
        let [s, c] = crate::dist::sum_f64([sum, n as f64])?;
        (sum, n) = (s, c as usize);
        metrics = combine_metrics(world, &metrics, examples)?;
    }
    Ok((if n == 0 { f64::NAN } else { sum / n as f64 }, metrics))
}

/// Where an optimizer step met its first non-finite loss.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NonFinite {
    /// On this rank: the index of the (micro-)batch and the loss it gave.
    Here(usize, f64),
    /// On another rank (this rank learns it from [`finish_step`]'s all-reduce).
    OtherRank,
}

/// Ends the gradient pass of an optimizer step. With several ranks, sums this rank's `loss`
/// and `tokens` over the ranks in place and shares whether any rank met a non-finite loss (one
/// all-reduce, so every rank stops together); with one process it changes nothing. When a
/// loss was non-finite, returns the error that stops training: `describe` says what happened
/// (`the loss became NaN at step 3 ...`), and the message goes on with the checkpoint to
/// resume from.
pub(crate) fn finish_step(
    loss: &mut f64,
    tokens: &mut u64,
    mut bad: Option<NonFinite>,
    last_good_checkpoint: Option<&Path>,
    describe: impl FnOnce(NonFinite) -> String,
) -> Result<()> {
    if crate::dist::world().world_size() > 1 {
        let flag = if bad.is_some() { 1.0 } else { 0.0 };
        let [l, t, f] = crate::dist::sum_f64([*loss, *tokens as f64, flag])?;
        (*loss, *tokens) = (l, t as u64);
        if f > 0.0 && bad.is_none() {
            bad = Some(NonFinite::OtherRank);
        }
    }
    let Some(bad) = bad else {
        return Ok(());
    };
    let keep = last_good_checkpoint
        .map(|p| format!("the last good checkpoint is {}", p.display()))
        .unwrap_or_else(|| "no checkpoint was saved yet".into());
    Err(Error::InvalidArgument(format!(
        "{}; stopping: {keep}. Try a lower --learning_rate or --max_grad_norm.",
        describe(bad)
    )))
}

/// Every rank's `(name, mean)` metrics over its `examples`, combined into the means over all
/// examples (names in first-seen rank order).
fn combine_metrics(
    world: &dyn llmtune_dist::Collective,
    local: &[(String, f64)],
    examples: usize,
) -> Result<Vec<(String, f64)>> {
    let mine = serde_json::json!({"n": examples, "m": local}).to_string();
    let mut order: Vec<String> = Vec::new();
    let mut acc: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for bytes in world.all_gather_bytes(mine.as_bytes())? {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Other(format!("evaluation metrics from another rank: {e}")))?;
        let n = v["n"].as_f64().unwrap_or(0.0);
        let m: Vec<(String, f64)> = serde_json::from_value(v["m"].clone())
            .map_err(|e| Error::Other(format!("evaluation metrics from another rank: {e}")))?;
        for (k, x) in m {
            if !acc.contains_key(&k) {
                order.push(k.clone());
            }
            let e = acc.entry(k).or_insert((0.0, 0.0));
            e.0 += x * n;
            e.1 += n;
        }
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let (s, n) = acc[&k];
            (k, if n > 0.0 { s / n } else { f64::NAN })
        })
        .collect())
}

/// Runs training. `train_len`/`eval_len` are the sizes of the sets `task.loss` indexes.
pub fn train(
    cfg: &TrainerConfig,
    vars: Vec<(String, Var)>,
    task: &mut dyn Task,
    train_len: usize,
    eval_len: usize,
) -> Result<TrainOutcome> {
    let out = &cfg.output_dir;
    // Data parallelism: rank `r` of `ws` takes the micro-batches `b` with `b % ws == r` of
    // every global batch of `accum * ws` micro-batches (accelerate's interleaved sharding), so
    // `ws` ranks with accumulation `accum` see what one process sees with `accum * ws`.
    let world = crate::dist::world();
    let (rank, ws) = (world.rank(), world.world_size());
    let main = rank == 0;
    std::fs::create_dir_all(out).map_err(|e| Error::io("create", out, e))?;
    if main {
        cleanup_stale_tmp(out)?;
    }
    if train_len == 0 {
        return Err(Error::InvalidArgument("no training samples".into()));
    }
    let bs = cfg.train_batch_size.max(1);
    let accum = cfg.gradient_accumulation_steps.max(1);
    let group = accum * ws;
    let batches_per_epoch = train_len.div_ceil(bs);
    let steps_per_epoch = (batches_per_epoch / group).max(1);
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps as u64
    } else {
        (cfg.num_train_epochs * steps_per_epoch as f64)
            .ceil()
            .max(1.0) as u64
    };
    let warmup = num_warmup_steps(total_steps, cfg.warmup_steps as u64, cfg.warmup_ratio)?;
    let mut sched = LrScheduler::new(cfg.scheduler, cfg.learning_rate, total_steps, warmup)?;
    let adam = AdamWConfig {
        lr: cfg.learning_rate,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::with_no_decay(vars.clone(), adam, crate::optim::is_no_decay_default)?;
    let mut state = TrainerState {
        max_steps: total_steps,
        logging_steps: cfg.logging_steps as u64,
        eval_steps: cfg.eval_steps.unwrap_or(0) as u64,
        save_steps: cfg.save_steps as u64,
        train_batch_size: Some(bs as u64),
        num_train_epochs: cfg.num_train_epochs.ceil() as u64,
        ..Default::default()
    };
    let mut pos = DataPosition {
        epoch: 0,
        step_in_epoch: 0,
        batch_in_epoch: 0,
        permutation_seed: cfg.seed,
    };
    let log = TrainerLog::new(out);
    let mut start_step = 0u64;
    if let Some(ck) = &cfg.resume_from_checkpoint {
        let loaded = load_checkpoint(ck, &mut opt)?;
        task.load(ck)?;
        let ts = ck.join(TASK_STATE);
        if ts.exists() {
            task.restore_state(&crate::io::read_json(&ts)?)?;
        }
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
    // Same starting weights everywhere (a fresh LoRA's random A matrices differ per process
    // only if seeding ever did; a resumed checkpoint is read by every rank).
    crate::dist::broadcast_vars(&vars)?;
    if ws > 1 && main {
        eprintln!(
            "data parallel: {ws} ranks ({}), global batch {} = {bs} per device x {accum} accumulation x {ws} ranks",
            world.backend(),
            bs * group
        );
    }
    opt.set_lr(sched.lr_at(start_step));

    let mut acc = GradAccumulator::new(vars.clone());
    let mut progress = if main {
        Progress::new(total_steps, cfg.logging_steps.max(1) as u64, start_step)
    } else {
        crate::progress::Progress::with_mode(
            total_steps,
            cfg.logging_steps.max(1) as u64,
            start_step,
            crate::progress::ProgressMode::Silent,
        )
    };
    let t0 = Instant::now();
    let mut window_loss = 0.0f64;
    let mut window_steps = 0u64;
    let mut total_loss = 0.0f64;
    let mut total_loss_steps = 0u64;
    let mut step_loss = 0.0f64;
    let mut step_tokens = 0u64;
    let mut last_eval = None;
    let mut last_good_checkpoint: Option<PathBuf> = None;
    task.set_training(true);

    'outer: while state.global_step < total_steps {
        let mut perm: Vec<usize> = (0..train_len).collect();
        Rng::from_seeds(&[pos.permutation_seed, pos.epoch]).shuffle(&mut perm);
        let batches: Vec<&[usize]> = perm.chunks(bs).collect();
        let usable = (steps_per_epoch * group).min(batches.len());
        let mut b = pos.batch_in_epoch as usize;
        while b < usable {
            // One optimizer step: global micro-batches b..end, this rank's share of them.
            let end = ((b / group + 1) * group).min(usable);
            let scale = 1.0 / group as f64;
            let mut bad: Option<NonFinite> = None;
            for gb in (b..end).filter(|gb| gb % ws == rank) {
                let (lv, tokens, grads) = task.loss_and_grads(batches[gb], scale, &vars)?;
                let Some(grads) = grads.filter(|_| lv.is_finite()) else {
                    bad = Some(NonFinite::Here(gb, lv));
                    break;
                };
                acc.add_gradients(&grads)?;
                step_loss += lv / group as f64;
                step_tokens += tokens;
            }
            b = end;
            finish_step(
                &mut step_loss,
                &mut step_tokens,
                bad,
                last_good_checkpoint.as_deref(),
                |bad| {
                    let (what, at) = match bad {
                        NonFinite::Here(gb, lv) => (format!("{lv}"), format!(", batch {gb}")),
                        NonFinite::OtherRank => ("on another rank".to_string(), String::new()),
                    };
                    format!(
                        "the loss became {what} at step {} (epoch {}{at})",
                        state.global_step + 1,
                        pos.epoch
                    )
                },
            )?;
            // Optimizer step.
            let mut g: Gradients = if acc.micro_batches() == 0 {
                crate::dist::zero_gradients(&vars)?
            } else {
                acc.finish()?
            };
            crate::dist::all_reduce_gradients(&mut g)?;
            if cfg.max_grad_norm > 0.0 {
                g.clip_global_norm(cfg.max_grad_norm)?;
            }
            let lr = sched.lr_at(state.global_step);
            opt.set_lr(lr);
            opt.step(&g)?;
            sched.step();
            state.global_step += 1;
            pos.batch_in_epoch = b as u64;
            pos.step_in_epoch += 1;
            let epoch_f = pos.epoch as f64 + pos.step_in_epoch as f64 / steps_per_epoch as f64;
            state.epoch = Some(epoch_f);
            window_loss += step_loss;
            window_steps += 1;
            total_loss += step_loss;
            total_loss_steps += 1;
            progress.update(&StepStats {
                step: state.global_step,
                loss: Some(step_loss),
                learning_rate: Some(lr),
                tokens: step_tokens,
            });
            step_loss = 0.0;
            step_tokens = 0;
            let step = state.global_step;
            let elapsed = t0.elapsed().as_secs_f64();
            if cfg.logging_steps > 0 && step % cfg.logging_steps as u64 == 0 {
                let loss = crate::io::py_round(window_loss / window_steps.max(1) as f64, 4);
                state.log(&[("loss", loss), ("learning_rate", lr)]);
                let mut line = TrainerLogLine::new(step, total_steps, step - start_step, elapsed);
                line.loss = Some(loss);
                line.learning_rate = Some(lr);
                line.epoch = Some(crate::io::py_round(epoch_f, 2));
                if main {
                    log.append(&line)?;
                }
                window_loss = 0.0;
                window_steps = 0;
            }
            if let Some(every) = cfg.eval_steps {
                if eval_len > 0 && every > 0 && step % every as u64 == 0 {
                    let (el, extra) = evaluate(task, eval_len, cfg.eval_batch_size)?;
                    let el = crate::io::py_round(el, 4);
                    let extra: Vec<(String, f64)> = extra
                        .into_iter()
                        .map(|(k, v)| (k, crate::io::py_round(v, 4)))
                        .collect();
                    let mut logged: Vec<(&str, f64)> = vec![("eval_loss", el)];
                    logged.extend(extra.iter().map(|(k, v)| (k.as_str(), *v)));
                    state.log(&logged);
                    let mut line =
                        TrainerLogLine::new(step, total_steps, step - start_step, elapsed);
                    line.eval_loss = Some(el);
                    line.extra = extra.iter().map(|(k, v)| (k.clone(), Some(*v))).collect();
                    line.epoch = Some(crate::io::py_round(epoch_f, 2));
                    if main {
                        log.append(&line)?;
                    }
                    let shown: String = logged
                        .iter()
                        .map(|(k, v)| format!(" {k} {v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    progress.println(&format!("step {step}:{shown}"));
                    last_eval = Some(el);
                }
            }
            if cfg.save_steps > 0 && step % cfg.save_steps as u64 == 0 {
                let name = format!("checkpoint-{step}");
                if let Some(el) = last_eval {
                    state.update_best(el, false, &out.join(&name).to_string_lossy());
                }
                if !main {
                    // Rank 0 alone writes checkpoints; the others hold the same state.
                    last_good_checkpoint = Some(out.join(&name));
                    if state.global_step >= total_steps {
                        break 'outer;
                    }
                    continue;
                }
                let rngs = BTreeMap::new();
                let dir = save_checkpoint(
                    out,
                    step,
                    &CheckpointData {
                        optimizer: &opt,
                        scheduler: &sched,
                        rngs: &rngs,
                        trainer_state: &state,
                        data_position: &pos,
                    },
                    |d| -> Result<()> {
                        task.save(d)?;
                        crate::io::write_json_sorted(&d.join(TASK_STATE), &task.state())
                    },
                )?;
                rotate_checkpoints(
                    out,
                    cfg.save_total_limit,
                    state.best_model_checkpoint.as_deref(),
                )?;
                last_good_checkpoint = Some(dir);
            }
            if state.global_step >= total_steps {
                break 'outer;
            }
        }
        pos.epoch += 1;
        pos.step_in_epoch = 0;
        pos.batch_in_epoch = 0;
    }
    progress.finish();
    let runtime = t0.elapsed().as_secs_f64();
    let train_loss = if total_loss_steps > 0 {
        total_loss / total_loss_steps as f64
    } else {
        f64::NAN
    };
    if cfg.load_best_model_at_end {
        if let Some(best) = state.best_model_checkpoint.clone() {
            eprintln!(
                "loading the best checkpoint {best} (eval_loss {})",
                state
                    .best_metric
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "unknown".into())
            );
            task.load(Path::new(&best))?;
        }
    }
    task.set_training(false);
    if main {
        task.save(out)?;
    }
    let mut m: Metrics = speed_metrics(
        "train",
        runtime,
        Some((train_len as f64 * cfg.num_train_epochs) as u64),
        Some(state.global_step - start_step),
    );
    m.insert("train_loss".into(), crate::state::f64_value(train_loss));
    m.insert(
        "epoch".into(),
        crate::state::f64_value(state.epoch.unwrap_or(0.0)),
    );
    if main {
        save_metrics(out, "train", &m)?;
    }
    state.log(&[
        ("train_loss", train_loss),
        ("train_runtime", crate::io::py_round(runtime, 4)),
    ]);
    let mut eval_loss = None;
    let mut eval_metrics = BTreeMap::new();
    if eval_len > 0 {
        let (el, extra) = evaluate(task, eval_len, cfg.eval_batch_size)?;
        let mut em = Metrics::new();
        em.insert("eval_loss".into(), crate::state::f64_value(el));
        for (k, v) in extra {
            em.insert(k.clone(), crate::state::f64_value(v));
            eval_metrics.insert(k, v);
        }
        em.insert(
            "epoch".into(),
            crate::state::f64_value(state.epoch.unwrap_or(0.0)),
        );
        if main {
            save_metrics(out, "eval", &em)?;
        }
        eval_loss = Some(el);
    }
    if main {
        state.save(&out.join("trainer_state.json"))?;
    }
    // Nobody leaves before rank 0 has written everything (a launcher may tear the job down
    // when the first process exits).
    world.barrier()?;
    Ok(TrainOutcome {
        global_step: state.global_step,
        train_loss,
        eval_loss,
        eval_metrics,
        runtime_secs: runtime,
    })
}
