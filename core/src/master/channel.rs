//! The master's side of each worker's channel: writing connections and farewells (stopped, shutdown) in
//! order, waiting for room when it is full, reading hello/ready/stopping, and taking back what a worker
//! that is gone never received.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::handoff::Handoff;
use super::slot::{Life, Process, Role, WorkerSlot};
use super::{Event, Master};
use crate::closer::PeerFd;
use crate::error::{Error, Result};
use crate::protocol::{is_fd_limit, recv_message, send_message, Message, Received};
use crate::supervisor::signal_worker;

/// The master's end of one worker's channel. Connections are written straight from the event loop;
/// when the channel is full they stay in the slot's queue and a task waits for room.
pub(super) struct WorkerChannel {
    /// A `PeerFd`: the datagrams a worker sent and the master never read may carry fds.
    socket: Arc<AsyncFd<PeerFd>>,
    /// A task waits for room in the channel: nothing is written until it reports.
    waiting_for_room: bool,
    /// The tasks reading from and waiting for room on this channel end with it: a peer that keeps its end
    /// open (an attached worker that hung up only its attach connection) would keep them, and the
    /// socket, forever.
    reader: AbortHandle,
    room_waiter: Option<AbortHandle>,
}

impl Drop for WorkerChannel {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(waiter) = &self.room_waiter {
            waiter.abort();
        }
    }
}

impl WorkerChannel {
    /// Registers the master's end of a channel and starts the task that reads what the worker sends.
    pub(super) fn open(
        channel: OwnedFd,
        events: &UnboundedSender<Event>,
        index: u32,
        generation: u64,
    ) -> Result<WorkerChannel> {
        // SAFETY: the AsyncFd owns the channel fd, so it stays open and unchanged while registered.
        let socket = unsafe { AsyncFd::register(PeerFd::new(channel)) }
            .map_err(|e| Error::io(format!("register worker {index}'s channel"), e))?;
        let socket = Arc::new(socket);
        let reader = tokio::spawn(read_channel(socket.clone(), events.clone(), index, generation)).abort_handle();
        Ok(WorkerChannel { socket, waiting_for_room: false, reader, room_waiter: None })
    }

    /// The master's end, for an upgrade to hand to the next image.
    pub(super) fn fd(&self) -> RawFd {
        self.socket.get_ref().as_raw_fd()
    }
}

/// How far one round of writes to a process got.
enum Written {
    /// Nothing more waits for it (or it is not ready for connections).
    All,
    /// Its channel is full: a task now waits for room.
    Full,
    /// The master's own resources ran short (fds in flight, memory): the next tick tries again.
    Later,
    /// The channel refused a write: the worker is broken or gone.
    Refused(Errno),
}

/// Writes to one process: the queued connections when `queue` is given (it is the ready current worker),
/// then what the master owes it. Counts what it hands over in `routed`.
fn write_pending(process: &mut Process, mut queue: Option<&mut VecDeque<Handoff>>, routed: &mut u64) -> Written {
    let Some(channel) = process.channel.as_mut() else { return Written::All };
    if channel.waiting_for_room {
        return Written::Full;
    }
    loop {
        let socket = channel.socket.get_ref().as_fd();
        let next = queue.as_deref_mut().and_then(|queue| queue.front());
        let result = if let Some(handoff) = next {
            let message = Message::Connection { peer: handoff.peer, local: handoff.local };
            send_message(socket, &message, Some(handoff.stream.as_fd()), true)
        } else if process.farewell.stopped {
            send_message(socket, &Message::Stopped, None, true)
        } else if let Some(shutdown) = process.farewell.shutdown {
            send_message(socket, &Message::Shutdown { deadline_ms: shutdown.deadline_ms }, None, true)
        } else {
            return Written::All;
        };
        match result {
            Ok(()) if next.is_some() => {
                queue.as_deref_mut().map(VecDeque::pop_front);
                *routed += 1;
            }
            Ok(()) if process.farewell.stopped => process.farewell.stopped = false,
            Ok(()) => {
                let shutdown = process.farewell.shutdown.take();
                // SIGTERM follows the message, so a worker that drains its channel on SIGTERM finds
                // every connection sent to it, then the shutdown.
                if shutdown.is_some_and(|shutdown| shutdown.terminate) {
                    signal_worker(process.pid, Signal::SIGTERM);
                }
            }
            Err(Errno::EAGAIN) => {
                channel.waiting_for_room = true;
                return Written::Full;
            }
            // Fds in flight are charged to the master's user and limited by its RLIMIT_NOFILE; memory:
            // not the worker's fault. What waits stays queued.
            Err(Errno::ETOOMANYREFS | Errno::ENOBUFS | Errno::ENOMEM) => return Written::Later,
            Err(errno) => return Written::Refused(errno),
        }
    }
}

impl Master {
    /// Writes what waits for worker `index`: its queued connections, in order, once its current worker
    /// is ready, and what the master owes each of its processes (stopped, shutdown). Stops at a full
    /// channel (a task then waits for room) and ends a worker whose channel refuses a write.
    pub(super) fn flush(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        if let Some(current) = slot.life.process().map(|process| process.generation) {
            self.flush_process(index, current);
        }
        // A reload's successor and retiring workers get no connections, only what the master owes them.
        let Some(slot) = self.slots.get(index as usize) else { return };
        let owed = |process: &Process| process.farewell.stopped || process.farewell.shutdown.is_some();
        let others: Vec<u64> = match &slot.life {
            Life::Ready { successor: Some(successor), .. } => Some(successor),
            _ => None,
        }
        .into_iter()
        .chain(slot.retiring.iter().map(|retiring| &retiring.process))
        .filter(|process| owed(process))
        .map(|process| process.generation)
        .collect();
        for generation in others {
            self.flush_process(index, generation);
        }
    }

