//! Weight loaders: safetensors (single or sharded with an index), PyTorch `.bin` (zip
//! pickle, single or sharded), GGUF (dequantized), and in-memory maps.
//!
//! Every source hands out tensors one at a time by HF name, converted to the requested dtype
//! as they are read, so loading a model never needs twice its size in memory. Errors name the
//! file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// Something that holds named tensors (a checkpoint on disk or a map in memory).
pub trait WeightSource {
    /// Every tensor name available.
    fn names(&self) -> Vec<String>;
    /// Reads one tensor converted to `dtype` on `device`; `Ok(None)` if it is absent.
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>>;
    /// The file or folder the tensors come from (for messages).
    fn location(&self) -> &Path;

    /// Reads a tensor that must exist with the given shape.
    fn require(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self
            .get(name, dtype, device)?
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.location().to_path_buf(),
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.location().to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}

/// Tensors already in memory (tests, merged adapters, GGUF after dequantization).
pub struct MapSource {
    pub tensors: HashMap<String, Tensor>,
    pub location: PathBuf,
}

impl MapSource {
    pub fn new(tensors: HashMap<String, Tensor>, location: impl Into<PathBuf>) -> Self {
        Self {
            tensors,
            location: location.into(),
        }
    }
}

impl WeightSource for MapSource {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        match self.tensors.get(name) {
            None => Ok(None),
            Some(t) => Ok(Some(t.to_dtype(dtype)?.to_device(device)?)),
        }
    }
    fn location(&self) -> &Path {
        &self.location
    }
}

/// Random weights drawn on demand, for benchmarks: every matrix ~ N(0, `std`^2) (transformers'
/// `initializer_range`, 0.02 by default), norm weights one, biases zero. Drawn directly on the
/// target device, so an 8B model never passes through host memory.
pub struct RandomSource {
    pub std: f64,
    /// `[vocab, hidden]`, for the untied `lm_head.weight` (asked for without a shape).
    lm_head: [usize; 2],
    location: PathBuf,
}

impl RandomSource {
    pub fn new(cfg: &crate::LlamaConfig, std: f64) -> Self {
        Self {
            std,
            lm_head: [cfg.vocab_size, cfg.hidden_size],
            location: PathBuf::from("<random weights>"),
        }
    }

    fn draw(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, dtype, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, self.std as f32, shape, device)?.to_dtype(dtype)?
        };
        Ok(t)
    }
}

impl WeightSource for RandomSource {
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Only `lm_head.weight` is asked for without a shape.
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        if name == "lm_head.weight" {
            return Ok(Some(self.draw(name, &self.lm_head, dtype, device)?));
        }
        Ok(None)
    }
    fn location(&self) -> &Path {
        &self.location
    }
    fn require(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.draw(name, shape, dtype, device)
    }
}

/// Memory-mapped safetensors file(s).
pub struct SafetensorsSource {
    st: candle_core::safetensors::MmapedSafetensors,
    /// name -> file, for messages.
    files: HashMap<String, PathBuf>,
    location: PathBuf,
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        msg: format!("invalid index JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Weights {
            path: path.to_path_buf(),
            msg: "no \"weight_map\" object".into(),
        })?;
    let mut out = BTreeMap::new();
    for (k, f) in map {
        let f = f.as_str().ok_or_else(|| ModelError::Weights {
            path: path.to_path_buf(),
            msg: format!("weight_map[{k:?}] is not a file name"),
        })?;
        out.insert(k.clone(), f.to_string());
    }
    Ok(out)
}

fn shard_files(dir: &Path, index: &BTreeMap<String, String>) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = index.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    files
}

impl SafetensorsSource {
    /// Opens one `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(&[path.to_path_buf()], path)
    }

    /// Opens a folder holding `model.safetensors` or `model.safetensors.index.json` + shards.
    pub fn open_dir(dir: &Path) -> Result<Option<Self>> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_file(&single).map(Some);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let map = read_index(&index)?;
            let files = shard_files(dir, &map);
            return Self::open_files(&files, &index).map(Some);
        }
        Ok(None)
    }

    fn open_files(files: &[PathBuf], location: &Path) -> Result<Self> {
        for f in files {
            check_exists(f)?;
        }
        // Headers first: our own checks give clearer messages than the mmap reader.
        let mut names = HashMap::new();
        for f in files {
            for k in safetensors_names(f)? {
                names.insert(k, f.clone());
            }
        }
        // SAFETY: the files are opened read-only; as with any mmap, modifying them while we
        // read is undefined, which is the documented contract of memmap2.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(|e| {
                ModelError::Weights {
                    path: location.to_path_buf(),
                    msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                }
            })?;
        Ok(Self {
            st,
            files: names,
            location: location.to_path_buf(),
        })
    }
}

