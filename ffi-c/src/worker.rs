//! The worker side for C event loops: `sticky_worker_open` joins the cluster from the environment,
//! `sticky_worker_fd` plugs into epoll/poll, `sticky_worker_accept` hands over each routed socket.

use std::ffi::c_int;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};

use sticky_cluster::Worker;

use crate::error::{Failure, STICKY_OK};

/// A worker's membership in a sticky cluster: its index and its channel to the master.
///
/// Opaque: created by `sticky_worker_open` (or handed to the `serve` callback by `sticky_run`) and
/// released by `sticky_worker_close`.
pub struct sticky_worker {
    inner: Worker,
}

impl sticky_worker {
    /// Wraps a worker for C.
    pub(crate) fn new(inner: Worker) -> sticky_worker {
        sticky_worker { inner }
    }

    /// The core worker.
    pub(crate) fn inner(&self) -> &Worker {
        &self.inner
    }
}

/// Borrows the worker behind a C pointer, or fails with `STICKY_EINVAL` for NULL.
///
/// # Safety
/// `worker` must be NULL or a live handle from `sticky_worker_open`/`sticky_run`.
unsafe fn worker_ref<'a>(worker: *const sticky_worker) -> Result<&'a Worker, Failure> {
    worker.as_ref().map(|handle| &handle.inner).ok_or_else(|| Failure::null("worker"))
}

sticky_fn! {
    /// Joins the cluster this process was started for, from the environment: `STICKY_CLUSTER_FD`
    /// (spawned by the master) or `STICKY_CLUSTER_SOCKET` (attached), and says hello to the master.
    ///
    /// On success writes a new handle to `*out` (owned by the caller: release it with
    /// `sticky_worker_close`) and returns `STICKY_OK`; connections flow only after `sticky_worker_ready`.
    /// On failure `*out` is left untouched. Errors: `STICKY_EINVAL` (out is NULL), `STICKY_ENOTWORKER`
    /// (no worker environment, or it names something that is not a channel), `STICKY_EATTACH`,
    /// `STICKY_ECLOSED` (the master is already gone), `STICKY_EIO`.
    ///
    /// Signals are left alone: the master sends SIGTERM together with its shutdown message, so a worker
    /// that wants to drain (see `STICKY_ESHUTDOWN`) must ignore or handle SIGTERM itself.
    /// Call it once per process; the handle may then be used from any thread.
    ///
    /// # Safety
    /// `out` must be NULL or point to writable memory for one pointer.
    pub unsafe fn sticky_worker_open(out: *mut *mut sticky_worker) -> c_int {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let worker = Worker::from_env()?;
        *out = Box::into_raw(Box::new(sticky_worker::new(worker)));
        Ok(STICKY_OK)
    }
}

sticky_fn! {
    /// This worker's index (0 to concurrency-1); it stays the same when the worker is revived.
    /// The same value is in the environment as `STICKY_CLUSTER_WORKER_INDEX`.
    /// Returns -1 when `worker` is NULL. Thread-safe.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_index(worker: *const sticky_worker) -> c_int {
        Ok(c_int::try_from(worker_ref(worker)?.index()).unwrap_or(c_int::MAX))
    } ?= -1
}

sticky_fn! {
    /// How many workers the cluster has. Returns -1 when `worker` is NULL. Thread-safe.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_concurrency(worker: *const sticky_worker) -> c_int {
        Ok(c_int::try_from(worker_ref(worker)?.concurrency()).unwrap_or(c_int::MAX))
    } ?= -1
}

sticky_fn! {
    /// The channel fd, for epoll/poll/kqueue: it becomes readable when a connection is waiting (and
    /// also when the master asks for shutdown or goes away; `sticky_worker_accept` then says which).
    ///
    /// The fd stays owned by the worker: never close it or read from it yourself; it is valid until
    /// `sticky_worker_close`. You may make it non-blocking (`fcntl(fd, F_SETFL, O_NONBLOCK)`), after which
    /// `sticky_worker_accept` answers `STICKY_EAGAIN` instead of waiting. After `STICKY_ESHUTDOWN` or
    /// `STICKY_ECLOSED` remove it from your poll set: it may stay readable (end of channel).
    /// Returns -1 when `worker` is NULL. Thread-safe.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_fd(worker: *const sticky_worker) -> c_int {
        Ok(worker_ref(worker)?.channel_fd().as_raw_fd())
    } ?= -1
}

sticky_fn! {
    /// Tells the master this worker has finished initialising; connections routed to it (and those
    /// queued while it started) flow from now on. Calling it again does nothing.
    ///
    /// Returns `STICKY_OK`, or `STICKY_EINVAL` (NULL), `STICKY_ECLOSED` (the master is gone), `STICKY_EIO`.
    /// Thread-safe.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_ready(worker: *mut sticky_worker) -> c_int {
        worker_ref(worker)?.ready()?;
        Ok(STICKY_OK)
    }
}

