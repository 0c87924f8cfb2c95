//! Configuration: the YAML file (the npm module's option names), command-line overrides, defaults,
//! and validation that names the file, the key and its line.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::activation::WorkerProtocol;
use crate::client_address::{Cidr, ClientAddressSource, TrustedProxies};
use crate::error::Error;

type Result<T, E = Error> = std::result::Result<T, E>;

pub mod defaults;
mod file;
#[cfg(test)]
mod tests;
mod validate;

use file::*;
pub use validate::Invalid;

/// `duration` in whole milliseconds, saturating at `u64::MAX`: how the YAML, the channel protocol and
/// the upgrade state carry a duration.
pub fn whole_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The effective configuration of one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TCP port clients connect to (0 picks a free one).
    pub port: u16,
    /// Address to listen on; `::` (the default) is dual-stack, like Node.
    pub host: String,
    /// Number of workers, each with its own index.
    pub concurrency: u32,
    /// Log every worker start/exit and every routed connection.
    pub debug: bool,
    /// Text in front of every log line (the npm module's debug prefix).
    pub prefix: String,
    /// How long a graceful shutdown may take before the remaining workers are killed.
    pub hard_shutdown_delay: Duration,
    /// Extra worker environment; `{index}` in a value becomes the worker's index.
    pub env: BTreeMap<String, String>,
    /// Where workers come from.
    pub workers: WorkerSource,
    /// Connections that may wait for one worker that is not ready yet.
    pub queue_limit: usize,
    /// How long a connection may wait for its worker before it goes to the next ready one.
    pub queue_max_wait: Duration,
    /// Connections from one client address that may wait in the master at once, over every worker's
    /// queue (`queue.perSource`); past it that address's new connections are closed and counted.
    pub queue_per_source: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`); none when absent.
    pub metrics: Option<SocketAddr>,
    /// Where the routing hash takes the client address from (the TCP peer unless behind a proxy).
    pub client_address: ClientAddressSource,
    /// Peers whose PROXY or `X-Forwarded-For` headers are believed; required unless `client_address` is peer.
    pub trusted_proxies: TrustedProxies,
    /// Connections from trusted proxies that may wait for their header at once (`headerWait.limit`).
    pub header_wait_limit: usize,
    /// How long one may take to send it (`headerWait.maxWait`).
    pub header_wait_max_wait: Duration,
    /// Who routes connections: the master (`handoff`) or the kernel's `SO_REUSEPORT` group (`kernel`).
    pub routing: Routing,
    /// Listen backlog of the client listener (of each listener of the group in kernel mode).
    pub backlog: u32,
    /// Whether spawned workers speak the channel protocol (`worker.protocol`; `none`: any server
    /// accepting on its inherited listener, `routing: kernel` only).
    pub worker_protocol: WorkerProtocol,
}

/// Who puts each connection on its worker (YAML `routing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The master accepts and hands each socket to its worker's channel.
    #[default]
    Handoff,
    /// One `SO_REUSEPORT` listener per worker and a BPF program: the kernel routes, no process in the path.
    Kernel,
}

impl Routing {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Handoff => "handoff",
            Routing::Kernel => "kernel",
        }
    }
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(text: &str) -> Result<Routing, String> {
        match text {
            "handoff" => Ok(Routing::Handoff),
            "kernel" => Ok(Routing::Kernel),
            other => Err(format!("expected handoff or kernel, got {other:?}")),
        }
    }
}

/// How the master gets its workers.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerSource {
    /// The master runs `command` (argv, no shell) once per index and revives it when it dies.
    Spawn {
        /// Program and arguments.
        command: Vec<String>,
        /// Working directory of the workers (the master's when absent).
        cwd: Option<PathBuf>,
    },
    /// Workers in other containers or processes dial `socket` and claim an index.
    Attach(AttachOptions),
}

/// Attach mode: the Unix socket workers dial and who may dial it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachOptions {
    /// Path of the Unix socket (on a volume shared with the workers).
    pub socket: PathBuf,
    /// File mode of the socket, such as `0o660`.
    pub mode: u32,
    /// Uids allowed to attach besides the master's own uid (checked with SO_PEERCRED).
    pub allow_uids: Vec<u32>,
}

