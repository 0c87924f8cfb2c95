//! Attach mode in the master: workers dial the attach socket, pass `crate::attach`'s checks, get an
//! index, their listener (kernel routing) and their own channel end; their attach connection then only
//! tells the master when they are gone, and their index waits for the next attach.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{accept4, socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, warn};

use super::slot::{AttachLink, Life, Role};
use super::{Event, Master};
use crate::attach::{refuse, Claim};
use crate::closer::PeerFd;
use crate::config::WorkerSource;
use crate::error::Error;
use crate::protocol::{recv_message, send_message, Message, ANY_INDEX};

impl Master {
    /// A worker dialed the attach socket: check it on its own task, so a slow one holds nobody up.
    pub(super) fn on_dialed(&mut self, dialed: io::Result<OwnedFd>) {
        let channel = match dialed {
            Ok(channel) => channel,
            // EMFILE and the like: the dialer waits in the backlog while the socket backs off.
            Err(error) => return self.attach_backoff.failed(&error),
        };
        self.attach_backoff.succeeded();
        let WorkerSource::Attach(options) = &self.config.workers else { return };
        let events = self.events.clone();
        // The uid is checked here, before a byte is read; the hello is awaited on a bounded task.
        self.handshakes.start(channel, options, move |claim| _ = events.send(Event::Attached(claim)));
    }

    /// Gives a checked worker the index it claims (or the first free one), or refuses it.
    pub(super) fn on_attached(&mut self, claim: Claim) {
        let Claim { channel, index: claimed, pid, uid } = claim;
        // However this ends, the attach connection is let go of off this thread.
        let channel = PeerFd::new(channel);
        let concurrency = self.config.concurrency;
        let index = if claimed == ANY_INDEX {
            self.slots.iter().position(|slot| slot.life.is_down()).map(|i| i as u32)
        } else {
            Some(claimed)
        };
        let refusal = match index {
            _ if !self.running() => Some("the cluster is shutting down".to_string()),
            None => Some(format!("all {concurrency} indexes are attached")),
            Some(index) if index >= concurrency => {
                Some(format!("index {index} is out of range (concurrency {concurrency})"))
            }
            Some(index) => self.slots[index as usize]
                .life
                .process()
                .map(|process| format!("index {index} is already attached (pid {})", process.pid)),
        };
        if let Some(reason) = refusal {
            let reason = refuse(&channel, reason);
            warn!("refused worker pid {pid} (uid {uid}): {reason}");
            return;
        }
        let Some(index) = index else { return };
        if let Some(listener) = self.kernel_listener(index) {
            // Before the welcome, so the worker holds its listener when its handshake ends.
            if let Err(errno) = send_message(channel.as_fd(), &Message::Listener, Some(listener), true) {
                warn!("worker pid {pid} left before its listener: {errno}");
                return;
            }
        }
        let welcome = Message::Welcome { index, concurrency };
        if let Err(errno) = send_message(channel.as_fd(), &welcome, None, true) {
            warn!("worker pid {pid} left before its welcome: {errno}");
            return;
        }
        // The worker gets its end of a fresh channel and the master keeps a copy, as for spawned workers:
        // what it never received survives its death. The attach connection only tells when it is gone.
        let pair = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).and_then(
            |(master_end, worker_end)| {
                nix::fcntl::fcntl(&master_end, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
                Ok((master_end, worker_end))
            },
        );
        let (master_end, worker_end) = match pair {
            Ok(pair) => pair,
            Err(errno) => return warn!("no channel for worker pid {pid}: {errno}"),
        };
        if let Err(errno) = send_message(channel.as_fd(), &Message::Channel, Some(worker_end.as_fd()), true) {
            warn!("worker pid {pid} left before its channel: {errno}");
            return;
        }
        let mut process = match self.new_process(index, pid, false, master_end, Some(worker_end)) {
            Ok(process) => process,
            Err(error) => return error!("{error}"),
        };
        debug!("worker {index} attached (pid {pid}, uid {uid})");
        let fd = channel.as_raw_fd();
        let watch = tokio::spawn(watch_attach_link(channel, self.events.clone(), index, process.generation));
        process.attach_link = Some(AttachLink { task: watch.abort_handle(), fd });
        self.slots[index as usize].life = Life::Starting(process);
    }

    /// An attached worker is gone (its attach connection ended): its index waits for the next attach,
    /// with every connection it never received.
    pub(super) fn on_detached(&mut self, index: u32, generation: u64) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        let why = match slot.role_of(generation) {
            Some(Role::Retiring(_)) => "detached after it stopped",
            Some(_) => "detached; its connections wait for a new attach",
            None => return,
        };
        self.release_attached(index, generation, why, false);
    }

    /// An attached worker is gone or cut loose (it is supervised elsewhere): its index waits for the next
    /// attach with what it never received, or, during shutdown, those connections are closed and counted.
    /// A worker that `broke` the protocol is logged as an error.
    pub(super) fn release_attached(&mut self, index: u32, generation: u64, why: &str, broke: bool) {
        let running = self.running();
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        let Some((_, mut process)) = slot.remove(generation) else { return };
        process.disconnect();
        let pid = process.pid;
        let taken_back = self.take_back(index, &mut process);
        if !running {
            debug!("worker {index} (pid {pid}) {why}");
            return self.settle_queue_in_shutdown(index);
        }
        if broke {
            error!("worker {index} (pid {pid}) {why} ({taken_back} it never received taken back)");
        } else {
            warn!("worker {index} (pid {pid}) {why} ({taken_back} it never received taken back)");
        }
        self.flush(index);
    }
}

/// Holds an attached worker's attach connection until it ends (the worker is gone), then tells the loop.
/// Aborting this task closes the connection, which tells the worker it was let go.
pub(super) async fn watch_attach_link(link: PeerFd, events: UnboundedSender<Event>, index: u32, generation: u64) {
    // SAFETY: the AsyncFd owns the connection, so its fd stays open and unchanged while registered.
    if let Ok(link) = unsafe { AsyncFd::register_with_interest(link, tokio::io::Interest::READABLE) } {
        loop {
            let Ok(mut guard) = link.readable().await else { break };
            match recv_message(link.get_ref().as_fd(), true) {
                Err(Error::WouldBlock) => guard.clear_ready(),
                // Nothing more is expected on it: anything but its end is ignored (fds let go of).
                Ok(received) => crate::closer::discard_all(received.fd),
                Err(Error::Protocol(_)) => {}
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
        match accept4(socket.get_ref(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
            Err(Errno::EAGAIN) => guard.clear_ready(),
            Err(Errno::EINTR | Errno::ECONNABORTED) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}
