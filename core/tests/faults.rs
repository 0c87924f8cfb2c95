//! Worker faults against the real binary: a worker that dies right after ready, one that stops reading,
//! one stopped from outside, and every class of malformed datagram. The master must stay up, lose nothing
//! it still holds, and say so in its log; its counters come from the `stopped` line of its ready fd.
//! (A worker killed with connections in its channel and one that exits by itself: `routing.rs`.)

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{clients_for, get_all, Cluster};

const LONG: Duration = Duration::from_secs(30);

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
}

/// SIGTERM, and counter `name` of the master's `stopped` line on its ready fd.
fn stopped_counter(cluster: &mut Cluster, name: &str) -> u64 {
    let stopped = cluster.stop();
    stopped[name].as_u64().unwrap_or_else(|| panic!("no {name} in {stopped}"))
}

#[test]
fn a_worker_that_dies_right_after_ready_does_not_take_the_master_down() {
    // Worker 0 initialises for 1.5 s while its clients queue, then shuts its channel for reading, says
    // ready and exits: the master's writes fail while it drains the queue.
    let once = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&format!(
        "concurrency: 2\nenv:\n  TEST_DIE_AFTER_READY: '1'\n  TEST_FAULT_INDEX: '0'\n  TEST_SLOW_INDEX: '0'\n  \
         TEST_INIT_DELAY_MS: '1500'\n  TEST_ONCE_DIR: {:?}\n",
        once.path().display().to_string()
    ));
    let victims = clients_for(0, 2, 6, 0);
    let answers = get_all(server(&cluster), &victims);
    for answer in &answers {
        let answer = answer.as_ref().expect("every queued client is served");
        assert_eq!(answer["worker"], 0, "served under its own index by the revived worker");
    }
    assert!(cluster.running(), "the master outlives the worker");
    let log = cluster.log().join("\n");
    // Its exit is reported: status 4, or SIGKILL when the master met the broken channel first and ended it.
    let exit = log.lines().find(|line| line.contains("worker 0 (pid") && line.contains(" exited after "));
    assert!(
        exit.is_some_and(|line| line.contains("exit status 4") || line.contains("signal 9 (SIGKILL)")),
        "the exit is reported:\n{log}"
    );
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert_eq!(stopped_counter(&mut cluster, "closed"), 0);
}

#[test]
fn a_stuck_worker_is_named_and_its_connections_go_elsewhere_within_bounds() {
    // Worker 0 says ready, then reads nothing for 6 s. Its queue holds at most 100 connections, each at
    // most 500 ms; the rest go to worker 1. Nothing is lost, the master's queue stays bounded.
    let mut cluster = Cluster::start(
        "concurrency: 2\nqueue:\n  limit: 100\n  maxWait: 500ms\nmetrics:\n  port: 0\nenv:\n  TEST_ACCEPT_PAUSE_MS: '6000'\n  \
         TEST_SLOW_INDEX: '0'\n",
    );
    let metrics = cluster.metrics_address();
    // Worker 1 ready first (on a loaded machine it may start slowly): what worker 0 cannot take has to
    // find a ready worker, or it is closed.
    cluster.get(clients_for(1, 2, 1, 1000)[0], "/").expect("worker 1 answers");
    // More than its channel holds (about 2 KB of buffer each), fewer than worker 1 cannot take at once.
    let victims = clients_for(0, 2, 400, 0);
    let load = {
        let server = server(&cluster);
        std::thread::spawn(move || get_all(server, &victims))
    };
    // While worker 0 is stuck, its queue in the master never exceeds queue.limit.
    let mut deepest = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let page = support::http_text(metrics, "/metrics").unwrap();
        let depth = page.lines().find_map(|l| l.strip_prefix("sticky_cluster_queue_depth{worker=\"0\"} ")).unwrap();
        deepest = deepest.max(depth.trim().parse::<usize>().unwrap());
    }
    let answers = load.join().unwrap();
    let failed = answers.iter().filter(|answer| answer.is_err()).count();
    let by_other = answers.iter().filter(|answer| answer.as_ref().is_ok_and(|a| a["worker"] == 1)).count();
    let log = cluster.log().join("\n");
    let errors: Vec<String> = answers.iter().filter_map(|a| a.as_ref().err().map(|e| e.to_string())).collect();
    eprintln!(
        "figures: stuck worker: sent 400, served {}, by worker 1 {by_other}, deepest queue {deepest}",
        400 - failed
    );
    assert_eq!(failed, 0, "nothing lost: {errors:?}; log:\n{log}");
    assert!(by_other > 0, "connections past the bound went to worker 1");
    assert!(deepest > 0 && deepest <= 100, "queue depth {deepest} within queue.limit and visible");
    assert!(log.contains("worker 0 (pid") && log.contains("is not reading its channel"), "stuck worker named:\n{log}");
    assert!(stopped_counter(&mut cluster, "redirected") >= by_other as u64);
}

