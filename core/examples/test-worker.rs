//! A worker for the integration tests: hello-worker's answer plus knobs (slow init, crash, ignore
//! SIGTERM, slow requests) set through environment variables, and facts the tests check.
//!
//! - `TEST_INIT_DELAY_MS`: sleep before `ready()` (only for `TEST_SLOW_INDEX` when that is set)
//! - `TEST_CRASH`: exit with status 3 right after joining
//! - `TEST_IGNORE_TERM`: ignore SIGTERM and the shutdown message (for hard-shutdown tests)
//! - `TEST_STOP_ON_TERM`: on SIGTERM, `stop_accepting()` and serve what still arrives, then exit 0 (a
//!   worker signalled by someone else than the master: systemd's default kill mode, a pod's stop)
//! - `TEST_MARKER_DIR`: create `<dir>/started-<pid>` at start
//! - `TEST_ACCEPT_PAUSE_MS`: after `ready()`, wait that long before accepting (only `TEST_SLOW_INDEX` when set)
//! - `TEST_ACCEPT_GATE`: after `ready()`, accept nothing until that file exists (a stuck worker the
//!   test lets go when it has seen what it waits for)
//! - `TEST_SERVE_INTERVAL_MS`: serve one connection at a time, pausing that long after each
//! - `TEST_FAULT_INDEX`: the faults below happen only to that index; `TEST_ONCE_DIR`: only to the first
//!   worker of each index (a marker in that directory remembers), so its revived successor behaves
//! - `TEST_DIE_AFTER_READY`: shut the channel for reading, say ready, exit (an init that crashes)
//! - `TEST_EXIT_AFTER`: exit after serving that many connections, leaving the rest in the channel
//! - `TEST_SEND_GARBAGE`: send one malformed datagram of that class on the channel before ready
//!   (`empty`, `oversize`, `magic`, `version`, `kind`, `short`, `hello-fd`, `ready-fds`, `ctrunc`)
//! - `TEST_CHILD_DIR`: start a child process (`sleep 300`, in this worker's process group) and write its
//!   pid into `<dir>/child-<pid>` before ready (for tests of what a hard stop leaves behind)
//! - `TEST_SEND_LINGERING`: `<class>@<address>`: send the master TCP sockets connected to `address` (a
//!   listener of the test that never accepts) with a full send queue and `SO_LINGER` 20 s, then close
//!   this worker's copies, as a hostile worker would: `connection` (after ready, as a connection
//!   message, which only the master may send) or `ready` (before ready, on a ready message, with a second
//!   such datagram left unread in the channel); prints `test-worker: sending lingering sockets` just before
//! - `GET /sleep/<ms>`: answer after that many milliseconds
//! - a connection that starts with `LINES\n` is held: every later line is answered with one line of
//!   `{"worker":i,"pid":p}` until the client closes it

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sticky_cluster::hash::node_address_text;
use sticky_cluster::protocol::Message;
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
    let fault_index: Option<u32> = std::env::var("TEST_FAULT_INDEX").ok().and_then(|v| v.parse().ok());
    let faulty = fault_index.is_none_or(|index| index == worker.index()) && first_of_index(worker.index())?;
    if faulty {
        if let Ok(class) = std::env::var("TEST_SEND_GARBAGE") {
            send_garbage(&worker, &class)?;
        }
        if let Some(target) = std::env::var("TEST_SEND_LINGERING").ok().filter(|v| v.starts_with("ready@")) {
            send_lingering(&worker, &target[6..], &[Message::Ready, Message::Hello { index: 0, pid: 0 }])?;
        }
        if env_flag("TEST_DIE_AFTER_READY") {
            // SAFETY: shutdown(2) on the channel fd this worker owns.
            unsafe { libc::shutdown(worker.channel_fd().as_raw_fd(), libc::SHUT_RD) };
            worker.ready()?;
            std::process::exit(4);
        }
    }
    let exit_after: Option<u32> =
        if faulty { std::env::var("TEST_EXIT_AFTER").ok().and_then(|v| v.parse().ok()) } else { None };
    let serve_interval: Option<u64> = std::env::var("TEST_SERVE_INTERVAL_MS").ok().and_then(|v| v.parse().ok());
    let ignore_term = env_flag("TEST_IGNORE_TERM");
    let stop_on_term = env_flag("TEST_STOP_ON_TERM");
    let mut stopping = false;
    let mut terminate = signal(SignalKind::terminate())?;
    let slow_index: Option<u32> = std::env::var("TEST_SLOW_INDEX").ok().and_then(|v| v.parse().ok());
    let delay: u64 = std::env::var("TEST_INIT_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if slow_index.is_none_or(|slow| slow == worker.index()) && delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(dir) = std::env::var_os("TEST_CHILD_DIR") {
        let child = std::process::Command::new("sleep")
            .arg("300")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::fs::write(std::path::Path::new(&dir).join(format!("child-{}", child.id())), b"")?;
    }
    // Anything readable on the channel before ready() would be a connection sent too early.
    let mut poll = libc::pollfd { fd: worker.channel_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let early = unsafe { libc::poll(&mut poll, 1, 0) } > 0;
    worker.ready()?;
    // Ready, but not reading the channel for a while: lets the master's channel to us fill up.
    let pause: Option<u64> = std::env::var("TEST_ACCEPT_PAUSE_MS").ok().and_then(|v| v.parse().ok());
    if let Some(pause) = pause.filter(|_| slow_index.is_none_or(|slow| slow == worker.index())) {
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    if faulty {
        if let Some(target) = std::env::var("TEST_SEND_LINGERING").ok().filter(|v| v.starts_with("connection@")) {
            let connection = Message::Connection { peer: "127.0.0.1:1".parse()?, local: "127.0.0.1:2".parse()? };
            send_lingering(&worker, &target[11..], &[connection])?;
        }
    }
    if let Some(gate) = std::env::var_os("TEST_ACCEPT_GATE") {
        while !std::path::Path::new(&gate).exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let facts = std::sync::Arc::new(Facts {
        index: worker.index(),
        ready_ms: now_ms(),
        early,
        echo: std::env::var("TEST_ECHO").unwrap_or_default(),
    });
    let mut requests = JoinSet::new();
    let mut served = 0u32;
    loop {
        if exit_after.is_some_and(|limit| served >= limit) {
            std::process::exit(0);
        }
        tokio::select! {
            accepted = worker.accept() => match accepted {
                Ok((stream, peer)) => {
                    served += 1;
                    match serve_interval {
                        Some(interval) => {
                            answer(stream, peer, facts.clone()).await?;
                            tokio::time::sleep(Duration::from_millis(interval)).await;
                        }
                        None => {
                            requests.spawn(answer(stream, peer, facts.clone()));
                        }
                    }
                }
                Err(Error::Shutdown) if ignore_term => {
                    // Keep running as a worker that never finishes, until killed.
                    std::future::pending::<()>().await;
                }
                Err(Error::Shutdown | Error::ChannelClosed) => break,
                Err(error) => return Err(error.into()),
            },
            _ = terminate.recv(), if !stopping => {
                if ignore_term {
                    continue;
                }
                if stop_on_term {
                    // What the master already sent still arrives; then accept reports the end.
                    worker.stop_accepting()?;
                    stopping = true;
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

/// Whether this is the first worker of its index under `TEST_ONCE_DIR` (always true without it).
fn first_of_index(index: u32) -> std::io::Result<bool> {
    let Some(dir) = std::env::var_os("TEST_ONCE_DIR") else { return Ok(true) };
    let marker = std::path::Path::new(&dir).join(format!("faulted-{index}"));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(marker) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}

/// Sends one malformed datagram of `class` on the worker's channel, as a broken or hostile worker would.
fn send_garbage(worker: &Worker, class: &str) -> Result<(), Box<dyn std::error::Error>> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use sticky_cluster::protocol::PROTOCOL_VERSION;
    let ready = Message::Ready.encode();
    let hello = Message::Hello { index: worker.index(), pid: std::process::id() }.encode();
    let (bytes, fd_count): (Vec<u8>, usize) = match class {
        "empty" => (Vec::new(), 0),
        "oversize" => (vec![b'S'; 4096], 0),
        "magic" => (b"XX\x01\x02".to_vec(), 0),
        "version" => (vec![b'S', b'C', PROTOCOL_VERSION + 1, 2], 0),
        "kind" => (vec![b'S', b'C', PROTOCOL_VERSION, 99], 0),
        "short" => (hello[..6].to_vec(), 0),
        "hello-fd" => (hello, 1),
        "ready-fds" => (ready, 2),
        // More fds than the master's control buffer holds: it sees MSG_CTRUNC.
        "ctrunc" => (ready, 64),
        other => return Err(format!("unknown TEST_SEND_GARBAGE class {other}").into()),
    };
    // Its own executable: a file the master never opens itself, so a leaked one is easy to spot.
    let exe = std::env::current_exe()?;
    let files: Vec<std::fs::File> = (0..fd_count).map(|_| std::fs::File::open(&exe)).collect::<Result<_, _>>()?;
    let fds: Vec<i32> = files.iter().map(|file| file.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let iov = [std::io::IoSlice::new(&bytes)];
    sendmsg::<UnixAddr>(worker.channel_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Sends each message with a TCP socket connected to `target` whose send queue is full and which
/// lingers 20 s on close, then closes this process's copies: the master's close is the last one.
fn send_lingering(worker: &Worker, target: &str, messages: &[Message]) -> Result<(), Box<dyn std::error::Error>> {
    use nix::sys::socket::{sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags, UnixAddr};
    use std::io::Write;
    // All made first, then sent back to back: the master may end this worker at the first datagram.
    let mut streams = Vec::new();
    for _ in messages {
        let stream = std::net::TcpStream::connect(target)?;
        setsockopt(&stream, sockopt::SndBuf, &4096)?;
        stream.set_nonblocking(true)?;
        let chunk = [b'x'; 16384];
        loop {
            match (&stream).write(&chunk) {
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error.into()),
            }
        }
        setsockopt(&stream, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 20 })?;
        streams.push(stream);
    }
    eprintln!("test-worker: sending lingering sockets");
    for (message, stream) in messages.iter().zip(streams) {
        let bytes = message.encode();
        let fds = [stream.as_raw_fd()];
        let rights = [ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(&bytes)];
        sendmsg::<UnixAddr>(worker.channel_fd().as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)?;
    }
    Ok(())
}

/// The stream's first line as JSON-safe text: tells a test whether a proxy header reached the worker.
fn first_line(text: &str) -> String {
    let line = text.split("\r\n").next().unwrap_or("");
    line.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '?' }).collect()
}

/// A held connection: one `{"worker":i,"pid":p}` line for every line the client sends, until it closes.
async fn hold(mut stream: TcpStream, mut pending: Vec<u8>, facts: &Facts) -> std::io::Result<()> {
    let line = format!("{{\"worker\":{},\"pid\":{}}}\n", facts.index, std::process::id());
    let mut buffer = [0u8; 1024];
    loop {
        let lines = pending.iter().filter(|&&byte| byte == b'\n').count();
        pending.clear();
        for _ in 0..lines {
            stream.write_all(line.as_bytes()).await?;
        }
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buffer[..read]);
    }
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
        if head.starts_with(b"LINES\n") {
            return hold(stream, head.split_off(6), &facts).await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/");
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = format!(
        "{{\"worker\":{},\"pid\":{},\"remote\":\"{}\",\"ready_ms\":{},\"accepted_ms\":{},\"early\":{},\"echo\":\"{}\",\"first_line\":\"{}\"}}",
        facts.index,
        std::process::id(),
        node_address_text(peer.ip()),
        facts.ready_ms,
        accepted_ms,
        facts.early,
        facts.echo,
        first_line(&text)
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
