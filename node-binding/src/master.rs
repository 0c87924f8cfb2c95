//! The master inside the Node primary process: bind at once (so `EADDRINUSE` reaches `errorHandler`
//! synchronously), then run core's master on one dedicated thread until JS asks it to stop.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use napi::bindgen_prelude::{Either, Unknown};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use sticky_cluster::client_address::{Cidr, ClientAddressSource, TrustedProxies};
use sticky_cluster::config::{defaults, Routing};
use sticky_cluster::master::{self, Stop};
use sticky_cluster::ready::{self, ReadyFd};
use sticky_cluster::{Config, Error, WorkerSource};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// The cluster options after `index.js` applied the npm module's defaults.
#[napi(object)]
pub struct ClusterOptions {
    /// TCP port clients connect to (0 picks a free one). Numbers arrive as JS numbers (f64) so that no
    /// value is wrapped to 32 bits on the way (2^32 + 1 would be 1).
    pub port: f64,
    /// Address to listen on; `::` is dual-stack, like Node.
    pub host: String,
    /// Number of workers.
    pub concurrency: f64,
    /// Log every worker start/exit and every routed connection.
    pub debug: bool,
    /// Text in front of every log line.
    pub prefix: String,
    /// Milliseconds a graceful shutdown may take before the remaining workers are killed.
    pub hard_shutdown_delay_ms: f64,
    /// The worker command: `process.execPath`, `process.execArgv`, the script and its arguments.
    pub command: Vec<String>,
    /// Extra environment for every worker (`{index}` in a value becomes the worker's index).
    pub env: HashMap<String, String>,
    /// Where the routing hash takes the client address from: `peer` (default), `proxy-protocol` or
    /// `x-forwarded-for`.
    pub client_address: Option<String>,
    /// Proxies whose headers are believed: addresses or CIDR blocks; required unless `clientAddress` is `peer`.
    pub trusted_proxies: Option<Vec<String>>,
    /// `handoff` (the default: the master hands each socket on) or `kernel` (each worker accepts from its
    /// own SO_REUSEPORT listener; a BPF program routes).
    pub routing: Option<String>,
    /// Listen backlog of the client listener (of each worker's listener with `routing: kernel`).
    pub backlog: Option<f64>,
    /// `queue.limit`: connections that may wait for one worker that is not taking them.
    pub queue_limit: Option<f64>,
    /// `queue.maxWait`: milliseconds a connection may wait for its worker before it goes to the next one.
    pub queue_max_wait_ms: Option<f64>,
    /// `queue.perSource`: connections of one client address that may wait in the master at once.
    pub queue_per_source: Option<f64>,
    /// The IP address of the Prometheus page (with `metricsPort`).
    pub metrics_host: Option<String>,
    /// The port of the Prometheus page (`GET /metrics`); none when absent.
    pub metrics_port: Option<f64>,
    /// The fd the binary's `--ready-fd` lines go to (`STICKY_CLUSTER_READY_FD`, read by the JS front);
    /// `startCluster` only, a reload ignores it.
    pub ready_fd: Option<f64>,
}

/// Why the listener could not be opened: the OS error number and the address, for a Node-style Error.
#[napi(object)]
pub struct ListenFailure {
    /// The positive OS error number (`EADDRINUSE` is 98 on Linux).
    pub errno: i32,
    /// The operating system's text for it.
    pub message: String,
    /// The IP address that was asked for.
    pub address: String,
    /// The port that was asked for.
    pub port: u32,
}

/// How a cluster run ended, handed to the `onEnd` callback once.
#[napi(object)]
pub struct ClusterEnd {
    /// Every worker exited on its own within the hard shutdown delay.
    pub graceful: bool,
    /// Why the master stopped on its own (a worker could not be started, ...), if it did.
    pub error: Option<String>,
    /// Connections handed to each worker index.
    pub routed: Vec<i64>,
    /// Worker processes started again after one died.
    pub revivals: i64,
}

/// A running master, owned by the JS side; `stop` is the only way in once it runs.
#[napi]
pub struct Cluster {
    stop: UnboundedSender<Stop>,
    address: String,
    port: u32,
}

