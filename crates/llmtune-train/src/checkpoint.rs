//! `checkpoint-N/` directories: complete, atomic, resumable.
//!
//! A checkpoint is written into `checkpoint-N.tmp-<pid>-<seq>/`, every file
//! fsynced, then the directory is renamed to `checkpoint-N`. A kill at any
//! moment therefore leaves either the complete new checkpoint or none, and
//! the previous ones untouched; [`crate::io::cleanup_stale_tmp`] (call it on
//! start) removes the leftovers. Pruning renames a checkpoint to a temporary
//! name before deleting it, so a half-deleted directory never looks like a
//! checkpoint either.
//!
//! Contents:
//!
//! | file | written by |
//! |---|---|
//! | adapter, value head, ... | the caller's `write_files` closure |
//! | `optimizer.safetensors`, `optimizer.json` | [`AdamW::save_state`] |
//! | `scheduler.json` | [`LrScheduler::save`] |
//! | `rng_state.json` | named [`RngState`]s (`{"data": {...}, "dropout": {...}}`) |
//! | `trainer_state.json` | [`TrainerState::save`] |
//! | `data_position.json` | [`DataPosition`] |

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{create_dir_all, parent_dir, read_json, sync_dir, tmp_sibling, write_json_sorted};
use crate::optim::AdamW;
use crate::rng::RngState;
use crate::schedule::{LrScheduler, SCHEDULER_NAME};
use crate::state::{TrainerState, TRAINER_STATE_NAME};

/// Checkpoint directory prefix (HF's `PREFIX_CHECKPOINT_DIR`).
pub const PREFIX_CHECKPOINT_DIR: &str = "checkpoint";
/// File name of the RNG states.
pub const RNG_STATE_NAME: &str = "rng_state.json";
/// File name of the data position.
pub const DATA_POSITION_NAME: &str = "data_position.json";

/// Where the data loader stands, so a resumed run feeds the same batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// The (0-based) epoch the next batch comes from.
    pub epoch: u64,
    /// Optimizer steps already completed within `epoch`.
    pub step_in_epoch: u64,
    /// Micro-batches of `epoch` already consumed (skip these on resume).
    pub batch_in_epoch: u64,
    /// Seed of the permutation that orders `epoch`'s samples.
    pub permutation_seed: u64,
}

/// Everything the trainer saves besides the caller's files.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointData<'a> {
    /// The optimizer (moments and step).
    pub optimizer: &'a AdamW,
    /// The learning-rate schedule and its position.
    pub scheduler: &'a LrScheduler,
    /// Every RNG whose stream must continue on resume, by name.
    pub rngs: &'a BTreeMap<String, RngState>,
    /// The trainer state (log history, best checkpoint, ...).
    pub trainer_state: &'a TrainerState,
    /// Where the data loader stands.
    pub data_position: &'a DataPosition,
}

/// What [`load_checkpoint`] restores besides the optimizer (which it loads in
/// place) and the caller's files (read them from `path`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// The schedule, at the saved step.
    pub scheduler: LrScheduler,
    /// The saved RNG states, by name.
    pub rngs: BTreeMap<String, RngState>,
    /// The saved trainer state (`global_step` is the step to resume from).
    pub trainer_state: TrainerState,
    /// The saved data position.
    pub data_position: DataPosition,
}

/// `<output_dir>/checkpoint-<step>`.
pub fn checkpoint_path(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX_CHECKPOINT_DIR}-{step}"))
}

/// The step of a `checkpoint-N` directory name (nothing for other names,
/// temporaries included).
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(PREFIX_CHECKPOINT_DIR)?
        .strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Write `checkpoint-<step>` in `output_dir` atomically and return its path.
///
/// `write_files` writes the caller's files (adapter, value head, ...) into
/// the directory it is given (the temporary one); then the trainer files are
/// added, everything is fsynced and the directory renamed into place. An
/// existing `checkpoint-<step>` is replaced. On error nothing is left behind
/// and existing checkpoints are untouched.
pub fn save_checkpoint<F, E>(
    output_dir: &Path,
    step: u64,
    data: &CheckpointData<'_>,
    write_files: F,
) -> Result<PathBuf>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    create_dir_all(output_dir)?;
    let target = checkpoint_path(output_dir, step);
    let tmp = tmp_sibling(&target);
    create_dir_all(&tmp)?;
    let result = fill_checkpoint(&tmp, data, write_files).and_then(|()| {
        sync_tree(&tmp)?;
        install(&tmp, &target)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(target)
}

fn fill_checkpoint<F, E>(dir: &Path, data: &CheckpointData<'_>, write_files: F) -> Result<()>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    write_files(dir).map_err(|e| Error::CheckpointFiles {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    data.optimizer.save_state(dir)?;
    data.scheduler.save(&dir.join(SCHEDULER_NAME))?;
    write_json_sorted(&dir.join(RNG_STATE_NAME), data.rngs)?;
    data.trainer_state.save(&dir.join(TRAINER_STATE_NAME))?;
    write_json_sorted(&dir.join(DATA_POSITION_NAME), data.data_position)?;
    Ok(())
}

/// Fsync every file under `dir`, and the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| Error::io("stat", &path, e))?;
        if ty.is_dir() {
            sync_tree(&path)?;
        } else if ty.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("fsync", &path, e))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Rename the complete `tmp` to `target`, replacing an existing `target`.
