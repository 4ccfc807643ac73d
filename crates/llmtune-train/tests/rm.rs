//! The reward-model recipe on the tiny fixture Llama (`LLMTUNE_FIXTURES`): the reward model
//! saved by training, loaded back as `--do_predict` loads it (adapter and value head from the
//! folder), scores every pair exactly as the in-memory model did at the end of training.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::Parser;
use llmtune_data::{CollateArgs, Example};
use llmtune_train::args::TrainArgs;
use llmtune_train::stages::rm::{self, pair_loss, RewardModel};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmtune-rm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The example data copied into `dir` (so the encoded-data cache lands there, not in the
/// repository, when `LLMTUNE_HOME` is unset).
fn example_data(dir: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/example");
    let dst = dir.join("data");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["dataset_info.json", "example_rm.json", "example_sft.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn max_diff(a: &[(f32, f32)], b: &[(f32, f32)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.0 - y.0).abs().max((x.1 - y.1).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn saved_reward_model_scores_as_at_the_end_of_training() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let dir = tmp("reload");
    let data = example_data(&dir);
    let out = dir.join("rm");
    let argv = [
        "llmtune",
        "--stage",
        "rm",
        "--do_train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        "example_rm",
        "--dataset_dir",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--lora_rank",
        "4",
        "--lora_target",
        "q_proj,v_proj,o_proj",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "3",
        "--gradient_accumulation_steps",
        "1",
        "--max_source_length",
        "48",
        "--max_target_length",
        "24",
        "--learning_rate",
        "5e-3",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--dev_ratio",
        "0.25",
        "--seed",
        "3",
    ];
    let args = Cli::try_parse_from(argv).unwrap().args;
    let trained = rm::train_rm(&args, &Device::Cpu).unwrap().unwrap();
    assert_eq!(trained.outcome.global_step, 4);
    let ne = trained.eval_set.len();
    assert_eq!(ne, (34.0f64 * 0.25).ceil() as usize);
    // In memory, at the end of training: the adapter active (not merged), head in eval mode.
    let pairs: Vec<Example> = trained
        .eval_set
        .iter()
        .chain(trained.train_set.iter().take(5))
        .cloned()
        .collect();
    let at_end = trained.reward_model().score(&pairs, 3).unwrap();
    // The trainer's final evaluation saw the same rewards: its accuracy and loss (mean of
    // the per-batch means, eval batch 3) follow from them.
    let acc = at_end[..ne].iter().filter(|(c, r)| c > r).count() as f64 / ne as f64;
    assert_eq!(trained.outcome.eval_metrics["eval_accuracy"], acc);
    let batch_means: Vec<f64> = at_end[..ne]
        .chunks(3)
        .map(|b| b.iter().map(|&(c, r)| pair_loss(c, r)).sum::<f64>() / b.len() as f64)
        .collect();
    let loss = batch_means.iter().sum::<f64>() / batch_means.len() as f64;
    let el = trained.outcome.eval_loss.unwrap();
    assert!((el - loss).abs() < 1e-6, "eval_loss {el} vs {loss}");
    // Training moved the head away from its initialisation: the rewards are not all equal.
    assert!(at_end.iter().any(|&(c, r)| c != r), "{at_end:?}");
    drop(trained);

    // Loaded back from disk as predict loads it.
    let mut p =
        llmtune_models::load_pretrained(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let (head, _lora) =
        rm::load_reward_model(&mut p, &[out.to_string_lossy().into_owned()]).unwrap();
    let collate = CollateArgs::new(&p.tokenizer, true, false).unwrap();
    let loaded = RewardModel {
        model: &p.model,
        head,
        collate,
    };
    let again = loaded.score(&pairs, 3).unwrap();
    assert_eq!(
        at_end, again,
        "the reloaded reward model scores bit for bit the same"
    );
    eprintln!(
        "reloaded reward model: {} pairs bit-equal, e.g. {:?}",
        pairs.len(),
        again[0]
    );
    // A pair scores the same alone as in a padded batch (positions follow the mask).
    let alone = loaded.score(&pairs[..1], 1).unwrap();
    let d = max_diff(&alone, &again[..1]);
    assert!(d <= 1e-5, "{alone:?} vs {:?}", &again[..1]);
    eprintln!("one pair alone vs in a batch of 3: max |diff| {d:.3e}");
    // Each checkpoint holds its value head.
    for step in [2, 4] {
        let ck = out.join(format!("checkpoint-{step}"));
        assert!(
            ck.join("value_head.safetensors").is_file(),
            "{}",
            ck.display()
        );
        assert!(
            ck.join("adapter_model.safetensors").is_file(),
            "{}",
            ck.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