/// What `startCluster` gives back: the running cluster, or why it could not listen.
pub type StartResult = Either<Cluster, ListenFailure>;

type EndCallback = ThreadsafeFunction<ClusterEnd, Unknown<'static>, ClusterEnd, Status, false>;

#[napi]
impl Cluster {
    /// Asks the master to stop: gracefully first, at once when `hard` (a second signal). Returns false
    /// when the master has already ended.
    #[napi]
    pub fn stop(&self, hard: bool) -> bool {
        let request = if hard { Stop::Hard } else { Stop::Graceful };
        self.stop.send(request).is_ok()
    }

    /// Applies new options to the running master (core's `Stop::Reload`): workers whose environment or
    /// command changed are restarted one at a time, each successor ready before the next stops; port,
    /// host, concurrency, routing, backlog, debug and prefix need a restart (core logs that). Throws
    /// for an option out of bounds; returns false when the master has already ended.
    #[napi]
    pub fn reload(&self, options: ClusterOptions) -> napi::Result<bool> {
        let config = config_from(options)?;
        Ok(self.stop.send(Stop::Reload(Box::new(config))).is_ok())
    }

    /// The IP address the listener is bound to, as Node prints it (`::`, `127.0.0.1`).
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The port the listener is bound to (the real one when 0 was asked for).
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }
}

/// Checks the options as `startCluster` would, without starting anything: throws the same one line.
#[napi]
pub fn check_options(options: ClusterOptions) -> napi::Result<()> {
    config_from(options).map(|_| ())
}

/// Binds the client listener and starts the workers on a dedicated master thread. A listen error comes
/// back as a [`ListenFailure`] (not thrown) so JS can build the Node-style Error for `errorHandler`;
/// `on_end` is called once when the master has stopped. With `readyFd`, the binary's ready lines
/// (`listening`, `stopped` with the counters, `error`) are written there.
#[napi]
pub fn start_cluster(mut options: ClusterOptions, on_end: EndCallback) -> napi::Result<StartResult> {
    let ready_fd = options.ready_fd.take();
    let config = config_from(options)?;
    // Taken once the options are known good: until then the front writes an `error` line itself.
    let ready = take_ready_fd(ready_fd)?;
    sticky_cluster::logging::init(&config.prefix, config.debug);
    let listener = match master::bind(&config) {
        Ok(listener) => listener,
        Err(error) => {
            if let Some(ready) = &ready {
                ready.error(&error);
            }
            let Error::Listen { address, source } = error else {
                return Err(napi::Error::from_reason(error.to_string()));
            };
            return Ok(Either::B(ListenFailure {
                errno: source.raw_os_error().unwrap_or(0),
                message: source.to_string(),
                address: sticky_cluster::hash::node_address_text(address.ip()),
                port: u32::from(address.port()),
            }));
        }
    };
    let bound =
        listener.local_addr().map_err(|e| napi::Error::from_reason(format!("read the listener address: {e}")))?;
    let (stop, stop_rx) = unbounded_channel();
    let_workers_inherit_stdio();
    // One thread for the master's whole life: workers' PR_SET_PDEATHSIG is tied to the spawning thread.
    std::thread::Builder::new()
        .name("sticky-cluster-master".into())
        .spawn(move || {
            let listening = |at: &master::Listening| {
                if let Some(ready) = &ready {
                    ready.write(ready::Event::Listening(ready::Listening::built(at, BUILD.into())));
                }
            };
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("start the master's runtime", e))
                .and_then(|runtime| runtime.block_on(master::run_reporting(config, listener, stop_rx, listening)));
            match (&outcome, &ready) {
                (Ok(outcome), Some(ready)) => ready.stopped(outcome),
                (Err(error), Some(ready)) => ready.error(error),
                (_, None) => {}
            }
            let end = match outcome {
                Ok(outcome) => ClusterEnd {
                    graceful: outcome.graceful,
                    error: None,
                    routed: outcome.stats.routed.iter().map(|&n| n.min(i64::MAX as u64) as i64).collect(),
                    revivals: outcome.stats.revivals.min(i64::MAX as u64) as i64,
                },
                Err(error) => {
                    ClusterEnd { graceful: false, error: Some(error.to_string()), routed: Vec::new(), revivals: 0 }
                }
            };
            on_end.call(end, ThreadsafeFunctionCallMode::Blocking);
            // Dropping `on_end` here releases the event loop: the primary process may now exit.
        })
        .map_err(|e| napi::Error::from_reason(format!("start the master thread: {e}")))?;
    Ok(Either::A(Cluster {
        stop,
        address: sticky_cluster::hash::node_address_text(bound.ip()),
        port: u32::from(bound.port()),
    }))
}

