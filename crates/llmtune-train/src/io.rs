//! Crash-safe file writing and Python-compatible JSON.
//!
//! Every file the trainer writes goes through [`atomic_write`]: the bytes go
//! to a temporary sibling (`<file>.tmp-<pid>-<seq>`), are fsynced, and the
//! temporary is renamed over the target. A reader (or a resumed run) sees
//! either the old file or the new one, never a partial one, whatever moment
//! the writer is killed at. [`cleanup_stale_tmp`] removes temporaries that a
//! killed process left behind.
//!
//! JSON is written the way Python's `json.dumps` writes it (float `repr`,
//! `ensure_ascii`, `", "`/`": "` separators or `indent`), so the files are
//! byte-for-byte what the reference (HF Trainer, LLaMA-Factory) writes for the
//! same values.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The marker between a file name and the writer's pid in temporary names.
pub const TMP_MARKER: &str = ".tmp-";

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary sibling of `path`: `<name>.tmp-<pid>-<seq>` in the same
/// directory (so the final rename never crosses filesystems).
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{name}{TMP_MARKER}{}-{seq}", std::process::id()))
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fsync a directory so a rename inside it is durable. Best effort: some
/// platforms cannot open directories for syncing.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Create `dir` and its parents.
pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))
}

/// Write `bytes` to a new file at `path` and fsync it (no rename; used
/// inside a checkpoint's temporary directory, which is itself renamed).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", path, e))
}

/// Atomically replace `path` with `bytes`: write `<path>.tmp-<pid>-<seq>` in
/// the same directory, fsync it, rename it over `path`, fsync the directory.
/// The parent directory must exist. On error the temporary is removed and
/// `path` is untouched.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    let result = write_synced(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&parent_dir(path));
    Ok(())
}

/// Write `value` as JSON with sorted keys and an indent of 2, plus a final
/// newline, atomically — Python's `json.dumps(v, indent=2, sort_keys=True) +
/// "\n"`, the format of `finetuning_args.json` and `trainer_state.json`.
pub fn write_json_sorted<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let value = serde_json::to_value(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let mut text = to_python_json(&value, Some(2), true);
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// Read and deserialize a JSON file; errors name the file (and line/column).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Remove temporaries (`*.tmp-<pid>...`, files or directories) that a killed
/// writer left in `dir`. Entries whose pid is a live process other than this
/// one are kept (another process may be writing them). Returns what was
/// removed. A missing `dir` is not an error.
pub fn cleanup_stale_tmp(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = tmp_writer_pid(&name) else {
            continue;
        };
        if pid != me && process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let res = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        res.map_err(|e| Error::io("remove stale temporary", &path, e))?;
        tracing::warn!("removed stale temporary {}", path.display());
        removed.push(path);
    }
    Ok(removed)
}

/// The writer pid encoded in a temporary name, if `name` is one.
pub(crate) fn tmp_writer_pid(name: &str) -> Option<u32> {
    let at = name.find(TMP_MARKER)?;
    let digits: String = name[at + TMP_MARKER.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Python's `repr(float)`: the shortest string that round-trips, in fixed
/// notation for exponents -4..=15 (with `.0` for integral values) and
/// scientific otherwise (`1e-05`, `1.5e+16`); `NaN`, `Infinity`, `-Infinity`
/// as Python's `json` module writes them.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp < 0 {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else if exp + 1 >= n {
            let zeros = "0".repeat((exp + 1 - n) as usize);
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Python's `round(x, ndigits)` for floats: the double nearest to `x`
/// correctly rounded to `ndigits` decimals (ties to even on the exact binary
/// value).
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// Serialize `value` as Python's `json.dumps(value, indent=indent,
/// sort_keys=sort_keys)` does (with the default `ensure_ascii=True`).
pub fn to_python_json(value: &Value, indent: Option<usize>, sort_keys: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, value, indent, sort_keys, 0);
    out
}

fn write_value(out: &mut String, v: &Value, indent: Option<usize>, sort: bool, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                out.push_str(&py_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => push_py_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                push_separator(out, i == 0, indent, level + 1);
                write_value(out, item, indent, sort, level + 1);
            }
            push_close(out, indent, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                push_separator(out, i == 0, indent, level + 1);
                push_py_string(out, k);
                out.push_str(": ");
                write_value(out, item, indent, sort, level + 1);
            }
            push_close(out, indent, level);
            out.push('}');
        }
    }
}

fn push_separator(out: &mut String, first: bool, indent: Option<usize>, level: usize) {
    match indent {
        Some(width) => {
            if !first {
                out.push(',');
            }
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
        None => {
            if !first {
                out.push_str(", ");
            }
        }
    }
}

fn push_close(out: &mut String, indent: Option<usize>, level: usize) {
    if let Some(width) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * level));
    }
}

/// A JSON string literal escaped as Python's `json` with `ensure_ascii=True`.
pub(crate) fn push_py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3 `repr` outputs.
        let cases = [
            (5e-5, "5e-05"),
            (1e-4, "0.0001"),
            (0.0001234, "0.0001234"),
            (1.5e-7, "1.5e-07"),
            (-1.5e-7, "-1.5e-07"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (123.0, "123.0"),
            (2.345, "2.345"),
            (16.666666666666664, "16.666666666666664"),
            (1e22, "1e+22"),
            (4.9e-5, "4.9e-05"),
            (0.1, "0.1"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "repr of {x:e}");
        }
        assert_eq!(py_float_repr(f64::NAN), "NaN");
        assert_eq!(py_float_repr(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn round_matches_python() {
        // Python: round(0.125, 2) == 0.12, round(0.375, 2) == 0.38,
        // round(1.005, 2) == 1.0 (1.005 is below the tie in binary).
        assert_eq!(py_round(0.125, 2), 0.12);
        assert_eq!(py_round(0.375, 2), 0.38);
        assert_eq!(py_round(1.005, 2), 1.0);
        assert_eq!(py_round(100.0 / 3.0, 2), 33.33);
    }

    #[test]
    fn python_json_layout() {
        let v = json!({"b": [1, 2.5, {}], "a": "é\n\"x\"", "c": [], "d": {"z": null, "y": true}});
        // json.dumps(v, indent=2, sort_keys=True)
        let want = "{\n  \"a\": \"\\u00e9\\n\\\"x\\\"\",\n  \"b\": [\n    1,\n    2.5,\n    {}\n  ],\n  \"c\": [],\n  \"d\": {\n    \"y\": true,\n    \"z\": null\n  }\n}";
        assert_eq!(to_python_json(&v, Some(2), true), want);
        // json.dumps(v, sort_keys=True)
        let want_flat = "{\"a\": \"\\u00e9\\n\\\"x\\\"\", \"b\": [1, 2.5, {}], \"c\": [], \"d\": {\"y\": true, \"z\": null}}";
        assert_eq!(to_python_json(&v, None, true), want_flat);
        // Astral characters become surrogate pairs, as Python writes them.
        assert_eq!(
            to_python_json(&json!("😀"), None, false),
            "\"\\ud83d\\ude00\""
        );
    }

    #[test]
    fn tmp_names_carry_the_pid() {
        let p = tmp_sibling(Path::new("/x/trainer_state.json"));
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("trainer_state.json.tmp-"), "{name}");
        assert_eq!(tmp_writer_pid(&name), Some(std::process::id()));
        assert_eq!(tmp_writer_pid("checkpoint-10"), None);
        assert_eq!(tmp_writer_pid("checkpoint-10.tmp-77"), Some(77));
    }
}
