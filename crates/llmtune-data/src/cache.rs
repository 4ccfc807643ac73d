//! The encoded-dataset cache.
//!
//! The key is the SHA-256 of: a format version, every requested dataset's name, file name
//! and column mapping, the bytes of its data files, the tokenizer's identity (the SHA-256
//! of its serialized `tokenizer.json` pipeline plus its bos/eos/pad/stop ids), the template
//! name, the encoding mode and every encoding argument (`max_source_length`,
//! `max_target_length`, `max_samples`, `source_prefix`). Any change gives a new file; stale
//! files are simply never read again.
//!
//! Files live in `cache_dir` when given, else `$LLMTUNE_HOME/cache`, else
//! `<dataset_dir>/.llmtune_cache/`. They are written atomically (a temporary file in the same
//! folder, then a rename), so a crash never leaves a half-written cache behind.
//! `overwrite_cache` rebuilds and rewrites. A cache that cannot be read is rebuilt with a
//! warning; one that cannot be written only gives a warning.
//!
//! Format (little-endian): the magic `LLMTUNE-DATA\n`, a `u32` version, a `u64` length and
//! a JSON [`CacheHeader`], a `u64` example count, then per example a tag byte and its
//! vectors (`u64` length + elements), and the trailer `END!`.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use llmtune_tokenize::Tokenizer;

use crate::args::{DataArgs, EncodeMode};
use crate::encode::{EncodeStats, Example, PairExample, PromptExample, SupervisedExample};
use crate::error::{DataError, Result};
use crate::formats::{DatasetFiles, DatasetSummary};
use crate::registry::hex;

const MAGIC: &[u8] = b"LLMTUNE-DATA\n";
const TRAILER: &[u8] = b"END!";
/// Bump when the encoding or the file layout changes.
pub const CACHE_VERSION: u32 = 1;

/// The JSON header of a cache file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheHeader {
    /// The full hex key (checked on read).
    pub key: String,
    /// The encoding mode.
    pub mode: EncodeMode,
    /// Dataset counts of the run that wrote it.
    pub datasets: Vec<DatasetSummary>,
    /// Encoding statistics of that run.
    pub stats: EncodeStats,
}

/// A cache entry: header plus examples.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    /// The header.
    pub header: CacheHeader,
    /// The examples.
    pub examples: Vec<Example>,
}

/// A hash of the tokenizer's pipeline and special ids.
pub fn tokenizer_fingerprint(tokenizer: &Tokenizer) -> String {
    let mut h = Sha256::new();
    match tokenizer.fingerprint_text() {
        Ok(json) => h.update(json.as_bytes()),
        Err(_) => {
            // Fall back to where it came from and its vocabulary.
            h.update(tokenizer.source().to_string_lossy().as_bytes());
            let mut vocab: Vec<(String, u32)> = tokenizer.vocab().into_iter().collect();
            vocab.sort();
            for (t, id) in vocab {
                h.update(t.as_bytes());
                h.update(id.to_le_bytes());
            }
        }
    }
    let sp = tokenizer.specials();
    h.update(format!("{:?}|{:?}|{:?}|{:?}", sp.bos, sp.eos, sp.pad, sp.stop).as_bytes());
    hex(&h.finalize())
}

fn put(h: &mut Sha256, label: &str, bytes: &[u8]) {
    h.update((label.len() as u64).to_le_bytes());
    h.update(label.as_bytes());
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The cache key of a run.
pub fn cache_key(
    args: &DataArgs,
    files: &[DatasetFiles],
    tokenizer_fingerprint: &str,
    mode: EncodeMode,
) -> String {
    let mut h = Sha256::new();
    put(&mut h, "version", &CACHE_VERSION.to_le_bytes());
    for ds in files {
        put(&mut h, "dataset", ds.entry.name.as_bytes());
        put(&mut h, "file_name", ds.entry.file_name.as_bytes());
        let cols = serde_json::to_string(&ds.entry.columns).unwrap_or_default();
        put(&mut h, "columns", cols.as_bytes());
        for (p, bytes) in &ds.files {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            put(&mut h, "file", name.as_bytes());
            put(&mut h, "bytes", bytes);
        }
    }
    put(&mut h, "tokenizer", tokenizer_fingerprint.as_bytes());
    put(&mut h, "template", args.template.as_bytes());
    put(&mut h, "mode", format!("{mode:?}").as_bytes());
    put(
        &mut h,
        "max_source_length",
        &(args.max_source_length as u64).to_le_bytes(),
    );
    put(
        &mut h,
        "max_target_length",
        &(args.max_target_length as u64).to_le_bytes(),
    );
    put(
        &mut h,
        "max_samples",
        format!("{:?}", args.max_samples).as_bytes(),
    );
    put(
        &mut h,
        "source_prefix",
        format!("{:?}", args.source_prefix).as_bytes(),
    );
    hex(&h.finalize())
}

/// The cache folder for `args`.
pub fn cache_dir(args: &DataArgs) -> PathBuf {
    if let Some(d) = &args.cache_dir {
        return d.clone();
    }
    match std::env::var_os("LLMTUNE_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("cache"),
        _ => args.dataset_dir.join(".llmtune_cache"),
    }
}

/// The cache file for a key.
pub fn cache_file(args: &DataArgs, key: &str, mode: EncodeMode) -> PathBuf {
    let mut names: String = args
        .dataset
        .join("+")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '+' {
                c
            } else {
                '_'
            }
        })
        .collect();
    names.truncate(60);
    let mode = match mode {
        EncodeMode::Supervised => "sft",
        EncodeMode::Prompt => "prompt",
        EncodeMode::Pairwise => "pair",
    };
    cache_dir(args).join(format!("{names}-{mode}-{}.bin", &key[..key.len().min(24)]))
}

