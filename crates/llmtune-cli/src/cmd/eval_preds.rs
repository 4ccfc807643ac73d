//! `llmtune eval-preds`: re-score a generated_predictions.jsonl.

use std::path::PathBuf;
use std::process::ExitCode;

/// Score predictions with BLEU-4 and ROUGE-1/2/L exactly as the Python reference does.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct EvalPredsArgs {
    /// A generated_predictions.jsonl (lines {"label": ..., "predict": ...}).
    pub predictions: PathBuf,
    /// Where to write the scores (default: predict_results.json beside the input... named
    /// eval_preds_results.json so the original is never overwritten).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(a: EvalPredsArgs) -> anyhow::Result<ExitCode> {
    let pairs = llmtune_metrics::read_predictions(&a.predictions)?;
    let summary = llmtune_metrics::score_corpus(&pairs);
    println!("{summary}");
    let out = a.output.unwrap_or_else(|| {
        a.predictions
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("eval_preds_results.json")
    });
    let json = llmtune_metrics::summary_json(&summary, "predict");
    let text = serde_json::to_string_pretty(&json)? + "\n";
    let tmp = out.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!("scores written to {}", out.display());
    Ok(ExitCode::SUCCESS)
}