/// Reads only the JSON header of a safetensors file and returns its tensor names.
fn safetensors_names(f: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let bad = |msg: String| ModelError::Weights {
        path: f.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(f).map_err(|e| ModelError::io(f, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad("file is shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(bad(format!(
            "header length {n} is not plausible (corrupt file?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|_| bad("file ends inside the safetensors header (truncated?)".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("safetensors header is not a JSON object".into()))?;
    Ok(obj
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect())
}

fn check_exists(f: &Path) -> Result<()> {
    if !f.exists() {
        return Err(ModelError::io(
            f,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    Ok(())
}

impl WeightSource for SafetensorsSource {
    fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let Some(file) = self.files.get(name) else {
            return Ok(None);
        };
        let t = self
            .st
            .load(name, &Device::Cpu)
            .map_err(|e| ModelError::Weights {
                path: file.clone(),
                msg: format!("cannot read tensor {name}: {e}"),
            })?;
        Ok(Some(t.to_dtype(dtype)?.to_device(device)?))
    }
    fn location(&self) -> &Path {
        &self.location
    }
}

/// PyTorch pickle checkpoints (`pytorch_model.bin` or shards with
/// `pytorch_model.bin.index.json`), read through candle's zip-pickle reader.
pub struct PthSource {
    shards: Vec<(PathBuf, candle_core::pickle::PthTensors)>,
    routing: HashMap<String, usize>,
    location: PathBuf,
}

impl PthSource {
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(&[path.to_path_buf()], path)
    }

    /// Opens a folder holding `pytorch_model.bin` or an index + shards.
    pub fn open_dir(dir: &Path) -> Result<Option<Self>> {
        let single = dir.join("pytorch_model.bin");
        if single.exists() {
            return Self::open_file(&single).map(Some);
        }
        let index = dir.join("pytorch_model.bin.index.json");
        if index.exists() {
            let map = read_index(&index)?;
            let mut src = Self::open_files(&shard_files(dir, &map), &index)?;
            src.check_index(dir, &map)?;
            return Ok(Some(src));
        }
        Ok(None)
    }

    /// Checks that every tensor of the index is in the shard the index names, and routes it
    /// there (a name held by several shards is read from the one the index names).
    fn check_index(&mut self, dir: &Path, map: &BTreeMap<String, String>) -> Result<()> {
        for (name, file) in map {
            let path = dir.join(file);
            let Some(i) = self.shards.iter().position(|(f, _)| *f == path) else {
                continue; // open_files opened every file of the index
            };
            if !self.shards[i].1.tensor_infos().contains_key(name) {
                return Err(ModelError::Weights {
                    path: self.location.clone(),
                    msg: format!(
                        "the index puts tensor {name} in {file}, but that file does not hold it"
                    ),
                });
            }
            self.routing.insert(name.clone(), i);
        }
        Ok(())
    }

    fn open_files(files: &[PathBuf], location: &Path) -> Result<Self> {
        let mut shards = Vec::new();
        let mut routing = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            check_exists(f)?;
            let p =
                candle_core::pickle::PthTensors::new(f, None).map_err(|e| ModelError::Weights {
                    path: f.clone(),
                    msg: format!("not a readable PyTorch checkpoint (truncated or corrupt?): {e}"),
                })?;
            for k in p.tensor_infos().keys() {
                routing.insert(k.clone(), i);
            }
            shards.push((f.clone(), p));
        }
        Ok(Self {
            shards,
            routing,
            location: location.to_path_buf(),
        })
    }
}

impl WeightSource for PthSource {
    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let Some(&i) = self.routing.get(name) else {
            return Ok(None);
        };
        let (file, p) = &self.shards[i];
        let t = p
            .get(name)
            .map_err(|e| ModelError::Weights {
                path: file.clone(),
                msg: format!("cannot read tensor {name}: {e}"),
            })?
            .ok_or_else(|| ModelError::MissingTensor {
                path: file.clone(),
                name: name.to_string(),
            })?;
        Ok(Some(t.to_dtype(dtype)?.to_device(device)?))
    }
    fn location(&self) -> &Path {
        &self.location
    }
}

/// Opens whatever weights a HF model folder holds (safetensors preferred, then `.bin`).
pub fn open_dir(dir: &Path) -> Result<Box<dyn WeightSource>> {
    if let Some(s) = SafetensorsSource::open_dir(dir)? {
        return Ok(Box::new(s));
    }
    if let Some(s) = PthSource::open_dir(dir)? {
        return Ok(Box::new(s));
    }
    Err(ModelError::Weights {
        path: dir.to_path_buf(),
        msg: "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or \
              pytorch_model.bin.index.json in this folder"
            .into(),
    })
}
