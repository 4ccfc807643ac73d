//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the training building blocks.
///
/// Errors that concern a file name it; errors that concern trainable
/// variables name them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("write", "rename", "read", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or did not have the expected shape.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file could not be written or read.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Trainable variables received no gradient: the backward pass never
    /// reached them (a fused op without backward, a detached branch, ...).
    #[error("no gradient for {} trainable variable(s): {}", names.len(), names.join(", "))]
    MissingGradients {
        /// Names of the variables without a gradient, in parameter order.
        names: Vec<String>,
    },
    /// Gradients were given for names the optimizer does not know.
    #[error("gradient(s) for unknown variable(s): {}", names.join(", "))]
    UnknownGradients {
        /// The unknown names.
        names: Vec<String>,
    },
    /// A gradient or a saved state tensor does not have the variable's shape.
    #[error("shape mismatch for '{name}': expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// The variable's name.
        name: String,
        /// The variable's shape.
        expected: Vec<usize>,
        /// The shape that was given.
        actual: Vec<usize>,
    },
    /// A saved state (optimizer, scheduler, RNG, checkpoint) is inconsistent
    /// with what is being restored.
    #[error("{}: {message}", path.display())]
    State {
        /// The file or checkpoint directory concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An argument value is invalid; the message names the argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// A caller-provided checkpoint writer failed.
    #[error("writing checkpoint files into {}: {source}", path.display())]
    CheckpointFiles {
        /// The temporary checkpoint directory being written.
        path: PathBuf,
        /// The caller's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Drawing a plot failed.
    #[error("plotting {}: {message}", path.display())]
    Plot {
        /// The PNG being drawn.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of the distributed backend failed.
    #[error(transparent)]
    Dist(#[from] llmtune_dist::Error),
    /// An error from another llmtune crate (model, adapter, data, metrics), already
    /// described by its own message.
    #[error("{0}")]
    Other(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps another crate's error (its message names the file/record/flag).
pub fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

impl Error {
    /// An [`Error::Io`] for callers outside this module.
    pub fn io_public(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::io(op, path, source)
    }

    /// Shorthand for an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for an [`Error::State`].
    pub(crate) fn state(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::State {
            path: path.into(),
            message: message.into(),
        }
    }
}
