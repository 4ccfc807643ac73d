//! `llmtune train`: the reference's `train_bash.py`, same flags (stages sft; rm and ppo next).

use std::process::ExitCode;

pub use llmtune_train::args::TrainArgs;

use crate::args::device;

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let dev = device()?;
    llmtune_train::stages::run(&a, &dev)?;
    Ok(ExitCode::SUCCESS)
}

/// Expands a lone `*.json`/`*.yaml`/`*.yml` argument after `train` into `--key value` flags
/// placed before the others, so flags given on the command line override the file.
pub fn expand_config_file(argv: Vec<String>) -> Result<Vec<String>, String> {
    let Some(pos) = argv.iter().position(|a| a == "train") else {
        return Ok(argv);
    };
    let is_cfg = |a: &str| {
        !a.starts_with('-') && (a.ends_with(".json") || a.ends_with(".yaml") || a.ends_with(".yml"))
    };
    let files: Vec<usize> = argv
        .iter()
        .enumerate()
        .skip(pos + 1)
        .filter(|(i, a)| is_cfg(a) && !argv[*i - 1].starts_with("--"))
        .map(|(i, _)| i)
        .collect();
    if files.is_empty() {
        return Ok(argv);
    }
    if files.len() > 1 {
        return Err("give at most one config file".into());
    }
    let f = files[0];
    let expanded = llmtune_train::args::config_file_to_args(std::path::Path::new(&argv[f]))?;
    let mut out: Vec<String> = argv[..=pos].to_vec();
    out.extend(expanded);
    out.extend(
        argv[pos + 1..]
            .iter()
            .enumerate()
            .filter(|(i, _)| pos + 1 + i != f)
            .map(|(_, a)| a.clone()),
    );
    Ok(out)
}
