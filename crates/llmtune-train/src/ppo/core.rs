//! The math of TRL 0.4.x's classic `PPOTrainer` on response-aligned rows.
//!
//! Every quantity is a `[b, w]` block: row `i` holds one response, token `t` of it at column
//! `t`, valid while `t < lens[i]` (the response mask; columns past a row's length are padding
//! and hold 0). This is TRL's `[B, N-1]` layout restricted to the response slice, which gives
//! the same numbers: TRL multiplies `values` and `rewards` by the mask before GAE, so padding
//! never leaks into a valid token, and every mean/variance is a masked one over the whole
//! mini-batch.
//!
//! The detached parts (KL-penalised rewards, GAE, whitening, statistics) are computed on the
//! host in f64; the loss is a candle graph through the current log-probabilities and value
//! predictions, so its gradient reaches the LoRA matrices and the value head.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// The PPO hyperparameters (TRL 0.4 defaults; the reference sets none of them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoHyper {
    /// Discount (1.0).
    pub gamma: f64,
    /// GAE lambda (0.95).
    pub lam: f64,
    /// Policy ratio clip (0.2).
    pub cliprange: f64,
    /// Value clip around the rollout values (0.2).
    pub cliprange_value: f64,
    /// Weight of the value loss (0.1).
    pub vf_coef: f64,
}

impl Default for PpoHyper {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        }
    }
}

/// TRL's `AdaptiveKLController` (Ziegler et al.): the KL coefficient follows the measured KL
/// towards `target`, by at most ±20% proportional error per update, scaled by
/// `n_steps / horizon`. With `adaptive = false` it is TRL's `FixedKLController`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    /// The current coefficient β.
    pub value: f64,
    /// Target KL (6.0).
    pub target: f64,
    /// Horizon (10000).
    pub horizon: f64,
    /// Adaptive (true) or fixed.
    pub adaptive: bool,
}

impl Default for KlController {
    fn default() -> Self {
        Self {
            value: 0.2,
            target: 6.0,
            horizon: 10000.0,
            adaptive: true,
        }
    }
}

impl KlController {
    /// `value *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon`.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if !self.adaptive {
            return;
        }
        let err = (current / self.target - 1.0).clamp(-0.2, 0.2);
        if err.is_finite() {
            self.value *= 1.0 + err * n_steps as f64 / self.horizon;
        }
    }
}

/// A `[b, w]` block of response-aligned values with per-row lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// Row-major `[b * w]`; 0 past each row's length.
    pub data: Vec<f64>,
    /// Columns (the longest response of the block).
    pub width: usize,
    /// Valid tokens of each row.
    pub lens: Vec<usize>,
}

impl Rows {
    /// From per-row vectors (each as long as its response); pads with 0.
    pub fn from_rows(rows: &[Vec<f64>]) -> Self {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut data = vec![0.0; rows.len() * width];
        for (i, r) in rows.iter().enumerate() {
            data[i * width..i * width + r.len()].copy_from_slice(r);
        }
        Self {
            data,
            width,
            lens: rows.iter().map(Vec::len).collect(),
        }
    }

    /// From a `[b, w]` tensor and the row lengths (padding zeroed).
    pub fn from_tensor(t: &Tensor, lens: &[usize]) -> Result<Self> {
        let (b, w) = t.dims2()?;
        if b != lens.len() || lens.iter().any(|&l| l > w) {
            return Err(Error::InvalidArgument(format!(
                "PPO rows: tensor [{b}, {w}] does not fit lengths {lens:?}"
            )));
        }
        let mut data: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        for (i, &l) in lens.iter().enumerate() {
            data[i * w + l..(i + 1) * w].fill(0.0);
        }
        Ok(Self {
            data,
            width: w,
            lens: lens.to_vec(),
        })
    }

    /// Same lengths, new values.
    pub fn with_data(&self, data: Vec<f64>) -> Self {
        Self {
            data,
            width: self.width,
            lens: self.lens.clone(),
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Row `i`'s valid values.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.width..i * self.width + self.lens[i]]
    }

    /// The 0/1 mask.
    pub fn mask(&self) -> Vec<f64> {
        let mut m = vec![0.0; self.data.len()];
        for (i, &l) in self.lens.iter().enumerate() {
            m[i * self.width..i * self.width + l].fill(1.0);
        }
        m
    }

    /// Number of valid tokens.
    pub fn count(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Every valid value, row by row.
    pub fn valid(&self) -> Vec<f64> {
        (0..self.rows())
            .flat_map(|i| self.row(i).to_vec())
            .collect()
    }

    /// Selects rows (a mini-batch), narrowing to their longest length.
    pub fn select(&self, rows: &[usize]) -> Self {
        Self::from_rows(
            &rows
                .iter()
                .map(|&i| self.row(i).to_vec())
                .collect::<Vec<_>>(),
        )
    }

    /// As a `[b, w]` tensor of `dtype` on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        Ok(
            Tensor::from_vec(self.data.clone(), (self.rows(), self.width), device)?
                .to_dtype(dtype)?,
        )
    }

