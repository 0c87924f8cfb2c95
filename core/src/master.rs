//! The master: listen, accept, hash the client address, and hand each socket to its worker's channel;
//! queue for workers that are not ready, revive dead ones under the same index, and shut down in order.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::{sleep_until, Instant as TokioInstant};
use tracing::{debug, error, info, warn};

use crate::client_address::ClientAddressSource;
use crate::config::{Config, WorkerSource};
use crate::error::{Error, Result};
use crate::hash::{node_address_text, route_index};
use crate::protocol::{recv_message, send_message, Message};
use crate::supervisor::{describe_exit, revival_delay, signal_worker, spawn_worker, CRASH_UPTIME};

/// What the caller asks of a running master: to stop, or to take a new configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// Close the listener, let workers finish, kill them after `hardShutdownDelay`.
    Graceful,
    /// Kill every worker now.
    Hard,
    /// Take a new (already validated) configuration: restart workers one at a time when their command
    /// or environment changed. Listener settings (`port`, `host`, `concurrency`) need a restart.
    Reload(Box<Config>),
}

/// How a master run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every worker exited on its own within the delay (exit status 0 for the binary).
    pub graceful: bool,
    /// Counters over the whole run.
    pub stats: Stats,
}

/// Counters of one master run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections handed to each worker index.
    pub routed: Vec<u64>,
    /// Connections that went to another worker because theirs was not ready in time.
    pub redirected: u64,
    /// Connections closed without being served (no ready worker in time, or shutdown).
    pub closed: u64,
    /// Worker processes started again after one died.
    pub revivals: u64,
}

/// Binds the client listener: the configured host, falling back from `::` to `0.0.0.0` where the
/// machine has no IPv6. Errors name the address and the reason.
pub fn bind(config: &Config) -> Result<TcpListener> {
    let addresses = config.listen_addresses()?;
    let mut last_error = None;
    for (attempt, address) in addresses.iter().enumerate() {
        match bind_one(*address) {
            Ok(listener) => {
                if attempt > 0 {
                    info!("no IPv6 on this machine: listening on {address} instead of [{}]", config.host);
                }
                return Ok(listener);
            }
            Err(source) => {
                let no_ipv6 = matches!(source.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL));
                last_error = Some(Error::Listen { address: *address, source });
                if !(no_ipv6 && address.is_ipv6()) {
                    break;
                }
            }
        }
    }
    Err(last_error.expect("at least one address"))
}

