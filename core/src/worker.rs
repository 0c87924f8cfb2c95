//! The worker side: find the channel the master gave this process, say ready, and accept routed connections.
//! Spawned workers inherit the channel as `STICKY_CLUSTER_FD`; attached ones dial `STICKY_CLUSTER_SOCKET`.
//!
//! With `routing: kernel` the worker also holds its own `SO_REUSEPORT` listener (inherited as
//! `STICKY_CLUSTER_LISTEN_FD`, or sent before the attach welcome) and accepts from it itself, once ready; the
//! channel still carries hello, ready and shutdown. Both are watched through one epoll fd, which is what
//! [`Worker::channel_fd`] returns in that mode, so poll loops work unchanged.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrLike, UnixAddr};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::protocol::{is_fd_limit, recv_message, send_message, Message, Received, ANY_INDEX};

mod kernel;
use kernel::{inherited_listener, KernelListener};

/// Environment variable with the worker's index (0-based).
pub const ENV_WORKER_INDEX: &str = "STICKY_CLUSTER_WORKER_INDEX";
/// The npm `sticky-cluster` module's name for the worker index, kept for compatibility.
pub const ENV_WORKER_INDEX_COMPAT: &str = "stickycluster_worker_index";
/// Environment variable with the number of workers in the cluster.
pub const ENV_CONCURRENCY: &str = "STICKY_CLUSTER_CONCURRENCY";
/// Environment variable with the inherited channel fd of a spawned worker.
pub const ENV_CHANNEL_FD: &str = "STICKY_CLUSTER_FD";
/// Environment variable with the master's Unix socket path for an attached worker.
pub const ENV_SOCKET: &str = "STICKY_CLUSTER_SOCKET";
/// Environment variable with the inherited listener fd of a spawned worker with `routing: kernel`
/// (removed from the environment once read: the fd is close-on-exec from then on).
pub const ENV_LISTEN_FD: &str = "STICKY_CLUSTER_LISTEN_FD";

/// A routed client connection, as the blocking [`Worker::accept_blocking`] hands it over.
#[derive(Debug)]
pub struct Connection {
    /// The client's socket, in blocking mode, owned by the caller.
    pub stream: std::net::TcpStream,
    /// The client's address (the one the routing hash was computed from).
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}

/// This process's membership in a sticky cluster: its index and its channel to the master.
#[derive(Debug)]
pub struct Worker {
    index: u32,
    concurrency: u32,
    // Declared before `channel`: fields drop in order, and the reactor must let go of the fd first.
    async_channel: OnceLock<AsyncFd<ChannelFd>>,
    channel: OwnedFd,
    /// Attach mode: the connection to the master's attach socket, held open for this process's lifetime.
    attach_link: Option<OwnedFd>,
    ready_sent: AtomicBool,
    /// [`Worker::stop_accepting`] told the master.
    stopping: AtomicBool,
    /// The master's `stopped` arrived: nothing more comes on the channel.
    stopped: AtomicBool,
    shutdown_deadline_ms: AtomicU64,
    /// `routing: kernel`: this worker's listener.
    kernel: Option<KernelListener>,
    /// The episode at the open-file limit this worker is in (connections waited in its channel), if any.
    at_fd_limit: std::sync::Mutex<Option<FdLimitEpisode>>,
}

/// A borrowed view of the channel for tokio's reactor; the [`Worker`] keeps ownership.
#[derive(Debug)]
struct ChannelFd(RawFd);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

const NOT_SHUTTING_DOWN: u64 = u64::MAX;

/// A time at the open-file limit: when it began, when this worker last had to wait, how often it did.
#[derive(Debug)]
struct FdLimitEpisode {
    since: Instant,
    last_wait: Instant,
    waits: u64,
}

