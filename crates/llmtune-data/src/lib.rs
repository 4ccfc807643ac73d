//! Datasets, prompt templates, per-stage encoding, batching and the encoded-data cache.
//!
//! This crate turns the reference's data layout (`dataset_info.json` + `.json`/`.jsonl`/
//! `.csv` files, SPEC §3) into token ids and labels (SPEC §4), as plain `Vec<u32>`/`Vec<i64>`
//! batches; it does not depend on any tensor library.
//!
//! ```text
//! dataset_info.json ──registry──▶ files ──formats──▶ RawSample ──template+encode──▶ Example
//!                                         (cache keyed by data, tokenizer and args)   │
//!                                                                  split_dev ◀────────┤
//!                                                                  collate ──▶ Batch ◀┘
//! ```
//!
//! * [`registry`]: `dataset_info.json` (file, SHA-1 warning, columns with defaults).
//! * [`formats`]: reading files, column extraction, filtering, concatenation.
//! * [`template`]: the one template registry (`chatglm`, `chatglm2`, `chatglm3`, `chatml`,
//!   `llama2`, `llama3`, `alpaca`, `vanilla`) used by training, predict, chat, the API and
//!   export.
//! * [`encode`]: SFT / predict+PPO / RM encodings with truncation and label masks.
//! * [`mod@collate`]: left-padded batches, masks, positions, ChatGLM-6B helpers.
//! * [`cache`]: the encoded-data cache.
//! * [`split`]: the seeded `dev_ratio` split.
//! * [`mod@inspect`]: the report behind `llmtune data inspect`.
//!
//! **Truncation differs from the reference.** An over-long prompt keeps the *tail* of the
//! history: the oldest rounds are dropped first and the current question is never dropped
//! (if it alone is too long, it loses tokens from its front so the template's suffix such
//! as `答：` still ends the source). The reference keeps the head of the source, which cuts
//! off the current question when the history is long.
//!
//! Typical use:
//!
//! ```no_run
//! # fn main() -> llmtune_data::Result<()> {
//! use llmtune_data::{prepare, split_dev, collate, CollateArgs, DataArgs, Stage};
//! let tok = llmtune_tokenize::Tokenizer::from_dir("model")?;
//! let args = DataArgs {
//!     dataset: vec!["covid_train".into(), "covid_dev".into()],
//!     dataset_dir: "data/covid".into(),
//!     template: "chatml".into(),
//!     max_source_length: 1024,
//!     max_target_length: 128,
//!     dev_ratio: 0.05,
//!     ..DataArgs::default()
//! };
//! let data = prepare(&args, &tok, Stage::Sft, false)?;
//! let (train, dev) = split_dev(data.examples, args.dev_ratio, args.seed)?;
//! let pad = CollateArgs::new(&tok, args.ignore_pad_token_for_loss, false)?;
//! let batch = collate(&train.iter().take(4).collect::<Vec<_>>(), &pad)?;
//! # let _ = (dev, batch); Ok(()) }
//! ```

pub mod args;
pub mod cache;
pub mod collate;
pub mod encode;
pub mod error;
pub mod formats;
pub mod inspect;
pub mod registry;
pub mod split;
pub mod template;

use std::path::PathBuf;

use llmtune_tokenize::Tokenizer;

pub use args::{DataArgs, EncodeMode, Stage};
pub use collate::{
    chatglm_v1_attention_mask, chatglm_v1_position_ids, collate, Batch, CollateArgs,
};
pub use encode::{
    encode_samples, EncodeOptions, EncodeStats, Encoded, Example, PairExample, PromptExample,
    SupervisedExample, IGNORE_INDEX,
};
pub use error::{DataError, Result};
pub use formats::{load_raw, DatasetSummary, RawData, RawSample, Response};
pub use inspect::{inspect, inspect_examples, InspectReport};
pub use registry::{Registry, Sha1Status};
pub use split::split_dev;
pub use template::{PromptEncoding, ResolvedTemplate, Template};

