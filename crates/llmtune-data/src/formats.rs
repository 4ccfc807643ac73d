//! Reading data files (`.json` array, `.jsonl`, `.csv`, or a folder of one type) and turning
//! their records into [`RawSample`]s.
//!
//! Rules (SPEC §3):
//! * several datasets are concatenated in the order given;
//! * `max_samples` keeps the first N records of each dataset, before filtering;
//! * rows with an empty (or null) prompt or response are dropped and counted;
//! * query = prompt column + query column, no separator;
//! * for stage `rm` the response is `[chosen, rejected]`. Lists longer than two are accepted
//!   (the first two are used, as the reference does; `oaast_rm_zh` has such rows) and
//!   counted in [`DatasetSummary::extra_responses_ignored`].
//!
//! A `.json` file whose first non-blank character is not `[` is read as JSON lines, as the
//! Hugging Face `json` loader does. In CSV files a history or preference-pair cell holds
//! JSON text (`[["q","a"]]`, `["chosen","rejected"]`). Record indices in messages are
//! 0-based and count records of one file.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::args::{DataArgs, Stage};
use crate::error::{DataError, Result};
use crate::registry::{check_sha1, describe, serde_msg, DatasetEntry, Registry, Sha1Status};

/// The response of a sample.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Response {
    /// One answer (SFT, PPO, predict).
    Text(String),
    /// A preference pair (RM).
    Pair { chosen: String, rejected: String },
}

/// One usable sample, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// Prompt column + query column.
    pub query: String,
    /// The answer or the preference pair.
    pub response: Response,
    /// Earlier turns, oldest first.
    pub history: Vec<(String, String)>,
    /// Index into [`RawData::datasets`].
    pub dataset: usize,
    /// Index into [`RawData::files`].
    pub file: usize,
    /// 0-based record index in that file.
    pub record: usize,
}

/// Per-dataset counts of a load.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSummary {
    /// The dataset name.
    pub name: String,
    /// Its file or folder.
    pub path: PathBuf,
    /// The SHA-1 check result.
    pub sha1: Sha1Status,
    /// Records in the files.
    pub records: usize,
    /// Records considered (after `max_samples`).
    pub used: usize,
    /// Samples kept.
    pub kept: usize,
    /// Rows dropped because the prompt was empty or null.
    pub dropped_empty_prompt: usize,
    /// Rows dropped because the response (or chosen/rejected) was empty or null.
    pub dropped_empty_response: usize,
    /// RM rows whose `output` list had more than two answers (the extra ones are ignored).
    pub extra_responses_ignored: usize,
}

/// The samples of all requested datasets, concatenated in order.
#[derive(Debug, Clone)]
pub struct RawData {
    /// One summary per dataset, in the order given.
    pub datasets: Vec<DatasetSummary>,
    /// Every file read (indexed by [`RawSample::file`]).
    pub files: Vec<PathBuf>,
    /// The kept samples.
    pub samples: Vec<RawSample>,
}

/// The file types we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// A JSON array of objects (or JSON lines when the text does not start with `[`).
    Json,
    /// One JSON object per line.
    JsonLines,
    /// Comma-separated values with a header row.
    Csv,
}

impl FileFormat {
    /// The format of a path by its extension.
    pub fn from_path(path: &Path) -> Option<FileFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" => Some(FileFormat::Json),
            "jsonl" => Some(FileFormat::JsonLines),
            "csv" => Some(FileFormat::Csv),
            _ => None,
        }
    }
}

/// The files of one dataset, read into memory (their bytes feed the SHA-1 check, the cache
/// key and the parser).
#[derive(Debug, Clone)]
pub struct DatasetFiles {
    /// The registry entry.
    pub entry: DatasetEntry,
    /// The file or folder.
    pub path: PathBuf,
    /// The format shared by all files.
    pub format: FileFormat,
    /// (path, bytes) of every file, sorted by name for a folder.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// The SHA-1 check result.
    pub sha1: Sha1Status,
}

