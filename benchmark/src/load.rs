//! The load generator of the handoff benchmark: new TCP connections from many loopback source addresses
//! (127.a.b.c), one small HTTP request each, the reply read to the end and checked, for a fixed time or count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sticky_cluster::hash::string_hash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// The request every connection sends.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: sticky-cluster-bench\r\n\r\n";
/// Longest a single connection may take before it counts as an error.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Error texts kept for the report (the counts cover the rest).
const KEPT_ERRORS: usize = 5;

/// What the replies must show besides `HTTP/1.1 200`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyCheck {
    /// `"remote"` names the source address the connection was bound to.
    Remote,
    /// As `Remote`, and `"worker"` is the index our routing hash gives that address text.
    RemoteAndIndex {
        /// The cluster's worker count.
        concurrency: u32,
    },
    /// Behind a proxy that hashes by its own rule: `"remote"` is the proxy's address (127.0.0.1), and every
    /// source address is answered by one worker throughout the run (another one counts as misrouted).
    Sticky,
}

/// How to load a server.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The server's address (IPv4 loopback: source addresses are 127.a.b.c).
    pub target: SocketAddr,
    /// Stop starting connections after this long.
    pub duration: Duration,
    /// Stop after this many connections were started, if set.
    pub max_connections: Option<u64>,
    /// Connections open at once.
    pub in_flight: usize,
    /// Distinct source addresses to cycle through.
    pub sources: u32,
    /// Threads of the client runtime.
    pub threads: usize,
    /// What each reply must show.
    pub check: ReplyCheck,
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Connections answered with a correct reply.
    pub completed: u64,
    /// Connections that failed (refused, reset, timed out, wrong or short reply).
    pub errors: u64,
    /// Correct replies from a worker other than the one our hash names (only with `RemoteAndIndex`).
    pub misrouted: u64,
    /// Under `ReplyCheck::Sticky`: correct replies to a source address that had been answered before, i.e. the
    /// connections whose stickiness was checked.
    pub revisits: u64,
    /// From the first connection to the end of the last.
    pub elapsed: Duration,
    /// Connect-to-reply latency of each completed connection, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// The first few error texts.
    pub first_errors: Vec<String>,
    /// Correct replies per worker index (index 0 first), from the replies' `"worker"`.
    pub per_worker: Vec<u64>,
}

impl LoadReport {
    /// Completed connections per second.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in milliseconds (`q` in 0..=1); 0 when nothing completed.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.latencies_us.len() as f64) as usize).min(self.latencies_us.len() - 1);
        f64::from(self.latencies_us[rank]) / 1e3
    }
}

/// The `k`-th source address: 127.a.b.c with a from 1, b from 0 to 249 and c from 1 to 250. Consecutive
/// addresses differ in b, so that even a few of them lie in as many /24 networks: nginx's `ip_hash` hashes only
/// the first three octets of an IPv4 address, and would send 250 neighbours in one /24 to one worker.
pub fn source_address(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (k / 62_500) as u8, (k % 250) as u8, ((k / 250) % 250) as u8 + 1)
}

struct Shared {
    options: LoadOptions,
    deadline: Instant,
    started: AtomicU64,
    /// Under `ReplyCheck::Sticky`: the worker that first answered each source address.
    first_worker: Mutex<HashMap<Ipv4Addr, u32>>,
    revisits: AtomicU64,
}

#[derive(Default)]
struct TaskReport {
    completed: u64,
    errors: u64,
    misrouted: u64,
    latencies_us: Vec<u32>,
    first_errors: Vec<String>,
    per_worker: Vec<u64>,
}

