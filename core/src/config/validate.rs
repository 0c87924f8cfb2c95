//! The one validation of a configuration, whoever wrote it (the YAML file, the flags, the C options, the
//! Node options): the bounds of each value, then what only the whole picture can tell.

use std::fmt;

use super::defaults::{MAX_CONCURRENCY, MAX_HARD_SHUTDOWN_DELAY_MS, MIN_CONCURRENCY};
use super::{whole_millis, Config, Routing, WorkerSource};
use crate::activation::{unknown_placeholder, WorkerProtocol};
use crate::client_address::ClientAddressSource;
use crate::error::Error;

/// A configuration the cluster refuses: the key that is wrong and a one-line message that starts with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The key as the YAML file spells it (`concurrency`, `queue.limit`); other front ends rename it.
    pub key: &'static str,
    message: String,
}

impl Invalid {
    /// `key: reason`.
    fn new(key: &'static str, reason: impl fmt::Display) -> Invalid {
        Invalid { key, message: format!("{key}: {reason}") }
    }

    /// A sentence about `key` that names it first (`trustedProxies is required when ...`).
    fn sentence(key: &'static str, rest: impl fmt::Display) -> Invalid {
        Invalid { key, message: format!("{key} {rest}") }
    }

    /// The same line with the key as a front end spells it (`--concurrency`, `sticky_options.queue_limit`).
    pub fn naming(&self, spelled: &str) -> String {
        format!("{spelled}{}", self.message.strip_prefix(self.key).unwrap_or(&self.message))
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Error {
        Error::Config(invalid.message)
    }
}

/// `key: must be at least MIN` / `at most MAX, got VALUE`.
fn within(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if value < min {
        return Err(Invalid::new(key, format_args!("must be at least {min}, got {value}")));
    }
    if value > max {
        return Err(Invalid::new(key, format_args!("must be at most {max}, got {value}")));
    }
    Ok(())
}

impl Config {
    /// Checks the whole configuration, as every front end must before running it: each value within its
    /// bounds ([`super::defaults`]), then the combinations (a spawn command, trusted proxies behind a
    /// proxy, kernel routing on the TCP peer). The error names the YAML key; see [`Invalid::naming`].
    pub fn validate(&self) -> Result<(), Invalid> {
        self.check_values()?;
        self.check_combination()
    }

    /// The bounds of each value on its own: what a YAML file can be blamed for at the line of its key.
    pub(super) fn check_values(&self) -> Result<(), Invalid> {
        within("concurrency", self.concurrency.into(), MIN_CONCURRENCY.into(), MAX_CONCURRENCY.into())?;
        within("hardShutdownDelay", whole_millis(self.hard_shutdown_delay), 0, MAX_HARD_SHUTDOWN_DELAY_MS)?;
        within("backlog", self.backlog.into(), 1, u32::MAX.into())?;
        within("queue.limit", self.queue_limit as u64, 1, u64::MAX)?;
        within("queue.maxWait", whole_millis(self.queue_max_wait), 0, MAX_HARD_SHUTDOWN_DELAY_MS)?;
        within("queue.perSource", self.queue_per_source as u64, 1, u64::MAX)?;
        within("headerWait.limit", self.header_wait_limit as u64, 1, u64::MAX)?;
        if self.header_wait_max_wait.is_zero() {
            return Err(Invalid::new("headerWait.maxWait", "must be more than 0"));
        }
        Ok(())
    }

    /// What only the whole configuration can tell, after every source (file, flags) is merged.
    fn check_combination(&self) -> Result<(), Invalid> {
        if self.routing == Routing::Kernel && self.client_address != ClientAddressSource::Peer {
            return Err(Invalid::new(
                "clientAddress",
                "only `peer` works with `routing: kernel` (the kernel routes on the SYN, before any header is sent)",
            ));
        }
        if self.client_address != ClientAddressSource::Peer && self.trusted_proxies.0.is_empty() {
            return Err(Invalid::sentence(
                "trustedProxies",
                format_args!(
                    "is required when clientAddress is {}: list the proxies' addresses (CIDRs such as \
                     10.0.0.0/8), or 0.0.0.0/0 and ::/0 when every peer is a proxy",
                    self.client_address.as_str()
                ),
            ));
        }
        let kernel = self.routing == Routing::Kernel;
        if self.worker_protocol == WorkerProtocol::None {
            if matches!(self.workers, WorkerSource::Attach(_)) {
                return Err(Invalid::new(
                    "worker.protocol",
                    "`none` needs spawn mode (`worker.command`): an attached worker speaks the protocol",
                ));
            }
            if !kernel {
                return Err(Invalid::new(
                    "worker.protocol",
                    "`none` needs `routing: kernel` (with handoff routing the master passes each connection over \
                     the channel, which such a worker does not read)",
                ));
            }
        }
        if let WorkerSource::Spawn { command, .. } = &self.workers {
            if command.first().is_none_or(|program| program.trim().is_empty()) {
                return Err(Invalid::sentence(
                    "worker.command",
                    "is required in spawn mode (or give the command after `--`)",
                ));
            }
            if let Some(unknown) = command.iter().find_map(|argument| unknown_placeholder(argument)) {
                return Err(Invalid::new(
                    "worker.command",
                    format_args!(
                        "unknown placeholder {unknown} (known: {{index}}, {{concurrency}}, {{backlog}}, {{listen_fd}})"
                    ),
                ));
            }
            if !kernel && command.iter().any(|argument| argument.contains("{listen_fd}")) {
                return Err(Invalid::new(
                    "worker.command",
                    "{listen_fd} is the worker's own listener, which only `routing: kernel` gives",
                ));
            }
        }
        Ok(())
    }
}
