//! `dataset_info.json`: the registry mapping dataset names to files and columns.
//!
//! ```json
//! { "covid_train": { "file_name": "train.json", "file_sha1": "3cf6...",
//!                    "columns": { "prompt": "instruction", "query": "input",
//!                                 "response": "output", "history": "history" } } }
//! ```
//!
//! * `file_name` is relative to the dataset folder; it may name a folder holding files of
//!   one type.
//! * `file_sha1` is checked against the file's bytes; a mismatch or an absent hash is a
//!   warning (`tracing::warn`), never an error, as in the reference.
//! * Without `columns` the defaults are prompt=`instruction`, query=`input`,
//!   response=`output` and no history. Inside `columns`, an absent or `null` `prompt` or
//!   `response` keeps its default, an absent `query` or `history` means none.

use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};

use crate::error::{DataError, Result};

/// The file name of the registry inside a dataset folder.
pub const DATASET_INFO: &str = "dataset_info.json";

/// Which record fields feed the prompt, query, response and history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Columns {
    /// The instruction (required; rows where it is empty are dropped).
    pub prompt: String,
    /// Appended to the prompt without a separator.
    pub query: Option<String>,
    /// The answer (a string), or `[chosen, rejected]` for preference data.
    pub response: String,
    /// Earlier turns as `[[question, answer], ...]`.
    pub history: Option<String>,
    /// Whether `query` was named in `dataset_info.json` (then it must exist in the data).
    pub query_explicit: bool,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            prompt: "instruction".into(),
            query: Some("input".into()),
            response: "output".into(),
            history: None,
            query_explicit: false,
        }
    }
}

/// One registered dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetEntry {
    /// The name used with `--dataset`.
    pub name: String,
    /// `file_name`, relative to the dataset folder.
    pub file_name: String,
    /// `file_sha1`, lower-case hex, when given.
    pub file_sha1: Option<String>,
    /// The column mapping.
    pub columns: Columns,
}

/// The parsed `dataset_info.json` of a dataset folder.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The dataset folder.
    pub dir: PathBuf,
    /// The `dataset_info.json` path.
    pub path: PathBuf,
    /// Entries in file order.
    pub entries: Vec<DatasetEntry>,
}

/// The outcome of the SHA-1 check of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Sha1Status {
    /// The file's SHA-1 equals `file_sha1`.
    Match,
    /// The file's SHA-1 differs from `file_sha1`.
    Mismatch { expected: String, actual: String },
    /// `dataset_info.json` gives no `file_sha1`.
    Missing,
    /// The dataset is a folder of several files; nothing was checked.
    Folder,
}

impl Sha1Status {
    /// Whether the check passed.
    pub fn is_match(&self) -> bool {
        matches!(self, Sha1Status::Match)
    }
}

impl std::fmt::Display for Sha1Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sha1Status::Match => f.write_str("SHA-1 ok"),
            Sha1Status::Mismatch { expected, actual } => {
                write!(f, "SHA-1 MISMATCH (expected {expected}, file has {actual})")
            }
            Sha1Status::Missing => f.write_str("no SHA-1 in dataset_info.json"),
            Sha1Status::Folder => f.write_str("folder: SHA-1 not checked"),
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Describes a JSON value's type for messages ("a string", "a list", ...).
pub(crate) fn describe(v: &serde_json::Value) -> &'static str {
    json_type(v)
}

/// Strips serde_json's " at line L column C" suffix (we report line and column ourselves).
pub(crate) fn serde_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl Registry {
    /// Reads `<dir>/dataset_info.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Registry> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(DATASET_INFO);
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::InfoRead {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, dir, path)
    }

    /// Parses the text of a `dataset_info.json` (`path` is used in messages).
    pub fn parse(text: &str, dir: PathBuf, path: PathBuf) -> Result<Registry> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| DataError::InfoJson {
                path: path.clone(),
                line: e.line(),
                column: e.column(),
                msg: serde_msg(&e),
            })?;
        let obj = match value {
            serde_json::Value::Object(o) => o,
            other => {
                return Err(DataError::InfoJson {
                    path,
                    line: 1,
                    column: 1,
                    msg: format!(
                        "expected an object mapping dataset names to entries, found {}",
                        json_type(&other)
                    ),
                })
            }
        };
        let mut entries = Vec::with_capacity(obj.len());
        for (name, v) in obj {
            entries.push(parse_entry(&path, name, v)?);
        }
        Ok(Registry { dir, path, entries })
    }

    /// The registered names in file order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Looks a dataset up; the error lists the known names.
    pub fn get(&self, name: &str) -> Result<&DatasetEntry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| DataError::UnknownDataset {
                name: name.to_string(),
                path: self.path.clone(),
                known: if self.entries.is_empty() {
                    "no datasets".to_string()
                } else {
                    self.names().join(", ")
                },
            })
    }

    /// The path of a dataset's file or folder (checked to exist).
    pub fn data_path(&self, entry: &DatasetEntry) -> Result<PathBuf> {
        let p = self.dir.join(&entry.file_name);
        if p.exists() {
            Ok(p)
        } else {
            Err(DataError::MissingFile {
                dataset: entry.name.clone(),
                path: p,
                file_name: entry.file_name.clone(),
                info: self.path.clone(),
            })
        }
    }
}

