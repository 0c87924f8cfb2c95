//! Connections from trusted proxies waiting for their header: at most `headerWait.limit` at once, each
//! for at most `headerWait.maxWait`, woken by the kernel only when more bytes arrive (SO_RCVLOWAT).
//!
//! A peeked socket stays readable, so waiting for "more" by readiness alone would spin or need a timer.
//! Setting SO_RCVLOWAT just past what was seen makes readiness mean exactly "more bytes (or EOF)": a
//! waiting connection costs a task and its registration, no buffer and no wake-ups until data comes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tracing::{debug, warn};

use super::{decide, ClientAddressSource, Decision, TrustedProxies, PEEK_LIMIT};
use crate::config::Config;

/// How often one trusted peer's broken headers may be logged.
const PEER_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Peers remembered for that rate limit (trusted proxies are few; this bounds a misconfiguration).
const PEER_LOG_CAPACITY: usize = 4096;

/// What the waiting needs to know, replaced as a whole on reload.
#[derive(Debug)]
struct Settings {
    source: ClientAddressSource,
    trusted: TrustedProxies,
    limit: usize,
    max_wait: Duration,
}

/// The counters shared with the waiting tasks.
#[derive(Debug, Default)]
struct Shared {
    waiting: AtomicUsize,
    refused: AtomicU64,
    rejected: AtomicU64,
    timed_out: AtomicU64,
    /// The limit was reached and said so; quiet until the queue has drained to half.
    limit_logged: AtomicBool,
    peer_log: Mutex<HashMap<IpAddr, PeerLog>>,
    /// The connections waiting now, by a number of their own: an upgrade in place hands them over.
    connections: Mutex<HashMap<u64, WaitingConnection>>,
    next_id: AtomicU64,
}

/// A connection waiting for its header, as an upgrade in place hands it to the next image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitingConnection {
    /// Its socket, owned by the task that waits on it.
    pub fd: RawFd,
    /// The TCP peer (a trusted proxy).
    pub peer: SocketAddr,
    /// When it was accepted.
    pub arrived: Instant,
}

#[derive(Debug, Clone, Copy)]
struct PeerLog {
    logged: Instant,
    suppressed: u64,
}

/// Connections waiting for a header, bounded; see the module documentation.
#[derive(Debug)]
pub struct HeaderWait {
    settings: Arc<Settings>,
    shared: Arc<Shared>,
}

/// What became of a new connection at once.
#[derive(Debug)]
pub enum Admission {
    /// Route it now by `client` (no header to wait for: `peer` mode, or a peer that is not trusted).
    Route {
        /// The connection, untouched.
        stream: TcpStream,
        /// The address to route by (the TCP peer).
        client: SocketAddr,
    },
    /// It waits for its header; the callback given to [`HeaderWait::admit`] gets the result.
    Waiting,
    /// Closed: `headerWait.limit` connections are waiting already.
    Refused,
}

/// What became of a connection that waited for its header.
#[derive(Debug)]
pub enum Identified {
    /// Route it by `client`; a PROXY header has been taken off the stream (blocking mode again).
    Route {
        /// The connection, positioned after any PROXY header.
        stream: TcpStream,
        /// The client the header names, or the TCP peer.
        client: SocketAddr,
    },
    /// Closed: a trusted peer sent no valid PROXY header in time, or the connection was lost.
    Closed {
        /// The TCP peer.
        peer: SocketAddr,
        /// Why, for a debug line (the warning is logged here, rate-limited per peer).
        reason: String,
    },
}

/// The metrics of header waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderWaitGauge {
    /// Connections waiting for their header now.
    pub waiting: usize,
    /// `headerWait.limit`.
    pub limit: usize,
    /// Connections closed because the limit was reached.
    pub refused: u64,
    /// Connections from trusted proxies closed for a missing or broken PROXY header.
    pub rejected: u64,
    /// Connections whose header did not come within `headerWait.maxWait`.
    pub timed_out: u64,
}

impl HeaderWait {
    /// Waiting as `config` says (`clientAddress`, `trustedProxies`, `headerWait`).
    pub fn new(config: &Config) -> HeaderWait {
        HeaderWait { settings: Arc::new(Settings::from(config)), shared: Arc::default() }
    }

    /// Takes new settings (SIGHUP); connections already waiting finish under the old ones.
    pub fn reconfigure(&mut self, config: &Config) {
        self.settings = Arc::new(Settings::from(config));
    }

