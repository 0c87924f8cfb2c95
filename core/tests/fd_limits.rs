//! The master and its workers at their open-file limit (lowered from outside with prlimit): accepting on
//! the attach socket backs off instead of spinning, a worker stops receiving instead of dying, and a
//! master keeps what it takes back from a dead worker until it has fds for it.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sticky_cluster::protocol::{recv_message, send_message, Message};
use support::{clients_for, Cluster};

const LONG: Duration = Duration::from_secs(30);

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
}

/// One request per client, each on its own thread, all at once; the answers (or errors) in order.
fn get_all(server: SocketAddr, clients: &[Ipv4Addr]) -> Vec<std::io::Result<serde_json::Value>> {
    let threads: Vec<_> =
        clients.iter().map(|&client| std::thread::spawn(move || support::get(client, server, "/"))).collect();
    threads.into_iter().map(|thread| thread.join().unwrap()).collect()
}

#[test]
fn the_attach_socket_backs_off_at_the_fd_limit_and_accepts_again_after() {
    // Worker 0 attached and serving; the master's soft limit is lowered to the fds it holds, and a peer
    // dials the attach socket: every accept fails with EMFILE while the dialer waits in the backlog.
    let (cluster, socket) = support::attach_cluster(2, "");
    let _worker = support::Attached::start(&socket, Some(0), &[]);
    cluster.wait_for_log("worker 0 attached", LONG);
    let client = clients_for(0, 2, 1, 0)[0];
    assert_eq!(cluster.get(client, "/").unwrap()["worker"], 0);
    let (held, _) = cluster.settled_fds(None, Duration::from_secs(5));
    let before = support::set_open_file_limit(cluster.pid(), held as u64);
    let dialer = support::dial(&socket);
    send_message(dialer.as_fd(), &Message::Hello { index: 1, pid: std::process::id() }, None, false).unwrap();
    cluster.wait_for_log("attach socket", LONG);
    // One second at the limit: how much CPU and how many log lines it costs.
    let lines_at_start = cluster.log().len();
    let ticks_at_start = cluster.cpu_ticks();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cluster.cpu_ticks() - ticks_at_start;
    let lines = cluster.log().len() - lines_at_start;
    let per_second = ticks as f64 / support::ticks_per_second() as f64 / started.elapsed().as_secs_f64();
    support::set_open_file_limit(cluster.pid(), before);
    // The dialer was only kept waiting: once fds are free it is accepted and welcomed.
    let welcome = loop {
        match recv_message(dialer.as_fd(), false).unwrap().message {
            Message::Welcome { index, .. } => break index,
            Message::Listener => continue,
            other => panic!("expected the welcome, got {other:?}"),
        }
    };
    let log = cluster.log();
    let tail = log[log.len().saturating_sub(10)..].join("\n");
    eprintln!(
        "figures: attach socket at the fd limit: {:.0} % of a core, {lines} log lines in 1 s; accepted after",
        per_second * 100.0
    );
    assert_eq!(welcome, 1, "the waiting dialer got its index once fds were free");
    assert!(per_second < 0.2, "the attach accept loop must not spin: {:.0} % of a core", per_second * 100.0);
    assert!(lines <= 2, "one log line per episode, not {lines}:\n{tail}");
    assert_eq!(cluster.get(client, "/").unwrap()["worker"], 0, "clients were served throughout");
}
