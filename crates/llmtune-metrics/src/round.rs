//! Python's `round(x, ndigits)` and numpy's `mean` for `float64` vectors.

/// Python's `round(x, ndigits)` for a float: the exact binary value of `x` rounded to
/// `ndigits` decimal places (negative: to tens, hundreds, ...) with ties to even, converted
/// back to the nearest `f64`. NaN and infinities are returned unchanged; like CPython,
/// `ndigits > 323` returns `x` and `ndigits < -308` returns a zero with the sign of `x`.
/// Where Python raises `OverflowError` (the rounded value exceeds `f64::MAX`) this returns
/// an infinity.
pub fn py_round(x: f64, ndigits: i32) -> f64 {
    if !x.is_finite() || x == 0.0 || ndigits > 323 {
        return x;
    }
    if ndigits < -308 {
        return 0.0 * x;
    }
    let frac_digits = exact_fraction_digits(x);
    if i64::from(ndigits) >= frac_digits as i64 {
        return x; // nothing to round away
    }
    // `frac_digits` fractional digits print `|x|` exactly, with no rounding by the formatter.
    let exact = format!("{:.*}", frac_digits, x.abs());
    let (int_part, frac_part) = exact.split_once('.').unwrap_or((exact.as_str(), ""));
    let digits: Vec<u8> = int_part.bytes().chain(frac_part.bytes()).collect();
    let keep = int_part.len() as i64 + i64::from(ndigits);
    let (mut kept, dropped): (Vec<u8>, &[u8]) = if keep <= 0 {
        // Everything is rounded away; a leading zero digit stands in for the kept part when
        // the first dropped digit is the first digit of `x` (ties then go to 0).
        let dropped = if keep == 0 { &digits[..] } else { &[][..] };
        (vec![b'0'], dropped)
    } else {
        let keep = keep as usize;
        (digits[..keep].to_vec(), &digits[keep..])
    };
    let round_up = match dropped.first() {
        Some(&d) if d > b'5' => true,
        Some(&b'5') => {
            dropped[1..].iter().any(|&d| d != b'0')
                || kept.last().is_some_and(|&d| (d - b'0') % 2 == 1)
        }
        _ => false,
    };
    if round_up {
        increment_decimal(&mut kept);
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let kept = String::from_utf8(kept).unwrap_or_default();
    // Rust's float parser is correctly rounded, as is CPython's `strtod` step.
    format!("{sign}{kept}e{}", -i64::from(ndigits))
        .parse()
        .unwrap_or(x)
}

/// Number of decimal places of the exact value of a finite `x` (`m * 2^e` with odd `m` has
/// `max(0, -e)` of them).
fn exact_fraction_digits(x: f64) -> usize {
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64;
    let fraction = bits & ((1u64 << 52) - 1);
    let (mantissa, exp) = if exponent == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), exponent - 1075)
    };
    if mantissa == 0 {
        return 0;
    }
    let exp = exp + i64::from(mantissa.trailing_zeros());
    if exp >= 0 {
        0
    } else {
        (-exp) as usize
    }
}

/// Add one to a decimal digit string, growing it on a carry out of the first digit.
fn increment_decimal(digits: &mut Vec<u8>) {
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return;
        }
    }
    digits.insert(0, b'1');
}

/// `float(numpy.mean(values))` for a contiguous `float64` vector: numpy's pairwise
/// summation (blocks of 128, eight accumulators), added to the reduction's initial 0.0, then
/// divided by the count. An empty slice gives NaN, as numpy does.
pub(crate) fn numpy_mean(values: &[f64]) -> f64 {
    (0.0 + pairwise_sum(values)) / values.len() as f64
}

fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (acc, &v) in r.iter_mut().zip(&a[i..i + 8]) {
                *acc += v;
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_half_even_on_the_exact_value() {
        // Values checked against CPython 3.11 `round`.
        assert_eq!(py_round(0.5, 0), 0.0);
        assert_eq!(py_round(1.5, 0), 2.0);
        assert_eq!(py_round(2.5, 0), 2.0);
        assert_eq!(py_round(-2.5, 0), -2.0);
        assert_eq!(py_round(0.125, 2), 0.12); // exact tie, 2 is even
        assert_eq!(py_round(0.375, 2), 0.38); // exact tie, 8 is even
        assert_eq!(py_round(2.675, 2), 2.67); // 2.67499999... in binary
        assert_eq!(py_round(1.00005, 4), 1.0001); // 1.0000500000000001055... in binary
        assert_eq!(py_round(12.34565, 4), 12.3456); // 12.3456499999999991246...
        assert_eq!(py_round(99.99995, 4), 99.9999); // 99.9999499999999983401...
        assert_eq!(py_round(0.00015, 4), 0.0001); // 0.000149999999999999986859...
        assert_eq!(py_round(45.00005, 4), 45.0001); // 45.0000500000000016598...
    }

    #[test]
    fn rounding_keeps_sign_and_handles_carries_and_negative_digits() {
        assert!(py_round(-0.00001, 4).is_sign_negative());
        assert_eq!(py_round(-0.00001, 4), 0.0);
        assert_eq!(py_round(9.99996, 4), 10.0);
        assert_eq!(py_round(1234.5, -2), 1200.0);
        assert_eq!(py_round(1250.0, -2), 1200.0);
        assert_eq!(py_round(1350.0, -2), 1400.0);
        assert_eq!(py_round(49.0, -2), 0.0);
        assert_eq!(py_round(51.0, -2), 100.0);
        assert_eq!(py_round(50.0, -2), 0.0);
        assert_eq!(py_round(7.0, -5), 0.0);
        assert_eq!(py_round(100.0 * 0.999999995, 4), 100.0);
        assert_eq!(py_round(f64::MIN_POSITIVE, 4), 0.0);
        assert_eq!(py_round(1e300, 4), 1e300);
        assert!(py_round(f64::NAN, 4).is_nan());
    }

    #[test]
    fn numpy_mean_uses_pairwise_summation() {
        // numpy.mean([0.1] * 10) == 0.1 (a naive left-to-right sum gives 0.09999999999999999)
        assert_eq!(numpy_mean(&[0.1; 10]), 0.1);
        assert_eq!(numpy_mean(&[1.0, 2.0, 4.0]), 7.0 / 3.0);
        assert!(numpy_mean(&[]).is_nan());
    }
}
