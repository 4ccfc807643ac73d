//! Chinese word segmentation equal to Python jieba 0.42.1 `jieba.cut(text)` (default mode,
//! `HMM=True`, default dictionary).
//!
//! The dictionary walk, the route and the HMM Viterbi come from the `jieba-rs` crate, which
//! follows Python's `__cut_DAG` step for step (same DAG, same `log(freq) - log(total) + route`
//! order of operations, same tie-breaking). Four things differ in `jieba-rs` 0.11 and are
//! corrected here so that the output is Python's:
//!
//! 1. **Blocks.** Python splits the text with `re_han_default =
//!    ([\u4E00-\u9FD5a-zA-Z0-9+#&\._%\-]+)`; `jieba-rs` counts more characters as Han (all CJK
//!    extension blocks and U+9FD6..U+9FFF). We split the text ourselves with Python's class and
//!    hand `jieba-rs` only blocks of that class; outside the blocks we apply Python's
//!    `re_skip_default = (\r\n|\s)` rule: `\r\n` is one token, every other character (space or
//!    not) is a token of its own.
//! 2. **Dictionary.** We load Python jieba's own `dict.txt` (vendored, `data/jieba_dict.txt`).
//!    Python adds *every* line's frequency to the total, duplicates included (`B超` appears
//!    twice); `jieba-rs` keeps one frequency per word. The missing mass is added back under a
//!    key that no block can contain, so `log(total)` is Python's.
//! 3. **HMM emissions.** `jieba-rs` compiles in Python's emission table rounded to 6 decimals.
//!    We load the full-precision tables from the vendored `prob_*.py` files instead.
//! 4. **Non-Han runs inside the HMM.** Python's `finalseg` splits them with
//!    `([a-zA-Z0-9]+(?:\.\d+)?%?)`; `jieba-rs` also joins alphanumeric runs over `.`, `_`, `-`
//!    (`COVID-19`, `1-14`, `1.2.3` stay whole). Such a joined token is a sequence of Python
//!    `finalseg` pieces (a Python match can neither start nor end inside a `jieba-rs` gap), so
//!    re-splitting it with Python's expression gives Python's tokens. Only HMM output can be
//!    such a token: no dictionary word contains `.`, `_` or `-` (checked by a test), and the
//!    other tokens of a block are single characters or dictionary words.

use std::sync::OnceLock;

use jieba_rs::{HmmModel, Jieba};
use regex::Regex;

/// Python jieba 0.42.1 `jieba/dict.txt`, sha256
/// `7197c3211ddd98962b036cdf40324d1ea2bfaa12bd028e68faa70111a88e12a8`.
pub(crate) const DICT: &str = include_str!("../data/jieba_dict.txt");
const PROB_START: &str = include_str!("../data/jieba_prob_start.py");
const PROB_TRANS: &str = include_str!("../data/jieba_prob_trans.py");
const PROB_EMIT: &str = include_str!("../data/jieba_prob_emit.py");

/// HMM states in `jieba-rs`'s index order (`hmm.model` format), which is also Python's
/// alphabetical tie-break order.
const STATES: [char; 4] = ['B', 'E', 'M', 'S'];
/// Python's `MIN_FLOAT`, used for missing transitions and emissions.
const MIN_FLOAT: f64 = -3.14e100;
/// Dictionary key that carries the frequency of duplicated dictionary lines. It starts with a
/// character outside Python's block class, so it never matches inside a block.
const DUPLICATE_MASS_KEY: &str = "\u{0}python-jieba-duplicate-lines";

/// Segment `text` like Python `list(jieba.cut(text))` (jieba 0.42.1, default dictionary,
/// `cut_all=False`, `HMM=True`). Every character of `text` is kept, whitespace included:
/// the tokens concatenate back to `text`.
pub fn cut(text: &str) -> Vec<String> {
    let jieba = segmenter();
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(first) = rest.chars().next() {
        let in_block = is_block_char(first);
        let end = rest
            .char_indices()
            .find(|&(_, c)| is_block_char(c) != in_block)
            .map_or(rest.len(), |(i, _)| i);
        let (run, tail) = rest.split_at(end);
        if in_block {
            for token in jieba.cut(run, true) {
                push_block_token(token.word, &mut out);
            }
        } else {
            push_skip_run(run, &mut out);
        }
        rest = tail;
    }
    out
}

/// Python's `re_han_default` class: `[\u4E00-\u9FD5a-zA-Z0-9+#&\._%\-]`.
fn is_block_char(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FD5}' | 'a'..='z' | 'A'..='Z' | '0'..='9')
        || matches!(c, '+' | '#' | '&' | '.' | '_' | '%' | '-')
}

/// A run outside the blocks: `re_skip_default.split`, then one token per character, except
/// that `\r\n` stays one token.
fn push_skip_run(run: &str, out: &mut Vec<String>) {
    let mut chars = run.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\r' && matches!(chars.peek(), Some(&(_, '\n'))) {
            chars.next();
            out.push(run[i..i + 2].to_string());
        } else {
            out.push(c.to_string());
        }
    }
}

