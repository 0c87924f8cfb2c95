//! The client and metrics listeners: binding (with the dual-stack fallback), accepting in batches,
//! and backing off when accept fails (EMFILE and the like) without blocking other events.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::time::Instant as TokioInstant;
use tracing::{info, warn};

use super::handoff::Handoff;
use super::{Event, Master};
use crate::client_address::header_wait::{Admission, Identified};
use crate::config::{Config, Routing};
use crate::error::{Error, Result};

/// What [`bind`] made: the master's one client listener (handoff) or the kernel's listener group.
#[derive(Debug)]
pub enum Listener {
    /// `routing: handoff`: the master accepts every client and hands it on.
    Handoff(TcpListener),
    /// `routing: kernel`: one `SO_REUSEPORT` listener per worker, routed by the kernel.
    Kernel(crate::reuseport::ReuseportGroup),
}

impl Listener {
    /// The bound address (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Handoff(listener) => listener.local_addr(),
            Listener::Kernel(group) => Ok(group.local_addr()),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Handoff(listener)
    }
}

/// Binds the client listener (or, with `routing: kernel`, the listener group): the configured host,
/// falling back from `::` to `0.0.0.0` where the machine has no IPv6. Errors name the address and the reason.
pub fn bind(config: &Config) -> Result<Listener> {
    let backlog = config.backlog.min(i32::MAX as u32) as i32;
    match config.routing {
        Routing::Handoff => with_fallback(config, |address| {
            bind_listener(address, backlog).map_err(|source| Error::Listen { address, source })
        })
        .map(Listener::Handoff),
        Routing::Kernel => {
            with_fallback(config, |address| crate::reuseport::bind_group(address, config.concurrency, backlog))
                .map(Listener::Kernel)
        }
    }
}

/// Tries each of the configured addresses in turn while the failure says "no IPv6 here".
fn with_fallback<T>(config: &Config, mut bind: impl FnMut(SocketAddr) -> Result<T>) -> Result<T> {
    let addresses = config.listen_addresses()?;
    let mut last_error = None;
    for (attempt, address) in addresses.iter().enumerate() {
        match bind(*address) {
            Ok(bound) => {
                if attempt > 0 {
                    info!("no IPv6 on this machine: listening on {address} instead of [{}]", config.host);
                }
                return Ok(bound);
            }
            Err(Error::Listen { address, source }) => {
                let no_ipv6 = matches!(source.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL));
                last_error = Some(Error::Listen { address, source });
                if !(no_ipv6 && address.is_ipv6()) {
                    break;
                }
            }
            Err(other) => return Err(other),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::io(format!("listen on {}", config.host), io::Error::from(io::ErrorKind::NotFound))))
}

pub(super) fn bind_one(address: SocketAddr) -> io::Result<TcpListener> {
    bind_listener(address, 1024)
}

