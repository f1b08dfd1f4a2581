//! The library's one error type. Every variant that comes from input names the file (and
//! the tensor, where one is involved) so the CLI can print it once without adding context
//! of its own. Each variant is one kind of failure; [`Error::kind`] gives scripts a stable
//! name for it (the `--json` failure object's `error.kind`, listed in the README) and
//! [`Error::exit_code`] the CLI's exit status.

use std::path::{Path, PathBuf};

/// What went wrong, with the file and tensor it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path the user named (or one a checkpoint names) is not there.
    #[error("{}: does not exist", path.display())]
    NotFound { path: PathBuf },

    /// An operating-system error on `path` (open, map, read, write, rename).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

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

    /// The inputs are readable but the request cannot be carried out with them (key
    /// collisions, adapters that match no base tensor, layouts nothing settles, missing
    /// expected keys, …).
    #[error("{0}")]
    Plan(String),

    /// The command line asked for something impossible or contradictory (CLI exit code 2).
    #[error("{0}")]
    Usage(String),

    /// A GPU was asked for and cannot be used, or the compute device failed.
    #[error("{0}")]
    Device(String),

    /// A broken invariant of lorastream itself: a bug to report, not a problem of the input.
    #[error("internal error: {0}")]
    Internal(String),

    /// The run was interrupted (Ctrl-C); outputs were removed.
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every [`Error::kind`], in the README's order, with what it means.
pub const KINDS: [(&str, &str); 8] = [
    (
        "usage",
        "the arguments are contradictory or impossible (exit code 2)",
    ),
    ("not_found", "a named path does not exist"),
    ("io", "the operating system refused a read or write"),
    (
        "input",
        "a file or one of its tensors is malformed or of a kind lorastream does not read",
    ),
    (
        "plan",
        "the inputs are readable but do not fit together as asked",
    ),
    (
        "device",
        "the requested GPU cannot be used, or the compute device failed",
    ),
    ("internal", "a bug in lorastream"),
    (
        "interrupted",
        "stopped by a signal; unfinished output removed",
    ),
];

impl Error {
    /// An OS error on `path`; a missing file becomes [`Error::NotFound`], which says so in
    /// words rather than as an errno.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if err.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source: err }
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

    /// The stable name of this kind of failure (see [`KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::Io { .. } => "io",
            Error::Format { .. } | Error::Tensor { .. } => "input",
            Error::Plan(_) => "plan",
            Error::Usage(_) => "usage",
            Error::Device(_) => "device",
            Error::Internal(_) => "internal",
            Error::Interrupted => "interrupted",
        }
    }

    /// The CLI's exit status for this error: 2 usage, 130 interrupted (128 + SIGINT),
    /// 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Interrupted => 130,
            _ => 1,
        }
    }

    /// The file the error concerns, when it concerns one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Error::NotFound { path }
            | Error::Io { path, .. }
            | Error::Format { path, .. }
            | Error::Tensor { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The `--json` failure object for this error ending the command with `exit_code`.
    pub fn to_json(&self, exit_code: u8) -> serde_json::Value {
        failure_json(
            self.kind(),
            &self.to_string(),
            self.file(),
            self.tensor_name(),
            exit_code,
        )
    }

    /// The tensor the error concerns, when it concerns one.
    pub fn tensor_name(&self) -> Option<&str> {
        match self {
            Error::Tensor { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}

/// Whether the running command was asked for `--json` (set by the CLI once its arguments
/// are parsed), so code that ends the process on its own (the signal handler) can still
/// print the one failure object scripts expect.
static JSON_OUTPUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_json_output(on: bool) {
    JSON_OUTPUT.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn json_output() -> bool {
    JSON_OUTPUT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The `--json` failure object: `{"ok": false, "error": {"kind", "message", "file",
/// "tensor"}, "exit_code"}` (`file` and `tensor` null when the failure concerns none). Also
/// for failures that are no [`Error`] (clap's usage errors, a signal).
pub fn failure_json(
    kind: &str,
    message: &str,
    file: Option<&Path>,
    tensor: Option<&str>,
    exit_code: u8,
) -> serde_json::Value {
    serde_json::json!({
        "ok": false,
        "error": {
            "kind": kind,
            "message": message,
            "file": file.map(|p| p.display().to_string()),
            "tensor": tensor,
        },
        "exit_code": exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn missing_files_say_so_and_os_errors_keep_their_source() {
        let gone = Error::io("x.pth", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(gone.to_string(), "x.pth: does not exist");
        assert_eq!((gone.kind(), gone.exit_code()), ("not_found", 1));
        let denied = Error::io(
            "y",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(denied.kind(), "io");
        let src = denied.source().map(|s| s.to_string());
        assert!(src.is_some_and(|s| s.contains("ermission")), "{denied:?}");
        assert_eq!(denied.file(), Some(Path::new("y")));
    }

    #[test]
    fn every_kind_is_listed() {
        let all = [
            Error::io("a", std::io::Error::from(std::io::ErrorKind::NotFound)),
            Error::io("a", std::io::Error::other("x")),
            Error::format("a", "m"),
            Error::tensor("a", "t", "m"),
            Error::Plan("p".into()),
            Error::Usage("u".into()),
            Error::Device("d".into()),
            Error::Internal("i".into()),
            Error::Interrupted,
        ];
        for e in &all {
            assert!(KINDS.iter().any(|(k, _)| *k == e.kind()), "{}", e.kind());
        }
        assert_eq!(Error::tensor("f", "w", "m").tensor_name(), Some("w"));
        assert_eq!(Error::Usage("u".into()).exit_code(), 2);
        assert_eq!(Error::Interrupted.exit_code(), 130);
    }
}
