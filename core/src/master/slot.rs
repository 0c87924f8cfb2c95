//! One worker index: the connections waiting for it and the life of its worker, as types. A worker's
//! process (spawned or attached) exists here exactly as long as the master must account for it.

use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Instant;

use tokio::task::AbortHandle;

use super::channel::WorkerChannel;
use super::handoff::Handoff;
use crate::activation::readiness::ReadinessProbe;

/// One worker index: its queue, the life of its current worker, and earlier workers still on their way out.
pub(super) struct WorkerSlot {
    pub(super) index: u32,
    /// The generation given to this index's latest process; events name the generation they are about.
    pub(super) generation: u64,
    /// Connections for this index not yet in a channel: its worker is not ready, or its channel is full.
    /// Bounded by `queue.limit`, expired after `queue.maxWait`.
    pub(super) queue: VecDeque<Handoff>,
    /// "Not reading its channel" was logged for the current episode.
    pub(super) stuck_reported: bool,
    /// Consecutive short-lived runs, for the revival back-off.
    pub(super) crashes: u32,
    pub(super) life: Life,
    /// Earlier workers of this index on their way out (replaced by a reload, or they asked to stop): they
    /// get no new connections and are awaited, so that what they never received comes back to `queue`.
    pub(super) retiring: Vec<Retiring>,
    /// Copies of dead workers' channel ends still holding connections they never received: the master
    /// was at its open-file limit when it took back the rest. Emptied a little more every tick.
    pub(super) left_behind: Vec<OwnedFd>,
}

/// A worker of an index that gets no new connections and is expected to exit.
pub(super) struct Retiring {
    pub(super) process: Process,
    pub(super) cause: Retirement,
}

/// Why a worker retires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retirement {
    /// A reload's successor took its place.
    Reload,
    /// It said `stopping` (it was told to stop by someone else than the master, say).
    Asked,
}

/// The life of an index's current worker.
pub(super) enum Life {
    /// No worker: waiting for its revival or an attach (or for nothing, during shutdown).
    Down {
        /// When the last worker left (or the master started).
        since: Instant,
    },
    /// Started or attached, not ready yet: its connections queue.
    Starting(Process),
    /// Takes connections. During a reload its successor starts beside it and replaces it once ready.
    Ready { process: Process, successor: Option<Process> },
}

/// One worker process (or attached worker) and the master's means of reaching it.
pub(super) struct Process {
    pub(super) generation: u64,
    /// As the worker reported it (in its own pid namespace when attached); 0 when unknown.
    pub(super) pid: u32,
    /// Spawned by this master: signals reach it (its process group); attached workers belong to
    /// another supervisor.
    pub(super) spawned: bool,
    pub(super) started: Instant,
    /// The master's end of its channel; `None` once the channel ended or was cut (it may still run).
    pub(super) channel: Option<WorkerChannel>,
    /// A copy of the worker's own end of its channel. While the master holds it, the kernel keeps every
    /// message the worker has not received, so they can be taken back when it is gone.
    pub(super) worker_end: Option<OwnedFd>,
    /// Attach mode: the task holding the worker's attach connection.
    pub(super) attach_link: Option<AttachLink>,
    /// What the master still has to write after the connections already sent.
    pub(super) farewell: Farewell,
    /// It was asked to shut down (message or SIGTERM): never twice.
    pub(super) shutdown_sent: bool,
    /// `worker.protocol: none`: it never says ready, so its listener is watched for signs that it accepts.
    pub(super) readiness: Option<ReadinessProbe>,
}

/// The task that holds an attached worker's attach connection until it ends; aborting the task closes it.
pub(super) struct AttachLink {
    pub(super) task: AbortHandle,
    /// The connection's fd, owned by the task (an upgrade hands it to the next image).
    pub(super) fd: RawFd,
}

/// Messages owed to a worker once what comes before them is in its channel.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Farewell {
    /// It asked to stop getting connections: `stopped` tells it the last one has been sent.
    pub(super) stopped: bool,
    /// The shutdown message (then SIGTERM, for spawned workers).
    pub(super) shutdown: Option<PendingShutdown>,
}

/// A shutdown message waiting for room in a worker's channel.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingShutdown {
    pub(super) deadline_ms: u64,
    /// Send SIGTERM after it (spawned workers).
    pub(super) terminate: bool,
}

impl Process {
    /// A process that just started (or attached) with its channel.
    pub(super) fn new(
        generation: u64,
        pid: u32,
        spawned: bool,
        channel: Option<WorkerChannel>,
        worker_end: Option<OwnedFd>,
    ) -> Process {
        Process {
            generation,
            pid,
            spawned,
            started: Instant::now(),
            channel,
            worker_end,
            attach_link: None,
            farewell: Farewell::default(),
            shutdown_sent: false,
            readiness: None,
        }
    }

    /// Forgets the channel of a worker that is gone or cut loose. The copy of its end stays until
    /// [`super::Master::take_back`] empties it.
    pub(super) fn disconnect(&mut self) {
        self.channel = None;
        if let Some(link) = self.attach_link.take() {
            link.task.abort();
        }
        self.farewell = Farewell::default();
    }
}

impl Life {
    /// The index's current process, if any.
    pub(super) fn process(&self) -> Option<&Process> {
        match self {
            Life::Down { .. } => None,
            Life::Starting(process) | Life::Ready { process, .. } => Some(process),
        }
    }

