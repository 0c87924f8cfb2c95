//! Worker slots: the state of each index (its worker, channel and queue), writing connections to a
//! worker's channel, and taking back what a dead worker never received.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, warn};

use crate::error::{Error, Result};
use crate::protocol::{recv_message, send_message, Message, Received};
use crate::supervisor::signal_worker;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    /// Process started (or attach expected), not ready yet: connections queue.
    Starting,
    /// Takes connections.
    Ready,
    /// No live worker: waiting for revival (or for an attach).
    Down,
}

/// One worker index: its current process and channel, and connections waiting for it.
pub(super) struct WorkerSlot {
    pub(super) index: u32,
    pub(super) generation: u64,
    pub(super) state: SlotState,
    pub(super) pid: u32,
    /// A worker process runs (spawn mode) or a worker is attached (attach mode).
    pub(super) alive: bool,
    pub(super) started: Instant,
    pub(super) crashes: u32,
    /// Asked to stop for a reload: start its successor as soon as it exits.
    pub(super) retiring: bool,
    /// The master's end of the current worker's channel.
    pub(super) channel: Option<WorkerChannel>,
    /// A copy of the worker's own end of its channel (spawn mode). While the master holds it, the kernel
    /// keeps every message the worker has not received, so they can be taken back when it dies.
    pub(super) worker_end: Option<OwnedFd>,
    /// Connections for this index not yet in its channel: the worker is not ready, or its channel is full.
    /// Bounded by `queue.limit`, expired after `queue.maxWait`.
    pub(super) queue: VecDeque<Handoff>,
    /// The shutdown message, sent once the connections before it are in the channel.
    pub(super) pending_shutdown: Option<PendingShutdown>,
    /// "Not reading its channel" was logged for the current episode.
    pub(super) stuck_reported: bool,
    /// Attach mode: the task holding the worker's attach connection (aborting it closes the connection).
    pub(super) attach_link: Option<tokio::task::AbortHandle>,
}

/// A shutdown message waiting for room in a worker's channel.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingShutdown {
    pub(super) deadline_ms: u64,
    /// Send SIGTERM after it (spawned workers).
    pub(super) terminate: bool,
}

impl WorkerSlot {
    /// An index with no worker yet.
    pub(super) fn new(index: u32) -> WorkerSlot {
        WorkerSlot {
            index,
            generation: 0,
            state: SlotState::Down,
            pid: 0,
            alive: false,
            started: Instant::now(),
            crashes: 0,
            retiring: false,
            channel: None,
            worker_end: None,
            queue: VecDeque::new(),
            pending_shutdown: None,
            stuck_reported: false,
            attach_link: None,
        }
    }

    /// Forgets the channel of a worker that is gone or cut loose; its connections queue from now on.
    /// The copy of the worker's end stays until [`Master::take_back`] empties it.
    pub(super) fn disconnect(&mut self) {
        self.channel = None;
        if let Some(link) = self.attach_link.take() {
            link.abort();
        }
        self.pending_shutdown = None;
        self.state = SlotState::Down;
    }

    /// Closes the connections waiting for this index (shutdown) and returns how many there were.
    pub(super) fn close_queue(&mut self) -> u64 {
        let closed = self.queue.len() as u64;
        self.queue.clear();
        closed
    }
}

/// The master's side of one worker's channel. Connections are written straight from the event loop;
/// when the channel is full they stay in the slot's queue and a task waits for room.
pub(super) struct WorkerChannel {
    pub(super) socket: Arc<AsyncFd<OwnedFd>>,
    /// A task waits for room in the channel: nothing is written until it reports.
    pub(super) waiting_for_room: bool,
}

/// What one attempt to write the head of a slot's outbox did.
enum Sent {
    Connection,
    Shutdown(PendingShutdown),
}

impl Master {
    /// The slot of worker `index` if `generation` is still its current worker (events about an
    /// earlier worker of the index are stale).
    pub(super) fn slot_of(&mut self, index: u32, generation: u64) -> Option<&mut WorkerSlot> {
        self.slots.get_mut(index as usize).filter(|slot| slot.generation == generation)
    }

