//! Routing and supervision with the master in this process (`master::run`, as mini-redis's tests run
//! their server): real worker processes, real TCP clients from many loopback source addresses, and the
//! master's own counters (`Stats`) to assert on. What only the binary promises (exit codes, signals, the
//! log) is tested in `cluster.rs` and `cli.rs`.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use nix::sys::signal::Signal;
use sticky_cluster::master::Stats;
use support::{client_address, clients_for, expected_index, get_all, InProcess};

/// Connections routed to each index when every client in `clients` connects `rounds` times.
fn routes_of(clients: &[Ipv4Addr], concurrency: u32, rounds: u64) -> Vec<u64> {
    let mut routed = vec![0; concurrency as usize];
    for &client in clients {
        routed[expected_index(client, concurrency) as usize] += rounds;
    }
    routed
}

/// The counters other than `routed`, in one tuple for one assertion: redirected, closed, revivals,
/// recovered, reload failures.
fn others(stats: &Stats) -> (u64, u64, u64, u64, u64) {
    (stats.redirected, stats.closed, stats.revivals, stats.recovered, stats.reload_failures)
}

#[test]
fn every_client_address_sticks_to_its_string_hash_worker() {
    let concurrency = 4;
    let master = InProcess::start(&format!("concurrency: {concurrency}\nenv:\n  TEST_ECHO: 'w{{index}}'\n"));
    let clients: Vec<Ipv4Addr> = (0..200).map(client_address).collect();
    let answers = support::ask_all(master.server, &clients, 25, 3);
    assert_eq!(answers.len(), 600);
    support::assert_sticky(&answers, concurrency);
    for (_, answer) in &answers {
        assert_eq!(answer["echo"], format!("w{}", answer["worker"]), "env value with {{index}} substituted");
    }
    let outcome = master.stop();
    assert!(outcome.graceful, "every worker exited on its own");
    assert_eq!(outcome.stats.routed, routes_of(&clients, concurrency, 3), "the master's count of every route");
    assert_eq!(others(&outcome.stats), (0, 0, 0, 0, 0));
}

#[test]
fn a_slow_worker_gets_nothing_before_ready_and_loses_nothing() {
    let master = InProcess::start("concurrency: 2\nenv:\n  TEST_SLOW_INDEX: '0'\n  TEST_INIT_DELAY_MS: '2000'\n");
    let slow_clients = clients_for(0, 2, 20, 0);
    let fast_clients = clients_for(1, 2, 5, 0);
    let ask = |client: Ipv4Addr| master.get(client, "/").unwrap_or_else(|e| panic!("{client}: {e}"));
    let (slow, fast) = std::thread::scope(|scope| {
        let slow: Vec<_> = slow_clients.iter().map(|&client| scope.spawn(move || ask(client))).collect();
        let fast: Vec<_> = fast_clients.iter().map(|&client| ask(client)).collect();
        (slow.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), fast)
    });
    let slow_ready = slow[0]["ready_ms"].as_u64().unwrap();
    for answer in &slow {
        assert_eq!(answer["worker"], 0, "a connection for the slow worker was served by its own worker");
        assert_eq!(answer["early"], false, "the master sent a connection before ready");
        assert!(answer["accepted_ms"].as_u64().unwrap() >= slow_ready);
    }
    // The fast worker answered while the slow one was still initialising.
    for answer in &fast {
        assert_eq!(answer["worker"], 1);
        assert!(answer["accepted_ms"].as_u64().unwrap() < slow_ready, "fast worker waited for the slow one");
    }
    let stats = master.stop().stats;
    assert_eq!(stats.routed, vec![20, 5], "each connection routed once, to its own index");
    assert_eq!(others(&stats), (0, 0, 0, 0, 0), "nothing waited past queue.maxWait, nothing was closed");
}

#[test]
fn a_connection_whose_worker_is_not_ready_in_time_goes_to_the_next_ready_one() {
    let master = InProcess::start(
        "concurrency: 2\nqueue:\n  maxWait: 300ms\nenv:\n  TEST_SLOW_INDEX: '0'\n  TEST_INIT_DELAY_MS: '5000'\n",
    );
    // Worker 1 ready first: what waits too long for worker 0 has somewhere to go.
    assert_eq!(master.get(clients_for(1, 2, 1, 0)[0], "/").unwrap()["worker"], 1);
    let answers = get_all(master.server, &clients_for(0, 2, 5, 0));
    for answer in &answers {
        assert_eq!(answer.as_ref().expect("served")["worker"], 1, "served by the ready worker");
    }
    let stats = master.stop().stats;
    assert_eq!(stats.routed, vec![0, 6]);
    assert_eq!(others(&stats), (5, 0, 0, 0, 0), "5 redirected, none closed");
}

