//! dataset_info.json, file formats, filtering, and every malformed-input error message.

mod common;

use common::{byte_tokenizer, write_dataset};
use llmtune_data::{load_raw, prepare, DataArgs, DataError, Response, Sha1Status, Stage};
use serde_json::json;

fn args(dir: &std::path::Path, datasets: &[&str]) -> DataArgs {
    DataArgs {
        dataset: datasets.iter().map(|s| s.to_string()).collect(),
        dataset_dir: dir.to_path_buf(),
        ..DataArgs::default()
    }
}

/// Loads and returns the error message (the load must fail).
fn load_err(
    info: serde_json::Value,
    files: &[(&str, &str)],
    dataset: &str,
    stage: Stage,
) -> (String, DataError, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), &info, files);
    let e = load_raw(&args(dir.path(), &[dataset]), stage).unwrap_err();
    let path = dir.path().to_path_buf();
    std::mem::forget(dir); // keep paths valid for the message checks
    (e.to_string(), e, path)
}

const HIST: &str = r#"{"prompt": "instruction", "response": "output", "history": "history"}"#;

fn info_with_history(file: &str) -> serde_json::Value {
    json!({"d": {"file_name": file, "columns": serde_json::from_str::<serde_json::Value>(HIST).unwrap()}})
}

// ---------- happy paths ----------

#[test]
fn json_jsonl_csv_and_folder_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let info = json!({
        "a": {"file_name": "a.json"},
        "b": {"file_name": "b.jsonl"},
        "c": {"file_name": "c.csv"},
        "f": {"file_name": "folder"}
    });
    write_dataset(
        dir.path(),
        &info,
        &[
            ("a.json", r#"[{"instruction": "a0", "input": "+in", "output": "A0"}, {"instruction": "a1", "output": "A1"}]"#),
            ("b.jsonl", "{\"instruction\": \"b0\", \"output\": \"B0\"}\n\n{\"instruction\": \"b1\", \"input\": null, \"output\": \"B1\"}\n"),
            ("c.csv", "instruction,input,output\nc0,,C0\n\"c1, quoted\",x,\"C1\nline\"\n"),
            ("folder/2.jsonl", "{\"instruction\": \"f2\", \"output\": \"F2\"}\n"),
            ("folder/1.jsonl", "{\"instruction\": \"f1\", \"output\": \"F1\"}\n"),
            ("folder/.hidden", "ignored"),
        ],
    );
    let raw = load_raw(&args(dir.path(), &["a", "b", "c", "f"]), Stage::Sft).unwrap();
    let got: Vec<(&str, &Response)> = raw
        .samples
        .iter()
        .map(|s| (s.query.as_str(), &s.response))
        .collect();
    let t = |s: &str| Response::Text(s.into());
    assert_eq!(
        got,
        vec![
            ("a0+in", &t("A0")),
            ("a1", &t("A1")),
            ("b0", &t("B0")),
            ("b1", &t("B1")),
            ("c0", &t("C0")),
            ("c1, quotedx", &t("C1\nline")),
            ("f1", &t("F1")),
            ("f2", &t("F2")),
        ]
    );
    assert_eq!(raw.datasets.len(), 4);
    assert_eq!(raw.datasets[3].sha1, Sha1Status::Folder);
    assert_eq!(raw.datasets[0].sha1, Sha1Status::Missing);
    assert_eq!(raw.samples[7].record, 0);
    assert!(raw.files[raw.samples[7].file].ends_with("folder/2.jsonl"));
}

#[test]
fn max_samples_takes_the_first_n_of_each_and_empties_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let info = json!({"x": {"file_name": "x.json"}, "y": {"file_name": "y.json"}});
    write_dataset(
        dir.path(),
        &info,
        &[
            (
                "x.json",
                r#"[{"instruction": "", "output": "o"}, {"instruction": "x1", "output": ""},
                          {"instruction": "x2", "output": null}, {"instruction": "x3", "output": "o"},
                          {"instruction": "x4", "output": "o"}]"#,
            ),
            (
                "y.json",
                r#"[{"instruction": "y0", "output": "o"}, {"instruction": "y1", "output": "o"}]"#,
            ),
        ],
    );
    let mut a = args(dir.path(), &["x", "y"]);
    a.max_samples = Some(4);
    let raw = load_raw(&a, Stage::Sft).unwrap();
    let q: Vec<&str> = raw.samples.iter().map(|s| s.query.as_str()).collect();
    assert_eq!(q, vec!["x3", "y0", "y1"]);
    let x = &raw.datasets[0];
    assert_eq!((x.records, x.used, x.kept), (5, 4, 1));
    assert_eq!((x.dropped_empty_prompt, x.dropped_empty_response), (1, 2));
    assert_eq!((raw.datasets[1].used, raw.datasets[1].kept), (2, 2));
}