    fn same_shape(&self, other: &Rows, what: &str) -> Result<()> {
        if self.width != other.width || self.lens != other.lens {
            return Err(Error::InvalidArgument(format!(
                "PPO rows: {what} has lengths {:?} (width {}), expected {:?} (width {})",
                other.lens, other.width, self.lens, self.width
            )));
        }
        Ok(())
    }
}

/// TRL `masked_mean` over every valid token.
pub fn masked_mean(x: &Rows) -> f64 {
    let n = x.count();
    if n == 0 {
        return f64::NAN;
    }
    x.valid().iter().sum::<f64>() / n as f64
}

/// TRL `masked_var`; `unbiased` applies Bessel's correction `n / (n - 1)`.
pub fn masked_var(x: &Rows, unbiased: bool) -> f64 {
    let n = x.count() as f64;
    let mean = masked_mean(x);
    let var = x.valid().iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    if unbiased {
        var * n / (n - 1.0)
    } else {
        var
    }
}

/// TRL `masked_whiten(x, mask, shift_mean=True)`: `(x - mean) / sqrt(var + 1e-8)` with the
/// unbiased masked variance (padding stays 0).
pub fn masked_whiten(x: &Rows) -> Rows {
    let mean = masked_mean(x);
    let var = masked_var(x, true);
    let inv = 1.0 / (var + 1e-8).sqrt();
    let mask = x.mask();
    x.with_data(
        x.data
            .iter()
            .zip(&mask)
            .map(|(v, m)| if *m > 0.0 { (v - mean) * inv } else { 0.0 })
            .collect(),
    )
}

/// The KL-penalised per-token rewards of TRL's `compute_rewards`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewards {
    /// `logprobs - ref_logprobs`.
    pub kl: Rows,
    /// `-kl_coef * kl`.
    pub non_score_reward: Rows,
    /// `non_score_reward`, plus the score on each row's last token.
    pub rewards: Rows,
}

/// `kl = logprobs - ref_logprobs`, `rewards = -kl_coef * kl` plus `scores[i]` on row `i`'s
/// last valid token.
pub fn compute_rewards(
    scores: &[f64],
    logprobs: &Rows,
    ref_logprobs: &Rows,
    kl_coef: f64,
) -> Result<Rewards> {
    logprobs.same_shape(ref_logprobs, "ref_logprobs")?;
    if scores.len() != logprobs.rows() {
        return Err(Error::InvalidArgument(format!(
            "PPO: {} scores for {} responses",
            scores.len(),
            logprobs.rows()
        )));
    }
    if let Some(i) = logprobs.lens.iter().position(|&l| l == 0) {
        return Err(Error::InvalidArgument(format!(
            "PPO: response {i} is empty"
        )));
    }
    let mask = logprobs.mask();
    let kl: Vec<f64> = logprobs
        .data
        .iter()
        .zip(&ref_logprobs.data)
        .zip(&mask)
        .map(|((a, b), m)| (a - b) * m)
        .collect();
    let nsr: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
    let mut rewards = nsr.clone();
    for (i, &s) in scores.iter().enumerate() {
        rewards[i * logprobs.width + logprobs.lens[i] - 1] += s;
    }
    Ok(Rewards {
        kl: logprobs.with_data(kl),
        non_score_reward: logprobs.with_data(nsr),
        rewards: logprobs.with_data(rewards),
    })
}