/// Finds a dataset's files, reads them and checks the SHA-1.
pub fn read_dataset_files(registry: &Registry, name: &str) -> Result<DatasetFiles> {
    let entry = registry.get(name)?.clone();
    let path = registry.data_path(&entry)?;
    let mut paths = Vec::new();
    let format;
    if path.is_dir() {
        let rd = std::fs::read_dir(&path).map_err(|e| DataError::io(&path, e))?;
        for item in rd {
            let item = item.map_err(|e| DataError::io(&path, e))?;
            let p = item.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden || p.is_dir() {
                continue;
            }
            paths.push(p);
        }
        paths.sort();
        if paths.is_empty() {
            return Err(DataError::Format {
                path,
                msg: format!("dataset `{}`: the folder holds no data files", entry.name),
            });
        }
        let mut found: Option<(FileFormat, &PathBuf)> = None;
        for p in &paths {
            let f = FileFormat::from_path(p).ok_or_else(|| DataError::Format {
                path: p.clone(),
                msg: format!(
                    "dataset `{}`: unsupported file type (expected .json, .jsonl or .csv)",
                    entry.name
                ),
            })?;
            match found {
                None => found = Some((f, p)),
                Some((f0, p0)) if f0 != f => {
                    return Err(DataError::Format {
                        path: path.clone(),
                        msg: format!(
                            "dataset `{}`: the folder mixes file types ({} and {}); use one type per folder",
                            entry.name,
                            p0.display(),
                            p.display()
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        format = found.map(|(f, _)| f).unwrap_or(FileFormat::Json);
    } else {
        format = FileFormat::from_path(&path).ok_or_else(|| DataError::Format {
            path: path.clone(),
            msg: format!(
                "dataset `{}`: unsupported file type (expected .json, .jsonl or .csv, or a folder of them)",
                entry.name
            ),
        })?;
        paths.push(path.clone());
    }
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| DataError::io(&p, e))?;
        files.push((p, bytes));
    }
    let sha1 = check_sha1(&entry, &files);
    Ok(DatasetFiles {
        entry,
        path,
        format,
        files,
        sha1,
    })
}

/// A parsed file: its records, plus the CSV header when it is a CSV file.
#[derive(Debug, Clone, Default)]
pub struct ParsedFile {
    /// The records (JSON objects; CSV rows become objects of strings).
    pub records: Vec<Map<String, Value>>,
    /// The CSV header, if any.
    pub header: Option<Vec<String>>,
}

fn as_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        DataError::Format {
            path: path.to_path_buf(),
            msg: format!("not UTF-8 text (invalid byte on line {line})"),
        }
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// Parses one file's bytes.
pub fn parse_file(path: &Path, format: FileFormat, bytes: &[u8]) -> Result<ParsedFile> {
    let text = as_text(path, bytes)?;
    match format {
        FileFormat::Json if text.trim_start().starts_with('[') => parse_json_array(path, text),
        FileFormat::Json | FileFormat::JsonLines => parse_json_lines(path, text),
        FileFormat::Csv => parse_csv(path, text),
    }
}

fn record_error(path: &Path, record: usize, v: &Value) -> DataError {
    DataError::field(
        path,
        record,
        "(record)",
        format!(
            "expected an object like {{\"instruction\": ..., \"output\": ...}}, found {}",
            describe(v)
        ),
    )
}

fn parse_json_array(path: &Path, text: &str) -> Result<ParsedFile> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        msg: serde_msg(&e),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            msg: "expected a JSON array of records".into(),
        });
    };
    let mut records = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Value::Object(o) => records.push(o),
            other => return Err(record_error(path, i, &other)),
        }
    }
    Ok(ParsedFile {
        records,
        header: None,
    })
}