#[test]
fn sha1_match_mismatch_and_missing_are_warnings_only() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"[{"instruction": "q", "output": "a"}]"#;
    let good = llmtune_data::registry::sha1_hex(body.as_bytes());
    let info = json!({
        "ok": {"file_name": "d.json", "file_sha1": good.to_uppercase()},
        "bad": {"file_name": "d.json", "file_sha1": "0000000000000000000000000000000000000000"},
        "none": {"file_name": "d.json"}
    });
    write_dataset(dir.path(), &info, &[("d.json", body)]);
    let raw = load_raw(&args(dir.path(), &["ok", "bad", "none"]), Stage::Sft).unwrap();
    assert_eq!(raw.datasets[0].sha1, Sha1Status::Match);
    assert_eq!(
        raw.datasets[1].sha1,
        Sha1Status::Mismatch {
            expected: "0000000000000000000000000000000000000000".into(),
            actual: good.clone()
        }
    );
    assert_eq!(raw.datasets[2].sha1, Sha1Status::Missing);
    assert_eq!(raw.samples.len(), 3);
}

#[test]
fn history_and_preference_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let info = json!({
        "s": {"file_name": "s.json", "columns": {"prompt": "q", "response": "a", "history": "h"}},
        "r": {"file_name": "r.json"},
        "c": {"file_name": "c.csv", "columns": {"prompt": "instruction", "response": "output", "history": "history"}}
    });
    write_dataset(
        dir.path(),
        &info,
        &[
            (
                "s.json",
                r#"[{"q": "now", "a": "ans", "h": [["q1", "a1"], ["q2", "a2"]]}, {"q": "x", "a": "y", "h": null}]"#,
            ),
            (
                "r.json",
                r#"[{"instruction": "p", "output": ["good", "bad"]}, {"instruction": "p2", "output": ["g", "b", "c", "d"]}, {"instruction": "p3", "output": ["", "b"]}]"#,
            ),
            (
                "c.csv",
                "instruction,output,history\nq,a,\"[[\"\"hq\"\", \"\"ha\"\"]]\"\nq2,a2,\n",
            ),
        ],
    );
    let raw = load_raw(&args(dir.path(), &["s", "c"]), Stage::Sft).unwrap();
    assert_eq!(
        raw.samples[0].history,
        vec![("q1".into(), "a1".into()), ("q2".into(), "a2".into())]
    );
    assert!(raw.samples[1].history.is_empty());
    assert_eq!(raw.samples[2].history, vec![("hq".into(), "ha".into())]);
    assert!(raw.samples[3].history.is_empty());

    let raw = load_raw(&args(dir.path(), &["r"]), Stage::Rm).unwrap();
    assert_eq!(raw.samples.len(), 2);
    assert_eq!(
        raw.samples[1].response,
        Response::Pair {
            chosen: "g".into(),
            rejected: "b".into()
        }
    );
    assert_eq!(raw.datasets[0].extra_responses_ignored, 1);
    assert_eq!(raw.datasets[0].dropped_empty_response, 1);
}

// ---------- errors: each names file, record and field (or dataset and known names) ----------

#[test]
fn err_unknown_dataset_lists_known() {
    let (msg, e, dir) = load_err(
        json!({"alpha": {"file_name": "a.json"}, "beta": {"file_name": "b.json"}}),
        &[],
        "gamma",
        Stage::Sft,
    );
    assert!(matches!(e, DataError::UnknownDataset { .. }));
    assert_eq!(
        msg,
        format!(
            "unknown dataset `gamma`: {} registers alpha, beta",
            dir.join("dataset_info.json").display()
        )
    );
}

#[test]
fn err_missing_file() {
    let (msg, e, dir) = load_err(
        json!({"d": {"file_name": "nope.json"}}),
        &[],
        "d",
        Stage::Sft,
    );
    assert!(matches!(e, DataError::MissingFile { .. }));
    assert_eq!(
        msg,
        format!(
            "dataset `d`: data file {} not found (file_name `nope.json` in {})",
            dir.join("nope.json").display(),
            dir.join("dataset_info.json").display()
        )
    );
}

#[test]
fn err_malformed_json_has_line_and_column() {
    let (msg, e, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            "[\n  {\"instruction\": \"a\",\n   \"output\": }\n]",
        )],
        "d",
        Stage::Sft,
    );
    assert!(
        matches!(
            e,
            DataError::Json {
                line: 3,
                column: 14,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        msg,
        format!(
            "{}: malformed JSON at line 3, column 14: expected value",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_bad_jsonl_line() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.jsonl"}}),
        &[("d.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\" \"output\": \"b\"}\n")],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: line 2 (record 1): malformed JSON at column 21: expected `,` or `}}`",
            dir.join("d.jsonl").display()
        )
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.jsonl"}}),
        &[("d.jsonl", "[1, 2]\n")],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: line 1 (record 0): expected a JSON object, found a list",
            dir.join("d.jsonl").display()
        )
    );
}

