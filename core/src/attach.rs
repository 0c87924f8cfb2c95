//! Attach mode: the Unix socket that workers in other containers dial, and the checks a dialing worker
//! passes (peer uid by SO_PEERCRED before a byte is read, protocol version, a hello in time, a bounded
//! number of handshakes at once) before it gets an index.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::config::AttachOptions;
use crate::error::{Error, Result};
use crate::protocol::{recv_message, send_message, Message};

/// How long a dialing worker has to say hello.
const HELLO_TIMEOUT: Duration = crate::config::defaults::ATTACH_HELLO_TIMEOUT;

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

/// Dialing workers whose hello is awaited at once; more are refused until some finish.
pub const HANDSHAKE_LIMIT: usize = crate::config::defaults::ATTACH_HANDSHAKE_LIMIT;

/// The file `bind` made for the attach socket, known by its inode: removed at exit only while it is still
/// that file (another master may have bound the path since someone removed it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketFile {
    /// Where it is.
    pub path: std::path::PathBuf,
    device: u64,
    inode: u64,
}

impl SocketFile {
    /// Removes the file if it is still this one, else leaves it (and says so). There is a moment between
    /// the check and the removal; no call removes a path only if it names a given inode.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == (self.device, self.inode) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => warn!(
                "left {} in place: it is not this master's socket any more (another took the path)",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Creates the attach socket: removes a stale socket file (never one a live master answers on), binds
/// with the mode already on the socket, fixes the mode without following symlinks, listens (non-blocking).
/// Returns the socket and its file, to remove at exit.
pub fn listen(options: &AttachOptions) -> Result<(OwnedFd, SocketFile)> {
    let path = &options.socket;
    let fail = |reason: String| Error::Attach { path: path.clone(), reason };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail("exists and is not a socket; refusing to replace it".into()));
        }
        match probe(path) {
            Ok(true) => {
                return Err(fail(
                    "another master is listening on this socket; stop it first or choose another path".into(),
                ))
            }
            Ok(false) => {}
            Err(errno) => return Err(fail(format!("cannot tell whether the socket is in use: {}", errno.desc()))),
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
    let mode = Mode::from_bits_truncate(options.mode);
    // bind(2) gives the new file the socket inode's mode less the umask: with the mode set on the fd
    // first, the path is never more open than asked, not even between bind and chmod.
    nix::sys::stat::fchmod(&fd, mode).map_err(|e| fail(format!("fchmod {:04o}: {}", options.mode, e.desc())))?;
    let address = UnixAddr::new(path).map_err(|e| fail(e.to_string()))?;
    socket::bind(fd.as_raw_fd(), &address).map_err(|e| fail(format!("bind: {}", e.desc())))?;
    let (device, inode) = set_mode_exactly(path, options.mode).map_err(|reason| {
        let _ = std::fs::remove_file(path);
        fail(reason)
    })?;
    let file = SocketFile { path: path.clone(), device, inode };
    socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN)).map_err(|e| {
        file.remove();
        fail(format!("listen: {}", e.desc()))
    })?;
    Ok((fd, file))
}

/// Whether a master answers on the socket at `path`: a stale file refuses the connection.
fn probe(path: &Path) -> std::result::Result<bool, Errno> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let address = UnixAddr::new(path)?;
    match socket::connect(fd.as_raw_fd(), &address) {
        // EAGAIN: a listener whose backlog is full is still a live one.
        Ok(()) | Err(Errno::EAGAIN) => Ok(true),
        Err(Errno::ECONNREFUSED) => Ok(false),
        Err(errno) => Err(errno),
    }
}

/// Adds back what the umask took from the mode, on the file bind just made, without following a
/// symlink: opened with O_PATH|O_NOFOLLOW and checked to be our socket, then changed through
/// `/proc/self/fd`, which names that very inode (chmod(2) on the path could be sent elsewhere by a
/// symlink swapped in meanwhile).
/// Returns the file's device and inode.
fn set_mode_exactly(path: &Path, mode: u32) -> std::result::Result<(u64, u64), String> {
    let file = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("open the new socket file: {}", e.desc()))?;
    let stat = nix::sys::stat::fstat(&file).map_err(|e| format!("fstat the new socket file: {}", e.desc()))?;
    let is_socket = stat.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    if !is_socket || stat.st_uid != nix::unistd::geteuid().as_raw() {
        return Err("the path was replaced right after bind; refusing to touch it".into());
    }
    let identity = (stat.st_dev, stat.st_ino);
    if stat.st_mode & 0o7777 == mode {
        return Ok(identity);
    }
    let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        by_fd.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("chmod {mode:04o} through {by_fd}: {}", e.desc()))?;
    let after = std::fs::symlink_metadata(path).map_err(|e| format!("stat after chmod: {e}"))?;
    if after.mode() & 0o7777 != mode {
        return Err(format!("mode is {:04o} after chmod {mode:04o}", after.mode() & 0o7777));
    }
    Ok(identity)
}

/// Whether `uid` may attach: the master's own uid, root, or one listed in `allowUids`.
pub fn uid_allowed(options: &AttachOptions, uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || options.allow_uids.contains(&uid)
}

/// The peer's uid by SO_PEERCRED, if it may attach; else the refusal is sent and returned for the log.
/// Called at accept, before a byte from the peer is read.
pub fn check_peer(channel: &OwnedFd, options: &AttachOptions) -> std::result::Result<u32, String> {
    let credentials =
        socket::getsockopt(channel, sockopt::PeerCredentials).map_err(|e| format!("SO_PEERCRED: {}", e.desc()))?;
    let uid = credentials.uid();
    if !uid_allowed(options, uid) {
        return Err(refuse(channel, format!("uid {uid} (pid {}) is not in allowUids", credentials.pid())));
    }
    Ok(uid)
}

