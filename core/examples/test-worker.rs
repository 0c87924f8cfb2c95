//! A worker for the integration tests: hello-worker's answer plus knobs (slow init, crash, ignore
//! SIGTERM, slow requests) set through environment variables, and facts the tests check.
//!
//! - `TEST_INIT_DELAY_MS`: sleep before `ready()` (only for `TEST_SLOW_INDEX` when that is set)
//! - `TEST_CRASH`: exit with status 3 right after joining
//! - `TEST_IGNORE_TERM`: ignore SIGTERM and the shutdown message (for hard-shutdown tests)
//! - `TEST_MARKER_DIR`: create `<dir>/started-<pid>` at start
//! - `TEST_ACCEPT_PAUSE_MS`: after `ready()`, wait that long before accepting
//! - `GET /sleep/<ms>`: answer after that many milliseconds

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sticky_cluster::hash::node_address_text;
use sticky_cluster::{Error, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("test-worker: error: {error}");
            ExitCode::from(1)
        }
    }
}

struct Facts {
    index: u32,
    ready_ms: u128,
    early: bool,
    echo: String,
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = std::env::var_os("TEST_MARKER_DIR") {
        std::fs::write(std::path::Path::new(&dir).join(format!("started-{}", std::process::id())), b"")?;
    }
    let worker = Worker::from_env()?;
    if env_flag("TEST_CRASH") {
        std::process::exit(3);
    }
    let ignore_term = env_flag("TEST_IGNORE_TERM");
    let mut terminate = signal(SignalKind::terminate())?;
    let slow_index: Option<u32> = std::env::var("TEST_SLOW_INDEX").ok().and_then(|v| v.parse().ok());
    let delay: u64 = std::env::var("TEST_INIT_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if slow_index.is_none_or(|slow| slow == worker.index()) && delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    // Anything readable on the channel before ready() would be a connection sent too early.
    let mut poll = libc::pollfd { fd: worker.channel_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let early = unsafe { libc::poll(&mut poll, 1, 0) } > 0;
    worker.ready()?;
    // Ready, but not reading the channel for a while: lets the master's channel to us fill up.
    if let Some(pause) = std::env::var("TEST_ACCEPT_PAUSE_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let facts = std::sync::Arc::new(Facts {
        index: worker.index(),
        ready_ms: now_ms(),
        early,
        echo: std::env::var("TEST_ECHO").unwrap_or_default(),
    });
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            accepted = worker.accept() => match accepted {
                Ok((stream, peer)) => {
                    requests.spawn(answer(stream, peer, facts.clone()));
                }
                Err(Error::Shutdown) if ignore_term => {
                    // Keep running as a worker that never finishes, until killed.
                    std::future::pending::<()>().await;
                }
                Err(Error::Shutdown | Error::ChannelClosed) => break,
                Err(error) => return Err(error.into()),
            },
            _ = terminate.recv() => {
                if ignore_term {
                    continue;
                }
                while let Ok(connection) = worker.try_accept() {
                    connection.stream.set_nonblocking(true)?;
                    requests.spawn(answer(TcpStream::from_std(connection.stream)?, connection.peer, facts.clone()));
                }
                break;
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    while requests.join_next().await.is_some() {}
    Ok(())
}

async fn answer(mut stream: TcpStream, peer: SocketAddr, facts: std::sync::Arc<Facts>) -> std::io::Result<()> {
    let accepted_ms = now_ms();
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/");
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = format!(
        "{{\"worker\":{},\"pid\":{},\"remote\":\"{}\",\"ready_ms\":{},\"accepted_ms\":{},\"early\":{},\"echo\":\"{}\"}}",
        facts.index,
        std::process::id(),
        node_address_text(peer.ip()),
        facts.ready_ms,
        accepted_ms,
        facts.early,
        facts.echo
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
