//! Every default and bound of a cluster, written once: `Config::default`, the validation, the supervisor's
//! back-off and the master's limits read them here, and the JavaScript implementation reads
//! `node-binding/js/defaults.json`, which [`shared_json`] renders (`cargo run -p sticky-cluster --example
//! gen-defaults`) and a test compares with the committed file.

use std::net::Ipv4Addr;
use std::time::Duration;

/// TCP port clients connect to (the npm module's default).
pub const PORT: u16 = 8080;
/// Address to listen on: dual-stack, like Node.
pub const HOST: &str = "::";
/// Text in front of every log line (the npm module's debug prefix).
pub const PREFIX: &str = "sticky-cluster:";
/// Whether every worker start/exit and routed connection is logged.
pub const DEBUG: bool = false;
/// The fewest workers a cluster can have.
pub const MIN_CONCURRENCY: u32 = 1;
/// The most workers a cluster can have: each one is a process, a channel and a queue in the master.
pub const MAX_CONCURRENCY: u32 = 1024;
/// How long a graceful shutdown may take before the remaining workers are killed.
pub const HARD_SHUTDOWN_DELAY: Duration = Duration::from_secs(60);
/// The longest `hardShutdownDelay` and `queue.maxWait` in milliseconds: Node's largest timer (2^31 - 1), so
/// every front end (the JavaScript master's `setTimeout` too) means the same thing by them.
pub const MAX_HARD_SHUTDOWN_DELAY_MS: u64 = 2_147_483_647;
/// Listen backlog of the client listener (of each listener of the group in kernel mode).
pub const BACKLOG: u32 = 1024;
/// Connections that may wait in the master for one worker (`queue.limit`).
pub const QUEUE_LIMIT: usize = 1024;
/// How long one may wait before it goes to the next ready worker (`queue.maxWait`).
pub const QUEUE_MAX_WAIT: Duration = Duration::from_secs(10);
/// Connections from one client address that may wait in the master at once, over every queue (`queue.perSource`).
pub const QUEUE_PER_SOURCE: usize = 1024;
/// How often the master looks at its queues (expiry, retried writes); `queue.maxWait` is this precise.
pub const QUEUE_TICK: Duration = Duration::from_millis(100);
/// Connections from trusted proxies that may wait for their header at once (`headerWait.limit`).
pub const HEADER_WAIT_LIMIT: usize = 1024;
/// How long one may take to send it (`headerWait.maxWait`).
pub const HEADER_WAIT_MAX_WAIT: Duration = Duration::from_secs(5);
/// A worker that lived shorter than this counts as a crash for the revival back-off.
pub const CRASH_UPTIME: Duration = Duration::from_secs(2);
/// Delay before reviving a worker after its first crash; it doubles with each further crash.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between revivals of a crashing worker.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Address of the metrics endpoint when `metrics.host` is not given.
pub const METRICS_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Metrics scrapes answered at once.
pub const SCRAPE_LIMIT: usize = 8;
/// File mode of the attach socket when `workers.mode` is not given (0600).
pub const ATTACH_MODE: u32 = 0o600;
/// Attach handshakes under way at once; past it new workers are refused until some finish.
pub const ATTACH_HANDSHAKE_LIMIT: usize = 64;
/// How long an attaching worker may take to say hello.
pub const ATTACH_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// One value of [`shared`], as JSON knows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Shared {
    /// A whole number (counts, milliseconds, ports, a file mode).
    Number(u64),
    /// A text (host, prefix).
    Text(String),
    /// A flag.
    Flag(bool),
}

fn millis(duration: Duration) -> Shared {
    Shared::Number(super::whole_millis(duration))
}

fn count(n: usize) -> Shared {
    Shared::Number(n as u64)
}