fn parse_json_lines(path: &Path, text: &str) -> Result<ParsedFile> {
    let mut records = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = records.len();
        let v: Value = serde_json::from_str(line).map_err(|e| DataError::JsonLine {
            path: path.to_path_buf(),
            line: lineno + 1,
            record,
            msg: format!("malformed JSON at column {}: {}", e.column(), serde_msg(&e)),
        })?;
        match v {
            Value::Object(o) => records.push(o),
            other => {
                return Err(DataError::JsonLine {
                    path: path.to_path_buf(),
                    line: lineno + 1,
                    record,
                    msg: format!("expected a JSON object, found {}", describe(&other)),
                })
            }
        }
    }
    Ok(ParsedFile {
        records,
        header: None,
    })
}

fn parse_csv(path: &Path, text: &str) -> Result<ParsedFile> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let csv_err = |e: csv::Error, record: usize| {
        let line = e.position().map(|p| p.line()).unwrap_or(0);
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("has {len} fields, the header has {expected_len}"),
            _ => e.to_string(),
        };
        DataError::Csv {
            path: path.to_path_buf(),
            line,
            record,
            msg,
        }
    };
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| csv_err(e, 0))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut records = Vec::new();
    for (i, row) in rdr.records().enumerate() {
        let row = row.map_err(|e| csv_err(e, i))?;
        let mut obj = Map::with_capacity(header.len());
        for (h, cell) in header.iter().zip(row.iter()) {
            obj.insert(h.clone(), Value::String(cell.to_string()));
        }
        records.push(obj);
    }
    Ok(ParsedFile {
        records,
        header: Some(header),
    })
}

/// Loads every dataset of `args` for `stage`: reads, parses, checks columns, extracts and
/// filters. Errors name the file, record and field.
pub fn load_raw(args: &DataArgs, stage: Stage) -> Result<RawData> {
    let registry = Registry::load(&args.dataset_dir)?;
    let mut files = Vec::new();
    for name in &args.dataset {
        files.push(read_dataset_files(&registry, name)?);
    }
    load_from_files(&files, args.max_samples, stage)
}

/// Parses and extracts already-read dataset files (see [`read_dataset_files`]).
pub fn load_from_files(
    datasets: &[DatasetFiles],
    max_samples: Option<usize>,
    stage: Stage,
) -> Result<RawData> {
    let mut out = RawData {
        datasets: Vec::new(),
        files: Vec::new(),
        samples: Vec::new(),
    };
    for (di, ds) in datasets.iter().enumerate() {
        let mut parsed = Vec::with_capacity(ds.files.len());
        for (p, bytes) in &ds.files {
            parsed.push((p.clone(), parse_file(p, ds.format, bytes)?));
        }
        check_columns(ds, &parsed)?;
        let mut summary = DatasetSummary {
            name: ds.entry.name.clone(),
            path: ds.path.clone(),
            sha1: ds.sha1.clone(),
            records: parsed.iter().map(|(_, f)| f.records.len()).sum(),
            used: 0,
            kept: 0,
            dropped_empty_prompt: 0,
            dropped_empty_response: 0,
            extra_responses_ignored: 0,
        };
        let limit = max_samples.unwrap_or(usize::MAX);
        'files: for (p, file) in &parsed {
            let fi = out.files.len();
            out.files.push(p.clone());
            for (ri, rec) in file.records.iter().enumerate() {
                if summary.used >= limit {
                    break 'files;
                }
                summary.used += 1;
                let ctx = RecordCtx {
                    path: p,
                    record: ri,
                    csv: ds.format == FileFormat::Csv,
                };
                if let Some((query, response, history)) =
                    extract(&ctx, rec, &ds.entry, stage, &mut summary)?
                {
                    summary.kept += 1;
                    out.samples.push(RawSample {
                        query,
                        response,
                        history,
                        dataset: di,
                        file: fi,
                        record: ri,
                    });
                }
            }
        }
        if summary.extra_responses_ignored > 0 {
            tracing::warn!(
                "dataset `{}`: {} rows list more than two responses; the first is used as chosen, the second as rejected",
                summary.name,
                summary.extra_responses_ignored
            );
        }
        out.datasets.push(summary);
    }
    if out.samples.is_empty() {
        return Err(no_samples_error(&out.datasets));
    }
    Ok(out)
}