fn bind_one(address: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if address.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        // Dual-stack like Node, whatever net.ipv6.bindv6only says.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(address))?;
    socket::listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

/// A client connection on its way to a worker.
#[derive(Debug)]
struct Handoff {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    arrived: Instant,
}

/// What a channel's sender task writes.
enum Outgoing {
    Connection(Handoff),
    /// The shutdown message, then SIGTERM to this pid (spawned workers).
    Shutdown {
        deadline_ms: u64,
        then_terminate: Option<u32>,
    },
}

/// What the master's tasks report to its one event loop.
enum Event {
    Message {
        index: u32,
        generation: u64,
        message: Message,
    },
    ChannelClosed {
        index: u32,
        generation: u64,
        reason: Option<String>,
    },
    Exited {
        index: u32,
        generation: u64,
        status: io::Result<ExitStatus>,
    },
    Undelivered {
        index: u32,
        handoff: Handoff,
        errno: Errno,
    },
    Revive {
        index: u32,
        generation: u64,
    },
    Attached(crate::attach::Claim),
    RetireDeadline {
        index: u32,
        generation: u64,
    },
    /// A connection whose client address was read from a proxy header (or given up on).
    Identified(Handoff),
    /// A connection lost while its client address was read.
    Unidentified {
        peer: SocketAddr,
        error: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Process started (or attach expected), not ready yet: connections queue.
    Starting,
    /// Takes connections.
    Ready,
    /// No live worker: waiting for revival (or for an attach).
    Down,
}

/// One worker index: its current process and channel, and connections waiting for it.
struct WorkerSlot {
    index: u32,
    generation: u64,
    state: SlotState,
    pid: u32,
    /// A worker process runs (spawn mode) or a worker is attached (attach mode).
    alive: bool,
    started: Instant,
    crashes: u32,
    /// Asked to stop for a reload: start its successor as soon as it exits.
    retiring: bool,
    /// The current worker's channel, and what its writer task still has to write.
    channel: Option<WorkerChannel>,
    queue: VecDeque<Handoff>,
}

impl WorkerSlot {
    /// Forgets the channel of a worker that is gone or cut loose; its connections queue from now on.
    fn disconnect(&mut self) {
        self.channel = None;
        self.state = SlotState::Down;
    }

    /// Closes the connections waiting for this index (shutdown) and returns how many there were.
    fn close_queue(&mut self) -> u64 {
        let closed = self.queue.len() as u64;
        self.queue.clear();
        closed
    }
}

/// The master's side of one worker's channel. Connections are written straight from the event loop
/// while the writer task is idle; the task takes over when the channel is full, and keeps the order.
struct WorkerChannel {
    socket: Arc<AsyncFd<OwnedFd>>,
    writer: UnboundedSender<Outgoing>,
    /// Items given to the writer task and not yet written.
    backlog: Arc<AtomicUsize>,
}

impl WorkerChannel {
    /// Hands an item to the writer task (behind anything it already holds).
    fn enqueue(&self, item: Outgoing) -> std::result::Result<(), Outgoing> {
        self.backlog.fetch_add(1, Ordering::SeqCst);
        self.writer.send(item).map_err(|failed| {
            self.backlog.fetch_sub(1, Ordering::SeqCst);
            failed.0
        })
    }
}

struct Master {
    config: Config,
    /// Attach mode: the socket workers dial (its options are in `config.workers`).
    attach_socket: Option<AsyncFd<OwnedFd>>,
    slots: Vec<WorkerSlot>,
    listener: Option<AsyncFd<TcpListener>>,
    /// The Prometheus page's listener, when `metrics` is configured.
    metrics: Option<AsyncFd<TcpListener>>,
    events: UnboundedSender<Event>,
    stats: Stats,
    accept_paused_until: Option<TokioInstant>,
    accept_backoff: Duration,
    shutdown_deadline: Option<TokioInstant>,
    hard_killed: bool,
    /// Indexes still to restart for a reload, and the one restarting now.
    restarts_pending: VecDeque<u32>,
    restarting: Option<u32>,
}

/// Runs a cluster on `listener` until `stop` asks it to end (first [`Stop::Graceful`], then
/// [`Stop::Hard`] for a second signal), and reports how it ended.
pub async fn run(config: Config, listener: TcpListener, mut stop: UnboundedReceiver<Stop>) -> Result<Outcome> {
    raise_fd_limit();
    let attach_socket = match &config.workers {
        WorkerSource::Spawn { .. } => None,
        WorkerSource::Attach(options) => {
            let socket = crate::attach::listen(options)?;
            // SAFETY: the AsyncFd owns the socket, so its fd stays open and unchanged while registered.
            let socket = unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| Error::io("register the attach socket", e))?;
            info!("waiting for {} worker(s) to attach at {}", config.concurrency, options.socket.display());
            Some(socket)
        }
    };
    listener.set_nonblocking(true).map_err(|e| Error::io("set the listener non-blocking", e))?;
    let address = listener.local_addr().map_err(|e| Error::io("read the listener address", e))?;
    // SAFETY: the AsyncFd owns the listener, so its fd stays open and unchanged while registered.
    let listener = unsafe { AsyncFd::register(listener) }.map_err(|e| Error::io("register the listener", e))?;
    let metrics = match config.metrics {
        Some(address) => {
            let listener = bind_one(address).map_err(|source| Error::Listen { address, source })?;
            let bound = listener.local_addr().unwrap_or(address);
            info!("metrics on http://{bound}/metrics");
            // SAFETY: the AsyncFd owns the listener, so its fd stays open and unchanged while registered.
            Some(unsafe { AsyncFd::register(listener) }.map_err(|e| Error::io("register the metrics listener", e))?)
        }
        None => None,
    };
    let (events, mut event_rx) = unbounded_channel();
    let concurrency = config.concurrency;
    let mut master = Master {
        slots: (0..concurrency)
            .map(|index| WorkerSlot {
                index,
                generation: 0,
                state: SlotState::Down,
                pid: 0,
                alive: false,
                started: Instant::now(),
                crashes: 0,
                retiring: false,
                channel: None,
                queue: VecDeque::new(),
            })
            .collect(),
        stats: Stats { routed: vec![0; concurrency as usize], ..Stats::default() },
        config,
        attach_socket,
        listener: Some(listener),
        metrics,
        events,
        accept_paused_until: None,
        accept_backoff: Duration::ZERO,
        shutdown_deadline: None,
        hard_killed: false,
        restarts_pending: VecDeque::new(),
        restarting: None,
    };
    info!("listening on {address} with {concurrency} workers");
    let spawned_workers = if master.spawns() { concurrency } else { 0 };
    for index in 0..spawned_workers {
        if let Err(error) = master.start_worker(index) {
            master.kill_all();
            master.wait_for_exits(&mut event_rx).await;
            return Err(error);
        }
    }

    let mut stop_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let paused = master.accept_paused_until;
        let deadline = master.shutdown_deadline;
        tokio::select! {
            batch = accept_batch(master.listener.as_ref()), if paused.is_none() && master.listener.is_some() => {
                master.on_accepted(batch);
            }
            Some(event) = event_rx.recv() => master.on_event(event),
            scrapes = accept_batch(master.metrics.as_ref()), if paused.is_none() && master.metrics.is_some() => {
                master.on_scrapes(scrapes);
            }
            dialed = accept_worker(master.attach_socket.as_ref()), if master.attach_socket.is_some() => {
                master.on_dialed(dialed);
            }
            request = stop.recv(), if stop_open => match request {
                Some(request) => master.on_stop(request),
                None => stop_open = false,
            },
            _ = tick.tick() => master.expire_queues(),
            _ = sleep_until(paused.unwrap_or_else(TokioInstant::now)), if paused.is_some() => {
                master.accept_paused_until = None;
            }
            _ = sleep_until(deadline.unwrap_or_else(TokioInstant::now)), if deadline.is_some() && !master.hard_killed => {
                warn!("hardShutdownDelay of {:?} passed: killing the remaining workers", master.config.hard_shutdown_delay);
                master.kill_all();
            }
        }
        if master.shutdown_deadline.is_some() && master.slots.iter().all(|slot| !slot.alive) {
            break;
        }
    }
    if let WorkerSource::Attach(options) = &master.config.workers {
        let _ = std::fs::remove_file(&options.socket);
    }
    let stats = master.stats.clone();
    info!(
        "stopped: routed {} connections {:?}, redirected {}, closed {}, revivals {}",
        stats.routed.iter().sum::<u64>(),
        stats.routed,
        stats.redirected,
        stats.closed,
        stats.revivals
    );
    Ok(Outcome { graceful: !master.hard_killed, stats })
}

