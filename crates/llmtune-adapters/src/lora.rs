//! LoRA: `y = W x (+ b) + scaling * B A dropout(x)` on named linear layers, with
//! `scaling = alpha / r` (`alpha / sqrt(r)` with rsLoRA), `A` Kaiming-uniform and `B` zero.
//!
//! A [`Lora`] set manages any number of named adapters on one backbone. Each targeted linear
//! layer gets one hook ([`llmtune_models::LinearAdapter`]) holding that layer's `(A, B)` pair
//! of every adapter; all hooks share one state (enabled, active adapter, training mode,
//! dropout RNG), so enabling, disabling or swapping adapters is a flag flip, not a rebuild:
//!
//! * PPO's reference model is the policy with adapters disabled ([`Lora::disabled`]);
//! * the reward adapter is swapped in to score and out again ([`Lora::activated`]).
//!
//! Trainable adapters hold candle [`Var`]s in the master dtype ([`crate::master_dtype`]: f32,
//! or f64 for an f64 model); adapters loaded for inference hold plain tensors, so no gradient
//! is ever computed for them. The adapter output is computed in the dtype of the layer input
//! (the `to_dtype` is differentiable, so f32 masters get their gradients from a bf16 forward).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Tensor, Var};
use llmtune_models::LinearAdapter;

use crate::peft;
use crate::rng::{uniform_tensor, DropoutRng, SplitMix64};
use crate::{master_dtype, AdapterError, Backbone, Result};

/// The adapter name PEFT uses when none is given (and the one checkpoints are loaded as).
pub const DEFAULT_ADAPTER: &str = "default";

/// The dropout seed of a new [`Lora`] set (the reference's default `--seed`).
pub const DEFAULT_DROPOUT_SEED: u64 = 42;

// ---------------------------------------------------------------------------------------
// Configuration.

/// Which linear layers get LoRA.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraTarget {
    /// Every linear layer except the output layer (`lm_head`; ChatGLM2/3's
    /// `transformer.output_layer`) (`--lora_target all`, PEFT's `all-linear`).
    All,
    /// Module names matched as PEFT does for a list: a module is targeted when its name equals
    /// an entry or ends with `.` + entry (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Modules(Vec<String>),
    /// PEFT's string form of `target_modules` (a regular expression), kept verbatim from a
    /// loaded `adapter_config.json`. Loaded adapters take their modules from the weights, so
    /// it is never matched here; a fresh adapter cannot use it.
    Pattern(String),
}

impl LoraTarget {
    /// Parses `--lora_target`: `all` (or `all-linear`), or a comma list of module names.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all" || s == "all-linear" {
            return Ok(Self::All);
        }
        let names: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if names.is_empty() {
            return Err(AdapterError::Invalid(format!(
                "--lora_target {s:?}: expected `all` or a comma list of module names"
            )));
        }
        Ok(Self::Modules(names))
    }

    /// Whether the module `name` is targeted.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::All => !["lm_head", "output_layer"]
                .iter()
                .any(|head| module_matches(name, head)),
            Self::Modules(list) => list.iter().any(|m| module_matches(name, m)),
            Self::Pattern(_) => false,
        }
    }
}

/// PEFT's suffix rule: `name == key` or `name` ends with `.key`.
pub(crate) fn module_matches(name: &str, key: &str) -> bool {
    name == key
        || (name.len() > key.len()
            && name.ends_with(key)
            && name.as_bytes()[name.len() - key.len() - 1] == b'.')
}

