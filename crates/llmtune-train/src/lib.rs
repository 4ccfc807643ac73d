//! Training building blocks for llmtune: the optimizer, schedules, logs,
//! checkpoints, plots and progress reporting that the trainer loop and the
//! stage recipes (SFT, RM, PPO) are wired from.
//!
//! | module | what |
//! |---|---|
//! | [`optim`] | [`AdamW`] (torch's), [`Gradients`] (from a `GradStore`, clipping by global norm), [`GradAccumulator`] |
//! | [`schedule`] | [`LrScheduler`]: linear, cosine, constant, constant_with_warmup, polynomial, with warmup, as transformers |
//! | [`state`] | [`TrainerState`] (`trainer_state.json`), [`save_metrics`] (`*_results.json`, `all_results.json`) |
//! | [`log`] | `trainer_log.jsonl` lines as the reference's `LogCallback` |
//! | [`checkpoint`] | atomic `checkpoint-N/` save/load, `save_total_limit` pruning, `--resume_from_checkpoint` |
//! | [`plot`] | `training_{key}.png` loss/reward curves |
//! | [`ppo`] | PPO: TRL 0.4's rewards, GAE, clipped losses and KL controller; rollout layout and scoring |
//! | [`progress`] | a terminal bar or plain log lines |
//! | [`rng`] | [`Rng`], a seedable RNG with a serialisable state |
//! | [`dist`] | data parallelism over `llmtune-dist`'s collectives: gradient all-reduce, weight broadcast, sharding |
//! | [`io`] | [`atomic_write`], [`write_json_sorted`], Python-compatible JSON |
//!
//! Every file is written atomically (temporary + fsync + rename) and JSON is
//! formatted as Python's `json` module formats it, so the files match the
//! reference's byte for byte for the same values.

pub mod args;
pub mod checkpoint;
pub mod checkpointing;
pub mod dist;
pub mod error;
pub mod io;
pub mod log;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod ppo;
pub mod progress;
pub mod rng;
pub mod schedule;
pub mod stages;
pub mod state;
pub mod trainer;

pub use checkpoint::{
    latest_checkpoint, load_checkpoint, resolve_resume_from_checkpoint, rotate_checkpoints,
    save_checkpoint, CheckpointData, DataPosition, LoadedCheckpoint,
};
pub use error::{Error, Result};
pub use io::{atomic_write, cleanup_stale_tmp, write_json_sorted};
pub use log::{TrainerLog, TrainerLogLine};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, Gradients};
pub use plot::plot_loss;
pub use progress::{Progress, ProgressMode, StepStats};
pub use rng::{Rng, RngState};
pub use schedule::{num_warmup_steps, LrScheduler, SchedulerType};
pub use state::{save_metrics, speed_metrics, Metrics, TrainerState};