#[test]
fn err_csv_missing_column_and_bad_row() {
    let (msg, e, dir) = load_err(
        json!({"d": {"file_name": "d.csv"}}),
        &[("d.csv", "instruction,answer\nq,a\n")],
        "d",
        Stage::Sft,
    );
    assert!(matches!(e, DataError::CsvMissingColumn { .. }));
    assert_eq!(
        msg,
        format!(
            "{}: the CSV header has no column `output` (the response column of dataset `d`); header columns: instruction, answer",
            dir.join("d.csv").display()
        )
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.csv"}}),
        &[("d.csv", "instruction,output\nq,a\nq2,a2,extra\n")],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: CSV record 1 (line 3): has 3 fields, the header has 2",
            dir.join("d.csv").display()
        )
    );
}

#[test]
fn err_columns_entry_naming_a_field_no_record_has() {
    let (msg, e, dir) = load_err(
        json!({"d": {"file_name": "d.json", "columns": {"prompt": "instruction", "response": "output", "history": "turns"}}}),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": "a", "history": []}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert!(matches!(e, DataError::MissingColumn { .. }));
    assert_eq!(
        msg,
        format!(
            "dataset `d` ({}): no record has the field `turns` named as its history column; records have the fields: history, instruction, output (set `columns` in dataset_info.json)",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_explicit_query_column_missing() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}),
        &[("d.json", r#"[{"instruction": "q", "output": "a"}]"#)],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "dataset `d` ({}): no record has the field `input` named as its query column; records have the fields: instruction, output (set `columns` in dataset_info.json)",
            dir.join("d.json").display()
        )
    );
    // Without `columns`, a missing `input` field just means an empty query.
    let dir = tempfile::tempdir().unwrap();
    write_dataset(
        dir.path(),
        &json!({"d": {"file_name": "d.json"}}),
        &[("d.json", r#"[{"instruction": "q", "output": "a"}]"#)],
    );
    assert_eq!(
        load_raw(&args(dir.path(), &["d"]), Stage::Sft)
            .unwrap()
            .samples[0]
            .query,
        "q"
    );
}

#[test]
fn err_history_not_a_list_of_pairs() {
    let (msg, _, dir) = load_err(
        info_with_history("d.json"),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": "a", "history": []}, {"instruction": "q", "output": "a", "history": "earlier turns"}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 1: field `history`: expected a list of [question, answer] pairs, found a string",
            dir.join("d.json").display()
        )
    );
    let (msg, _, dir) = load_err(
        info_with_history("d.json"),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": "a", "history": [["q1", "a1"], ["q2"]]}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!("{}: record 0: field `history[1]`: expected a [question, answer] pair, found a list of 1", dir.join("d.json").display())
    );
}

#[test]
fn err_history_pair_not_strings() {
    let (msg, _, dir) = load_err(
        info_with_history("d.json"),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": "a", "history": [["q1", 42]]}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 0: field `history[0][1]`: expected a string (answer), found a number",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_rm_output_not_a_two_element_list() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": ["c", "r"]}, {"instruction": "q", "output": "only one"}]"#,
        )],
        "d",
        Stage::Rm,
    );
    assert_eq!(
        msg,
        format!("{}: record 1: field `output`: expected a two-element list [chosen, rejected], found a string", dir.join("d.json").display())
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[("d.json", r#"[{"instruction": "q", "output": ["only"]}]"#)],
        "d",
        Stage::Rm,
    );
    assert_eq!(
        msg,
        format!("{}: record 0: field `output`: expected a two-element list [chosen, rejected], found a list of 1", dir.join("d.json").display())
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": ["c", {"text": "r"}]}]"#,
        )],
        "d",
        Stage::Rm,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 0: field `output[1]`: expected a string (rejected), found an object",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_sft_given_preference_pairs() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[("d.json", r#"[{"instruction": "q", "output": ["c", "r"]}]"#)],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 0: field `output`: expected a string, found a list (preference pairs [chosen, rejected] are read by --stage rm)",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_non_string_prompt() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            r#"[{"instruction": "fine", "output": "a"}, {"instruction": "ok", "output": "a"}, {"instruction": 7, "output": "a"}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 2: field `instruction`: expected a string, found a number",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_record_not_an_object() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            r#"[{"instruction": "q", "output": "a"}, "stray"]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: record 1: field `(record)`: expected an object like {{\"instruction\": ..., \"output\": ...}}, found a string",
            dir.join("d.json").display()
        )
    );
}

