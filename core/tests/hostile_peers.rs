//! Peers that try to freeze the master: a worker or a dialer on the attach socket that sends fds whose
//! close blocks (a TCP socket with SO_LINGER and a send queue that cannot drain). The master keeps
//! accepting, routing and answering scrapes meanwhile.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sticky_cluster::protocol::Message;
use support::{clients_for, Cluster};

const LONG: Duration = Duration::from_secs(60);
/// The SO_LINGER of the hostile sockets (the test worker's too): a close that blocks blocks this long.
const LINGER: Duration = Duration::from_secs(20);

/// The metrics address, from the cluster's listening line.
fn metrics(cluster: &Cluster) -> SocketAddr {
    cluster.metrics_address()
}

/// How long 10 requests from `clients` (one after the other) and a scrape take.
fn time_to_serve(cluster: &Cluster, clients: &[Ipv4Addr], metrics: SocketAddr) -> Duration {
    let started = Instant::now();
    for &client in clients.iter().cycle().take(10) {
        cluster.get(client, "/").unwrap_or_else(|e| panic!("{client}: {e}"));
    }
    let page = support::http_text(metrics, "/metrics").unwrap();
    assert!(page.contains("sticky_cluster_connections_routed_total"), "{page}");
    started.elapsed()
}

#[test]
fn a_worker_sending_lingering_sockets_does_not_freeze_the_master() {
    for class in ["connection", "ready"] {
        let sink = support::never_accepting_listener();
        let once = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(&format!(
            "concurrency: 2\nmetrics:\n  port: 0\nenv:\n  TEST_SEND_LINGERING: '{class}@{}'\n  TEST_FAULT_INDEX: '0'\n  \
             TEST_ONCE_DIR: {:?}\n",
            sink.local_addr().unwrap(),
            once.path().display().to_string()
        ));
        let metrics = metrics(&cluster);
        cluster.wait_for_log("test-worker: sending lingering sockets", LONG);
        let others = clients_for(1, 2, 5, 0);
        let took = time_to_serve(&cluster, &others, metrics);
        eprintln!("figures: lingering sockets from a worker ({class}): 10 requests and a scrape in {took:?}");
        assert!(took < LINGER / 2, "{class}: the master froze for {took:?} on a peer's fd");
        let fault = match class {
            "connection" => "sent a master-only message",
            _ => "broke the channel protocol",
        };
        cluster.wait_for_log(fault, LONG);
        // Index 0 serves again (the same worker, or after a protocol error its revived successor).
        let victim = clients_for(0, 2, 1, 0)[0];
        assert_eq!(cluster.get(victim, "/").unwrap()["worker"], 0, "{class}");
    }
}

#[test]
fn a_dialer_sending_lingering_sockets_does_not_freeze_the_master() {
    // A peer dials the attach socket and sends a hello that carries a lingering socket (a protocol error
    // when the handshake reads it) and a second one the refusal discards unread.
    let sink = support::never_accepting_listener();
    let (cluster, socket) = support::attach_cluster(1, "metrics:\n  port: 0\n");
    let metrics = metrics(&cluster);
    let _worker = support::Attached::start(&socket, Some(0), &[]);
    cluster.wait_for_log("worker 0 attached", LONG);
    let lingering: Vec<_> = (0..2).map(|_| support::lingering_socket(&sink, LINGER.as_secs() as i32)).collect();
    let dialer = support::dial(&socket);
    let started = Instant::now();
    for (message, lingering) in [Message::Hello { index: 0, pid: 1 }, Message::Ready].iter().zip(lingering) {
        // The second may find the dialer refused already (it reads nothing more then): that socket never
        // reached the master, and this test's own close of it must not linger either.
        let sent = sticky_cluster::protocol::send_message(dialer.as_fd(), message, Some(lingering.as_fd()), false);
        if sent.is_err() {
            let off = libc::linger { l_onoff: 0, l_linger: 0 };
            nix::sys::socket::setsockopt(&lingering, nix::sys::socket::sockopt::Linger, &off).unwrap();
        }
        // Otherwise the master's copy is the last one.
        drop(lingering);
    }
    // The refusal comes after the master read (and let go of) the first socket.
    let refusal = sticky_cluster::protocol::recv_message(dialer.as_fd(), false);
    time_to_serve(&cluster, &[Ipv4Addr::new(127, 5, 0, 1), Ipv4Addr::new(127, 5, 0, 2)], metrics);
    let took = started.elapsed();
    eprintln!("figures: lingering sockets from a dialer: 10 requests and a scrape in {took:?}");
    assert!(took < LINGER / 2, "the master froze for {took:?} on a dialer's fd");
    assert!(
        matches!(&refusal, Ok(received) if matches!(&received.message, Message::Refused { reason } if reason.contains("fds"))),
        "the dialer is told why: {refusal:?}"
    );
    assert!(cluster.log().iter().any(|line| line.contains("refused a worker")), "the refusal is logged");
}
