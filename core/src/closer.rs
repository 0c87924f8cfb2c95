//! Letting go of fds that came from peers (workers, dialers on the attach socket) and of the sockets that
//! lead to them, without ever blocking the master's one thread on a close a peer can make slow.
//!
//! A close can block: the last close of a TCP socket with `SO_LINGER` and a send queue that cannot drain
//! waits for the linger time (the kernel caps it at "forever"), and closing a Unix socket closes every fd
//! still queued in it, on the closing thread. Two defences: `SO_LINGER` is turned off on the fd first (its
//! close then returns at once and the kernel finishes sending in the background, as for any close
//! without linger), and the close itself runs on one closer thread fed by a bounded queue, for what
//! turning off linger cannot reach (fds queued inside a Unix socket, a file on a FUSE mount). When that
//! queue is full the fd is closed on the caller's thread after all, with linger off: logged once per
//! episode and counted (`sticky_cluster_fd_closer_overflow_total`).

use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;

use tracing::{info, warn};

/// Fds from peers that may wait for the closer thread at once.
pub const CLOSER_QUEUE: usize = 4096;

struct Closer {
    queue: SyncSender<OwnedFd>,
}

static CLOSER: OnceLock<Option<Closer>> = OnceLock::new();
/// Fds handed to the closer thread and not closed yet.
static WAITING: AtomicUsize = AtomicUsize::new(0);
/// Fds closed on the caller's thread because the closer's queue was full.
static OVERFLOWED: AtomicU64 = AtomicU64::new(0);
/// "The closer's queue is full" was logged for the current episode.
static OVERFLOW_LOGGED: AtomicBool = AtomicBool::new(false);

/// Starts the closer thread (once per process; the master calls it). Until then, and in processes that
/// never call it (workers), [`discard`] turns off linger and closes on the caller's thread.
pub fn start() {
    CLOSER.get_or_init(|| {
        let (queue, closing) = sync_channel::<OwnedFd>(CLOSER_QUEUE);
        let spawned = std::thread::Builder::new().name("sticky-closer".into()).spawn(move || {
            for fd in closing {
                drop(fd);
                if WAITING.fetch_sub(1, Ordering::SeqCst) == 1 && OVERFLOW_LOGGED.swap(false, Ordering::SeqCst) {
                    info!("the fd closer caught up");
                }
            }
        });
        match spawned {
            Ok(_) => Some(Closer { queue }),
            Err(error) => {
                warn!("cannot start the fd closer thread ({error}); peers' fds are closed with linger off instead");
                None
            }
        }
    });
}

/// Lets go of an fd that came from a peer (or of a socket to one): linger off, then closed by the closer
/// thread, or here when its queue is full (or it was never started).
pub fn discard(fd: OwnedFd) {
    disarm_linger(fd.as_fd());
    let Some(Some(closer)) = CLOSER.get() else { return drop(fd) };
    WAITING.fetch_add(1, Ordering::SeqCst);
    match closer.queue.try_send(fd) {
        Ok(()) => {}
        Err(TrySendError::Full(fd) | TrySendError::Disconnected(fd)) => {
            WAITING.fetch_sub(1, Ordering::SeqCst);
            OVERFLOWED.fetch_add(1, Ordering::SeqCst);
            if !OVERFLOW_LOGGED.swap(true, Ordering::SeqCst) {
                warn!(
                    "the fd closer is behind ({CLOSER_QUEUE} fds from peers wait to be closed): closing further \
                     ones on the master's thread, with linger off, until it catches up"
                );
            }
            drop(fd);
        }
    }
}

/// [`discard`] for each of `fds`.
pub fn discard_all(fds: impl IntoIterator<Item = OwnedFd>) {
    fds.into_iter().for_each(discard);
}

/// Turns `SO_LINGER` off: the close of a socket with unsent data then returns at once (the kernel keeps
/// sending in the background). Anything that is not a socket is left as it is.
fn disarm_linger(fd: BorrowedFd<'_>) {
    let off = libc::linger { l_onoff: 0, l_linger: 0 };
    // SAFETY: setsockopt reads `off` (of the size given) for a descriptor the caller owns; on anything
    // but a socket it fails with ENOTSOCK and changes nothing.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&off as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// An fd that came from a peer or leads to one, let go of with [`discard`] when dropped: the socket of a
/// worker's channel (its queue may hold fds the worker sent), an attach connection.
#[derive(Debug)]
pub struct PeerFd(ManuallyDrop<OwnedFd>);

impl PeerFd {
    /// Takes `fd` over.
    pub fn new(fd: OwnedFd) -> PeerFd {
        PeerFd(ManuallyDrop::new(fd))
    }
}

impl From<OwnedFd> for PeerFd {
    fn from(fd: OwnedFd) -> PeerFd {
        PeerFd::new(fd)
    }
}

impl AsRawFd for PeerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for PeerFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Drop for PeerFd {
    fn drop(&mut self) {
        // SAFETY: taken exactly once, here, and never used again.
        discard(unsafe { ManuallyDrop::take(&mut self.0) });
    }
}

/// The closer's metrics, in the Prometheus text format.
pub fn metrics() -> String {
    let mut page = String::new();
    for (name, kind, help, value) in [
        (
            "sticky_cluster_fd_closer_queue",
            "gauge",
            "Fds from peers waiting to be closed off the master's thread.",
            WAITING.load(Ordering::SeqCst) as u64,
        ),
        (
            "sticky_cluster_fd_closer_queue_limit",
            "gauge",
            "How many fds from peers may wait to be closed off the master's thread.",
            CLOSER_QUEUE as u64,
        ),
        (
            "sticky_cluster_fd_closer_overflow_total",
            "counter",
            "Fds from peers closed on the master's thread (linger off) because the closer's queue was full.",
            OVERFLOWED.load(Ordering::SeqCst),
        ),
    ] {
        let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lingering_socket_is_closed_without_waiting() {
        use std::io::Write;
        use std::time::{Duration, Instant};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        stream.set_nonblocking(true).unwrap();
        let chunk = [0u8; 65536];
        while (&stream).write(&chunk).is_ok() {}
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &libc::linger { l_onoff: 1, l_linger: 30 },
        )
        .unwrap();
        let started = Instant::now();
        // Not started in this test process: closed here, after linger is turned off.
        discard(OwnedFd::from(stream));
        assert!(started.elapsed() < Duration::from_secs(5), "the close waited {:?}", started.elapsed());
        drop(listener);
    }
}