/// A token `jieba-rs` produced for a block; correction 4 of the module docs.
fn push_block_token(token: &str, out: &mut Vec<String>) {
    if token.is_ascii() && token.bytes().any(|b| matches!(b, b'.' | b'_' | b'-')) {
        split_finalseg_skip(token, out);
    } else {
        out.push(token.to_string());
    }
}

/// Python `finalseg.re_skip.split(s)` without the empty pieces, for an ASCII `s`:
/// matches of `[a-zA-Z0-9]+(?:\.\d+)?%?` and the gaps between them.
fn split_finalseg_skip(s: &str, out: &mut Vec<String>) {
    let b = s.as_bytes();
    let (mut i, mut gap_start) = (0, 0);
    while i < b.len() {
        if !b[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        if gap_start < i {
            out.push(s[gap_start..i].to_string());
        }
        let mut j = i;
        while j < b.len() && b[j].is_ascii_alphanumeric() {
            j += 1;
        }
        if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
            j += 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
        }
        if j < b.len() && b[j] == b'%' {
            j += 1;
        }
        out.push(s[i..j].to_string());
        i = j;
        gap_start = j;
    }
    if gap_start < b.len() {
        out.push(s[gap_start..].to_string());
    }
}

/// The process-wide segmenter, built on first use (under a second in a release build).
fn segmenter() -> &'static Jieba {
    static JIEBA: OnceLock<Jieba> = OnceLock::new();
    // The inputs are the vendored files, checked by the tests; failing here is a build defect.
    JIEBA.get_or_init(|| build_segmenter().expect("vendored jieba data must load"))
}

fn build_segmenter() -> Result<Jieba, String> {
    let mut jieba =
        Jieba::with_dict(&mut DICT.as_bytes()).map_err(|e| format!("jieba dict.txt: {e}"))?;
    let mass = duplicate_mass(DICT)?;
    if mass > 0 {
        jieba.add_word(DUPLICATE_MASS_KEY, Some(mass), None);
    }
    let model = python_hmm_model()?;
    jieba.set_hmm_model(model);
    Ok(jieba)
}

/// Sum of all line frequencies (Python's `total`) minus the sum of the last frequency of each
/// word (what `jieba-rs` counts).
fn duplicate_mass(dict: &str) -> Result<usize, String> {
    let mut all = 0usize;
    let mut last = std::collections::HashMap::new();
    for (lineno, line) in dict.lines().enumerate() {
        let mut parts = line.split(' ');
        let (Some(word), Some(freq)) = (parts.next(), parts.next()) else {
            return Err(format!("jieba dict.txt line {}: no frequency", lineno + 1));
        };
        let freq: usize = freq
            .parse()
            .map_err(|e| format!("jieba dict.txt line {}: {e}", lineno + 1))?;
        all += freq;
        last.insert(word, freq);
    }
    Ok(all - last.values().sum::<usize>())
}

/// One parsed `prob_*.py` file: for each state letter, its `(key, probability text)` entries
/// in file order.
type ProbTable = Vec<(char, Vec<(String, String)>)>;

/// Python's `finalseg` HMM tables, converted to the `hmm.model` text that
/// [`HmmModel::load`] reads (states B, E, M, S; missing entries are `MIN_FLOAT`).
fn python_hmm_model() -> Result<HmmModel, String> {
    let start = parse_prob_table(PROB_START, "prob_start.py", false)?;
    let trans = parse_prob_table(PROB_TRANS, "prob_trans.py", false)?;
    let emit = parse_prob_table(PROB_EMIT, "prob_emit.py", true)?;
    let value = |table: &ProbTable, state: char, key: &str| {
        table
            .iter()
            .find(|(s, _)| *s == state)
            .and_then(|(_, entries)| entries.iter().find(|(k, _)| k == key))
            .map_or(format!("{MIN_FLOAT:e}"), |(_, v)| v.clone())
    };
    let mut text = String::new();
    // prob_start.py is one flat dict; parse_prob_table returns it under state '\0'.
    let starts: Vec<String> = STATES
        .iter()
        .map(|&s| value(&start, '\0', &s.to_string()))
        .collect();
    text.push_str(&starts.join(" "));
    text.push('\n');
    for &from in &STATES {
        let row: Vec<String> = STATES
            .iter()
            .map(|&to| value(&trans, from, &to.to_string()))
            .collect();
        text.push_str(&row.join(" "));
        text.push('\n');
    }
    for &state in &STATES {
        let entries = emit
            .iter()
            .find(|(s, _)| *s == state)
            .map(|(_, e)| e.as_slice())
            .ok_or_else(|| format!("prob_emit.py: no state {state}"))?;
        let pairs: Vec<String> = entries.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        text.push_str(&pairs.join(","));
        text.push('\n');
    }
    HmmModel::load(&mut text.as_bytes()).map_err(|e| format!("jieba HMM model: {e}"))
}

