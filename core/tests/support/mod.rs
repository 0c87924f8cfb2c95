//! Test support: start the real `sticky-cluster` binary with real worker processes (waiting on its
//! `--ready-fd` lines, keeping its log), or run `master::run` in this process ([`InProcess`]), and talk
//! HTTP to either from chosen loopback source addresses. Everything started is killed on drop.

#![allow(dead_code)]

mod cluster;
mod in_process;
pub mod netns;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)]
pub use cluster::Cluster;
#[allow(unused_imports)]
pub use in_process::InProcess;

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sticky-cluster"))
}

/// The test worker (`core/examples/test-worker.rs`), built by `cargo test` with the examples.
pub fn test_worker() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps.parent().unwrap().parent().unwrap().join("examples/test-worker");
    assert!(path.exists(), "{} is missing: cargo test builds it with the examples", path.display());
    path
}

/// The `i`-th distinct loopback client address (127.1.x.y).
pub fn client_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The index the npm module would pick for this client on a dual-stack listener (where Node prints an IPv4
/// client as `::ffff:a.b.c.d`).
pub fn expected_index(client: impl Into<IpAddr>, concurrency: u32) -> u32 {
    let seen = match client.into() {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    sticky_cluster::hash::route_index(seen, concurrency)
}

/// The first `count` client addresses (from `start`) that route to `index`.
pub fn clients_for(index: u32, concurrency: u32, count: usize, start: u32) -> Vec<Ipv4Addr> {
    (start..).map(client_address).filter(|&a| expected_index(a, concurrency) == index).take(count).collect()
}

/// The file a test cluster runs on: port 0, and the test worker unless the YAML names workers itself.
fn config_text(yaml: &str) -> String {
    if yaml.contains("worker:") || yaml.contains("workers:") {
        format!("port: 0\n{yaml}")
    } else {
        format!("port: 0\n{yaml}\nworker:\n  command: [{:?}]\n", test_worker().display().to_string())
    }
}

/// Connects from `client` (port chosen by the kernel) to `server`, of the same address family.
pub fn connect_from(client: impl Into<IpAddr>, server: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let client = SocketAddr::new(client.into(), 0);
    let family = if client.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(client))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(server))?;
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// One HTTP/1.1 request from 127.0.0.1; the whole answer as text.
pub fn http_text(server: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = connect_from(Ipv4Addr::LOCALHOST, server)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// One HTTP/1.1 request from `client`; the JSON body of the answer.
pub fn get(client: Ipv4Addr, server: SocketAddr, path: &str) -> std::io::Result<Value> {
    request(client, server, &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"))
}

/// Sends `raw` bytes from `client` as they are (a proxy header, say); the JSON body of the answer.
pub fn request(client: Ipv4Addr, server: SocketAddr, raw: &str) -> std::io::Result<Value> {
    let mut stream = connect_from(client, server)?;
    stream.write_all(raw.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {response:?}")))?;
    serde_json::from_str(body.trim()).map_err(|e| std::io::Error::other(format!("{e}: {body:?}")))
}

/// One request per client, each on its own thread, all at once; the answers (or errors) in order.
pub fn get_all(server: SocketAddr, clients: &[Ipv4Addr]) -> Vec<std::io::Result<Value>> {
    let threads: Vec<_> = clients.iter().map(|&client| std::thread::spawn(move || get(client, server, "/"))).collect();
    threads.into_iter().map(|thread| thread.join().unwrap()).collect()
}

/// Every client asks `server` for `GET /` `rounds` times, `per_thread` clients to a thread; each answer with
/// its client.
pub fn ask_all(server: SocketAddr, clients: &[Ipv4Addr], per_thread: usize, rounds: u32) -> Vec<(Ipv4Addr, Value)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    let mut answers = Vec::new();
                    for round in 0..rounds {
                        for &client in chunk {
                            let answer =
                                get(client, server, "/").unwrap_or_else(|e| panic!("{client} round {round}: {e}"));
                            answers.push((client, answer));
                        }
                    }
                    answers
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// Sticky routing, answer by answer: from the client's contract index, always from the same process, with
/// Node's text of the client address, before-ready connections none, and every worker used.
pub fn assert_sticky(answers: &[(Ipv4Addr, Value)], concurrency: u32) {
    let mut pid_of_client: std::collections::HashMap<Ipv4Addr, u64> = std::collections::HashMap::new();
    let mut used = vec![0u32; concurrency as usize];
    for (client, answer) in answers {
        let index = answer["worker"].as_u64().unwrap() as u32;
        assert_eq!(index, expected_index(*client, concurrency), "{client} reached the wrong worker");
        assert_eq!(answer["remote"], format!("::ffff:{client}"), "Node-style remote address text");
        assert_eq!(answer["early"], false, "a connection was readable before ready");
        let pid = answer["pid"].as_u64().unwrap();
        assert_eq!(*pid_of_client.entry(*client).or_insert(pid), pid, "{client} changed worker process");
        used[index as usize] += 1;
    }
    assert!(used.iter().all(|&n| n > 0), "{} answers should come from every worker: {used:?}", answers.len());
}

/// Clients requesting `path` in a loop on a few threads until stopped, counting answers and failures.
pub struct SteadyLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    served: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SteadyLoad {
    /// One thread per client list, each cycling through its clients.
    pub fn start(server: SocketAddr, path: &'static str, client_lists: Vec<Vec<Ipv4Addr>>) -> SteadyLoad {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (stop, served, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = client_lists
            .into_iter()
            .map(|clients| {
                let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
                std::thread::spawn(move || {
                    for client in clients.iter().cycle() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let counter = if get(*client, server, path).is_ok() { &served } else { &failed };
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        SteadyLoad { stop, served, failed, threads }
    }

    /// Stops the clients; returns (served, failed).
    pub fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().for_each(|t| t.join().unwrap());
        (self.served.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

/// Sets the soft open-file limit of process `pid` (the hard one stays) and returns the soft limit it had.
pub fn set_open_file_limit(pid: u32, soft: u64) -> std::io::Result<u64> {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reads the current limits of `pid` into `old`.
    if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = libc::rlimit { rlim_cur: soft.min(old.rlim_max), rlim_max: old.rlim_max };
    // SAFETY: sets the limits of `pid` from `new`; the hard limit is unchanged.
    if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// Number of open fds of any process.
pub fn open_fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The open fds of process `pid` once the count is the same twice 100 ms apart (up to 5 s).
pub fn settled_fds_of(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = open_fds_of(pid);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = open_fds_of(pid);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Clock ticks per second, the unit of [`Cluster::cpu_ticks`].
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// A cluster whose workers attach at a fresh socket path (`debug: true`, mode 0666): the cluster and the path.
pub fn attach_cluster(concurrency: u32, extra: &str) -> (Cluster, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let socket = dir.join("workers.sock");
    let yaml = format!(
        "concurrency: {concurrency}\ndebug: true\nhardShutdownDelay: 5s\n{extra}workers:\n  socket: {:?}\n  mode: \"0666\"\n",
        socket.display().to_string()
    );
    (Cluster::start(&yaml), socket)
}

/// A test worker attached at `socket` (claiming `index` when given), killed on drop.
pub struct Attached(pub Child);

impl Attached {
    /// Starts the test worker with `STICKY_CLUSTER_SOCKET` (and `extra` environment).
    pub fn start(socket: &std::path::Path, index: Option<u32>, extra: &[(&str, &str)]) -> Attached {
        let mut command = Command::new(test_worker());
        command.env("STICKY_CLUSTER_SOCKET", socket).stdin(Stdio::null());
        if let Some(index) = index {
            command.env("STICKY_CLUSTER_WORKER_INDEX", index.to_string());
        }
        command.envs(extra.iter().copied());
        Attached(command.spawn().unwrap())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Dials a master's attach socket as a raw peer would (no hello sent yet).
pub fn dial(path: &std::path::Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    fd
}

/// A listener that never accepts, with a small receive buffer that its connections inherit: a socket
/// connected to it soon has a send queue that cannot drain.
pub fn never_accepting_listener() -> std::net::TcpListener {
    use nix::sys::socket::{bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    let address = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 0);
    bind(fd.as_raw_fd(), &address).unwrap();
    listen(&fd, Backlog::new(64).unwrap()).unwrap();
    std::net::TcpListener::from(fd)
}

/// A TCP socket connected to `listener` (which never accepts) with a full send queue and SO_LINGER of
/// `seconds`: closing the last copy of it blocks for that long.
pub fn lingering_socket(listener: &std::net::TcpListener, seconds: i32) -> TcpStream {
    use nix::sys::socket::{setsockopt, sockopt};
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    setsockopt(&stream, sockopt::SndBuf, &4096).unwrap();
    stream.set_nonblocking(true).unwrap();
    let chunk = [b'x'; 16384];
    while (&stream).write(&chunk).is_ok() {}
    setsockopt(&stream, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: seconds }).unwrap();
    stream
}