/// The handshakes under way, at most [`HANDSHAKE_LIMIT`] at once.
#[derive(Debug, Default)]
pub struct Handshakes {
    active: Arc<AtomicUsize>,
    logged: Arc<AtomicBool>,
    /// The dialing workers whose hello is awaited, by a number of their own: (fd, uid). An upgrade in
    /// place hands them to the next image.
    dialing: Arc<Mutex<HashMap<u64, (RawFd, u32)>>>,
    next_id: Arc<AtomicU64>,
}

impl Handshakes {
    /// Checks a worker that just dialed: its uid at once, then its hello on a task; `done` gets the
    /// claim of one that passed. Refusals are sent to the worker and logged. Needs a tokio runtime.
    pub fn start(&self, channel: OwnedFd, options: &AttachOptions, done: impl FnOnce(Claim) + Send + 'static) {
        let socket = options.socket.display().to_string();
        let uid = match check_peer(&channel, options) {
            Ok(uid) => uid,
            Err(reason) => {
                crate::closer::discard(channel);
                return warn!("refused a worker on {socket}: {reason}");
            }
        };
        if self.active.fetch_add(1, Ordering::SeqCst) >= HANDSHAKE_LIMIT {
            self.active.fetch_sub(1, Ordering::SeqCst);
            let reason = refuse(&channel, format!("{HANDSHAKE_LIMIT} other workers are attaching; try again"));
            crate::closer::discard(channel);
            if !self.logged.swap(true, Ordering::SeqCst) {
                warn!("refusing workers on {socket} until some of the {HANDSHAKE_LIMIT} handshakes finish: {reason}");
            }
            return;
        }
        self.await_hello(channel, uid, socket, done);
    }

    /// Goes on with a handshake the previous image of this master started (an upgrade in place): the uid
    /// was checked there, the hello is still to come.
    pub fn resume(
        &self,
        channel: OwnedFd,
        uid: u32,
        options: &AttachOptions,
        done: impl FnOnce(Claim) + Send + 'static,
    ) {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.await_hello(channel, uid, options.socket.display().to_string(), done);
    }

    /// The dialing workers whose hello is awaited now: (fd, uid).
    pub fn dialing(&self) -> Vec<(RawFd, u32)> {
        self.dialing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).values().copied().collect()
    }

    /// Waits on a task for the hello of a worker counted in `active`.
    fn await_hello(&self, channel: OwnedFd, uid: u32, socket: String, done: impl FnOnce(Claim) + Send + 'static) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.dialing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, (channel.as_raw_fd(), uid));
        let (active, logged, dialing) = (self.active.clone(), self.logged.clone(), self.dialing.clone());
        tokio::spawn(async move {
            let outcome = handshake(channel, uid).await;
            dialing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
            if active.fetch_sub(1, Ordering::SeqCst) == 1 {
                logged.store(false, Ordering::SeqCst);
            }
            match outcome {
                Ok(claim) => done(claim),
                Err(reason) => warn!("refused a worker on {socket}: {reason}"),
            }
        });
    }

    /// Handshakes under way now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

/// Waits for the hello of a worker whose uid passed. A refusal is sent to the worker and returned as
/// the reason to log.
pub async fn handshake(channel: OwnedFd, uid: u32) -> std::result::Result<Claim, String> {
    // SAFETY: the AsyncFd borrows the number only while `channel` is alive in this function.
    let waiter = unsafe { AsyncFd::register_with_interest(channel.as_raw_fd(), tokio::io::Interest::READABLE) }
        .map_err(|e| format!("register: {e}"))?;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            let mut guard = waiter.readable().await.map_err(|e| e.to_string())?;
            match recv_message(channel.as_fd(), true) {
                Err(Error::WouldBlock) => guard.clear_ready(),
                Ok(received) => {
                    crate::closer::discard_all(received.fd);
                    return Ok(received.message);
                }
                Err(Error::ChannelClosed) => return Err("hung up before its hello".to_string()),
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await;
    drop(waiter);
    let reason = match hello {
        Ok(Ok(Message::Hello { index, pid })) => return Ok(Claim { channel, index, pid, uid }),
        Err(_) => format!("no hello within {HELLO_TIMEOUT:?}"),
        Ok(Err(reason)) => reason,
        Ok(Ok(other)) => format!("expected hello, got {other:?}"),
    };
    let reason = refuse(&channel, reason);
    // Datagrams it sent after the refusal may still carry fds: they go with the socket.
    crate::closer::discard(channel);
    Err(reason)
}

/// Tells the worker why it is refused (best effort) and gives the reason back for the log.
///
/// Closing a Unix socket with unread datagrams makes the peer's next receive fail with ECONNRESET
/// before it reaches the refusal, so the worker would never learn why. Hence: no more input from the
/// peer (SHUT_RD), and whatever it already sent (a hello not read yet) is received and thrown away,
/// fds included, which go to `closer::discard` (never closed by the kernel on this thread: a peer's fd
/// may block its close). The caller lets go of the socket with `closer::discard` too.
pub fn refuse(channel: impl AsFd, reason: String) -> String {
    let channel = channel.as_fd();
    let _ = send_message(channel, &Message::Refused { reason: reason.clone() }, None, true);
    let _ = socket::shutdown(channel.as_raw_fd(), socket::Shutdown::Read);
    for _ in 0..16 {
        match recv_message(channel, true) {
            Ok(received) => crate::closer::discard_all(received.fd),
            // Consumed, its fds discarded.
            Err(Error::Protocol(_)) => {}
            Err(_) => break,
        }
    }
    reason
}