#[test]
fn an_ipv6_client_is_hashed_by_its_node_text() {
    let master = InProcess::start("concurrency: 4\n");
    let mut stream = std::net::TcpStream::connect(("::1", master.server.port())).unwrap();
    use std::io::{Read, Write};
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body: serde_json::Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_eq!(body["remote"], "::1");
    let expected = sticky_cluster::hash::route_index("::1".parse().unwrap(), 4);
    assert_eq!(body["worker"], u64::from(expected));
    let mut routed = vec![0; 4];
    routed[expected as usize] = 1;
    assert_eq!(master.stop().stats.routed, routed);
}

#[test]
fn kill_9_loses_no_connection_waiting_in_the_channel() {
    // One worker serving one connection per 50 ms; 100 clients at once; the worker is killed after 1 s,
    // with most of them still in its channel. Only the one in its hands may be lost.
    let master = InProcess::start("concurrency: 1\nqueue:\n  maxWait: 30s\nenv:\n  TEST_SERVE_INTERVAL_MS: '50'\n");
    let first = master.get(Ipv4Addr::new(127, 2, 0, 1), "/").unwrap();
    let old_pid = first["pid"].as_u64().unwrap();
    let clients: Vec<Ipv4Addr> = (0..100u8).map(|i| Ipv4Addr::new(127, 2, 1, i + 1)).collect();
    let load = {
        let server = master.server;
        std::thread::spawn(move || get_all(server, &clients))
    };
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    let answers = load.join().unwrap();
    let served: Vec<&serde_json::Value> = answers.iter().filter_map(|answer| answer.as_ref().ok()).collect();
    let by_successor = served.iter().filter(|answer| answer["pid"].as_u64() != Some(old_pid)).count();
    eprintln!("figures: kill -9: sent 100, served {}, by the successor {by_successor}", served.len());
    assert!(served.len() >= 99, "{} of 100 answered", served.len());
    assert!(served.iter().all(|answer| answer["worker"] == 0), "all on index 0");
    assert!(by_successor >= 50, "the revived worker served what its predecessor left ({by_successor})");
    let stats = master.stop().stats;
    assert_eq!(stats.routed, vec![101], "each connection counted once, taken back or not: {stats:?}");
    assert_eq!(stats.revivals, 1);
    assert!(stats.recovered > 0, "what the dead worker never read was taken back: {stats:?}");
    assert!(stats.recovered as usize <= by_successor, "only what the successor served: {stats:?}");
    assert_eq!(stats.closed, 0, "{stats:?}");
}

#[test]
fn a_worker_that_exits_by_itself_leaves_nothing_behind() {
    // Worker 0 exits cleanly after 10 connections while 40 more wait in its channel.
    let once = tempfile::tempdir().unwrap();
    let master = InProcess::start(&format!(
        "concurrency: 1\nenv:\n  TEST_EXIT_AFTER: '10'\n  TEST_SERVE_INTERVAL_MS: '20'\n  TEST_ONCE_DIR: {:?}\n",
        once.path().display().to_string()
    ));
    let clients: Vec<Ipv4Addr> = (0..50).map(|i| Ipv4Addr::new(127, 3, 0, i + 1)).collect();
    let answers = get_all(master.server, &clients);
    let failed = answers.iter().filter(|answer| answer.is_err()).count();
    eprintln!("figures: exit by itself: sent 50, served {}", 50 - failed);
    assert_eq!(failed, 0, "every connection served");
    let pids: std::collections::BTreeSet<u64> =
        answers.iter().filter_map(|answer| answer.as_ref().ok()?["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2, "the first worker and its successor served them");
    let stats = master.stop().stats;
    assert_eq!(stats.routed, vec![50], "each connection counted once: {stats:?}");
    assert_eq!(stats.revivals, 1, "{stats:?}");
    assert!(stats.recovered > 0, "what it left in its channel was taken back: {stats:?}");
    assert_eq!(stats.closed, 0, "{stats:?}");
}

#[test]
fn a_stop_that_has_to_kill_a_worker_is_not_graceful() {
    let master = InProcess::start("concurrency: 1\nhardShutdownDelay: 500ms\nenv:\n  TEST_IGNORE_TERM: '1'\n");
    master.get(client_address(1), "/").expect("the worker is ready");
    let outcome = master.stop();
    assert!(!outcome.graceful, "the worker ignored its shutdown and was killed");
    assert_eq!(outcome.stats.routed, vec![1]);
}