/// What the JavaScript implementation shares with core, by the camelCase names of `js/defaults.json`, in
/// the file's order (durations in milliseconds, with an `Ms` suffix). Add a key at the end: the Node
/// side reads them by name.
pub fn shared() -> Vec<(&'static str, Shared)> {
    vec![
        ("port", Shared::Number(PORT.into())),
        ("host", Shared::Text(HOST.into())),
        ("prefix", Shared::Text(PREFIX.into())),
        ("debug", Shared::Flag(DEBUG)),
        ("minConcurrency", Shared::Number(MIN_CONCURRENCY.into())),
        ("maxConcurrency", Shared::Number(MAX_CONCURRENCY.into())),
        ("hardShutdownDelayMs", millis(HARD_SHUTDOWN_DELAY)),
        ("maxHardShutdownDelayMs", Shared::Number(MAX_HARD_SHUTDOWN_DELAY_MS)),
        ("backlog", Shared::Number(BACKLOG.into())),
        ("queueLimit", count(QUEUE_LIMIT)),
        ("queueMaxWaitMs", millis(QUEUE_MAX_WAIT)),
        ("queueTickMs", millis(QUEUE_TICK)),
        ("headerWaitLimit", count(HEADER_WAIT_LIMIT)),
        ("headerWaitMaxWaitMs", millis(HEADER_WAIT_MAX_WAIT)),
        ("crashUptimeMs", millis(CRASH_UPTIME)),
        ("firstBackoffMs", millis(FIRST_BACKOFF)),
        ("maxBackoffMs", millis(MAX_BACKOFF)),
        ("metricsHost", Shared::Text(METRICS_HOST.to_string())),
        ("scrapeLimit", count(SCRAPE_LIMIT)),
        ("attachMode", Shared::Number(ATTACH_MODE.into())),
        ("attachHandshakeLimit", count(ATTACH_HANDSHAKE_LIMIT)),
        ("attachHelloTimeoutMs", millis(ATTACH_HELLO_TIMEOUT)),
        ("queuePerSource", count(QUEUE_PER_SOURCE)),
    ]
}

/// Where `js/defaults.json` lives, from the core crate's directory.
pub const SHARED_JSON_PATH: &str = "../node-binding/js/defaults.json";

/// `node-binding/js/defaults.json` as it must be committed: a flat JSON object, two-space indented, a
/// `_generated` note first.
pub fn shared_json() -> String {
    let text = |value: &str| {
        let mut quoted = String::from('"');
        for c in value.chars() {
            match c {
                '"' => quoted += "\\\"",
                '\\' => quoted += "\\\\",
                c if u32::from(c) < 0x20 => quoted += &format!("\\u{:04x}", u32::from(c)),
                c => quoted.push(c),
            }
        }
        quoted + "\""
    };
    let note = "by core (sticky_cluster::config::defaults); do not edit: a test regenerates this file and compares";
    let mut lines = vec![format!("  \"_generated\": {}", text(note))];
    for (key, value) in shared() {
        let value = match value {
            Shared::Number(n) => n.to_string(),
            Shared::Text(t) => text(&t),
            Shared::Flag(b) => b.to_string(),
        };
        lines.push(format!("  {}: {value}", text(key)));
    }
    format!("{{\n{}\n}}\n", lines.join(",\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_js_defaults_are_generated_from_these_constants() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SHARED_JSON_PATH);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == shared_json(),
            "{} is stale: run `cargo run -p sticky-cluster --example gen-defaults`\n--- committed\n{committed}\n--- \
             generated\n{}",
            path.display(),
            shared_json()
        );
    }

    #[test]
    fn the_generated_file_is_json_with_every_key_once() {
        let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&shared_json()).unwrap();
        assert_eq!(parsed.len(), shared().len() + 1);
        assert_eq!(parsed["maxConcurrency"], 1024);
        assert_eq!(parsed["maxHardShutdownDelayMs"], 2_147_483_647);
        assert_eq!(parsed["host"], "::");
        assert_eq!(parsed["attachMode"], 0o600);
    }
}
