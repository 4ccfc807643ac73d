//! Every argument of `llmtune train`, with the reference's names and defaults
//! (ChatGLM-Efficient-Tuning's model/data/finetuning arguments and HF `TrainingArguments`).
//!
//! One struct serves the command line (clap; the doc comments are the help), config files
//! (`llmtune train config.yaml`, same keys) and the saved `training_args.json`.

use serde::{Deserialize, Serialize};

/// Parses booleans as HF's argument parser does (`true/false/True/False/1/0/yes/no`); a
/// bare `--flag` means true.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "t" => Ok(true),
        "false" | "0" | "no" | "n" | "f" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true/false)")),
    }
}

fn parse_scheduler(s: &str) -> Result<crate::schedule::SchedulerType, String> {
    s.parse().map_err(|e: crate::error::Error| e.to_string())
}

macro_rules! flag {
    () => {
        "true"
    };
}

/// The training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StageArg {
    Sft,
    Rm,
    Ppo,
    Dpo,
}

/// How the model is fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum FinetuningType {
    Lora,
    Freeze,
    PTuning,
    Full,
    None,
}

/// When to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalStrategy {
    No,
    Steps,
    Epoch,
}

/// `llmtune train` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    // ---- stage and actions ----
    /// Training stage: sft, rm, ppo or dpo.
    #[arg(long, value_enum, default_value = "sft")]
    pub stage: StageArg,
    /// Run training.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub do_train: bool,
    /// Evaluate on the evaluation set (loss; scores with --predict_with_generate).
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub do_eval: bool,
    /// Predict on the dataset (needs --predict_with_generate for stage sft).
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub do_predict: bool,
    /// Generate text when predicting, and score it with BLEU/ROUGE.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub predict_with_generate: bool,

    // ---- model ----
    /// A HF model folder, a .gguf file, or a built-in alias (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// Comma-separated adapter folders applied in order (only LoRA may list several).
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// The reward model's output folder (stage ppo).
    #[arg(long)]
    pub reward_model: Option<String>,
    /// DPO's beta (stage dpo): the rewards are beta x (policy - reference) log-probability of
    /// an answer; larger keeps the policy closer to the reference.
    #[arg(long, default_value_t = 0.1, alias = "pref_beta")]
    #[serde(default = "default_dpo_beta")]
    pub dpo_beta: f64,
    /// Continue training the last checkpoint_dir adapter (true) or merge all and add a new one.
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub resume_lora_training: bool,
    /// Quantize the frozen base to 4 or 8 bits for LoRA (QLoRA's memory saving): the decoder
    /// layers' linear weights become GGML Q4_1 (4) or Q8_0 (8) blocks after any
    /// --checkpoint_dir is merged; embeddings, norms and the LM head stay as loaded. CPU,
    /// Llama-family models, --stage sft, rm and dpo (training and prediction).
    #[arg(long)]
    pub quantization_bit: Option<u32>,
    /// Save loss (and reward) plots.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub plot_loss: bool,
    /// Accepted for compatibility (the Rust tokenizer is always the fast one).
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub use_fast_tokenizer: bool,
    /// Compute dtype on GPU: bf16, fp16 or fp32 (CPU always computes in fp32).
    #[arg(long)]
    pub compute_dtype: Option<String>,
    /// Chat template (default: the model's own).
    #[arg(long)]
    pub template: Option<String>,

    // ---- data ----
    /// Comma-separated dataset names from dataset_info.json, concatenated in order.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Folder holding dataset_info.json.
    #[arg(long, default_value = "data")]
    pub dataset_dir: String,
    /// Longest source (prompt) in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_source_length: usize,
    /// Longest target (response) in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_target_length: usize,
    /// Use only the first N samples of each dataset.
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Text prepended to every prompt (the system prompt where the template has one).
    #[arg(long)]
    pub source_prefix: Option<String>,
    /// Fraction of the training data held out for evaluation (shuffled by --seed).
    #[arg(long, default_value_t = 0.0)]
    pub dev_ratio: f64,
    /// Ignore padding in the loss.
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub ignore_pad_token_for_loss: bool,
    /// Rebuild the encoded-data cache.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub overwrite_cache: bool,
    /// Threads for encoding.
    #[arg(long)]
    pub preprocessing_num_workers: Option<usize>,
    /// Beams for evaluation generation (only 1 is supported).
    #[arg(long)]
    pub eval_num_beams: Option<usize>,

    // ---- fine-tuning ----
    /// lora, freeze, p_tuning, full or none.
    #[arg(long, value_enum, default_value = "lora")]
    pub finetuning_type: FinetuningType,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Comma-separated module names to adapt, or `all` (default: q_proj,v_proj; query_key_value for ChatGLM).
    #[arg(long)]
    pub lora_target: Option<String>,
    /// Freeze tuning: how many last layers are trainable.
    #[arg(long, default_value_t = 3)]
    pub num_layer_trainable: usize,
    /// Freeze tuning: mlp or qkv.
    #[arg(long, default_value = "mlp")]
    pub name_module_trainable: String,
    /// P-Tuning v2 prefix length.
    #[arg(long, default_value_t = 64)]
    pub pre_seq_len: usize,

    // ---- training (HF TrainingArguments) ----
    /// Where checkpoints, logs, plots and results go.
    #[arg(long)]
    pub output_dir: Option<String>,
    /// Overwrite a non-empty output_dir.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub overwrite_output_dir: bool,
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides num_train_epochs when > 0.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// linear, cosine, constant, constant_with_warmup or polynomial.
    #[arg(long, default_value = "linear", value_parser = parse_scheduler)]
    pub lr_scheduler_type: crate::schedule::SchedulerType,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Log every N optimizer steps.
    #[arg(long, default_value_t = 500)]
    pub logging_steps: usize,
    /// Save a checkpoint every N optimizer steps.
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,
    /// Keep at most N checkpoints (the best is never deleted).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Evaluate every N steps (default: logging_steps).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// no, steps or epoch (also spelled --eval_strategy).
    #[arg(long, value_enum, default_value = "no", alias = "eval_strategy")]
    pub evaluation_strategy: EvalStrategy,
    /// Restore the best checkpoint (by eval_loss) at the end.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub load_best_model_at_end: bool,
    /// Metric that picks the best checkpoint (default eval_loss, lower is better).
    #[arg(long)]
    pub metric_for_best_model: Option<String>,
    /// Mixed precision fp16 (GPU; ignored with a warning on CPU).
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub fp16: bool,
    /// Mixed precision bf16 (GPU; ignored with a warning on CPU).
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub bf16: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A checkpoint folder, or `true` for the latest in output_dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Multi-process backend: `mpi` (CPU; launch with mpirun/srun, feature `mpi`), `nccl`
    /// (GPU; torchrun environment, feature `nccl`), `none`, or unset for automatic (MPI when an
    /// MPI launcher started us, NCCL when `WORLD_SIZE` > 1 on a GPU, else one process).
    #[arg(long)]
    #[serde(default)]
    pub ddp_backend: Option<String>,
    /// Seconds a collective may wait for the other ranks before the job is aborted (NCCL's
    /// watchdog; MPI jobs end through mpirun when a rank dies).
    #[arg(long, default_value_t = 1800)]
    #[serde(default = "default_ddp_timeout")]
    pub ddp_timeout: u64,
    /// Max generated length when predicting (overrides max_target_length + 1 new tokens).
    #[arg(long)]
    pub generation_max_length: Option<usize>,
    /// Recompute activations in backward to save memory.
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub gradient_checkpointing: bool,
    /// Print the expected peak memory of this training run and the largest
    /// --per_device_train_batch_size that fits, then exit without training: runs one optimizer
    /// step at 1 and at 2 rows of the longest training example and extrapolates (CPU, SFT, RM and DPO).
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub estimate_memory: bool,

    // ---- generation ----
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = flag!(), value_parser = parse_bool)]
    pub do_sample: bool,
    #[arg(long, default_value_t = 0.95)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.7)]
    pub top_p: f64,
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
}