/// Defaults as in the npm module: port 8080, dual-stack, one worker per CPU, 60 s hard delay (all in
/// [`defaults`]).
impl Default for Config {
    fn default() -> Self {
        Config {
            port: defaults::PORT,
            host: defaults::HOST.into(),
            // Bounded, so that a machine with more CPUs than workers a cluster may have still gets a valid default.
            concurrency: std::thread::available_parallelism()
                .map_or(defaults::MIN_CONCURRENCY, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .clamp(defaults::MIN_CONCURRENCY, defaults::MAX_CONCURRENCY),
            debug: defaults::DEBUG,
            prefix: defaults::PREFIX.into(),
            hard_shutdown_delay: defaults::HARD_SHUTDOWN_DELAY,
            env: BTreeMap::new(),
            workers: WorkerSource::Spawn { command: Vec::new(), cwd: None },
            queue_limit: defaults::QUEUE_LIMIT,
            queue_max_wait: defaults::QUEUE_MAX_WAIT,
            queue_per_source: defaults::QUEUE_PER_SOURCE,
            metrics: None,
            client_address: ClientAddressSource::Peer,
            trusted_proxies: TrustedProxies::default(),
            header_wait_limit: defaults::HEADER_WAIT_LIMIT,
            header_wait_max_wait: defaults::HEADER_WAIT_MAX_WAIT,
            routing: Routing::Handoff,
            backlog: defaults::BACKLOG,
            worker_protocol: WorkerProtocol::Channel,
        }
    }
}

/// `0o660`, `0660` (a leading zero marks octal, as chmod reads it) up to 0777; anything else is refused.
pub fn parse_file_mode(text: &str) -> std::result::Result<u32, String> {
    let bad = || format!("{text:?} is not an octal file mode: write it as \"0660\" or 0o660");
    let digits = text.strip_prefix("0o").or_else(|| text.strip_prefix('0').filter(|rest| !rest.is_empty()));
    match digits {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) => {
            match u32::from_str_radix(digits, 8) {
                Ok(mode) if mode <= 0o777 => Ok(mode),
                _ => Err(format!("{text:?} is more than 0777 (setuid, setgid and sticky bits are not allowed)")),
            }
        }
        _ => Err(bad()),
    }
}

/// Parses `1500`, `1500ms`, `60s`, `2m`, `1h` (a bare number is milliseconds, as in the npm module).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration (examples: 1500, \"1500ms\", \"60s\", \"2m\")");
    let amount: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit.trim() {
        "" | "ms" => amount,
        "s" => amount.saturating_mul(1000),
        "m" => amount.saturating_mul(60_000),
        "h" => amount.saturating_mul(3_600_000),
        _ => return Err(bad()),
    };
    Ok(Duration::from_millis(millis))
}

/// Command-line values that override the file (each `None` when not given).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--port`.
    pub port: Option<u16>,
    /// `--host`.
    pub host: Option<String>,
    /// `--concurrency`.
    pub concurrency: Option<u32>,
    /// `--debug`.
    pub debug: bool,
    /// `--hard-shutdown-delay`.
    pub hard_shutdown_delay: Option<Duration>,
    /// The worker command after `--`.
    pub command: Vec<String>,
    /// `--trusted-proxy` (repeatable): replaces the file's `trustedProxies` when given.
    pub trusted_proxies: Vec<Cidr>,
    /// `--routing`.
    pub routing: Option<Routing>,
    /// `--protocol`.
    pub protocol: Option<WorkerProtocol>,
}

