//! Stage recipes: each wires model, adapters, data and the trainer for one stage, the way a
//! torchtune recipe reads: load, prepare, train or predict, save.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use llmtune_adapters::{Checkpoints, LoraConfig};
use llmtune_data::template::Template;
use llmtune_data::{DataArgs, Stage};
use llmtune_models::{CausalLm, Pretrained, Tokenizer};

use crate::args::{FinetuningType, StageArg, TrainArgs};
use crate::error::{other, Error, Result};
use crate::trainer::TrainerConfig;

pub mod dpo;
pub mod ppo;
pub mod predict;
pub mod rm;
pub mod sft;

/// Runs what the arguments ask for.
pub fn run(args: &TrainArgs, device: &Device) -> Result<()> {
    args.validate().map_err(Error::InvalidArgument)?;
    if args.fp16 && !device.is_cuda() {
        eprintln!("warning: --fp16 ignored on CPU (training runs in f32; --bf16 with MKL computes in bf16)");
    }
    if args.bf16 && !device.is_cuda() && !(args.do_train && args.stage == StageArg::Sft) {
        eprintln!("warning: --bf16 on CPU applies to LoRA SFT training only; this runs in f32");
    }
    if args.estimate_memory {
        if device.is_cuda() {
            return Err(Error::InvalidArgument(
                "--estimate_memory measures host memory and is CPU-only for now".into(),
            ));
        }
        if !args.do_train || args.stage == StageArg::Ppo {
            return Err(Error::InvalidArgument(
                "--estimate_memory works with --do_train for --stage sft, rm and dpo (not ppo yet)"
                    .into(),
            ));
        }
    }
    match args.stage {
        StageArg::Sft if args.do_train => sft::run(args, device),
        StageArg::Sft if args.do_predict || (args.do_eval && args.predict_with_generate) => predict::run(args, device),
        StageArg::Sft => Err(Error::InvalidArgument(
            "--do_eval without --predict_with_generate is not supported yet; pass --predict_with_generate".into(),
        )),
        StageArg::Rm if args.do_train => rm::run(args, device),
        StageArg::Rm if args.do_predict || args.do_eval => rm::predict(args, device),
        StageArg::Rm => Err(Error::InvalidArgument(
            "--stage rm needs --do_train, --do_eval or --do_predict".into(),
        )),
        StageArg::Dpo if args.do_train => dpo::run(args, device),
        StageArg::Dpo => Err(Error::InvalidArgument(
            "--stage dpo needs --do_train (predict with --stage sft and the DPO output as --checkpoint_dir)".into(),
        )),
        StageArg::Ppo if args.do_train => ppo::run(args, device),
        StageArg::Ppo => Err(Error::InvalidArgument(
            "--stage ppo needs --do_train (PPO has no predict step; predict with --stage sft)".into(),
        )),
    }
}

/// `--bf16` on the CPU for LoRA training: the frozen base's linear weights (and LM head) in
/// bf16, multiplied through MKL's bf16 GEMM (AMX / AVX-512 BF16 where the CPU has them) with
/// f32 accumulation; activations, adapters, gradients and optimizer stay f32. Needs MKL
/// (`LLMTUNE_MKL`); without it, or for other tuning types and ChatGLM, it says so and
/// training runs in f32.
pub fn cpu_bf16(args: &TrainArgs, device: &Device, model: &mut CausalLm) -> Result<()> {
    if !args.bf16 || device.is_cuda() {
        return Ok(());
    }
    if args.finetuning_type != FinetuningType::Lora {
        eprintln!("warning: --bf16 on CPU applies to --finetuning_type lora; training runs in f32");
    } else if !llmtune_ops::blas::has_bf16_gemm() {
        eprintln!(
            "warning: --bf16 on CPU needs MKL (LLMTUNE_MKL; scripts/setup_mkl.sh fetches it); training runs in f32"
        );
    } else if model.use_bf16_linear_weights().map_err(other)? {
        eprintln!(
            "--bf16 on CPU: frozen linear weights in bf16 through MKL's bf16 GEMM; activations, adapters and optimizer in f32"
        );
    } else {
        eprintln!(
            "warning: --bf16 on CPU is not supported for {} yet; training runs in f32",
            model.arch()
        );
    }
    Ok(())
}