impl Worker {
    /// Joins the cluster this process was started for: `STICKY_CLUSTER_FD` (spawned) or
    /// `STICKY_CLUSTER_SOCKET` (attached). Sends hello; connections flow only after [`Worker::ready`].
    pub fn from_env() -> Result<Worker> {
        if let Some(fd_text) = std::env::var_os(ENV_CHANNEL_FD) {
            let fd_text = fd_text.to_string_lossy().into_owned();
            let index = index_from_env()?
                .ok_or_else(|| Error::Environment(format!("{ENV_CHANNEL_FD} is set but {ENV_WORKER_INDEX} is not")))?;
            let channel = inherited_channel(&fd_text)?;
            let listener = match std::env::var_os(ENV_LISTEN_FD) {
                Some(text) => Some(inherited_listener(&text.to_string_lossy())?),
                None => None,
            };
            std::env::remove_var(ENV_LISTEN_FD);
            let concurrency = concurrency_from_env()?.unwrap_or(index + 1);
            let mut worker = Worker::with_channel(channel, index, concurrency);
            if let Some(listener) = listener {
                worker.kernel = Some(KernelListener::new(listener, worker.channel.as_fd())?);
            }
            worker.send(&Message::Hello { index, pid: std::process::id() })?;
            Ok(worker)
        } else if let Some(path) = std::env::var_os(ENV_SOCKET) {
            Worker::attach(Path::new(&path), index_from_env()?)
        } else {
            Err(Error::Environment(format!(
                "neither {ENV_CHANNEL_FD} nor {ENV_SOCKET} is set (start this program through sticky-cluster)"
            )))
        }
    }

