//! `--finetuning_type freeze` and `full`: base tensors made trainable.
//!
//! The chosen parameters are replaced, in the model, by candle [`Var`]s holding the same
//! values (in the model's dtype), and returned by HF name for the optimizer. As the reference
//! does, only the trained tensors are saved ([`save_params`]); [`load_params`] puts them back
//! into a model.

use std::path::Path;

use candle_core::{DType, Var};

use crate::io::{first_existing, read_tensors, save_safetensors};
use crate::{AdapterError, Backbone, Result};

/// The file [`save_params`] is meant to write in an output folder (the reference writes the
/// trained tensors to `pytorch_model.bin`; with every tensor and `config.json` beside it, the
/// folder of a `full` run is a loadable model).
pub const PARAMS_NAME: &str = "model.safetensors";

/// `--name_module_trainable`: which part of each trainable layer `freeze` tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleGroup {
    /// The MLP (`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`).
    Mlp,
    /// The query/key/value projections, with their biases (`self_attn.{q,k,v}_proj`;
    /// ChatGLM's fused `query_key_value`).
    Qkv,
}

impl ModuleGroup {
    /// Parses `mlp` or `qkv`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "mlp" => Ok(Self::Mlp),
            "qkv" => Ok(Self::Qkv),
            other => Err(AdapterError::Invalid(format!(
                "--name_module_trainable {other:?}: expected mlp or qkv"
            ))),
        }
    }

    fn matches(self, param: &str) -> bool {
        match self {
            Self::Mlp => param.contains(".mlp."),
            Self::Qkv => [".q_proj.", ".k_proj.", ".v_proj.", ".query_key_value."]
                .iter()
                .any(|m| param.contains(m)),
        }
    }
}

/// The index of the decoder layer a parameter belongs to (`...layers.<i>.` in its name).
fn layer_of(param: &str) -> Option<usize> {
    let pos = param.find("layers.")?;
    let rest = &param[pos + "layers.".len()..];
    let end = rest.find('.')?;
    rest[..end].parse().ok()
}

/// Makes `tensor` a variable in place (a copy with the same values) and returns it.
fn make_var(tensor: &mut candle_core::Tensor) -> Result<Var> {
    let v = Var::from_tensor(&tensor.detach())?;
    *tensor = v.as_tensor().clone();
    Ok(v)
}

/// `--finetuning_type freeze`: makes the `group` parameters of the last `num_layer_trainable`
/// decoder layers trainable. Returns them by HF name, sorted.
pub fn freeze<M: Backbone + ?Sized>(
    model: &mut M,
    num_layer_trainable: usize,
    group: ModuleGroup,
) -> Result<Vec<(String, Var)>> {
    let n = model.num_layers();
    if num_layer_trainable == 0 || num_layer_trainable > n {
        return Err(AdapterError::Invalid(format!(
            "--num_layer_trainable must be between 1 and the model's {n} layers, got \
             {num_layer_trainable}"
        )));
    }
    let first = n - num_layer_trainable;
    let mut out = Vec::new();
    for (name, t) in model.params_mut() {
        let in_range = layer_of(&name).is_some_and(|i| i >= first && i < n);
        if in_range && group.matches(&name) {
            out.push((name, make_var(t)?));
        }
    }
    if out.is_empty() {
        return Err(AdapterError::Invalid(format!(
            "--name_module_trainable {group:?} selects no parameter of the last \
             {num_layer_trainable} layers"
        )));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `--finetuning_type full`: makes every parameter trainable. Returns them by HF name, sorted.
/// (Tied embeddings are one parameter, `model.embed_tokens.weight`.)
pub fn full<M: Backbone + ?Sized>(model: &mut M) -> Result<Vec<(String, Var)>> {
    let mut out = Vec::new();
    for (name, t) in model.params_mut() {
        out.push((name, make_var(t)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Saves named parameters to a safetensors file (atomically), in f32 unless they are f64.
pub fn save_params(path: &Path, params: &[(String, Var)]) -> Result<()> {
    let mut tensors = Vec::with_capacity(params.len());
    for (k, v) in params {
        let t = v.as_tensor();
        let t = if t.dtype() == DType::F64 {
            t.clone()
        } else {
            t.to_dtype(DType::F32)?
        };
        tensors.push((k.clone(), t));
    }
    save_safetensors(path, &tensors)
}

/// Loads parameters saved by [`save_params`] (or a `.bin` of HF-named tensors) into `model`:
/// `path` is a file, or a folder holding `model.safetensors` or `pytorch_model.bin`. Every
/// tensor must name a parameter of the model with the same shape; variables are updated in
/// place (an optimizer keeps them). Returns the names loaded, sorted.
pub fn load_params<M: Backbone + ?Sized>(model: &mut M, path: &Path) -> Result<Vec<String>> {
    let file = if path.is_dir() {
        first_existing(path, &[PARAMS_NAME, "pytorch_model.bin"]).ok_or_else(|| {
            AdapterError::file(
                path,
                format!("no {PARAMS_NAME} or pytorch_model.bin in this folder"),
            )
        })?
    } else {
        path.to_path_buf()
    };
    let tensors = read_tensors(&file)?;
    let mut params = model.params_mut();
    // Check everything first, then write.
    for (k, t) in &tensors {
        let Some((_, p)) = params.iter().find(|(n, _)| n == k) else {
            return Err(AdapterError::tensor(
                &file,
                k,
                "the model has no parameter of that name",
            ));
        };
        if t.dims() != p.dims() {
            return Err(AdapterError::tensor(
                &file,
                k,
                format!("shape {:?}, the model's is {:?}", t.dims(), p.dims()),
            ));
        }
    }
    let mut names = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        if let Some((_, p)) = params.iter_mut().find(|(n, _)| *n == k) {
            let v = t.to_dtype(p.dtype())?.to_device(p.device())?;
            if p.is_variable() {
                Var::from_tensor(p)?.set(&v)?;
            } else {
                **p = v;
            }
            names.push(k);
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_and_group_matching() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.norm.weight"), None);
        assert!(ModuleGroup::Mlp.matches("model.layers.1.mlp.up_proj.weight"));
        assert!(!ModuleGroup::Mlp.matches("model.layers.1.self_attn.q_proj.weight"));
        assert!(ModuleGroup::Qkv.matches("model.layers.1.self_attn.q_proj.bias"));
        assert!(!ModuleGroup::Qkv.matches("model.layers.1.self_attn.o_proj.weight"));
        assert!(ModuleGroup::Qkv.matches("transformer.layers.0.attention.query_key_value.weight"));
        assert_eq!(
            ModuleGroup::parse("attn").unwrap_err().to_string(),
            "--name_module_trainable \"attn\": expected mlp or qkv"
        );
    }
}