fn parse_entry(path: &Path, name: String, v: serde_json::Value) -> Result<DatasetEntry> {
    let bad = |msg: String| DataError::InfoEntry {
        path: path.to_path_buf(),
        dataset: name.clone(),
        msg,
    };
    let obj = match v {
        serde_json::Value::Object(o) => o,
        other => {
            return Err(bad(format!(
                "expected an object with `file_name`, found {}",
                json_type(&other)
            )))
        }
    };
    let file_name = match obj.get("file_name") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => {
            return Err(bad(format!(
                "`file_name` must be a non-empty string, found {}",
                if other.is_string() {
                    "an empty string"
                } else {
                    json_type(other)
                }
            )))
        }
        None => {
            let remote = ["hf_hub_url", "script_url", "ms_hub_url"]
                .iter()
                .find(|k| obj.contains_key(**k));
            return Err(bad(match remote {
                Some(k) => format!(
                    "`{k}` datasets are not supported: llmtune reads local files only; \
                     download the data and give its `file_name`"
                ),
                None => "no `file_name`".to_string(),
            }));
        }
    };
    let file_sha1 = match obj.get("file_sha1") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.trim().to_ascii_lowercase()),
        Some(other) => {
            return Err(bad(format!(
                "`file_sha1` must be a hex string, found {}",
                json_type(other)
            )))
        }
    };
    let mut columns = Columns::default();
    match obj.get("columns") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(c)) => {
            let col = |key: &str| -> Result<Option<String>> {
                match c.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                    Some(serde_json::Value::String(_)) => Ok(None),
                    Some(other) => Err(bad(format!(
                        "`columns.{key}` must be a field name (a string), found {}",
                        json_type(other)
                    ))),
                }
            };
            if let Some(p) = col("prompt")? {
                columns.prompt = p;
            }
            columns.query = col("query")?;
            columns.query_explicit = columns.query.is_some();
            if let Some(r) = col("response")? {
                columns.response = r;
            }
            columns.history = col("history")?;
            for k in c.keys() {
                if !["prompt", "query", "response", "history"].contains(&k.as_str()) {
                    tracing::warn!(
                        "{}: dataset `{}`: unknown key `columns.{}` ignored (known: prompt, query, response, history)",
                        path.display(),
                        name,
                        k
                    );
                }
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "`columns` must be an object, found {}",
                json_type(other)
            )))
        }
    }
    Ok(DatasetEntry {
        name,
        file_name,
        file_sha1,
        columns,
    })
}

/// The SHA-1 of some bytes as lower-case hex.
pub fn sha1_hex(bytes: &[u8]) -> String {
    let digest = Sha1::digest(bytes);
    hex(&digest)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Checks a dataset's SHA-1 (of its only file) and logs a warning unless it matches.
pub fn check_sha1(entry: &DatasetEntry, files: &[(PathBuf, Vec<u8>)]) -> Sha1Status {
    let status = match (&entry.file_sha1, files) {
        (_, many) if many.len() != 1 => Sha1Status::Folder,
        (None, _) => Sha1Status::Missing,
        (Some(expected), [(_, bytes)]) => {
            let actual = sha1_hex(bytes);
            if &actual == expected {
                Sha1Status::Match
            } else {
                Sha1Status::Mismatch {
                    expected: expected.clone(),
                    actual,
                }
            }
        }
        _ => Sha1Status::Folder,
    };
    match &status {
        Sha1Status::Match => {}
        Sha1Status::Missing => tracing::warn!(
            "dataset `{}`: no `file_sha1` in dataset_info.json; the file is not checked",
            entry.name
        ),
        Sha1Status::Folder => tracing::warn!(
            "dataset `{}`: `{}` is a folder of {} files; SHA-1 not checked",
            entry.name,
            entry.file_name,
            files.len()
        ),
        Sha1Status::Mismatch { expected, actual } => tracing::warn!(
            "dataset `{}`: checksum failed for {}: dataset_info.json says {}, the file's SHA-1 is {}",
            entry.name,
            entry.file_name,
            expected,
            actual
        ),
    }
    status
}
