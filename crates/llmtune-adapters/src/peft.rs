//! PEFT's LoRA file format.
//!
//! A folder with `adapter_config.json` (PEFT's `LoraConfig`, sorted keys) and
//! `adapter_model.safetensors` (or PEFT's older `adapter_model.bin`, a torch zip pickle) whose
//! keys are `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `base_model.model.<module>.lora_B.weight` (`[out, r]`). PEFT drops the adapter name
//! (`.default`) when saving; keys that still carry `.default.` are accepted.
//!
//! We write the same fields PEFT 0.21 writes, so `PeftModel.from_pretrained` loads our folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{json, Value};

use crate::io::{create_dir, first_existing, read_tensors, save_safetensors, write_atomic};
use crate::lora::{leaf, LoraConfig, LoraTarget};
use crate::{AdapterError, Result};

/// The weights file we write (and read first).
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// PEFT's older weights file (read only).
pub const WEIGHTS_NAME_BIN: &str = "adapter_model.bin";
/// The config file.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The PEFT version whose config layout we write.
pub const PEFT_VERSION: &str = "0.21.2";

const PREFIX: &str = "base_model.model.";

/// The saved PEFT key of a LoRA matrix: `base_model.model.<module>.lora_A.weight` (or
/// `lora_B` when `b`).
pub fn lora_key(module: &str, b: bool) -> String {
    format!("{PREFIX}{module}.lora_{}.weight", if b { 'B' } else { 'A' })
}

/// Splits a PEFT key into `(module, is_b)`; accepts the in-memory form with `.default.`.
/// `None` when the key is not a LoRA matrix.
pub fn parse_lora_key(key: &str) -> Option<(String, bool)> {
    let rest = key.strip_prefix(PREFIX)?;
    for (marker, is_b) in [(".lora_A.", false), (".lora_B.", true)] {
        if let Some(pos) = rest.rfind(marker) {
            let tail = &rest[pos + marker.len()..];
            if tail == "weight" || tail == "default.weight" {
                let module = &rest[..pos];
                if module.is_empty() {
                    return None;
                }
                return Some((module.to_string(), is_b));
            }
        }
    }
    None
}

/// A PEFT adapter read from disk.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    /// `module -> (A [r, in], B [out, r])`, on the CPU in the file's dtype.
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
    /// `base_model_name_or_path` of the config, if any.
    pub base_model_name_or_path: Option<String>,
    /// The weights file that was read.
    pub weights_file: PathBuf,
}