fn no_samples_error(datasets: &[DatasetSummary]) -> DataError {
    let names: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
    let records: usize = datasets.iter().map(|d| d.records).sum();
    let used: usize = datasets.iter().map(|d| d.used).sum();
    let ep: usize = datasets.iter().map(|d| d.dropped_empty_prompt).sum();
    let er: usize = datasets.iter().map(|d| d.dropped_empty_response).sum();
    let why = if records == 0 {
        "the files hold no records".to_string()
    } else {
        format!(
            "all {used} records were dropped: {ep} with an empty prompt, {er} with an empty response"
        )
    };
    DataError::NoSamples {
        datasets: names.join(", "),
        why,
    }
}

fn check_columns(ds: &DatasetFiles, parsed: &[(PathBuf, ParsedFile)]) -> Result<()> {
    let c = &ds.entry.columns;
    let mut needed: Vec<(&'static str, &str)> = vec![
        ("prompt", c.prompt.as_str()),
        ("response", c.response.as_str()),
    ];
    if let (true, Some(q)) = (c.query_explicit, &c.query) {
        needed.push(("query", q));
    }
    if let Some(h) = &c.history {
        needed.push(("history", h));
    }
    for (p, file) in parsed {
        if let Some(header) = &file.header {
            for (role, col) in &needed {
                if !header.iter().any(|h| h == col) {
                    return Err(DataError::CsvMissingColumn {
                        path: p.clone(),
                        dataset: ds.entry.name.clone(),
                        role,
                        column: col.to_string(),
                        header: header.join(", "),
                    });
                }
            }
        }
    }
    let total: usize = parsed.iter().map(|(_, f)| f.records.len()).sum();
    if total == 0 {
        return Ok(());
    }
    for (role, col) in &needed {
        let present = parsed
            .iter()
            .any(|(_, f)| f.records.iter().any(|r| r.contains_key(*col)));
        if !present {
            let first = parsed
                .iter()
                .flat_map(|(_, f)| f.records.first())
                .next()
                .map(|r| r.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            return Err(DataError::MissingColumn {
                dataset: ds.entry.name.clone(),
                path: ds.path.clone(),
                role,
                column: col.to_string(),
                hint: format!(
                    "; records have the fields: {first} (set `columns` in dataset_info.json)"
                ),
            });
        }
    }
    Ok(())
}

struct RecordCtx<'a> {
    path: &'a Path,
    record: usize,
    csv: bool,
}

impl RecordCtx<'_> {
    fn err(&self, field: &str, msg: String) -> DataError {
        DataError::field(self.path, self.record, field, msg)
    }

    /// A string field: absent or null gives "".
    fn string(&self, rec: &Map<String, Value>, field: &str) -> Result<String> {
        match rec.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(_)) => Err(self.err(
                field,
                "expected a string, found a list (preference pairs [chosen, rejected] are read by --stage rm)"
                    .into(),
            )),
            Some(other) => Err(self.err(
                field,
                format!("expected a string, found {}", describe(other)),
            )),
        }
    }

    /// A list-valued field; in CSV files the cell holds JSON text. Absent, null or an empty
    /// CSV cell give `None`.
    fn list(
        &self,
        rec: &Map<String, Value>,
        field: &str,
        what: &str,
    ) -> Result<Option<Vec<Value>>> {
        match rec.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.clone())),
            Some(Value::String(s)) if self.csv => {
                if s.trim().is_empty() {
                    return Ok(None);
                }
                match serde_json::from_str::<Value>(s) {
                    Ok(Value::Array(a)) => Ok(Some(a)),
                    Ok(other) => Err(self.err(
                        field,
                        format!(
                            "expected {what} (as JSON text in the CSV cell), found {}",
                            describe(&other)
                        ),
                    )),
                    Err(e) => Err(self.err(
                        field,
                        format!(
                            "expected {what} as JSON text in the CSV cell: {}",
                            serde_msg(&e)
                        ),
                    )),
                }
            }
            Some(other) => {
                Err(self.err(field, format!("expected {what}, found {}", describe(other))))
            }
        }
    }
}

