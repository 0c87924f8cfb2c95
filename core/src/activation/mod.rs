//! Socket activation (`routing: kernel`, spawn mode): every worker gets its listener as fd 3 with
//! `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`, placeholders in its arguments, and for servers that never
//! speak the channel protocol (`worker.protocol: none`) readiness judged from the listener.
//!
//! `LISTEN_PID` must be the worker's own pid (`sd_listen_fds(3)`), which exists only after fork, and
//! nothing may allocate between fork and exec in a multi-threaded parent. So [`exec`] prepares the
//! whole argv and environment before the fork, with room for the pid's digits, and the child writes
//! them and calls `execve` itself: the pid stays the one the master supervises.

pub mod exec;
pub mod readiness;

use serde::Deserialize;

/// The first inherited fd of systemd socket activation (`SD_LISTEN_FDS_START`): the worker's listener.
pub const LISTEN_FD: i32 = 3;
/// The `LISTEN_FDNAMES` value, so servers that name their sockets can tell ours.
pub const LISTEN_FD_NAME: &str = "sticky-cluster";

/// Whether the worker program speaks the channel protocol (YAML `worker.protocol`, `--protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerProtocol {
    /// It uses this crate's worker side (Rust, C, Node): hello, ready, shutdown on its channel.
    #[default]
    Channel,
    /// Any server that accepts on the listener it inherits (uvicorn `--fd`, gunicorn, hypercorn
    /// `fd://`): no channel; readiness is judged from the listener, shutdown is SIGTERM.
    None,
}

impl WorkerProtocol {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerProtocol::Channel => "channel",
            WorkerProtocol::None => "none",
        }
    }
}

impl std::str::FromStr for WorkerProtocol {
    type Err = String;
    fn from_str(text: &str) -> Result<WorkerProtocol, String> {
        match text {
            "channel" => Ok(WorkerProtocol::Channel),
            "none" => Ok(WorkerProtocol::None),
            other => Err(format!("expected channel or none, got {other:?}")),
        }
    }
}

/// What the placeholders in a worker's arguments stand for.
#[derive(Debug, Clone, Copy)]
pub struct Placeholders {
    /// `{index}`: the worker's index.
    pub index: u32,
    /// `{concurrency}`: the number of workers.
    pub concurrency: u32,
    /// `{backlog}`: the configured listen backlog (for servers that call `listen()` again).
    pub backlog: u32,
}

/// Every placeholder a worker argument may hold: `{listen_fd}` only with `routing: kernel`.
const PLACEHOLDERS: [&str; 4] = ["{index}", "{concurrency}", "{backlog}", "{listen_fd}"];

impl Placeholders {
    /// The argument with `{index}`, `{concurrency}`, `{backlog}` and `{listen_fd}` (always `3`) filled in.
    pub fn expand(&self, argument: &str) -> String {
        if !argument.contains('{') {
            return argument.to_string();
        }
        argument
            .replace("{index}", &self.index.to_string())
            .replace("{concurrency}", &self.concurrency.to_string())
            .replace("{backlog}", &self.backlog.to_string())
            .replace("{listen_fd}", &LISTEN_FD.to_string())
    }
}

/// A `{name}` in `argument` that looks like a placeholder but is none this version knows (a typo such
/// as `{idx}`); a shell's `${name}` is left alone.
pub fn unknown_placeholder(argument: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(start) = argument[from..].find('{').map(|found| from + found) {
        let length = argument[start..].find('}')?;
        let candidate = &argument[start..=start + length];
        let name = &candidate[1..candidate.len() - 1];
        let shell = argument[..start].ends_with('$');
        let looks_like_one = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if looks_like_one && !shell && !PLACEHOLDERS.contains(&candidate) {
            return Some(candidate);
        }
        from = start + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in_and_other_braces_kept() {
        let values = Placeholders { index: 2, concurrency: 4, backlog: 511 };
        assert_eq!(values.expand("--fd"), "--fd");
        assert_eq!(values.expand("{listen_fd}"), "3");
        assert_eq!(values.expand("fd://{listen_fd}"), "fd://3");
        assert_eq!(values.expand("/run/gunicorn-{index}.ctl"), "/run/gunicorn-2.ctl");
        assert_eq!(values.expand("{backlog}:{concurrency}"), "511:4");
        assert_eq!(values.expand("{\"json\": 1}"), "{\"json\": 1}");
    }

    #[test]
    fn a_misspelt_placeholder_is_noticed() {
        assert_eq!(unknown_placeholder("/run/{idx}.ctl"), Some("{idx}"));
        assert_eq!(unknown_placeholder("{index}"), None);
        assert_eq!(unknown_placeholder("{\"json\": 1}"), None);
        assert_eq!(unknown_placeholder("plain"), None);
        assert_eq!(unknown_placeholder("exec w --fd ${fd}"), None);
        assert_eq!(unknown_placeholder("{index}-{indx}"), Some("{indx}"));
    }

    fn config(yaml: &str) -> Result<crate::Config, crate::Error> {
        use crate::Config;
        Config::from_yaml(yaml, "c.yaml")?.apply(Default::default(), "c.yaml")
    }

    #[test]
    fn protocol_none_needs_kernel_routing_and_spawn_mode() {
        let spawn = "worker:\n  command: [uvicorn, app:app, --fd, '{listen_fd}']\n  protocol: none\n";
        let error = config(spawn).unwrap_err().to_string();
        assert!(error.starts_with("c.yaml: worker.protocol: `none` needs `routing: kernel`"), "{error}");
        let ok = config(&format!("routing: kernel\n{spawn}")).unwrap();
        assert_eq!(ok.worker_protocol, WorkerProtocol::None);
        let error = config("worker:\n  command: [w, '{listen_fd}']\n").unwrap_err().to_string();
        assert!(error.contains("worker.command: {listen_fd}"), "{error}");
    }

    #[test]
    fn handoff_only_options_are_refused_for_protocol_none() {
        let base = "routing: kernel\nworker:\n  command: [w]\n  protocol: none\n";
        for (extra, key) in [("queue:\n  limit: 10\n", "queue.limit"), ("queue:\n  maxWait: 2s\n", "queue.maxWait")] {
            let error = config(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(error.contains(key) && error.contains("protocol: none"), "{error}");
        }
        let error = config(&format!("{base}clientAddress: proxy-protocol\ntrustedProxies: [10.0.0.0/8]\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("clientAddress"), "{error}");
        let error = config("routing: kernel\nworker:\n  command: [w]\n  protocol: http\n").unwrap_err().to_string();
        assert!(error.starts_with("c.yaml:4: worker.protocol"), "{error}");
    }
}