/// Reads the LoRA config of `adapter_config.json`.
///
/// Fields read: `peft_type` (must be `LORA` when present), `r` (default 8), `lora_alpha`
/// (default 8), `lora_dropout` (default 0), `target_modules` (list or string), `use_rslora`,
/// `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`. Settings whose weights we could
/// not reproduce are refused: `use_dora`, `fan_in_fan_out`, `bias` other than `none`,
/// `modules_to_save`.
pub fn read_config(path: &Path) -> Result<(LoraConfig, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| AdapterError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| AdapterError::file(path, format!("invalid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| AdapterError::file(path, "not a JSON object"))?;
    let bad =
        |field: &str, msg: String| AdapterError::file(path, format!("field {field:?}: {msg}"));
    let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
    if let Some(t) = get("peft_type") {
        if t.as_str() != Some("LORA") {
            return Err(bad(
                "peft_type",
                format!("{t} is not supported (only LORA adapters)"),
            ));
        }
    }
    let r = match get("r") {
        None => 8,
        Some(x) => x
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", format!("expected a positive integer, got {x}")))?
            as usize,
    };
    let num = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| bad(k, format!("expected a number, got {x}"))),
        }
    };
    let flag = |k: &str| -> Result<bool> {
        match get(k) {
            None => Ok(false),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| bad(k, format!("expected true or false, got {x}"))),
        }
    };
    let alpha = num("lora_alpha", 8.0)?;
    let dropout = num("lora_dropout", 0.0)?;
    let target = match get("target_modules") {
        None => LoraTarget::Modules(vec![]),
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::All,
        Some(Value::String(s)) => LoraTarget::Pattern(s.clone()),
        Some(Value::Array(a)) => LoraTarget::Modules(
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("target_modules", format!("{x} is not a string")))
                })
                .collect::<Result<_>>()?,
        ),
        Some(x) => {
            return Err(bad(
                "target_modules",
                format!("expected a list or a string, got {x}"),
            ))
        }
    };
    if flag("use_dora")? {
        return Err(bad("use_dora", "DoRA adapters are not supported".into()));
    }
    if flag("fan_in_fan_out")? {
        return Err(bad(
            "fan_in_fan_out",
            "transposed (Conv1D) layers are not supported".into(),
        ));
    }
    if let Some(b) = get("bias") {
        if b.as_str() != Some("none") {
            return Err(bad("bias", format!("{b} is not supported (only \"none\")")));
        }
    }
    if let Some(m) = get("modules_to_save") {
        if m.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(bad(
                "modules_to_save",
                format!("{m} is not supported (only null)"),
            ));
        }
    }
    let mut rank_pattern = BTreeMap::new();
    if let Some(p) = get("rank_pattern") {
        let o = p
            .as_object()
            .ok_or_else(|| bad("rank_pattern", format!("expected an object, got {p}")))?;
        for (k, x) in o {
            let r = x.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                bad(
                    "rank_pattern",
                    format!("{k:?}: expected a positive integer, got {x}"),
                )
            })?;
            rank_pattern.insert(k.clone(), r as usize);
        }
    }
    let mut alpha_pattern = BTreeMap::new();
    if let Some(p) = get("alpha_pattern") {
        let o = p
            .as_object()
            .ok_or_else(|| bad("alpha_pattern", format!("expected an object, got {p}")))?;
        for (k, x) in o {
            let a = x.as_f64().ok_or_else(|| {
                bad(
                    "alpha_pattern",
                    format!("{k:?}: expected a number, got {x}"),
                )
            })?;
            alpha_pattern.insert(k.clone(), a);
        }
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target,
        use_rslora: flag("use_rslora")?,
        rank_pattern,
        alpha_pattern,
    };
    config
        .validate()
        .map_err(|e| AdapterError::file(path, e.to_string()))?;
    let base = get("base_model_name_or_path")
        .and_then(|x| x.as_str())
        .map(str::to_string);
    Ok((config, base))
}

/// Reads a PEFT adapter folder: the config and every LoRA matrix, checked for pairs and ranks.
pub fn read_adapter(dir: &Path) -> Result<PeftAdapter> {
    if !dir.is_dir() {
        return Err(AdapterError::Read {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such adapter folder"),
        });
    }
    let (config, base) = read_config(&dir.join(CONFIG_NAME))?;
    let file = first_existing(dir, &[WEIGHTS_NAME, WEIGHTS_NAME_BIN]).ok_or_else(|| {
        AdapterError::file(
            dir,
            format!("no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} in this adapter folder"),
        )
    })?;
    let weights = weights_from_tensors(&file, read_tensors(&file)?, &config)?;
    Ok(PeftAdapter {
        config,
        weights,
        base_model_name_or_path: base,
        weights_file: file,
    })
}

/// Pairs up named LoRA tensors; `path` is for messages.
fn weights_from_tensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    config: &LoraConfig,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let mut a_of: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let mut b_of: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, is_b) = parse_lora_key(&key).ok_or_else(|| {
            AdapterError::tensor(
                path,
                &key,
                "not a LoRA matrix (expected base_model.model.<module>.lora_A.weight or \
                 .lora_B.weight)",
            )
        })?;
        let map = if is_b { &mut b_of } else { &mut a_of };
        if let Some((first, _)) = map.get(&module) {
            return Err(AdapterError::tensor(
                path,
                &key,
                format!("duplicate of {first}"),
            ));
        }
        if t.rank() != 2 {
            return Err(AdapterError::tensor(
                path,
                &key,
                format!("expected 2 dims, got shape {:?}", t.dims()),
            ));
        }
        map.insert(module, (key, t));
    }
    if a_of.is_empty() && b_of.is_empty() {
        return Err(AdapterError::file(path, "holds no LoRA matrices"));
    }
    for m in b_of.keys() {
        if !a_of.contains_key(m) {
            return Err(AdapterError::tensor(
                path,
                &lora_key(m, false),
                "missing (its lora_B is present)",
            ));
        }
    }
    let mut out = BTreeMap::new();
    for (m, (ka, a)) in a_of {
        let Some((kb, b)) = b_of.remove(&m) else {
            return Err(AdapterError::tensor(
                path,
                &lora_key(&m, true),
                "missing (its lora_A is present)",
            ));
        };
        let r = config.rank_for(&m);
        let (ra, rb) = (a.dims()[0], b.dims()[1]);
        if ra != r {
            return Err(AdapterError::tensor(
                path,
                &ka,
                format!(
                    "shape {:?} has rank {ra}, but {CONFIG_NAME} says r = {r}",
                    a.dims()
                ),
            ));
        }
        if rb != r {
            return Err(AdapterError::tensor(
                path,
                &kb,
                format!(
                    "shape {:?} has rank {rb}, but {CONFIG_NAME} says r = {r}",
                    b.dims()
                ),
            ));
        }
        out.insert(m, (a, b));
    }
    Ok(out)
}

