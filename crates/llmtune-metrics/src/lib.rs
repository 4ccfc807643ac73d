//! Prediction metrics equal to the Python reference (ChatGLM-Efficient-Tuning /
//! LLaMA-Factory `ComputeMetrics`, SPEC §10):
//!
//! * [`cut`]: Chinese word segmentation equal to Python jieba 0.42.1 `jieba.cut(text)`;
//! * [`score_pair`]: ROUGE-1/2/L F (`rouge_chinese` 1.0.3 on the space-joined jieba tokens,
//!   with the reference's zero guard) and character-level BLEU-4 (nltk 3.10.4
//!   `sentence_bleu`, smoothing `method3`);
//! * [`score_corpus`]: per-sample scores ×100 rounded to 4 decimals with Python's [`py_round`],
//!   averaged like `numpy.mean`;
//! * [`read_predictions`] / [`summary_json`]: `generated_predictions.jsonl` in,
//!   `predict_*` keys out.

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

mod bleu;
mod pystr;
mod rouge;
mod round;
mod segment;

pub use round::py_round;
pub use segment::cut;

/// Raw (unrounded) scores of one (prediction, label) pair, as fractions in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// nltk `sentence_bleu` over characters, `method3` smoothing.
    pub bleu4: f64,
    /// ROUGE-1 F.
    pub rouge1: f64,
    /// ROUGE-2 F.
    pub rouge2: f64,
    /// ROUGE-L F.
    pub rouge_l: f64,
}

impl Scores {
    /// The four scores as the reference stores them per sample: `round(100 * value, 4)`.
    pub fn rounded_percent(&self) -> Scores {
        let r = |v: f64| py_round(100.0 * v, 4);
        Scores {
            bleu4: r(self.bleu4),
            rouge1: r(self.rouge1),
            rouge2: r(self.rouge2),
            rouge_l: r(self.rouge_l),
        }
    }
}

/// True when Python's `" ".join(tokens).split()` is empty, i.e. no token has a non-space
/// character (Python whitespace, U+3000 included).
pub fn zero_guard(tokens: &[String]) -> bool {
    tokens
        .iter()
        .all(|t| pystr::split_whitespace(t).next().is_none())
}

/// Score one pair like the reference: jieba tokens of both sides; if either side has no
/// non-space token, ROUGE-1/2/L are 0; otherwise `rouge_chinese` F-scores of the
/// space-joined tokens. BLEU-4 is computed on the raw characters in every case.
pub fn score_pair(prediction: &str, label: &str) -> Scores {
    let hyp = cut(prediction);
    let reference = cut(label);
    let [rouge1, rouge2, rouge_l] = if zero_guard(&hyp) || zero_guard(&reference) {
        [0.0; 3]
    } else {
        rouge::rouge_f(&hyp.join(" "), &reference.join(" "))
    };
    Scores {
        bleu4: bleu::sentence_bleu_chars(prediction, label),
        rouge1,
        rouge2,
        rouge_l,
    }
}

/// Corpus summary: means of the per-sample ×100 rounded scores (SPEC §10) and average
/// lengths in characters (Unicode scalar values).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    /// Mean of `round(100 * bleu4, 4)`.
    pub bleu4: f64,
    /// Mean of `round(100 * rouge1, 4)`.
    pub rouge1: f64,
    /// Mean of `round(100 * rouge2, 4)`.
    pub rouge2: f64,
    /// Mean of `round(100 * rouge_l, 4)`.
    pub rouge_l: f64,
    /// Mean number of characters of the predictions.
    pub avg_pred_chars: f64,
    /// Mean number of characters of the labels.
    pub avg_label_chars: f64,
    /// Number of pairs.
    pub n: usize,
}

/// Score `(prediction, label)` pairs (in parallel) and average them like the reference's
/// `numpy.mean` over the rounded per-sample scores. An empty corpus gives zero means.
pub fn score_corpus(pairs: &[(String, String)]) -> MetricSummary {
    let scores: Vec<Scores> = pairs
        .par_iter()
        .map(|(prediction, label)| score_pair(prediction, label).rounded_percent())
        .collect();
    let mean = |values: Vec<f64>| {
        if values.is_empty() {
            0.0
        } else {
            round::numpy_mean(&values)
        }
    };
    let column = |f: fn(&Scores) -> f64| mean(scores.iter().map(f).collect());
    let chars = |f: fn(&(String, String)) -> &String| {
        mean(pairs.iter().map(|p| f(p).chars().count() as f64).collect())
    };
    MetricSummary {
        bleu4: column(|s| s.bleu4),
        rouge1: column(|s| s.rouge1),
        rouge2: column(|s| s.rouge2),
        rouge_l: column(|s| s.rouge_l),
        avg_pred_chars: chars(|p| &p.0),
        avg_label_chars: chars(|p| &p.1),
        n: pairs.len(),
    }
}

