//! The value head of the reward model and PPO's critic (SPEC §8): TRL's `ValueHead`,
//! `summary = Linear(hidden, 1)` on the final hidden state, with dropout 0.1 before it in
//! training mode. Kept in f32 (the master dtype) whatever the backbone computes in.
//!
//! Saved as `value_head.safetensors` with keys `summary.weight` `[1, hidden]` and
//! `summary.bias` `[1]` (the reference's `value_head.bin` is read too); on reading, TRL's
//! `v_head.summary.*` names are accepted as well.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::io::{first_existing, read_tensors, save_safetensors};
use crate::rng::{DropoutRng, SplitMix64};
use crate::{AdapterError, Result};

/// The file we write.
pub const VALUE_HEAD_NAME: &str = "value_head.safetensors";
/// The reference's file (read only).
pub const VALUE_HEAD_NAME_BIN: &str = "value_head.bin";
/// TRL's `summary_dropout_prob`.
pub const VALUE_HEAD_DROPOUT: f64 = 0.1;

const WEIGHT: &str = "summary.weight";
const BIAS: &str = "summary.bias";

/// `Linear(hidden, 1)` giving one value per position.
///
/// Cloning shares the tensors and the training switch.
#[derive(Debug, Clone)]
pub struct ValueHead {
    /// `[1, hidden]`; a variable when trainable.
    weight: Tensor,
    /// `[1]`; a variable when trainable.
    bias: Tensor,
    trainable: bool,
    dropout: f64,
    training: Arc<AtomicBool>,
    rng: Arc<DropoutRng>,
}

impl ValueHead {
    /// A fresh trainable head, initialised as torch's `nn.Linear(hidden, 1)` (weight and bias
    /// uniform in `±1/sqrt(hidden)`), drawn from `seed`.
    pub fn new(hidden: usize, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        if hidden == 0 {
            return Err(AdapterError::Invalid(
                "a value head needs a hidden size of at least 1".into(),
            ));
        }
        let mut rng = SplitMix64::new(seed);
        let bound = 1.0 / (hidden as f64).sqrt();
        let w = crate::rng::uniform_tensor(&mut rng, 1, hidden, bound, dtype, device)?;
        let b = crate::rng::uniform_tensor(&mut rng, 1, 1, bound, dtype, device)?.reshape(1)?;
        Self::from_tensors(w, b, true)
    }

    /// A head from a weight `[1, hidden]` and a bias `[1]` (converted to nothing: the dtype
    /// and device are the tensors'). `trainable` makes them variables.
    pub fn from_tensors(weight: Tensor, bias: Tensor, trainable: bool) -> Result<Self> {
        if !matches!(weight.dims(), [1, h] if *h > 0) {
            return Err(AdapterError::Invalid(format!(
                "value head weight must be [1, hidden], got {:?}",
                weight.dims()
            )));
        }
        if bias.dims() != [1] {
            return Err(AdapterError::Invalid(format!(
                "value head bias must be [1], got {:?}",
                bias.dims()
            )));
        }
        let mk = |t: Tensor| -> Result<Tensor> {
            Ok(if trainable {
                Var::from_tensor(&t.detach())?.into_inner()
            } else {
                t.detach()
            })
        };
        Ok(Self {
            weight: mk(weight)?,
            bias: mk(bias)?,
            trainable,
            dropout: VALUE_HEAD_DROPOUT,
            training: Arc::new(AtomicBool::new(false)),
            rng: Arc::new(DropoutRng::new(crate::lora::DEFAULT_DROPOUT_SEED)),
        })
    }

    /// Loads a head from a file (`.safetensors` or `.bin`) or from a folder holding
    /// `value_head.safetensors` or `value_head.bin`, converted to `dtype` (f32 normally) on
    /// `device`. Accepts `summary.*` and TRL's `v_head.summary.*` names.
    pub fn load(path: &Path, dtype: DType, device: &Device, trainable: bool) -> Result<Self> {
        let (_, w, b) = read_head(path)?;
        let w = w.to_dtype(dtype)?.to_device(device)?;
        let b = b.to_dtype(dtype)?.to_device(device)?;
        Self::from_tensors(w, b, trainable)
    }