    /// The index's current process, if any, to change.
    pub(super) fn process_mut(&mut self) -> Option<&mut Process> {
        match self {
            Life::Down { .. } => None,
            Life::Starting(process) | Life::Ready { process, .. } => Some(process),
        }
    }

    /// Takes connections now.
    pub(super) fn is_ready(&self) -> bool {
        matches!(self, Life::Ready { .. })
    }

    /// No current worker.
    pub(super) fn is_down(&self) -> bool {
        matches!(self, Life::Down { .. })
    }

    /// Starting → Ready; false when it was not starting.
    pub(super) fn become_ready(&mut self) -> bool {
        if !matches!(self, Life::Starting(_)) {
            return false;
        }
        if let Life::Starting(process) = std::mem::replace(self, Life::Down { since: Instant::now() }) {
            *self = Life::Ready { process, successor: None };
        }
        true
    }

    /// A reload's successor became ready: it is now the index's worker, and the one it replaces comes back.
    pub(super) fn hand_over(&mut self) -> Option<Process> {
        if !matches!(self, Life::Ready { successor: Some(_), .. }) {
            return None;
        }
        match std::mem::replace(self, Life::Down { since: Instant::now() }) {
            Life::Ready { process, successor: Some(successor) } => {
                *self = Life::Ready { process: successor, successor: None };
                Some(process)
            }
            other => {
                *self = other;
                None
            }
        }
    }

    /// Leaves the index without a worker, giving back what it had (the current process and a successor).
    pub(super) fn end(&mut self) -> Vec<Process> {
        match std::mem::replace(self, Life::Down { since: Instant::now() }) {
            Life::Down { .. } => Vec::new(),
            Life::Starting(process) => vec![process],
            Life::Ready { process, successor } => std::iter::once(process).chain(successor).collect(),
        }
    }
}

/// Where a process of an index stands, found by its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The current worker (starting or ready).
    Current,
    /// A reload's successor, starting beside the ready current worker.
    Successor,
    /// On its way out: `retiring[i]`.
    Retiring(usize),
}

impl WorkerSlot {
    /// An index with no worker yet.
    pub(super) fn new(index: u32) -> WorkerSlot {
        WorkerSlot {
            index,
            generation: 0,
            queue: VecDeque::new(),
            stuck_reported: false,
            crashes: 0,
            life: Life::Down { since: Instant::now() },
            retiring: Vec::new(),
            left_behind: Vec::new(),
        }
    }

    /// Where the process of `generation` stands in this slot, if it is still here.
    pub(super) fn role_of(&self, generation: u64) -> Option<Role> {
        match &self.life {
            Life::Starting(process) | Life::Ready { process, .. } if process.generation == generation => {
                return Some(Role::Current)
            }
            Life::Ready { successor: Some(successor), .. } if successor.generation == generation => {
                return Some(Role::Successor)
            }
            _ => {}
        }
        self.retiring.iter().position(|retiring| retiring.process.generation == generation).map(Role::Retiring)
    }

    /// The process of `generation`, if it is still here.
    pub(super) fn process_mut(&mut self, generation: u64) -> Option<&mut Process> {
        match self.role_of(generation)? {
            Role::Current => self.life.process_mut(),
            Role::Successor => match &mut self.life {
                Life::Ready { successor, .. } => successor.as_mut(),
                _ => None,
            },
            Role::Retiring(position) => self.retiring.get_mut(position).map(|retiring| &mut retiring.process),
        }
    }

    /// Removes the process of `generation` from the slot (it is gone); a current one leaves the index Down.
    pub(super) fn remove(&mut self, generation: u64) -> Option<(Role, Process)> {
        let role = self.role_of(generation)?;
        let process = match role {
            Role::Current => {
                let mut ended = self.life.end().into_iter();
                let process = ended.next();
                // A successor starting beside a worker that is gone becomes the index's current worker.
                if let Some(successor) = ended.next() {
                    self.life = Life::Starting(successor);
                }
                process
            }
            Role::Successor => match &mut self.life {
                Life::Ready { successor, .. } => successor.take(),
                _ => None,
            },
            Role::Retiring(position) => Some(self.retiring.remove(position).process),
        }?;
        Some((role, process))
    }

    /// Every process of this index that still runs (or is attached).
    pub(super) fn processes(&self) -> impl Iterator<Item = &Process> {
        let successor = match &self.life {
            Life::Ready { successor, .. } => successor.as_ref(),
            _ => None,
        };
        self.life.process().into_iter().chain(successor).chain(self.retiring.iter().map(|retiring| &retiring.process))
    }

    /// Every process of this index that still runs (or is attached), to change.
    pub(super) fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        let (current, successor) = match &mut self.life {
            Life::Down { .. } => (None, None),
            Life::Starting(process) => (Some(process), None),
            Life::Ready { process, successor } => (Some(process), successor.as_mut()),
        };
        current.into_iter().chain(successor).chain(self.retiring.iter_mut().map(|retiring| &mut retiring.process))
    }

    /// Moves a process out of the index's way: it gets no new connections and is awaited.
    pub(super) fn retire(&mut self, process: Process, cause: Retirement) {
        self.retiring.push(Retiring { process, cause });
    }

    /// No process of this index runs any more.
    pub(super) fn is_empty(&self) -> bool {
        self.processes().next().is_none()
    }

    /// Closes the connections waiting for this index (shutdown) and returns how many there were.
    pub(super) fn close_queue(&mut self) -> u64 {
        let closed = self.queue.len() as u64;
        self.queue.clear();
        closed
    }
}
