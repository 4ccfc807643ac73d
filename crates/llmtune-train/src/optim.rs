//! AdamW, gradient clipping and gradient accumulation over named variables.
//!
//! - [`Gradients`]: the gradients of the trainable variables, by name, as
//!   plain (detached) tensors. Built from a candle [`GradStore`]; a variable
//!   without a gradient is an error that names it
//!   ([`Error::MissingGradients`]) — never silently skipped.
//! - [`GradAccumulator`]: sums the gradients of several micro-batches (the
//!   caller scales each loss by `1 / gradient_accumulation_steps`) and keeps
//!   only plain tensors, so no graph outlives its backward pass.
//! - [`Gradients::clip_global_norm`]: torch's `clip_grad_norm_`.
//! - [`AdamW`]: torch's `AdamW` (decoupled weight decay, bias correction),
//!   with weight decay switched off for the names a predicate picks
//!   (HF's "no decay" parameter group: biases and norm weights), and its
//!   state (`m`, `v`, step) saved as `optimizer.safetensors` +
//!   `optimizer.json`, restored bit-exactly.
//!
//! A training step, with accumulation and clipping:
//!
//! ```no_run
//! # use llmtune_train::optim::{AdamW, AdamWConfig, GradAccumulator};
//! # fn loss_of(_: usize) -> candle_core::Result<candle_core::Tensor> { unimplemented!() }
//! # fn main() -> llmtune_train::Result<()> {
//! # let vars: Vec<(String, candle_core::Var)> = vec![];
//! let mut opt = AdamW::new(vars, AdamWConfig { lr: 5e-5, ..Default::default() })?;
//! let mut acc = GradAccumulator::new(opt.named_vars());
//! for micro in 0..8 {
//!     let loss = (loss_of(micro)? / 8.0)?; // scale by 1/accum
//!     acc.add(&loss.backward()?)?; // the GradStore and the graph are dropped here
//! }
//! let mut grads = acc.finish()?;
//! let grad_norm = grads.clip_global_norm(1.0)?; // pre-clip norm, for the logs
//! opt.set_lr(2.5e-5); // from the scheduler
//! opt.step(&grads)?;
//! # let _ = grad_norm; Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{atomic_write, read_json, write_json_sorted};

/// File name of the optimizer moments inside a checkpoint.
pub const OPTIMIZER_TENSORS_NAME: &str = "optimizer.safetensors";
/// File name of the optimizer's scalar state inside a checkpoint.
pub const OPTIMIZER_STATE_NAME: &str = "optimizer.json";

const STATE_FORMAT: &str = "llmtune.adamw.v1";

/// HF's default "no weight decay" rule by name: biases and normalisation
/// weights (`*bias`, any name containing `norm`, e.g. `input_layernorm`,
/// `model.norm`, `final_layernorm`).
pub fn is_no_decay_default(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with("bias") || lower.contains("norm")
}

// ---------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------

/// Gradients of trainable variables by name, detached from any graph.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    grads: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// No gradients.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the gradient of every variable of `vars` from `store`.
    ///
    /// Errors with [`Error::MissingGradients`] listing every variable the
    /// backward pass did not reach, and with [`Error::ShapeMismatch`] if a
    /// gradient does not have its variable's shape.
    pub fn from_grad_store(store: &GradStore, vars: &[(String, Var)]) -> Result<Self> {
        let mut grads = BTreeMap::new();
        let mut missing = Vec::new();
        for (name, var) in vars {
            match store.get(var.as_tensor()) {
                Some(g) => {
                    check_shape(name, var.dims(), g.dims())?;
                    grads.insert(name.clone(), g.detach());
                }
                None => missing.push(name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(Error::MissingGradients { names: missing });
        }
        Ok(Gradients { grads })
    }

    /// Set the gradient of `name`, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) -> Option<Tensor> {
        self.grads.insert(name.into(), grad.detach())
    }

    /// The gradient of `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }

    /// Number of gradients.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// `(name, gradient)` pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.grads.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The global L2 norm over all gradients (sum of squares per tensor in
    /// `f32`, combined in `f64`). NaN/inf gradients give a NaN/inf norm.
    pub fn global_norm(&self) -> Result<f64> {
        if self.grads.is_empty() {
            return Ok(0.0);
        }
        let squares: Vec<Tensor> = self
            .grads
            .values()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
            .collect::<candle_core::Result<_>>()?;
        let first = squares[0].device();
        let total: f64 = if squares.iter().all(|s| s.device().same_device(first)) {
            // One host transfer for all tensors (matters on a GPU).
            Tensor::stack(&squares, 0)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .sum()
        } else {
            let mut total = 0f64;
            for s in &squares {
                total += s.to_scalar::<f32>()? as f64;
            }
            total
        };
        Ok(total.sqrt())
    }

    /// Multiply every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Clip by global norm as torch's `clip_grad_norm_(params, max_norm)`:
    /// with `total` the global L2 norm, `coef = max_norm / (total + 1e-6)`;
    /// if `coef < 1` every gradient is multiplied by it. Returns the norm
    /// before clipping (what HF logs as `grad_norm`). `max_norm <= 0` only
    /// measures.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let total = self.global_norm()?;
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                self.scale(coef)?;
            }
        }
        Ok(total)
    }
}

