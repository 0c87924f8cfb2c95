//! Upgrading the master in place, the master's half: what its state is on the way to the next image
//! (versioned, every fd named by number), taking it over there, and adopting its children with pidfds.
//! `crate::upgrade` carries the state across `execve`; this file decides what is in it.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{error, info, warn};

use super::attach::watch_attach_link;
use super::channel::WorkerChannel;
use super::handoff::Handoff;
use super::listen::Listener;
use super::slot::{AttachLink, Farewell, Life, PendingShutdown, Process, Retirement, WorkerSlot};
use super::{after, Event, Listening, Master, Outcome, Sockets, Stats, Stop};
use crate::config::{whole_millis, Config, WorkerSource};
use crate::error::{Error, Result};
use crate::upgrade::{Plan, STATE_VERSION};

/// Everything the next image needs to go on as this master: versioned JSON, fds by number.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    version: u32,
    /// The build that wrote it.
    build: String,
    /// The build it is for, as that build said in its preflight (hashing a binary in the gap would
    /// delay every new client).
    for_build: String,
    /// What the next image checks its configuration against: these need a restart to change.
    concurrency: u32,
    routing: String,
    listen_address: SocketAddr,
    listener: Option<RawFd>,
    group: Option<GroupState>,
    metrics: Option<RawFd>,
    attach: Option<RawFd>,
    /// The attach socket's file, removed at exit only while the path still names it.
    attach_file: Option<crate::attach::SocketFile>,
    stats: StatsState,
    slots: Vec<SlotState>,
    restarts_pending: Vec<u32>,
    restarting: Option<u32>,
    before_reload: Option<WorkersState>,
    /// Connections from trusted proxies still waiting for their header.
    header_waiting: Vec<WaitingState>,
    /// Header waits refused, rejected and timed out so far.
    header_counters: [u64; 3],
    /// Attach mode: workers that dialed, passed the uid check, and whose hello is awaited: (fd, uid).
    dialing: Vec<(RawFd, u32)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WaitingState {
    fd: RawFd,
    peer: SocketAddr,
    age_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupState {
    listeners: Vec<RawFd>,
    interfaces: Vec<(u32, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StatsState {
    routed: Vec<u64>,
    redirected: u64,
    closed: u64,
    revivals: u64,
    recovered: u64,
    reload_failures: u64,
    /// Connections closed because their address had `queue.perSource` waiting.
    per_source_closed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SlotState {
    generation: u64,
    crashes: u32,
    stuck_reported: bool,
    life: LifeState,
    queue: Vec<ConnectionState>,
    retiring: Vec<RetiringState>,
    /// Ends of dead workers' channels holding connections the master could not take back yet (its fd limit).
    left_behind: Vec<RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
enum LifeState {
    Down { for_ms: u64 },
    Starting(ProcessState),
    Ready { process: ProcessState, successor: Option<ProcessState> },
}

#[derive(Debug, Serialize, Deserialize)]
struct RetiringState {
    process: ProcessState,
    for_reload: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ProcessState {
    generation: u64,
    pid: u32,
    spawned: bool,
    age_ms: u64,
    channel: Option<RawFd>,
    worker_end: Option<RawFd>,
    attach_link: Option<RawFd>,
    owed_stopped: bool,
    /// `(deadline_ms, terminate)` of a shutdown message still to be written.
    owed_shutdown: Option<(u64, bool)>,
    shutdown_sent: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConnectionState {
    fd: RawFd,
    peer: SocketAddr,
    local: SocketAddr,
    age_ms: u64,
    /// It counts against its address's `queue.perSource`.
    counted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkersState {
    command: Vec<String>,
    cwd: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

/// An instant `ms` milliseconds ago (now, if the clock does not reach back that far).
fn ago(ms: u64) -> Instant {
    Instant::now().checked_sub(Duration::from_millis(ms)).unwrap_or_else(Instant::now)
}

/// The fds a state names, collected while it is written.
#[derive(Default)]
struct Fds(Vec<RawFd>);

impl Fds {
    fn keep(&mut self, fd: RawFd) -> RawFd {
        self.0.push(fd);
        fd
    }
}

impl Master {
    /// SIGUSR2 passed its preflight: block signals now (they stay pending for the next image), let the
    /// loop take what is already on its way, then exec.
    pub(super) fn start_upgrade(&mut self, plan: Box<Plan>) {
        if !self.running() {
            return warn!("upgrade refused: the cluster is shutting down");
        }
        crate::upgrade::block_signals();
        let events = self.events.clone();
        tokio::spawn(async move {
            // Signals that arrived before the block are read by their tasks and become stop requests,
            // which the exec then sees and goes before.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let _ = events.send(Event::Exec(plan));
        });
    }

    /// Hands everything to the upgraded binary and executes it; returns (signals unblocked, the cluster
    /// as it was) only when that failed or a stop request came first.
    pub(super) fn exec_upgrade(
        &mut self,
        plan: Box<Plan>,
        events: &mut UnboundedReceiver<Event>,
        stop: &mut UnboundedReceiver<Stop>,
    ) {
        // What the loop has not seen yet must be in the state: a ready, an exit, a routed connection.
        while let Ok(event) = events.try_recv() {
            match event {
                Event::Exec(_) => {}
                event => self.on_event(event),
            }
        }
        if let Ok(request) = stop.try_recv() {
            crate::upgrade::unblock_signals();
            warn!("upgrade cancelled: a stop request came first");
            return self.on_stop(request);
        }
        if !self.running() {
            crate::upgrade::unblock_signals();
            return warn!("upgrade cancelled: the cluster is shutting down");
        }
        let mut fds = Fds::default();
        let state = self.snapshot(&plan, &mut fds);
        let error = match serde_json::to_vec(&state) {
            Ok(bytes) => {
                info!(
                    "upgrading in place to build {} (from {}): {} workers, {} connections queued",
                    plan.new_build,
                    plan.old_build,
                    self.slots.iter().map(|slot| slot.processes().count()).sum::<usize>(),
                    self.slots.iter().map(|slot| slot.queue.len()).sum::<usize>()
                );
                crate::upgrade::exec(&plan, &bytes, &fds.0)
            }
            Err(error) => io::Error::other(format!("write the state: {error}")),
        };
        crate::upgrade::unblock_signals();
        error!("upgrade failed, the cluster goes on as it was: cannot execute {}: {error}", plan.binary.display());
    }

    /// This master as a [`State`], naming in `fds` every fd the next image must inherit.
    fn snapshot(&self, plan: &Plan, fds: &mut Fds) -> State {
        let process_state = |process: &Process, fds: &mut Fds| ProcessState {
            generation: process.generation,
            pid: process.pid,
            spawned: process.spawned,
            age_ms: whole_millis(process.started.elapsed()),
            channel: process.channel.as_ref().map(|channel| fds.keep(channel.fd())),
            worker_end: process.worker_end.as_ref().map(|end| fds.keep(end.as_raw_fd())),
            attach_link: process.attach_link.as_ref().map(|link| fds.keep(link.fd)),
            owed_stopped: process.farewell.stopped,
            owed_shutdown: process.farewell.shutdown.map(|shutdown| (shutdown.deadline_ms, shutdown.terminate)),
            shutdown_sent: process.shutdown_sent,
        };
        let slots = self
            .slots
            .iter()
            .map(|slot| SlotState {
                generation: slot.generation,
                crashes: slot.crashes,
                stuck_reported: slot.stuck_reported,
                life: match &slot.life {
                    Life::Down { since } => LifeState::Down { for_ms: whole_millis(since.elapsed()) },
                    Life::Starting(process) => LifeState::Starting(process_state(process, fds)),
                    Life::Ready { process, successor } => LifeState::Ready {
                        process: process_state(process, fds),
                        successor: successor.as_ref().map(|successor| process_state(successor, fds)),
                    },
                },
                queue: slot
                    .queue
                    .iter()
                    .map(|handoff| ConnectionState {
                        fd: fds.keep(handoff.stream.as_raw_fd()),
                        peer: handoff.peer,
                        local: handoff.local,
                        age_ms: whole_millis(handoff.arrived.elapsed()),
                        counted: handoff.ticket.is_some(),
                    })
                    .collect(),
                left_behind: slot.left_behind.iter().map(|end| fds.keep(end.as_raw_fd())).collect(),
                retiring: slot
                    .retiring
                    .iter()
                    .map(|retiring| RetiringState {
                        process: process_state(&retiring.process, fds),
                        for_reload: retiring.cause == Retirement::Reload,
                    })
                    .collect(),
            })
            .collect();
        let before_reload = self.before_reload.as_ref().and_then(|config| match &config.workers {
            WorkerSource::Spawn { command, cwd } => {
                Some(WorkersState { command: command.clone(), cwd: cwd.clone(), env: config.env.clone() })
            }
            WorkerSource::Attach(_) => None,
        });
        State {
            version: STATE_VERSION,
            build: plan.old_build.clone(),
            for_build: plan.new_build.clone(),
            concurrency: self.config.concurrency,
            routing: self.config.routing.as_str().to_string(),
            listen_address: self.listen_address,
            listener: self.listener.as_ref().map(|listener| fds.keep(listener.get_ref().as_raw_fd())),
            group: self.group.as_ref().map(|group| GroupState {
                listeners: group.listeners().iter().map(|fd| fds.keep(fd.as_raw_fd())).collect(),
                interfaces: group.program().interfaces.clone(),
            }),
            metrics: self.metrics.as_ref().map(|metrics| fds.keep(metrics.get_ref().as_raw_fd())),
            attach: self.attach_socket.as_ref().map(|socket| fds.keep(socket.get_ref().as_raw_fd())),
            attach_file: self.attach_file.clone(),
            stats: StatsState {
                routed: self.stats.routed.clone(),
                redirected: self.stats.redirected,
                closed: self.stats.closed,
                revivals: self.stats.revivals,
                recovered: self.stats.recovered,
                reload_failures: self.stats.reload_failures,
                per_source_closed: self.waiting.closed,
            },
            slots,
            restarts_pending: self.restarts_pending.iter().copied().collect(),
            restarting: self.restarting,
            before_reload,
            header_waiting: self
                .header_wait
                .waiting_connections()
                .into_iter()
                .map(|waiting| WaitingState {
                    fd: fds.keep(waiting.fd),
                    peer: waiting.peer,
                    age_ms: whole_millis(waiting.arrived.elapsed()),
                })
                .collect(),
            header_counters: self.header_wait.counters(),
            dialing: self.handshakes.dialing().into_iter().map(|(fd, uid)| (fds.keep(fd), uid)).collect(),
        }
    }
}

/// A state read and checked against this image's configuration, not yet taken over: nothing has been
/// done with its fds, so the old binary can still be given it back.
pub struct Checked {
    state: State,
    rolled_back: bool,
}

/// Reads the state a previous image wrote and checks it against `config` (what needs a restart to
/// change must not have changed) and every fd it names (open, and a socket where one is expected).
/// `rolled_back`: this image is the old binary taking its state back after a failed upgrade.
pub fn check(config: &Config, bytes: &[u8], rolled_back: bool) -> std::result::Result<Checked, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let versioned: Versioned = serde_json::from_slice(bytes).map_err(|e| format!("the upgrade state: {e}"))?;
    if !crate::upgrade::READS_STATE_VERSIONS.contains(&versioned.version) {
        return Err(format!("the upgrade state has version {}, this build reads {STATE_VERSION}", versioned.version));
    }
    let state: State = serde_json::from_slice(bytes).map_err(|e| format!("the upgrade state: {e}"))?;
    if state.concurrency != config.concurrency || state.routing != config.routing.as_str() {
        return Err(format!(
            "the configuration says concurrency {} and routing {}, the running cluster has {} and {}: that needs a restart",
            config.concurrency,
            config.routing.as_str(),
            state.concurrency,
            state.routing
        ));
    }
    let attaches = matches!(config.workers, WorkerSource::Attach(_));
    if state.attach.is_some() != attaches || state.attach.is_some() != state.attach_file.is_some() {
        return Err("the configuration switches between spawn and attach mode: that needs a restart".into());
    }
    if state.slots.len() != config.concurrency as usize || state.stats.routed.len() != state.slots.len() {
        return Err("the upgrade state does not have one slot per worker".into());
    }
    let mut named = Vec::new();
    named.extend(state.header_waiting.iter().map(|waiting| waiting.fd));
    named.extend(state.dialing.iter().map(|(fd, _)| *fd));
    named.extend(state.listener);
    named.extend(state.metrics);
    named.extend(state.attach);
    if let Some(group) = &state.group {
        named.extend(&group.listeners);
    }
    for slot in &state.slots {
        named.extend(slot.queue.iter().map(|connection| connection.fd));
        named.extend(&slot.left_behind);
        let processes = match &slot.life {
            LifeState::Down { .. } => Vec::new(),
            LifeState::Starting(process) => vec![process],
            LifeState::Ready { process, successor } => std::iter::once(process).chain(successor).collect(),
        };
        for process in processes.into_iter().chain(slot.retiring.iter().map(|retiring| &retiring.process)) {
            named.extend(process.channel.iter().chain(&process.worker_end).chain(&process.attach_link));
        }
    }
    for fd in named {
        // SAFETY: fstat only reads the descriptor table.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(format!("the upgrade state names fd {fd}, which is not an open socket here"));
        }
    }
    // This image is the build the state was written for (or, rolled back, the one that wrote it): its id
    // for the ready line without hashing the executable in the gap.
    crate::upgrade::know_build_id(if rolled_back { &state.build } else { &state.for_build });
    Ok(Checked { state, rolled_back })
}

/// Takes ownership of an fd the previous image named, close-on-exec from now on.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `check` found it open; the state names every fd once, and this image owns it from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    fd
}

/// Goes on as the master the state describes, with `config` (re-read from the same arguments) and
/// `stop` for shutdown requests: the same listeners, workers, queues and counters. `listening` hears
/// where it listens once everything is taken over.
pub async fn resume(
    config: Config,
    checked: Checked,
    stop: UnboundedReceiver<Stop>,
    listening: impl FnOnce(&Listening),
) -> Result<Outcome> {
    let (state, rolled_back) = (checked.state, checked.rolled_back);
    let listener = match (state.listener, state.group) {
        (Some(fd), _) => Listener::Handoff(TcpListener::from(own(fd))),
        (None, Some(group)) => Listener::Kernel(crate::reuseport::ReuseportGroup::adopt(
            group.listeners.into_iter().map(own).collect(),
            group.interfaces,
        )?),
        (None, None) => return Err(Error::io("take over the listener", io::Error::from(io::ErrorKind::NotFound))),
    };
    let metrics = state.metrics.map(|fd| TcpListener::from(own(fd)));
    let attach = state.attach.map(own).zip(state.attach_file);
    let sockets = Sockets::register(&config, listener, attach, metrics)?;
    let (mut master, event_rx) = Master::new(config, sockets);
    master.stats = Stats {
        routed: state.stats.routed,
        redirected: state.stats.redirected,
        closed: state.stats.closed,
        revivals: state.stats.revivals,
        recovered: state.stats.recovered,
        reload_failures: state.stats.reload_failures,
    };
    master.waiting.closed = state.stats.per_source_closed;
    master.restarts_pending = state.restarts_pending.into_iter().collect::<VecDeque<u32>>();
    master.restarting = state.restarting;
    if let Some(workers) = state.before_reload {
        let mut before = master.config.clone();
        before.workers = WorkerSource::Spawn { command: workers.command, cwd: workers.cwd };
        before.env = workers.env;
        master.before_reload = Some(Box::new(before));
    }
    let (mut workers, mut queued) = (0, 0);
    for (index, slot_state) in state.slots.into_iter().enumerate() {
        let index = index as u32;
        queued += slot_state.queue.len();
        let slot = master.adopt_slot(index, slot_state)?;
        workers += slot.processes().count();
    }
    for index in 0..master.config.concurrency {
        master.after_adoption(index);
    }
    master.header_wait.restore_counters(state.header_counters);
    if let WorkerSource::Attach(options) = &master.config.workers {
        for (fd, uid) in state.dialing {
            let events = master.events.clone();
            master.handshakes.resume(own(fd), uid, options, move |claim| _ = events.send(Event::Attached(claim)));
        }
    }
    let header_waiting = state.header_waiting.len();
    for waiting in state.header_waiting {
        let arrived = ago(waiting.age_ms);
        let done = master.when_identified(arrived);
        master.header_wait.admit_inherited(TcpStream::from(own(waiting.fd)), waiting.peer, arrived, done);
    }
    // A rollback runs the build that wrote the state.
    let now = if rolled_back { &state.build } else { &state.for_build };
    info!(
        "upgraded in place: now build {now} (was {}), pid {}; {workers} workers, {queued} queued connections and \
         {header_waiting} waiting for a header taken over",
        state.build,
        std::process::id()
    );
    listening(&master.listening());
    master.serve(event_rx, stop).await
}

impl Master {
    /// Rebuilds slot `index` from its state: processes with their channels (read again), exits watched
    /// through pidfds, attach links watched, queued connections with their ages.
    fn adopt_slot(&mut self, index: u32, state: SlotState) -> Result<&WorkerSlot> {
        let events = self.events.clone();
        // A worker that never says ready is watched again from here (`worker.protocol: none`).
        let probe = || self.readiness_probe(index);
        let adopt = |process: ProcessState| -> Result<Process> {
            let mut process = adopt_process(index, process, &events)?;
            process.readiness = probe();
            Ok(process)
        };
        let life = match state.life {
            LifeState::Down { for_ms } => Life::Down { since: ago(for_ms) },
            LifeState::Starting(process) => Life::Starting(adopt(process)?),
            LifeState::Ready { process, successor } => {
                Life::Ready { process: adopt(process)?, successor: successor.map(adopt).transpose()? }
            }
        };
        let mut retiring = Vec::new();
        for old in state.retiring {
            let cause = if old.for_reload { Retirement::Reload } else { Retirement::Asked };
            retiring.push((adopt(old.process)?, cause));
        }
        let queue = state
            .queue
            .into_iter()
            .map(|connection| {
                let stream = TcpStream::from(own(connection.fd));
                let mut handoff = Handoff::new(stream, connection.peer, connection.local, ago(connection.age_ms));
                if connection.counted {
                    handoff.ticket = Some(self.waiting.ticket(connection.peer.ip().to_canonical()));
                }
                handoff
            })
            .collect();
        let slot = &mut self.slots[index as usize];
        slot.generation = state.generation;
        slot.crashes = state.crashes;
        slot.stuck_reported = state.stuck_reported;
        slot.queue = queue;
        slot.left_behind = state.left_behind.into_iter().map(own).collect();
        slot.life = life;
        for (process, cause) in retiring {
            slot.retire(process, cause);
        }
        Ok(slot)
    }

    /// What the previous image's timers would have done: revive a down index, bound a reload's
    /// successor and retiring workers; and write what waits.
    fn after_adoption(&mut self, index: u32) {
        let spawns = self.spawns();
        let Some(slot) = self.slots.get(index as usize) else { return };
        let down = slot.life.is_down();
        let reload_bound: Vec<u64> = match &slot.life {
            Life::Ready { successor: Some(successor), .. } => vec![successor.generation],
            _ => Vec::new(),
        }
        .into_iter()
        .chain(slot.retiring.iter().filter(|r| r.cause == Retirement::Reload).map(|r| r.process.generation))
        .collect();
        for generation in reload_bound {
            after(self.config.hard_shutdown_delay, &self.events, Event::ReloadDeadline { index, generation });
        }
        if down && spawns {
            self.schedule_revival(index);
        }
        self.flush(index);
    }
}

/// A process of the previous image, taken over: its channel read again, its exit (spawned) or its
/// attach link (attached) watched.
fn adopt_process(index: u32, state: ProcessState, events: &UnboundedSender<Event>) -> Result<Process> {
    let generation = state.generation;
    let channel = state.channel.map(|fd| WorkerChannel::open(own(fd), events, index, generation)).transpose()?;
    let mut process = Process::new(generation, state.pid, state.spawned, None, state.worker_end.map(own));
    process.channel = channel;
    process.started = ago(state.age_ms);
    process.farewell = Farewell {
        stopped: state.owed_stopped,
        shutdown: state.owed_shutdown.map(|(deadline_ms, terminate)| PendingShutdown { deadline_ms, terminate }),
    };
    process.shutdown_sent = state.shutdown_sent;
    if let Some(fd) = state.attach_link {
        let link = crate::closer::PeerFd::new(own(fd));
        let task = tokio::spawn(watch_attach_link(link, events.clone(), index, generation));
        process.attach_link = Some(AttachLink { task: task.abort_handle(), fd });
    }
    if state.spawned {
        tokio::spawn(watch_adopted_exit(state.pid, events.clone(), index, generation));
    }
    Ok(process)
}

/// Waits for the exit of a child the previous image started (this image has no handle on it but its
/// pid) through a pidfd, reaps it and tells the loop.
async fn watch_adopted_exit(pid: u32, events: UnboundedSender<Event>, index: u32, generation: u64) {
    let status = adopted_exit(pid).await;
    let _ = events.send(Event::Exited { index, generation, status });
}

async fn adopted_exit(pid: u32) -> io::Result<ExitStatus> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // Gone, and reaped already (by the previous image): its status is lost.
        return Err(io::Error::other(format!("it exited during the upgrade ({})", io::Error::last_os_error())));
    }
    // SAFETY: pidfd_open just returned this descriptor; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the AsyncFd owns the pidfd, so its fd stays open and unchanged while registered.
    let waiter = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
    loop {
        let mut guard = waiter.readable().await?;
        // SAFETY: siginfo_t is plain data, for which zeroes are valid; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let fd = guard.get_inner().as_fd().as_raw_fd();
        // SAFETY: a valid pidfd, a writable siginfo_t.
        let done = unsafe { libc::waitid(libc::P_PIDFD, fd as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG) };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a child that changed state; si_pid 0 means none did yet.
        if unsafe { info.si_pid() } == 0 {
            guard.clear_ready();
            continue;
        }
        // SAFETY: as above, for an exited child.
        let status = unsafe { info.si_status() };
        return Ok(match info.si_code {
            libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
            libc::CLD_DUMPED => ExitStatus::from_raw((status & 0x7f) | 0x80),
            _ => ExitStatus::from_raw(status & 0x7f),
        });
    }
}
