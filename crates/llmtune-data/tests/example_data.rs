//! The project's example data (`data/example`) and the inspect report.

mod common;

use common::byte_tokenizer;
use llmtune_data::{inspect, load_raw, prepare, DataArgs, Sha1Status, Stage};

fn example_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/example")
}

fn args(names: &[&str]) -> DataArgs {
    DataArgs {
        dataset: names.iter().map(|s| s.to_string()).collect(),
        dataset_dir: example_dir(),
        disable_cache: true,
        template: "chatml".into(),
        ..DataArgs::default()
    }
}

#[test]
fn example_sets_load_with_matching_sha1() {
    let sft = load_raw(&args(&["example_sft"]), Stage::Sft).unwrap();
    assert!(sft.samples.len() >= 60, "{}", sft.samples.len());
    assert_eq!(sft.datasets[0].sha1, Sha1Status::Match);
    assert_eq!(sft.datasets[0].kept, sft.datasets[0].records);
    let multi = sft.samples.iter().filter(|s| !s.history.is_empty()).count();
    assert!(multi >= 20, "{multi} multi-turn samples");
    let zh = sft
        .samples
        .iter()
        .filter(|s| {
            s.query
                .chars()
                .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
        })
        .count();
    assert!(
        zh >= 20 && sft.samples.len() - zh >= 20,
        "{zh} Chinese samples"
    );

    let rm = load_raw(&args(&["example_rm"]), Stage::Rm).unwrap();
    assert!(rm.samples.len() >= 30, "{}", rm.samples.len());
    assert_eq!(rm.datasets[0].sha1, Sha1Status::Match);

    // The held-out test set of the quickstart: no question of it is in the training set.
    let test = load_raw(&args(&["example_test"]), Stage::Sft).unwrap();
    assert_eq!(test.samples.len(), 12);
    assert_eq!(test.datasets[0].sha1, Sha1Status::Match);
    for t in &test.samples {
        assert!(
            sft.samples.iter().all(|s| s.query != t.query),
            "{} is also in example_sft",
            t.query
        );
    }
}

fn tok(dir: &std::path::Path) -> llmtune_tokenize::Tokenizer {
    match common::fixture_tokenizer() {
        Some(t) => t,
        None => byte_tokenizer(
            dir,
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            Some("<|endoftext|>"),
            Some("<|im_end|>"),
            Some("<|endoftext|>"),
        ),
    }
}

#[test]
fn inspect_reports_counts_lengths_and_the_label_mask() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok(dir.path());
    let mut a = args(&["example_sft", "example_sft"]);
    a.dev_ratio = 0.1;
    a.max_source_length = 64;
    a.max_target_length = 16;
    let r = inspect(&a, &tok, Stage::Sft, false).unwrap();
    let n = r.stats.kept;
    assert_eq!(n, 2 * r.datasets[0].kept);
    assert!(r.stats.source_truncated > 0 && r.stats.target_truncated > 0);
    assert!(r.source.unwrap().max <= 64);
    assert!(r.source_full.unwrap().max > 64);
    let text = r.to_string();
    assert!(
        text.contains(
            "template chatml, stage sft (Supervised), max_source_length 64, max_target_length 16"
        ),
        "{text}"
    );
    assert!(
        text.contains("example_sft: ") && text.contains("(SHA-1 ok)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "encoded: {n} examples from {n} samples; 0 dropped as over length"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "dev split (dev_ratio 0.1, seed 42): {} train / {} dev",
            n - (n as f64 * 0.1).ceil() as usize,
            (n as f64 * 0.1).ceil() as usize
        )),
        "{text}"
    );
    // The first example: the prompt is masked (in ⟦…⟧), the answer and eos are not.
    let labels = &r
        .first
        .iter()
        .find(|(h, _)| h.starts_with("labels"))
        .unwrap()
        .1;
    assert!(labels.starts_with("⟦<|im_start|>user\n"), "{labels}");
    assert!(labels.contains("<|im_start|>assistant\n⟧"), "{labels}");
    assert!(labels.ends_with("<|im_end|>"), "{labels}");

    // RM: chosen and rejected rows shown with the prompt masked.
    let r = inspect(&args(&["example_rm"]), &tok, Stage::Rm, false).unwrap();
    let text = r.to_string();
    assert!(
        text.contains("chosen (⟦prompt⟧ + response):\n⟦<|im_start|>user\n"),
        "{text}"
    );
    assert_eq!(r.target_full.unwrap().count, 2 * r.stats.kept);
}

#[test]
fn example_data_encodes_for_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok(dir.path());
    for (names, stage, pwg) in [
        (&["example_sft"][..], Stage::Sft, false),
        (&["example_sft"][..], Stage::Sft, true),
        (&["example_sft"][..], Stage::Ppo, false),
        (&["example_rm"][..], Stage::Rm, false),
    ] {
        let d = prepare(&args(names), &tok, stage, pwg).unwrap();
        assert_eq!(d.examples.len(), d.datasets[0].kept);
        assert_eq!(d.mode, stage.encode_mode(pwg));
        assert!(d.examples.iter().all(|e| e.mode() == d.mode));
    }
}

/// `data inspect --stage rm` lists the pairs whose chosen and rejected texts are equal; they
/// stay in the data.
#[test]
fn inspect_reports_identical_pairs_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tok(dir.path());
    let data = dir.path().join("data");
    let rows = serde_json::json!([
        {"instruction": "q0", "output": ["good", "bad"]},
        {"instruction": "q1", "output": ["same", "same"]},
        {"instruction": "q2", "output": ["", "dropped: empty chosen"]},
        {"instruction": "q3", "output": ["x", "x"]},
        {"instruction": "q4", "output": ["a", "b"]},
    ]);
    common::write_dataset(
        &data,
        &serde_json::json!({"pairs": {"file_name": "pairs.json"}}),
        &[("pairs.json", &rows.to_string())],
    );
    let a = DataArgs {
        dataset: vec!["pairs".into()],
        dataset_dir: data.clone(),
        disable_cache: true,
        template: "chatml".into(),
        ..DataArgs::default()
    };
    let r = inspect(&a, &tok, Stage::Rm, false).unwrap();
    assert_eq!(r.identical_pairs, vec![("pairs".to_string(), vec![1, 3])]);
    assert_eq!(r.identical_pair_count(), 2);
    assert_eq!(r.stats.kept, 4, "identical pairs are kept");
    let text = r.to_string();
    assert!(
        text.contains(
            "pairs with chosen == rejected: 2 (kept; they carry no preference: loss log 2, never counted as correct)\n  pairs: 2 at records 1, 3\n"
        ),
        "{text}"
    );
    // Not a pairwise stage: nothing to report.
    let r = inspect(&args(&["example_sft"]), &tok, Stage::Sft, false).unwrap();
    assert!(r.identical_pairs.is_empty());
    assert!(!r.to_string().contains("chosen == rejected"));
    // The example RM data has none.
    let r = inspect(&args(&["example_rm"]), &tok, Stage::Rm, false).unwrap();
    assert_eq!(r.identical_pair_count(), 0);
    assert!(r.to_string().contains("pairs with chosen == rejected: 0\n"));
}