/// GAE as TRL: `delta_t = r_t + gamma v_{t+1} - v_t` (`v` past the end = 0),
/// `A_t = delta_t + gamma lam A_{t+1}`, computed backwards per row;
/// `returns = A + values`. Returns `(advantages_raw, returns)`.
pub fn compute_advantages(
    values: &Rows,
    rewards: &Rows,
    gamma: f64,
    lam: f64,
) -> Result<(Rows, Rows)> {
    values.same_shape(rewards, "rewards")?;
    let w = values.width;
    let mut adv = vec![0.0; values.data.len()];
    for (i, &len) in values.lens.iter().enumerate() {
        let v = &values.data[i * w..i * w + len];
        let r = &rewards.data[i * w..i * w + len];
        let mut last = 0.0;
        for t in (0..len).rev() {
            let next = if t + 1 < len { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lam * last;
            adv[i * w + t] = last;
        }
    }
    let returns: Vec<f64> = adv.iter().zip(&values.data).map(|(a, v)| a + v).collect();
    let returns = values.with_data(returns);
    let mut ret = returns.data;
    for (x, m) in ret.iter_mut().zip(values.mask()) {
        *x *= m;
    }
    Ok((values.with_data(adv), values.with_data(ret)))
}

/// What one mini-batch's PPO loss needs from the rollout (all detached).
#[derive(Debug, Clone, PartialEq)]
pub struct MiniBatch {
    /// Log-probabilities of the response tokens when they were sampled (`logprobs_old`).
    pub old_logprobs: Rows,
    /// The critic's values at the rollout.
    pub values: Rows,
    /// The KL-penalised rewards.
    pub rewards: Rows,
}

/// The scalars TRL logs for one mini-batch (its `ppo/*` stats).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PpoStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub adv_mean: f64,
    pub adv_var: f64,
    pub vf_clipfrac: f64,
    pub pg_clipfrac: f64,
    pub approxkl: f64,
    pub policykl: f64,
    pub returns_mean: f64,
    pub returns_var: f64,
    pub values_mean: f64,
    pub values_var: f64,
    /// Mean entropy of the policy over the response tokens (NaN when no logits were given).
    pub entropy_mean: f64,
}

/// The PPO loss of one mini-batch with every intermediate TRL computes.
#[derive(Debug, Clone)]
pub struct PpoLoss {
    /// `pg_loss + vf_coef * vf_loss`, a scalar differentiable in the current log-probabilities
    /// and value predictions.
    pub loss: Tensor,
    pub advantages_raw: Rows,
    pub returns: Rows,
    /// Whitened advantages (detached).
    pub advantages: Rows,
    pub vpredclipped: Rows,
    pub vf_losses1: Rows,
    pub vf_losses2: Rows,
    pub ratio: Rows,
    pub pg_losses: Rows,
    pub pg_losses2: Rows,
    /// Per-token entropy, when logits were given.
    pub entropy: Option<Rows>,
    pub stats: PpoStats,
}