/// Parse one of jieba's `prob_*.py` files (`P={...}` dict literals). Entries of an inner dict
/// (`'B': {'E': -0.51, ...}` or `'B': {'\u4e00': -3.65, ...}`) come back under that state
/// letter; the entries of a flat dict (prob_start.py) under `'\0'`, which `nested` rejects.
/// Probabilities are kept as text: `HmmModel::load` parses them with Rust's correctly rounded
/// `f64` parser, which gives exactly Python's `float` of the same literal.
fn parse_prob_table(src: &str, name: &str, nested: bool) -> Result<ProbTable, String> {
    static ENTRY: OnceLock<Regex> = OnceLock::new();
    let entry = ENTRY.get_or_init(|| {
        Regex::new(r"'(\\u[0-9a-fA-F]{4}|[A-Z])': (\{|-?[0-9.]+(?:e[+-]?[0-9]+)?)")
            .expect("valid regex")
    });
    let body = src
        .split_once("P=")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{name}: no `P=`"))?;
    let mut table: ProbTable = Vec::new();
    let mut current = '\0';
    for caps in entry.captures_iter(body) {
        let key = &caps[1];
        let value = &caps[2];
        if value == "{" {
            current = key.chars().next().unwrap_or('\0');
            table.push((current, Vec::new()));
            continue;
        }
        let key = match key.strip_prefix("\\u") {
            Some(hex) => u32::from_str_radix(hex, 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| format!("{name}: bad escape {key}"))?
                .to_string(),
            None => key.to_string(),
        };
        if table.last().map(|(s, _)| *s) != Some(current) {
            table.push((current, Vec::new()));
        }
        if let Some((_, entries)) = table.last_mut() {
            entries.push((key, value.to_string()));
        }
    }
    if nested && table.iter().any(|(s, _)| *s == '\0') {
        return Err(format!("{name}: entries outside a state"));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<String> {
        cut(text)
    }

    #[test]
    fn dictionary_lines_parse_alike_in_python_and_jieba_rs() {
        // Python splits `line.strip()` on single spaces, jieba-rs on any whitespace: they agree
        // when every line is `word freq[ tag]` with single spaces and no other whitespace.
        let mut lines = 0;
        for line in DICT.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            assert!(matches!(parts.len(), 2 | 3), "line {line:?}");
            assert!(parts
                .iter()
                .all(|p| !p.is_empty() && !p.contains(char::is_whitespace)));
            assert!(
                parts[1].bytes().all(|b| b.is_ascii_digit()),
                "line {line:?}"
            );
            lines += 1;
        }
        assert_eq!(lines, 349_046);
        assert_eq!(duplicate_mass(DICT), Ok(3)); // `B超 3` appears twice
    }

    #[test]
    fn no_dictionary_word_contains_a_finalseg_connector() {
        // The precondition of correction 4 (module docs).
        for line in DICT.lines() {
            let word = line.split(' ').next().unwrap_or("");
            assert!(
                !word.contains(['.', '_', '-']),
                "dictionary word {word:?} contains a connector"
            );
        }
    }

    #[test]
    fn hmm_tables_are_pythons_at_full_precision() {
        let emit = parse_prob_table(PROB_EMIT, "prob_emit.py", true).unwrap();
        let sizes: Vec<(char, usize)> = emit.iter().map(|(s, e)| (*s, e.len())).collect();
        assert_eq!(sizes, [('B', 6857), ('E', 7439), ('M', 6409), ('S', 14519)]);
        // First entry of prob_emit.py: 'B': {'\u4e00': -3.6544978750449433, ...
        assert_eq!(
            emit[0].1[0],
            ("一".to_string(), "-3.6544978750449433".to_string())
        );
        let trans = parse_prob_table(PROB_TRANS, "prob_trans.py", false).unwrap();
        assert_eq!(trans.len(), 4);
        assert_eq!(
            trans[0].1[1],
            ("M".to_string(), "-0.916290731874155".to_string())
        );
        let start = parse_prob_table(PROB_START, "prob_start.py", false).unwrap();
        assert_eq!(start.len(), 1);
        assert_eq!(start[0].1.len(), 4);
        assert!(python_hmm_model().is_ok());
    }

    #[test]
    fn hyphenated_ascii_is_split_like_python() {
        // Python jieba 0.42.1: list(jieba.cut(...)).
        assert_eq!(toks("COVID-19"), ["COVID", "-", "19"]);
        assert_eq!(toks("潜伏期1-14天"), ["潜伏期", "1", "-", "14", "天"]);
        assert_eq!(toks("1.2.3"), ["1.2", ".", "3"]);
        assert_eq!(toks("a_b"), ["a", "_", "b"]);
        assert_eq!(toks("37.5%"), ["37.5%"]);
    }

    #[test]
    fn whitespace_and_crlf_tokens() {
        assert_eq!(toks("a\r\n\r b"), ["a", "\r\n", "\r", " ", "b"]);
        assert_eq!(toks("\u{3000}\u{3000}"), ["\u{3000}", "\u{3000}"]);
        assert!(toks("").is_empty());
    }

    #[test]
    fn tokens_concatenate_back_to_the_text() {
        let text = "您好，COVID-19 潜伏期1-14天。\r\n体温37.5℃（1）😀㐀";
        assert_eq!(toks(text).concat(), text);
    }
}
