//! The worker side inside a re-launched Node process: join the cluster from the environment, say ready,
//! and run one plain thread that watches the channel and wakes JS, which takes each routed fd itself.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use napi::bindgen_prelude::Unknown;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use sticky_cluster::hash::node_address_text;
use sticky_cluster::worker::Connection;
use sticky_cluster::{Error, Worker};

/// A client connection routed to this worker: its fd (now owned by JS) and both ends' addresses.
#[napi(object)]
pub struct RoutedConnection {
    /// The socket's fd, for `new net.Socket({ fd })`.
    pub fd: i32,
    /// The client's address as Node prints `remoteAddress` (the text the routing hash was computed from).
    pub remote_address: String,
    /// The client's port.
    pub remote_port: u32,
    /// The address the client connected to.
    pub local_address: String,
    /// The port the client connected to.
    pub local_port: u32,
    /// The client's address came from a trusted balancer's PROXY header or `X-Forwarded-For`, so the
    /// socket's own peer is the balancer.
    pub proxied: bool,
}

/// Why the accept thread ended, handed to `onEnd` once.
#[napi(object)]
pub struct WorkerEnd {
    /// `shutdown` (the master asks to drain and exit), `closed` (channel gone or `stop()`), or `error`.
    pub reason: String,
    /// A human-readable line for logs.
    pub message: String,
    /// Milliseconds the master granted for draining, when it asked for shutdown.
    pub deadline_ms: Option<f64>,
}

/// What [`WorkerHandle::take`] hands JS: the next routed connection, or the end of the channel.
#[napi(object)]
pub struct Taken {
    /// A connection that was waiting in the channel.
    pub connection: Option<RoutedConnection>,
    /// The channel has ended (shutdown, closed, error): nothing more will come.
    pub end: Option<WorkerEnd>,
}

/// Called on the event loop when the channel has something to take; no payload.
type WakeCallback = ThreadsafeFunction<(), Unknown<'static>, (), Status, false>;

/// Where the watcher thread is between wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// JS was woken and takes what waits; the thread waits for it to find the channel empty.
    Taking,
    /// JS found the channel empty: watch it again.
    Rearmed,
    /// The channel has ended: the thread lets go of the event loop.
    Ended,
}

/// Shared by the watcher thread and the JS calls.
#[derive(Debug)]
struct WatchState {
    watch: Mutex<Watch>,
    changed: Condvar,
    /// Why the watcher itself stopped (a failed poll or wait), told to JS by the next `take`.
    failure: Mutex<Option<String>>,
}

impl WatchState {
    fn set(&self, watch: Watch) {
        let mut current = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != Watch::Ended {
            *current = watch;
        }
        self.changed.notify_all();
    }
}

/// This process's membership in the cluster, as JS holds it.
#[napi]
pub struct WorkerHandle {
    worker: Arc<Worker>,
    started: AtomicBool,
    state: Arc<WatchState>,
}

/// Joins the cluster this process was started for (`STICKY_CLUSTER_FD` or `STICKY_CLUSTER_SOCKET`);
/// throws one clear line when the environment does not name a channel.
#[napi]
pub fn open_worker() -> napi::Result<WorkerHandle> {
    let worker = Worker::from_env().map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let state = WatchState { watch: Mutex::new(Watch::Rearmed), changed: Condvar::new(), failure: Mutex::new(None) };
    Ok(WorkerHandle { worker: Arc::new(worker), started: AtomicBool::new(false), state: Arc::new(state) })
}
#[napi]
impl WorkerHandle {
    /// This worker's index: the same through death and revival.
    #[napi(getter)]
    pub fn index(&self) -> u32 {
        self.worker.index()
    }

    /// How many workers the cluster has.
    #[napi(getter)]
    pub fn concurrency(&self) -> u32 {
        self.worker.concurrency()
    }

    /// `routing: kernel`: a duplicate of this worker's own listener for `server.listen({ fd })` (Node then
    /// accepts natively and owns this copy); `null` in handoff mode.
    #[napi(getter)]
    pub fn listen_fd(&self) -> napi::Result<Option<i32>> {
        let Some(listener) = self.worker.listen_fd() else { return Ok(None) };
        let copy =
            listener.try_clone_to_owned().map_err(|e| napi::Error::from_reason(format!("dup the listener: {e}")))?;
        Ok(Some(copy.into_raw_fd()))
    }

    /// `routing: kernel`: the backlog the master listened with, for `server.listen({ fd }, backlog)` (Node
    /// would listen again with 511); `null` in handoff mode.
    #[napi(getter)]
    pub fn listen_backlog(&self) -> napi::Result<Option<u32>> {
        self.worker.listen_backlog().map_err(|e| napi::Error::from_reason(e.to_string()))
    }

    /// Tells the master the server is set up; connections queued for this index start to flow.
    #[napi]
    pub fn ready(&self) -> napi::Result<()> {
        self.worker.ready().map_err(|e| napi::Error::from_reason(e.to_string()))
    }

