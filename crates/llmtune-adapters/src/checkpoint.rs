//! `--checkpoint_dir a,b,c` for LoRA (SPEC §6).
//!
//! * Training with `--resume_lora_training true`: merge every folder but the last into the
//!   base, in order, and continue training the last (its matrices become the trainable
//!   adapter [`DEFAULT_ADAPTER`]).
//! * Otherwise (inference, or `false`): merge every folder; training then adds a fresh
//!   adapter ([`Checkpoints::ensure_trainable`]).

use std::path::{Path, PathBuf};

use crate::lora::{Lora, LoraConfig, DEFAULT_ADAPTER};
use crate::{Backbone, Result};

/// What [`apply_checkpoints`] did.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// The adapters now on the model (empty, or the resumed [`DEFAULT_ADAPTER`]).
    pub lora: Lora,
    /// Folders merged into the base weights, in order.
    pub merged: Vec<PathBuf>,
    /// The folder whose adapter continues training, if any.
    pub resumed: Option<PathBuf>,
}

impl Checkpoints {
    /// For training: when no adapter was resumed, adds a fresh trainable [`DEFAULT_ADAPTER`]
    /// from `config` (drawn from `seed`). Returns the name of the trainable adapter; it is the
    /// active one.
    pub fn ensure_trainable<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        config: &LoraConfig,
        seed: u64,
    ) -> Result<&'static str> {
        if !self.lora.contains(DEFAULT_ADAPTER) {
            self.lora
                .add_adapter(model, DEFAULT_ADAPTER, config, seed)?;
        }
        self.lora.set_active(DEFAULT_ADAPTER)?;
        Ok(DEFAULT_ADAPTER)
    }
}

/// Applies LoRA checkpoint folders to `model` (see the module docs). With `training` and
/// `resume_lora_training`, the last folder is loaded as the trainable, active
/// [`DEFAULT_ADAPTER`]; every other folder is merged, in order.
pub fn apply_checkpoints<M: Backbone + ?Sized, P: AsRef<Path>>(
    model: &mut M,
    dirs: &[P],
    resume_lora_training: bool,
    training: bool,
) -> Result<Checkpoints> {
    let mut lora = Lora::new();
    let mut merged = Vec::new();
    let mut resumed = None;
    let resume_last = training && resume_lora_training && !dirs.is_empty();
    for (i, dir) in dirs.iter().enumerate() {
        let dir = dir.as_ref();
        if resume_last && i + 1 == dirs.len() {
            lora.load_peft(model, dir, DEFAULT_ADAPTER, true)?;
            lora.set_active(DEFAULT_ADAPTER)?;
            resumed = Some(dir.to_path_buf());
        } else {
            const TMP: &str = "checkpoint";
            lora.load_peft(model, dir, TMP, false)?;
            lora.merge(model, TMP)?;
            merged.push(dir.to_path_buf());
        }
        tracing::info!(checkpoint = %dir.display(), "LoRA checkpoint applied");
    }
    Ok(Checkpoints {
        lora,
        merged,
        resumed,
    })
}
