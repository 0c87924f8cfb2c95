//! One client address cannot take every worker's queue: at most `queue.perSource` of its connections
//! wait in the master at once, the rest are closed and counted, with one log line per episode.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::{clients_for, expected_index, Cluster};

const LONG: Duration = Duration::from_secs(60);

#[test]
fn one_address_flooding_stuck_workers_cannot_fill_every_queue() {
    // Both workers are ready but read nothing until the gate opens, so what reaches them fills their
    // channels, then their queues in the master (queue.limit 50). One address opens 1000 connections.
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("open");
    let mut cluster = Cluster::start(&format!(
        "concurrency: 2\ndebug: true\nmetrics:\n  port: 0\nqueue:\n  limit: 50\n  maxWait: 60s\n  perSource: 10\n\
         env:\n  TEST_ACCEPT_GATE: {:?}\n",
        gate.display().to_string()
    ));
    let metrics = cluster.metrics_address();
    for index in 0..2 {
        cluster.wait_for_log(&format!("worker {index} (pid"), LONG);
    }
    cluster.wait_for_log_count(") is ready;", 2, LONG);
    let server = SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let flooder = Ipv4Addr::new(127, 6, 0, 1);
    let flood: Vec<std::net::TcpStream> = (0..1000).map(|_| support::connect_from(flooder, server).unwrap()).collect();
    cluster.wait_for_log_count(&format!("connection ::ffff:{flooder} -> worker"), 1000, LONG);
    // Then one client of each index, from addresses of their own.
    let clients: Vec<Ipv4Addr> = (0..2).map(|index| clients_for(index, 2, 1, 500)[0]).collect();
    let waiting: Vec<_> =
        clients.iter().map(|&client| std::thread::spawn(move || support::get(client, server, "/"))).collect();
    for client in &clients {
        cluster.wait_for_log(&format!("connection ::ffff:{client} -> worker"), LONG);
    }
    let page = support::http_text(metrics, "/metrics").unwrap();
    std::fs::write(&gate, b"").unwrap();
    let answers: Vec<_> = waiting.into_iter().map(|thread| thread.join().unwrap()).collect();
    drop(flood);
    let log = cluster.log();
    let closing_lines = log.iter().filter(|line| line.contains("closing connection")).count();
    let served = answers.iter().filter(|answer| answer.is_ok()).count();
    let closed = cluster.stop()["closed"].as_u64().unwrap();
    let per_source: u64 = page
        .lines()
        .find_map(|line| line.strip_prefix("sticky_cluster_connections_per_source_closed_total "))
        .map_or(0, |value| value.trim().parse().unwrap());
    eprintln!(
        "figures: one address opens 1000 connections at 2 stuck workers (queue.limit 50, perSource 10): \
         {closed} closed, {closing_lines} log lines about it; other clients sent 2, served {served}"
    );
    for (client, answer) in clients.iter().zip(&answers) {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("{client} was not served: {e}"));
        assert_eq!(answer["worker"].as_u64(), Some(u64::from(expected_index(*client, 2))), "{client}");
    }
    assert!(closing_lines <= 2, "one line per episode, not {closing_lines}");
    assert!(closed > 0 && per_source > 0, "the flooder's connections past the bound are closed and counted: {page}");
    assert!(per_source <= closed);
}
