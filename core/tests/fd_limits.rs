//! The master and its workers at their open-file limit (lowered from outside with prlimit): accepting on
//! the attach socket backs off instead of spinning, a worker stops receiving instead of dying, and a
//! master keeps what it takes back from a dead worker until it has fds for it.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sticky_cluster::protocol::{recv_message, send_message, Message};
use support::{clients_for, get_all, Cluster};

const LONG: Duration = Duration::from_secs(30);

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
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
    let before = support::set_open_file_limit(cluster.pid(), held as u64).unwrap();
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
    support::set_open_file_limit(cluster.pid(), before).unwrap();
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

#[test]
fn a_worker_at_its_fd_limit_stops_receiving_and_serves_everything_once_fds_are_free() {
    // Worker 0's soft limit is lowered to the fds it holds: the next connection cannot be installed in
    // it. It must leave the connection in its channel and wait, not lose it and exit.
    let cluster = Cluster::start("concurrency: 2\ndebug: true\nqueue:\n  maxWait: 30s\n");
    cluster.wait_all_ready(2);
    let pid = cluster.get(clients_for(0, 2, 1, 1000)[0], "/").unwrap()["pid"].as_u64().unwrap() as u32;
    let before = support::set_open_file_limit(pid, support::settled_fds_of(pid) as u64).unwrap();
    let clients = clients_for(0, 2, 20, 0);
    let load = {
        let server = server(&cluster);
        std::thread::spawn(move || get_all(server, &clients))
    };
    let line = cluster.wait_for_any_log(&["open-file limit", "exited after"], LONG);
    // (It may be gone: that is what the assertions below report.)
    let _ = support::set_open_file_limit(pid, before);
    let answers = load.join().unwrap();
    let served: Vec<&serde_json::Value> = answers.iter().filter_map(|answer| answer.as_ref().ok()).collect();
    let by_same = served.iter().filter(|answer| answer["pid"].as_u64() == Some(u64::from(pid))).count();
    let log = cluster.log().join("\n");
    eprintln!("figures: worker at its fd limit: sent 20, served {}, by the same process {by_same}", served.len());
    assert!(line.contains("open-file limit"), "the worker names its limit instead of dying: {line}");
    assert_eq!(served.len(), 20, "every connection served:\n{log}");
    assert_eq!(by_same, 20, "by the worker that was at its limit, which stayed up:\n{log}");
    assert!(!log.contains("exited after"), "no worker exit:\n{log}");
}

#[test]
fn a_master_at_its_fd_limit_keeps_what_it_takes_back_until_it_has_fds() {
    // As in the kill -9 test, 100 clients wait in the only worker's channel; the master's soft limit is
    // lowered to the fds it holds, then the worker is killed: what the master takes back needs an fd
    // each. It must keep them in the dead worker's channel until it has fds, not destroy them uncounted.
    let mut cluster =
        Cluster::start("concurrency: 1\ndebug: true\nqueue:\n  maxWait: 30s\nenv:\n  TEST_SERVE_INTERVAL_MS: '50'\n");
    let old_pid = cluster.get(Ipv4Addr::new(127, 2, 0, 1), "/").unwrap()["pid"].as_u64().unwrap();
    let clients: Vec<Ipv4Addr> = (0..100u8).map(|i| Ipv4Addr::new(127, 2, 1, i + 1)).collect();
    let load = {
        let server = server(&cluster);
        std::thread::spawn(move || get_all(server, &clients))
    };
    // Every client accepted and sent to the worker (one routing line each, after the first client's).
    cluster.wait_for_log_count("-> worker 0", 101, LONG);
    let (held, _) = cluster.settled_fds(None, Duration::from_secs(5));
    let before = support::set_open_file_limit(cluster.pid(), held as u64).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Its exit is logged after the master tried to take back what it left.
    cluster.wait_for_log(&format!("worker 0 (pid {old_pid}) exited after"), LONG);
    support::set_open_file_limit(cluster.pid(), before).unwrap();
    let answers = load.join().unwrap();
    let served = answers.iter().filter(|answer| answer.is_ok()).count();
    let by_successor =
        answers.iter().filter(|answer| answer.as_ref().is_ok_and(|a| a["pid"].as_u64() != Some(old_pid))).count();
    let log = cluster.log().join("\n");
    eprintln!("figures: master at its fd limit, kill -9: sent 100, served {served}, by the successor {by_successor}");
    assert!(served >= 99, "{served} of 100 answered (only the one in the dead worker's hands may be lost):\n{log}");
    assert!(!log.contains("held a bad message"), "nothing taken back was destroyed:\n{log}");
    let stopped = cluster.stop();
    assert_eq!(stopped["closed"], 0, "nothing closed: {stopped}");
}
