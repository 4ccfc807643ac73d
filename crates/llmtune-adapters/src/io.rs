//! Atomic file writes and tensor files (safetensors in and out, PyTorch `.bin` in).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{AdapterError, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then renamed over `path`. A crash leaves either the old file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let werr = |p: &Path, source: std::io::Error| AdapterError::Write {
        path: p.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| werr(&tmp, e))?;
        f.write_all(bytes).map_err(|e| werr(&tmp, e))?;
        f.sync_all().map_err(|e| werr(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| werr(path, e))?;
        // Persist the rename itself (best effort: not every platform can open a folder).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and parents) if needed.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::Write {
        path: dir.to_path_buf(),
        source: e,
    })
}

/// Serializes named tensors to safetensors (with `{"format": "pt"}` metadata, as
/// `safetensors.torch.save_file` writes) and writes the file atomically. Tensors are copied
/// to the CPU first.
/// Writes tensors (HF names) to a `.safetensors` file atomically, with `format: pt` metadata.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        cpu.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| AdapterError::file(path, format!("cannot serialize tensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a `.safetensors` or PyTorch `.bin` file (by extension), on the CPU.
/// Names are returned sorted.
pub(crate) fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(AdapterError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let is_bin = path
        .extension()
        .map(|e| e == "bin" || e == "pt" || e == "pth")
        .unwrap_or(false);
    let mut out: Vec<(String, Tensor)> = if is_bin {
        candle_core::pickle::read_all(path).map_err(|e| {
            AdapterError::file(
                path,
                format!("not a readable PyTorch checkpoint (truncated or corrupt?): {e}"),
            )
        })?
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| {
                AdapterError::file(
                    path,
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?
            .into_iter()
            .collect()
    };
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The first of `names` that exists in `dir`.
pub(crate) fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}
