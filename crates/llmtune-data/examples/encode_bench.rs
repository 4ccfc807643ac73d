//! Encoding benchmark: reads and encodes covid_train + covid_dev (3804 samples) for SFT as
//! the seed's command does (source 1024, target 128), without the cache, and prints
//! samples/s and the total time.
//!
//! ```text
//! cargo run --release -p llmtune-data --example encode_bench -- \
//!     <tokenizer.json | model dir> [dataset_dir] [template] [workers]
//! ```
//! `dataset_dir` defaults to `$LLMTUNE_SHARED/data/covid`, the template to the one
//! `Template::default_for_model_type` picks for a Llama-type model with this vocabulary
//! (ChatML for the fixture tokenizer and SmolLM2), workers to all cores. `BENCH_SRC=N`
//! overrides `max_source_length` (e.g. a huge value to time encoding without truncation).

use std::path::PathBuf;
use std::time::Instant;

use llmtune_data::{encode_samples, load_raw, DataArgs, EncodeOptions, Stage, Template};
use llmtune_tokenize::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut argv = std::env::args().skip(1);
    let Some(tok_path) = argv.next().map(PathBuf::from) else {
        eprintln!(
            "usage: encode_bench <tokenizer.json | model dir> [dataset_dir] [template] [workers]"
        );
        std::process::exit(2);
    };
    let dataset_dir = match argv.next() {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var("LLMTUNE_SHARED").unwrap_or_else(|_| "../shared".into()))
                .join("data/covid")
        }
    };
    let tok = if tok_path.is_dir() {
        Tokenizer::from_dir(&tok_path)?
    } else if tok_path.with_file_name("tokenizer_config.json").exists() {
        Tokenizer::from_dir(tok_path.parent().unwrap_or(&tok_path))?
    } else {
        Tokenizer::from_file(&tok_path)?
    };
    let template = match argv.next() {
        Some(t) => Template::by_name(&t)?,
        None => Template::default_for_model_type("llama", &tok),
    };
    let mut args = DataArgs {
        dataset: vec!["covid_train".into(), "covid_dev".into()],
        dataset_dir,
        template: template.name.into(),
        max_source_length: std::env::var("BENCH_SRC")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1024),
        max_target_length: 128,
        disable_cache: true,
        ..DataArgs::default()
    };
    if let Some(w) = argv.next() {
        args.preprocessing_num_workers = Some(w.parse()?);
    }
    let workers = args.num_workers();
    let resolved = template.resolve(&tok)?;

    let t0 = Instant::now();
    let raw = load_raw(&args, Stage::Sft)?;
    let t_load = t0.elapsed().as_secs_f64();
    let opts = EncodeOptions {
        mode: Stage::Sft.encode_mode(false),
        max_source_length: args.max_source_length,
        max_target_length: args.max_target_length,
        system: None,
        num_workers: workers,
    };
    let t1 = Instant::now();
    let enc = encode_samples(&raw.samples, &resolved, &opts)?;
    let t_enc = t1.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let n = enc.examples.len();
    let tokens: usize = enc.examples.iter().map(|e| e.max_len()).sum();
    println!(
        "template {}, tokenizer {}, {} workers",
        template.name,
        tok.source().display(),
        workers
    );
    println!(
        "{n} samples ({tokens} tokens; {} prompts truncated, {} rounds dropped): read+parse {:.3} s, encode {:.3} s",
        enc.stats.source_truncated, enc.stats.rounds_dropped, t_load, t_enc
    );
    println!("total {:.3} s, {:.0} samples/s", total, n as f64 / total);
    Ok(())
}