#[test]
fn err_no_valid_samples_says_why() {
    let (msg, e, _) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[(
            "d.json",
            r#"[{"instruction": "", "output": "a"}, {"instruction": "q", "output": ""}, {"instruction": null, "output": "a"}]"#,
        )],
        "d",
        Stage::Sft,
    );
    assert!(matches!(e, DataError::NoSamples { .. }));
    assert_eq!(msg, "no valid samples left in d: all 3 records were dropped: 2 with an empty prompt, 1 with an empty response");
    let (msg, _, _) = load_err(
        json!({"d": {"file_name": "d.json"}}),
        &[("d.json", "[]")],
        "d",
        Stage::Sft,
    );
    assert_eq!(msg, "no valid samples left in d: the files hold no records");
}

#[test]
fn err_all_over_length() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(
        &dir.path().join("tok"),
        &["<|im_start|>", "<|im_end|>"],
        None,
        Some("<|im_end|>"),
        None,
    );
    write_dataset(
        &dir.path().join("data"),
        &json!({"d": {"file_name": "d.json"}}),
        &[("d.json", r#"[{"instruction": "q", "output": "a"}]"#)],
    );
    let mut a = args(&dir.path().join("data"), &["d"]);
    a.template = "chatml".into();
    a.max_source_length = 8;
    a.disable_cache = true;
    let msg = prepare(&a, &tok, Stage::Sft, false)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "no valid samples left in d: all 1 samples are over length: template `chatml` needs more than max_source_length=8 tokens around even one query token"
    );
}

#[test]
fn err_dataset_info_malformed_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dataset_info.json"),
        "{\n  \"d\": {\"file_name\": \"d.json\",}\n}",
    )
    .unwrap();
    let msg = load_raw(&args(dir.path(), &["d"]), Stage::Sft)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        format!(
            "{}: malformed JSON at line 2, column 31: trailing comma",
            dir.path().join("dataset_info.json").display()
        )
    );
    let empty = tempfile::tempdir().unwrap();
    let e = load_raw(&args(empty.path(), &["d"]), Stage::Sft).unwrap_err();
    assert!(matches!(e, DataError::InfoRead { .. }));
    assert!(e.to_string().starts_with(&format!(
        "cannot read {}: ",
        empty.path().join("dataset_info.json").display()
    )));
}

#[test]
fn err_dataset_info_bad_entries() {
    let (msg, _, dir) = load_err(
        json!({"d": {"hf_hub_url": "org/name"}}),
        &[],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: dataset `d`: `hf_hub_url` datasets are not supported: llmtune reads local files only; download the data and give its `file_name`",
            dir.join("dataset_info.json").display()
        )
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.json", "columns": {"prompt": 3}}}),
        &[],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: dataset `d`: `columns.prompt` must be a field name (a string), found a number",
            dir.join("dataset_info.json").display()
        )
    );
    let (msg, _, dir) = load_err(json!(["d"]), &[], "d", Stage::Sft);
    assert_eq!(
        msg,
        format!(
            "{}: malformed JSON at line 1, column 1: expected an object mapping dataset names to entries, found a list",
            dir.join("dataset_info.json").display()
        )
    );
}

#[test]
fn err_unsupported_file_types() {
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "d.txt"}}),
        &[("d.txt", "q\ta")],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: dataset `d`: unsupported file type (expected .json, .jsonl or .csv, or a folder of them)",
            dir.join("d.txt").display()
        )
    );
    let (msg, _, dir) = load_err(
        json!({"d": {"file_name": "f"}}),
        &[("f/a.json", "[]"), ("f/b.csv", "instruction,output\n")],
        "d",
        Stage::Sft,
    );
    assert_eq!(
        msg,
        format!(
            "{}: dataset `d`: the folder mixes file types ({} and {}); use one type per folder",
            dir.join("f").display(),
            dir.join("f/a.json").display(),
            dir.join("f/b.csv").display()
        )
    );
}

#[test]
fn err_bad_arguments_name_the_flag() {
    let mut a = DataArgs {
        dataset: vec!["d".into()],
        ..DataArgs::default()
    };
    a.dev_ratio = 1.5;
    assert_eq!(
        a.validate().unwrap_err().to_string(),
        "invalid value for `dev_ratio`: 1.5 is not in [0, 1)"
    );
    a.dev_ratio = 0.0;
    a.max_target_length = 1;
    assert_eq!(
        a.validate().unwrap_err().to_string(),
        "invalid value for `max_target_length`: 1 leaves no room for the target (at least 2: one token plus eos)"
    );
    let none = DataArgs::default();
    assert_eq!(
        none.validate().unwrap_err().to_string(),
        "invalid value for `dataset`: no dataset given (use --dataset name1,name2)"
    );
    assert_eq!(
        DataArgs::parse_dataset_list("covid_train, covid_dev,"),
        vec!["covid_train", "covid_dev"]
    );
}