/// Accepts what is waiting (up to a batch), so one wake-up serves a burst without starving other events.
async fn accept_batch(listener: Option<&AsyncFd<TcpListener>>) -> io::Result<Vec<(TcpStream, SocketAddr)>> {
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

/// Lifts the soft open-file limit to the hard one: queued connections hold fds in the master.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

impl Master {
    /// Whether this master starts its workers itself (spawn mode) rather than waiting for attaches.
    fn spawns(&self) -> bool {
        matches!(self.config.workers, WorkerSource::Spawn { .. })
    }

    fn start_worker(&mut self, index: u32) -> Result<()> {
        let WorkerSource::Spawn { command, cwd } = &self.config.workers else { unreachable!("spawn mode") };
        let spawned = spawn_worker(&self.config, command, cwd.as_deref(), index)?;
        let generation = self.connect_slot(index, spawned.pid, spawned.channel)?;
        debug!("worker {index} started (pid {}, generation {generation})", spawned.pid);
        let events = self.events.clone();
        let mut child = spawned.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::Exited { index, generation, status });
        });
        Ok(())
    }

    /// Gives slot `index` a new generation with a live worker on `channel`, and starts its channel tasks.
    fn connect_slot(&mut self, index: u32, pid: u32, channel: OwnedFd) -> Result<u64> {
        // SAFETY: the AsyncFd owns the channel fd, so it stays open and unchanged while registered.
        let channel = unsafe { AsyncFd::register(channel) }
            .map_err(|e| Error::io(format!("register worker {index}'s channel"), e))?;
        let channel = Arc::new(channel);
        let slot = &mut self.slots[index as usize];
        slot.generation += 1;
        slot.state = SlotState::Starting;
        slot.pid = pid;
        slot.alive = true;
        slot.started = Instant::now();
        let generation = slot.generation;
        let (writer, writer_rx) = unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        slot.channel = Some(WorkerChannel { socket: channel.clone(), writer, backlog: backlog.clone() });
        tokio::spawn(read_channel(channel.clone(), self.events.clone(), index, generation));
        tokio::spawn(write_channel(channel, writer_rx, backlog, self.events.clone(), index));
        Ok(generation)
    }

    /// A worker dialed the attach socket: check it on its own task, so a slow one holds nobody up.
    fn on_dialed(&mut self, dialed: io::Result<OwnedFd>) {
        let channel = match dialed {
            Ok(channel) => channel,
            Err(error) => {
                warn!("accepting a worker on the attach socket failed: {error}");
                return;
            }
        };
        let WorkerSource::Attach(options) = &self.config.workers else { return };
        let options = options.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            match crate::attach::handshake(channel, &options).await {
                Ok(claim) => {
                    let _ = events.send(Event::Attached(claim));
                }
                Err(reason) => warn!("refused a worker on {}: {reason}", options.socket.display()),
            }
        });
    }

    /// Gives a checked worker the index it claims (or the first free one), or refuses it.
    fn on_attached(&mut self, claim: crate::attach::Claim) {
        use crate::protocol::ANY_INDEX;
        let concurrency = self.config.concurrency;
        let index = if claim.index == ANY_INDEX {
            self.slots.iter().position(|slot| !slot.alive).map(|i| i as u32)
        } else {
            Some(claim.index)
        };
        let refusal = match index {
            _ if self.shutdown_deadline.is_some() => Some("the cluster is shutting down".to_string()),
            None => Some(format!("all {concurrency} indexes are attached")),
            Some(index) if index >= concurrency => {
                Some(format!("index {index} is out of range (concurrency {concurrency})"))
            }
            Some(index) if self.slots[index as usize].alive => {
                Some(format!("index {index} is already attached (pid {})", self.slots[index as usize].pid))
            }
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            let reason = crate::attach::refuse(&claim.channel, reason);
            warn!("refused worker pid {} (uid {}): {reason}", claim.pid, claim.uid);
            return;
        }
        let index = index.expect("checked above");
        let welcome = Message::Welcome { index, concurrency };
        if let Err(errno) = send_message(claim.channel.as_fd(), &welcome, None, true) {
            warn!("worker pid {} left before its welcome: {errno}", claim.pid);
            return;
        }
        match self.connect_slot(index, claim.pid, claim.channel) {
            Ok(_) => debug!("worker {index} attached (pid {}, uid {})", claim.pid, claim.uid),
            Err(error) => error!("{error}"),
        }
    }

    /// Answers metrics requests with the counters as they are now.
    fn on_scrapes(&mut self, scrapes: io::Result<Vec<(TcpStream, SocketAddr)>>) {
        let scrapes = match scrapes {
            Ok(scrapes) => scrapes,
            Err(error) => return self.pause_accepting(error),
        };
        let workers: Vec<crate::metrics::WorkerGauge> = self
            .slots
            .iter()
            .map(|slot| crate::metrics::WorkerGauge {
                routed: self.stats.routed[slot.index as usize],
                queued: slot.queue.len(),
                ready: slot.state == SlotState::Ready,
            })
            .collect();
        let page = crate::metrics::render(&workers, self.stats.redirected, self.stats.closed, self.stats.revivals);
        for (stream, _) in scrapes {
            tokio::spawn(crate::metrics::serve(stream, page.clone()));
        }
    }

    fn on_accepted(&mut self, batch: io::Result<Vec<(TcpStream, SocketAddr)>>) {
        match batch {
            Ok(batch) => {
                self.accept_backoff = Duration::ZERO;
                let source = self.config.client_address;
                for (stream, peer) in batch {
                    let local = stream.local_addr().unwrap_or(peer);
                    let handoff = Handoff { stream, peer, local, arrived: Instant::now() };
                    if source == ClientAddressSource::Peer {
                        self.route(handoff);
                    } else {
                        tokio::spawn(identify_client(handoff, source, self.events.clone()));
                    }
                }
            }
            Err(error) => self.pause_accepting(error),
        }
    }

    /// EMFILE/ENFILE/ENOBUFS/ENOMEM: stop accepting (clients and scrapes) for a growing moment so fds or
    /// memory can free up, instead of spinning on the error.
    fn pause_accepting(&mut self, error: io::Error) {
        self.accept_backoff = (self.accept_backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        warn!("accept failed: {error}; retrying in {:?}", self.accept_backoff);
        self.accept_paused_until = Some(TokioInstant::now() + self.accept_backoff);
    }

    fn route(&mut self, handoff: Handoff) {
        let index = route_index(handoff.peer.ip(), self.config.concurrency);
        debug!("connection {} -> worker {index}", node_address_text(handoff.peer.ip()));
        self.deliver(index, handoff);
    }

    /// Sends to the worker's channel when it is ready, else queues (bounded), else redirects.
    fn deliver(&mut self, index: u32, handoff: Handoff) {
        let limit = self.config.queue_limit;
        let slot = &mut self.slots[index as usize];
        if slot.state == SlotState::Ready && slot.queue.is_empty() {
            self.send_to(index, handoff);
        } else if slot.queue.len() < limit && self.shutdown_deadline.is_none() {
            slot.queue.push_back(handoff);
        } else {
            self.redirect(index, handoff, "its queue is full");
        }
    }

    fn send_to(&mut self, index: u32, handoff: Handoff) {
        self.stats.routed[index as usize] += 1;
        let channel = self.slots[index as usize].channel.as_ref().expect("a ready slot has a channel");
        // The common case writes at once: no task hop per connection. Only when the writer task holds
        // nothing, so the channel keeps its order (every connection before a shutdown message).
        if channel.backlog.load(Ordering::SeqCst) == 0 {
            let message = Message::Connection { peer: handoff.peer, local: handoff.local };
            match send_message(channel.socket.get_ref().as_fd(), &message, Some(handoff.stream.as_fd()), true) {
                Ok(()) => return,
                Err(Errno::EAGAIN) => debug!("worker {index}'s channel is full: its writer waits for room"),
                Err(errno) => return self.undelivered(index, handoff, errno),
            }
        }
        if let Err(Outgoing::Connection(handoff)) = channel.enqueue(Outgoing::Connection(handoff)) {
            self.stats.routed[index as usize] -= 1;
            let slot = &mut self.slots[index as usize];
            slot.disconnect();
            slot.queue.push_front(handoff);
        }
    }

    /// A worker's channel refused a connection (the worker died): it waits for the index's next worker.
    fn undelivered(&mut self, index: u32, handoff: Handoff, errno: Errno) {
        debug!("worker {index}'s channel refused a connection ({errno}); it waits for the next worker");
        self.stats.routed[index as usize] -= 1;
        let slot = &mut self.slots[index as usize];
        slot.disconnect();
        if self.shutdown_deadline.is_some() {
            self.stats.closed += 1;
        } else {
            slot.queue.push_back(handoff);
        }
    }

    /// Gives a connection whose own worker cannot take it to the next ready worker, or closes it.
    fn redirect(&mut self, from: u32, handoff: Handoff, why: &str) {
        let concurrency = self.config.concurrency;
        let next_ready = (1..concurrency)
            .map(|step| (from + step) % concurrency)
            .find(|&index| self.slots[index as usize].state == SlotState::Ready);
        match next_ready {
            Some(index) if self.shutdown_deadline.is_none() => {
                self.stats.redirected += 1;
                debug!("connection {} for worker {from} goes to worker {index}: {why}", handoff.peer.ip());
                self.send_to(index, handoff);
            }
            _ => {
                self.stats.closed += 1;
                warn!(
                    "closing connection from {} for worker {from}: {why} and no other worker is ready",
                    handoff.peer.ip()
                );
            }
        }
    }

    fn expire_queues(&mut self) {
        let max_wait = self.config.queue_max_wait;
        for index in 0..self.config.concurrency {
            while let Some(front) = self.slots[index as usize].queue.front() {
                if front.arrived.elapsed() < max_wait {
                    break;
                }
                let handoff = self.slots[index as usize].queue.pop_front().expect("front exists");
                self.redirect(index, handoff, "it was not ready within queue.maxWait");
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message { index, generation, message } => self.on_message(index, generation, message),
            Event::ChannelClosed { index, generation, reason } => {
                let spawned = self.spawns();
                let shutting_down = self.shutdown_deadline.is_some();
                let slot = &mut self.slots[index as usize];
                if slot.generation != generation {
                    return;
                }
                if let Some(reason) = &reason {
                    error!("worker {index} (pid {}) broke the channel protocol: {reason}; dropping it", slot.pid);
                    if spawned {
                        signal_worker(slot.pid, Signal::SIGKILL);
                    }
                }
                slot.disconnect();
                if !spawned {
                    // An attached worker is supervised elsewhere: its index waits for the next attach.
                    slot.alive = false;
                    if shutting_down {
                        debug!("worker {index} (pid {}) detached", slot.pid);
                    } else {
                        warn!("worker {index} (pid {}) detached; its connections wait for a new attach", slot.pid);
                    }
                }
            }
            Event::Attached(claim) => self.on_attached(claim),
            Event::Identified(handoff) => self.route(handoff),
            Event::Unidentified { peer, error } => {
                self.stats.closed += 1;
                warn!("connection from {peer} lost while its client address was read: {error}");
            }
            Event::RetireDeadline { index, generation } => {
                let slot = &self.slots[index as usize];
                if slot.generation == generation && slot.alive && slot.retiring {
                    warn!(
                        "worker {index} (pid {}) did not stop within hardShutdownDelay for the reload; killing it",
                        slot.pid
                    );
                    signal_worker(slot.pid, Signal::SIGKILL);
                }
            }
            Event::Exited { index, generation, status } => self.on_exit(index, generation, status),
            Event::Undelivered { index, handoff, errno } => self.undelivered(index, handoff, errno),
            Event::Revive { index, generation } => {
                let slot = &self.slots[index as usize];
                if slot.generation == generation && !slot.alive && self.shutdown_deadline.is_none() {
                    self.stats.revivals += 1;
                    if let Err(error) = self.start_worker(index) {
                        error!("{error}");
                        self.schedule_revival(index);
                    }
                }
            }
        }
    }

    fn on_message(&mut self, index: u32, generation: u64, message: Message) {
        let slot = &mut self.slots[index as usize];
        if slot.generation != generation {
            return;
        }
        match message {
            Message::Hello { index: claimed, pid } => {
                if claimed != index {
                    warn!("worker {index} (pid {}) says it is worker {claimed}; keeping index {index}", slot.pid);
                }
                debug!("worker {index} said hello (pid {pid})");
            }
            Message::Ready => {
                if slot.state == SlotState::Starting {
                    debug!(
                        "worker {index} (pid {}) is ready; {} queued connections follow",
                        slot.pid,
                        slot.queue.len()
                    );
                    slot.state = SlotState::Ready;
                    let queued: Vec<Handoff> = slot.queue.drain(..).collect();
                    for handoff in queued {
                        self.send_to(index, handoff);
                    }
                    if self.restarting == Some(index) {
                        self.restarting = None;
                        self.restart_next();
                    }
                }
            }
            other => warn!("worker {index} sent a master-only message {other:?}; ignored"),
        }
    }

    fn on_exit(&mut self, index: u32, generation: u64, status: io::Result<ExitStatus>) {
        let shutting_down = self.shutdown_deadline.is_some();
        let slot = &mut self.slots[index as usize];
        if slot.generation != generation {
            return;
        }
        slot.alive = false;
        slot.disconnect();
        let how = match &status {
            Ok(status) => describe_exit(status),
            Err(error) => format!("unknown status ({error})"),
        };
        if shutting_down {
            debug!("worker {index} (pid {}) exited: {how}", slot.pid);
            self.stats.closed += slot.close_queue();
            return;
        }
        if std::mem::take(&mut slot.retiring) {
            info!("worker {index} (pid {}) stopped for the reload ({how}); starting its successor", slot.pid);
            if let Err(error) = self.start_worker(index) {
                error!("{error}");
                self.schedule_revival(index);
            }
            return;
        }
        let lived = slot.started.elapsed();
        slot.crashes = if lived < CRASH_UPTIME { slot.crashes + 1 } else { 0 };
        let delay = revival_delay(slot.crashes);
        warn!(
            "worker {index} (pid {}) exited after {:.1}s: {how}; reviving in {:?} (attempt {})",
            slot.pid,
            lived.as_secs_f64(),
            delay,
            slot.crashes.max(1)
        );
        self.schedule_revival(index);
    }

    fn schedule_revival(&mut self, index: u32) {
        let slot = &self.slots[index as usize];
        let delay = revival_delay(slot.crashes);
        let generation = slot.generation;
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Revive { index, generation });
        });
    }

    fn on_stop(&mut self, request: Stop) {
        match (request, self.shutdown_deadline) {
            (Stop::Graceful, None) => {
                let delay = self.config.hard_shutdown_delay;
                info!("shutting down: {} workers have {:?} to finish", self.config.concurrency, delay);
                self.shutdown_deadline = Some(TokioInstant::now() + delay);
                self.listener = None;
                let deadline_ms = delay.as_millis().min(u64::MAX as u128) as u64;
                let spawned = self.spawns();
                for slot in &mut self.slots {
                    self.stats.closed += slot.close_queue();
                    // SIGTERM follows the shutdown message, so a worker that drains its channel on SIGTERM
                    // finds every connection already sent to it, then the shutdown.
                    let terminate = (slot.alive && spawned).then_some(slot.pid);
                    let sent = slot.channel.as_ref().is_some_and(|channel| {
                        channel.enqueue(Outgoing::Shutdown { deadline_ms, then_terminate: terminate }).is_ok()
                    });
                    if let (false, Some(pid)) = (sent, terminate) {
                        signal_worker(pid, Signal::SIGTERM);
                    }
                }
            }
            (Stop::Graceful, Some(_)) => {}
            (Stop::Reload(_), Some(_)) => warn!("reload ignored: the cluster is shutting down"),
            (Stop::Reload(config), None) => self.reload(*config),
            (Stop::Hard, _) => {
                warn!("second signal: stopping at once");
                if self.shutdown_deadline.is_none() {
                    self.shutdown_deadline = Some(TokioInstant::now());
                    self.listener = None;
                }
                self.kill_all();
            }
        }
    }

    /// Applies what can change while running; workers whose command or environment changed are
    /// restarted one at a time, each successor ready before the next index stops.
    fn reload(&mut self, new: Config) {
        let old = &self.config;
        if (new.port, &new.host, new.concurrency) != (old.port, &old.host, old.concurrency) {
            warn!(
                "reload: port, host and concurrency changes need a restart; keeping {}:{} with {} workers",
                old.host, old.port, old.concurrency
            );
        }
        if (new.debug, &new.prefix) != (old.debug, &old.prefix) {
            warn!("reload: debug and prefix changes need a restart");
        }
        let workers_changed = match (&new.workers, &old.workers) {
            (WorkerSource::Spawn { .. }, WorkerSource::Spawn { .. }) => {
                new.workers != old.workers || new.env != old.env
            }
            (WorkerSource::Attach(_), WorkerSource::Attach(_)) => {
                if new.workers != old.workers {
                    warn!("reload: attach socket changes need a restart");
                }
                false
            }
            _ => {
                warn!("reload: switching between spawn and attach mode needs a restart");
                false
            }
        };
        let kept = Config {
            port: old.port,
            host: old.host.clone(),
            concurrency: old.concurrency,
            debug: old.debug,
            prefix: old.prefix.clone(),
            workers: if workers_changed { new.workers.clone() } else { old.workers.clone() },
            env: if workers_changed { new.env.clone() } else { old.env.clone() },
            ..new
        };
        self.config = kept;
        if workers_changed {
            info!("reload: restarting {} workers one at a time", self.config.concurrency);
            self.restarts_pending = (0..self.config.concurrency).collect();
            if self.restarting.is_none() {
                self.restart_next();
            }
        } else {
            info!("reload: applied (no worker restart needed)");
        }
    }

    /// Asks the next worker of a rolling restart to stop; its successor starts when it exits.
    fn restart_next(&mut self) {
        let deadline_ms = self.config.hard_shutdown_delay.as_millis().min(u64::MAX as u128) as u64;
        while let Some(index) = self.restarts_pending.pop_front() {
            let slot = &mut self.slots[index as usize];
            if !slot.alive {
                // Down and waiting for its revival, which uses the new configuration anyway.
                continue;
            }
            slot.retiring = true;
            // New connections for this index queue for the successor instead of reaching a draining worker.
            slot.state = SlotState::Down;
            let pid = slot.pid;
            let sent = slot.channel.as_ref().is_some_and(|channel| {
                channel.enqueue(Outgoing::Shutdown { deadline_ms, then_terminate: Some(pid) }).is_ok()
            });
            if !sent {
                signal_worker(pid, Signal::SIGTERM);
            }
            let (events, generation, delay) = (self.events.clone(), slot.generation, self.config.hard_shutdown_delay);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = events.send(Event::RetireDeadline { index, generation });
            });
            self.restarting = Some(index);
            return;
        }
        info!("reload: every worker runs the new configuration");
    }

    fn kill_all(&mut self) {
        self.hard_killed = true;
        let spawned = self.spawns();
        for slot in &mut self.slots {
            self.stats.closed += slot.close_queue();
            if slot.alive && spawned {
                warn!("killing worker {} (pid {})", slot.index, slot.pid);
                signal_worker(slot.pid, Signal::SIGKILL);
            } else if slot.alive {
                // Attached workers belong to another supervisor: cut them loose instead.
                warn!("detaching worker {} (pid {}) that did not finish in time", slot.index, slot.pid);
                // Down as well as channel-less: nothing may be sent to it any more.
                slot.disconnect();
                slot.alive = false;
            }
        }
    }

    async fn wait_for_exits(&mut self, events: &mut UnboundedReceiver<Event>) {
        self.shutdown_deadline.get_or_insert_with(TokioInstant::now);
        while self.slots.iter().any(|slot| slot.alive) {
            match events.recv().await {
                Some(event) => self.on_event(event),
                None => break,
            }
        }
    }
}

