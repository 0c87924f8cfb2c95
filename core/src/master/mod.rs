//! The master: listen, accept, hash the client address, and hand each socket to its worker's channel;
//! queue for workers that are not ready, revive dead ones under the same index, and shut down in order.
//!
//! `run` is the story; each owner of state has its file: `slot` (an index's queue and its worker's life),
//! `channel` (writing to and reading from workers), `handoff` (routing), `listen` (client and metrics
//! listeners), `workers` (starting, exits, revival), `attach` (workers that dial in), `reload`, `kernel`.

mod activation;
mod attach;
mod channel;
mod handoff;
mod kernel;
mod listen;
mod reload;
mod slot;
mod upgrade;
mod workers;

pub use listen::{bind, Listener};
pub use upgrade::{check as check_upgrade_state, resume, Checked};

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::{sleep_until, Instant as TokioInstant};
use tracing::{debug, info, warn};

use crate::config::{Config, Routing, WorkerSource};
use crate::error::{Error, Result};
use crate::protocol::Message;
use handoff::Handoff;
use listen::{accept_batch, bind_one};
use slot::{PendingShutdown, Process, WorkerSlot};

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
    /// Re-execute the (preflighted) new binary in this process, handing it every socket, worker and
    /// queued connection (SIGUSR2; the `sticky-cluster` binary only: an embedding cannot re-execute its
    /// host program).
    Upgrade(Box<crate::upgrade::Plan>),
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
    /// Worker processes started again after one died or stopped.
    pub revivals: u64,
    /// Connections taken back from a dead worker's channel (sent, never received) and served again.
    pub recovered: u64,
    /// Reloads given up because a successor could not start; the old workers kept serving.
    pub reload_failures: u64,
}

/// Where a master listens: reported once its sockets are registered, before its workers start, and
/// again by [`resume`] once an upgraded image has taken them over (the binary's `--ready-fd` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The client listener's address (with the port the kernel picked when the configuration said 0).
    pub address: SocketAddr,
    /// The Prometheus page's address, when `metrics` is configured.
    pub metrics: Option<SocketAddr>,
    /// Attach mode: the Unix socket workers dial.
    pub attach_socket: Option<PathBuf>,
    /// Worker indexes (`concurrency`).
    pub workers: u32,
    /// Who routes connections.
    pub routing: Routing,
}

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and routing; dead workers are revived.
    Running,
    /// The listener is closed and workers finish; the rest are killed at `deadline`.
    Draining { deadline: TokioInstant },
    /// Every worker was killed (or cut loose); the master waits for their exits.
    Killed,
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
    /// An attached worker's attach connection ended: the worker is gone.
    Detached {
        index: u32,
        generation: u64,
    },
    /// A full channel has room again.
    Room {
        index: u32,
        generation: u64,
    },
    /// The back-off after the exit of the index's worker of `generation` is over.
    Revive {
        index: u32,
        generation: u64,
    },
    Attached(crate::attach::Claim),
    /// `hardShutdownDelay` after a reload asked the process of `generation` to start (a successor: it
    /// must be ready by now) or to stop (a retiring worker: it must be gone by now).
    ReloadDeadline {
        index: u32,
        generation: u64,
    },
    /// A connection whose client address was read from a proxy header (or given up on).
    Identified(Handoff),
    /// A connection closed while its client address was read (logged by `HeaderWait`).
    Unidentified {
        peer: SocketAddr,
        reason: String,
    },
    /// Signals are blocked and the upgrade's exec may go ahead.
    Exec(Box<crate::upgrade::Plan>),
}

