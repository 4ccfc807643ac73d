//! The reference datasets (`LLMTUNE_SHARED=/work/shared`): acceptance counts and SHA-1s,
//! read through our registry from `$LLMTUNE_SHARED/data` and `$LLMTUNE_SHARED/data/covid`.

mod common;

use llmtune_data::{load_raw, prepare, DataArgs, Sha1Status, Stage, Template};

fn args(dir: std::path::PathBuf, names: &[&str]) -> DataArgs {
    DataArgs {
        dataset: names.iter().map(|s| s.to_string()).collect(),
        dataset_dir: dir,
        ..DataArgs::default()
    }
}

#[test]
fn covid_counts_and_sha1() {
    let Some(shared) = common::shared() else {
        return;
    };
    let raw = load_raw(
        &args(
            shared.join("data/covid"),
            &["covid_train", "covid_dev", "covid_test"],
        ),
        Stage::Sft,
    )
    .unwrap();
    let got: Vec<(&str, usize, &Sha1Status)> = raw
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.kept, &d.sha1))
        .collect();
    assert_eq!(
        got,
        vec![
            ("covid_train", 3471, &Sha1Status::Match),
            ("covid_dev", 333, &Sha1Status::Match),
            ("covid_test", 410, &Sha1Status::Match),
        ]
    );
    assert_eq!(raw.samples.len(), 3471 + 333 + 410);
}

#[test]
fn preference_counts_and_sha1() {
    let Some(shared) = common::shared() else {
        return;
    };
    let raw = load_raw(
        &args(shared.join("data"), &["comparison_gpt4_zh", "oaast_rm_zh"]),
        Stage::Rm,
    )
    .unwrap();
    let got: Vec<(&str, usize, &Sha1Status)> = raw
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.kept, &d.sha1))
        .collect();
    assert_eq!(
        got,
        vec![
            ("comparison_gpt4_zh", 2403, &Sha1Status::Match),
            ("oaast_rm_zh", 775, &Sha1Status::Match)
        ]
    );
    // oaast_rm_zh: 392 pairs carry history; 341 rows list more than two answers.
    let with_history = raw
        .samples
        .iter()
        .filter(|s| s.dataset == 1 && !s.history.is_empty())
        .count();
    assert_eq!(with_history, 392);
    assert_eq!(raw.datasets[1].extra_responses_ignored, 775 - 434);
}

#[test]
fn covid_sample_with_history_renders_as_the_reference_prompt() {
    let Some(shared) = common::shared() else {
        return;
    };
    let raw = load_raw(
        &args(shared.join("data/covid"), &["covid_train"]),
        Stage::Sft,
    )
    .unwrap();
    let s = raw.samples.iter().find(|s| s.history.len() >= 2).unwrap();
    // The reference's format_example, spelled out.
    let mut want = String::new();
    for (j, (q, a)) in s.history.iter().enumerate() {
        want += &format!("[Round {}]\n\n问：{}\n\n答：{}\n\n", j + 1, q, a);
    }
    want += &format!("[Round {}]\n\n问：{}\n\n答：", s.history.len() + 1, s.query);
    assert_eq!(
        Template::by_name("chatglm")
            .unwrap()
            .render_text(None, &s.history, &s.query),
        want
    );
}

/// Encodes covid_train + covid_dev (3804 samples) with the fixture tokenizer as the seed's
/// SFT command does (source 1024, target 128), here with the ChatML template.
#[test]
fn covid_sft_encoding_with_fixture_tokenizer() {
    let Some(shared) = common::shared() else {
        return;
    };
    let Some(tok) = common::fixture_tokenizer() else {
        return;
    };
    let mut a = args(shared.join("data/covid"), &["covid_train", "covid_dev"]);
    a.template = "chatml".into();
    a.max_source_length = 1024;
    a.max_target_length = 128;
    a.disable_cache = true;
    let data = prepare(&a, &tok, Stage::Sft, false).unwrap();
    assert_eq!(data.examples.len(), 3804);
    assert_eq!(data.stats.dropped_over_length, 0);
    assert!(data.stats.source_lens.iter().all(|&l| l <= 1024));
    assert!(data.stats.target_lens.iter().all(|&l| l <= 127));
    assert!(
        data.stats.source_truncated > 0,
        "long COVID histories must be cut"
    );
    let (train, dev) = llmtune_data::split_dev(data.examples, 0.05, 42).unwrap();
    assert_eq!((train.len(), dev.len()), (3613, 191));
}

/// comparison_gpt4_zh has 20 pairs with chosen == rejected (data/README.md); `data inspect`
/// reports them and the encoding keeps them.
#[test]
fn comparison_identical_pairs_are_reported() {
    let Some(shared) = common::shared() else {
        return;
    };
    let Some(tok) = common::fixture_tokenizer() else {
        return;
    };
    let mut a = args(shared.join("data"), &["comparison_gpt4_zh"]);
    a.template = "chatml".into();
    a.disable_cache = true;
    let r = llmtune_data::inspect(&a, &tok, Stage::Rm, false).unwrap();
    assert_eq!(r.identical_pair_count(), 20);
    assert_eq!(r.stats.kept, 2403);
    let text = r.to_string();
    assert!(
        text.contains("pairs with chosen == rejected: 20 (kept;"),
        "{text}"
    );
    assert!(
        text.contains("  comparison_gpt4_zh: 20 at records "),
        "{text}"
    );
    assert!(
        text.contains(", ...\n"),
        "only the first ones are listed: {text}"
    );
}