    /// Gives slot `index` a new generation with a live worker on `channel`, and starts its reader task.
    pub(super) fn connect_slot(
        &mut self,
        index: u32,
        pid: u32,
        channel: OwnedFd,
        worker_end: Option<OwnedFd>,
    ) -> Result<u64> {
        // SAFETY: the AsyncFd owns the channel fd, so it stays open and unchanged while registered.
        let channel = unsafe { AsyncFd::register(channel) }
            .map_err(|e| Error::io(format!("register worker {index}'s channel"), e))?;
        let channel = Arc::new(channel);
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Err(Error::io(
                format!("connect worker {index}"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        };
        slot.generation += 1;
        slot.state = SlotState::Starting;
        slot.pid = pid;
        slot.alive = true;
        slot.started = Instant::now();
        slot.worker_end = worker_end;
        slot.pending_shutdown = None;
        let generation = slot.generation;
        slot.channel = Some(WorkerChannel { socket: channel.clone(), waiting_for_room: false });
        tokio::spawn(read_channel(channel, self.events.clone(), index, generation));
        Ok(generation)
    }

    pub(super) fn on_message(&mut self, index: u32, generation: u64, message: Message) {
        let Some(slot) = self.slot_of(index, generation) else { return };
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
                    self.flush(index);
                    if self.restarting == Some(index) {
                        self.restarting = None;
                        self.restart_next();
                    }
                }
            }
            other => warn!("worker {index} sent a master-only message {other:?}; ignored"),
        }
    }

    /// Writes what waits for worker `index` into its channel, in order: its queued connections (once it
    /// is ready), then a pending shutdown. Stops when the channel is full (a task then waits for room)
    /// and ends the worker when the channel refuses a write.
    pub(super) fn flush(&mut self, index: u32) {
        let Master { slots, stats, events, .. } = self;
        let Some(slot) = slots.get_mut(index as usize) else { return };
        let Some(channel) = slot.channel.as_mut() else { return };
        if channel.waiting_for_room {
            return;
        }
        loop {
            let socket = channel.socket.get_ref().as_fd();
            let attempt = match (slot.state, slot.queue.front(), slot.pending_shutdown) {
                (SlotState::Ready, Some(handoff), _) => {
                    let message = Message::Connection { peer: handoff.peer, local: handoff.local };
                    send_message(socket, &message, Some(handoff.stream.as_fd()), true).map(|()| Sent::Connection)
                }
                (_, _, Some(shutdown)) => {
                    let message = Message::Shutdown { deadline_ms: shutdown.deadline_ms };
                    send_message(socket, &message, None, true).map(|()| Sent::Shutdown(shutdown))
                }
                _ => break,
            };
            match attempt {
                Ok(Sent::Connection) => {
                    slot.queue.pop_front();
                    stats.routed[index as usize] += 1;
                }
                Ok(Sent::Shutdown(shutdown)) => {
                    slot.pending_shutdown = None;
                    // SIGTERM follows the message, so a worker that drains its channel on SIGTERM finds
                    // every connection sent to it, then the shutdown.
                    if shutdown.terminate {
                        signal_worker(slot.pid, Signal::SIGTERM);
                    }
                }
                Err(Errno::EAGAIN) => {
                    debug!("worker {index}'s channel is full: {} connections wait for room", slot.queue.len());
                    channel.waiting_for_room = true;
                    let waiter = wait_for_room(channel.socket.clone(), events.clone(), index, slot.generation);
                    tokio::spawn(waiter);
                    return;
                }
                // The master's own resources (fds in flight are charged to its user and limited by its
                // RLIMIT_NOFILE, memory): not the worker's fault. What waits stays queued; the next tick
                // tries again.
                Err(errno @ (Errno::ETOOMANYREFS | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    debug!("worker {index}'s channel cannot take more now ({errno}); retrying");
                    return;
                }
                Err(errno) => {
                    if slot.pending_shutdown.is_some_and(|shutdown| shutdown.terminate) {
                        signal_worker(slot.pid, Signal::SIGTERM);
                    }
                    let generation = slot.generation;
                    return self.channel_ended(
                        index,
                        generation,
                        Some(format!("its channel refused a write ({errno})")),
                    );
                }
            }
        }
        if slot.queue.is_empty() {
            slot.stuck_reported = false;
        }
    }

    /// The channel of worker `index` has room again: write what waits.
    pub(super) fn on_room(&mut self, index: u32, generation: u64) {
        let Some(slot) = self.slot_of(index, generation) else { return };
        if let Some(channel) = slot.channel.as_mut() {
            channel.waiting_for_room = false;
            self.flush(index);
        }
    }

    /// Logs once per episode that a ready worker does not read its channel.
    pub(super) fn report_stuck(&mut self, index: u32, what: &str) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        if slot.state == SlotState::Ready && !slot.stuck_reported {
            slot.stuck_reported = true;
            warn!(
                "worker {index} (pid {}) is not reading its channel ({} connections wait): {what}",
                slot.pid,
                slot.queue.len()
            );
        }
    }

    /// The channel of a live worker ended (an empty datagram, a protocol error, a refused write): a
    /// spawned worker is ended so its exit takes back its connections and revives the index; an
    /// attached one is released so the index can be attached again.
    pub(super) fn channel_ended(&mut self, index: u32, generation: u64, reason: Option<String>) {
        let spawned = self.spawns();
        let shutting_down = self.shutdown_deadline.is_some();
        let Some(slot) = self.slot_of(index, generation) else { return };
        if !slot.alive || slot.channel.is_none() {
            return;
        }
        slot.disconnect();
        let pid = slot.pid;
        if spawned {
            let reason = reason.unwrap_or_else(|| "closed its channel (an empty datagram)".into());
            if shutting_down {
                debug!("worker {index} (pid {pid}) {reason}");
            } else {
                error!("worker {index} (pid {pid}) {reason}; ending it, its index is revived");
            }
            signal_worker(pid, Signal::SIGKILL);
        } else {
            let broke = reason.is_some();
            let why = match reason {
                Some(reason) => format!("{reason}; released its index"),
                None => "closed its channel; released its index".into(),
            };
            self.release_attached(index, &why, broke);
        }
    }

    /// An attached worker is gone or cut loose (it is supervised elsewhere): its index waits for the next
    /// attach with what it never received, or, during shutdown, those connections are closed and counted.
    /// A worker that `broke` the protocol is logged as an error.
    pub(super) fn release_attached(&mut self, index: u32, why: &str, broke: bool) {
        let shutting_down = self.shutdown_deadline.is_some();
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        slot.alive = false;
        slot.disconnect();
        let pid = slot.pid;
        let taken_back = self.take_back(index);
        if shutting_down {
            debug!("worker {index} (pid {pid}) {why}");
            self.stats.closed += self.slots[index as usize].close_queue();
        } else if broke {
            error!("worker {index} (pid {pid}) {why} ({taken_back} it never received taken back)");
        } else {
            warn!("worker {index} (pid {pid}) {why} ({taken_back} it never received taken back)");
        }
    }

    /// After worker `index` died: takes back every connection still in its channel (sent, never
    /// received) and puts them, in order, at the head of the index's queue for its next worker.
    pub(super) fn take_back(&mut self, index: u32) -> u64 {
        let Some(slot) = self.slots.get_mut(index as usize) else { return 0 };
        let Some(worker_end) = slot.worker_end.take() else { return 0 };
        let taken = unreceived_connections(worker_end.as_fd(), index);
        let count = taken.len() as u64;
        for handoff in taken.into_iter().rev() {
            slot.queue.push_front(handoff);
        }
        let routed = &mut self.stats.routed[index as usize];
        *routed = routed.saturating_sub(count);
        self.stats.recovered += count;
        count
    }
}

