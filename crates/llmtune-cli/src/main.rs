//! `llmtune`: fine-tune, evaluate and serve large language models.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod cmd;

/// Fine-tune large language models end to end: LoRA SFT, reward modelling, PPO, prediction
/// with BLEU/ROUGE, chat, an OpenAI-compatible server and export. The commands of
/// ChatGLM-Efficient-Tuning run with `python src/train_bash.py` replaced by `llmtune train`.
#[derive(Parser, Debug)]
#[command(name = "llmtune", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train or evaluate a model (stages sft, rm, ppo), with the reference's flags.
    Train(Box<cmd::train::TrainArgs>),
    /// Generate a reply to one prompt (no adapter training).
    Generate(cmd::generate::GenerateArgs),
    /// Streaming terminal chat with a model and its adapters.
    Chat(cmd::chat::ChatArgs),
    /// OpenAI-compatible API server.
    Api(cmd::api::ApiArgs),
    /// Browser chat at `/` on top of the OpenAI-compatible API server.
    Web(cmd::api::ApiArgs),
    /// Merge adapters and export the model (HF layout or GGUF).
    Export(cmd::export::ExportArgs),
    /// Inspect datasets as the model will see them.
    Data(cmd::data::DataCmd),
    /// Re-score a generated_predictions.jsonl with BLEU-4 and ROUGE-1/2/L.
    #[command(name = "eval-preds")]
    EvalPreds(cmd::eval_preds::EvalPredsArgs),
    /// Benchmarks (train step, decode).
    Bench(cmd::bench::BenchCmd),
}

/// With the `openblas` feature: Debian 12's OpenBLAS (0.3.21) does not know CPUs newer than
/// itself and falls back to its slowest kernels (`Prescott`: 14 GFLOP/s on one of our cores,
/// against 82 with `SkylakeX`). The library reads `OPENBLAS_CORETYPE` when it is loaded, so
/// when it picked `Prescott` on a CPU with AVX-512 (or AVX2), run this binary again once with
/// the matching family set. A user's own `OPENBLAS_CORETYPE` is left alone.
#[cfg(all(feature = "openblas", target_arch = "x86_64", unix))]
fn fix_openblas_core() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OPENBLAS_CORETYPE").is_some()
        || llmtune_ops::blas::core_name() != "Prescott"
    {
        return;
    }
    let family = if std::arch::is_x86_feature_detected!("avx512f") {
        "SkylakeX"
    } else if std::arch::is_x86_feature_detected!("avx2") {
        "Haswell"
    } else {
        return;
    };
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("OPENBLAS_CORETYPE", family)
            .exec();
        eprintln!("warning: could not re-run with OPENBLAS_CORETYPE={family}: {err}");
    }
}

/// glibc's malloc serves blocks above its mmap threshold (128 KiB, raised on the fly up to 32
/// MiB) with fresh mappings and returns them on free, so every step of a training loop, which
/// allocates and frees the same MB-sized activations, page-faults them in again (13% of a
/// LoRA step's CPU samples were in the kernel: faults, zeroing pages, cgroup accounting).
/// Serve blocks up to 32 MiB from the heap and keep up to 1 GiB of freed memory for reuse;
/// the peak RSS is unchanged (measured). `MALLOC_*` / `GLIBC_TUNABLES` set by the user win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    let user = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    if !user {
        // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// candle's CPU worker pool (which our kernels share) spins 25,000 times, about a millisecond,
/// after each parallel op before it parks. The BLAS threads (MKL's OpenMP team) run on the
/// same cores in between, and a spinning worker takes its time slices: with 2,000 spins the
/// bf16 bench step went from 3.18-3.42 s to 2.63-2.82 s (4 A/B pairs, docs/results.md). A
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the user wins. Must run before candle's pool starts.
fn tune_candle_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

fn main() -> ExitCode {
    tune_candle_pool();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_malloc();
    #[cfg(all(feature = "openblas", target_arch = "x86_64", unix))]
    fix_openblas_core();
    let argv = match cmd::train::expand_config_file(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    // A BLAS named by LLMTUNE_MKL that does not load is an error now, not a slow run later.
    if let Err(e) = llmtune_ops::blas::init() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLMTUNE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(*a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Api(a) => cmd::api::run(a, false),
        Command::Web(a) => cmd::api::run(a, true),
        Command::Export(a) => cmd::export::run(a),
        Command::Data(a) => cmd::data::run(a),
        Command::EvalPreds(a) => cmd::eval_preds::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
