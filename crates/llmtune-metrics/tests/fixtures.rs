//! Parity with the Python reference on `$LLMTUNE_FIXTURES/metrics/cases.json`
//! (fixtures README §4): jieba tokens exact, zero guard exact, raw scores within 1e-12,
//! rounded ×100 scores exact, means within 1e-9.

use std::path::PathBuf;

use llmtune_metrics::{cut, py_round, score_corpus, score_pair, zero_guard};
use serde_json::Value;

const KEYS: [&str; 4] = ["rouge-1", "rouge-2", "rouge-l", "bleu-4"];

fn load_cases() -> Option<Value> {
    let Some(dir) = std::env::var_os("LLMTUNE_FIXTURES") else {
        eprintln!("skipped: LLMTUNE_FIXTURES not set");
        return None;
    };
    let path = PathBuf::from(dir).join("metrics/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn text<'a>(pair: &'a Value, key: &str) -> &'a str {
    pair[key]
        .as_str()
        .unwrap_or_else(|| panic!("pair field {key} is not a string"))
}

fn tokens(pair: &Value, key: &str) -> Vec<String> {
    serde_json::from_value(pair[key].clone()).unwrap_or_else(|e| panic!("pair field {key}: {e}"))
}

fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number"))
}

fn pairs(cases: &Value) -> &Vec<Value> {
    cases["pairs"]
        .as_array()
        .expect("cases.json has a `pairs` array")
}

#[test]
fn jieba_tokens_equal_python_on_every_pair() {
    let Some(cases) = load_cases() else { return };
    let mut failures = Vec::new();
    let mut checked = 0;
    for pair in pairs(&cases) {
        for (text_key, tokens_key) in [("prediction", "pred_tokens"), ("label", "label_tokens")] {
            let expected = tokens(pair, tokens_key);
            let got = cut(text(pair, text_key));
            checked += 1;
            if got != expected {
                failures.push(format!(
                    "pair {} {tokens_key}: got {got:?}, expected {expected:?}",
                    pair["id"]
                ));
            }
        }
        let guard =
            zero_guard(&cut(text(pair, "prediction"))) || zero_guard(&cut(text(pair, "label")));
        if Some(guard) != pair["zero_guard"].as_bool() {
            failures.push(format!("pair {} zero_guard: got {guard}", pair["id"]));
        }
    }
    eprintln!(
        "jieba: {} of {checked} token lists equal",
        checked - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn scores_equal_python_on_every_pair() {
    let Some(cases) = load_cases() else { return };
    let mut failures = Vec::new();
    let (mut checked, mut bit_exact) = (0, 0);
    for pair in pairs(&cases) {
        let scores = score_pair(text(pair, "prediction"), text(pair, "label"));
        let raw = [scores.rouge1, scores.rouge2, scores.rouge_l, scores.bleu4];
        for (key, value) in KEYS.iter().zip(raw) {
            checked += 1;
            let expected_raw = number(&pair["raw"][key], "raw score");
            let expected_rounded = number(&pair["scores"][key], "rounded score");
            let rounded = py_round(100.0 * value, 4);
            if value == expected_raw {
                bit_exact += 1;
            }
            if (value - expected_raw).abs() > 1e-12 || rounded != expected_rounded {
                failures.push(format!(
                    "pair {} {key}: raw {value:?} (expected {expected_raw:?}), rounded {rounded:?} (expected {expected_rounded:?})",
                    pair["id"]
                ));
            }
        }
    }
    eprintln!(
        "scores: {} of {checked} equal ({bit_exact} raw values bit-exact)",
        checked - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_means_equal_python() {
    let Some(cases) = load_cases() else { return };
    let pairs: Vec<(String, String)> = pairs(&cases)
        .iter()
        .map(|p| {
            (
                text(p, "prediction").to_string(),
                text(p, "label").to_string(),
            )
        })
        .collect();
    let summary = score_corpus(&pairs);
    assert_eq!(summary.n, pairs.len());
    let ours = [
        summary.rouge1,
        summary.rouge2,
        summary.rouge_l,
        summary.bleu4,
    ];
    for (key, value) in KEYS.iter().zip(ours) {
        let expected = number(&cases["means"][key], "mean");
        eprintln!(
            "mean {key}: {value:?} (python {expected:?}, diff {:e})",
            value - expected
        );
        assert!(
            (value - expected).abs() <= 1e-9,
            "mean {key}: {value} vs {expected}"
        );
    }
}
