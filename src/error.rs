//! The library's one error type. Every variant that comes from input names the file (and
//! the tensor, where one is involved) so the CLI can print it once and exit 1 without
//! adding context of its own.

use std::path::{Path, PathBuf};

/// What went wrong, with the file and tensor it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on `path` (open, map, read, write, rename).
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// The file is malformed or of a kind we do not read.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// One tensor of the file is malformed or cannot be used.
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// The request cannot be carried out with these inputs (key collisions, unmatched
    /// adapters, missing expected keys, …).
    #[error("{0}")]
    Plan(String),

    /// The command line asked for something impossible (CLI exit code 2).
    #[error("{0}")]
    Usage(String),

    /// A GPU was asked for and cannot be used.
    #[error("{0}")]
    Device(String),

    /// The run was interrupted (Ctrl-C); outputs were removed.
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn tensor(
        path: impl AsRef<Path>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }

    /// Whether the CLI should report this as a usage error (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}