fn check_shape(name: &str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected != actual {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Gradient accumulation
// ---------------------------------------------------------------------------

/// Sums gradients over micro-batches.
///
/// Each [`GradAccumulator::add`] copies the gradients out of the
/// [`GradStore`] into running sums (plain tensors), so the store — and the
/// forward graph it keeps alive — can be dropped right after. The caller
/// scales each micro-batch loss by `1 / accumulation_steps`, as HF does, so
/// the sum is the mean gradient.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<(String, Var)>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `vars` (see [`AdamW::named_vars`]).
    pub fn new(vars: Vec<(String, Var)>) -> Self {
        let sums = vec![None; vars.len()];
        GradAccumulator {
            vars,
            sums,
            micro_batches: 0,
        }
    }

    /// Add one micro-batch's gradients. Every variable must have a gradient
    /// ([`Error::MissingGradients`] otherwise; the sums are left unchanged).
    pub fn add(&mut self, store: &GradStore) -> Result<()> {
        let grads = Gradients::from_grad_store(store, &self.vars)?;
        self.add_gradients(&grads)
    }

    /// Add gradients already taken out of a store (same names as the
    /// variables; missing or unknown names are errors).
    pub fn add_gradients(&mut self, grads: &Gradients) -> Result<()> {
        check_names(grads, self.vars.iter().map(|(n, _)| n.as_str()))?;
        let mut next = Vec::with_capacity(self.sums.len());
        for ((name, var), sum) in self.vars.iter().zip(&self.sums) {
            let g = grads.get(name).ok_or_else(|| Error::MissingGradients {
                names: vec![name.clone()],
            })?;
            check_shape(name, var.dims(), g.dims())?;
            next.push(Some(match sum {
                Some(s) => (s + g)?,
                None => g.detach(),
            }));
        }
        self.sums = next;
        self.micro_batches += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::finish`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradients; resets the accumulator. Errors if nothing was
    /// added.
    pub fn finish(&mut self) -> Result<Gradients> {
        if self.micro_batches == 0 {
            return Err(Error::InvalidArgument(
                "gradient accumulation: finish() called before any micro-batch was added".into(),
            ));
        }
        let mut out = Gradients::new();
        for ((name, _), sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                out.grads.insert(name.clone(), s);
            }
        }
        self.micro_batches = 0;
        Ok(out)
    }
}

/// Errors unless `grads` has exactly the names `expected`.
fn check_names<'a>(grads: &Gradients, expected: impl Iterator<Item = &'a str>) -> Result<()> {
    let expected: Vec<&str> = expected.collect();
    let missing: Vec<String> = expected
        .iter()
        .filter(|n| grads.get(n).is_none())
        .map(|n| n.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingGradients { names: missing });
    }
    let known: BTreeSet<&str> = expected.into_iter().collect();
    let unknown: Vec<String> = grads
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !known.contains(n))
        .map(str::to_string)
        .collect();
    if !unknown.is_empty() {
        return Err(Error::UnknownGradients { names: unknown });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------

/// AdamW hyper-parameters (HF `TrainingArguments` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate (the scheduler updates it with [`AdamW::set_lr`]).
    pub lr: f64,
    /// `adam_beta1` (0.9).
    pub beta1: f64,
    /// `adam_beta2` (0.999).
    pub beta2: f64,
    /// `adam_epsilon` (1e-8).
    pub eps: f64,
    /// `weight_decay` (0.0), applied to the variables in the decay group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let bad = |flag: &str, v: f64| {
            Err(Error::InvalidArgument(format!(
                "--{flag}: invalid value {v}"
            )))
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("learning_rate", self.lr);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("adam_beta1", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("adam_beta2", self.beta2);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("adam_epsilon", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay);
        }
        Ok(())
    }
}

/// One optimised variable and its moments.
#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// First moment (`exp_avg`), f32, on the variable's device.
    m: Tensor,
    /// Second moment (`exp_avg_sq`), f32, on the variable's device.
    v: Tensor,
}

/// torch's `AdamW` over a list of named candle variables.
///
/// Per element, with `t` the step count after increment:
/// `p *= 1 - lr * wd` (decay group only); `m = m + (1 - b1) (g - m)`;
/// `v = b2 v + (1 - b2) g²`;
/// `p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
/// Moments are kept in `f32` on the variable's device; a variable of another
/// dtype is updated in `f32` and cast back.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    step: u64,
}

/// The JSON part of a saved optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    format: String,
    step: u64,
    config: AdamWConfig,
    params: Vec<ParamEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ParamEntry {
    name: String,
    shape: Vec<usize>,
    weight_decay: bool,
}

impl AdamW {
    /// AdamW over `vars`, every variable in the weight-decay group.
    /// Errors on an empty list, duplicate names or invalid hyper-parameters.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::with_no_decay(vars, config, |_| false)
    }

    /// AdamW where the variables for which `no_decay(name)` is true get no
    /// weight decay (HF's two parameter groups; see [`is_no_decay_default`]).
    pub fn with_no_decay(
        vars: Vec<(String, Var)>,
        config: AdamWConfig,
        no_decay: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        if vars.is_empty() {
            return Err(Error::InvalidArgument(
                "the optimizer got no trainable variables".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "trainable variable '{name}' is listed twice"
                )));
            }
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            let v = m.zeros_like()?;
            params.push(Param {
                decay: !no_decay(&name),
                name,
                var,
                m,
                v,
            });
        }
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Set the learning rate for the next steps (from the scheduler).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Steps taken so far (torch's `state["step"]`).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimised variables with their names, in the order given.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect()
    }

    /// Whether `name` is in the weight-decay group (`None`: unknown name).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params.iter().find(|p| p.name == name).map(|p| p.decay)
    }

    /// The moments `(m, v)` of `name`.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| (&p.m, &p.v))
    }

    /// Take the gradients of this optimizer's variables out of `store`
    /// (shorthand for [`Gradients::from_grad_store`]).
    pub fn gradients(&self, store: &GradStore) -> Result<Gradients> {
        Gradients::from_grad_store(store, &self.named_vars())
    }

    /// One update of every variable. `grads` must hold exactly one gradient
    /// per variable, of its shape ([`Error::MissingGradients`],
    /// [`Error::UnknownGradients`], [`Error::ShapeMismatch`]); nothing is
    /// changed when it does not.
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        check_names(grads, self.params.iter().map(|p| p.name.as_str()))?;
        for p in &self.params {
            if let Some(g) = grads.get(&p.name) {
                check_shape(&p.name, p.var.dims(), g.dims())?;
            }
        }
        self.step += 1;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2 = 1.0 - beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let g = g.detach().to_dtype(DType::F32)?;
            let mut param = p.var.as_detached_tensor().to_dtype(DType::F32)?;
            if p.decay && weight_decay != 0.0 {
                param = param.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            // torch: exp_avg.lerp_(grad, 1 - beta1)
            let m = ((&g - &p.m)?.affine(1.0 - beta1, 0.0)? + &p.m)?;
            // torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            let v = (p.v.affine(beta2, 0.0)? + (g.affine(1.0 - beta2, 0.0)? * &g)?)?;
            // torch: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            let bc2 = Tensor::new(bc2_sqrt as f32, v.device())?;
            let denom = v.sqrt()?.broadcast_div(&bc2)?.affine(1.0, eps)?;
            // torch: param.addcdiv_(exp_avg, denom, value=-step_size)
            let update = m.affine(-step_size, 0.0)?.div(&denom)?;
            let new_param = (param + update)?;
            p.var.set(&new_param.to_dtype(p.var.dtype())?)?;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }

    /// Save the state into `dir` as [`OPTIMIZER_TENSORS_NAME`] (`{name}.exp_avg`,
    /// `{name}.exp_avg_sq`, f32) and [`OPTIMIZER_STATE_NAME`] (step,
    /// hyper-parameters, names, shapes, decay groups), each atomically.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let tensors_path = dir.join(OPTIMIZER_TENSORS_NAME);
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            tensors.push((format!("{}.exp_avg", p.name), p.m.to_device(&Device::Cpu)?));
            tensors.push((
                format!("{}.exp_avg_sq", p.name),
                p.v.to_device(&Device::Cpu)?,
            ));
        }
        let bytes = safetensors::serialize(tensors, None).map_err(|e| Error::Safetensors {
            path: tensors_path.clone(),
            message: e.to_string(),
        })?;
        atomic_write(&tensors_path, &bytes)?;
        let state = StateFile {
            format: STATE_FORMAT.to_string(),
            step: self.step,
            config: self.config,
            params: self
                .params
                .iter()
                .map(|p| ParamEntry {
                    name: p.name.clone(),
                    shape: p.var.dims().to_vec(),
                    weight_decay: p.decay,
                })
                .collect(),
        };
        write_json_sorted(&dir.join(OPTIMIZER_STATE_NAME), &state)
    }

    /// Restore a state saved by [`AdamW::save_state`] from `dir`: step count,
    /// hyper-parameters and decay groups (as torch's `load_state_dict`
    /// restores its param groups; the scheduler sets the learning rate after
    /// this), and the moments, bit-exactly. The saved variables must be
    /// exactly this optimizer's (same names and shapes); on any error the
    /// optimizer is unchanged.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let json_path = dir.join(OPTIMIZER_STATE_NAME);
        let tensors_path = dir.join(OPTIMIZER_TENSORS_NAME);
        let state: StateFile = read_json(&json_path)?;
        if state.format != STATE_FORMAT {
            return Err(Error::state(
                &json_path,
                format!(
                    "unknown format '{}' (expected '{STATE_FORMAT}')",
                    state.format
                ),
            ));
        }
        state
            .config
            .validate()
            .map_err(|e| Error::state(&json_path, e.to_string()))?;
        let saved: HashMap<&str, &ParamEntry> =
            state.params.iter().map(|e| (e.name.as_str(), e)).collect();
        let current: BTreeSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        let missing: Vec<&str> = current
            .iter()
            .copied()
            .filter(|n| !saved.contains_key(n))
            .collect();
        let extra: Vec<&str> = saved
            .keys()
            .copied()
            .filter(|n| !current.contains(n))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(Error::state(
                &json_path,
                format!(
                    "the saved optimizer state is for other variables (not saved: [{}]; \
                     saved but not trainable now: [{}])",
                    missing.join(", "),
                    extra.join(", ")
                ),
            ));
        }
        let bytes =
            std::fs::read(&tensors_path).map_err(|e| Error::io("read", &tensors_path, e))?;
        let st_err = |message: String| Error::Safetensors {
            path: tensors_path.clone(),
            message,
        };
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(e.to_string()))?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let entry = saved[p.name.as_str()];
            if entry.shape != p.var.dims() {
                return Err(Error::state(
                    &json_path,
                    format!(
                        "shape mismatch for '{}': saved {:?}, current {:?}",
                        p.name,
                        entry.shape,
                        p.var.dims()
                    ),
                ));
            }
            let load = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let view = st.tensor(&key).map_err(|e| st_err(format!("{key}: {e}")))?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != p.var.dims() {
                    return Err(st_err(format!(
                        "{key}: expected F32 {:?}, found {:?} {:?}",
                        p.var.dims(),
                        view.dtype(),
                        view.shape()
                    )));
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(Tensor::from_vec(values, p.var.dims(), p.var.device())?)
            };
            let m = load("exp_avg")?;
            let v = load("exp_avg_sq")?;
            restored.push((m, v, entry.weight_decay));
        }
        for (p, (m, v, decay)) in self.params.iter_mut().zip(restored) {
            p.m = m;
            p.v = v;
            p.decay = decay;
        }
        self.step = state.step;
        self.config = state.config;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(name: &str, values: &[f32], shape: &[usize]) -> (String, Var) {
        (
            name.to_string(),
            Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap(),
        )
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn clip_matches_hand_computation() {
        // grads (3, 4) and (12): global norm = sqrt(9 + 16 + 144) = 13.
        let mut g = Gradients::new();
        g.insert("a", Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap());
        g.insert("b", Tensor::new(&[12f32], &Device::Cpu).unwrap());
        let norm = g.clip_global_norm(1.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-12, "{norm}");
        let coef = 1.0 / (13.0 + 1e-6);
        let a: Vec<f32> = g.get("a").unwrap().to_vec1().unwrap();
        let b: Vec<f32> = g.get("b").unwrap().to_vec1().unwrap();
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-7);
        assert!((a[1] as f64 - 4.0 * coef).abs() < 1e-7);
        assert!((b[0] as f64 - 12.0 * coef).abs() < 1e-7);
        // The clipped norm is max_norm (up to the 1e-6 guard).
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-6);
        // Below the threshold nothing changes (coef >= 1).
        let before: Vec<f32> = g.get("a").unwrap().to_vec1().unwrap();
        let n2 = g.clip_global_norm(5.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-6);
        assert_eq!(before, g.get("a").unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn missing_gradient_is_an_error_naming_the_variable() {
        let a = var("layer.a", &[1.0, 2.0], &[2]);
        let b = var("layer.b", &[3.0], &[1]);
        let loss = a.1.as_tensor().sum_all().unwrap(); // b not used
        let store = loss.backward().unwrap();
        let vars = vec![a.clone(), b.clone()];
        let err = Gradients::from_grad_store(&store, &vars).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no gradient for 1 trainable variable(s): layer.b"
        );
        let mut acc = GradAccumulator::new(vars.clone());
        assert!(matches!(
            acc.add(&store),
            Err(Error::MissingGradients { .. })
        ));
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut only_a = Gradients::new();
        only_a.insert("layer.a", Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap());
        let err = opt.step(&only_a).unwrap_err().to_string();
        assert!(err.contains("layer.b"), "{err}");
        assert_eq!(opt.step_count(), 0);
        assert_eq!(values(&a.1), vec![1.0, 2.0]);
    }

    #[test]
    fn accumulation_sums_micro_batches() {
        let (name, w) = var("w", &[1.0, -2.0], &[2]);
        let mut acc = GradAccumulator::new(vec![(name, w.clone())]);
        for scale in [1.0, 3.0] {
            // d/dw sum(scale * w^2) / 2 = scale * w
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * (scale / 2.0)).unwrap();
            acc.add(&loss.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        let g = acc.finish().unwrap();
        assert_eq!(
            g.get("w").unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, -8.0]
        );
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.finish().is_err());
    }

    /// A plain f64 AdamW (torch's formula) to check the tensor version.
    fn reference_adamw(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        t: u64,
        c: &AdamWConfig,
        decay: bool,
    ) {
        for i in 0..p.len() {
            if decay {
                p[i] *= 1.0 - c.lr * c.weight_decay;
            }
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let bc1 = 1.0 - c.beta1.powi(t as i32);
            let bc2 = 1.0 - c.beta2.powi(t as i32);
            p[i] -= (c.lr / bc1) * m[i] / (v[i].sqrt() / bc2.sqrt() + c.eps);
        }
    }

    #[test]
    fn adamw_matches_formula_with_decay_groups() {
        let config = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let w0 = [0.5f32, -1.5, 2.0];
        let b0 = [0.25f32];
        let mut opt = AdamW::with_no_decay(
            vec![var("fc.weight", &w0, &[3]), var("fc.bias", &b0, &[1])],
            config,
            is_no_decay_default,
        )
        .unwrap();
        assert_eq!(opt.decays("fc.weight"), Some(true));
        assert_eq!(opt.decays("fc.bias"), Some(false));
        let mut pw: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
        let mut pb = vec![b0[0] as f64];
        let (mut mw, mut vw, mut mb, mut vb) = (vec![0.0; 3], vec![0.0; 3], vec![0.0], vec![0.0]);
        let grads_per_step = [
            [0.1f32, -0.2, 0.3, 1.0],
            [-0.05, 0.4, 0.0, -2.0],
            [0.3, 0.3, -0.3, 0.5],
        ];
        for (t, gs) in grads_per_step.iter().enumerate() {
            let mut g = Gradients::new();
            g.insert("fc.weight", Tensor::new(&gs[..3], &Device::Cpu).unwrap());
            g.insert("fc.bias", Tensor::new(&gs[3..], &Device::Cpu).unwrap());
            opt.step(&g).unwrap();
            let gw: Vec<f64> = gs[..3].iter().map(|&x| x as f64).collect();
            reference_adamw(&mut pw, &mut mw, &mut vw, &gw, t as u64 + 1, &config, true);
            reference_adamw(
                &mut pb,
                &mut mb,
                &mut vb,
                &[gs[3] as f64],
                t as u64 + 1,
                &config,
                false,
            );
        }
        let vars = opt.named_vars();
        let got_w = values(&vars[0].1);
        let got_b = values(&vars[1].1);
        for (a, b) in got_w.iter().zip(&pw) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got_w:?} vs {pw:?}");
        }
        assert!(
            (got_b[0] as f64 - pb[0]).abs() < 1e-6,
            "{got_b:?} vs {pb:?}"
        );
        // The bias moved without decay: with decay it would differ by lr*wd*p.
        assert_eq!(opt.step_count(), 3);
    }

    #[test]
    fn state_round_trip_is_bit_exact() {
        let dir = std::env::temp_dir().join(format!("llmtune-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let make = || {
            AdamW::with_no_decay(
                vec![
                    var("a.weight", &[0.1, 0.2, 0.3, 0.4], &[2, 2]),
                    var("a.bias", &[0.5], &[1]),
                ],
                AdamWConfig {
                    lr: 3e-4,
                    weight_decay: 0.01,
                    ..Default::default()
                },
                is_no_decay_default,
            )
            .unwrap()
        };
        let grads = |k: f32| {
            let mut g = Gradients::new();
            g.insert(
                "a.weight",
                Tensor::new(&[[k, -k], [0.5 * k, 0.1]], &Device::Cpu).unwrap(),
            );
            g.insert("a.bias", Tensor::new(&[k * k], &Device::Cpu).unwrap());
            g
        };
        let mut a = make();
        a.step(&grads(0.3)).unwrap();
        a.step(&grads(-0.7)).unwrap();
        a.save_state(&dir).unwrap();
        // A fresh optimizer over variables with a's current values.
        let mut b = make();
        for ((_, vb), (_, va)) in b.named_vars().iter().zip(a.named_vars()) {
            vb.set(&va.as_tensor().copy().unwrap()).unwrap();
        }
        b.load_state(&dir).unwrap();
        assert_eq!(b.step_count(), 2);
        assert_eq!(b.config(), a.config());
        for name in ["a.weight", "a.bias"] {
            let (ma, va) = a.moments(name).unwrap();
            let (mb, vb) = b.moments(name).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(ma), bits(mb));
            assert_eq!(bits(va), bits(vb));
        }
        a.step(&grads(1.1)).unwrap();
        b.step(&grads(1.1)).unwrap();
        for ((_, va), (_, vb)) in a.named_vars().iter().zip(b.named_vars()) {
            let x: Vec<u32> = values(va).iter().map(|x| x.to_bits()).collect();
            let y: Vec<u32> = values(&vb).iter().map(|x| x.to_bits()).collect();
            assert_eq!(x, y);
        }
        // A state for other variables is refused, naming them.
        let mut other = AdamW::new(vec![var("z", &[1.0], &[1])], AdamWConfig::default()).unwrap();
        let err = other.load_state(&dir).unwrap_err().to_string();
        assert!(
            err.contains("not saved: [z]") && err.contains("a.weight"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