fn default_dpo_beta() -> f64 {
    0.1
}

fn default_ddp_timeout() -> u64 {
    1800
}

impl TrainArgs {
    /// The checkpoint_dir list.
    pub fn checkpoint_dirs(&self) -> Vec<String> {
        self.checkpoint_dir
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The checks of SPEC §2 that fail fast, each naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.estimate_memory && (!self.do_train || self.stage == StageArg::Ppo) {
            return Err(
                "--estimate_memory works with --do_train for --stage sft, rm and dpo (not ppo yet)"
                    .into(),
            );
        }
        if self.stage == StageArg::Dpo {
            if self.finetuning_type != FinetuningType::Lora {
                return Err(
                    "--stage dpo trains a LoRA adapter (--finetuning_type lora): its reference \
                     model is the model with the adapter disabled"
                        .into(),
                );
            }
            if !(self.dpo_beta.is_finite() && self.dpo_beta > 0.0) {
                return Err(format!("--dpo_beta must be > 0, got {}", self.dpo_beta));
            }
            if self.gradient_checkpointing {
                return Err(
                    "--gradient_checkpointing is not supported with --stage dpo yet".into(),
                );
            }
        }
        if self.predict_with_generate && self.stage != StageArg::Sft {
            return Err("--predict_with_generate is only for --stage sft".into());
        }
        if self.predict_with_generate && self.do_train {
            return Err("--predict_with_generate cannot be used with --do_train".into());
        }
        if self.do_predict && self.stage == StageArg::Sft && !self.predict_with_generate {
            return Err("--do_predict with --stage sft needs --predict_with_generate".into());
        }
        if self.quantization_bit.is_some()
            && matches!(
                self.finetuning_type,
                FinetuningType::Full | FinetuningType::Freeze
            )
        {
            return Err(
                "--quantization_bit cannot be used with --finetuning_type full or freeze".into(),
            );
        }
        if let Some(b) = self.quantization_bit {
            if b != 4 && b != 8 {
                return Err(format!("--quantization_bit must be 4 or 8, got {b}"));
            }
            if self.stage == StageArg::Ppo {
                return Err(
                    "--quantization_bit is not supported with --stage ppo yet (its rollouts \
                     fold the policy adapter into the base weights)"
                        .into(),
                );
            }
        }
        if self.checkpoint_dirs().len() > 1 && self.finetuning_type != FinetuningType::Lora {
            return Err(
                "more than one --checkpoint_dir is only supported with --finetuning_type lora"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.dev_ratio) {
            return Err(format!(
                "--dev_ratio must be in [0, 1), got {}",
                self.dev_ratio
            ));
        }
        if self.per_device_train_batch_size == 0 {
            return Err("--per_device_train_batch_size must be at least 1".into());
        }
        if self.per_device_eval_batch_size == 0 {
            return Err("--per_device_eval_batch_size must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return Err("--gradient_accumulation_steps must be at least 1".into());
        }
        if self.lora_rank == 0 {
            return Err("--lora_rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "--lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if self.stage == StageArg::Ppo && self.do_train && self.reward_model.is_none() {
            return Err("--stage ppo needs --reward_model (the reward model's output_dir)".into());
        }
        if (self.do_train || self.do_eval || self.do_predict) && self.dataset.is_none() {
            return Err("--dataset is required".into());
        }
        if (self.do_train || self.do_predict) && self.output_dir.is_none() {
            return Err("--output_dir is required".into());
        }
        if !self.do_train && !self.do_eval && !self.do_predict {
            return Err("nothing to do: pass --do_train, --do_eval or --do_predict".into());
        }
        if self.num_beams != 1 || self.eval_num_beams.map(|b| b != 1).unwrap_or(false) {
            return Err(
                "--num_beams/--eval_num_beams: only 1 (no beam search) is supported".into(),
            );
        }
        if !matches!(self.name_module_trainable.as_str(), "mlp" | "qkv") {
            return Err(format!(
                "--name_module_trainable must be mlp or qkv, got {:?}",
                self.name_module_trainable
            ));
        }
        Ok(())
    }
}

/// Turns a config file (`.json`, or flat `key: value` `.yaml`/`.yml`) into `--key value`
/// arguments, so the command line parser handles both the same way (later flags on the
/// command line override the file).
pub fn config_file_to_args(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut pairs: Vec<(String, String)> = Vec::new();
    if ext == "json" {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("config file {}: invalid JSON: {e}", path.display()))?;
        let obj = v.as_object().ok_or_else(|| {
            format!(
                "config file {}: expected a JSON object of flag: value",
                path.display()
            )
        })?;
        for (k, v) in obj {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            pairs.push((k.clone(), s));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            let line = line.split(" #").next().unwrap_or("").trim_end();
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
                continue;
            }
            let (k, v) = trimmed.split_once(':').ok_or_else(|| {
                format!(
                    "config file {}:{}: expected `key: value`, got {trimmed:?}",
                    path.display(),
                    i + 1
                )
            })?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            if v.is_empty() || v == "null" || v == "~" {
                continue;
            }
            pairs.push((k.trim().to_string(), v.to_string()));
        }
    }
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.push(format!("--{k}"));
        out.push(v);
    }
    Ok(out)
}