/// The clipped PPO loss of TRL 0.4's `PPOTrainer.loss` for a mini-batch: GAE and advantage
/// whitening over the mini-batch, clipped value loss and clipped policy loss.
///
/// `logprobs` and `vpreds` are the current policy's `[b, w]` log-probabilities and values
/// (tracked); `logits` (`[b, w, vocab]`, optional) gives the entropy statistic.
pub fn ppo_loss(
    mb: &MiniBatch,
    logprobs: &Tensor,
    vpreds: &Tensor,
    logits: Option<&Tensor>,
    hp: &PpoHyper,
) -> Result<PpoLoss> {
    let shape = &mb.old_logprobs;
    shape.same_shape(&mb.values, "values")?;
    shape.same_shape(&mb.rewards, "rewards")?;
    let (b, w) = (shape.rows(), shape.width);
    for (name, t) in [("logprobs", logprobs), ("vpreds", vpreds)] {
        if t.dims() != [b, w] {
            return Err(Error::InvalidArgument(format!(
                "PPO loss: {name} has shape {:?}, expected [{b}, {w}]",
                t.dims()
            )));
        }
    }
    let n = shape.count();
    if n == 0 {
        return Err(Error::InvalidArgument(
            "PPO loss: a mini-batch without response tokens".into(),
        ));
    }
    let (adv_raw, returns) = compute_advantages(&mb.values, &mb.rewards, hp.gamma, hp.lam)?;
    let adv = masked_whiten(&adv_raw);

    let dtype = logprobs.dtype();
    let dev = logprobs.device();
    let t = |r: &Rows| r.to_tensor(dtype, dev);
    let mask_rows = shape.with_data(shape.mask());
    let mask = t(&mask_rows)?;
    let inv_n = 1.0 / n as f64;

    // Value loss.
    let values = t(&mb.values)?;
    let returns_t = t(&returns)?;
    let lo = (&values - hp.cliprange_value)?;
    let hi = (&values + hp.cliprange_value)?;
    let vclip = vpreds.maximum(&lo)?.minimum(&hi)?;
    let vf1 = (vpreds - &returns_t)?.sqr()?;
    let vf2 = (&vclip - &returns_t)?.sqr()?;
    let vf_loss = ((vf1.maximum(&vf2)? * &mask)?.sum_all()? * (0.5 * inv_n))?;

    // Policy loss.
    let adv_t = t(&adv)?;
    let old = t(&mb.old_logprobs)?;
    let ratio = ((logprobs - &old)? * &mask)?.exp()?;
    let pg1 = (adv_t.neg()? * &ratio)?;
    let pg2 = (adv_t.neg()? * ratio.clamp(1.0 - hp.cliprange, 1.0 + hp.cliprange)?)?;
    let pg_loss = ((pg1.maximum(&pg2)? * &mask)?.sum_all()? * inv_n)?;
    let loss = (&pg_loss + (&vf_loss * hp.vf_coef)?)?;

    let rows = |x: &Tensor| Rows::from_tensor(&x.detach(), &shape.lens);
    let ratio_r = rows(&ratio)?;
    let vclip_r = rows(&vclip)?;
    let vf1_r = rows(&vf1)?;
    let vf2_r = rows(&vf2)?;
    let pg1_r = rows(&pg1)?;
    let pg2_r = rows(&pg2)?;
    let new_lp = rows(logprobs)?;
    let frac_gt = |a: &Rows, b: &Rows| {
        a.valid()
            .iter()
            .zip(b.valid())
            .filter(|(x, y)| **x > *y)
            .count() as f64
            * inv_n
    };
    let diff: Vec<f64> = new_lp
        .valid()
        .iter()
        .zip(mb.old_logprobs.valid())
        .map(|(n, o)| n - o)
        .collect();
    let entropy = match logits {
        Some(l) => Some(Rows::from_tensor(&entropy_from_logits(l)?, &shape.lens)?),
        None => None,
    };
    let stats = PpoStats {
        loss: loss.to_dtype(DType::F64)?.to_scalar()?,
        pg_loss: pg_loss.to_dtype(DType::F64)?.to_scalar()?,
        vf_loss: vf_loss.to_dtype(DType::F64)?.to_scalar()?,
        adv_mean: masked_mean(&adv_raw),
        adv_var: masked_var(&adv_raw, true),
        vf_clipfrac: frac_gt(&vf2_r, &vf1_r),
        pg_clipfrac: frac_gt(&pg2_r, &pg1_r),
        approxkl: 0.5 * diff.iter().map(|d| d * d).sum::<f64>() * inv_n,
        policykl: -diff.iter().sum::<f64>() * inv_n,
        returns_mean: masked_mean(&returns),
        returns_var: masked_var(&returns, true),
        values_mean: masked_mean(&mb.values),
        values_var: masked_var(&mb.values, true),
        entropy_mean: entropy.as_ref().map(masked_mean).unwrap_or(f64::NAN),
    };
    Ok(PpoLoss {
        loss,
        advantages_raw: adv_raw,
        returns,
        advantages: adv,
        vpredclipped: vclip_r,
        vf_losses1: vf1_r,
        vf_losses2: vf2_r,
        ratio: ratio_r,
        pg_losses: pg1_r,
        pg_losses2: pg2_r,
        entropy,
        stats,
    })
}

