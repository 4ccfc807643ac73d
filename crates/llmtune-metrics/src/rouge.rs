//! ROUGE-1/2/L F-scores as `rouge_chinese` 1.0.3 `Rouge().get_scores(hyp, ref)[0][k]["f"]`
//! computes them (default `exclusive=True`).
//!
//! For each side: sentence split `cut_sent` (four regex substitutions, `rstrip()`,
//! `split("\n")`), keep the pieces with `len > 0`, normalise each with `" ".join(p.split())`,
//! and concatenate `piece.split(" ")` over the pieces. A piece made only of whitespace thus
//! gives one empty word `""`. ROUGE-N counts n-grams as sets; ROUGE-L is the plain LCS of
//! the whole word lists. `F = 2 * ((P * R) / (P + R + 1e-8))`, in this order of operations.

use std::collections::{HashMap, HashSet};

use crate::pystr;

/// `[rouge-1, rouge-2, rouge-l]` F-scores of `hyp` against `reference` (both the
/// space-joined jieba tokens). The caller applies the zero guard first; `rouge_chinese`
/// would raise on a side without any word.
pub(crate) fn rouge_f(hyp: &str, reference: &str) -> [f64; 3] {
    let hyp_words = words(hyp);
    let ref_words = words(reference);
    [
        rouge_n(&hyp_words, &ref_words, 1),
        rouge_n(&hyp_words, &ref_words, 2),
        rouge_l(&hyp_words, &ref_words),
    ]
}

/// The word list `rouge_chinese` scores for one text.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for piece in cut_sent(text).split('\n') {
        if piece.is_empty() {
            continue;
        }
        let normalized: Vec<&str> = pystr::split_whitespace(piece).collect();
        words.extend(normalized.join(" ").split(' ').map(str::to_string));
    }
    words
}

const STOPS: [char; 4] = ['。', '！', '？', '?'];
const CLOSING_QUOTES: [char; 2] = ['”', '’'];

/// `Rouge.cut_sent` up to (not including) the final `split("\n")`:
/// ```python
/// para = re.sub('([。！？\?])([^”’])', r"\1\n\2", para)
/// para = re.sub('(\.{6})([^”’])', r"\1\n\2", para)
/// para = re.sub('(\…{2})([^”’])', r"\1\n\2", para)
/// para = re.sub('([。！？\?][”’])([^，。！？\?])', r'\1\n\2', para)
/// para = para.rstrip()
/// ```
fn cut_sent(para: &str) -> String {
    let chars: Vec<char> = para.chars().collect();
    let chars = substitute(&chars, 2, 1, |w| {
        STOPS.contains(&w[0]) && !CLOSING_QUOTES.contains(&w[1])
    });
    let chars = substitute(&chars, 7, 6, |w| {
        w[..6].iter().all(|&c| c == '.') && !CLOSING_QUOTES.contains(&w[6])
    });
    let chars = substitute(&chars, 3, 2, |w| {
        w[0] == '…' && w[1] == '…' && !CLOSING_QUOTES.contains(&w[2])
    });
    let chars = substitute(&chars, 3, 2, |w| {
        STOPS.contains(&w[0])
            && CLOSING_QUOTES.contains(&w[1])
            && !matches!(w[2], '，' | '。' | '！' | '？' | '?')
    });
    let text: String = chars.into_iter().collect();
    pystr::rstrip(&text).to_string()
}

/// `re.sub` for a pattern that always matches exactly `len` characters, replacing each match
/// by itself with a newline inserted after its first `split` characters. Like `re.sub`, it
/// scans left to right and resumes after each match (matches never overlap).
fn substitute(
    chars: &[char],
    len: usize,
    split: usize,
    matches: impl Fn(&[char]) -> bool,
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        if i + len <= chars.len() && matches(&chars[i..i + len]) {
            out.extend_from_slice(&chars[i..i + split]);
            out.push('\n');
            out.extend_from_slice(&chars[i + split..i + len]);
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `2 * ((p * r) / (p + r + 1e-8))`, as `rouge_chinese` writes it.
fn f_score(p: f64, r: f64) -> f64 {
    2.0 * ((p * r) / (p + r + 1e-8))
}

/// ROUGE-N F with n-gram sets (`exclusive=True`).
fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> f64 {
    let hyp_set: HashSet<&[String]> = hyp.windows(n).collect();
    let ref_set: HashSet<&[String]> = reference.windows(n).collect();
    let overlap = hyp_set.intersection(&ref_set).count();
    let ratio = |count: usize| {
        if count == 0 {
            0.0
        } else {
            overlap as f64 / count as f64
        }
    };
    f_score(ratio(hyp_set.len()), ratio(ref_set.len()))
}

/// ROUGE-L F: plain LCS over the whole word lists (`rouge_l_summary_level` in 1.0.3).
fn rouge_l(hyp: &[String], reference: &[String]) -> f64 {
    let lcs = lcs_len(hyp, reference) as f64;
    let r = lcs / reference.len() as f64;
    let p = lcs / hyp.len() as f64;
    f_score(p, r)
}

/// Map each word to a dense id shared through `ids`.
fn word_ids<'a>(words: &'a [String], ids: &mut HashMap<&'a str, u32>) -> Vec<u32> {
    words
        .iter()
        .map(|w| {
            let next = ids.len() as u32;
            *ids.entry(w.as_str()).or_insert(next)
        })
        .collect()
}

/// Length of the longest common subsequence, O(|a|·|b|) time and O(|b|) memory.
fn lcs_len(a: &[String], b: &[String]) -> usize {
    // Compare small integer ids instead of strings in the inner loop.
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let a = word_ids(a, &mut ids);
    let b = word_ids(b, &mut ids);
    let mut row = vec![0usize; b.len() + 1];
    for &x in &a {
        let mut diagonal = 0; // row[j - 1] of the previous row
        for (j, &y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str) -> Vec<String> {
        words(text)
    }

    #[test]
    fn cut_sent_follows_the_four_substitutions() {
        assert_eq!(cut_sent("你好。再见"), "你好。\n再见");
        // The character after a stop is consumed by the match: `？？a` splits once.
        assert_eq!(cut_sent("？？a"), "？\n？a");
        assert_eq!(cut_sent("好。”再见"), "好。”\n再见");
        assert_eq!(cut_sent("等等……后来"), "等等……\n后来");
        assert_eq!(cut_sent("a.......b"), "a......\n.b");
        assert_eq!(cut_sent("句子。 \n "), "句子。");
    }

    #[test]
    fn whitespace_only_piece_gives_an_empty_word() {
        // `" ".join(jieba.cut("A\n \nB"))` == "A \n   \n B"
        assert_eq!(w("A \n   \n B"), ["A", "", "B"]);
    }

    #[test]
    fn rouge_scores_of_small_cases() {
        // rouge_chinese 1.0.3: Rouge().get_scores("a b c", "a c d")[0]; rouge-2 has no common
        // bigram, LCS("a b c", "a c d") = 2.
        assert_eq!(
            rouge_f("a b c", "a c d"),
            [0.6666666616666668, 0.0, 0.6666666616666668]
        );
        // Rouge().get_scores("A \n   \n B", "A B")[0]: the hypothesis words are A, "", B.
        assert_eq!(
            rouge_f("A \n   \n B", "A B"),
            [0.7999999952000001, 0.0, 0.7999999952000001]
        );
    }

    #[test]
    fn lcs_is_plain_lcs() {
        let s = |t: &str| t.split(' ').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(lcs_len(&s("a b c d e"), &s("b d f e a")), 3);
        assert_eq!(lcs_len(&s("x"), &s("y")), 0);
    }
}
