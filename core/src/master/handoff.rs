//! Userspace routing: route each accepted connection to its worker index, then deliver it,
//! queue it for a worker that is not ready, redirect it, or expire it after queue.maxWait.

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

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
}

impl Master {
    pub(super) fn route(&mut self, handoff: Handoff) {
        let index = peer_index(handoff.peer, self.config.concurrency);
        debug!("connection {} -> worker {index}", node_peer_text(handoff.peer));
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
            _ => {
                self.stats.closed += 1;
                warn!(
                    "closing connection from {} for worker {from}: {why} and no other worker is ready",
                    handoff.peer.ip()
                );
            }
        }
    }

    /// Every tick: writes what waits, and connections that waited longer than `queue.maxWait` for their
    /// worker go to the next ready one.
    pub(super) fn expire_queues(&mut self) {
        let max_wait = self.config.queue_max_wait;
        for index in 0..self.config.concurrency {
            // Writes that failed for a passing reason of the master's own are retried here.
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
}
