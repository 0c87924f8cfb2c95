//! A kernel-mode worker (`routing: kernel`): its own `SO_REUSEPORT` listener, watched together with the
//! channel through one epoll fd; accepting after ready, draining the accept queue at shutdown.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{self, sockopt, SockFlag, SockType};

use super::{Connection, Worker, ENV_LISTEN_FD, NOT_SHUTTING_DOWN};
use crate::error::{Error, Result};
use crate::protocol::{recv_message, Message};

/// A kernel-mode worker's listener, and the epoll fd that watches it together with the channel.
#[derive(Debug)]
pub(super) struct KernelListener {
    pub(super) listener: OwnedFd,
    /// Level-triggered epoll over the channel, and over the listener once ready was sent.
    pub(super) poll: OwnedFd,
    /// The accept queue was found empty after the shutdown message (from now on only [`Error::Shutdown`])
    /// or after [`Worker::stop_accepting`] (only [`Error::ChannelClosed`]).
    pub(super) drained: AtomicBool,
    /// [`Worker::stop_accepting`] was called: drain the accept queue, then report the end.
    pub(super) stopped: AtomicBool,
}

impl Worker {
    /// Kernel mode: the channel first (a shutdown), then the listener once ready. After the shutdown the
    /// accept queue is drained (what the kernel completed is served), then [`Error::Shutdown`] for good.
    pub(super) fn kernel_connection(&self, kernel: &KernelListener, wait: bool) -> Result<Connection> {
        loop {
            if kernel.stopped.load(Ordering::SeqCst) {
                // stop_accepting: what the accept queue already holds still arrives, then the end.
                if !kernel.drained.load(Ordering::SeqCst) && self.ready_sent.load(Ordering::SeqCst) {
                    match kernel.accept() {
                        Ok(Some(connection)) => return Ok(connection),
                        Ok(None) => kernel.drained.store(true, Ordering::SeqCst),
                        Err(error) => return Err(error),
                    }
                }
                return Err(Error::ChannelClosed);
            }
            if self.shutdown_deadline_ms().is_none() {
                match recv_message(self.channel.as_fd(), true) {
                    Ok(received) => match received.message {
                        Message::Shutdown { deadline_ms } => {
                            self.shutdown_deadline_ms.store(deadline_ms.min(NOT_SHUTTING_DOWN - 1), Ordering::SeqCst);
                        }
                        Message::Welcome { .. } => continue,
                        other => return Err(Error::Protocol(format!("unexpected message from the master: {other:?}"))),
                    },
                    Err(Error::WouldBlock) => {}
                    Err(error) => return Err(error),
                }
            }
            let draining = self.shutdown_deadline_ms().is_some();
            if kernel.drained.load(Ordering::SeqCst) {
                return Err(Error::Shutdown);
            }
            if self.ready_sent.load(Ordering::SeqCst) {
                match kernel.accept()? {
                    Some(connection) => return Ok(connection),
                    None if draining => {
                        kernel.drained.store(true, Ordering::SeqCst);
                        return Err(Error::Shutdown);
                    }
                    None => {}
                }
            } else if draining {
                return Err(Error::Shutdown);
            }
            if !wait {
                return Err(Error::WouldBlock);
            }
            kernel.wait()?;
        }
    }
}

impl KernelListener {
    /// Makes the listener non-blocking and an epoll fd watching the channel (the listener joins at ready).
    pub(super) fn new(listener: OwnedFd, channel: BorrowedFd<'_>) -> Result<KernelListener> {
        let flags = nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io("read the listener's flags", e))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::io("make the listener non-blocking", e))?;
        // SAFETY: epoll_create1 has no memory-safety requirements; a negative answer is an error.
        let poll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if poll < 0 {
            return Err(Error::io("create the worker's epoll fd", std::io::Error::last_os_error()));
        }
        // SAFETY: epoll_create1 just returned this descriptor; nothing else owns it.
        let poll = unsafe { OwnedFd::from_raw_fd(poll) };
        let kernel =
            KernelListener { listener, poll, drained: AtomicBool::new(false), stopped: AtomicBool::new(false) };
        kernel.watch(channel.as_raw_fd())?;
        Ok(kernel)
    }

    /// Adds `fd` to the epoll set, level-triggered, for reading.
    pub(super) fn watch(&self, fd: RawFd) -> Result<()> {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        // SAFETY: both fds are open (owned by the Worker); `event` is a valid epoll_event for the call.
        if unsafe { libc::epoll_ctl(self.poll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
            return Err(Error::io("watch the worker's fds", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The listener's backlog: for a listening socket, `TCP_INFO` reports it in `tcpi_sacked`.
    pub(super) fn backlog(&self) -> Result<u32> {
        // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut length = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the listener is open; `info` is writable for `length` bytes, which the kernel does not exceed.
        let status = unsafe {
            libc::getsockopt(
                self.listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut length,
            )
        };
        if status != 0 {
            return Err(Error::io("read the listener's backlog (TCP_INFO)", std::io::Error::last_os_error()));
        }
        Ok(info.tcpi_sacked)
    }

    /// One connection from the accept queue, `None` when it is empty (the listener is non-blocking).
    fn accept(&self) -> Result<Option<Connection>> {
        loop {
            match socket::accept4(&self.listener, SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    let stream = std::net::TcpStream::from(fd);
                    match (stream.peer_addr(), stream.local_addr()) {
                        (Ok(peer), Ok(local)) => return Ok(Some(Connection { stream, peer, local })),
                        // Reset before we looked at it: nothing to serve.
                        _ => continue,
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                // The connection stays in the accept queue: as for the channel, wait for a free fd.
                Err(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE) => {
                    return Err(crate::protocol::fd_limit_error())
                }
                Err(errno) => return Err(Error::io("accept from the listener", errno)),
            }
        }
    }

    /// Whether the caller made the poll fd non-blocking (then `accept_blocking` must not block either).
    pub(super) fn poll_nonblocking(&self) -> bool {
        nix::fcntl::fcntl(&self.poll, nix::fcntl::FcntlArg::F_GETFL)
            .is_ok_and(|flags| nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK))
    }

    /// Blocks until the channel or the listener is readable.
    fn wait(&self) -> Result<()> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `event` has room for the one event asked for; the epoll fd is open.
        if unsafe { libc::epoll_wait(self.poll.as_raw_fd(), &mut event, 1, -1) } < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("wait for a connection", error));
            }
        }
        Ok(())
    }
}