/// Receives, from a dead worker's end of its channel, every connection it never took.
fn unreceived_connections(worker_end: BorrowedFd<'_>, index: u32) -> Vec<Handoff> {
    let mut taken = Vec::new();
    loop {
        match recv_message(worker_end, true) {
            Ok(Received { message: Message::Connection { peer, local }, fd: Some(fd) }) => {
                taken.push(Handoff { stream: std::net::TcpStream::from(fd), peer, local, arrived: Instant::now() });
            }
            // The shutdown message it never read.
            Ok(_) => {}
            // A datagram that cannot be ours; it is consumed, so the next one can be read.
            Err(Error::Protocol(reason)) => warn!("worker {index}'s channel held a bad message: {reason}"),
            Err(_) => break,
        }
    }
    taken
}

/// Waits until a full channel has room (or has failed, which the next write reports), then tells the loop.
async fn wait_for_room(socket: Arc<AsyncFd<OwnedFd>>, events: UnboundedSender<Event>, index: u32, generation: u64) {
    loop {
        let Ok(mut guard) = socket.writable().await else { break };
        let mut poll = libc::pollfd { fd: guard.get_inner().as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, no timeout.
        if unsafe { libc::poll(&mut poll, 1, 0) } != 0 {
            break;
        }
        guard.clear_ready();
    }
    let _ = events.send(Event::Room { index, generation });
}

/// Reads hello/ready from a worker until its channel ends.
pub(super) async fn read_channel(
    channel: Arc<AsyncFd<OwnedFd>>,
    events: UnboundedSender<Event>,
    index: u32,
    generation: u64,
) {
    loop {
        let mut guard = match channel.readable().await {
            Ok(guard) => guard,
            Err(error) => {
                let reason = Some(format!("its channel failed: {error}"));
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
                let reason = Some(format!("broke the channel protocol: {error}"));
                let _ = events.send(Event::ChannelClosed { index, generation, reason });
                return;
            }
        }
    }
}
