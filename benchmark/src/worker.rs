//! The benchmark's own Rust workers: the hello-worker's reply (or a push stream after an upgrade) behind the
//! sticky-cluster master or accepting on an SO_REUSEPORT port (shared: the no-master limit; its own: behind a
//! proxy), as a tokio task per connection or a minimal blocking accept loop.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use sticky_cluster::hash::node_address_text;
use sticky_cluster::{Error, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where connections come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Our own listener on `[::]:port`, shared with the other direct workers through SO_REUSEPORT.
    Direct {
        /// The port every direct worker binds.
        port: u16,
    },
    /// The sticky-cluster master, through the channel in STICKY_CLUSTER_FD.
    Master,
}

/// How connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A current-thread tokio runtime and a task per connection, like the hello-worker.
    Tokio,
    /// One thread: accept, read the head, answer, close, next.
    Blocking,
}

/// The largest request head a worker reads before giving up on a client.
const MAX_HEAD: usize = 64 * 1024;

/// Runs a worker until the master shuts it down or a signal ends it.
pub fn run(source: Source, style: Style) -> Result<(), String> {
    match (source, style) {
        (Source::Direct { port }, Style::Blocking) => {
            let index = index_from_env();
            let listener = reuseport_listener(port)?;
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => answer_blocking(stream, peer, index),
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => return Err(format!("accept failed: {error}")),
                }
            }
        }
        (Source::Master, Style::Blocking) => {
            let worker = Worker::from_env().map_err(|e| e.to_string())?;
            worker.ready().map_err(|e| e.to_string())?;
            loop {
                match worker.accept_blocking() {
                    Ok(connection) => answer_blocking(connection.stream, connection.peer, worker.index()),
                    Err(Error::Shutdown | Error::ChannelClosed) => return Ok(()),
                    Err(error) => return Err(error.to_string()),
                }
            }
        }
        (source, Style::Tokio) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            runtime.block_on(run_tokio(source))
        }
    }
}

async fn run_tokio(source: Source) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut requests = tokio::task::JoinSet::new();
    match source {
        Source::Direct { port } => {
            let index = index_from_env();
            let listener = reuseport_listener(port)?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => { requests.spawn(answer(stream, peer, index)); }
                        Err(error) => return Err(format!("accept failed: {error}")),
                    },
                    _ = terminate.recv() => return Ok(()),
                    Some(_) = requests.join_next(), if !requests.is_empty() => {}
                }
            }
        }
        Source::Master => {
            let worker = Worker::from_env().map_err(|e| e.to_string())?;
            worker.ready().map_err(|e| e.to_string())?;
            loop {
                tokio::select! {
                    accepted = worker.accept() => match accepted {
                        Ok((stream, peer)) => { requests.spawn(answer(stream, peer, worker.index())); }
                        Err(Error::Shutdown | Error::ChannelClosed) => return Ok(()),
                        Err(error) => return Err(error.to_string()),
                    },
                    _ = terminate.recv() => return Ok(()),
                    Some(_) = requests.join_next(), if !requests.is_empty() => {}
                }
            }
        }
    }
}

/// BENCH_WORKER_INDEX, set by the driver for direct workers (the master's workers learn it from the master).
fn index_from_env() -> u32 {
    std::env::var("BENCH_WORKER_INDEX").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A dual-stack `[::]:port` listener with SO_REUSEPORT, so that IPv4 clients read `::ffff:a.b.c.d` exactly as
/// they do through the master, and several direct workers can share the port.
pub fn reuseport_listener(port: u16) -> Result<TcpListener, String> {
    let address = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let fail = |what: &str, e: std::io::Error| format!("cannot {what} [::]:{port}: {e}");
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).map_err(|e| fail("open", e))?;
    socket.set_only_v6(false).map_err(|e| fail("make dual-stack", e))?;
    socket.set_reuse_address(true).map_err(|e| fail("reuse", e))?;
    socket.set_reuse_port(true).map_err(|e| fail("share", e))?;
    socket.bind(&address.into()).map_err(|e| fail("bind", e))?;
    socket.listen(1024).map_err(|e| fail("listen on", e))?;
    Ok(socket.into())
}

/// The hello-worker's reply, byte for byte.
pub fn reply(index: u32, peer: SocketAddr) -> String {
    let body = format!(
        "{{\"worker\":{index},\"pid\":{},\"remote\":\"{}\"}}\n",
        std::process::id(),
        node_address_text(peer.ip())
    );
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The `Upgrade:` value that turns a connection into a push stream (the `stream` benchmark), the way a
/// websocket upgrades: a proxy that forwards websockets forwards this too.
pub const STREAM_UPGRADE: &str = "bench-stream";

/// Bytes per write of a push stream.
const STREAM_CHUNK: usize = 64 * 1024;

/// The reply to a stream request: 101, then one JSON line naming the worker and the peer it sees; the data
/// follows.
pub fn stream_head(index: u32, peer: SocketAddr) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {STREAM_UPGRADE}\r\nConnection: Upgrade\r\n\r\n{{\"worker\":{index},\"pid\":{},\"remote\":\"{}\"}}\n",
        std::process::id(),
        node_address_text(peer.ip())
    )
}

fn wants_stream(head: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.contains(&format!("\r\nupgrade: {STREAM_UPGRADE}\r\n"))
}

fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n")
}

async fn answer(mut stream: tokio::net::TcpStream, peer: SocketAddr, index: u32) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head_complete(&head) {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || head.len() > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    if wants_stream(&head) {
        // Push until the client goes away: the write fails then, which ends the task.
        stream.write_all(stream_head(index, peer).as_bytes()).await?;
        let chunk = vec![b'x'; STREAM_CHUNK];
        loop {
            stream.write_all(&chunk).await?;
        }
    }
    stream.write_all(reply(index, peer).as_bytes()).await?;
    stream.shutdown().await
}

fn answer_blocking(mut stream: TcpStream, peer: SocketAddr, index: u32) {
    // A stalled client must not stop the only thread for long.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head_complete(&head) {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) if head.len() + read > MAX_HEAD => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    let _ = stream.write_all(reply(index, peer).as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}
