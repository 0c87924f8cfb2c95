//! Userspace routing: route each accepted connection to its worker index, then deliver it,
//! queue it for a worker that is not ready, redirect it, or expire it after queue.maxWait.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::slot::WorkerSlot;
use super::Master;
use crate::hash::{node_peer_text, peer_index};

/// A client connection on its way to a worker.
#[derive(Debug)]
pub(super) struct Handoff {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) arrived: Instant,
    /// Its place among its address's waiting connections (`queue.perSource`), from routing until it
    /// leaves the master; none for connections taken back from a dead worker (they were let in before).
    pub(super) ticket: Option<SourceTicket>,
}

impl Handoff {
    /// A connection that just arrived (or came back) and is not counted against its address yet.
    pub(super) fn new(stream: TcpStream, peer: SocketAddr, local: SocketAddr, arrived: Instant) -> Handoff {
        Handoff { stream, peer, local, arrived, ticket: None }
    }
}

type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// How many connections of each client address wait in the master (in any worker's queue): each holds
/// a [`SourceTicket`], so the count follows them wherever they go, redirected, sent or closed.
#[derive(Debug, Default)]
pub(super) struct WaitingBySource {
    counts: Counts,
    /// Connections closed because their address had `queue.perSource` waiting.
    pub(super) closed: u64,
}

/// One waiting connection of an address; dropping it (the connection was sent or closed) gives it back.
#[derive(Debug)]
pub(super) struct SourceTicket {
    counts: Counts,
    address: IpAddr,
}

fn locked(counts: &Counts) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WaitingBySource {
    /// Connections of `address` waiting now.
    fn count(&self, address: IpAddr) -> usize {
        locked(&self.counts).get(&address).copied().unwrap_or(0)
    }

    /// Counts one more waiting connection of `address`.
    pub(super) fn ticket(&self, address: IpAddr) -> SourceTicket {
        *locked(&self.counts).entry(address).or_insert(0) += 1;
        SourceTicket { counts: self.counts.clone(), address }
    }

    /// The most connections one address has waiting now.
    fn busiest(&self) -> usize {
        locked(&self.counts).values().copied().max().unwrap_or(0)
    }
}

