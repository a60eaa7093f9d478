//! The library's error type: what can stop the relay, and whose fault it is.
//!
//! Only start-up can fail: a bad setting, an address that can't be bound, a
//! metrics listener that can't start. Errors a user can fix map to exit code
//! 2 in the binary; the rest to 1. Per-datagram trouble is never an `Error`:
//! it is counted in a metric and the loop goes on.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Why the relay could not start (or, rarely, had to stop).
#[derive(Debug)]
pub enum Error {
    /// A flag, environment variable or config file value is invalid.
    Config(String),
    /// A socket could not be bound.
    Bind {
        /// What was being bound ("relay socket", "metrics listener").
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said (or the exporter, for metrics).
        reason: String,
    },
    /// The other side said no (a refused join), or nothing at all: exit 1,
    /// with the reason in words.
    Refused(String),
    /// An unexpected I/O error from the OS.
    Io {
        /// What the relay was doing.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl Error {
    /// Whether the user can fix this by changing how udphub is run
    /// (exit code 2), as opposed to an environment failure (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Bind { .. })
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        if self.is_usage() {
            2
        } else {
            1
        }
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Error {
        Error::Io { context, source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) | Error::Refused(msg) => f.write_str(msg),
            Error::Bind { what, addr, reason } => {
                write!(f, "cannot bind {what} to {addr}: {reason}")
            }
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