/// Checks that the fd number names a listening TCP socket before trusting it, then owns it (close-on-exec).
pub(super) fn inherited_listener(fd_text: &str) -> Result<OwnedFd> {
    super::inherited_socket(ENV_LISTEN_FD, fd_text, "the listener", |fd| {
        if socket::getsockopt(&fd, sockopt::SockType) != Ok(SockType::Stream) {
            return Err("not a SOCK_STREAM socket");
        }
        if socket::getsockopt(&fd, sockopt::AcceptConn) != Ok(true) {
            return Err("not a listening socket");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::send_message;
    use crate::worker::tests::worker_and_master;

    /// A kernel-mode worker over a real listener (standing in for one of the group's) and a channel.
    fn kernel_worker() -> (Worker, OwnedFd, std::net::SocketAddr) {
        let (worker, master) = worker_and_master();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut worker = worker;
        worker.kernel = Some(KernelListener::new(OwnedFd::from(listener), worker.channel.as_fd()).unwrap());
        (worker, master, address)
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut poll, 1, 0) > 0 }
    }

    #[test]
    fn the_backlog_the_master_listened_with_is_read_back() {
        let (mut worker, _master) = worker_and_master();
        assert!(matches!(worker.listen_backlog(), Ok(None)), "handoff mode has no listener");
        let fd = socket::socket(socket::AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        socket::bind(fd.as_raw_fd(), &socket::SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
        socket::listen(&fd, socket::Backlog::new(77).unwrap()).unwrap();
        worker.kernel = Some(KernelListener::new(fd, worker.channel.as_fd()).unwrap());
        assert_eq!(worker.listen_backlog().unwrap(), Some(77));
    }

    #[test]
    fn a_kernel_worker_accepts_only_after_ready_and_its_fd_says_when() {
        let (worker, _master, address) = kernel_worker();
        let _client = std::net::TcpStream::connect(address).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!readable(worker.channel_fd()), "nothing is readable before ready");
        assert!(matches!(worker.try_accept(), Err(Error::WouldBlock)), "the client waits in the kernel");
        worker.ready().unwrap();
        assert!(readable(worker.channel_fd()), "the waiting client wakes the poll fd");
        let connection = worker.accept_blocking().unwrap();
        assert_eq!(connection.local, address);
        assert!(matches!(worker.try_accept(), Err(Error::WouldBlock)));
        assert!(worker.listen_fd().is_some());
    }

    #[test]
    fn a_kernel_worker_drains_its_accept_queue_after_shutdown() {
        let (worker, master, address) = kernel_worker();
        worker.ready().unwrap();
        let _clients: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
        send_message(master.as_fd(), &Message::Shutdown { deadline_ms: 900 }, None, false).unwrap();
        for _ in 0..3 {
            assert!(worker.accept_blocking().is_ok(), "completed connections are served after the shutdown");
        }
        assert!(matches!(worker.accept_blocking(), Err(Error::Shutdown)));
        let _late = std::net::TcpStream::connect(address).unwrap();
        assert!(matches!(worker.try_accept(), Err(Error::Shutdown)), "drained: the end sticks");
        assert_eq!(worker.shutdown_deadline_ms(), Some(900));
    }

    #[test]
    fn stop_accepting_drains_a_kernel_workers_queue_then_reports_the_end() {
        let (worker, _master, address) = kernel_worker();
        worker.ready().unwrap();
        let _client = std::net::TcpStream::connect(address).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        worker.stop_accepting().unwrap();
        assert!(worker.accept_blocking().is_ok(), "the connection already queued still arrives");
        assert!(matches!(worker.accept_blocking(), Err(Error::ChannelClosed)));
    }

    #[test]
    fn an_inherited_listener_is_checked_before_it_is_trusted() {
        let message = |text: &str| inherited_listener(text).unwrap_err().to_string();
        assert!(message("x").ends_with("STICKY_CLUSTER_LISTEN_FD=x: not a file descriptor number"));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(message(&file.as_raw_fd().to_string()).ends_with("not a socket"));
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(message(&stream.as_raw_fd().to_string()).ends_with("not a listening socket"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(message(&udp.as_raw_fd().to_string()).ends_with("not a SOCK_STREAM socket"));
    }
}