struct Master {
    config: Config,
    phase: Phase,
    /// Attach mode: the socket workers dial (its options are in `config.workers`), and its file, removed
    /// at exit only while the path still names it.
    attach_socket: Option<AsyncFd<OwnedFd>>,
    attach_file: Option<crate::attach::SocketFile>,
    slots: Vec<WorkerSlot>,
    /// The client listener (handoff routing), closed when the master stops running.
    listener: Option<AsyncFd<TcpListener>>,
    /// The client listener's own address, sent as each connection's local address: one `getsockname`
    /// per connection fewer in the master; a worker reads its connection's exact one itself.
    listen_address: SocketAddr,
    /// Kernel routing: the `SO_REUSEPORT` group, listener i for worker i, open until `run` returns (after
    /// every worker exited), so the group never reorders and no completed connection is dropped early.
    group: Option<crate::reuseport::ReuseportGroup>,
    /// The Prometheus page's listener, when `metrics` is configured.
    metrics: Option<AsyncFd<TcpListener>>,
    events: UnboundedSender<Event>,
    stats: Stats,
    /// The client and metrics listeners' back-off after accept errors; the attach socket's own.
    accept_backoff: listen::AcceptBackoff,
    attach_backoff: listen::AcceptBackoff,
    /// A reload's rolling restart: indexes still to restart, the one whose successor starts now, and
    /// the configuration to go back to if a successor cannot start.
    restarts_pending: VecDeque<u32>,
    restarting: Option<u32>,
    before_reload: Option<Box<Config>>,
    /// Connections waiting in the master per client address (`queue.perSource`), and the episode of
    /// connections closed unserved being logged.
    waiting: handoff::WaitingBySource,
    closing: handoff::ClosingEpisode,
    /// Connections from trusted proxies waiting for their header.
    header_wait: crate::client_address::header_wait::HeaderWait,
    scrapes: crate::metrics::ScrapeLimit,
    handshakes: crate::attach::Handshakes,
}

/// The master's listening sockets, registered with the reactor.
struct Sockets {
    /// Attach mode: the socket workers dial, and its file.
    attach: Option<AsyncFd<OwnedFd>>,
    attach_file: Option<crate::attach::SocketFile>,
    /// Handoff routing: the client listener.
    listener: Option<AsyncFd<TcpListener>>,
    /// Kernel routing: the listener group.
    group: Option<crate::reuseport::ReuseportGroup>,
    /// The Prometheus page's listener.
    metrics: Option<AsyncFd<TcpListener>>,
    /// The client listener's (or group's) address.
    address: SocketAddr,
}

impl Sockets {
    /// Registers sockets the master made (or inherited): `listener` for clients, the attach socket and the
    /// metrics listener when configured.
    fn register(
        config: &Config,
        listener: Listener,
        attach: Option<(OwnedFd, crate::attach::SocketFile)>,
        metrics: Option<TcpListener>,
    ) -> Result<Sockets> {
        let (attach, attach_file) = match attach {
            Some((socket, file)) => (Some(socket), Some(file)),
            None => (None, None),
        };
        let attach = match attach {
            // SAFETY: the AsyncFd owns the socket, so its fd stays open and unchanged while registered.
            Some(socket) => Some(
                unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                    .map_err(|e| Error::io("register the attach socket", e))?,
            ),
            None => None,
        };
        let (listener, group) = match listener {
            Listener::Handoff(listener) => (Some(listener), None),
            Listener::Kernel(group) => (None, Some(kernel::checked(group, config.concurrency)?)),
        };
        let address = match (&listener, &group) {
            (Some(listener), _) => listener.local_addr().map_err(|e| Error::io("read the listener address", e))?,
            (None, Some(group)) => group.local_addr(),
            (None, None) => return Err(Error::io("listen", io::Error::from(io::ErrorKind::NotFound))),
        };
        let listener = match listener {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(|e| Error::io("set the listener non-blocking", e))?;
                // SAFETY: the AsyncFd owns the listener, so its fd stays open and unchanged while registered.
                Some(unsafe { AsyncFd::register(listener) }.map_err(|e| Error::io("register the listener", e))?)
            }
            None => None,
        };
        let metrics = match metrics {
            // SAFETY: the AsyncFd owns the listener, so its fd stays open and unchanged while registered.
            Some(metrics) => {
                Some(unsafe { AsyncFd::register(metrics) }.map_err(|e| Error::io("register the metrics listener", e))?)
            }
            None => None,
        };
        Ok(Sockets { attach, attach_file, listener, group, metrics, address })
    }
}

