//! The crate's one error type: every failure a user can meet, with the context needed to act on it.
//! The binary prints these once as `error: ...`; the C ABI and Node binding map them to codes.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in sticky-cluster, each with what a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("{path}: {source}")]
    ConfigRead {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The configuration is invalid; the message names the file, key and line.
    #[error("{0}")]
    Config(String),
    /// Binding or listening on the client address failed.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address that was asked for.
        address: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A worker process could not be started.
    #[error("cannot start worker {index} ({program}): {source}")]
    Spawn {
        /// The worker index.
        index: u32,
        /// The program that was run.
        program: String,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The worker environment is missing or names something that is not a sticky-cluster channel.
    #[error("not a sticky-cluster worker: {0}")]
    Environment(String),
    /// The attach socket could not be reached or refused this worker.
    #[error("attach to {path}: {reason}")]
    Attach {
        /// The master's Unix socket path.
        path: PathBuf,
        /// Why the attach failed.
        reason: String,
    },
    /// The peer broke the channel protocol (bad message, wrong version, truncated control data).
    #[error("channel protocol error: {0}")]
    Protocol(String),
    /// The master closed the channel: the worker should exit.
    #[error("the master closed the channel")]
    ChannelClosed,
    /// The master asked this worker to finish its work and exit.
    #[error("the master is shutting down (drain and exit)")]
    Shutdown,
    /// The channel is non-blocking and no connection is waiting.
    #[error("no connection is waiting")]
    WouldBlock,
    /// Any other operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's reason.
        source: io::Error,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an OS error with a short description of what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io { context: context.into(), source: source.into() }
    }
}
