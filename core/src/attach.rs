//! Attach mode: the Unix socket that workers in other containers dial, and the checks a dialing worker
//! passes (peer uid by SO_PEERCRED, protocol version, a hello within a time limit) before it gets an index.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use tokio::io::unix::AsyncFd;

use crate::config::AttachOptions;
use crate::error::{Error, Result};
use crate::protocol::{recv_message, send_message, Message};

/// How long a dialing worker has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker that passed the checks and claims an index (or any free one).
pub struct Claim {
    /// The master's end of the worker's channel (non-blocking).
    pub channel: OwnedFd,
    /// The index asked for, or `protocol::ANY_INDEX`.
    pub index: u32,
    /// The worker's pid as it reported it (in its own pid namespace).
    pub pid: u32,
    /// The peer's uid, from SO_PEERCRED.
    pub uid: u32,
}

/// Creates the attach socket: removes a stale socket file, binds, sets the mode, listens (non-blocking).
pub fn listen(options: &AttachOptions) -> Result<OwnedFd> {
    let path = &options.socket;
    let fail = |reason: String| Error::Attach { path: path.clone(), reason };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail("exists and is not a socket; refusing to replace it".into()));
        }
        std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| fail(format!("socket: {e}")))?;
    let address = UnixAddr::new(path).map_err(|e| fail(e.to_string()))?;
    socket::bind(fd.as_raw_fd(), &address).map_err(|e| fail(format!("bind: {}", e.desc())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))
        .map_err(|e| fail(format!("chmod {:04o}: {e}", options.mode)))?;
    socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| fail(format!("listen: {}", e.desc())))?;
    Ok(fd)
}

/// Whether `uid` may attach: the master's own uid, root, or one listed in `allowUids`.
pub fn uid_allowed(options: &AttachOptions, uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || options.allow_uids.contains(&uid)
}

/// Checks a freshly accepted worker: its hello, then its uid. A refusal is sent to the worker and
/// returned as the reason to log.
pub async fn handshake(channel: OwnedFd, options: &AttachOptions) -> std::result::Result<Claim, String> {
    // SAFETY: the AsyncFd borrows the number only while `channel` is alive in this function.
    let waiter = unsafe { AsyncFd::register_with_interest(channel.as_raw_fd(), tokio::io::Interest::READABLE) }
        .map_err(|e| format!("register: {e}"))?;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            let mut guard = waiter.readable().await.map_err(|e| e.to_string())?;
            match recv_message(channel.as_fd(), true) {
                Err(Error::WouldBlock) => guard.clear_ready(),
                Ok(received) => return Ok(received.message),
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await;
    drop(waiter);
    match hello {
        Err(_) => Err(refuse(&channel, format!("no hello within {HELLO_TIMEOUT:?}"))),
        Ok(Err(reason)) => Err(refuse(&channel, reason)),
        Ok(Ok(Message::Hello { index, pid })) => {
            // Checked after the hello is read: a refusal then reaches the worker as the answer to it,
            // instead of a reset that would hide the reason.
            let credentials =
                socket::getsockopt(&channel, sockopt::PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
            let uid = credentials.uid();
            if !uid_allowed(options, uid) {
                return Err(refuse(&channel, format!("uid {uid} (pid {}) is not in allowUids", credentials.pid())));
            }
            Ok(Claim { channel, index, pid, uid })
        }
        Ok(Ok(other)) => Err(refuse(&channel, format!("expected hello, got {other:?}"))),
    }
}

/// Tells the worker why it is refused (best effort) and gives the reason back for the log.
pub fn refuse(channel: &OwnedFd, reason: String) -> String {
    let _ = send_message(channel.as_fd(), &Message::Refused { reason: reason.clone() }, None, true);
    reason
}
