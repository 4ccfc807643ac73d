//! `llmtune data inspect`: what the model will see.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use llmtune_data::template::Template;
use llmtune_data::{DataArgs, Stage};

use crate::args::{model_or_default, parse_bool};

/// Dataset tools.
#[derive(clap::Args, Debug)]
pub struct DataCmd {
    #[command(subcommand)]
    pub action: DataAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataAction {
    /// Counts (kept, dropped and why, truncated), token-length percentiles, and the first
    /// sample rendered with its label mask.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct InspectArgs {
    /// Comma-separated dataset names from dataset_info.json.
    #[arg(long)]
    pub dataset: String,
    /// Folder holding dataset_info.json.
    #[arg(long, default_value = "data")]
    pub dataset_dir: PathBuf,
    /// Template (default: the model's own).
    #[arg(long)]
    pub template: Option<String>,
    /// Model whose tokenizer encodes the data (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// Stage: sft, rm (dpo: the same pairs) or ppo.
    #[arg(long, default_value = "sft")]
    pub stage: String,
    /// Encode as for prediction (prompt only).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub predict_with_generate: bool,
    #[arg(long, default_value_t = 512)]
    pub max_source_length: usize,
    #[arg(long, default_value_t = 512)]
    pub max_target_length: usize,
    /// First N samples of each dataset.
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Text prepended to every prompt (a system prompt where the template has one).
    #[arg(long)]
    pub source_prefix: Option<String>,
    /// Rebuild the encoded-data cache.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub overwrite_cache: bool,
    /// Also write every encoded example to this JSON-lines file, one line each, with the
    /// field names TRL uses: `input_ids` + `labels` (sft training), `input_ids` +
    /// `target_ids` (prompts: sft prediction, ppo), `prompt_ids` + `chosen_ids` +
    /// `rejected_ids` (rm and dpo pairs, the answers with their eos).
    #[arg(long)]
    pub dump_jsonl: Option<PathBuf>,
}

pub fn run(c: DataCmd) -> anyhow::Result<ExitCode> {
    match c.action {
        DataAction::Inspect(a) => inspect(a),
    }
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let model = model_or_default(&a.model_name_or_path);
    let (tok, model_type) = llmtune_models::load_tokenizer(&model)
        .with_context(|| format!("loading the tokenizer of {model}"))?;
    let template = match &a.template {
        Some(t) => t.clone(),
        None => Template::default_for_model_type(&model_type, &tok)
            .name
            .to_string(),
    };
    let args = DataArgs {
        dataset: DataArgs::parse_dataset_list(&a.dataset),
        dataset_dir: a.dataset_dir,
        template,
        max_source_length: a.max_source_length,
        max_target_length: a.max_target_length,
        max_samples: a.max_samples,
        source_prefix: a.source_prefix,
        overwrite_cache: a.overwrite_cache,
        ..Default::default()
    };
    let stage = Stage::parse(&a.stage)?;
    let (report, examples) =
        llmtune_data::inspect_examples(&args, &tok, stage, a.predict_with_generate)?;
    println!("{report}");
    if let Some(path) = &a.dump_jsonl {
        let mut text = String::new();
        for e in &examples {
            text.push_str(&example_json(e).to_string());
            text.push('\n');
        }
        llmtune_train::io::atomic_write(path, text.as_bytes())
            .with_context(|| format!("--dump_jsonl {}", path.display()))?;
        println!(
            "{} encoded examples written to {}",
            examples.len(),
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One encoded example as `--dump_jsonl` writes it.
fn example_json(e: &llmtune_data::Example) -> serde_json::Value {
    use llmtune_data::Example;
    match e {
        Example::Supervised(x) => serde_json::json!({
            "input_ids": x.input_ids,
            "labels": x.labels,
        }),
        Example::Prompt(x) => serde_json::json!({
            "input_ids": x.input_ids,
            "target_ids": x.target_ids,
        }),
        Example::Pair(x) => serde_json::json!({
            "prompt_ids": &x.chosen_ids[..x.prompt_len],
            "chosen_ids": &x.chosen_ids[x.prompt_len..],
            "rejected_ids": &x.rejected_ids[x.prompt_len..],
        }),
    }
}