    /// Takes a new connection from `peer`: routes it at once when there is no header to wait for,
    /// else waits on a task and calls `done` with the outcome (never when it returns `Route`/`Refused`).
    /// Must be called inside a tokio runtime.
    pub fn admit(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        done: impl FnOnce(Identified) + Send + 'static,
    ) -> Admission {
        let settings = &self.settings;
        if settings.source == ClientAddressSource::Peer || !settings.trusted.contains(peer.ip()) {
            // Headers from anyone else are not believed, and the stream is not looked at.
            return Admission::Route { stream, client: peer };
        }
        let shared = &self.shared;
        if shared.waiting.load(Ordering::SeqCst) >= settings.limit {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            if !shared.limit_logged.swap(true, Ordering::SeqCst) {
                warn!(
                    "{} connections are waiting for their header (headerWait.limit): closing new ones from \
                     trusted proxies until half of them are done",
                    settings.limit
                );
            }
            return Admission::Refused;
        }
        self.wait(stream, peer, Instant::now(), done);
        Admission::Waiting
    }

    /// Takes a connection that waited for its header in the previous image of this master (an upgrade in
    /// place): it goes on waiting for what is left of `headerWait.maxWait` since `arrived`.
    pub fn admit_inherited(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        arrived: Instant,
        done: impl FnOnce(Identified) + Send + 'static,
    ) {
        self.wait(stream, peer, arrived, done);
    }

    /// The connections waiting now.
    pub fn waiting_connections(&self) -> Vec<WaitingConnection> {
        let connections = self.shared.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        connections.values().copied().collect()
    }

    /// The counters (refused, rejected, timed out) as an upgrade hands them on.
    pub fn counters(&self) -> [u64; 3] {
        let shared = &self.shared;
        [&shared.refused, &shared.rejected, &shared.timed_out].map(|counter| counter.load(Ordering::SeqCst))
    }

    /// Goes on counting from what the previous image of this master counted.
    pub fn restore_counters(&self, counters: [u64; 3]) {
        let shared = &self.shared;
        for (counter, value) in [&shared.refused, &shared.rejected, &shared.timed_out].into_iter().zip(counters) {
            counter.store(value, Ordering::SeqCst);
        }
    }

    /// Waits for the header of an admitted connection on a task.
    fn wait(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        arrived: Instant,
        done: impl FnOnce(Identified) + Send + 'static,
    ) {
        let shared = &self.shared;
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let entry = WaitingConnection { fd: stream.as_raw_fd(), peer, arrived };
        shared.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, entry);
        let (settings, shared) = (self.settings.clone(), shared.clone());
        tokio::spawn(async move {
            let max_wait = settings.max_wait.saturating_sub(arrived.elapsed());
            let outcome = wait_for_header(stream, peer, &settings, max_wait).await;
            shared.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
            let left = shared.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
            if left <= settings.limit / 2 {
                shared.limit_logged.store(false, Ordering::SeqCst);
            }
            match outcome {
                Ok((stream, client)) => done(Identified::Route { stream, client }),
                Err(failure) => {
                    if failure.timed_out {
                        shared.timed_out.fetch_add(1, Ordering::SeqCst);
                    }
                    if failure.rejected {
                        shared.rejected.fetch_add(1, Ordering::SeqCst);
                        shared.log_rejection(peer.ip(), &failure.reason);
                    }
                    done(Identified::Closed { peer, reason: failure.reason })
                }
            }
        });
    }

    /// The counters and the gauge as they are now.
    pub fn gauge(&self) -> HeaderWaitGauge {
        let shared = &self.shared;
        HeaderWaitGauge {
            waiting: shared.waiting.load(Ordering::SeqCst),
            limit: self.settings.limit,
            refused: shared.refused.load(Ordering::SeqCst),
            rejected: shared.rejected.load(Ordering::SeqCst),
            timed_out: shared.timed_out.load(Ordering::SeqCst),
        }
    }
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Settings {
        Settings {
            source: config.client_address,
            trusted: config.trusted_proxies.clone(),
            limit: config.header_wait_limit,
            max_wait: config.header_wait_max_wait,
        }
    }
}

impl Shared {
    /// One warning per peer per [`PEER_LOG_INTERVAL`], with the count of those not logged meanwhile.
    fn log_rejection(&self, peer: IpAddr, reason: &str) {
        let mut log = self.peer_log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if log.len() >= PEER_LOG_CAPACITY {
            log.retain(|_, entry| now.duration_since(entry.logged) < PEER_LOG_INTERVAL);
            if log.len() >= PEER_LOG_CAPACITY {
                log.clear();
            }
        }
        match log.get_mut(&peer) {
            Some(entry) if now.duration_since(entry.logged) < PEER_LOG_INTERVAL => entry.suppressed += 1,
            previous => {
                let suppressed = previous.map_or(0, |entry| entry.suppressed);
                let more =
                    if suppressed > 0 { format!(" ({suppressed} more since the last report)") } else { "".into() };
                warn!("closed a connection from trusted proxy {peer}: {reason}{more}");
                log.insert(peer, PeerLog { logged: now, suppressed: 0 });
            }
        }
    }
}

