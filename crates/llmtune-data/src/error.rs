//! The error type of this crate.
//!
//! Every variant that comes from user data names the file, the record (0-based index in
//! its file, as Python and `jq` count) and the field; dataset-level errors name the
//! dataset and list the known ones.

use std::path::PathBuf;

/// Everything that can go wrong while reading, encoding, batching or caching data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// `dataset_info.json` could not be read.
    #[error("cannot read {path}: {source} (every --dataset_dir needs a dataset_info.json)")]
    InfoRead {
        path: PathBuf,
        source: std::io::Error,
    },

    /// `dataset_info.json` is not valid JSON.
    #[error("{path}: malformed JSON at line {line}, column {column}: {msg}")]
    InfoJson {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },

    /// An entry of `dataset_info.json` is malformed.
    #[error("{path}: dataset `{dataset}`: {msg}")]
    InfoEntry {
        path: PathBuf,
        dataset: String,
        msg: String,
    },

    /// A requested dataset is not registered.
    #[error("unknown dataset `{name}`: {path} registers {known}")]
    UnknownDataset {
        name: String,
        path: PathBuf,
        /// The registered names, comma separated (or "no datasets").
        known: String,
    },

    /// The data file (or folder) of a dataset does not exist.
    #[error("dataset `{dataset}`: data file {path} not found (file_name `{file_name}` in {info})")]
    MissingFile {
        dataset: String,
        path: PathBuf,
        file_name: String,
        info: PathBuf,
    },

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A file's type is not `.json`, `.jsonl` or `.csv`, or a folder mixes types.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A `.json` file is not valid JSON.
    #[error("{path}: malformed JSON at line {line}, column {column}: {msg}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },

    /// A line of a JSON-lines file is not a valid JSON object.
    #[error("{path}: line {line} (record {record}): {msg}")]
    JsonLine {
        path: PathBuf,
        line: usize,
        record: usize,
        msg: String,
    },

    /// A CSV file is malformed.
    #[error("{path}: CSV record {record} (line {line}): {msg}")]
    Csv {
        path: PathBuf,
        line: u64,
        record: usize,
        msg: String,
    },

    /// A CSV header lacks a column the dataset needs.
    #[error("{path}: the CSV header has no column `{column}` (the {role} column of dataset `{dataset}`); header columns: {header}")]
    CsvMissingColumn {
        path: PathBuf,
        dataset: String,
        role: &'static str,
        column: String,
        header: String,
    },

    /// A column named in `dataset_info.json` appears in no record of the dataset.
    #[error("dataset `{dataset}` ({path}): no record has the field `{column}` named as its {role} column{hint}")]
    MissingColumn {
        dataset: String,
        path: PathBuf,
        role: &'static str,
        column: String,
        /// Extra guidance, e.g. the fields the first record has.
        hint: String,
    },

    /// A record or one of its fields has the wrong shape.
    #[error("{path}: record {record}: field `{field}`: {msg}")]
    Field {
        path: PathBuf,
        record: usize,
        field: String,
        msg: String,
    },

    /// Filtering (or truncation) left nothing to train on.
    #[error("no valid samples left in {datasets}: {why}")]
    NoSamples { datasets: String, why: String },

    /// The template name is not registered.
    #[error("unknown template `{name}`; known templates: {known}")]
    UnknownTemplate { name: String, known: String },

    /// The tokenizer lacks a token the template needs.
    #[error("template `{template}` needs the token `{token}`, which the tokenizer ({tokenizer}) does not have{hint}")]
    MissingSpecialToken {
        template: String,
        token: String,
        tokenizer: PathBuf,
        hint: String,
    },

    /// A data argument has an invalid value.
    #[error("invalid value for `{arg}`: {msg}")]
    BadArg { arg: &'static str, msg: String },

    /// Batching was asked something impossible (empty batch, mixed example kinds, ...).
    #[error("collate: {0}")]
    Collate(String),

    /// The encoded-data cache could not be written or read.
    #[error("cache {path}: {msg}")]
    Cache { path: PathBuf, msg: String },

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] llmtune_tokenize::TokenizerError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn field(
        path: impl Into<PathBuf>,
        record: usize,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        DataError::Field {
            path: path.into(),
            record,
            field: field.into(),
            msg: msg.into(),
        }
    }
}