/// The end of a training run on the shared loop: the `done: ...` line (steps, time,
/// `train_loss`, and `eval_loss` and the eval metric `metric` when the run has them) and, with
/// `--plot_loss`, the plots of `loss`, `eval_loss` and `metric`.
pub fn report_done(
    args: &TrainArgs,
    out: &Path,
    o: &crate::trainer::TrainOutcome,
    metric: Option<&str>,
) -> Result<()> {
    let mut line = format!(
        "done: {} steps in {:.1}s, train_loss {:.4}",
        o.global_step, o.runtime_secs, o.train_loss
    );
    if let Some(e) = o.eval_loss {
        line.push_str(&format!(", eval_loss {e:.4}"));
    }
    if let Some((m, v)) = metric.and_then(|m| o.eval_metrics.get(m).map(|v| (m, v))) {
        line.push_str(&format!(", {m} {v:.4}"));
    }
    eprintln!("{line}");
    if args.plot_loss && crate::dist::is_main() {
        let mut keys = vec!["loss", "eval_loss"];
        keys.extend(metric);
        crate::plot::plot_loss(out, &keys)?;
    }
    Ok(())
}

/// `--model_name_or_path`, or the embedded default with a notice.
pub fn model_name(args: &TrainArgs) -> String {
    match &args.model_name_or_path {
        Some(m) => m.clone(),
        None => {
            let d = llmtune_models::hub::DEFAULT_MODEL;
            eprintln!("llmtune: --model_name_or_path not given; using the embedded default {d}");
            d.to_string()
        }
    }
}

/// Loads the base model (f32 on CPU).
pub fn load_model(args: &TrainArgs, device: &Device) -> Result<(Pretrained, String)> {
    let name = model_name(args);
    let dtype = if device.is_cuda() {
        match args.compute_dtype.as_deref() {
            Some("fp16") | Some("float16") => DType::F16,
            Some("fp32") | Some("float32") => DType::F32,
            _ => DType::BF16,
        }
    } else {
        DType::F32
    };
    // `--quantization_bit` with nothing to merge first: quantize while loading (the float
    // base is never held whole); otherwise `quantize_base` does it after the merge.
    let p = match args.quantization_bit {
        Some(bits) if args.checkpoint_dirs().is_empty() => {
            llmtune_models::load_pretrained_quantized(&name, dtype, device, bits)
        }
        _ => llmtune_models::load_pretrained(&name, dtype, device),
    }
    .map_err(|e| other(format!("loading --model_name_or_path {name}: {e}")))?;
    Ok((p, name))
}