impl Drop for SourceTicket {
    fn drop(&mut self) {
        let mut counts = locked(&self.counts);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Connections closed unserved, logged once per episode: the first one says why, the end (a second
/// without another) says how many.
#[derive(Debug, Default)]
pub(super) struct ClosingEpisode {
    /// When it began, when the last connection was closed, and how many for each reason.
    current: Option<(Instant, Instant, u64, u64)>,
}

/// Why the master closes a connection unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unserved {
    /// Its address has `queue.perSource` connections waiting.
    PerSource,
    /// Its worker cannot take it and no other ready worker has room (or the master is shutting down).
    NoWorker,
}

impl Master {
    /// Routes a connection to its worker, unless its address already has `queue.perSource` waiting.
    pub(super) fn route(&mut self, mut handoff: Handoff) {
        let index = peer_index(handoff.peer, self.config.concurrency);
        debug!("connection {} -> worker {index}", node_peer_text(handoff.peer));
        let address = handoff.peer.ip().to_canonical();
        if self.waiting.count(address) >= self.config.queue_per_source {
            self.waiting.closed += 1;
            let why = format!("its address has {} connections waiting (queue.perSource)", self.config.queue_per_source);
            return self.close_unserved(index, handoff, Unserved::PerSource, &why);
        }
        handoff.ticket = Some(self.waiting.ticket(address));
        self.deliver(index, handoff);
    }

    /// Queues the connection for its worker (bounded by `queue.limit`) and writes what the worker can
    /// take now; past the bound it goes to the next ready worker.
    pub(super) fn deliver(&mut self, index: u32, handoff: Handoff) {
        let limit = self.config.queue_limit;
        let running = self.running();
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return self.redirect(index, handoff, "no such worker");
        };
        if slot.queue.len() < limit && running {
            slot.queue.push_back(handoff);
            if slot.life.is_ready() {
                self.flush(index);
            }
        } else {
            self.report_stuck(index, "its queue is full; new connections go to other workers");
            self.redirect(index, handoff, "its queue is full");
        }
    }

    /// Gives a connection whose own worker cannot take it to the next ready worker with room, or closes it.
    /// A redirected connection waits up to `queue.maxWait` again at its new worker.
    pub(super) fn redirect(&mut self, from: u32, mut handoff: Handoff, why: &str) {
        let concurrency = self.config.concurrency;
        let limit = self.config.queue_limit;
        let next_ready = (1..concurrency).map(|step| (from + step) % concurrency).find(|&index| {
            let slot = &self.slots[index as usize];
            slot.life.is_ready() && slot.queue.len() < limit
        });
        match next_ready {
            Some(index) if self.running() => {
                self.stats.redirected += 1;
                handoff.arrived = Instant::now();
                debug!("connection {} for worker {from} goes to worker {index}: {why}", handoff.peer.ip());
                self.slots[index as usize].queue.push_back(handoff);
                self.flush(index);
            }
            _ => self.close_unserved(from, handoff, Unserved::NoWorker, &format!("{why} and no other worker is ready")),
        }
    }

    /// Closes a connection unserved and counts it; the first of an episode is logged with why.
    fn close_unserved(&mut self, index: u32, handoff: Handoff, reason: Unserved, why: &str) {
        self.stats.closed += 1;
        let now = Instant::now();
        let (per_source, no_worker) = match reason {
            Unserved::PerSource => (1, 0),
            Unserved::NoWorker => (0, 1),
        };
        match &mut self.closing.current {
            Some((_, last, by_source, by_worker)) => {
                *last = now;
                *by_source += per_source;
                *by_worker += no_worker;
            }
            None => {
                warn!(
                    "closing connection from {} for worker {index}: {why}; further connections closed unserved are \
                     counted, and summed up when none was for a second",
                    handoff.peer.ip()
                );
                self.closing.current = Some((now, now, per_source, no_worker));
            }
        }
    }

    /// Ends an episode of closed connections a second after the last one, with their count.
    fn end_closing_episode(&mut self) {
        let Some((since, last, per_source, no_worker)) = self.closing.current else { return };
        if last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.closing.current = None;
        warn!(
            "closed {} connections unserved over {:.1}s: {per_source} past queue.perSource, {no_worker} with no ready \
             worker that had room",
            per_source + no_worker,
            last.duration_since(since).as_secs_f64()
        );
    }

    /// `queue.perSource`: its bound, the most connections one address has waiting, and the closed ones.
    pub(super) fn per_source_metrics(&self) -> String {
        let mut page = String::new();
        for (name, kind, help, value) in [
            (
                "sticky_cluster_queue_per_source_limit",
                "gauge",
                "queue.perSource: connections of one client address that may wait in the master at once.",
                self.config.queue_per_source as u64,
            ),
            (
                "sticky_cluster_queue_per_source_busiest",
                "gauge",
                "The most connections one client address has waiting in the master now.",
                self.waiting.busiest() as u64,
            ),
            (
                "sticky_cluster_connections_per_source_closed_total",
                "counter",
                "Connections closed unserved because their address had queue.perSource connections waiting.",
                self.waiting.closed,
            ),
        ] {
            let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        page
    }

    /// Every tick: writes what waits, and connections that waited longer than `queue.maxWait` for their
    /// worker go to the next ready one.
    pub(super) fn expire_queues(&mut self) {
        self.end_closing_episode();
        let max_wait = self.config.queue_max_wait;
        for index in 0..self.config.concurrency {
            // Writes that failed for a passing reason of the master's own are retried here, and so is
            // taking back what a dead worker left while the master was at its open-file limit.
            self.take_back_left(index);
            self.flush(index);
            let expired =
                |slot: &WorkerSlot| slot.queue.front().is_some_and(|front| front.arrived.elapsed() >= max_wait);
            if !expired(&self.slots[index as usize]) {
                continue;
            }
            self.report_stuck(index, "connections waiting longer than queue.maxWait go to other workers");
            let slot = &mut self.slots[index as usize];
            let mut due = Vec::new();
            while expired(slot) {
                due.extend(slot.queue.pop_front());
            }
            for handoff in due {
                self.redirect(index, handoff, "it was not ready within queue.maxWait");
            }
        }
    }

    /// When the master stops: connections still waiting for a worker, or still in a dead worker's channel
    /// (the master was at its open-file limit), are closed and counted.
    pub(super) fn close_what_is_left(&mut self) {
        for index in 0..self.config.concurrency {
            self.take_back_left(index);
            let Some(slot) = self.slots.get_mut(index as usize) else { continue };
            let mut closed = slot.close_queue();
            for worker_end in std::mem::take(&mut slot.left_behind) {
                closed += count_connections_left(worker_end);
            }
            self.stats.closed += closed;
        }
    }
}

/// Receives what is left in a dead worker's channel without room for fds (the kernel closes them) and
/// counts the connections among it.
fn count_connections_left(worker_end: OwnedFd) -> u64 {
    let mut count = 0;
    let mut datagram = [0u8; 64];
    loop {
        // SAFETY: a receive into a buffer this function owns; no control buffer, so no fd is installed.
        let received = unsafe {
            libc::recv(worker_end.as_raw_fd(), datagram.as_mut_ptr().cast(), datagram.len(), libc::MSG_DONTWAIT)
        };
        if received <= 0 {
            return count;
        }
        if received >= 4 && datagram[..2] == *b"SC" && datagram[3] == 3 {
            count += 1;
        }
    }
}
