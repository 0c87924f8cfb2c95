//! Worker slots: the state of each index (its worker, channel and queue), and the tasks that read
//! and write a worker's channel.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::protocol::{recv_message, send_message, Message};
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
    /// The current worker's channel, and what its writer task still has to write.
    pub(super) channel: Option<WorkerChannel>,
    pub(super) queue: VecDeque<Handoff>,
}

impl WorkerSlot {
    /// Forgets the channel of a worker that is gone or cut loose; its connections queue from now on.
    pub(super) fn disconnect(&mut self) {
        self.channel = None;
        self.state = SlotState::Down;
    }

    /// Closes the connections waiting for this index (shutdown) and returns how many there were.
    pub(super) fn close_queue(&mut self) -> u64 {
        let closed = self.queue.len() as u64;
        self.queue.clear();
        closed
    }
}

/// The master's side of one worker's channel. Connections are written straight from the event loop
/// while the writer task is idle; the task takes over when the channel is full, and keeps the order.
pub(super) struct WorkerChannel {
    pub(super) socket: Arc<AsyncFd<OwnedFd>>,
    pub(super) writer: UnboundedSender<Outgoing>,
    /// Items given to the writer task and not yet written.
    pub(super) backlog: Arc<AtomicUsize>,
}

impl WorkerChannel {
    /// Hands an item to the writer task (behind anything it already holds).
    pub(super) fn enqueue(&self, item: Outgoing) -> std::result::Result<(), Outgoing> {
        self.backlog.fetch_add(1, Ordering::SeqCst);
        self.writer.send(item).map_err(|failed| {
            self.backlog.fetch_sub(1, Ordering::SeqCst);
            failed.0
        })
    }
}

impl Master {
    /// Gives slot `index` a new generation with a live worker on `channel`, and starts its channel tasks.
    pub(super) fn connect_slot(&mut self, index: u32, pid: u32, channel: OwnedFd) -> Result<u64> {
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

    pub(super) fn on_message(&mut self, index: u32, generation: u64, message: Message) {
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
pub(super) async fn write_channel(
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
