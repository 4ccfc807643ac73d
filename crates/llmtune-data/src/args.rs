//! Data arguments (same names and defaults as the reference) and the training stage.

use std::path::PathBuf;

use crate::error::{DataError, Result};

/// The training stage a dataset is prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Supervised fine-tuning (and `--do_predict` with `--predict_with_generate`).
    Sft,
    /// Reward modelling on preference pairs (`output` = `[chosen, rejected]`).
    Rm,
    /// PPO: prompts only.
    Ppo,
}

impl Stage {
    /// Parses `sft`, `rm` or `ppo`.
    pub fn parse(s: &str) -> Result<Stage> {
        match s {
            "sft" => Ok(Stage::Sft),
            // DPO trains on the reward model's preference pairs.
            "rm" | "dpo" => Ok(Stage::Rm),
            "ppo" => Ok(Stage::Ppo),
            other => Err(DataError::BadArg {
                arg: "stage",
                msg: format!("`{other}` is not one of sft, rm, dpo, ppo"),
            }),
        }
    }

    /// The stage's name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Rm => "rm",
            Stage::Ppo => "ppo",
        }
    }

    /// Whether the stage reads preference pairs.
    pub fn is_pairwise(self) -> bool {
        matches!(self, Stage::Rm)
    }

    /// How examples of this stage are encoded.
    pub fn encode_mode(self, predict_with_generate: bool) -> EncodeMode {
        match self {
            Stage::Sft if predict_with_generate => EncodeMode::Prompt,
            Stage::Sft => EncodeMode::Supervised,
            Stage::Ppo => EncodeMode::Prompt,
            Stage::Rm => EncodeMode::Pairwise,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three encodings of SPEC §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum EncodeMode {
    /// SFT training: `source + specials + target + eos`, labels masked over the prompt.
    Supervised,
    /// SFT predict and PPO queries: `source + specials`, labels = the target ids.
    Prompt,
    /// RM: chosen and rejected, each `source + specials + response + eos`.
    Pairwise,
}

/// Data arguments, named as the reference names its flags.
///
/// `dataset` and `dataset_dir` say what to read; the rest say how to encode it. Defaults
/// are the reference's (SPEC §2).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DataArgs {
    /// Dataset names registered in `dataset_dir/dataset_info.json`, concatenated in order.
    pub dataset: Vec<String>,
    /// The folder holding `dataset_info.json` and the data files (default `data`).
    pub dataset_dir: PathBuf,
    /// The prompt template name (see [`crate::template::Template::names`]). The CLI should
    /// pick [`crate::template::Template::default_for_model_type`] when the user gives none.
    pub template: String,
    /// Maximum prompt length in tokens, template specials included (default 512).
    pub max_source_length: usize,
    /// Maximum target length in tokens, eos included (default 512).
    pub max_target_length: usize,
    /// Keep only the first N records of each dataset (before filtering).
    pub max_samples: Option<usize>,
    /// Text placed before the prompt: the template's system message (for `chatglm` raw
    /// text before `[Round 1]`, exactly as the reference prepends it).
    pub source_prefix: Option<String>,
    /// Fraction of the training data held out for evaluation (0 = none).
    pub dev_ratio: f64,
    /// Seed of the dev split shuffle (default 42).
    pub seed: u64,
    /// Pad labels with -100 (ignored by the loss) instead of the pad id (default true).
    pub ignore_pad_token_for_loss: bool,
    /// Rebuild the encoded-data cache even when a valid one exists.
    pub overwrite_cache: bool,
    /// Threads used for encoding (default: all available cores).
    pub preprocessing_num_workers: Option<usize>,
    /// Where encoded datasets are cached. Default: `$LLMTUNE_HOME/cache` when
    /// `LLMTUNE_HOME` is set, else `<dataset_dir>/.llmtune_cache`.
    pub cache_dir: Option<PathBuf>,
    /// Turns the cache off entirely (nothing read, nothing written).
    pub disable_cache: bool,
}

impl Default for DataArgs {
    fn default() -> Self {
        DataArgs {
            dataset: Vec::new(),
            dataset_dir: PathBuf::from("data"),
            template: "chatglm".to_string(),
            max_source_length: 512,
            max_target_length: 512,
            max_samples: None,
            source_prefix: None,
            dev_ratio: 0.0,
            seed: 42,
            ignore_pad_token_for_loss: true,
            overwrite_cache: false,
            preprocessing_num_workers: None,
            cache_dir: None,
            disable_cache: false,
        }
    }
}

impl DataArgs {
    /// Splits a comma list (`covid_train,covid_dev`) into dataset names.
    pub fn parse_dataset_list(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// Checks values that make no sense; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if self.dataset.is_empty() {
            return Err(DataError::BadArg {
                arg: "dataset",
                msg: "no dataset given (use --dataset name1,name2)".into(),
            });
        }
        if self.max_source_length == 0 {
            return Err(DataError::BadArg {
                arg: "max_source_length",
                msg: "must be at least 1".into(),
            });
        }
        if self.max_target_length < 2 {
            return Err(DataError::BadArg {
                arg: "max_target_length",
                msg: format!(
                    "{} leaves no room for the target (at least 2: one token plus eos)",
                    self.max_target_length
                ),
            });
        }
        if !(0.0..1.0).contains(&self.dev_ratio) || self.dev_ratio.is_nan() {
            return Err(DataError::BadArg {
                arg: "dev_ratio",
                msg: format!("{} is not in [0, 1)", self.dev_ratio),
            });
        }
        if self.max_samples == Some(0) {
            return Err(DataError::BadArg {
                arg: "max_samples",
                msg: "0 would keep no sample".into(),
            });
        }
        if self.preprocessing_num_workers == Some(0) {
            return Err(DataError::BadArg {
                arg: "preprocessing_num_workers",
                msg: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The number of encoding threads to use.
    pub fn num_workers(&self) -> usize {
        self.preprocessing_num_workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}