/// `--quantization_bit 4|8`: quantizes the base's decoder linear weights (`Q4_1` / `Q8_0`,
/// see `Llama::quantize_linear_weights`) once any `--checkpoint_dir` has been merged into
/// them (without one, `load_model` already did it while loading), and says how many; LoRA
/// adapters train on top. No-op without the flag.
pub fn quantize_base(args: &TrainArgs, model: &mut CausalLm) -> Result<()> {
    let Some(bits) = args.quantization_bit else {
        return Ok(());
    };
    let CausalLm::Llama(m) = model else {
        return Err(Error::InvalidArgument(
            llmtune_models::QUANTIZED_BASE_LLAMA_ONLY.into(),
        ));
    };
    let r = if m.is_quantized() {
        Ok(m.quantized_linear_counts())
    } else {
        let r = m.quantize_linear_weights(bits);
        // The f32 weights just freed are small heap blocks that glibc keeps (the CLI raises
        // its trim threshold for the training loop) and that the activations can only partly
        // reuse: hand their pages back (627 -> 262 MB resident for SmolLM2-135M at 4 bits).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        r
    };
    let (n, kept) = r.map_err(|e| Error::InvalidArgument(e.to_string()))?;
    eprintln!(
        "--quantization_bit {bits}: {n} linear layers of the base quantized to {}{}",
        if bits == 4 { "Q4_1" } else { "Q8_0" },
        if kept > 0 {
            format!(" ({kept} left f32: input size not a multiple of 32)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The template name: `--template`, else the model's own.
pub fn template_name(args: &TrainArgs, p: &Pretrained) -> String {
    match &args.template {
        Some(t) => t.clone(),
        None => Template::default_for_model_type(&p.info.model_type, &p.tokenizer)
            .name
            .to_string(),
    }
}

/// Data arguments from the training arguments.
pub fn data_args(args: &TrainArgs, template: String) -> Result<DataArgs> {
    let dataset = args
        .dataset
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument("--dataset is required".into()))?;
    Ok(DataArgs {
        dataset: DataArgs::parse_dataset_list(dataset),
        dataset_dir: PathBuf::from(&args.dataset_dir),
        template,
        max_source_length: args.max_source_length,
        max_target_length: args.max_target_length,
        max_samples: args.max_samples,
        source_prefix: args.source_prefix.clone(),
        dev_ratio: args.dev_ratio,
        seed: args.seed,
        ignore_pad_token_for_loss: args.ignore_pad_token_for_loss,
        overwrite_cache: args.overwrite_cache,
        preprocessing_num_workers: args.preprocessing_num_workers,
        ..Default::default()
    })
}

/// Encodes the datasets for `stage`.
pub fn prepare(
    args: &TrainArgs,
    tok: &Tokenizer,
    template: String,
    stage: Stage,
    predict: bool,
) -> Result<llmtune_data::Prepared> {
    let da = data_args(args, template)?;
    llmtune_data::prepare(&da, tok, stage, predict).map_err(other)
}

/// The `data: ...` line of a training stage: how many `items` (examples, pairs) were kept,
/// prompts truncated, `answers` cut and examples dropped.
pub fn report_data(prepared: &llmtune_data::Prepared, items: &str, answers: &str) {
    let st = &prepared.stats;
    eprintln!(
        "data: {} {items} ({} prompts truncated, {} {answers} cut, {} dropped as over length)",
        prepared.examples.len(),
        st.source_truncated,
        st.target_truncated,
        st.dropped_over_length
    );
}

/// Holds out `--dev_ratio` of `examples` (shuffled by `--seed`): `(train, eval, lens)` with
/// `lens[i]` the longest row of training example `i` (what `--estimate_memory` measures).
pub fn split_train_eval(
    args: &TrainArgs,
    examples: Vec<llmtune_data::Example>,
) -> Result<(
    Vec<llmtune_data::Example>,
    Vec<llmtune_data::Example>,
    Vec<usize>,
)> {
    let (train, eval) =
        llmtune_data::split_dev(examples, args.dev_ratio, args.seed).map_err(other)?;
    let lens = train.iter().map(|e| e.max_len()).collect();
    Ok((train, eval, lens))
}

/// The output folder, refusing to mix runs unless asked.
pub fn output_dir(args: &TrainArgs, training: bool) -> Result<PathBuf> {
    let out = PathBuf::from(
        args.output_dir
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument("--output_dir is required".into()))?,
    );
    if training
        && out.is_dir()
        && args.resume_from_checkpoint.is_none()
        && !args.overwrite_output_dir
    {
        let has_ckpt = crate::checkpoint::latest_checkpoint(&out)?.is_some();
        if has_ckpt {
            return Err(Error::InvalidArgument(format!(
                "--output_dir {} already holds checkpoints; pass --overwrite_output_dir to start over or \
                 --resume_from_checkpoint true to continue",
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::Io {
        op: "create",
        path: out.clone(),
        source: e,
    })?;
    Ok(out)
}

/// Loop settings from the arguments.
pub fn trainer_config(args: &TrainArgs, out: &Path) -> Result<TrainerConfig> {
    let eval_steps = match args.evaluation_strategy {
        crate::args::EvalStrategy::No => None,
        _ => Some(args.eval_steps.unwrap_or(args.logging_steps)),
    };
    let resume = match &args.resume_from_checkpoint {
        Some(v) => crate::checkpoint::resolve_resume_from_checkpoint(out, v)?,
        None => None,
    };
    Ok(TrainerConfig {
        output_dir: out.to_path_buf(),
        train_batch_size: args.per_device_train_batch_size,
        eval_batch_size: args.per_device_eval_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        num_train_epochs: args.num_train_epochs,
        max_steps: args.max_steps,
        learning_rate: args.learning_rate,
        scheduler: args.lr_scheduler_type,
        warmup_steps: args.warmup_steps,
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        adam_beta1: args.adam_beta1,
        adam_beta2: args.adam_beta2,
        adam_epsilon: args.adam_epsilon,
        max_grad_norm: args.max_grad_norm,
        logging_steps: args.logging_steps,
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        eval_steps,
        load_best_model_at_end: args.load_best_model_at_end,
        seed: args.seed,
        resume_from_checkpoint: resume,
    })
}

/// Saves `training_args.json` and `finetuning_args.json` (sorted keys, indent 2).
pub fn save_args(args: &TrainArgs, out: &Path) -> Result<()> {
    crate::io::write_json_sorted(&out.join("training_args.json"), args)?;
    let ft = serde_json::json!({
        "finetuning_type": args.finetuning_type,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_target": args.lora_target,
        "name_module_trainable": args.name_module_trainable,
        "num_layer_trainable": args.num_layer_trainable,
        "pre_seq_len": args.pre_seq_len,
    });
    crate::io::write_json_sorted(&out.join("finetuning_args.json"), &ft)?;
    Ok(())
}

/// LoRA targets: `--lora_target`, else the model's default (`q_proj,v_proj` for the Llama
/// family, `query_key_value` for ChatGLM).
pub fn lora_target(args: &TrainArgs, model: &llmtune_models::CausalLm) -> String {
    args.lora_target
        .clone()
        .unwrap_or_else(|| model.default_lora_target().into())
}

/// The run's LoRA settings: `--lora_rank`, `--lora_alpha`, `--lora_dropout` on the targets of
/// [`lora_target`].
pub fn lora_config(args: &TrainArgs, model: &llmtune_models::CausalLm) -> Result<LoraConfig> {
    LoraConfig::new(
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        &lora_target(args, model),
    )
    .map_err(other)
}

/// Makes sure `ck` holds a trainable adapter (the resumed `--checkpoint_dir` one, else a fresh
/// one from [`lora_config`] and `--seed`), seeds its dropout with `--seed` and switches it to
/// training. Returns the adapter's name.
pub fn trainable_lora(
    args: &TrainArgs,
    model: &mut llmtune_models::CausalLm,
    ck: &mut Checkpoints,
) -> Result<String> {
    let cfg = lora_config(args, model)?;
    let adapter = ck
        .ensure_trainable(model, &cfg, args.seed)
        .map_err(other)?
        .to_string();
    ck.lora.set_dropout_seed(args.seed);
    ck.lora.set_training(true);
    Ok(adapter)
}

pub(crate) fn check_finetuning(args: &TrainArgs) -> Result<()> {
    match args.finetuning_type {
        FinetuningType::Lora | FinetuningType::Freeze | FinetuningType::Full => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "--finetuning_type {other:?} is not implemented yet (use lora, freeze or full)"
        ))),
    }
}

/// Applies `--checkpoint_dir` for the run's `--finetuning_type`: LoRA folders as SPEC §6 says
/// (merged, or the last one resumed when training with `--resume_lora_training`); for
/// `freeze`/`full`, the trained tensors of the (single) folder are loaded into the base.
pub fn apply_checkpoint_dirs(
    args: &TrainArgs,
    model: &mut llmtune_models::CausalLm,
    training: bool,
) -> Result<llmtune_adapters::Checkpoints> {
    let dirs = args.checkpoint_dirs();
    match args.finetuning_type {
        FinetuningType::Freeze | FinetuningType::Full => {
            for d in &dirs {
                let names = llmtune_adapters::load_params(model, Path::new(d)).map_err(other)?;
                eprintln!("loaded {} trained tensors from {d}", names.len());
            }
            llmtune_adapters::apply_checkpoints::<_, &str>(model, &[], false, training)
                .map_err(other)
        }
        _ => llmtune_adapters::apply_checkpoints(model, &dirs, args.resume_lora_training, training)
            .map_err(other),
    }
}
