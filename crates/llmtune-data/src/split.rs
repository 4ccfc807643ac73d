//! The `dev_ratio` hold-out split.
//!
//! As Hugging Face's `train_test_split(test_size=dev_ratio, seed=seed)` does: the items are
//! shuffled with a seeded permutation, the first `ceil(dev_ratio * n)` become the dev set
//! and the rest the training set (both in permutation order).
//!
//! The permutation is a Fisher–Yates shuffle driven by our own [`SplitMix64`] generator
//! (Steele, Lea & Flood 2014) with unbiased bounded draws (Lemire's multiply-and-reject).
//! It is written here, not taken from `rand`, so a seed gives the same split on every
//! platform and every version of llmtune. It is not numpy's generator, so the split differs
//! from the reference's for the same seed.

use crate::error::{DataError, Result};

/// The SplitMix64 pseudo-random generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Shuffles a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The permutation of `0..n` for `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut p);
    p
}

/// Splits `items` into (train, dev) with `ceil(dev_ratio * n)` dev items. `dev_ratio = 0`
/// returns everything as train, unshuffled.
pub fn split_dev<T>(items: Vec<T>, dev_ratio: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if dev_ratio == 0.0 {
        return Ok((items, Vec::new()));
    }
    if !(dev_ratio > 0.0 && dev_ratio < 1.0) {
        return Err(DataError::BadArg {
            arg: "dev_ratio",
            msg: format!("{dev_ratio} is not in [0, 1)"),
        });
    }
    let n = items.len();
    let n_dev = (dev_ratio * n as f64).ceil() as usize;
    if n_dev == 0 || n_dev >= n {
        return Err(DataError::BadArg {
            arg: "dev_ratio",
            msg: format!(
                "{dev_ratio} of {n} samples leaves {} for training and {n_dev} for evaluation; both need at least one",
                n.saturating_sub(n_dev)
            ),
        });
    }
    let perm = permutation(n, seed);
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let mut dev = Vec::with_capacity(n_dev);
    let mut train = Vec::with_capacity(n - n_dev);
    for (k, &i) in perm.iter().enumerate() {
        if let Some(x) = slots[i].take() {
            if k < n_dev {
                dev.push(x);
            } else {
                train.push(x);
            }
        }
    }
    Ok((train, dev))
}