/// Hyper-parameters of one LoRA adapter (PEFT's `LoraConfig`, the fields we support).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (`--lora_rank`, default 8).
    pub r: usize,
    /// `lora_alpha` (`--lora_alpha`, default 32).
    pub alpha: f64,
    /// Dropout probability on the adapter input, training mode only (`--lora_dropout`, 0.1).
    pub dropout: f64,
    /// Targeted modules (`--lora_target`).
    pub target: LoraTarget,
    /// rsLoRA: `scaling = alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Per-module ranks (PEFT `rank_pattern`, keys matched like [`LoraTarget::Modules`]).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (PEFT `alpha_pattern`).
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraConfig {
    /// A config from the CLI values: `--lora_rank`, `--lora_alpha`, `--lora_dropout`,
    /// `--lora_target` (`all` or a comma list).
    pub fn new(r: usize, alpha: f64, dropout: f64, target: &str) -> Result<Self> {
        let c = Self {
            r,
            alpha,
            dropout,
            target: LoraTarget::parse(target)?,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the ranges: `r >= 1`, `alpha` finite, `0 <= dropout < 1`.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(AdapterError::Invalid(
                "--lora_rank must be at least 1, got 0".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(AdapterError::Invalid(format!(
                "--lora_alpha must be a finite number, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(AdapterError::Invalid(format!(
                "--lora_dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(AdapterError::Invalid(format!(
                "rank_pattern[{k:?}] must be at least 1, got 0"
            )));
        }
        Ok(())
    }

    /// The rank of module `name` (`rank_pattern` first, then `r`).
    pub fn rank_for(&self, name: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(k, _)| module_matches(name, k))
            .map(|(_, &r)| r)
            .unwrap_or(self.r)
    }

    /// The alpha of module `name` (`alpha_pattern` first, then `alpha`).
    pub fn alpha_for(&self, name: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module_matches(name, k))
            .map(|(_, &a)| a)
            .unwrap_or(self.alpha)
    }

    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA) for module `name`.
    pub fn scaling_for(&self, name: &str) -> f64 {
        let r = self.rank_for(name) as f64;
        let a = self.alpha_for(name);
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hook installed in each linear layer.

#[derive(Debug)]
struct Flags {
    enabled: bool,
    active: Option<String>,
    training: bool,
}

/// State shared by every hook of one [`Lora`] set.
#[derive(Debug)]
struct Shared {
    flags: RwLock<Flags>,
    dropout: DropoutRng,
}

impl Shared {
    fn flags(&self) -> RwLockReadGuard<'_, Flags> {
        self.flags.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn flags_mut(&self) -> RwLockWriteGuard<'_, Flags> {
        self.flags.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One adapter's matrices on one layer. For a trainable adapter `a` and `b` are variables.
#[derive(Debug, Clone)]
struct Pair {
    /// `[r, in]`.
    a: Tensor,
    /// `[out, r]`.
    b: Tensor,
    scaling: f64,
    dropout: f64,
}

/// The hook of one linear layer: the `(A, B)` pair of every adapter on that layer.
#[derive(Debug)]
struct LoraLayer {
    shared: Arc<Shared>,
    pairs: RwLock<BTreeMap<String, Pair>>,
}

impl LoraLayer {
    fn pairs(&self) -> RwLockReadGuard<'_, BTreeMap<String, Pair>> {
        self.pairs.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn pairs_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Pair>> {
        self.pairs.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn as_dtype(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

impl LinearAdapter for LoraLayer {
    fn apply(&self, x: &Tensor, base: Tensor) -> candle_core::Result<Tensor> {
        let (pair, training) = {
            let flags = self.shared.flags();
            let Some(active) = flags.active.as_ref().filter(|_| flags.enabled) else {
                return Ok(base);
            };
            match self.pairs().get(active) {
                Some(p) => (p.clone(), flags.training),
                None => return Ok(base),
            }
        };
        let xin = if training && pair.dropout > 0.0 {
            self.shared.dropout.apply(x, pair.dropout)?
        } else {
            x.clone()
        };
        let a = as_dtype(&pair.a, x.dtype())?;
        let b = as_dtype(&pair.b, x.dtype())?;
        let h = llmtune_ops::linear(&xin, &a, None)?;
        llmtune_ops::lora_add(&base, &h, &b, pair.scaling)
    }
}

/// Whether the hook in a linear layer is `layer`.
fn is_ours(hook: &Arc<dyn LinearAdapter>, layer: &Arc<LoraLayer>) -> bool {
    std::ptr::eq(
        Arc::as_ptr(hook) as *const (),
        Arc::as_ptr(layer) as *const (),
    )
}

// ---------------------------------------------------------------------------------------
// The set of adapters.

#[derive(Debug, Clone)]
struct AdapterInfo {
    config: LoraConfig,
    trainable: bool,
}

/// Named LoRA adapters on one backbone.
///
/// Cloning a `Lora` gives a handle to the same adapters and switches (the hooks in the model
/// are shared); cloning the *model* shares its hooks too.
#[derive(Debug, Clone)]
pub struct Lora {
    shared: Arc<Shared>,
    /// Hooks by HF module name.
    layers: BTreeMap<String, Arc<LoraLayer>>,
    adapters: BTreeMap<String, AdapterInfo>,
}

impl Default for Lora {
    fn default() -> Self {
        Self::new()
    }
}

/// Restores the adapter switches of a [`Lora`] set when dropped (see [`Lora::disabled`] and
/// [`Lora::activated`]).
#[must_use = "the switches are restored when the guard is dropped"]
#[derive(Debug)]
pub struct SwitchGuard {
    shared: Arc<Shared>,
    enabled: bool,
    active: Option<String>,
}

impl Drop for SwitchGuard {
    fn drop(&mut self) {
        let mut f = self.shared.flags_mut();
        f.enabled = self.enabled;
        f.active = self.active.take();
    }
}

impl Lora {
    /// An empty set: enabled, evaluation mode (no dropout), dropout seed
    /// [`DEFAULT_DROPOUT_SEED`].
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                flags: RwLock::new(Flags {
                    enabled: true,
                    active: None,
                    training: false,
                }),
                dropout: DropoutRng::new(DEFAULT_DROPOUT_SEED),
            }),
            layers: BTreeMap::new(),
            adapters: BTreeMap::new(),
        }
    }

    // -- switches ------------------------------------------------------------------------

    /// Turns every adapter on or off (off = the base model, PEFT's `disable_adapter`).
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.flags_mut().enabled = enabled;
    }

    /// Whether adapters are on.
    pub fn is_enabled(&self) -> bool {
        self.shared.flags().enabled
    }

    /// Makes `name` the adapter that runs (only one runs at a time).
    pub fn set_active(&self, name: &str) -> Result<()> {
        self.info(name)?;
        self.shared.flags_mut().active = Some(name.to_string());
        Ok(())
    }

    /// The adapter that runs when enabled (`None` when there is none).
    pub fn active(&self) -> Option<String> {
        self.shared.flags().active.clone()
    }

    /// Training mode turns dropout on; evaluation mode (the default) turns it off.
    pub fn set_training(&self, training: bool) {
        self.shared.flags_mut().training = training;
    }

    /// Whether training mode is on.
    pub fn is_training(&self) -> bool {
        self.shared.flags().training
    }

    /// Disables every adapter until the guard is dropped (PPO's reference model).
    pub fn disabled(&self) -> SwitchGuard {
        let mut f = self.shared.flags_mut();
        let guard = SwitchGuard {
            shared: self.shared.clone(),
            enabled: f.enabled,
            active: f.active.clone(),
        };
        f.enabled = false;
        guard
    }

    /// Enables and activates `name` until the guard is dropped (PPO swaps the reward adapter
    /// in to score).
    pub fn activated(&self, name: &str) -> Result<SwitchGuard> {
        self.info(name)?;
        let mut f = self.shared.flags_mut();
        let guard = SwitchGuard {
            shared: self.shared.clone(),
            enabled: f.enabled,
            active: f.active.clone(),
        };
        f.enabled = true;
        f.active = Some(name.to_string());
        Ok(guard)
    }

    /// Reseeds the dropout RNG (and restarts its stream).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.shared.dropout.set_state(seed, 0);
    }

    /// `(seed, masks drawn so far)`: everything needed to continue the dropout stream after a
    /// restart (store it in a checkpoint).
    pub fn dropout_state(&self) -> (u64, u64) {
        self.shared.dropout.state()
    }

    /// Restores a state returned by [`Lora::dropout_state`].
    pub fn set_dropout_state(&self, seed: u64, calls: u64) {
        self.shared.dropout.set_state(seed, calls);
    }

    // -- queries -------------------------------------------------------------------------

    /// Names of the adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// Whether an adapter `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.adapters.contains_key(name)
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        Ok(&self.info(name)?.config)
    }

    /// Whether adapter `name` holds variables.
    pub fn is_trainable(&self, name: &str) -> Result<bool> {
        Ok(self.info(name)?.trainable)
    }

    /// HF module names adapter `name` is attached to, sorted.
    pub fn modules(&self, name: &str) -> Result<Vec<String>> {
        self.info(name)?;
        Ok(self
            .layers
            .iter()
            .filter(|(_, l)| l.pairs().contains_key(name))
            .map(|(m, _)| m.clone())
            .collect())
    }

    /// The tensors of adapter `name` by saved PEFT key
    /// (`base_model.model.<module>.lora_{A,B}.weight`), sorted by key.
    pub fn weights(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        self.info(name)?;
        let mut out = Vec::new();
        for (m, l) in &self.layers {
            if let Some(p) = l.pairs().get(name) {
                out.push((peft::lora_key(m, false), p.a.clone()));
                out.push((peft::lora_key(m, true), p.b.clone()));
            }
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(out)
    }

    /// The variables of every trainable adapter, for the optimizer: `(saved PEFT key, var)`,
    /// sorted by key (adapters in name order when several are trainable).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (name, info) in &self.adapters {
            if !info.trainable {
                continue;
            }
            let mut one = Vec::new();
            for (m, l) in &self.layers {
                if let Some(p) = l.pairs().get(name) {
                    for (key, t) in [
                        (peft::lora_key(m, false), &p.a),
                        (peft::lora_key(m, true), &p.b),
                    ] {
                        // The tensor is a variable: this shares its storage.
                        if let Ok(v) = Var::from_tensor(t) {
                            one.push((key, v));
                        }
                    }
                }
            }
            one.sort_by(|x, y| x.0.cmp(&y.0));
            out.extend(one);
        }
        out
    }

    /// Number of scalar parameters of adapter `name`.
    pub fn num_params(&self, name: &str) -> Result<usize> {
        Ok(self
            .weights(name)?
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum())
    }

    fn info(&self, name: &str) -> Result<&AdapterInfo> {
        self.adapters.get(name).ok_or_else(|| {
            AdapterError::Invalid(format!(
                "no LoRA adapter named {name:?} (have: {})",
                if self.adapters.is_empty() {
                    "none".to_string()
                } else {
                    self.adapter_names().join(", ")
                }
            ))
        })
    }

    // -- adding --------------------------------------------------------------------------

    /// Adds a fresh trainable adapter `name` on the modules `config.target` selects: `A`
    /// Kaiming-uniform (`U(-1/sqrt(in), 1/sqrt(in))`, as torch's `kaiming_uniform_(a=sqrt(5))`),
    /// `B` zero, both variables in the master dtype, drawn from `seed`. The first adapter
    /// added becomes the active one.
    pub fn add_adapter<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        name: &str,
        config: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        config.validate()?;
        if let LoraTarget::Pattern(p) = &config.target {
            return Err(AdapterError::Invalid(format!(
                "a new LoRA adapter needs `all` or a list of module names, not the pattern {p:?}"
            )));
        }
        self.check_new_name(name)?;
        let dtype = master_dtype(model.dtype());
        let device = model.device();
        let mut rng = SplitMix64::new(seed);
        let mut weights = BTreeMap::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for (m, lin) in model.linears_mut() {
            if !config.target.matches(&m) {
                continue;
            }
            if let LoraTarget::Modules(list) = &config.target {
                for t in list {
                    if module_matches(&m, t) {
                        seen.insert(t.as_str());
                    }
                }
            }
            let r = config.rank_for(&m);
            let (out, inp) = (lin.out_features(), lin.in_features());
            let a = uniform_tensor(&mut rng, r, inp, 1.0 / (inp as f64).sqrt(), dtype, &device)?;
            let b = Tensor::zeros((out, r), dtype, &device)?;
            weights.insert(m, (a, b));
        }
        if let LoraTarget::Modules(list) = &config.target {
            let missing: Vec<&str> = list
                .iter()
                .map(|s| s.as_str())
                .filter(|s| !seen.contains(s))
                .collect();
            if !missing.is_empty() {
                let mut leaves: Vec<String> = model
                    .linears_mut()
                    .into_iter()
                    .map(|(m, _)| leaf(&m).to_string())
                    .collect();
                leaves.sort();
                leaves.dedup();
                return Err(AdapterError::Invalid(format!(
                    "--lora_target: {} matches no linear layer of the model (its linear layers: {})",
                    missing.join(", "),
                    leaves.join(", ")
                )));
            }
        }
        if weights.is_empty() {
            return Err(AdapterError::Invalid(
                "--lora_target selects no linear layer of the model".into(),
            ));
        }
        self.insert_adapter(model, name, config.clone(), weights, true)
    }

    /// Adds adapter `name` with the given matrices (`module -> (A [r, in], B [out, r])`),
    /// converted to the master dtype on the model's device; `trainable` makes them variables.
    /// Shapes are checked against the model's layers. The first adapter added becomes the
    /// active one.
    pub fn insert_adapter<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        name: &str,
        config: LoraConfig,
        weights: BTreeMap<String, (Tensor, Tensor)>,
        trainable: bool,
    ) -> Result<()> {
        self.insert_checked(model, name, config, weights, trainable, None)
    }

    /// [`Lora::insert_adapter`] with the file the weights come from, for messages.
    pub(crate) fn insert_checked<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        name: &str,
        config: LoraConfig,
        weights: BTreeMap<String, (Tensor, Tensor)>,
        trainable: bool,
        source: Option<&Path>,
    ) -> Result<()> {
        self.check_new_name(name)?;
        config.validate()?;
        if weights.is_empty() {
            return Err(AdapterError::Invalid(format!(
                "LoRA adapter {name:?} has no matrices"
            )));
        }
        let dtype = master_dtype(model.dtype());
        let device = model.device();
        let err = |module: &str, b: bool, msg: String| match source {
            Some(p) => AdapterError::tensor(p, &peft::lora_key(module, b), msg),
            None => AdapterError::Invalid(format!(
                "LoRA adapter {name:?}: {}: {msg}",
                peft::lora_key(module, b)
            )),
        };
        // Check everything before touching the model.
        let mut linears = model.linears_mut();
        let mut prepared: BTreeMap<String, Pair> = BTreeMap::new();
        for (module, (a, b)) in &weights {
            let Some((_, lin)) = linears.iter().find(|(m, _)| m == module) else {
                return Err(err(
                    module,
                    false,
                    "the model has no linear layer of that name".into(),
                ));
            };
            let (out, inp) = (lin.out_features(), lin.in_features());
            let (ra, ia) = a.dims2().map_err(|_| {
                err(
                    module,
                    false,
                    format!("expected 2 dims, got {:?}", a.dims()),
                )
            })?;
            let (ob, rb) = b
                .dims2()
                .map_err(|_| err(module, true, format!("expected 2 dims, got {:?}", b.dims())))?;
            if ia != inp {
                return Err(err(
                    module,
                    false,
                    format!("shape {:?} does not fit the layer's {inp} inputs", a.dims()),
                ));
            }
            if ob != out {
                return Err(err(
                    module,
                    true,
                    format!(
                        "shape {:?} does not fit the layer's {out} outputs",
                        b.dims()
                    ),
                ));
            }
            if ra != rb {
                return Err(err(
                    module,
                    true,
                    format!("rank {rb} differs from lora_A's rank {ra}"),
                ));
            }
            let r = config.rank_for(module);
            if ra != r {
                return Err(err(
                    module,
                    false,
                    format!(
                        "shape {:?} has rank {ra}, but the config says r = {r}",
                        a.dims()
                    ),
                ));
            }
            let mk = |t: &Tensor| -> Result<Tensor> {
                let t = t.to_dtype(dtype)?.to_device(&device)?;
                Ok(if trainable {
                    Var::from_tensor(&t.detach())?.into_inner()
                } else {
                    t.detach()
                })
            };
            prepared.insert(
                module.clone(),
                Pair {
                    a: mk(a)?,
                    b: mk(b)?,
                    scaling: config.scaling_for(module),
                    dropout: config.dropout,
                },
            );
        }
        for (module, lin) in linears.iter_mut() {
            if !prepared.contains_key(module.as_str()) {
                continue;
            }
            if let (Some(hook), Some(layer)) = (&lin.adapter, self.layers.get(module.as_str())) {
                if !is_ours(hook, layer) {
                    return Err(AdapterError::Invalid(format!(
                        "{module} already carries an adapter from another LoRA set"
                    )));
                }
            } else if lin.adapter.is_some() {
                return Err(AdapterError::Invalid(format!(
                    "{module} already carries an adapter from another LoRA set"
                )));
            }
        }
        // Attach.
        for (module, lin) in linears.iter_mut() {
            let Some(pair) = prepared.remove(module.as_str()) else {
                continue;
            };
            let layer = self
                .layers
                .entry(module.clone())
                .or_insert_with(|| {
                    Arc::new(LoraLayer {
                        shared: self.shared.clone(),
                        pairs: RwLock::new(BTreeMap::new()),
                    })
                })
                .clone();
            if lin.adapter.is_none() {
                lin.adapter = Some(layer.clone() as Arc<dyn LinearAdapter>);
            }
            layer.pairs_mut().insert(name.to_string(), pair);
        }
        self.adapters
            .insert(name.to_string(), AdapterInfo { config, trainable });
        let mut f = self.shared.flags_mut();
        if f.active.is_none() {
            f.active = Some(name.to_string());
        }
        Ok(())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(AdapterError::Invalid(
                "an adapter name must not be empty".into(),
            ));
        }
        if self.adapters.contains_key(name) {
            return Err(AdapterError::Invalid(format!(
                "a LoRA adapter named {name:?} already exists"
            )));
        }
        Ok(())
    }

    // -- files ---------------------------------------------------------------------------

    /// Loads a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors` or
    /// `.bin`) as adapter `name`; `trainable` makes its matrices variables (to continue
    /// training it). Returns its config.
    pub fn load_peft<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        dir: &Path,
        name: &str,
        trainable: bool,
    ) -> Result<&LoraConfig> {
        self.check_new_name(name)?;
        let ad = peft::read_adapter(dir)?;
        self.insert_checked(
            model,
            name,
            ad.config,
            ad.weights,
            trainable,
            Some(&ad.weights_file),
        )?;
        self.config(name)
    }

    /// Saves adapter `name` in PEFT's layout in `dir` (created if needed):
    /// `adapter_model.safetensors` (keys `base_model.model.<module>.lora_{A,B}.weight`) and
    /// `adapter_config.json`. Each file is written atomically.
    pub fn save_peft(&self, name: &str, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let info = self.info(name)?;
        let modules = self.modules(name)?;
        peft::write_adapter(
            dir,
            &info.config,
            &self.weights(name)?,
            &modules,
            base_model_name_or_path,
        )
    }

    /// Overwrites the values of adapter `name` in place (its variables stay the same objects,
    /// so an optimizer keeps them) from a PEFT folder with the same modules and shapes, e.g.
    /// to restore the best checkpoint.
    pub fn load_weights_into(&self, name: &str, dir: &Path) -> Result<()> {
        self.info(name)?;
        let ad = peft::read_adapter(dir)?;
        let path = &ad.weights_file;
        let mine = self.modules(name)?;
        for m in &mine {
            if !ad.weights.contains_key(m) {
                return Err(AdapterError::tensor(
                    path,
                    &peft::lora_key(m, false),
                    format!("missing (adapter {name:?} has this module)"),
                ));
            }
        }
        for m in ad.weights.keys() {
            if !mine.contains(m) {
                return Err(AdapterError::tensor(
                    path,
                    &peft::lora_key(m, false),
                    format!("adapter {name:?} has no such module"),
                ));
            }
        }
        for (m, (a, b)) in &ad.weights {
            let layer = &self.layers[m.as_str()];
            let pairs = layer.pairs();
            let p = &pairs[name];
            for (is_b, src, dst) in [(false, a, &p.a), (true, b, &p.b)] {
                if src.dims() != dst.dims() {
                    return Err(AdapterError::tensor(
                        path,
                        &peft::lora_key(m, is_b),
                        format!("shape {:?}, expected {:?}", src.dims(), dst.dims()),
                    ));
                }
            }
        }
        for (m, (a, b)) in &ad.weights {
            let layer = &self.layers[m.as_str()];
            let mut pairs = layer.pairs_mut();
            let p = pairs
                .get_mut(name)
                .ok_or_else(|| AdapterError::Invalid(format!("{m}: adapter {name:?} vanished")))?;
            for (src, dst) in [(a, &mut p.a), (b, &mut p.b)] {
                let v = src.to_dtype(dst.dtype())?.to_device(dst.device())?;
                if dst.is_variable() {
                    Var::from_tensor(dst)?.set(&v)?;
                } else {
                    *dst = v;
                }
            }
        }
        Ok(())
    }

    // -- merging and removing ------------------------------------------------------------

    /// Folds adapter `name` into the base weights, `W += scaling * B A` (computed in f32 or
    /// f64 and cast to the weight's dtype), and removes it. Layers left without adapters get
    /// their hook removed, so they run at plain speed.
    pub fn merge<M: Backbone + ?Sized>(&mut self, model: &mut M, name: &str) -> Result<()> {
        self.detach_adapter(model, name, true)
    }

    /// Merges every adapter, in name order.
    pub fn merge_all<M: Backbone + ?Sized>(&mut self, model: &mut M) -> Result<()> {
        for name in self.adapter_names() {
            self.merge(model, &name)?;
        }
        Ok(())
    }

    /// Removes adapter `name` without merging it.
    pub fn remove<M: Backbone + ?Sized>(&mut self, model: &mut M, name: &str) -> Result<()> {
        self.detach_adapter(model, name, false)
    }

    fn detach_adapter<M: Backbone + ?Sized>(
        &mut self,
        model: &mut M,
        name: &str,
        merge: bool,
    ) -> Result<()> {
        let modules = self.modules(name)?;
        let mut linears = model.linears_mut();
        for m in &modules {
            if !linears.iter().any(|(n, _)| n == m) {
                return Err(AdapterError::Invalid(format!(
                    "cannot merge LoRA adapter {name:?}: the model has no linear layer {m}"
                )));
            }
        }
        for (m, lin) in linears.iter_mut() {
            let Some(layer) = self.layers.get(m.as_str()).cloned() else {
                continue;
            };
            let pair = layer.pairs().get(name).cloned();
            if let Some(p) = pair {
                if merge {
                    let w = &lin.weight;
                    let acc = master_dtype(w.dtype());
                    let delta =
                        (p.b.detach()
                            .to_dtype(acc)?
                            .matmul(&p.a.detach().to_dtype(acc)?)?
                            * p.scaling)?;
                    let merged = (w.detach().to_dtype(acc)? + delta)?.to_dtype(w.dtype())?;
                    lin.weight = if w.is_variable() {
                        // A trainable base weight stays the same variable.
                        Var::from_tensor(w)?.set(&merged)?;
                        w.clone()
                    } else {
                        merged
                    };
                }
                layer.pairs_mut().remove(name);
            }
            if layer.pairs().is_empty() {
                if lin.adapter.as_ref().is_some_and(|h| is_ours(h, &layer)) {
                    lin.adapter = None;
                }
                self.layers.remove(m.as_str());
            }
        }
        self.adapters.remove(name);
        let mut f = self.shared.flags_mut();
        if f.active.as_deref() == Some(name) {
            f.active = None;
        }
        tracing::debug!(adapter = name, merged = merge, "LoRA adapter detached");
        Ok(())
    }
}