/// TRL's `entropy_from_logits`: `logsumexp(l) - sum(softmax(l) * l)` over the last dim, in
/// f32 (f64 for f64 logits), detached.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let l = logits.detach();
    let l = if l.dtype() == DType::F64 {
        l
    } else {
        l.to_dtype(DType::F32)?
    };
    let m = l.max_keepdim(D::Minus1)?;
    let e = l.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let lse = (z.log()? + &m)?.squeeze(D::Minus1)?;
    let p = e.broadcast_div(&z)?;
    let mean_l = (p * &l)?.sum(D::Minus1)?;
    Ok((lse - mean_l)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn kl_controller_as_trl() {
        let mut k = KlController::default();
        k.update(12.0, 10000); // error clipped to +0.2
        assert!((k.value - 0.24).abs() < 1e-12);
        let mut k = KlController::default();
        k.update(3.0, 100); // -0.5 clipped to -0.2
        assert!((k.value - 0.2 * (1.0 - 0.2 * 0.01)).abs() < 1e-15);
        let mut k = KlController {
            adaptive: false,
            ..Default::default()
        };
        k.update(100.0, 1000);
        assert_eq!(k.value, 0.2);
    }

    #[test]
    fn gae_by_hand_and_masking() {
        // Row 0: 2 tokens, row 1: 1 token (padded).
        let values = Rows::from_rows(&[vec![1.0, 2.0], vec![0.5]]);
        let rewards = Rows::from_rows(&[vec![0.0, 1.0], vec![3.0]]);
        let (adv, ret) = compute_advantages(&values, &rewards, 1.0, 0.5).unwrap();
        // t=1: delta = 1 - 2 = -1; t=0: delta = 0 + 2 - 1 = 1; A0 = 1 + 0.5 * -1 = 0.5.
        assert_eq!(adv.row(0), &[0.5, -1.0]);
        assert_eq!(adv.row(1), &[2.5]);
        assert_eq!(adv.data[3], 0.0, "padding stays 0");
        assert_eq!(ret.row(0), &[1.5, 1.0]);
        let w = masked_whiten(&adv);
        assert!(masked_mean(&w).abs() < 1e-12);
        assert!((masked_var(&w, true) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rewards_put_the_score_on_the_last_token() {
        let lp = Rows::from_rows(&[vec![-1.0, -2.0, -3.0], vec![-1.0]]);
        let rf = Rows::from_rows(&[vec![-1.5, -2.0, -2.0], vec![-0.5]]);
        let r = compute_rewards(&[1.0, -1.0], &lp, &rf, 0.5).unwrap();
        assert_eq!(r.kl.row(0), &[0.5, 0.0, -1.0]);
        assert_eq!(r.rewards.row(0), &[-0.25, 0.0, 1.5]);
        assert_eq!(r.rewards.row(1), &[0.25 - 1.0]);
        assert!(compute_rewards(&[1.0], &lp, &rf, 0.5).is_err());
    }

    #[test]
    fn loss_gradient_at_ratio_one_is_minus_advantage() {
        let dev = Device::Cpu;
        let old = Rows::from_rows(&[vec![-1.0, -2.0, -0.5], vec![-1.5, -0.1]]);
        let values = Rows::from_rows(&[vec![0.1, 0.2, -0.3], vec![0.4, 0.0]]);
        let rw = compute_rewards(
            &[0.7, -0.2],
            &old,
            &Rows::from_rows(&[vec![-1.1, -1.8, -0.6], vec![-1.5, -0.3]]),
            0.2,
        )
        .unwrap();
        let mb = MiniBatch {
            old_logprobs: old.clone(),
            values: values.clone(),
            rewards: rw.rewards,
        };
        let lp = Var::from_tensor(&old.to_tensor(DType::F64, &dev).unwrap()).unwrap();
        let vp = Var::from_tensor(&values.to_tensor(DType::F64, &dev).unwrap()).unwrap();
        let out = ppo_loss(
            &mb,
            lp.as_tensor(),
            vp.as_tensor(),
            None,
            &PpoHyper::default(),
        )
        .unwrap();
        assert_eq!(out.stats.pg_clipfrac, 0.0);
        assert_eq!(out.stats.vf_clipfrac, 0.0);
        assert!(
            out.stats.pg_loss.abs() < 1e-12,
            "whitened advantages sum to 0"
        );
        let g = out.loss.backward().unwrap();
        let glp: Vec<f64> = g
            .get(&lp)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = 5.0;
        let adv = &out.advantages.data;
        let mask = old.mask();
        for i in 0..glp.len() {
            assert!(
                (glp[i] + adv[i] * mask[i] / n).abs() < 1e-12,
                "{i}: {} vs {}",
                glp[i],
                -adv[i] / n
            );
        }
        // d vf_loss / d vpred = (vpred - return) / n (0.5 * 2), times vf_coef.
        let gv: Vec<f64> = g
            .get(&vp)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..gv.len() {
            let want = 0.1 * (values.data[i] - out.returns.data[i]) * mask[i] / n;
            assert!((gv[i] - want).abs() < 1e-12, "{i}: {} vs {want}", gv[i]);
        }
    }

    #[test]
    fn entropy_of_uniform_and_peaked() {
        let l = Tensor::new(&[[0f32, 0., 0., 0.], [100., 0., 0., 0.]], &Device::Cpu).unwrap();
        let e: Vec<f32> = entropy_from_logits(&l).unwrap().to_vec1().unwrap();
        assert!((e[0] - 4f32.ln()).abs() < 1e-6);
        assert!(e[1].abs() < 1e-6);
    }
}