    /// Dials a master's attach socket and claims `index` (or any free index); waits for the answer.
    pub fn attach(path: &Path, index: Option<u32>) -> Result<Worker> {
        let attach_error = |reason: String| Error::Attach { path: path.to_path_buf(), reason };
        let channel = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| attach_error(format!("socket: {e}")))?;
        let address = UnixAddr::new(path).map_err(|e| attach_error(e.to_string()))?;
        socket::connect(channel.as_raw_fd(), &address).map_err(|e| attach_error(e.desc().to_string()))?;
        let claim = index.unwrap_or(ANY_INDEX);
        let hello = Message::Hello { index: claim, pid: std::process::id() };
        // A master that refuses before reading the hello (a uid check) has closed its end already:
        // its refusal is still waiting to be read, and says more than the failed send.
        let sent = send_message(channel.as_fd(), &hello, None, false);
        let mut listener = None;
        loop {
            let received = recv_message(channel.as_fd(), sent.is_err());
            return match received {
                Ok(Received { message: Message::Listener, fd }) => {
                    // Kernel routing: the listener comes just before the welcome.
                    listener = fd;
                    continue;
                }
                Ok(received) => match received.message {
                    Message::Welcome { index, concurrency } => {
                        // Then the worker's end of its own channel; the attach connection stays open so
                        // the master learns when this process is gone.
                        let own = match recv_message(channel.as_fd(), false) {
                            Ok(Received { message: Message::Channel, fd: Some(own) }) => own,
                            Ok(other) => {
                                let got = format!("{:?}", other.message);
                                return Err(attach_error(format!("expected the channel after the welcome, got {got}")));
                            }
                            Err(error) => return Err(attach_error(error.to_string())),
                        };
                        let mut worker = Worker::with_channel(own, index, concurrency);
                        worker.attach_link = Some(channel);
                        if let Some(listener) = listener {
                            let kernel = KernelListener::new(listener, worker.channel.as_fd())
                                .map_err(|e| attach_error(e.to_string()))?;
                            worker.kernel = Some(kernel);
                        }
                        Ok(worker)
                    }
                    Message::Refused { reason } => Err(attach_error(format!("refused: {reason}"))),
                    other => Err(attach_error(format!("unexpected answer {other:?}"))),
                },
                Err(error) => match sent {
                    Err(errno) => Err(attach_error(format!("send hello: {}", errno.desc()))),
                    Ok(()) if matches!(error, Error::ChannelClosed) => {
                        Err(attach_error("the master closed the socket".into()))
                    }
                    Ok(()) => Err(attach_error(error.to_string())),
                },
            };
        }
    }

    fn with_channel(channel: OwnedFd, index: u32, concurrency: u32) -> Worker {
        Worker {
            index,
            concurrency,
            channel,
            attach_link: None,
            ready_sent: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            shutdown_deadline_ms: AtomicU64::new(NOT_SHUTTING_DOWN),
            async_channel: OnceLock::new(),
            kernel: None,
            at_fd_limit: std::sync::Mutex::new(None),
        }
    }

    /// This worker's index: stays the same through death and revival.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many workers the cluster has.
    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }

    /// The fd to poll: readable when a connection (or shutdown) is waiting, for poll/epoll loops. With
    /// `routing: kernel` an epoll fd watching the channel and (once ready) the listener.
    pub fn channel_fd(&self) -> BorrowedFd<'_> {
        match &self.kernel {
            Some(kernel) => kernel.poll.as_fd(),
            None => self.channel.as_fd(),
        }
    }

    /// `routing: kernel`: this worker's own listener (the master keeps a copy), for servers that accept
    /// natively instead of through [`Worker::accept`]; `None` in handoff mode.
    pub fn listen_fd(&self) -> Option<BorrowedFd<'_>> {
        self.kernel.as_ref().map(|kernel| kernel.listener.as_fd())
    }

    /// `routing: kernel`: the backlog the master listened with (as the kernel holds it, `somaxconn` applied),
    /// for runtimes that call `listen` again on an inherited listener (Node does, with 511 unless told);
    /// `None` in handoff mode.
    pub fn listen_backlog(&self) -> Result<Option<u32>> {
        self.kernel.as_ref().map(|kernel| kernel.backlog()).transpose()
    }

    /// Tells the master initialisation is done; connections queued for this index start to flow.
    /// Calling it again does nothing.
    pub fn ready(&self) -> Result<()> {
        if self.ready_sent.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(kernel) = &self.kernel {
            // From now on a waiting client wakes the poll fd; until now it waited in the kernel.
            kernel.watch(kernel.listener.as_raw_fd())?;
        }
        self.send(&Message::Ready)
    }

    /// `routing: kernel`, for servers that accept from [`Worker::listen_fd`] themselves: blocks until the
    /// master's shutdown message (`Ok`, then drain with [`Worker::try_accept`]) or the end of the channel
    /// ([`Error::ChannelClosed`], also after [`Worker::stop_accepting`]). Takes nothing from the listener.
    pub fn wait_for_shutdown(&self) -> Result<()> {
        loop {
            if self.shutdown_deadline_ms().is_some() {
                return Ok(());
            }
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::ChannelClosed);
            }
            let received = recv_message(self.channel.as_fd(), false)?;
            match received.message {
                Message::Shutdown { deadline_ms } => {
                    self.shutdown_deadline_ms.store(deadline_ms.min(NOT_SHUTTING_DOWN - 1), Ordering::SeqCst);
                }
                Message::Welcome { .. } => {}
                Message::Stopped => return Err(self.stopped_for_good()),
                other => return Err(Error::Protocol(format!("unexpected message from the master: {other:?}"))),
            }
        }
    }

    /// The master's `stopped` arrived: from now on every receive reports the end of the channel.
    fn stopped_for_good(&self) -> Error {
        self.stopped.store(true, Ordering::SeqCst);
        Error::ChannelClosed
    }

    /// Milliseconds the master granted for draining, once it has asked this worker to shut down.
    pub fn shutdown_deadline_ms(&self) -> Option<u64> {
        match self.shutdown_deadline_ms.load(Ordering::SeqCst) {
            NOT_SHUTTING_DOWN => None,
            deadline => Some(deadline),
        }
    }

    fn send(&self, message: &Message) -> Result<()> {
        send_message(self.channel.as_fd(), message, None, false).map_err(|errno| match errno {
            nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET => Error::ChannelClosed,
            errno => Error::io("send to the master", errno),
        })
    }

    /// Waits for the next routed connection, blocking the thread (unless the channel fd was made
    /// non-blocking: then [`Error::WouldBlock`] when none waits). [`Error::Shutdown`] means drain and exit;
    /// [`Error::ChannelClosed`] means the master is gone.
    ///
    /// At the open-file limit the next connection stays in the channel (where the master's queue and
    /// redirect rules apply to what follows) and this waits, looking again after 10 ms, doubling up to
    /// 1 s, until an fd is free; one line on stderr says so. With a non-blocking channel fd it returns
    /// that error instead ([`crate::protocol::is_fd_limit`]).
    pub fn accept_blocking(&self) -> Result<Connection> {
        let mut attempt = 0;
        loop {
            let next = match &self.kernel {
                Some(kernel) => self.kernel_connection(kernel, !kernel.poll_nonblocking()),
                None => self.next_connection(|| recv_message(self.channel.as_fd(), false)),
            };
            match next {
                Err(error) if is_fd_limit(&error) && !self.channel_nonblocking() => {
                    std::thread::sleep(self.wait_at_fd_limit(attempt));
                    attempt += 1;
                }
                other => return self.fd_limit_over(other),
            }
        }
    }

    /// Whether the fd returned by [`Worker::channel_fd`] was made non-blocking by the caller.
    fn channel_nonblocking(&self) -> bool {
        if let Some(kernel) = &self.kernel {
            return kernel.poll_nonblocking();
        }
        nix::fcntl::fcntl(&self.channel, nix::fcntl::FcntlArg::F_GETFL)
            .is_ok_and(|flags| nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK))
    }

    /// At the open-file limit: says so on stderr once per episode; how long to wait before looking again.
    fn wait_at_fd_limit(&self, attempt: u32) -> Duration {
        let mut episode = self.at_fd_limit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        match episode.as_mut() {
            Some(episode) => {
                episode.last_wait = now;
                episode.waits += 1;
            }
            None => {
                *episode = Some(FdLimitEpisode { since: now, last_wait: now, waits: 1 });
                let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .map_or_else(|_| "?".to_string(), |(soft, _)| soft.to_string());
                eprintln!(
                    "sticky-cluster: worker {} (pid {}) is at its open-file limit ({limit}): connections wait in \
                     its channel until this process closes fds",
                    self.index,
                    std::process::id()
                );
            }
        }
        Duration::from_millis(10u64 << attempt.min(7)).min(Duration::from_secs(1))
    }

    /// Ends an episode at the open-file limit (with a line on stderr) once receives went through for a
    /// second without meeting it: a worker that serves right at its limit is one episode, not one per fd.
    fn fd_limit_over<T>(&self, result: Result<T>) -> Result<T> {
        if result.as_ref().is_err_and(is_fd_limit) {
            return result;
        }
        let mut episode = self.at_fd_limit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if episode.as_ref().is_some_and(|episode| episode.last_wait.elapsed() >= Duration::from_secs(1)) {
            if let Some(over) = episode.take() {
                eprintln!(
                    "sticky-cluster: worker {} (pid {}) receives connections again, after {:.1}s at its open-file \
                     limit ({} waits)",
                    self.index,
                    std::process::id(),
                    over.last_wait.duration_since(over.since).as_secs_f64(),
                    over.waits
                );
            }
        }
        result
    }

    /// Stops taking connections, from any thread: a blocked or later `accept` still gets what the
    /// channel (with `routing: kernel`, the accept queue) already holds, then [`Error::ChannelClosed`]. The
    /// master is told (a `stopping` message): it routes nothing more here, queues this index's next
    /// connections for its successor, and answers `stopped` after the last one it sent. Calling it again
    /// does nothing.
    pub fn stop_accepting(&self) -> Result<()> {
        if let Some(kernel) = &self.kernel {
            kernel.stopped.store(true, Ordering::SeqCst);
        }
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        match self.send(&Message::Stopping) {
            // A master that is gone has nothing more to send either.
            Ok(()) | Err(Error::ChannelClosed) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Takes a connection that is already waiting, never blocking (whatever the channel fd's mode):
    /// [`Error::WouldBlock`] when none is. A worker that got SIGTERM drains its channel with this, since
    /// the master sends the shutdown message before the signal.
    ///
    /// At the open-file limit the connection stays in the channel and this says so
    /// ([`crate::protocol::is_fd_limit`]): try again once an fd is free.
    pub fn try_accept(&self) -> Result<Connection> {
        if let Some(kernel) = &self.kernel {
            return self.kernel_connection(kernel, false);
        }
        self.next_connection(|| recv_message(self.channel.as_fd(), true))
    }

    /// Waits for the next routed connection on the tokio reactor; the stream comes back non-blocking,
    /// with the client's address, like `tokio::net::TcpListener::accept`.
    ///
    /// At the open-file limit the next connection stays in the channel and this waits for a free fd, as
    /// [`Worker::accept_blocking`] does (the wait runs on tokio's blocking pool, so a runtime without
    /// timers works too).
    pub async fn accept(&self) -> Result<(tokio::net::TcpStream, SocketAddr)> {
        let channel = self.async_channel()?;
        let mut attempt = 0;
        let connection = loop {
            let mut guard = channel.readable().await.map_err(|e| Error::io("wait on the channel", e))?;
            let next = match &self.kernel {
                Some(kernel) => self.kernel_connection(kernel, false),
                None => self.next_connection(|| recv_message(self.channel.as_fd(), true)),
            };
            match next {
                Err(Error::WouldBlock) => guard.clear_ready(),
                Err(error) if is_fd_limit(&error) => {
                    drop(guard);
                    let wait = self.wait_at_fd_limit(attempt);
                    attempt += 1;
                    tokio::task::spawn_blocking(move || std::thread::sleep(wait))
                        .await
                        .map_err(|e| Error::io("wait for a free fd", std::io::Error::other(e)))?;
                }
                other => break self.fd_limit_over(other)?,
            }
        };
        connection.stream.set_nonblocking(true).map_err(|e| Error::io("set the connection non-blocking", e))?;
        let stream = tokio::net::TcpStream::from_std(connection.stream)
            .map_err(|e| Error::io("register the connection with tokio", e))?;
        Ok((stream, connection.peer))
    }

    fn async_channel(&self) -> Result<&AsyncFd<ChannelFd>> {
        if let Some(channel) = self.async_channel.get() {
            return Ok(channel);
        }
        // SAFETY: the Worker owns the channel fd and outlives this AsyncFd (a field of the same Worker),
        // so the number stays open and names the same socket while registered.
        let channel = unsafe {
            AsyncFd::register_with_interest(ChannelFd(self.channel_fd().as_raw_fd()), tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::io("register the channel with tokio", e))?;
        let _ = self.async_channel.set(channel);
        Ok(self.async_channel.get().expect("just set"))
    }

    fn next_connection(&self, mut receive: impl FnMut() -> Result<crate::protocol::Received>) -> Result<Connection> {
        if self.shutdown_deadline_ms().is_some() {
            return Err(Error::Shutdown);
        }
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::ChannelClosed);
        }
        loop {
            let received = receive()?;
            match (received.message, received.fd) {
                (Message::Connection { peer, local }, Some(fd)) => {
                    let stream = std::net::TcpStream::from(fd);
                    // The master sends its listener's address (`[::]:port` on a dual-stack listener): the
                    // connection's own local address is read here, where it costs the master nothing.
                    let local = stream.local_addr().unwrap_or(local);
                    return Ok(Connection { stream, peer, local });
                }
                (Message::Shutdown { deadline_ms }, _) => {
                    self.shutdown_deadline_ms.store(deadline_ms.min(NOT_SHUTTING_DOWN - 1), Ordering::SeqCst);
                    return Err(Error::Shutdown);
                }
                (Message::Welcome { .. }, _) => continue,
                (Message::Stopped, _) => return Err(self.stopped_for_good()),
                (other, _) => return Err(Error::Protocol(format!("unexpected message from the master: {other:?}"))),
            }
        }
    }
}

fn index_from_env() -> Result<Option<u32>> {
    let Some((name, value)) = [ENV_WORKER_INDEX, ENV_WORKER_INDEX_COMPAT]
        .iter()
        .find_map(|name| std::env::var(name).ok().map(|value| (*name, value)))
    else {
        return Ok(None);
    };
    value.trim().parse().map(Some).map_err(|_| Error::Environment(format!("{name}={value:?} is not a worker index")))
}

fn concurrency_from_env() -> Result<Option<u32>> {
    match std::env::var(ENV_CONCURRENCY) {
        Err(_) => Ok(None),
        Ok(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Environment(format!("{ENV_CONCURRENCY}={value:?} is not a number"))),
    }
}

/// Checks that the fd number names an AF_UNIX SOCK_SEQPACKET socket before trusting it, then owns it.
fn inherited_channel(fd_text: &str) -> Result<OwnedFd> {
    inherited_socket(ENV_CHANNEL_FD, fd_text, "the channel", |fd| {
        let kind = socket::getsockopt(&fd, sockopt::SockType).map_err(|_| "not a socket")?;
        let family = socket::getsockname::<UnixAddr>(fd.as_raw_fd()).ok().and_then(|a| a.family());
        if kind != SockType::SeqPacket || family != Some(AddressFamily::Unix) {
            return Err("not a Unix SOCK_SEQPACKET channel");
        }
        Ok(())
    })
}

/// The listenfd way for an fd number named by `variable`: an open socket that passes `check` (the kind
/// of socket expected), made close-on-exec, then owned. Every refusal names the variable and its value.
fn inherited_socket(
    variable: &str,
    fd_text: &str,
    what: &str,
    check: impl FnOnce(BorrowedFd<'_>) -> std::result::Result<(), &'static str>,
) -> Result<OwnedFd> {
    let wrong = |why: &str| Error::Environment(format!("{variable}={fd_text}: {why}"));
    let fd: RawFd = fd_text.trim().parse().map_err(|_| wrong("not a file descriptor number"))?;
    if fd < 0 {
        return Err(wrong("not a file descriptor number"));
    }
    // SAFETY: fstat only reads the descriptor table; an unknown number answers EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(wrong("not an open file descriptor"));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(wrong("not a socket"));
    }
    // SAFETY: the fd is open and is a socket; it was inherited for us alone (the master made it for this process).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check(borrowed).map_err(wrong)?;
    nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| Error::io(format!("set FD_CLOEXEC on {what}"), e))?;
    // SAFETY: checked above; from here the Worker is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{recv_message, send_message};
    use nix::sys::socket::socketpair;

    /// A handoff-mode worker of index 0 and the master's end of its channel (also for `kernel`'s tests).
    pub(super) fn worker_and_master() -> (Worker, OwnedFd) {
        let (master, worker) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        (Worker::with_channel(worker, 0, 1), master)
    }

    fn send_connection(master: &OwnedFd) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let message = Message::Connection { peer: client.local_addr().unwrap(), local: listener.local_addr().unwrap() };
        send_message(master.as_fd(), &message, Some(client.as_fd()), false).unwrap();
    }

    #[test]
    fn stop_accepting_delivers_what_waits_then_reports_the_end() {
        let (worker, master) = worker_and_master();
        send_connection(&master);
        worker.stop_accepting().unwrap();
        worker.stop_accepting().unwrap();
        // The master hears it once, and answers after the last connection it sent.
        assert_eq!(recv_message(master.as_fd(), true).unwrap().message, Message::Stopping);
        assert!(matches!(recv_message(master.as_fd(), true), Err(Error::WouldBlock)));
        send_message(master.as_fd(), &Message::Stopped, None, false).unwrap();
        assert!(worker.accept_blocking().is_ok(), "the connection already in the channel still arrives");
        assert!(matches!(worker.accept_blocking(), Err(Error::ChannelClosed)));
        assert!(matches!(worker.try_accept(), Err(Error::ChannelClosed)), "the end sticks");
    }

    #[test]
    fn shutdown_is_reported_and_sticks() {
        let (worker, master) = worker_and_master();
        send_message(master.as_fd(), &Message::Shutdown { deadline_ms: 1500 }, None, false).unwrap();
        assert!(matches!(worker.accept_blocking(), Err(Error::Shutdown)));
        assert_eq!(worker.shutdown_deadline_ms(), Some(1500));
        assert!(matches!(worker.try_accept(), Err(Error::Shutdown)), "later calls say so at once");
    }

    #[test]
    fn an_inherited_fd_is_checked_before_it_is_trusted() {
        let message = |text: &str| inherited_channel(text).unwrap_err().to_string();
        assert!(message("five").ends_with("STICKY_CLUSTER_FD=five: not a file descriptor number"));
        assert!(message("999999").ends_with("not an open file descriptor"));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(message(&file.as_raw_fd().to_string()).ends_with("not a socket"));
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(message(&stream.as_raw_fd().to_string()).ends_with("not a Unix SOCK_SEQPACKET channel"));
    }

    #[test]
    fn try_accept_never_blocks() {
        let (worker, master) = worker_and_master();
        assert!(matches!(worker.try_accept(), Err(Error::WouldBlock)));
        send_connection(&master);
        assert!(worker.try_accept().is_ok());
    }
}