    /// Starts watching the channel: `on_readable` runs on the event loop whenever connections (or the
    /// end) wait, and JS then calls [`WorkerHandle::take`] until it returns null. Nothing is received
    /// from the channel but by `take`, so a worker whose event loop is blocked leaves its connections in
    /// the channel, where the master sees them wait (and takes them back if this process dies). The
    /// callback keeps the event loop alive until `take` has returned the end.
    #[napi]
    pub fn start(&self, on_readable: WakeCallback) -> napi::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(napi::Error::from_reason("the worker's channel is already watched"));
        }
        let (worker, state) = (self.worker.clone(), self.state.clone());
        std::thread::Builder::new()
            .name("sticky-cluster-watch".into())
            .spawn(move || watch_channel(&worker, &state, on_readable))
            .map_err(|e| napi::Error::from_reason(format!("start the channel watcher: {e}")))?;
        Ok(())
    }

    /// The next routed connection, never blocking: `{ connection }`, `{ end }` once the channel has
    /// ended (shutdown, closed, error), or null when nothing waits (the watcher then wakes JS again).
    #[napi]
    pub fn take(&self) -> Option<Taken> {
        let end = |reason: &str, message: String, deadline_ms: Option<f64>| {
            self.state.set(Watch::Ended);
            Some(Taken { connection: None, end: Some(WorkerEnd { reason: reason.into(), message, deadline_ms }) })
        };
        match self.worker.try_accept() {
            Ok(connection) => Some(Taken { connection: Some(routed(connection)), end: None }),
            Err(Error::WouldBlock) => {
                let failure = self.state.failure.lock().unwrap_or_else(PoisonError::into_inner).take();
                match failure {
                    Some(message) => end("error", message, None),
                    None => {
                        self.state.set(Watch::Rearmed);
                        None
                    }
                }
            }
            Err(Error::Shutdown) => {
                end("shutdown", Error::Shutdown.to_string(), self.worker.shutdown_deadline_ms().map(|ms| ms as f64))
            }
            Err(Error::ChannelClosed) => end("closed", Error::ChannelClosed.to_string(), None),
            Err(error) => end("error", error.to_string(), None),
        }
    }

    /// Stops taking connections: the channel's read side is shut, so the accept thread meets end of
    /// channel, calls `onEnd` and lets the event loop go. The master sends this index's next
    /// connections to its queue (and revives or redirects as usual).
    #[napi]
    pub fn stop(&self) {
        // Only fails on a channel that is already gone, which is the state this asks for.
        let _ = self.worker.stop_accepting();
    }
}

/// The watcher thread: waits until the channel has something to take, wakes JS, and waits for JS to
/// have taken all of it before it watches again, so it never receives anything itself. Ends (dropping
/// the callback, so the worker can exit) once `take` has returned the end.
fn watch_channel(worker: &Worker, state: &WatchState, on_readable: WakeCallback) {
    if worker.listen_fd().is_some() {
        // Kernel routing: Node accepts from the listener itself; the channel carries only the shutdown,
        // after which `take` drains what is still in the accept queue (JS closes its server on the end).
        if let Err(error) = worker.wait_for_shutdown() {
            if !matches!(error, Error::ChannelClosed) {
                *state.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
            }
        }
    } else if let Err(error) = wait_readable(worker.channel_fd().as_raw_fd()) {
        *state.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
    loop {
        state.set(Watch::Taking);
        if on_readable.call((), ThreadsafeFunctionCallMode::Blocking) != Status::Ok {
            // The environment is going away: nobody will take anything any more.
            return;
        }
        let mut watch = state.watch.lock().unwrap_or_else(PoisonError::into_inner);
        while *watch == Watch::Taking {
            watch = state.changed.wait(watch).unwrap_or_else(PoisonError::into_inner);
        }
        if *watch == Watch::Ended {
            return;
        }
        drop(watch);
        if let Err(error) = wait_readable(worker.channel_fd().as_raw_fd()) {
            *state.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        }
    }
}

/// Blocks until `fd` is readable, hung up or in error (each of which `take` then reports).
fn wait_readable(fd: RawFd) -> Result<(), String> {
    loop {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the worker's own open channel fd, no timeout.
        if unsafe { libc::poll(&mut poll, 1, -1) } >= 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait on the channel: {error}"));
        }
    }
}

/// A received connection as JS gets it: the fd (owned by JS from now on) and both ends' addresses.
fn routed(connection: Connection) -> RoutedConnection {
    let canonical = |address: SocketAddr| (address.ip().to_canonical(), address.port());
    let proxied = connection.stream.peer_addr().is_ok_and(|tcp| canonical(tcp) != canonical(connection.peer));
    RoutedConnection {
        remote_address: node_address_text(connection.peer.ip()),
        remote_port: u32::from(connection.peer.port()),
        local_address: node_address_text(connection.local.ip()),
        local_port: u32::from(connection.local.port()),
        proxied,
        fd: connection.stream.into_raw_fd(),
    }
}