/// Why a waiting connection was closed.
struct Failure {
    reason: String,
    /// A trusted proxy broke the PROXY protocol (counted and logged).
    rejected: bool,
    timed_out: bool,
}

impl Failure {
    fn lost(error: io::Error) -> Failure {
        Failure { reason: format!("lost while its header was read: {error}"), rejected: false, timed_out: false }
    }
}

/// Waits for the header, applies the decision, and gives the connection back in blocking mode.
async fn wait_for_header(
    stream: TcpStream,
    peer: SocketAddr,
    settings: &Settings,
    max_wait: Duration,
) -> Result<(TcpStream, SocketAddr), Failure> {
    stream.set_nonblocking(true).map_err(Failure::lost)?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(Failure::lost)?;
    let proxy_protocol = settings.source == ClientAddressSource::ProxyProtocol;
    let decision = match tokio::time::timeout(max_wait, read_header(&stream, peer, settings)).await {
        Ok(Ok(decision)) => decision,
        Ok(Err(ReadEnd::Lost(error))) => return Err(Failure::lost(error)),
        // A connection closed before its first byte is a TCP health check (kubelet, HAProxy `check`): not
        // a broken header, just closed.
        Ok(Err(ReadEnd::Closed { seen })) if proxy_protocol && seen > 0 => {
            let reason = format!("closed after {seen} bytes, before a complete PROXY header");
            return Err(Failure { reason, rejected: true, timed_out: false });
        }
        // An HTTP client that half-closes early still gets its answer, by the TCP peer.
        Ok(Err(ReadEnd::Closed { seen })) if seen > 0 => Decision::Route { client: peer, strip: 0 },
        Ok(Err(ReadEnd::Closed { .. })) => {
            return Err(Failure { reason: "closed before sending anything".into(), rejected: false, timed_out: false })
        }
        Err(_) if proxy_protocol => {
            let reason = format!("no complete PROXY header within headerWait.maxWait ({:?})", settings.max_wait);
            return Err(Failure { reason, rejected: true, timed_out: true });
        }
        Err(_) => {
            debug!("no complete request head from {peer} within {:?}: routed by the peer", settings.max_wait);
            Decision::Route { client: peer, strip: 0 }
        }
    };
    let (client, strip) = match decision {
        Decision::Route { client, strip } => (client, strip),
        Decision::Reject(reason) => return Err(Failure { reason, rejected: true, timed_out: false }),
        // read_header returns only final decisions; should one slip through, the header is incomplete.
        Decision::NeedMore { .. } => {
            let reason = "incomplete header".to_string();
            return Err(Failure { reason, rejected: proxy_protocol, timed_out: false });
        }
    };
    let fd = stream.as_raw_fd();
    // The worker reads as usual again: one byte makes the socket readable.
    set_receive_low_water(fd, 1).map_err(Failure::lost)?;
    consume(fd, strip).map_err(Failure::lost)?;
    let stream = stream.into_std().map_err(Failure::lost)?;
    // Workers get connections in blocking mode, as accept(2) gives them.
    stream.set_nonblocking(false).map_err(Failure::lost)?;
    Ok((stream, client))
}

/// How reading a header ended without a decision.
enum ReadEnd {
    /// EOF from the peer after `seen` bytes that did not decide anything.
    Closed { seen: usize },
    /// A socket error.
    Lost(io::Error),
}

/// Peeks until the bytes decide: each wait asks the kernel to wake us only past what was seen.
async fn read_header(
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
    settings: &Settings,
) -> Result<Decision, ReadEnd> {
    let fd = stream.as_raw_fd();
    let mut seen = 0;
    loop {
        let ready = stream.ready(Interest::READABLE).await.map_err(ReadEnd::Lost)?;
        let closed = ready.is_read_closed();
        // A buffer only while peeking: a connection that waits holds none.
        let mut buffer = vec![0u8; PEEK_LIMIT];
        let step = stream.try_io(Interest::READABLE, || {
            let length = peek(fd, &mut buffer)?;
            match decide(settings.source, &settings.trusted, peer, &buffer[..length]) {
                Decision::NeedMore { .. } if length == 0 || (closed && length == seen) => {
                    Ok(Err(ReadEnd::Closed { seen: length }))
                }
                Decision::NeedMore { needed } => {
                    seen = length;
                    set_receive_low_water(fd, needed.max(length + 1).min(PEEK_LIMIT))?;
                    // Clears tokio's readiness unless an event came since it was read: no lost wake-up.
                    Err(io::ErrorKind::WouldBlock.into())
                }
                decision => Ok(Ok(decision)),
            }
        });
        match step {
            Ok(end) => return end,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(ReadEnd::Lost(error)),
        }
    }
}