/// A number as PEFT writes it: integral values as integers (`"lora_alpha": 32`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` PEFT 0.21 writes for this config; `modules` are the adapted
/// module names (their last components become `target_modules`, as PEFT stores them).
pub fn config_json(
    config: &LoraConfig,
    modules: &[String],
    base_model_name_or_path: &str,
) -> Value {
    let target = match &config.target {
        LoraTarget::Pattern(p) => json!(p),
        _ => {
            let mut leaves: Vec<&str> = modules.iter().map(|m| leaf(m)).collect();
            leaves.sort();
            leaves.dedup();
            json!(leaves)
        }
    };
    let rank_pattern: BTreeMap<&str, Value> = config
        .rank_pattern
        .iter()
        .map(|(k, &r)| (k.as_str(), json!(r)))
        .collect();
    let alpha_pattern: BTreeMap<&str, Value> = config
        .alpha_pattern
        .iter()
        .map(|(k, &a)| (k.as_str(), number(a)))
        .collect();
    // A BTreeMap serializes with sorted keys whatever serde_json's features are, as PEFT's
    // `json.dumps(sort_keys=True)`.
    let fields: BTreeMap<&str, Value> = BTreeMap::from([
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!(alpha_pattern)),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", json!(base_model_name_or_path)),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_alpha", number(config.alpha)),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(config.dropout)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        ("modules_to_save", Value::Null),
        ("monteclora_config", Value::Null),
        ("peft_type", json!("LORA")),
        ("peft_version", json!(PEFT_VERSION)),
        ("qalora_group_size", json!(16)),
        ("r", json!(config.r)),
        ("rank_pattern", json!(rank_pattern)),
        ("revision", Value::Null),
        ("target_modules", target),
        ("target_parameters", Value::Null),
        ("task_type", json!("CAUSAL_LM")),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
        ("use_rslora", json!(config.use_rslora)),
        ("velora_config", Value::Null),
    ]);
    json!(fields)
}

/// Writes a PEFT adapter folder: `weights` keyed by saved PEFT key, the config for `modules`.
/// Both files are written atomically; the weights first.
pub fn write_adapter(
    dir: &Path,
    config: &LoraConfig,
    weights: &[(String, Tensor)],
    modules: &[String],
    base_model_name_or_path: &str,
) -> Result<()> {
    create_dir(dir)?;
    save_safetensors(&dir.join(WEIGHTS_NAME), weights)?;
    let cfg = config_json(config, modules, base_model_name_or_path);
    let mut text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| AdapterError::Invalid(format!("cannot serialize the adapter config: {e}")))?;
    text.push('\n');
    write_atomic(&dir.join(CONFIG_NAME), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let m = "model.layers.0.self_attn.q_proj";
        assert_eq!(
            lora_key(m, false),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(parse_lora_key(&lora_key(m, true)), Some((m.into(), true)));
        assert_eq!(
            parse_lora_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
            ),
            Some((m.into(), true))
        );
        assert_eq!(
            parse_lora_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_lora_key("base_model.model.lm_head.weight"), None);
        assert_eq!(parse_lora_key("base_model.model.x.lora_A.bias"), None);
    }

    #[test]
    fn integral_numbers_are_written_as_integers() {
        assert_eq!(number(32.0).to_string(), "32");
        assert_eq!(number(0.5).to_string(), "0.5");
    }
}