#[test]
fn every_malformed_datagram_class_ends_the_worker_and_its_index_is_revived() {
    // Each class sent by worker 0's first process before ready. The master names the fault, ends that
    // worker, revives index 0 and keeps serving; fds that came with garbage are closed, not leaked.
    for class in ["empty", "oversize", "magic", "version", "kind", "short", "hello-fd", "ready-fds", "ctrunc"] {
        let once = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(&format!(
            "concurrency: 2\nenv:\n  TEST_SEND_GARBAGE: {class}\n  TEST_FAULT_INDEX: '0'\n  TEST_ONCE_DIR: {:?}\n",
            once.path().display().to_string()
        ));
        cluster.wait_for_log_count("reviving", 1, LONG);
        let victim = clients_for(0, 2, 1, 0)[0];
        let answer = cluster.get(victim, "/").unwrap_or_else(|e| panic!("{class}: index 0 serves again: {e}"));
        assert_eq!(answer["worker"], 0, "{class}");
        let other = cluster.get(clients_for(1, 2, 1, 0)[0], "/").unwrap();
        assert_eq!(other["worker"], 1, "{class}: the other worker kept serving");
        let log = cluster.log().join("\n");
        assert!(
            log.contains("worker 0 (pid") && log.contains("ending it, its index is revived"),
            "{class}: the fault is named:\n{log}"
        );
        // The garbage came with fds of the test worker's executable: the master must hold none of them.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", cluster.pid())).unwrap();
        let leaked = fds
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| *target == support::test_worker())
            .count();
        assert_eq!(leaked, 0, "{class}: fds that came with the garbage were leaked");
        assert!(cluster.running(), "{class}: the master stays up");
        assert_eq!(stopped_counter(&mut cluster, "closed"), 0, "{class}");
    }
}

#[test]
fn a_worker_stopped_from_outside_finishes_its_work_and_loses_nothing() {
    // systemd's default kill mode (and a pod's stop) signals every process: the worker gets SIGTERM from
    // someone else than the master, stops accepting and serves what it holds while clients keep coming.
    let cluster = Cluster::start("concurrency: 1\nenv:\n  TEST_STOP_ON_TERM: '1'\n");
    let old_pid = cluster.get(Ipv4Addr::new(127, 4, 0, 1), "/").unwrap()["pid"].as_u64().unwrap();
    let lists = (0..4u8).map(|t| (1..=20u8).map(|i| Ipv4Addr::new(127, 4, t + 1, i)).collect()).collect();
    let load = support::SteadyLoad::start(server(&cluster), "/sleep/100", lists);
    std::thread::sleep(Duration::from_millis(400));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGTERM).unwrap();
    cluster.wait_for_log("stopped taking connections", LONG);
    cluster.wait_for_log(&format!("worker 0 (pid {old_pid}) stopped (exit status 0)"), LONG);
    std::thread::sleep(Duration::from_millis(400));
    let (served, failed) = load.stop();
    let log = cluster.log().join("\n");
    eprintln!(
        "figures: worker stopped from outside under load: sent {}, served {served}, lost {failed}",
        served + failed
    );
    assert_eq!(failed, 0, "a draining worker is not killed and nothing is lost:\n{log}");
    assert!(served > 20, "{served}");
    assert!(!log.contains("ending it"), "the draining worker was taken for a broken one:\n{log}");
    let after = cluster.get(Ipv4Addr::new(127, 4, 0, 1), "/").unwrap();
    assert_eq!(after["worker"], 0);
    assert_ne!(after["pid"].as_u64(), Some(old_pid), "its successor serves the index");
}