/// The last component of a module name (`q_proj` of `model.layers.0.self_attn.q_proj`).
pub(crate) fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_matching_follows_peft_suffix_rule() {
        let t = LoraTarget::parse("q_proj, v_proj").unwrap();
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("v_proj"));
        assert!(!t.matches("model.layers.0.self_attn.qq_proj"));
        assert!(!t.matches("model.layers.0.self_attn.k_proj"));
        let all = LoraTarget::parse("all").unwrap();
        assert_eq!(all, LoraTarget::All);
        assert!(all.matches("model.layers.3.mlp.down_proj"));
        assert!(!all.matches("lm_head"));
        assert!(!all.matches("transformer.output_layer"));
        assert!(all.matches("transformer.encoder.layers.0.self_attention.query_key_value"));
        assert_eq!(
            LoraTarget::parse(" , ").unwrap_err().to_string(),
            "--lora_target \",\": expected `all` or a comma list of module names"
        );
    }

    #[test]
    fn config_ranges_and_scaling() {
        let mut c = LoraConfig::new(8, 32.0, 0.1, "q_proj").unwrap();
        assert_eq!(c.scaling_for("x.q_proj"), 4.0);
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
        c.alpha_pattern.insert("q_proj".into(), 8.0);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(c.scaling_for("model.layers.1.self_attn.q_proj"), 4.0);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), 1.0);
        c.use_rslora = true;
        assert_eq!(
            c.scaling_for("model.layers.0.self_attn.q_proj"),
            8.0 / 8f64.sqrt()
        );
        assert_eq!(
            LoraConfig::new(0, 32.0, 0.1, "q_proj")
                .unwrap_err()
                .to_string(),
            "--lora_rank must be at least 1, got 0"
        );
        assert_eq!(
            LoraConfig::new(8, 32.0, 1.0, "q_proj")
                .unwrap_err()
                .to_string(),
            "--lora_dropout must be in [0, 1), got 1"
        );
    }
}
