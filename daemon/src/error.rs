//! `DaemonError`: what can stop the daemon from starting, said so a person can act on it.

use std::path::PathBuf;

/// A startup or command failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The flags contradict each other or are incomplete.
    #[error("configuration: {0}")]
    Config(String),
    /// A certificate or key could not be read or used.
    #[error("TLS material {path}: {reason}")]
    Tls {
        /// the file (or `<generated>`)
        path: PathBuf,
        /// what is wrong with it
        reason: String,
    },
    /// Creating certificates failed.
    #[error("certificates: {0}")]
    Certs(String),
    /// The operating system gave no randomness (for the replica id and the epoch).
    #[error("no randomness from the operating system: {0}")]
    Entropy(String),
    /// The data dir cannot be used (see [`crate::store::disk::DiskError`]).
    #[error("--data-dir: {0}")]
    Data(#[from] crate::store::disk::DiskError),
    /// A socket could not be bound, or another IO failure.
    #[error("{what}: {source}")]
    Io {
        /// what was being done
        what: String,
        /// the IO error
        source: std::io::Error,
    },
}

impl DaemonError {
    /// An IO error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DaemonError::Io {
            what: what.into(),
            source,
        }
    }
}
