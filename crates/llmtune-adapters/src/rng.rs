//! Seeded random numbers for initialisation and dropout.
//!
//! SplitMix64: tiny, fast, and fully specified here, so a seed gives the same numbers on every
//! platform and with every version of our dependencies. Dropout draws a fresh stream per call
//! from `(seed, call counter)`, so its whole state is two integers that a checkpoint can store.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Result, Tensor};

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-bound, bound)`.
    pub(crate) fn uniform(&mut self, bound: f64) -> f64 {
        (2.0 * self.next_f64() - 1.0) * bound
    }

    /// A seed for an independent stream derived from `(seed, index)`.
    pub(crate) fn derive(seed: u64, index: u64) -> u64 {
        SplitMix64::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
    }
}

/// `[rows, cols]` uniform in `[-bound, bound)` with the given dtype (as torch's
/// `kaiming_uniform_(a=sqrt(5))` on a `[rows, cols]` weight when `bound = 1/sqrt(cols)`).
pub(crate) fn uniform_tensor(
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
    bound: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let v: Vec<f64> = (0..rows * cols).map(|_| rng.uniform(bound)).collect();
    Tensor::from_vec(v, (rows, cols), device)?.to_dtype(dtype)
}

/// Dropout masks from a seed and a call counter.
#[derive(Debug)]
pub(crate) struct DropoutRng {
    seed: AtomicU64,
    calls: AtomicU64,
}

impl DropoutRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed: AtomicU64::new(seed),
            calls: AtomicU64::new(0),
        }
    }

    /// `(seed, number of masks drawn so far)`.
    pub(crate) fn state(&self) -> (u64, u64) {
        (
            self.seed.load(Ordering::SeqCst),
            self.calls.load(Ordering::SeqCst),
        )
    }

    pub(crate) fn set_state(&self, seed: u64, calls: u64) {
        self.seed.store(seed, Ordering::SeqCst);
        self.calls.store(calls, Ordering::SeqCst);
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)`. Differentiable in `x`.
    pub(crate) fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let k = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut rng = SplitMix64::new(SplitMix64::derive(self.seed.load(Ordering::SeqCst), k));
        let n = x.elem_count();
        let scale = 1.0 / (1.0 - p);
        let mask = if x.dtype() == DType::F64 {
            let v: Vec<f64> = (0..n)
                .map(|_| if rng.next_f64() < p { 0.0 } else { scale })
                .collect();
            Tensor::from_vec(v, x.shape(), &candle_core::Device::Cpu)?
        } else {
            let s = scale as f32;
            let v: Vec<f32> = (0..n)
                .map(|_| if rng.next_f64() < p { 0.0 } else { s })
                .collect();
            Tensor::from_vec(v, x.shape(), &candle_core::Device::Cpu)?.to_dtype(x.dtype())?
        };
        x.mul(&mask.to_device(x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (the published test vector).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = Tensor::ones((4, 256), DType::F32, &candle_core::Device::Cpu).unwrap();
        let a = DropoutRng::new(7);
        let b = DropoutRng::new(7);
        let ya: Vec<f32> = a
            .apply(&x, 0.25)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let yb: Vec<f32> = b
            .apply(&x, 0.25)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ya, yb);
        // Every element is either dropped or scaled by 1/(1-p).
        assert!(ya.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = ya.iter().filter(|&&v| v == 0.0).count();
        // 1024 draws at p = 0.25: expect 256, the bounds are > 6 standard deviations.
        assert!((170..=340).contains(&dropped), "dropped {dropped}");
        // The next call draws a different mask; restoring the state repeats it.
        let (seed, calls) = a.state();
        assert_eq!((seed, calls), (7, 1));
        let y2: Vec<f32> = a
            .apply(&x, 0.25)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(ya, y2);
        b.set_state(7, 1);
        let y2b: Vec<f32> = b
            .apply(&x, 0.25)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y2, y2b);
    }
}
