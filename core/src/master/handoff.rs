//! Userspace routing: route each accepted connection to its worker index, then deliver it,
//! queue it for a worker that is not ready, redirect it, or expire it after queue.maxWait.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::errno::Errno;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use crate::client_address::ClientAddressSource;
use crate::hash::{node_address_text, route_index};
use crate::protocol::{send_message, Message};

use super::*;

/// A client connection on its way to a worker.
#[derive(Debug)]
pub(super) struct Handoff {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) arrived: Instant,
}

/// What a channel's sender task writes.
pub(super) enum Outgoing {
    Connection(Handoff),
    /// The shutdown message, then SIGTERM to this pid (spawned workers).
    Shutdown {
        deadline_ms: u64,
        then_terminate: Option<u32>,
    },
}

impl Master {
    pub(super) fn route(&mut self, handoff: Handoff) {
        let index = route_index(handoff.peer.ip(), self.config.concurrency);
        debug!("connection {} -> worker {index}", node_address_text(handoff.peer.ip()));
        self.deliver(index, handoff);
    }

    /// Sends to the worker's channel when it is ready, else queues (bounded), else redirects.
    pub(super) fn deliver(&mut self, index: u32, handoff: Handoff) {
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

    pub(super) fn send_to(&mut self, index: u32, handoff: Handoff) {
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
    pub(super) fn undelivered(&mut self, index: u32, handoff: Handoff, errno: Errno) {
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
    pub(super) fn redirect(&mut self, from: u32, handoff: Handoff, why: &str) {
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

    pub(super) fn expire_queues(&mut self) {
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
}

/// Reads the client address from the connection's first bytes without consuming them, then hands the
/// connection back to the event loop for routing. On any trouble it routes by the TCP peer.
pub(super) async fn identify_client(handoff: Handoff, source: ClientAddressSource, events: UnboundedSender<Event>) {
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
