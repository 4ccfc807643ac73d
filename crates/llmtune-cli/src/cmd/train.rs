//! `llmtune train`: the reference's `train_bash.py`, same flags (stages sft; rm and ppo next).

use std::process::ExitCode;

pub use llmtune_train::args::TrainArgs;

use crate::args::device_at;

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let backend: llmtune_dist::Backend = a
        .ddp_backend
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let dev = device_at(llmtune_dist::local_rank())?;
    let world = llmtune_dist::init(&llmtune_dist::InitOptions {
        backend,
        cuda: dev.is_cuda(),
        timeout: std::time::Duration::from_secs(a.ddp_timeout.max(1)),
    })?;
    if world.world_size() > 1 {
        // One write, so the ranks' lines do not interleave.
        let line = format!(
            "llmtune: rank {} of {} ({}), pid {}, device {:?}\n",
            world.rank(),
            world.world_size(),
            world.backend(),
            std::process::id(),
            dev.location()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    match llmtune_train::stages::run(&a, &dev) {
        Ok(()) => {
            llmtune_dist::finalize();
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // With several ranks a failing rank must take the others down with it: they may
            // be waiting in a collective this rank will never join.
            llmtune_dist::abort_if_distributed(&e.to_string(), 1);
            Err(e.into())
        }
    }
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
