//! `llmtune generate`: one prompt in, one reply out (streamed to stdout).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use llmtune_data::template::Template;
use llmtune_generate::generate;
use llmtune_tokenize::StreamDecoder;

use crate::args::{compute_dtype, device, model_or_default, GenFlags};

/// Generate a reply to a prompt, rendered with the model's chat template.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct GenerateArgs {
    /// A HF model folder, a .gguf file, or a built-in alias (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// Chat template (default: the model's own, e.g. chatml for SmolLM2/Qwen2).
    #[arg(long)]
    pub template: Option<String>,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenFlags,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let model_name = model_or_default(&a.model_name_or_path);
    let device = device()?;
    let p = llmtune_models::load_for_inference(&model_name, compute_dtype(&device), &device)
        .with_context(|| format!("loading --model_name_or_path {model_name}"))?;
    let template = match &a.template {
        Some(t) => Template::by_name(t)?,
        None => Template::default_for_model_type(&p.info.model_type, &p.tokenizer),
    };
    let rt = template.resolve(&p.tokenizer)?;
    let enc = rt
        .encode_prompt(a.system.as_deref(), &[], &a.prompt, a.gen.max_length)?
        .context("the prompt does not fit in --max_length")?;
    let mut cfg = a.gen.config(rt.stop_ids());
    cfg.vocab_size = p.model.is_chatglm().then(|| p.tokenizer.vocab_size());
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    let mut dec = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    let mut err = None;
    let out = generate(&p.model, &[enc.input_ids], pad, &cfg, |_, tok| {
        if cfg.stop_ids.contains(&tok) {
            return;
        }
        match dec.push(&p.tokenizer, tok) {
            Ok(s) => {
                let _ = stdout.write_all(s.as_bytes());
                let _ = stdout.flush();
            }
            Err(e) => err = Some(e),
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    println!();
    tracing::info!(
        "generated {} tokens ({:?})",
        out[0].tokens.len(),
        out[0].finish
    );
    Ok(ExitCode::SUCCESS)
}