/// Runs the load and reports it; the error is a failure to start the client runtime.
pub fn run(options: &LoadOptions) -> std::io::Result<LoadReport> {
    let runtime = runtime(options.threads)?;
    runtime.block_on(async {
        let started = Instant::now();
        let shared = Arc::new(Shared {
            options: options.clone(),
            deadline: started + options.duration,
            started: AtomicU64::new(0),
            first_worker: Mutex::new(HashMap::new()),
            revisits: AtomicU64::new(0),
        });
        let tasks: Vec<_> = (0..options.in_flight.max(1)).map(|_| tokio::spawn(client(shared.clone()))).collect();
        let mut report = LoadReport::default();
        for task in tasks {
            let part = task.await.unwrap_or_default();
            report.completed += part.completed;
            report.errors += part.errors;
            report.misrouted += part.misrouted;
            report.latencies_us.extend(part.latencies_us);
            add_counts(&mut report.per_worker, &part.per_worker);
            for error in part.first_errors {
                if report.first_errors.len() < KEPT_ERRORS {
                    report.first_errors.push(error);
                }
            }
        }
        report.revisits = shared.revisits.load(Ordering::Relaxed);
        report.elapsed = started.elapsed();
        report.latencies_us.sort_unstable();
        Ok(report)
    })
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

async fn client(shared: Arc<Shared>) -> TaskReport {
    let options = &shared.options;
    let mut report = TaskReport::default();
    loop {
        let k = shared.started.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= shared.deadline || options.max_connections.is_some_and(|max| k >= max) {
            break;
        }
        let source = source_address((k % u64::from(options.sources.max(1))) as u32);
        let began = Instant::now();
        let outcome = match tokio::time::timeout(CONNECTION_TIMEOUT, request(source, options.target)).await {
            Ok(Ok(reply)) => {
                let worker = json_field(&String::from_utf8_lossy(&reply), "worker").and_then(|w| w.parse().ok());
                if let Some(worker) = worker.filter(|&w: &usize| w < 1024) {
                    if report.per_worker.len() <= worker {
                        report.per_worker.resize(worker + 1, 0);
                    }
                    report.per_worker[worker] += 1;
                }
                check_reply(&reply, source, options.check).and_then(|right| match options.check {
                    ReplyCheck::Sticky => same_worker_as_before(&shared, &reply, source),
                    _ => Ok(right),
                })
            }
            Ok(Err(error)) => Err(format!("from {source}: {error}")),
            Err(_) => Err(format!("from {source}: no reply within {CONNECTION_TIMEOUT:?}")),
        };
        match outcome {
            Ok(routed_right) => {
                report.completed += 1;
                report.misrouted += u64::from(!routed_right);
                report.latencies_us.push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(error) => {
                report.errors += 1;
                if report.first_errors.len() < KEPT_ERRORS {
                    report.first_errors.push(error);
                }
            }
        }
    }
    report
}

/// Under `ReplyCheck::Sticky`: whether the worker that answered is the one that answered `source` first.
fn same_worker_as_before(shared: &Shared, reply: &[u8], source: Ipv4Addr) -> Result<bool, String> {
    let text = String::from_utf8_lossy(reply);
    let worker = json_field(&text, "worker").and_then(|w| w.parse::<u32>().ok());
    let worker = worker.ok_or_else(|| format!("from {source}: reply has no worker index"))?;
    let mut first = shared.first_worker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match first.get(&source) {
        Some(&earlier) => {
            shared.revisits.fetch_add(1, Ordering::Relaxed);
            Ok(earlier == worker)
        }
        None => {
            first.insert(source, worker);
            Ok(true)
        }
    }
}

/// Adds `more` into `total` element by element, growing `total` as needed.
pub fn add_counts(total: &mut Vec<u64>, more: &[u64]) {
    if total.len() < more.len() {
        total.resize(more.len(), 0);
    }
    for (sum, count) in total.iter_mut().zip(more) {
        *sum += count;
    }
}

/// One connection from `source`: connect, send the request, read the reply until the server closes.
pub async fn request(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<Vec<u8>> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if target.is_ipv4() {
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    // Close with RST once the reply is read: the server closed first, so its side would sit in TIME_WAIT, and
    // on loopback the kernel reuses client ports without seeing those entries: a SYN that lands on one is
    // answered with a stale ACK and retried after 1 s, 3 s, 7 s. Aborting leaves no TIME_WAIT on either side.
    socket.set_zero_linger()?;
    let mut stream = socket.connect(target).await?;
    stream.write_all(REQUEST).await?;
    let mut reply = Vec::with_capacity(256);
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

/// IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect time from the whole 4-tuple, so binding a source
/// address does not reserve a port per address and many sources never exhaust the ephemeral range.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Checks a reply; `Ok(false)` means correct but answered by another worker than our hash names.
pub fn check_reply(reply: &[u8], source: Ipv4Addr, check: ReplyCheck) -> Result<bool, String> {
    let text = String::from_utf8_lossy(reply);
    if !text.starts_with("HTTP/1.1 200") {
        let first_line = text.lines().next().unwrap_or("(empty reply)");
        return Err(format!("from {source}: unexpected reply {first_line:?}"));
    }
    let remote = json_field(&text, "remote").ok_or_else(|| format!("from {source}: reply has no remote"))?;
    // Behind a proxy the worker's peer is the proxy, and the connection that reached it is the proxy's.
    let expected = if check == ReplyCheck::Sticky { Ipv4Addr::LOCALHOST } else { source };
    let expected_text = expected.to_string();
    if remote != expected_text && remote.strip_prefix("::ffff:") != Some(expected_text.as_str()) {
        return Err(format!("from {source}: reply names remote {remote}, not {expected}"));
    }
    match check {
        ReplyCheck::Remote | ReplyCheck::Sticky => Ok(true),
        ReplyCheck::RemoteAndIndex { concurrency } => {
            let worker = json_field(&text, "worker").and_then(|w| w.parse::<u32>().ok());
            let worker = worker.ok_or_else(|| format!("from {source}: reply has no worker index"))?;
            Ok(worker == string_hash(remote) % concurrency.max(1))
        }
    }
}

/// The value of `"name":` in the flat JSON body, without quotes.
fn json_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":");
    let start = text.find(&key)? + key.len();
    let rest = &text[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ',', '}'])?;
    Some(&rest[..end])
}

/// Polls with single requests until the server answers 200, or gives up after `limit`.
pub fn wait_until_answering(target: SocketAddr, limit: Duration) -> Result<(), String> {
    let runtime = runtime(1).map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(async {
        let until = Instant::now() + limit;
        let mut last = String::from("no attempt");
        while Instant::now() < until {
            match tokio::time::timeout(Duration::from_secs(2), request(Ipv4Addr::LOCALHOST, target)).await {
                Ok(Ok(reply)) if reply.starts_with(b"HTTP/1.1 200") => return Ok(()),
                Ok(Ok(reply)) => last = format!("reply {:?}", String::from_utf8_lossy(&reply).lines().next()),
                Ok(Err(error)) => last = error.to_string(),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("{target} did not answer within {limit:?} ({last})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_loopback_hosts() {
        let all: std::collections::HashSet<_> = (0..70_000).map(source_address).collect();
        assert_eq!(all.len(), 70_000);
        assert!(all.iter().all(|a| a.octets()[0] == 127 && a.octets()[3] != 0));
        let networks: std::collections::HashSet<_> = (0..200).map(|k| source_address(k).octets()[2]).collect();
        assert_eq!(networks.len(), 200, "the first 200 addresses lie in 200 /24 networks");
    }

    #[test]
    fn a_client_address_answered_by_a_second_worker_counts_as_misrouted() {
        let shared = Shared {
            options: LoadOptions {
                target: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
                duration: Duration::ZERO,
                max_connections: None,
                in_flight: 1,
                sources: 2,
                threads: 1,
                check: ReplyCheck::Sticky,
            },
            deadline: Instant::now(),
            started: AtomicU64::new(0),
            first_worker: Mutex::new(HashMap::new()),
            revisits: AtomicU64::new(0),
        };
        let from =
            |worker: u32| format!("HTTP/1.1 200 OK\r\n\r\n{{\"worker\":{worker},\"remote\":\"::ffff:127.0.0.1\"}}\n");
        let (a, b) = (Ipv4Addr::new(127, 1, 0, 1), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(same_worker_as_before(&shared, from(0).as_bytes(), a), Ok(true));
        assert_eq!(same_worker_as_before(&shared, from(1).as_bytes(), b), Ok(true));
        assert_eq!(same_worker_as_before(&shared, from(0).as_bytes(), a), Ok(true));
        assert_eq!(same_worker_as_before(&shared, from(0).as_bytes(), b), Ok(false));
        assert_eq!(shared.revisits.load(Ordering::Relaxed), 2);
        assert!(same_worker_as_before(&shared, b"HTTP/1.1 200 OK\r\n\r\n{}", a).is_err());
    }

    #[test]
    fn a_reply_is_checked_for_its_remote_and_worker_index() {
        let source = Ipv4Addr::new(127, 1, 0, 1);
        let index = string_hash("::ffff:127.1.0.1") % 4;
        let body = format!("{{\"worker\":{index},\"pid\":7,\"remote\":\"::ffff:127.1.0.1\"}}\n");
        let reply = format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}");
        assert_eq!(check_reply(reply.as_bytes(), source, ReplyCheck::RemoteAndIndex { concurrency: 4 }), Ok(true));
        let other = reply.replace(&format!("\"worker\":{index}"), &format!("\"worker\":{}", (index + 1) % 4));
        assert_eq!(check_reply(other.as_bytes(), source, ReplyCheck::RemoteAndIndex { concurrency: 4 }), Ok(false));
        assert!(check_reply(reply.as_bytes(), Ipv4Addr::new(127, 1, 0, 2), ReplyCheck::Remote).is_err());
        assert!(check_reply(b"HTTP/1.1 503 Busy\r\n\r\n", source, ReplyCheck::Remote).is_err());
        // Through a proxy the worker sees the proxy, not the client.
        assert!(check_reply(reply.as_bytes(), source, ReplyCheck::Sticky).is_err());
        let proxied = reply.replace("127.1.0.1", "127.0.0.1");
        assert_eq!(check_reply(proxied.as_bytes(), source, ReplyCheck::Sticky), Ok(true));
    }
}