// ---- writing ----

fn w_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

fn w_u32s(out: &mut Vec<u8>, v: &[u32]) {
    w_u64(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn w_i64s(out: &mut Vec<u8>, v: &[i64]) {
    w_u64(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn w_opt(out: &mut Vec<u8>, x: Option<usize>) {
    w_u64(out, x.map(|v| v as u64).unwrap_or(u64::MAX));
}

/// Serializes an entry.
pub fn to_bytes(entry: &CacheEntry) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(&entry.header).map_err(|e| DataError::Cache {
        path: PathBuf::new(),
        msg: e.to_string(),
    })?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    w_u64(&mut out, header.len() as u64);
    out.extend_from_slice(&header);
    w_u64(&mut out, entry.examples.len() as u64);
    for e in &entry.examples {
        match e {
            Example::Supervised(s) => {
                out.push(0);
                w_u32s(&mut out, &s.input_ids);
                w_i64s(&mut out, &s.labels);
                w_u64(&mut out, s.prompt_len as u64);
                w_opt(&mut out, s.sop_index);
            }
            Example::Prompt(p) => {
                out.push(1);
                w_u32s(&mut out, &p.input_ids);
                w_u32s(&mut out, &p.target_ids);
                w_opt(&mut out, p.sop_index);
            }
            Example::Pair(p) => {
                out.push(2);
                w_u32s(&mut out, &p.chosen_ids);
                w_u32s(&mut out, &p.rejected_ids);
                w_u64(&mut out, p.prompt_len as u64);
                w_opt(&mut out, p.sop_index);
            }
        }
    }
    out.extend_from_slice(TRAILER);
    Ok(out)
}

/// Writes an entry atomically (temporary file in the same folder, then rename).
pub fn write(path: &Path, entry: &CacheEntry) -> Result<()> {
    let err = |msg: String| DataError::Cache {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = to_bytes(entry)?;
    let dir = path
        .parent()
        .ok_or_else(|| err("no parent folder".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create the folder: {e}")))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        nanos
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(format!("cannot write: {e}")));
    }
    Ok(())
}

// ---- reading ----

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(format!("truncated at byte {}", self.pos)),
        }
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self, elem: usize) -> std::result::Result<usize, String> {
        let n = self.u64()? as usize;
        if n.saturating_mul(elem) > self.b.len() - self.pos {
            return Err(format!("bad length {n} at byte {}", self.pos));
        }
        Ok(n)
    }

    fn u32s(&mut self) -> std::result::Result<Vec<u32>, String> {
        let n = self.len(4)?;
        let s = self.take(n * 4)?;
        Ok(s.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn i64s(&mut self) -> std::result::Result<Vec<i64>, String> {
        let n = self.len(8)?;
        let s = self.take(n * 8)?;
        Ok(s.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            })
            .collect())
    }

    fn opt(&mut self) -> std::result::Result<Option<usize>, String> {
        let v = self.u64()?;
        Ok((v != u64::MAX).then_some(v as usize))
    }
}

/// Parses an entry.
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<CacheEntry, String> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("not an llmtune data cache".into());
    }
    let v = r.take(4)?;
    let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    if version != CACHE_VERSION {
        return Err(format!("cache version {version}, expected {CACHE_VERSION}"));
    }
    let hl = r.len(1)?;
    let header: CacheHeader =
        serde_json::from_slice(r.take(hl)?).map_err(|e| format!("bad header: {e}"))?;
    let n = r.len(1)?;
    let mut examples = Vec::with_capacity(n);
    for _ in 0..n {
        let tag = r.take(1)?[0];
        let e = match tag {
            0 => Example::Supervised(SupervisedExample {
                input_ids: r.u32s()?,
                labels: r.i64s()?,
                prompt_len: r.u64()? as usize,
                sop_index: r.opt()?,
            }),
            1 => Example::Prompt(PromptExample {
                input_ids: r.u32s()?,
                target_ids: r.u32s()?,
                sop_index: r.opt()?,
            }),
            2 => Example::Pair(PairExample {
                chosen_ids: r.u32s()?,
                rejected_ids: r.u32s()?,
                prompt_len: r.u64()? as usize,
                sop_index: r.opt()?,
            }),
            t => return Err(format!("bad example tag {t}")),
        };
        examples.push(e);
    }
    if r.take(TRAILER.len())? != TRAILER || r.pos != bytes.len() {
        return Err("bad trailer".into());
    }
    Ok(CacheEntry { header, examples })
}

/// Reads the entry at `path` if it exists and is valid for `key`. A missing file gives
/// `Ok(None)`; an unreadable or foreign one an error message (the caller rebuilds).
pub fn read(path: &Path, key: &str) -> std::result::Result<Option<CacheEntry>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let entry = from_bytes(&bytes)?;
    if entry.header.key != key {
        return Err("the key inside differs from its file name".into());
    }
    Ok(Some(entry))
}