/// What the `listening` line says as `build` in the Node addon: the package and its version (the
/// executable is the JavaScript runtime, which an upgrade of this package does not change).
const BUILD: &str = concat!("sticky-cluster-native@", env!("CARGO_PKG_VERSION"));

/// The ready fd JS read from `STICKY_CLUSTER_READY_FD`, taken (close-on-exec, so no worker holds it);
/// a number that is not an fd open for writing is the one-line TypeError the variable's name starts.
fn take_ready_fd(fd: Option<f64>) -> napi::Result<Option<ReadyFd>> {
    let Some(fd) = fd else { return Ok(None) };
    let refuse = |reason: String| {
        napi::Error::new(Status::InvalidArg, format!("{}={}: {reason}", ready::ENV_READY_FD, js_number(fd)))
    };
    if fd.fract() != 0.0 || !(0.0..=f64::from(i32::MAX)).contains(&fd) {
        return Err(refuse("not an fd number".into()));
    }
    ReadyFd::take(fd as i32).map(Some).map_err(refuse)
}

/// Node marks fds 0-2 close-on-exec at start (libuv's `uv_disable_stdio_inheritance`), and core spawns
/// workers with inherited stdio: without this, a worker's stdout and stderr would be `/dev/null`.
fn let_workers_inherit_stdio() {
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: fcntl on the process's own standard fds only reads and clears a descriptor flag.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
        }
    }
}

/// The longest `hardShutdownDelay` and `queue.maxWait` (Node's largest timer), as core bounds them.
const MAX_DELAY_MS: f64 = defaults::MAX_HARD_SHUTDOWN_DELAY_MS as f64;
/// The largest count a JS number reaches this binding as (backlog, queue.limit): a u32.
const MAX_COUNT: f64 = u32::MAX as f64;

/// A number as JavaScript prints it (`4000000000`, `1.5`, `Infinity`, `1e+21`): the text after `got`.
fn js_number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if value != 0.0 && (value.abs() >= 1e21 || value.abs() < 1e-6) {
        let text = format!("{value:e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with('-') => format!("{mantissa}e+{exponent}"),
            _ => text,
        }
    } else {
        format!("{value}")
    }
}

/// `value` within `min..=max` (and whole when asked), or the one-line message js/validate.js gives too.
/// Only what a JS number can be but core's integer types cannot (fractions, signs, sizes) is checked
/// here, with core's own bounds; `Config::validate` then checks the configuration as for every front end.
fn bounded(name: &str, value: f64, whole: bool, min: f64, max: f64) -> napi::Result<f64> {
    let refuse = |message: String| Err(napi::Error::new(Status::InvalidArg, format!("{name}: {message}")));
    if value.is_nan() {
        return refuse("must be a number, got NaN".into());
    }
    if value < min {
        return refuse(format!("must be at least {}, got {}", js_number(min), js_number(value)));
    }
    if value > max {
        return refuse(format!("must be at most {}, got {}", js_number(max), js_number(value)));
    }
    if whole && value.fract() != 0.0 {
        return refuse(format!("must be a whole number, got {}", js_number(value)));
    }
    Ok(value)
}

