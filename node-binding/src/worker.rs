//! The worker side inside a re-launched Node process: join the cluster from the environment, say ready,
//! and run one plain thread that blocks on the channel and hands each routed fd to JS.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::Unknown;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use sticky_cluster::hash::node_address_text;
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

type ConnectionCallback = ThreadsafeFunction<RoutedConnection, Unknown<'static>, RoutedConnection, Status, false>;
type EndCallback = ThreadsafeFunction<WorkerEnd, Unknown<'static>, WorkerEnd, Status, false>;

/// This process's membership in the cluster, as JS holds it.
#[napi]
pub struct WorkerHandle {
    worker: Arc<Worker>,
    started: AtomicBool,
}

/// Joins the cluster this process was started for (`STICKY_CLUSTER_FD` or `STICKY_CLUSTER_SOCKET`);
/// throws one clear line when the environment does not name a channel.
#[napi]
pub fn open_worker() -> napi::Result<WorkerHandle> {
    let worker = Worker::from_env().map_err(|e| napi::Error::from_reason(e.to_string()))?;
    Ok(WorkerHandle { worker: Arc::new(worker), started: AtomicBool::new(false) })
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

    /// Starts the accept thread: `on_connection` for every routed connection, then `on_end` once when
    /// the channel says shutdown or closes. Both callbacks keep the event loop alive until then.
    #[napi]
    pub fn start(&self, on_connection: ConnectionCallback, on_end: EndCallback) -> napi::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(napi::Error::from_reason("the worker's accept thread is already running"));
        }
        let worker = self.worker.clone();
        std::thread::Builder::new()
            .name("sticky-cluster-accept".into())
            .spawn(move || accept_loop(&worker, on_connection, on_end))
            .map_err(|e| napi::Error::from_reason(format!("start the accept thread: {e}")))?;
        Ok(())
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

/// Blocks on the channel and hands every connection to JS; ends (dropping both callbacks, so the
/// worker can exit) at shutdown, end of channel or an error.
fn accept_loop(worker: &Worker, on_connection: ConnectionCallback, on_end: EndCallback) {
    if worker.listen_fd().is_some() {
        // Kernel routing: Node accepts from the listener itself; this thread only waits for the shutdown,
        // then takes what is still in the accept queue (JS closes its server on `onEnd`, after this).
        if let Err(error) = worker.wait_for_shutdown() {
            let reason = if matches!(error, Error::ChannelClosed) { "closed" } else { "error" };
            drop(on_connection);
            on_end.call(
                WorkerEnd { reason: reason.into(), message: error.to_string(), deadline_ms: None },
                ThreadsafeFunctionCallMode::Blocking,
            );
            return;
        }
    }
    let end = loop {
        match worker.accept_blocking() {
            Ok(connection) => {
                let canonical = |address: SocketAddr| (address.ip().to_canonical(), address.port());
                let proxied =
                    connection.stream.peer_addr().is_ok_and(|tcp| canonical(tcp) != canonical(connection.peer));
                let routed = RoutedConnection {
                    fd: connection.stream.into_raw_fd(),
                    remote_address: node_address_text(connection.peer.ip()),
                    remote_port: u32::from(connection.peer.port()),
                    local_address: node_address_text(connection.local.ip()),
                    local_port: u32::from(connection.local.port()),
                    proxied,
                };
                let fd = routed.fd;
                if on_connection.call(routed, ThreadsafeFunctionCallMode::Blocking) != Status::Ok {
                    // JS is going away and will never own this fd: close it here.
                    // SAFETY: the fd came from into_raw_fd above and nothing else holds it.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            Err(Error::Shutdown) => {
                break WorkerEnd {
                    reason: "shutdown".into(),
                    message: Error::Shutdown.to_string(),
                    deadline_ms: worker.shutdown_deadline_ms().map(|ms| ms as f64),
                }
            }
            Err(Error::ChannelClosed) => {
                break WorkerEnd {
                    reason: "closed".into(),
                    message: Error::ChannelClosed.to_string(),
                    deadline_ms: None,
                }
            }
            Err(error) => break WorkerEnd { reason: "error".into(), message: error.to_string(), deadline_ms: None },
        }
    };
    drop(on_connection);
    on_end.call(end, ThreadsafeFunctionCallMode::Blocking);
}