sticky_fn! {
    /// Stops taking connections, from any thread: the master routes nothing more to this worker (the
    /// index's next connections wait for its successor, which the master starts), and `sticky_worker_accept`
    /// still returns every connection already sent here, then `STICKY_ECLOSED` once the master has confirmed
    /// the last one. So a worker that wants to leave (SIGTERM from someone else than the master, an upgrade,
    /// a fault of its own) loses no connection: call this, accept until `STICKY_ECLOSED`, finish what it
    /// holds, exit. `sticky_run` does it by itself when its worker gets SIGTERM. Calling it again does
    /// nothing.
    ///
    /// Returns `STICKY_OK` (also when the master is already gone), `STICKY_EINVAL` (NULL) or `STICKY_EIO`.
    /// Thread-safe; not async-signal-safe (from a signal, wake a thread that calls it: a pipe, `sigwait`).
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_stop_accepting(worker: *const sticky_worker) -> c_int {
        worker_ref(worker)?.stop_accepting()?;
        Ok(STICKY_OK)
    }
}

sticky_fn! {
    /// Takes the next connection routed to this worker.
    ///
    /// Blocks until one arrives, unless the worker fd was made non-blocking. On `STICKY_OK` writes the
    /// client socket to `*conn_fd`: a connected TCP socket in blocking mode with `FD_CLOEXEC` set, owned
    /// by the caller (close it when done). When `peer` is not NULL it receives the client's address,
    /// the one the routing hash was computed from, as `accept(2)` would give it (on the default
    /// dual-stack listener an IPv4 client is an `AF_INET6` `::ffff:a.b.c.d` address); when `peer_len`
    /// is not NULL it receives that address's length (its input value is ignored: `peer` always has room).
    /// Nothing is written on failure.
    ///
    /// Errors: `STICKY_EAGAIN` (non-blocking and nothing waits), `STICKY_ESHUTDOWN` (the master asks this
    /// worker to drain: finish the connections in hand and exit; every later call answers the same),
    /// `STICKY_ECLOSED` (the master is gone, or it sent its last connection after
    /// `sticky_worker_stop_accepting`: exit), `STICKY_EINVAL` (`worker` or `conn_fd` is NULL),
    /// `STICKY_EPROTOCOL`, `STICKY_EIO`. Thread-safe: concurrent callers each get a different connection.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle; `conn_fd`, `peer` and `peer_len` must each be NULL or
    /// point to writable memory of their type.
    pub unsafe fn sticky_worker_accept(
        worker: *mut sticky_worker,
        conn_fd: *mut c_int,
        peer: *mut libc::sockaddr_storage,
        peer_len: *mut libc::socklen_t,
    ) -> c_int {
        let worker = worker_ref(worker)?;
        if conn_fd.is_null() {
            return Err(Failure::null("conn_fd"));
        }
        let connection = worker.accept_blocking()?;
        let (storage, length) = sockaddr_of(connection.peer);
        if !peer.is_null() {
            peer.write(storage);
        }
        if !peer_len.is_null() {
            peer_len.write(length);
        }
        *conn_fd = connection.stream.into_raw_fd();
        Ok(STICKY_OK)
    }
}

sticky_fn! {
    /// Milliseconds the master granted for draining once it asked for shutdown (the time left before it
    /// kills this worker, as of the shutdown message), or -1 while no shutdown was asked (or `worker` is
    /// NULL). Thread-safe.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle.
    pub unsafe fn sticky_worker_shutdown_deadline_ms(worker: *const sticky_worker) -> i64 {
        let deadline = worker_ref(worker)?.shutdown_deadline_ms();
        Ok(deadline.map_or(-1, |ms| i64::try_from(ms).unwrap_or(i64::MAX)))
    } ?= -1
}

sticky_fn! {
    /// Releases the handle and closes the channel (the master then sees this worker leave).
    /// Connections already accepted stay open: they belong to the caller. NULL does nothing.
    /// Not thread-safe against other calls on the same handle: no call may use it afterwards.
    /// Never call it on the handle `sticky_run` passes to `serve`: `sticky_run` closes that one.
    ///
    /// # Safety
    /// `worker` must be NULL or a live handle from `sticky_worker_open` that no other thread is using;
    /// it is invalid afterwards.
    pub unsafe fn sticky_worker_close(worker: *mut sticky_worker) {
        if !worker.is_null() {
            drop(Box::from_raw(worker));
        }
        Ok(())
    }
}

/// The peer address as `accept(2)` would write it, with its length.
fn sockaddr_of(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let inet = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), inet) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let inet6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                // Raw, as std itself stores it (flowinfo is opaque to us).
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), inet6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_peer_is_written_like_accept() {
        let (storage, length) = sockaddr_of("127.1.2.3:4567".parse().unwrap());
        assert_eq!(length as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: sockaddr_of wrote a sockaddr_in.
        let inet: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::addr_of!(storage).cast()) };
        assert_eq!(inet.sin_family as i32, libc::AF_INET);
        assert_eq!(u16::from_be(inet.sin_port), 4567);
        assert_eq!(inet.sin_addr.s_addr.to_ne_bytes(), [127, 1, 2, 3]);
    }

    #[test]
    fn mapped_ipv6_peer_keeps_its_family() {
        let (storage, length) = sockaddr_of("[::ffff:127.0.0.9]:80".parse().unwrap());
        assert_eq!(length as usize, std::mem::size_of::<libc::sockaddr_in6>());
        // SAFETY: sockaddr_of wrote a sockaddr_in6.
        let inet6: libc::sockaddr_in6 = unsafe { std::ptr::read(std::ptr::addr_of!(storage).cast()) };
        assert_eq!(inet6.sin6_family as i32, libc::AF_INET6);
        assert_eq!(u16::from_be(inet6.sin6_port), 80);
        assert_eq!(&inet6.sin6_addr.s6_addr[10..], &[0xff, 0xff, 127, 0, 0, 9]);
    }
}