    /// [`Master::flush`] for one process of the index.
    pub(super) fn flush_process(&mut self, index: u32, generation: u64) {
        let Master { slots, stats, events, .. } = self;
        let Some(slot) = slots.get_mut(index as usize) else { return };
        let Some(role) = slot.role_of(generation) else { return };
        let WorkerSlot { queue, life, retiring, stuck_reported, .. } = slot;
        let (process, writes_queue) = match (role, life) {
            (Role::Current, Life::Ready { process, .. }) => (process, true),
            (Role::Current, Life::Starting(process)) => (process, false),
            (Role::Successor, Life::Ready { successor: Some(successor), .. }) => (successor, false),
            (Role::Retiring(position), _) => match retiring.get_mut(position) {
                Some(retiring) => (&mut retiring.process, false),
                None => return,
            },
            _ => return,
        };
        let written = write_pending(process, writes_queue.then_some(&mut *queue), &mut stats.routed[index as usize]);
        match written {
            Written::All => {
                if writes_queue {
                    *stuck_reported = false;
                }
            }
            Written::Full => {
                let Some(channel) = process.channel.as_mut() else { return };
                debug!("worker {index}'s channel is full: {} connections wait for room", queue.len());
                let waiter = tokio::spawn(wait_for_room(channel.socket.clone(), events.clone(), index, generation));
                channel.room_waiter = Some(waiter.abort_handle());
            }
            Written::Later => debug!("worker {index}'s channel cannot take more now; retrying"),
            Written::Refused(errno) => {
                if process.farewell.shutdown.is_some_and(|shutdown| shutdown.terminate) {
                    signal_worker(process.pid, Signal::SIGTERM);
                }
                self.channel_ended(index, generation, Some(format!("its channel refused a write ({errno})")));
            }
        }
    }

    /// A full channel has room again: write what waits.
    pub(super) fn on_room(&mut self, index: u32, generation: u64) {
        let Some(process) = self.process_of(index, generation) else { return };
        if let Some(channel) = process.channel.as_mut() {
            channel.waiting_for_room = false;
            self.flush_process(index, generation);
        }
    }

    /// Logs once per episode that a ready worker does not read its channel.
    pub(super) fn report_stuck(&mut self, index: u32, what: &str) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Life::Ready { process, .. } = &slot.life else { return };
        if !slot.stuck_reported {
            slot.stuck_reported = true;
            warn!(
                "worker {index} (pid {}) is not reading its channel ({} connections wait): {what}",
                process.pid,
                slot.queue.len()
            );
        }
    }

    /// After a process of worker `index` is gone: takes back every connection still in its channel (sent,
    /// never received) and puts them, in order, at the head of the index's queue for its next worker.
    /// At the master's open-file limit the rest stay in the channel, kept for [`Master::take_back_left`].
    pub(super) fn take_back(&mut self, index: u32, process: &mut Process) -> u64 {
        let Some(worker_end) = process.worker_end.take() else { return 0 };
        self.take_back_from(index, worker_end)
    }

    /// Every tick: takes back more of what dead workers left in their channels while the master was at
    /// its open-file limit.
    pub(super) fn take_back_left(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        for worker_end in std::mem::take(&mut slot.left_behind) {
            self.take_back_from(index, worker_end);
        }
    }

    fn take_back_from(&mut self, index: u32, worker_end: OwnedFd) -> u64 {
        let Some(slot) = self.slots.get_mut(index as usize) else { return 0 };
        let (taken, complete) = unreceived_connections(worker_end.as_fd(), index);
        let count = taken.len() as u64;
        for handoff in taken.into_iter().rev() {
            slot.queue.push_front(handoff);
        }
        if !complete {
            if slot.left_behind.is_empty() {
                warn!(
                    "worker {index}'s channel still holds connections it never received, and the master is at its \
                     open-file limit: they stay there and are taken back as fds free up"
                );
            }
            slot.left_behind.push(worker_end);
        }
        let routed = &mut self.stats.routed[index as usize];
        *routed = routed.saturating_sub(count);
        self.stats.recovered += count;
        count
    }
}

/// Receives, from the end of a channel whose worker is gone, every connection it never took; false when
/// the master's open-file limit left some of them in the channel.
fn unreceived_connections(worker_end: BorrowedFd<'_>, index: u32) -> (Vec<Handoff>, bool) {
    let mut taken = Vec::new();
    loop {
        match recv_message(worker_end, true) {
            Ok(Received { message: Message::Connection { peer, local }, fd: Some(fd) }) => {
                taken.push(Handoff::new(std::net::TcpStream::from(fd), peer, local, Instant::now()));
            }
            // A stopped or shutdown message it never read.
            Ok(_) => {}
            Err(error) if is_fd_limit(&error) => return (taken, false),
            // A datagram that cannot be ours; it is consumed, so the next one can be read.
            Err(Error::Protocol(reason)) => warn!("worker {index}'s channel held a bad message: {reason}"),
            Err(_) => return (taken, true),
        }
    }
}

/// Waits until a full channel has room (or has failed, which the next write reports), then tells the loop.
async fn wait_for_room(socket: Arc<AsyncFd<PeerFd>>, events: UnboundedSender<Event>, index: u32, generation: u64) {
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

/// Reads hello/ready/stopping from a worker until its channel ends.
async fn read_channel(channel: Arc<AsyncFd<PeerFd>>, events: UnboundedSender<Event>, index: u32, generation: u64) {
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
                // A worker sends no fds; one that does (a master-only message) must not block us.
                crate::closer::discard_all(received.fd);
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