impl Config {
    /// Reads and validates a YAML file; errors name the file, the key and its line.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ConfigRead { path: path.to_path_buf(), source })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// Parses YAML text; `origin` names it in errors (usually the file path).
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config> {
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|error| Error::Config(yaml_error_line(origin, &error)))?
        };
        let defaults = Config::default();
        let worker_protocol = file.worker.as_ref().and_then(|worker| worker.protocol).unwrap_or_default();
        if let (WorkerProtocol::None, Some(queue)) = (worker_protocol, &file.queue) {
            let key = if queue.limit.is_some() { "queue.limit" } else { "queue.maxWait" };
            return Err(Error::Config(format!(
                "{origin}: {key}: does not apply to `worker.protocol: none` (such a worker's clients wait in its \
                 own listener's accept queue, bounded by `backlog`); remove it"
            )));
        }
        let workers = match (file.workers, file.worker) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(format!(
                    "{origin}: `worker` (spawn mode) and `workers` (attach mode) exclude each other; keep one"
                )))
            }
            (Some(attach), None) => WorkerSource::Attach(AttachOptions {
                socket: attach.socket,
                mode: attach.mode.map_or(defaults::ATTACH_MODE, |m| m.0),
                allow_uids: attach.allow_uids,
            }),
            (None, worker) => {
                let worker = worker.unwrap_or_default();
                WorkerSource::Spawn { command: worker.command.map(|a| a.0).unwrap_or_default(), cwd: worker.cwd }
            }
        };
        let queue = file.queue.unwrap_or_default();
        let header_wait = file.header_wait.unwrap_or_default();
        let config = Config {
            port: file.port.unwrap_or(defaults.port),
            host: file.host.unwrap_or(defaults.host),
            concurrency: file.concurrency.map_or(defaults.concurrency, |c| c.0),
            debug: file.debug.unwrap_or(defaults.debug),
            prefix: file.prefix.unwrap_or(defaults.prefix),
            hard_shutdown_delay: file.hard_shutdown_delay.map_or(defaults.hard_shutdown_delay, |m| m.0),
            env: file.env.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
            workers,
            queue_limit: queue.limit.map_or(defaults.queue_limit, |l| l.0 as usize),
            queue_max_wait: queue.max_wait.map_or(defaults.queue_max_wait, |m| m.0),
            queue_per_source: queue.per_source.map_or(defaults.queue_per_source, |l| l.0 as usize),
            client_address: file.client_address.unwrap_or_default(),
            trusted_proxies: TrustedProxies(
                file.trusted_proxies.unwrap_or_default().into_iter().map(|c| c.0).collect(),
            ),
            header_wait_limit: header_wait.limit.map_or(defaults.header_wait_limit, |l| l.0 as usize),
            header_wait_max_wait: header_wait.max_wait.map_or(defaults.header_wait_max_wait, |m| m.0),
            metrics: file
                .metrics
                .map(|m| SocketAddr::new(m.host.unwrap_or(IpAddr::V4(defaults::METRICS_HOST)), m.port)),
            routing: file.routing.unwrap_or_default(),
            backlog: file.backlog.map_or(defaults.backlog, |b| b.0),
            worker_protocol,
        };
        // The values the file set are checked now, while their lines are known; the combinations wait
        // for the flags (`apply`).
        config.check_values().map_err(|invalid| match line_of(text, invalid.key) {
            Some(line) => Error::Config(format!("{origin}:{line}: {invalid}")),
            None => Error::Config(format!("{origin}: {invalid}")),
        })?;
        Ok(config)
    }

    /// Applies command-line overrides, then [`Config::validate`]s the result. An error names the flag when
    /// a flag set the value, else `origin` (usually the file).
    pub fn apply(mut self, overrides: Overrides, origin: &str) -> Result<Config> {
        // The keys a flag set, so that their errors name the flag the user typed.
        let flags: Vec<(&str, &str)> = [
            ("concurrency", overrides.concurrency.is_some(), "--concurrency"),
            ("hardShutdownDelay", overrides.hard_shutdown_delay.is_some(), "--hard-shutdown-delay"),
        ]
        .into_iter()
        .filter(|&(_, given, _)| given)
        .map(|(key, _, flag)| (key, flag))
        .collect();
        if let Some(port) = overrides.port {
            self.port = port;
        }
        if let Some(host) = overrides.host {
            self.host = host;
        }
        if let Some(concurrency) = overrides.concurrency {
            self.concurrency = concurrency;
        }
        self.debug |= overrides.debug;
        if let Some(delay) = overrides.hard_shutdown_delay {
            self.hard_shutdown_delay = delay;
        }
        if !overrides.command.is_empty() {
            match &mut self.workers {
                WorkerSource::Spawn { command, .. } => *command = overrides.command,
                WorkerSource::Attach(_) => {
                    return Err(Error::Config(format!(
                        "{origin}: a worker command after `--` needs spawn mode, but `workers` selects attach mode"
                    )))
                }
            }
        }
        if let Some(routing) = overrides.routing {
            self.routing = routing;
        }
        if let Some(protocol) = overrides.protocol {
            self.worker_protocol = protocol;
        }
        if !overrides.trusted_proxies.is_empty() {
            self.trusted_proxies = TrustedProxies(overrides.trusted_proxies);
        }
        self.validate().map_err(|invalid| match flags.iter().find(|(key, _)| *key == invalid.key) {
            Some((_, flag)) => Error::Config(invalid.naming(flag)),
            None => Error::Config(format!("{origin}: {invalid}")),
        })?;
        Ok(self)
    }

    /// The socket addresses to try, in order: the configured host, then `0.0.0.0` when the default
    /// dual-stack `::` is asked for on a machine without IPv6.
    pub fn listen_addresses(&self) -> Result<Vec<SocketAddr>> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            let mut addresses = vec![SocketAddr::new(ip, self.port)];
            if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
                addresses.push(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), self.port));
            }
            return Ok(addresses);
        }
        (host, self.port)
            .to_socket_addrs()
            .map(|found| found.collect())
            .map_err(|e| Error::Config(format!("host: cannot resolve {host:?}: {e}")))
    }

    /// The configuration as YAML, as `--check` prints it.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let quote = |text: &str| format!("{text:?}");
        out += &format!(
            "port: {}\nhost: {}\nconcurrency: {}\ndebug: {}\n",
            self.port,
            quote(&self.host),
            self.concurrency,
            self.debug
        );
        out +=
            &format!("prefix: {}\nhardShutdownDelay: {}\n", quote(&self.prefix), self.hard_shutdown_delay.as_millis());
        if self.env.is_empty() {
            out += "env: {}\n";
        } else {
            out += "env:\n";
            for (key, value) in &self.env {
                out += &format!("  {}: {}\n", quote(key), quote(value));
            }
        }
        match &self.workers {
            WorkerSource::Spawn { command, cwd } => {
                let argv: Vec<String> = command.iter().map(|a| quote(a)).collect();
                out += &format!("worker:\n  command: [{}]\n", argv.join(", "));
                if let Some(cwd) = cwd {
                    out += &format!("  cwd: {}\n", quote(&cwd.display().to_string()));
                }
                out += &format!("  protocol: {}\n", self.worker_protocol.as_str());
            }
            WorkerSource::Attach(attach) => {
                out += &format!(
                    "workers:\n  socket: {}\n  mode: \"{:04o}\"\n  allowUids: {:?}\n",
                    quote(&attach.socket.display().to_string()),
                    attach.mode,
                    attach.allow_uids
                );
            }
        }
        out += &format!(
            "queue:\n  limit: {}\n  maxWait: {}\n  perSource: {}\n",
            self.queue_limit,
            self.queue_max_wait.as_millis(),
            self.queue_per_source
        );
        out += &format!("clientAddress: {}\n", self.client_address.as_str());
        let proxies: Vec<String> = self.trusted_proxies.0.iter().map(|c| quote(&c.to_string())).collect();
        out += &format!("trustedProxies: [{}]\n", proxies.join(", "));
        out += &format!(
            "headerWait:\n  limit: {}\n  maxWait: {}\n",
            self.header_wait_limit,
            self.header_wait_max_wait.as_millis()
        );
        out += &format!("routing: {}\nbacklog: {}\n", self.routing.as_str(), self.backlog);
        if let Some(metrics) = self.metrics {
            out += &format!("metrics:\n  host: {}\n  port: {}\n", quote(&metrics.ip().to_string()), metrics.port());
        }
        out
    }
}

/// `file:line: key: message`, from a YAML error whose text ends in ` at line L column C`.
fn yaml_error_line(origin: &str, error: &serde_yaml::Error) -> String {
    let text = error.to_string();
    match error.location() {
        Some(location) => {
            let suffix = format!(" at line {} column {}", location.line(), location.column());
            let message = text.strip_suffix(&suffix).unwrap_or(&text);
            let message = message.replace("unknown field", "unknown key");
            format!("{origin}:{}: {message}", location.line())
        }
        None => format!("{origin}: {text}"),
    }
}