fn install(tmp: &Path, target: &Path) -> Result<()> {
    let old = if target.exists() {
        let old = tmp_sibling(target);
        fs::rename(target, &old).map_err(|e| Error::io("rename", target, e))?;
        Some(old)
    } else {
        None
    };
    fs::rename(tmp, target).map_err(|e| Error::io("rename", target, e))?;
    sync_dir(&parent_dir(target));
    if let Some(old) = old {
        fs::remove_dir_all(&old).map_err(|e| Error::io("remove", &old, e))?;
    }
    Ok(())
}

/// Load the checkpoint at `path`: restores `optimizer` in place (all or
/// nothing) and returns the rest. Errors name the checkpoint and the file.
pub fn load_checkpoint(path: &Path, optimizer: &mut AdamW) -> Result<LoadedCheckpoint> {
    if !path.is_dir() {
        return Err(Error::state(path, "checkpoint directory not found"));
    }
    let trainer_state = TrainerState::load(&path.join(TRAINER_STATE_NAME))?;
    let scheduler = LrScheduler::load(&path.join(SCHEDULER_NAME))?;
    let rngs: BTreeMap<String, RngState> = read_json(&path.join(RNG_STATE_NAME))?;
    let data_position: DataPosition = read_json(&path.join(DATA_POSITION_NAME))?;
    if let Some(step) = path
        .file_name()
        .and_then(|n| checkpoint_step(&n.to_string_lossy()))
    {
        if step != trainer_state.global_step {
            return Err(Error::state(
                path,
                format!(
                    "the directory says step {step} but {TRAINER_STATE_NAME} says global_step {}",
                    trainer_state.global_step
                ),
            ));
        }
    }
    optimizer.load_state(path)?;
    Ok(LoadedCheckpoint {
        path: path.to_path_buf(),
        scheduler,
        rngs,
        trainer_state,
        data_position,
    })
}

/// The complete checkpoints of `output_dir` as `(step, path)`, by step.
/// A missing `output_dir` has none.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", output_dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", output_dir, e))?;
        let Some(step) = checkpoint_step(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint with the highest step in `output_dir` (HF's
/// `get_last_checkpoint`).
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Interpret `--resume_from_checkpoint`: `true` (any case) is the latest
/// checkpoint of `output_dir` (an error if there is none), `false`, `none` or
/// empty is no resume, anything else a checkpoint directory that must exist.
pub fn resolve_resume_from_checkpoint(output_dir: &Path, value: &str) -> Result<Option<PathBuf>> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "false" | "none" => Ok(None),
        "true" => match latest_checkpoint(output_dir)? {
            Some(p) => Ok(Some(p)),
            None => Err(Error::InvalidArgument(format!(
                "--resume_from_checkpoint: no valid checkpoint found in output directory ({})",
                output_dir.display()
            ))),
        },
        _ => {
            let p = PathBuf::from(value.trim());
            if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(Error::InvalidArgument(format!(
                    "--resume_from_checkpoint: can't find a valid checkpoint at {}",
                    p.display()
                )))
            }
        }
    }
}

/// Apply `save_total_limit` as HF's `_rotate_checkpoints`: delete the oldest
/// checkpoints so that `limit` remain, never the best one. The best
/// checkpoint (its directory name is compared) is kept in addition to the
/// newest `limit - 1`; with `limit == 1` and a best that is not the newest,
/// two remain (the best and the newest). `None` or `Some(0)`: no limit.
/// Returns the deleted directories.
pub fn rotate_checkpoints(
    output_dir: &Path,
    limit: Option<usize>,
    best_model_checkpoint: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let Some(limit) = limit.filter(|&l| l > 0) else {
        return Ok(Vec::new());
    };
    let mut sorted: Vec<PathBuf> = list_checkpoints(output_dir)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if sorted.len() <= limit {
        return Ok(Vec::new());
    }
    let best_name = best_model_checkpoint
        .and_then(|b| Path::new(b).file_name())
        .map(|n| n.to_os_string());
    let best_index = best_name.as_ref().and_then(|b| {
        sorted
            .iter()
            .position(|p| p.file_name() == Some(b.as_os_str()))
    });
    if let Some(i) = best_index {
        // HF bubbles the best checkpoint up to the second-to-last position
        // (it stays where it is if it is already one of the two newest).
        let len = sorted.len();
        let at = if i + 2 < len { len - 2 } else { i };
        let best = sorted.remove(i);
        sorted.insert(at, best);
    }
    let mut limit = limit;
    if limit == 1
        && best_name.is_some()
        && sorted.last().and_then(|p| p.file_name()) != best_name.as_deref()
    {
        limit = 2;
    }
    let n_delete = sorted.len().saturating_sub(limit);
    let mut deleted = Vec::with_capacity(n_delete);
    for path in sorted.into_iter().take(n_delete) {
        let doomed = tmp_sibling(&path);
        fs::rename(&path, &doomed).map_err(|e| Error::io("rename", &path, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io("remove", &doomed, e))?;
        tracing::info!(
            "Deleting older checkpoint [{}] due to save_total_limit",
            path.display()
        );
        deleted.push(path);
    }
    Ok(deleted)
}
