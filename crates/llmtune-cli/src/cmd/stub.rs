//! Subcommands that are not implemented yet.

use std::process::ExitCode;

/// Accepts any arguments (the real subcommand will define them).
#[derive(clap::Args, Debug)]
pub struct StubArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

pub fn not_yet(name: &str) -> anyhow::Result<ExitCode> {
    eprintln!("llmtune {name}: not yet implemented");
    Ok(ExitCode::from(2))
}