type Extracted = (String, Response, Vec<(String, String)>);

fn extract(
    ctx: &RecordCtx<'_>,
    rec: &Map<String, Value>,
    entry: &DatasetEntry,
    stage: Stage,
    summary: &mut DatasetSummary,
) -> Result<Option<Extracted>> {
    let c = &entry.columns;
    let prompt = ctx.string(rec, &c.prompt)?;
    let query = match &c.query {
        Some(q) => ctx.string(rec, q)?,
        None => String::new(),
    };
    let history = match &c.history {
        Some(h) => extract_history(ctx, rec, h)?,
        None => Vec::new(),
    };
    let response = if stage.is_pairwise() {
        match ctx.list(rec, &c.response, "a two-element list [chosen, rejected]")? {
            None => None,
            Some(items) => {
                if items.len() < 2 {
                    return Err(ctx.err(
                        &c.response,
                        format!(
                            "expected a two-element list [chosen, rejected], found a list of {}",
                            items.len()
                        ),
                    ));
                }
                let mut two = Vec::with_capacity(2);
                for (i, it) in items.iter().take(2).enumerate() {
                    match it {
                        Value::String(s) => two.push(s.clone()),
                        Value::Null => two.push(String::new()),
                        other => {
                            return Err(ctx.err(
                                &format!("{}[{i}]", c.response),
                                format!(
                                    "expected a string ({}), found {}",
                                    if i == 0 { "chosen" } else { "rejected" },
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                if items.len() > 2 {
                    summary.extra_responses_ignored += 1;
                }
                let rejected = two.pop().unwrap_or_default();
                let chosen = two.pop().unwrap_or_default();
                if chosen.is_empty() || rejected.is_empty() {
                    None
                } else {
                    Some(Response::Pair { chosen, rejected })
                }
            }
        }
    } else {
        let s = ctx.string(rec, &c.response)?;
        (!s.is_empty()).then_some(Response::Text(s))
    };
    if prompt.is_empty() {
        summary.dropped_empty_prompt += 1;
        return Ok(None);
    }
    let Some(response) = response else {
        summary.dropped_empty_response += 1;
        return Ok(None);
    };
    Ok(Some((prompt + &query, response, history)))
}

fn extract_history(
    ctx: &RecordCtx<'_>,
    rec: &Map<String, Value>,
    field: &str,
) -> Result<Vec<(String, String)>> {
    let what = "a list of [question, answer] pairs";
    let Some(items) = ctx.list(rec, field, what)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let pair = match item {
            Value::Array(p) if p.len() == 2 => p,
            Value::Array(p) => {
                return Err(ctx.err(
                    &format!("{field}[{i}]"),
                    format!(
                        "expected a [question, answer] pair, found a list of {}",
                        p.len()
                    ),
                ))
            }
            other => {
                return Err(ctx.err(
                    &format!("{field}[{i}]"),
                    format!(
                        "expected a [question, answer] pair ({what}), found {}",
                        describe(other)
                    ),
                ))
            }
        };
        let mut strs = [String::new(), String::new()];
        for (j, v) in pair.iter().enumerate() {
            match v {
                Value::String(s) => strs[j] = s.clone(),
                other => {
                    return Err(ctx.err(
                        &format!("{field}[{i}][{j}]"),
                        format!(
                            "expected a string ({}), found {}",
                            if j == 0 { "question" } else { "answer" },
                            describe(other)
                        ),
                    ))
                }
            }
        }
        let [q, a] = strs;
        out.push((q, a));
    }
    Ok(out)
}