    /// Overwrites the values in place from a file or folder as [`ValueHead::load`] reads
    /// (variables stay the same objects, so an optimizer keeps them).
    pub fn load_weights_into(&mut self, path: &Path) -> Result<()> {
        let (file, w, b) = read_head(path)?;
        if w.dims() != self.weight.dims() {
            return Err(AdapterError::tensor(
                &file,
                WEIGHT,
                format!("shape {:?}, expected {:?}", w.dims(), self.weight.dims()),
            ));
        }
        for (src, dst) in [(w, &mut self.weight), (b, &mut self.bias)] {
            let v = src.to_dtype(dst.dtype())?.to_device(dst.device())?;
            if dst.is_variable() {
                Var::from_tensor(dst)?.set(&v)?;
            } else {
                *dst = v;
            }
        }
        Ok(())
    }

    /// Writes `value_head.safetensors` (`summary.weight`, `summary.bias`) in `dir`
    /// (created if needed), atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::io::create_dir(dir)?;
        save_safetensors(
            &dir.join(VALUE_HEAD_NAME),
            &[
                (BIAS.to_string(), self.bias.detach()),
                (WEIGHT.to_string(), self.weight.detach()),
            ],
        )
    }

    /// The hidden size the head reads.
    pub fn hidden_size(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The weight `[1, hidden]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[1]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Training mode turns the dropout (0.1) on; evaluation mode (the default) turns it off.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::SeqCst);
    }

    /// Whether training mode is on.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }

    /// Reseeds the dropout RNG.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.rng.set_state(seed, 0);
    }

    /// `(seed, masks drawn so far)` of the dropout RNG, for checkpoints.
    pub fn dropout_state(&self) -> (u64, u64) {
        self.rng.state()
    }

    /// Restores a state returned by [`ValueHead::dropout_state`].
    pub fn set_dropout_state(&self, seed: u64, calls: u64) {
        self.rng.set_state(seed, calls);
    }

    /// Values `[b, t]` (in the head's dtype) of final hidden states `[b, t, hidden]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.dims().last().copied().unwrap_or(0);
        if h != self.hidden_size() {
            return Err(AdapterError::Invalid(format!(
                "value head reads {} hidden features, got hidden states {:?}",
                self.hidden_size(),
                hidden.dims()
            )));
        }
        let x = if hidden.dtype() == self.weight.dtype() {
            hidden.clone()
        } else {
            hidden.to_dtype(self.weight.dtype())?
        };
        let x = if self.is_training() {
            self.rng.apply(&x, self.dropout)?
        } else {
            x
        };
        let v = llmtune_ops::linear(&x, &self.weight, Some(&self.bias))?;
        Ok(v.squeeze(D::Minus1)?)
    }

    /// The variables for the optimizer, `[("summary.bias", b), ("summary.weight", w)]`
    /// (sorted), or nothing when the head is frozen.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        if !self.trainable {
            return vec![];
        }
        let mut out = Vec::new();
        for (k, t) in [(BIAS, &self.bias), (WEIGHT, &self.weight)] {
            if let Ok(v) = Var::from_tensor(t) {
                out.push((k.to_string(), v));
            }
        }
        out
    }
}

/// Reads the weight and bias of a head file or folder.
fn read_head(path: &Path) -> Result<(PathBuf, Tensor, Tensor)> {
    let file = if path.is_dir() {
        first_existing(path, &[VALUE_HEAD_NAME, VALUE_HEAD_NAME_BIN]).ok_or_else(|| {
            AdapterError::file(
                path,
                format!("no {VALUE_HEAD_NAME} or {VALUE_HEAD_NAME_BIN} in this folder"),
            )
        })?
    } else {
        path.to_path_buf()
    };
    let mut weight = None;
    let mut bias = None;
    for (k, t) in read_tensors(&file)? {
        let short = k.strip_prefix("v_head.").unwrap_or(&k);
        let slot = match short {
            WEIGHT => &mut weight,
            BIAS => &mut bias,
            _ => {
                return Err(AdapterError::tensor(
                    &file,
                    &k,
                    "not a value head tensor (expected summary.weight and summary.bias, \
                     optionally prefixed with v_head.)",
                ))
            }
        };
        if slot.is_some() {
            return Err(AdapterError::tensor(&file, &k, "given twice"));
        }
        *slot = Some((k, t));
    }
    let (wk, w) = weight.ok_or_else(|| AdapterError::tensor(&file, WEIGHT, "missing"))?;
    let (bk, b) = bias.ok_or_else(|| AdapterError::tensor(&file, BIAS, "missing"))?;
    if w.rank() != 2 || w.dims()[0] != 1 || w.dims()[1] == 0 {
        return Err(AdapterError::tensor(
            &file,
            &wk,
            format!("shape {:?}, expected [1, hidden]", w.dims()),
        ));
    }
    if b.dims() != [1] {
        return Err(AdapterError::tensor(
            &file,
            &bk,
            format!("shape {:?}, expected [1]", b.dims()),
        ));
    }
    Ok((file, w, b))
}