/// The summary as result keys: `{prefix}_bleu-4`, `{prefix}_rouge-1`, `{prefix}_rouge-2`,
/// `{prefix}_rouge-l` (the reference's names and values), plus `{prefix}_avg_pred_chars` and
/// `{prefix}_avg_label_chars`.
pub fn summary_json(s: &MetricSummary, prefix: &str) -> Value {
    json!({
        format!("{prefix}_bleu-4"): s.bleu4,
        format!("{prefix}_rouge-1"): s.rouge1,
        format!("{prefix}_rouge-2"): s.rouge2,
        format!("{prefix}_rouge-l"): s.rouge_l,
        format!("{prefix}_avg_pred_chars"): s.avg_pred_chars,
        format!("{prefix}_avg_label_chars"): s.avg_label_chars,
    })
}

impl fmt::Display for MetricSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = [
            ("bleu-4", self.bleu4),
            ("rouge-1", self.rouge1),
            ("rouge-2", self.rouge2),
            ("rouge-l", self.rouge_l),
            ("avg pred chars", self.avg_pred_chars),
            ("avg label chars", self.avg_label_chars),
        ];
        writeln!(f, "{:<16} {:>10}", "metric", "value")?;
        for (name, value) in rows {
            writeln!(f, "{name:<16} {value:>10.4}")?;
        }
        write!(f, "{:<16} {:>10}", "samples", self.n)
    }
}

/// Errors of [`read_predictions`]; each names the file and, for content errors, the 1-based
/// line number.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read predictions: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not valid JSON or not UTF-8.
    #[error("{path}:{line}: invalid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A line is valid JSON but not an object with string fields `label` and `predict`.
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Read a `generated_predictions.jsonl`: one `{"label": ..., "predict": ...}` object per line.
/// Returns `(prediction, label)` pairs in file order. Blank lines are skipped.
pub fn read_predictions(path: &Path) -> Result<Vec<(String, String)>, MetricsError> {
    let bytes = std::fs::read(path).map_err(|source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let json_error = |message: String| MetricsError::Json {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = std::str::from_utf8(raw).map_err(|e| json_error(format!("not UTF-8 ({e})")))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| json_error(e.to_string()))?;
        let record_error = |message: String| MetricsError::Record {
            path: path.to_path_buf(),
            line,
            message,
        };
        let object = value
            .as_object()
            .ok_or_else(|| record_error("expected a JSON object".to_string()))?;
        let field = |name: &str| -> Result<String, MetricsError> {
            match object.get(name) {
                None => Err(record_error(format!("missing field \"{name}\""))),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(record_error(format!("field \"{name}\" is not a string"))),
            }
        };
        let label = field("label")?;
        let predict = field("predict")?;
        pairs.push((predict, label));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn zero_guard_uses_python_whitespace() {
        assert!(zero_guard(&[]));
        assert!(zero_guard(&[s(" "), s("\u{3000}"), s("\n"), s("\u{1c}")]));
        assert!(!zero_guard(&[s(" "), s("a")]));
        // Whitespace-only prediction: ROUGE all 0; BLEU still counts characters.
        let scores = score_pair("\u{3000} \n", "你好");
        assert_eq!(
            (scores.rouge1, scores.rouge2, scores.rouge_l),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(scores.bleu4, 0.0);
    }

    #[test]
    fn empty_prediction_scores_zero() {
        let scores = score_pair("", "您好，建议去医院检查。");
        assert_eq!(
            scores,
            Scores {
                bleu4: 0.0,
                rouge1: 0.0,
                rouge2: 0.0,
                rouge_l: 0.0
            }
        );
        let summary = score_corpus(&[(s(""), s("您好"))]);
        assert_eq!((summary.bleu4, summary.rouge1, summary.n), (0.0, 0.0, 1));
        assert_eq!(
            (summary.avg_pred_chars, summary.avg_label_chars),
            (0.0, 2.0)
        );
    }

    #[test]
    fn identical_text_scores_like_the_reference() {
        // rouge_chinese gives 0.999999995 (the 1e-8 term), which rounds to 100.0.
        let scores = score_pair("您好，多喝水。", "您好，多喝水。");
        assert_eq!(scores.rouge1, 0.999999995);
        assert_eq!(scores.bleu4, 1.0);
        let rounded = scores.rounded_percent();
        assert_eq!((rounded.rouge1, rounded.bleu4), (100.0, 100.0));
    }

    #[test]
    fn summary_json_keys_and_display() {
        let summary = MetricSummary {
            bleu4: 1.5,
            rouge1: 2.0,
            rouge2: 3.25,
            rouge_l: 4.0,
            avg_pred_chars: 10.0,
            avg_label_chars: 12.5,
            n: 2,
        };
        let value = summary_json(&summary, "predict");
        assert_eq!(
            value,
            json!({
                "predict_bleu-4": 1.5,
                "predict_rouge-1": 2.0,
                "predict_rouge-2": 3.25,
                "predict_rouge-l": 4.0,
                "predict_avg_pred_chars": 10.0,
                "predict_avg_label_chars": 12.5,
            })
        );
        let table = summary.to_string();
        assert_eq!(
            table,
            "metric                value\n\
             bleu-4               1.5000\n\
             rouge-1              2.0000\n\
             rouge-2              3.2500\n\
             rouge-l              4.0000\n\
             avg pred chars      10.0000\n\
             avg label chars     12.5000\n\
             samples                   2"
        );
    }
}