/// `recv(MSG_PEEK)`: the bytes stay in the socket for the worker.
fn peek(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length; fd is a socket this module holds open.
    let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read as usize)
}

/// Takes `count` bytes off the stream (a PROXY header that was peeked whole, so they are all there).
fn consume(fd: RawFd, count: usize) -> io::Result<()> {
    let mut buffer = [0u8; 512];
    let mut left = count;
    while left > 0 {
        let chunk = left.min(buffer.len());
        // SAFETY: as in `peek`.
        let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), chunk, libc::MSG_DONTWAIT) };
        match read {
            n if n > 0 => left -= n as usize,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// SO_RCVLOWAT: the socket reads as readable only with at least `bytes` queued (or at EOF/error).
fn set_receive_low_water(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a plain setsockopt with a pointer to a live c_int of the right size.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use tokio::sync::mpsc::unbounded_channel;

    fn config(source: &str, extra: &str) -> Config {
        let yaml = format!("clientAddress: {source}\ntrustedProxies: [127.0.0.1]\n{extra}");
        Config::from_yaml(&yaml, "test").unwrap()
    }

    /// A connected pair: (the client end, the accepted end and its peer).
    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        (client, accepted, peer)
    }

    fn cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_header_sent_in_pieces_is_read_whole_and_stripped() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let wait = HeaderWait::new(&config("proxy-protocol", ""));
        let (mut client, accepted, peer) = pair(&listener);
        let (tx, mut rx) = unbounded_channel();
        assert!(matches!(wait.admit(accepted, peer, move |o| _ = tx.send(o)), Admission::Waiting));
        for piece in ["PROXY TCP4 ", "203.0.113.7 10.0.0.1 ", "51000 80\r", "\nhello"] {
            client.write_all(piece.as_bytes()).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(Identified::Route { mut stream, client: address }) = rx.recv().await else { panic!("routed") };
        assert_eq!(address, "203.0.113.7:51000".parse().unwrap());
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello", "the worker reads what follows the header");
        assert_eq!(wait.gauge().waiting, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_partial_header_costs_no_cpu_and_ends_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let wait = HeaderWait::new(&config("proxy-protocol", "headerWait:\n  maxWait: 1500ms\n"));
        let (tx, mut rx) = unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..50 {
            let (mut client, accepted, peer) = pair(&listener);
            client.write_all(b"PROXY TCP4 203.0").unwrap();
            let tx = tx.clone();
            wait.admit(accepted, peer, move |o| _ = tx.send(o));
            clients.push(client);
        }
        drop(tx);
        let before = cpu_ticks();
        let started = Instant::now();
        let mut closed = 0;
        while let Some(outcome) = rx.recv().await {
            assert!(matches!(outcome, Identified::Closed { .. }), "{outcome:?}");
            closed += 1;
        }
        assert_eq!(closed, 50);
        assert!(started.elapsed() >= Duration::from_millis(1300), "{:?}", started.elapsed());
        // A 5 ms re-peek loop over 50 connections for 1.5 s burns far more than a few ticks (10 ms each).
        assert!(cpu_ticks() - before <= 5, "{} ticks while waiting", cpu_ticks() - before);
        let gauge = wait.gauge();
        assert_eq!((gauge.waiting, gauge.rejected, gauge.timed_out), (0, 50, 50));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_limit_refuses_new_connections_and_untrusted_peers_pass_untouched() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let wait = HeaderWait::new(&config("proxy-protocol", "headerWait:\n  limit: 2\n  maxWait: 10s\n"));
        let mut held = Vec::new();
        for _ in 0..2 {
            let (client, accepted, peer) = pair(&listener);
            assert!(matches!(wait.admit(accepted, peer, |_| {}), Admission::Waiting));
            held.push(client);
        }
        let (_client, accepted, peer) = pair(&listener);
        assert!(matches!(wait.admit(accepted, peer, |_| {}), Admission::Refused));
        assert_eq!(wait.gauge(), HeaderWaitGauge { waiting: 2, limit: 2, refused: 1, rejected: 0, timed_out: 0 });
        // Not from a trusted address: routed by the peer at once, whatever it sends.
        let other = TcpListener::bind("127.0.0.2:0").unwrap();
        let client = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (accepted, peer) = other.accept().unwrap();
        drop(client);
        let untrusted = HeaderWait::new(&Config {
            trusted_proxies: TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]),
            ..config("proxy-protocol", "")
        });
        assert!(matches!(untrusted.admit(accepted, peer, |_| {}), Admission::Route { client, .. } if client == peer));
    }
}