/// Runs a cluster on `listener` (what [`bind`] returned) until `stop` asks it to end (first
/// [`Stop::Graceful`], then [`Stop::Hard`] for a second signal), and reports how it ended.
pub async fn run(config: Config, listener: impl Into<Listener>, stop: UnboundedReceiver<Stop>) -> Result<Outcome> {
    run_reporting(config, listener, stop, |_| {}).await
}

/// [`run`], telling `listening` where the cluster listens once every socket is registered (before the
/// first worker starts; connections that come meanwhile wait for their worker).
pub async fn run_reporting(
    config: Config,
    listener: impl Into<Listener>,
    stop: UnboundedReceiver<Stop>,
    listening: impl FnOnce(&Listening),
) -> Result<Outcome> {
    raise_fd_limit();
    let attach = match &config.workers {
        WorkerSource::Spawn { .. } => None,
        WorkerSource::Attach(options) => {
            let socket = crate::attach::listen(options)?;
            info!("waiting for {} worker(s) to attach at {}", config.concurrency, options.socket.display());
            Some(socket)
        }
    };
    let metrics = match config.metrics {
        Some(address) => {
            let listener = bind_one(address).map_err(|source| Error::Listen { address, source })?;
            let bound = listener.local_addr().unwrap_or(address);
            info!("metrics on http://{bound}/metrics");
            Some(listener)
        }
        None => None,
    };
    let sockets = Sockets::register(&config, listener.into(), attach, metrics)?;
    let (mut master, mut event_rx) = Master::new(config, sockets);
    info!("listening on {} with {} workers", master.listen_address, master.config.concurrency);
    listening(&master.listening());
    let spawned_workers = if master.spawns() { master.config.concurrency } else { 0 };
    for index in 0..spawned_workers {
        if let Err(error) = master.start_worker(index) {
            master.kill_all();
            master.wait_for_exits(&mut event_rx).await;
            return Err(error);
        }
    }
    master.serve(event_rx, stop).await
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
    /// A master on `sockets` with no worker yet, and the receiver of its events.
    fn new(config: Config, sockets: Sockets) -> (Master, UnboundedReceiver<Event>) {
        // Fds that peers send are closed off this thread (a peer can make a close block).
        crate::closer::start();
        let (events, event_rx) = unbounded_channel();
        let concurrency = config.concurrency;
        let master = Master {
            slots: (0..concurrency).map(WorkerSlot::new).collect(),
            stats: Stats { routed: vec![0; concurrency as usize], ..Stats::default() },
            header_wait: crate::client_address::header_wait::HeaderWait::new(&config),
            scrapes: crate::metrics::ScrapeLimit::default(),
            handshakes: crate::attach::Handshakes::default(),
            config,
            phase: Phase::Running,
            attach_socket: sockets.attach,
            attach_file: sockets.attach_file,
            listener: sockets.listener,
            listen_address: sockets.address,
            group: sockets.group,
            metrics: sockets.metrics,
            events,
            accept_backoff: listen::AcceptBackoff::new("the client listener"),
            attach_backoff: listen::AcceptBackoff::new("the attach socket"),
            waiting: handoff::WaitingBySource::default(),
            closing: handoff::ClosingEpisode::default(),
            restarts_pending: VecDeque::new(),
            restarting: None,
            before_reload: None,
        };
        (master, event_rx)
    }

    /// The event loop: accepts, routes and supervises until every worker is gone after a stop.
    async fn serve(
        mut self,
        mut event_rx: UnboundedReceiver<Event>,
        mut stop: UnboundedReceiver<Stop>,
    ) -> Result<Outcome> {
        let mut stop_open = true;
        let mut tick = tokio::time::interval(crate::config::defaults::QUEUE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let paused = self.accept_backoff.is_paused();
            let attach_paused = self.attach_backoff.is_paused();
            let resume = match (self.accept_backoff.resume_at(), self.attach_backoff.resume_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let deadline = match self.phase {
                Phase::Draining { deadline } => Some(deadline),
                Phase::Running | Phase::Killed => None,
            };
            tokio::select! {
                batch = accept_batch(self.listener.as_ref()), if !paused && self.listener.is_some() => {
                    self.on_accepted(batch);
                }
                Some(event) = event_rx.recv() => match event {
                    Event::Exec(plan) => self.exec_upgrade(plan, &mut event_rx, &mut stop),
                    event => self.on_event(event),
                },
                scrapes = accept_batch(self.metrics.as_ref()), if !paused && self.metrics.is_some() => {
                    self.on_scrapes(scrapes);
                }
                dialed = attach::accept_worker(self.attach_socket.as_ref()), if !attach_paused && self.attach_socket.is_some() => {
                    self.on_dialed(dialed);
                }
                request = stop.recv(), if stop_open => match request {
                    Some(request) => self.on_stop(request),
                    None => stop_open = false,
                },
                _ = tick.tick() => {
                    self.expire_queues();
                    self.judge_readiness();
                }
                _ = sleep_until(resume.unwrap_or_else(TokioInstant::now)), if resume.is_some() => {
                    let now = TokioInstant::now();
                    self.accept_backoff.resume_if_due(now);
                    self.attach_backoff.resume_if_due(now);
                }
                _ = sleep_until(deadline.unwrap_or_else(TokioInstant::now)), if deadline.is_some() => {
                    warn!("hardShutdownDelay of {:?} passed: killing the remaining workers", self.config.hard_shutdown_delay);
                    self.kill_all();
                }
            }
            if self.phase != Phase::Running && self.slots.iter().all(WorkerSlot::is_empty) {
                break;
            }
        }
        self.close_what_is_left();
        // Only while the path still names this master's socket file.
        if let Some(file) = self.attach_file.take() {
            file.remove();
        }
        let stats = self.stats.clone();
        info!(
            "stopped: routed {} connections {:?}, redirected {}, closed {}, revivals {}, recovered {}",
            stats.routed.iter().sum::<u64>(),
            stats.routed,
            stats.redirected,
            stats.closed,
            stats.revivals,
            stats.recovered
        );
        Ok(Outcome { graceful: self.phase != Phase::Killed, stats })
    }

    /// Where this master listens.
    fn listening(&self) -> Listening {
        Listening {
            address: self.listen_address,
            metrics: self.metrics.as_ref().and_then(|metrics| metrics.get_ref().local_addr().ok()),
            attach_socket: match &self.config.workers {
                WorkerSource::Attach(options) => Some(options.socket.clone()),
                WorkerSource::Spawn { .. } => None,
            },
            workers: self.config.concurrency,
            routing: self.config.routing,
        }
    }

    /// Whether this master starts its workers itself (spawn mode) rather than waiting for attaches.
    fn spawns(&self) -> bool {
        matches!(self.config.workers, WorkerSource::Spawn { .. })
    }

    /// Accepting, routing and reviving (not shutting down).
    fn running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// The process of `generation` of worker `index`, if it is still one of the index's (events about a
    /// process that is gone are stale).
    fn process_of(&mut self, index: u32, generation: u64) -> Option<&mut Process> {
        self.slots.get_mut(index as usize)?.process_mut(generation)
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message { index, generation, message } => self.on_message(index, generation, message),
            Event::ChannelClosed { index, generation, reason } => self.channel_ended(index, generation, reason),
            Event::Attached(claim) => self.on_attached(claim),
            Event::Identified(handoff) => self.route(handoff),
            Event::Unidentified { peer, reason } => {
                self.stats.closed += 1;
                debug!("connection from {peer} closed while its client address was read: {reason}");
            }
            Event::ReloadDeadline { index, generation } => self.on_reload_deadline(index, generation),
            Event::Exited { index, generation, status } => self.on_exit(index, generation, status),
            Event::Room { index, generation } => self.on_room(index, generation),
            Event::Detached { index, generation } => self.on_detached(index, generation),
            Event::Revive { index, generation } => self.on_revive(index, generation),
            // Only the loop itself executes an upgrade.
            Event::Exec(_) => {}
        }
    }

    fn on_stop(&mut self, request: Stop) {
        match (request, self.phase) {
            (Stop::Graceful, Phase::Running) => {
                let delay = self.config.hard_shutdown_delay;
                info!("shutting down: {} workers have {:?} to finish", self.config.concurrency, delay);
                self.phase = Phase::Draining { deadline: TokioInstant::now() + delay };
                self.listener = None;
                let deadline_ms = crate::config::whole_millis(delay);
                for index in 0..self.config.concurrency {
                    let slot = &mut self.slots[index as usize];
                    // A ready worker still gets what waits for room in its channel, then the shutdown;
                    // connections waiting for a worker that never became ready are closed.
                    if !slot.life.is_ready() {
                        self.stats.closed += slot.close_queue();
                    }
                    for process in slot.processes_mut() {
                        process.farewell_shutdown(deadline_ms);
                    }
                    self.flush(index);
                }
            }
            (Stop::Graceful, _) => {}
            (Stop::Reload(config), Phase::Running) => self.reload(*config),
            (Stop::Reload(_), _) => warn!("reload ignored: the cluster is shutting down"),
            (Stop::Upgrade(plan), Phase::Running) => self.start_upgrade(plan),
            (Stop::Upgrade(_), _) => warn!("upgrade refused: the cluster is shutting down"),
            (Stop::Hard, phase) => {
                warn!("second signal: stopping at once");
                if phase == Phase::Running {
                    self.listener = None;
                }
                self.kill_all();
            }
        }
    }

    /// Kills every spawned worker and cuts attached ones loose; what waits for them is closed and counted.
    fn kill_all(&mut self) {
        self.phase = Phase::Killed;
        for index in 0..self.config.concurrency {
            let slot = &mut self.slots[index as usize];
            self.stats.closed += slot.close_queue();
            for process in slot.processes() {
                if process.spawned {
                    warn!("killing worker {index} (pid {})", process.pid);
                    crate::supervisor::signal_worker(process.pid, Signal::SIGKILL);
                }
            }
            // Attached workers belong to another supervisor: cut them loose instead.
            let attached: Vec<u64> =
                slot.processes().filter(|process| !process.spawned).map(|process| process.generation).collect();
            for generation in attached {
                self.release_attached(index, generation, "did not finish in time; detached", false);
            }
        }
    }

    async fn wait_for_exits(&mut self, events: &mut UnboundedReceiver<Event>) {
        if self.phase == Phase::Running {
            self.phase = Phase::Killed;
        }
        while !self.slots.iter().all(WorkerSlot::is_empty) {
            match events.recv().await {
                Some(event) => self.on_event(event),
                None => break,
            }
        }
    }
}

impl Process {
    /// Owes this process the shutdown message (then SIGTERM when spawned), unless it already has it.
    fn farewell_shutdown(&mut self, deadline_ms: u64) {
        if self.shutdown_sent {
            return;
        }
        self.shutdown_sent = true;
        if self.channel.is_some() {
            self.farewell.shutdown = Some(PendingShutdown { deadline_ms, terminate: self.spawned });
        } else if self.spawned {
            crate::supervisor::signal_worker(self.pid, Signal::SIGTERM);
        }
    }
}

/// Makes the loop hear about an event after `delay`.
fn after(delay: Duration, events: &UnboundedSender<Event>, event: Event) {
    let events = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(event);
    });
}
