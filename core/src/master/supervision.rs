//! Worker processes and attached workers: starting them, noticing their exit, reviving them with
//! back-off, and taking in workers that dial the attach socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, info, warn};

use crate::config::WorkerSource;
use crate::error::{Error, Result};
use crate::protocol::{recv_message, send_message, Message};
use crate::supervisor::{describe_exit, revival_delay, spawn_worker, CRASH_UPTIME};

use super::*;

impl Master {
    pub(super) fn start_worker(&mut self, index: u32) -> Result<()> {
        let WorkerSource::Spawn { command, cwd } = &self.config.workers else {
            return Err(Error::io(
                format!("start worker {index}"),
                io::Error::other("the cluster attaches its workers"),
            ));
        };
        let spawned = spawn_worker(&self.config, command, cwd.as_deref(), index, self.kernel_listener(index))?;
        let generation = self.connect_slot(index, spawned.pid, spawned.channel, Some(spawned.worker_end))?;
        debug!("worker {index} started (pid {}, generation {generation})", spawned.pid);
        let events = self.events.clone();
        let mut child = spawned.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::Exited { index, generation, status });
        });
        Ok(())
    }

    /// A worker dialed the attach socket: check it on its own task, so a slow one holds nobody up.
    pub(super) fn on_dialed(&mut self, dialed: io::Result<OwnedFd>) {
        let channel = match dialed {
            Ok(channel) => channel,
            Err(error) => {
                warn!("accepting a worker on the attach socket failed: {error}");
                return;
            }
        };
        let WorkerSource::Attach(options) = &self.config.workers else { return };
        let events = self.events.clone();
        // The uid is checked here, before a byte is read; the hello is awaited on a bounded task.
        self.handshakes.start(channel, options, move |claim| _ = events.send(Event::Attached(claim)));
    }

    /// Gives a checked worker the index it claims (or the first free one), or refuses it.
    pub(super) fn on_attached(&mut self, claim: crate::attach::Claim) {
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
        let Some(index) = index else { return };
        if let Some(listener) = self.kernel_listener(index) {
            // Before the welcome, so the worker holds its listener when its handshake ends.
            if let Err(errno) = send_message(claim.channel.as_fd(), &Message::Listener, Some(listener), true) {
                warn!("worker pid {} left before its listener: {errno}", claim.pid);
                return;
            }
        }
        let welcome = Message::Welcome { index, concurrency };
        if let Err(errno) = send_message(claim.channel.as_fd(), &welcome, None, true) {
            warn!("worker pid {} left before its welcome: {errno}", claim.pid);
            return;
        }
        // The worker gets its end of a fresh channel and the master keeps a copy, as for spawned workers:
        // what it never received survives its death. The attach connection only tells when it is gone.
        let pair = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .and_then(|(master_end, worker_end)| {
            nix::fcntl::fcntl(&master_end, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
            Ok((master_end, worker_end))
        });
        let (master_end, worker_end) = match pair {
            Ok(pair) => pair,
            Err(errno) => return warn!("no channel for worker pid {}: {errno}", claim.pid),
        };
        if let Err(errno) = send_message(claim.channel.as_fd(), &Message::Channel, Some(worker_end.as_fd()), true) {
            warn!("worker pid {} left before its channel: {errno}", claim.pid);
            return;
        }
        let generation = match self.connect_slot(index, claim.pid, master_end, Some(worker_end)) {
            Ok(generation) => generation,
            Err(error) => return error!("{error}"),
        };
        debug!("worker {index} attached (pid {}, uid {})", claim.pid, claim.uid);
        let watch = tokio::spawn(watch_attach_link(claim.channel, self.events.clone(), index, generation));
        if let Some(slot) = self.slot_of(index, generation) {
            slot.attach_link = Some(watch.abort_handle());
        }
    }

    /// An attached worker is gone (its attach connection ended): its index waits for the next attach,
    /// with every connection it never received.
    pub(super) fn on_detached(&mut self, index: u32, generation: u64) {
        if self.slot_of(index, generation).is_some_and(|slot| slot.alive) {
            self.release_attached(index, "detached; its connections wait for a new attach", false);
        }
    }

    pub(super) fn on_exit(&mut self, index: u32, generation: u64, status: io::Result<ExitStatus>) {
        let shutting_down = self.shutdown_deadline.is_some();
        let Some(slot) = self.slot_of(index, generation) else { return };
        slot.alive = false;
        slot.disconnect();
        let how = match &status {
            Ok(status) => describe_exit(status),
            Err(error) => format!("unknown status ({error})"),
        };
        let taken_back = self.take_back(index);
        let slot = &mut self.slots[index as usize];
        if taken_back > 0 {
            info!(
                "worker {index} (pid {}) left {taken_back} connections unread; they wait for its successor",
                slot.pid
            );
        }
        if shutting_down {
            debug!("worker {index} (pid {}) exited: {how}", slot.pid);
            self.stats.closed += slot.close_queue();
            return;
        }
        if std::mem::take(&mut slot.retiring) {
            info!("worker {index} (pid {}) stopped for the reload ({how}); starting its successor", slot.pid);
            if let Err(error) = self.start_worker(index) {
                self.start_failed(index, error);
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

    /// A worker could not be started (fds, memory, a missing program): try again with the same growing
    /// back-off as a crash loop, so the error never spins.
    pub(super) fn start_failed(&mut self, index: u32, error: Error) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        slot.crashes += 1;
        error!("{error}; retrying in {:?}", revival_delay(slot.crashes));
        self.schedule_revival(index);
    }

    pub(super) fn schedule_revival(&mut self, index: u32) {
        let slot = &self.slots[index as usize];
        let delay = revival_delay(slot.crashes);
        let generation = slot.generation;
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Revive { index, generation });
        });
    }
}

/// Holds an attached worker's attach connection until it ends (the worker is gone), then tells the loop.
/// Aborting this task closes the connection, which tells the worker it was let go.
async fn watch_attach_link(link: OwnedFd, events: UnboundedSender<Event>, index: u32, generation: u64) {
    // SAFETY: the AsyncFd owns the connection, so its fd stays open and unchanged while registered.
    if let Ok(link) = unsafe { AsyncFd::register_with_interest(link, tokio::io::Interest::READABLE) } {
        loop {
            let Ok(mut guard) = link.readable().await else { break };
            match recv_message(link.get_ref().as_fd(), true) {
                Err(Error::WouldBlock) => guard.clear_ready(),
                // Nothing more is expected on it: anything but its end is ignored.
                Ok(_) | Err(Error::Protocol(_)) => {}
                Err(_) => break,
            }
        }
    }
    let _ = events.send(Event::Detached { index, generation });
}

/// Accepts the next worker dialing the attach socket.
pub(super) async fn accept_worker(socket: Option<&AsyncFd<OwnedFd>>) -> io::Result<OwnedFd> {
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
