//! `read_predictions`: pairs in order, and errors that name the file, line and field.

use std::path::PathBuf;

use llmtune_metrics::{read_predictions, MetricsError};

/// Write `content` to a file of this test's own under Cargo's per-target temp dir.
fn write(name: &str, content: &str) -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("read_predictions_{name}.jsonl"));
    std::fs::write(&path, content).expect("write test file");
    path
}

fn error(name: &str, content: &str) -> (PathBuf, String) {
    let path = write(name, content);
    let err = read_predictions(&path).expect_err("expected an error");
    (path.clone(), err.to_string())
}

#[test]
fn reads_pairs_in_order_as_prediction_label() {
    let path = write(
        "ok",
        "{\"label\": \"您好\", \"predict\": \"你好\"}\n\n{\"predict\": \"b\", \"label\": \"a\", \"extra\": 1}\r\n",
    );
    let pairs = read_predictions(&path).expect("valid file");
    assert_eq!(
        pairs,
        [
            ("你好".to_string(), "您好".to_string()),
            ("b".to_string(), "a".to_string())
        ]
    );
}

#[test]
fn missing_field_names_file_line_and_field() {
    let (path, message) = error(
        "missing",
        "{\"label\": \"a\", \"predict\": \"b\"}\n{\"label\": \"a\"}\n",
    );
    assert_eq!(
        message,
        format!("{}:2: missing field \"predict\"", path.display())
    );
}

#[test]
fn bad_json_names_file_and_line() {
    let (path, message) = error(
        "bad_json",
        "{\"label\": \"a\", \"predict\": \"b\"}\n\n{\"label\": \"a\",\n",
    );
    let prefix = format!("{}:3: invalid JSON: ", path.display());
    assert!(message.starts_with(&prefix), "{message}");
    assert!(message.contains("EOF while parsing"), "{message}");
}

#[test]
fn wrong_types_are_reported() {
    let (path, message) = error("not_string", "{\"label\": 3, \"predict\": \"b\"}\n");
    assert_eq!(
        message,
        format!("{}:1: field \"label\" is not a string", path.display())
    );
    let (path, message) = error("not_object", "[\"a\", \"b\"]\n");
    assert_eq!(
        message,
        format!("{}:1: expected a JSON object", path.display())
    );
}

#[test]
fn missing_file_is_an_io_error() {
    let path =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("read_predictions_does_not_exist.jsonl");
    let err = read_predictions(&path).expect_err("missing file");
    assert!(matches!(err, MetricsError::Io { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("{}: cannot read predictions: ", path.display())),
        "{err}"
    );
}