fn bind_listener(address: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if address.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        // Dual-stack like Node, whatever net.ipv6.bindv6only says.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(address))?;
    socket::listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

/// Accepts what is waiting (up to a batch), so one wake-up serves a burst without starving other events.
pub(super) async fn accept_batch(listener: Option<&AsyncFd<TcpListener>>) -> io::Result<Vec<(TcpStream, SocketAddr)>> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = listener.readable().await?;
        let mut batch = Vec::new();
        loop {
            match guard.get_inner().accept() {
                Ok(accepted) => {
                    batch.push(accepted);
                    if batch.len() == 64 {
                        return Ok(batch);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                    break;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                // Report the error once what was accepted is routed; the next call meets it again.
                Err(e) if batch.is_empty() => return Err(e),
                Err(_) => return Ok(batch),
            }
        }
    }
}

impl Master {
    /// Answers metrics requests with the counters as they are now.
    pub(super) fn on_scrapes(&mut self, scrapes: io::Result<Vec<(TcpStream, SocketAddr)>>) {
        let scrapes = match scrapes {
            Ok(scrapes) => scrapes,
            Err(error) => return self.accept_backoff.failed(&error),
        };
        self.accept_backoff.succeeded();
        let workers: Vec<crate::metrics::WorkerGauge> = self
            .slots
            .iter()
            .map(|slot| crate::metrics::WorkerGauge {
                routed: self.stats.routed[slot.index as usize],
                queued: slot.queue.len(),
                ready: slot.life.is_ready(),
            })
            .collect();
        let header_wait = self.header_wait.gauge();
        let mut page = crate::metrics::render(&workers, &self.stats, &header_wait, self.handshakes.active());
        page += &self.accept_queue_metrics();
        page += &crate::closer::metrics();
        page += &self.per_source_metrics();
        for (stream, _) in scrapes {
            self.scrapes.serve(stream, page.clone());
        }
    }

    pub(super) fn on_accepted(&mut self, batch: io::Result<Vec<(TcpStream, SocketAddr)>>) {
        match batch {
            Ok(batch) => {
                self.accept_backoff.succeeded();
                for (stream, peer) in batch {
                    let local = self.listen_address;
                    let arrived = Instant::now();
                    let identified = self.when_identified(arrived);
                    // Peer mode and untrusted peers come back at once; trusted proxies' connections
                    // wait for their header (bounded) and arrive later as Identified/Unidentified.
                    match self.header_wait.admit(stream, peer, identified) {
                        Admission::Route { stream, client } => self.route(Handoff::new(stream, client, local, arrived)),
                        Admission::Waiting => {}
                        Admission::Refused => self.stats.closed += 1,
                    }
                }
            }
            Err(error) => self.accept_backoff.failed(&error),
        }
    }

    /// What to do with a connection accepted at `arrived` once its header has been read (or given up on).
    pub(super) fn when_identified(&self, arrived: Instant) -> impl FnOnce(Identified) + Send + 'static {
        let local = self.listen_address;
        let events = self.events.clone();
        move |outcome| {
            let event = match outcome {
                Identified::Route { stream, client } => Event::Identified(Handoff::new(stream, client, local, arrived)),
                Identified::Closed { peer, reason } => Event::Unidentified { peer, reason },
            };
            let _ = events.send(event);
        }
    }
}

/// The back-off of one accepting socket (clients and scrapes share one; the attach socket has its own):
/// after an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM) that socket is not polled for a growing moment,
/// 10 ms doubling to 1 s, so fds or memory can free up, while every other event is served. One line when
/// an episode starts, one when accepting works again.
#[derive(Debug)]
pub(super) struct AcceptBackoff {
    /// The socket, for the log (`the client listener`, `the attach socket`).
    what: &'static str,
    delay: Duration,
    paused_until: Option<TokioInstant>,
    /// When the current episode of failures began and how many accepts failed in it.
    episode: Option<(Instant, u64)>,
}

const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// A socket that accepts freely.
    pub(super) fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff { what, delay: Duration::ZERO, paused_until: None, episode: None }
    }

    /// An accept failed: pause, twice as long as last time in this episode.
    pub(super) fn failed(&mut self, error: &io::Error) {
        self.delay = (self.delay * 2).clamp(FIRST_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
        self.paused_until = Some(TokioInstant::now() + self.delay);
        match &mut self.episode {
            Some((_, failures)) => *failures += 1,
            None => {
                warn!(
                    "accepting on {} failed: {error}; retrying after {FIRST_ACCEPT_BACKOFF:?}, doubling up to \
                     {MAX_ACCEPT_BACKOFF:?}, until it works (logged again when it does)",
                    self.what
                );
                self.episode = Some((Instant::now(), 1));
            }
        }
    }

    /// An accept worked: the episode, if any, is over.
    pub(super) fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
        if let Some((since, failures)) = self.episode.take() {
            info!(
                "accepting on {} again, after {failures} failed attempts over {:.1}s",
                self.what,
                since.elapsed().as_secs_f64()
            );
        }
    }

    /// Not to be polled now.
    pub(super) fn is_paused(&self) -> bool {
        self.paused_until.is_some()
    }

    /// When the pause ends, if paused.
    pub(super) fn resume_at(&self) -> Option<TokioInstant> {
        self.paused_until
    }

    /// Ends the pause once its time has come.
    pub(super) fn resume_if_due(&mut self, now: TokioInstant) {
        if self.paused_until.is_some_and(|until| until <= now) {
            self.paused_until = None;
        }
    }
}