/// What happened with the cache in [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// `disable_cache` was set.
    Disabled,
    /// A valid cache file was used.
    Hit(PathBuf),
    /// The data was encoded and the cache written.
    Written(PathBuf),
    /// The data was encoded but the cache could not be written (a warning was logged).
    WriteFailed(PathBuf, String),
}

/// Encoded data ready for batching.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Examples in dataset order.
    pub examples: Vec<Example>,
    /// Encoding counts and lengths.
    pub stats: EncodeStats,
    /// Per-dataset counts (SHA-1 status re-checked on every run).
    pub datasets: Vec<DatasetSummary>,
    /// The template used.
    pub template: &'static Template,
    /// The encoding.
    pub mode: EncodeMode,
    /// What the cache did.
    pub cache: CacheStatus,
}

/// Reads, checks, encodes (or loads from the cache) every dataset in `args` for `stage`.
///
/// `predict_with_generate` selects the prompt encoding for stage `sft`. The dev split is
/// left to the caller ([`split_dev`]) so the cache holds the whole set.
pub fn prepare(
    args: &DataArgs,
    tokenizer: &Tokenizer,
    stage: Stage,
    predict_with_generate: bool,
) -> Result<Prepared> {
    args.validate()?;
    let template = Template::by_name(&args.template)?;
    let resolved = template.resolve(tokenizer)?;
    let registry = Registry::load(&args.dataset_dir)?;
    let mut files = Vec::with_capacity(args.dataset.len());
    for name in &args.dataset {
        files.push(formats::read_dataset_files(&registry, name)?);
    }
    let mode = stage.encode_mode(predict_with_generate);

    let mut cache_path = None;
    let mut key = String::new();
    if !args.disable_cache {
        key = cache::cache_key(args, &files, &cache::tokenizer_fingerprint(tokenizer), mode);
        let path = cache::cache_file(args, &key, mode);
        if !args.overwrite_cache {
            match cache::read(&path, &key) {
                Ok(Some(entry)) => {
                    tracing::info!("loaded encoded data from the cache {}", path.display());
                    let mut datasets = entry.header.datasets;
                    for (d, f) in datasets.iter_mut().zip(&files) {
                        d.sha1 = f.sha1.clone();
                    }
                    return Ok(Prepared {
                        examples: entry.examples,
                        stats: entry.header.stats,
                        datasets,
                        template,
                        mode,
                        cache: CacheStatus::Hit(path),
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("ignoring the cache {}: {e}; rebuilding", path.display()),
            }
        }
        cache_path = Some(path);
    }

    let raw = formats::load_from_files(&files, args.max_samples, stage)?;
    let opts = EncodeOptions {
        mode,
        max_source_length: args.max_source_length,
        max_target_length: args.max_target_length,
        system: args.source_prefix.as_deref(),
        num_workers: args.num_workers(),
    };
    let enc = encode_samples(&raw.samples, &resolved, &opts)?;
    if enc.examples.is_empty() {
        return Err(DataError::NoSamples {
            datasets: args.dataset.join(", "),
            why: format!(
                "all {} samples are over length: template `{}` needs more than max_source_length={} tokens around even one query token",
                enc.stats.samples, template.name, args.max_source_length
            ),
        });
    }
    let cache = match cache_path {
        None => CacheStatus::Disabled,
        Some(path) => {
            let entry = cache::CacheEntry {
                header: cache::CacheHeader {
                    key,
                    mode,
                    datasets: raw.datasets.clone(),
                    stats: enc.stats.clone(),
                },
                examples: enc.examples,
            };
            let status = match cache::write(&path, &entry) {
                Ok(()) => {
                    tracing::info!("wrote the encoded data cache {}", path.display());
                    CacheStatus::Written(path)
                }
                Err(e) => {
                    tracing::warn!("{e}; continuing without a cache");
                    CacheStatus::WriteFailed(path, e.to_string())
                }
            };
            return Ok(Prepared {
                examples: entry.examples,
                stats: entry.header.stats,
                datasets: entry.header.datasets,
                template,
                mode,
                cache: status,
            });
        }
    };
    Ok(Prepared {
        examples: enc.examples,
        stats: enc.stats,
        datasets: raw.datasets,
        template,
        mode,
        cache,
    })
}