/// Turns the JS options into a core [`Config`] checked by `Config::validate`; bad values are one clear
/// thrown message, in core's words.
fn config_from(options: ClusterOptions) -> napi::Result<Config> {
    let invalid = |message: String| napi::Error::new(Status::InvalidArg, message);
    // The order is js/validate.js's, so the first bad option is the same one in both implementations.
    let (min, max) = (f64::from(defaults::MIN_CONCURRENCY), f64::from(defaults::MAX_CONCURRENCY));
    let concurrency = bounded("concurrency", options.concurrency, true, min, max)? as u32;
    let port = bounded("port", options.port, true, 0.0, 65535.0)? as u16;
    let delay = bounded("hardShutdownDelay", options.hard_shutdown_delay_ms, false, 0.0, MAX_DELAY_MS)?;
    let defaults = Config::default();
    let backlog = match options.backlog {
        None => defaults.backlog,
        Some(backlog) => bounded("backlog", backlog, true, 1.0, MAX_COUNT)? as u32,
    };
    let queue_limit = match options.queue_limit {
        None => defaults.queue_limit,
        Some(limit) => bounded("queue.limit", limit, true, 1.0, MAX_COUNT)? as usize,
    };
    let queue_max_wait = match options.queue_max_wait_ms {
        None => defaults.queue_max_wait,
        Some(ms) => Duration::from_millis(bounded("queue.maxWait", ms, false, 0.0, MAX_DELAY_MS)? as u64),
    };
    let queue_per_source = match options.queue_per_source {
        None => defaults.queue_per_source,
        Some(count) => bounded("queue.perSource", count, true, 1.0, MAX_COUNT)? as usize,
    };
    let metrics = match options.metrics_port {
        None => None,
        Some(port) => {
            let port = bounded("metrics.port", port, true, 0.0, 65535.0)? as u16;
            let host = options.metrics_host.as_deref().unwrap_or("127.0.0.1");
            let ip: IpAddr = host.parse().map_err(|_| invalid(format!("metrics.host: not an IP address: {host:?}")))?;
            Some(SocketAddr::new(ip, port))
        }
    };
    let client_address = match options.client_address.as_deref() {
        None => ClientAddressSource::Peer,
        Some(text) => text.parse().map_err(|reason| invalid(format!("clientAddress: {reason}")))?,
    };
    let mut trusted_proxies = Vec::new();
    for (position, text) in options.trusted_proxies.unwrap_or_default().iter().enumerate() {
        let cidr: Cidr = text.parse().map_err(|reason| invalid(format!("trustedProxies[{position}]: {reason}")))?;
        trusted_proxies.push(cidr);
    }
    let routing = match options.routing.as_deref() {
        None => Routing::Handoff,
        Some(text) => text.parse::<Routing>().map_err(|reason| invalid(format!("routing: {reason}")))?,
    };
    let config = Config {
        routing,
        backlog,
        queue_limit,
        queue_max_wait,
        queue_per_source,
        metrics,
        port,
        host: options.host,
        concurrency,
        debug: options.debug,
        prefix: options.prefix,
        hard_shutdown_delay: Duration::from_millis(delay as u64),
        env: options.env.into_iter().collect::<BTreeMap<_, _>>(),
        workers: WorkerSource::Spawn { command: options.command, cwd: None },
        client_address,
        trusted_proxies: TrustedProxies(trusted_proxies),
        ..defaults
    };
    config.validate().map_err(|problem| invalid(problem.to_string()))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_javascript_prints_them() {
        let cases = [(4e9, "4000000000"), (1.5, "1.5"), (f64::INFINITY, "Infinity"), (1e21, "1e+21"), (-2.0, "-2")];
        for (value, text) in cases {
            assert_eq!(js_number(value), text);
        }
        assert_eq!(js_number(1e-7), "1e-7");
    }

    #[test]
    fn a_bound_names_the_option_and_the_value() {
        let message = |result: napi::Result<f64>| result.map_err(|e| e.reason.clone()).unwrap_err();
        assert_eq!(
            message(bounded("concurrency", 4e9, true, 1.0, f64::from(defaults::MAX_CONCURRENCY))),
            "concurrency: must be at most 1024, got 4000000000"
        );
        assert_eq!(
            message(bounded("concurrency", 1.5, true, 1.0, 9.0)),
            "concurrency: must be a whole number, got 1.5"
        );
        assert_eq!(message(bounded("port", -1.0, true, 0.0, 9.0)), "port: must be at least 0, got -1");
        assert_eq!(bounded("hardShutdownDelay", 1.5, false, 0.0, MAX_DELAY_MS).ok(), Some(1.5));
    }
}
