//! `llmtune chat`: a streaming terminal chat, as the reference's `cli_demo.py`.
//!
//! Each reply streams token by token; the conversation is kept as history in the template
//! (oldest rounds are dropped first when the prompt outgrows `--max_length`). Type `clear` to
//! empty the history, `stop` to exit; Ctrl-C interrupts the current reply, not the program.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use llmtune_data::template::Template;
use llmtune_generate::{generate_cancellable, FinishReason};
use llmtune_tokenize::StreamDecoder;

use crate::args::{load_merged, GenFlags};

/// Chat with a model and its adapters in the terminal.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct ChatArgs {
    /// A HF model folder, a .gguf file, or a built-in alias (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// LoRA adapter folders to merge, comma-separated, in order.
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// Chat template (default: the model's own).
    #[arg(long)]
    pub template: Option<String>,
    /// A system message for the whole conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenFlags,
}

pub fn run(a: ChatArgs) -> anyhow::Result<ExitCode> {
    let (p, _) = load_merged(&a.model_name_or_path, &a.checkpoint_dir)?;
    let template = match &a.template {
        Some(t) => Template::by_name(t)?,
        None => Template::default_for_model_type(&p.info.model_type, &p.tokenizer),
    };
    let rt = template.resolve(&p.tokenizer)?;
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || cancel.store(true, Ordering::Relaxed))
            .context("installing the Ctrl-C handler")?;
    }
    let mut history: Vec<(String, String)> = Vec::new();
    let mut out = std::io::stdout();
    let stdin = std::io::stdin();
    let welcome = "Welcome to llmtune chat. Type `clear` to clear the history, `stop` to exit; \
                   Ctrl-C interrupts a reply.";
    println!("{welcome}");
    let mut turn = 0u64;
    loop {
        print!("\nUser: ");
        out.flush()?;
        let mut line = String::new();
        cancel.store(false, Ordering::Relaxed);
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break, // end of input
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        let query = line.trim();
        match query {
            "" => continue,
            "stop" => break,
            "clear" => {
                history.clear();
                println!("History has been removed.");
                continue;
            }
            _ => {}
        }
        let enc = match rt.encode_prompt(a.system.as_deref(), &history, query, a.gen.max_length)? {
            Some(e) => e,
            None => {
                println!(
                    "(the message alone is longer than --max_length {})",
                    a.gen.max_length
                );
                continue;
            }
        };
        if enc.rounds_dropped > 0 {
            eprintln!(
                "(dropped the {} oldest round(s) to fit --max_length)",
                enc.rounds_dropped
            );
        }
        let mut cfg = a.gen.config(rt.stop_ids());
        cfg.vocab_size = p.model.is_chatglm().then(|| p.tokenizer.vocab_size());
        cfg.seed = a.gen.seed.wrapping_add(turn);
        turn += 1;
        print!("Assistant: ");
        out.flush()?;
        let mut dec = StreamDecoder::new();
        let mut reply = String::new();
        let mut err = None;
        let gen = generate_cancellable(
            &p.model,
            &[enc.input_ids],
            pad,
            &cfg,
            |_, tok| {
                if cfg.stop_ids.contains(&tok) {
                    return;
                }
                match dec.push(&p.tokenizer, tok) {
                    Ok(s) => {
                        reply.push_str(&s);
                        let _ = out.write_all(s.as_bytes());
                        let _ = out.flush();
                    }
                    Err(e) => err = Some(e),
                }
            },
            &cancel,
        )?;
        if let Some(e) = err {
            return Err(e.into());
        }
        if gen[0].finish == FinishReason::Cancelled {
            print!(" [interrupted]");
        }
        println!();
        history.push((query.to_string(), reply.trim().to_string()));
    }
    Ok(ExitCode::SUCCESS)
}
