//! The encoded-data cache: reused, rebuilt on demand, keyed by data, tokenizer and args.

mod common;

use common::{byte_tokenizer, write_dataset};
use llmtune_data::cache::{from_bytes, to_bytes, CacheEntry, CacheHeader};
use llmtune_data::{
    prepare, CacheStatus, DataArgs, EncodeMode, EncodeStats, Example, PairExample, PromptExample,
    Stage, SupervisedExample,
};
use serde_json::json;

struct Setup {
    _dir: tempfile::TempDir,
    tok: llmtune_tokenize::Tokenizer,
    args: DataArgs,
    data_file: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tok = match common::fixture_tokenizer() {
        Some(t) => t,
        None => byte_tokenizer(
            &dir.path().join("tok"),
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            Some("<|endoftext|>"),
            Some("<|im_end|>"),
            Some("<|endoftext|>"),
        ),
    };
    let data = dir.path().join("data");
    write_dataset(
        &data,
        &json!({"d": {"file_name": "d.json", "columns": {"prompt": "instruction", "response": "output", "history": "history"}}}),
        &[(
            "d.json",
            r#"[{"instruction": "头痛三天了", "output": "有没有发热？", "history": []},
                {"instruction": "没有发热", "output": "先休息观察。", "history": [["头痛三天了", "有没有发热？"]]}]"#,
        )],
    );
    let args = DataArgs {
        dataset: vec!["d".into()],
        dataset_dir: data.clone(),
        template: "chatml".into(),
        cache_dir: Some(dir.path().join("cache")),
        max_source_length: 256,
        max_target_length: 64,
        ..DataArgs::default()
    };
    Setup {
        data_file: data.join("d.json"),
        _dir: dir,
        tok,
        args,
    }
}

fn path_of(c: &CacheStatus) -> std::path::PathBuf {
    match c {
        CacheStatus::Hit(p) | CacheStatus::Written(p) | CacheStatus::WriteFailed(p, _) => p.clone(),
        CacheStatus::Disabled => panic!("cache disabled"),
    }
}

#[test]
fn cache_is_reused_and_rebuilt_on_demand() {
    let s = setup();
    let first = prepare(&s.args, &s.tok, Stage::Sft, false).unwrap();
    assert!(
        matches!(first.cache, CacheStatus::Written(_)),
        "{:?}",
        first.cache
    );
    let file = path_of(&first.cache);
    assert!(file.exists());
    assert!(file.starts_with(s.args.cache_dir.as_ref().unwrap()));

    let second = prepare(&s.args, &s.tok, Stage::Sft, false).unwrap();
    assert_eq!(second.cache, CacheStatus::Hit(file.clone()));
    assert_eq!(second.examples, first.examples);
    assert_eq!(second.stats, first.stats);
    assert_eq!(second.datasets, first.datasets);

    // overwrite_cache rebuilds and rewrites the same file.
    let mut a = s.args.clone();
    a.overwrite_cache = true;
    let third = prepare(&a, &s.tok, Stage::Sft, false).unwrap();
    assert_eq!(third.cache, CacheStatus::Written(file.clone()));
    assert_eq!(third.examples, first.examples);

    // Another argument, another stage or other data: another key.
    let mut a = s.args.clone();
    a.max_source_length = 255;
    let p1 = path_of(&prepare(&a, &s.tok, Stage::Sft, false).unwrap().cache);
    assert_ne!(p1, file);
    let ppo = prepare(&s.args, &s.tok, Stage::Ppo, false).unwrap();
    assert!(matches!(ppo.cache, CacheStatus::Written(_)));
    assert!(matches!(ppo.examples[0], Example::Prompt(_)));
    let text = std::fs::read_to_string(&s.data_file).unwrap();
    std::fs::write(&s.data_file, text.replace("先休息观察。", "多喝水。")).unwrap();
    let changed = prepare(&s.args, &s.tok, Stage::Sft, false).unwrap();
    assert!(matches!(changed.cache, CacheStatus::Written(_)));
    assert_ne!(path_of(&changed.cache), file);
    assert_ne!(changed.examples, first.examples);

    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(s.args.cache_dir.as_ref().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn corrupt_cache_is_rebuilt() {
    let s = setup();
    let first = prepare(&s.args, &s.tok, Stage::Sft, false).unwrap();
    let file = path_of(&first.cache);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&file, &bytes).unwrap();
    let again = prepare(&s.args, &s.tok, Stage::Sft, false).unwrap();
    assert_eq!(again.cache, CacheStatus::Written(file));
    assert_eq!(again.examples, first.examples);
}

#[test]
fn disabled_and_unwritable_caches_still_give_data() {
    let s = setup();
    let mut a = s.args.clone();
    a.disable_cache = true;
    let d = prepare(&a, &s.tok, Stage::Sft, false).unwrap();
    assert_eq!(d.cache, CacheStatus::Disabled);
    // A cache "folder" that is a file cannot be created.
    let mut a = s.args.clone();
    let blocker = s.data_file.parent().unwrap().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    a.cache_dir = Some(blocker.join("sub"));
    let d2 = prepare(&a, &s.tok, Stage::Sft, false).unwrap();
    assert!(
        matches!(d2.cache, CacheStatus::WriteFailed(..)),
        "{:?}",
        d2.cache
    );
    assert_eq!(d2.examples, d.examples);
}

#[test]
fn binary_format_round_trips_every_kind() {
    let entry = CacheEntry {
        header: CacheHeader {
            key: "abc".into(),
            mode: EncodeMode::Supervised,
            datasets: vec![],
            stats: EncodeStats {
                samples: 3,
                kept: 3,
                source_lens: vec![1, 2, 3],
                ..EncodeStats::default()
            },
        },
        examples: vec![
            Example::Supervised(SupervisedExample {
                input_ids: vec![1, 2, 3],
                labels: vec![-100, 2, 3],
                prompt_len: 1,
                sop_index: Some(0),
            }),
            Example::Prompt(PromptExample {
                input_ids: vec![4294967295],
                target_ids: vec![],
                sop_index: None,
            }),
            Example::Pair(PairExample {
                chosen_ids: vec![5, 6],
                rejected_ids: vec![5, 7, 8],
                prompt_len: 1,
                sop_index: None,
            }),
        ],
    };
    let bytes = to_bytes(&entry).unwrap();
    assert_eq!(from_bytes(&bytes).unwrap(), entry);
    assert!(from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(from_bytes(b"not a cache").is_err());
}