/// Per row, the index of the last position whose `attention_mask` (`[b, t]`) is 1: the
/// sequence's last token with right or left padding. A row with no real token is an error.
pub fn last_token_index(attention_mask: &Tensor) -> Result<Vec<usize>> {
    let rows: Vec<Vec<i64>> = attention_mask.to_dtype(DType::I64)?.to_vec2()?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            r.iter().rposition(|&m| m != 0).ok_or_else(|| {
                AdapterError::Invalid(format!("row {i} of the batch is all padding"))
            })
        })
        .collect()
}

/// `values[i, index[i]]` for each row of `values` `[b, t]`: the scores `[b]`.
/// Differentiable in `values`.
pub fn gather_last(values: &Tensor, index: &[usize]) -> Result<Tensor> {
    let (b, t) = values.dims2()?;
    if index.len() != b || index.iter().any(|&i| i >= t) {
        return Err(AdapterError::Invalid(format!(
            "gather_last: {} indices {index:?} for values of shape [{b}, {t}]",
            index.len()
        )));
    }
    let idx: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, (b, 1), values.device())?;
    Ok(values.gather(&idx, 1)?.squeeze(1)?)
}

/// The reward model's loss: `mean(-log sigmoid(chosen - rejected))` over the pairs, computed
/// stably as `softplus(rejected - chosen)` with the shift `max(x, 0)` held constant (exact
/// gradient `-sigmoid(rejected - chosen)` per pair, no overflow for large margins).
pub fn pairwise_ranking_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    if chosen.dims() != rejected.dims() {
        return Err(AdapterError::Invalid(format!(
            "pairwise_ranking_loss: chosen {:?} and rejected {:?} differ in shape",
            chosen.dims(),
            rejected.dims()
        )));
    }
    let x = (rejected - chosen)?;
    let m = x.relu()?.detach();
    // softplus(x) = m + log(exp(-m) + exp(x - m)).
    let sp = (&m + (m.neg()?.exp()? + x.broadcast_sub(&m)?.exp()?)?.log()?)?;
    Ok(sp.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_loss_is_stable_and_exact() {
        let dev = Device::Cpu;
        let c = Var::new(&[2.0f64, -1.0, 500.0, -500.0], &dev).unwrap();
        let r = Tensor::new(&[1.0f64, 1.0, 0.0, 0.0], &dev).unwrap();
        let loss = pairwise_ranking_loss(c.as_tensor(), &r).unwrap();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        // softplus(r - c): the large margins give 0 and 500 without overflow.
        let expected = (sp(-1.0) + sp(2.0) + 0.0 + 500.0) / 4.0;
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        let g: Vec<f64> = loss.backward().unwrap().get(&c).unwrap().to_vec1().unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let eg = [-sig(-1.0) / 4.0, -sig(2.0) / 4.0, 0.0, -0.25];
        for (a, b) in g.iter().zip(eg) {
            assert!((a - b).abs() < 1e-12, "{g:?} vs {eg:?}");
        }
    }

    #[test]
    fn last_index_and_gather() {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1i64, 1, 0], [0, 1, 1], [1, 0, 0]], &dev).unwrap();
        assert_eq!(last_token_index(&mask).unwrap(), vec![1, 2, 0]);
        let v = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.], [7., 8., 9.]], &dev).unwrap();
        let s: Vec<f32> = gather_last(&v, &[1, 2, 0]).unwrap().to_vec1().unwrap();
        assert_eq!(s, vec![2., 6., 7.]);
        let empty = Tensor::new(&[[0i64, 0]], &dev).unwrap();
        assert_eq!(
            last_token_index(&empty).unwrap_err().to_string(),
            "row 0 of the batch is all padding"
        );
    }
}