/// Reads the client address from the connection's first bytes without consuming them, then hands the
/// connection back to the event loop for routing. On any trouble it routes by the TCP peer.
async fn identify_client(handoff: Handoff, source: ClientAddressSource, events: UnboundedSender<Event>) {
    let Handoff { stream, peer, local, arrived } = handoff;
    let peeked = async {
        stream.set_nonblocking(true)?;
        let stream = tokio::net::TcpStream::from_std(stream)?;
        let client = crate::client_address::identify(&stream, source, peer).await;
        let stream = stream.into_std()?;
        // Workers get connections in blocking mode, as accept(2) gives them.
        stream.set_nonblocking(false)?;
        Ok::<_, io::Error>((stream, client))
    };
    match peeked.await {
        Ok((stream, client)) => {
            let _ = events.send(Event::Identified(Handoff { stream, peer: client, local, arrived }));
        }
        Err(error) => {
            let _ = events.send(Event::Unidentified { peer, error });
        }
    }
}

/// Accepts the next worker dialing the attach socket.
async fn accept_worker(socket: Option<&AsyncFd<OwnedFd>>) -> io::Result<OwnedFd> {
    let Some(socket) = socket else { return std::future::pending().await };
    loop {
        let mut guard = socket.readable().await?;
        match nix::sys::socket::accept4(
            socket.get_ref(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        ) {
            Err(Errno::EAGAIN) => guard.clear_ready(),
            Err(Errno::EINTR | Errno::ECONNABORTED) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Reads hello/ready from a worker until its channel ends.
async fn read_channel(channel: Arc<AsyncFd<OwnedFd>>, events: UnboundedSender<Event>, index: u32, generation: u64) {
    loop {
        let mut guard = match channel.readable().await {
            Ok(guard) => guard,
            Err(error) => {
                let reason = Some(error.to_string());
                let _ = events.send(Event::ChannelClosed { index, generation, reason });
                return;
            }
        };
        match recv_message(channel.get_ref().as_fd(), true) {
            Err(Error::WouldBlock) => guard.clear_ready(),
            Ok(received) => {
                let _ = events.send(Event::Message { index, generation, message: received.message });
            }
            Err(Error::ChannelClosed) => {
                let _ = events.send(Event::ChannelClosed { index, generation, reason: None });
                return;
            }
            Err(error) => {
                let _ = events.send(Event::ChannelClosed { index, generation, reason: Some(error.to_string()) });
                return;
            }
        }
    }
}

/// Writes connections and shutdown to a worker's channel, waiting when its buffer is full; what cannot
/// be written goes back to the event loop so it is served elsewhere or counted.
async fn write_channel(
    channel: Arc<AsyncFd<OwnedFd>>,
    mut outgoing: UnboundedReceiver<Outgoing>,
    backlog: Arc<AtomicUsize>,
    events: UnboundedSender<Event>,
    index: u32,
) {
    while let Some(item) = outgoing.recv().await {
        let message = match &item {
            Outgoing::Connection(handoff) => Message::Connection { peer: handoff.peer, local: handoff.local },
            Outgoing::Shutdown { deadline_ms, .. } => Message::Shutdown { deadline_ms: *deadline_ms },
        };
        let fd = match &item {
            Outgoing::Connection(handoff) => Some(handoff.stream.as_fd()),
            Outgoing::Shutdown { .. } => None,
        };
        let result = loop {
            let mut guard = match channel.writable().await {
                Ok(guard) => guard,
                Err(_) => break Err(Errno::EIO),
            };
            match send_message(channel.get_ref().as_fd(), &message, fd, true) {
                Err(Errno::EAGAIN) => guard.clear_ready(),
                other => break other,
            }
        };
        match (result, item) {
            (Err(errno), Outgoing::Connection(handoff)) => {
                let _ = events.send(Event::Undelivered { index, handoff, errno });
            }
            (_, Outgoing::Shutdown { then_terminate: Some(pid), .. }) => signal_worker(pid, Signal::SIGTERM),
            _ => {}
        }
        backlog.fetch_sub(1, Ordering::SeqCst);
    }
}
