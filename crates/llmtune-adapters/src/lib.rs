//! What is trained: LoRA adapters, freeze and full fine-tuning, and the reward model's value
//! head (SPEC §6, §8).
//!
//! * [`lora`]: LoRA on named linear layers, `y = W x (+ b) + (alpha / r) * B A dropout(x)`.
//!   Several named adapters live on one backbone; they are enabled, disabled and swapped through
//!   shared state, without rebuilding the model (PPO's reference model = adapters disabled, the
//!   reward adapter swapped in to score). [`Lora::merge`] folds an adapter into the base weights.
//! * [`peft`]: the PEFT file format (`adapter_model.safetensors`/`.bin` + `adapter_config.json`),
//!   in and out, so Python PEFT loads what we save and we load what it saves.
//! * [`checkpoint`]: `--checkpoint_dir a,b,c` semantics ([`apply_checkpoints`]).
//! * [`tune`]: `--finetuning_type freeze|full`: base tensors turned into trainable variables.
//! * [`value_head`]: `Linear(hidden, 1)` on the final hidden state (TRL's `ValueHead`).
//!
//! The functions take any model implementing [`Backbone`] (implemented for [`Llama`],
//! [`ChatGlm`] and [`ChatGlm2`]), so other architectures built from the same [`Linear`] layer
//! can reuse everything here.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmtune_models::{CausalLm, ChatGlm, ChatGlm2, Linear, Llama};

pub mod checkpoint;
mod io;
pub mod lora;
pub mod peft;
mod rng;
pub mod tune;
pub mod value_head;

pub use checkpoint::{apply_checkpoints, Checkpoints};
pub use io::save_safetensors;
pub use lora::{Lora, LoraConfig, LoraTarget, SwitchGuard, DEFAULT_ADAPTER};
pub use peft::PeftAdapter;
pub use tune::{freeze, full, load_params, save_params, ModuleGroup};
pub use value_head::{pairwise_ranking_loss, ValueHead};

/// Errors of this crate. Each names the file (and tensor key) it is about.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is malformed or holds something we do not support.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A tensor of a file is unexpected, missing or has the wrong shape.
    #[error("{path}: tensor {key}: {msg}")]
    Tensor {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// Bad arguments (unknown adapter name, bad rank, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl AdapterError {
    pub(crate) fn file(path: &Path, msg: impl Into<String>) -> Self {
        Self::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(path: &Path, key: &str, msg: impl Into<String>) -> Self {
        Self::Tensor {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, AdapterError>;

/// A model that adapters attach to: its linear layers and parameters by HF name.
pub trait Backbone {
    /// Every linear layer by HF module name (e.g. `model.layers.0.self_attn.q_proj`).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Every parameter tensor by HF name (e.g. `model.layers.0.mlp.up_proj.weight`).
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;
    /// The compute dtype of the weights.
    fn dtype(&self) -> DType;
    /// The device the weights live on.
    fn device(&self) -> Device;
}

impl Backbone for Llama {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        Llama::linears_mut(self)
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Llama::params_mut(self)
    }
    fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }
    fn dtype(&self) -> DType {
        Llama::dtype(self)
    }
    fn device(&self) -> Device {
        Llama::device(self).clone()
    }
}

impl Backbone for ChatGlm {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        ChatGlm::linears_mut(self)
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        ChatGlm::params_mut(self)
    }
    fn num_layers(&self) -> usize {
        self.cfg.num_layers
    }
    fn dtype(&self) -> DType {
        ChatGlm::dtype(self)
    }
    fn device(&self) -> Device {
        ChatGlm::device(self).clone()
    }
}

impl Backbone for ChatGlm2 {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        ChatGlm2::linears_mut(self)
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        ChatGlm2::params_mut(self)
    }
    fn num_layers(&self) -> usize {
        self.cfg.num_layers
    }
    fn dtype(&self) -> DType {
        ChatGlm2::dtype(self)
    }
    fn device(&self) -> Device {
        ChatGlm2::device(self).clone()
    }
}

impl Backbone for CausalLm {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        CausalLm::linears_mut(self)
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        CausalLm::params_mut(self)
    }
    fn num_layers(&self) -> usize {
        CausalLm::num_layers(self)
    }
    fn dtype(&self) -> DType {
        CausalLm::dtype(self)
    }
    fn device(&self) -> Device {
        CausalLm::device(self).clone()
    }
}

/// The dtype of trainable copies for a model computing in `dtype`: f64 stays f64 (gradient
/// checks), everything else gets f32 master weights.
pub fn master_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
