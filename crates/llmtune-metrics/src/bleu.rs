//! BLEU-4 as nltk 3.10.4
//! `sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)`:
//! character level, weights 0.25 each, one reference.

use std::collections::HashMap;

/// Character-level sentence BLEU-4 with NIST geometric smoothing (`method3`).
pub(crate) fn sentence_bleu_chars(prediction: &str, label: &str) -> f64 {
    let hyp: Vec<char> = prediction.chars().collect();
    let reference: Vec<char> = label.chars().collect();

    // Modified precision p_n = numerator / denominator (kept as integers like nltk's Fraction).
    let mut precisions = [(0u64, 0u64); 4];
    for (i, slot) in precisions.iter_mut().enumerate() {
        *slot = modified_precision(&hyp, &reference, i + 1);
    }
    if precisions[0].0 == 0 {
        return 0.0;
    }

    // method3: k = 1; each zero numerator becomes 1 / (2^k * denominator), k += 1.
    let mut k = 1u32;
    let mut terms = [0.0f64; 4];
    for (term, &(num, den)) in terms.iter_mut().zip(&precisions) {
        let p = if num == 0 {
            let value = 1.0 / (2u64.pow(k) * den) as f64;
            k += 1;
            value
        } else {
            // float(Fraction(num, den)): a correctly rounded integer division.
            num as f64 / den as f64
        };
        *term = 0.25 * p.ln();
    }

    let (c, r) = (hyp.len(), reference.len());
    let bp = if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    bp * fsum(&terms).exp()
}

/// nltk `modified_precision` for one reference: (sum of clipped counts,
/// max(1, number of hypothesis n-grams)).
fn modified_precision(hyp: &[char], reference: &[char], n: usize) -> (u64, u64) {
    let counts = ngram_counts(hyp, n);
    let ref_counts = ngram_counts(reference, n);
    let numerator: u64 = counts
        .iter()
        .map(|(gram, &count)| count.min(ref_counts.get(gram).copied().unwrap_or(0)))
        .sum();
    let total: u64 = counts.values().sum();
    (numerator, total.max(1))
}

fn ngram_counts(seq: &[char], n: usize) -> HashMap<&[char], u64> {
    let mut counts = HashMap::new();
    for gram in seq.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// Python's `math.fsum`: the correctly rounded sum of finite values (Shewchuk's algorithm
/// with CPython's final half-even correction).
pub(crate) fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &value in values {
        let mut x = value;
        let mut kept = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        if x != 0.0 {
            partials.push(x);
        }
    }
    let Some(mut hi) = partials.pop() else {
        return 0.0;
    };
    let mut lo = 0.0;
    while let Some(y) = partials.pop() {
        let x = hi;
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    if let Some(&next) = partials.last() {
        if (lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsum_is_exact() {
        assert_eq!(fsum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_eq!(fsum(&[]), 0.0);
        // CPython: math.fsum([1.0, 1e-16, 1e-16]) == 1.0000000000000002
        assert_eq!(fsum(&[1.0, 1e-16, 1e-16]), 1.0000000000000002);
    }

    #[test]
    fn bleu_edge_cases() {
        assert_eq!(sentence_bleu_chars("", "abc"), 0.0);
        assert_eq!(sentence_bleu_chars("xyz", "abc"), 0.0);
        assert_eq!(sentence_bleu_chars("abcde", "abcde"), 1.0);
    }
}
