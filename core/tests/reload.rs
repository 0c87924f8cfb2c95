//! SIGHUP reloads the configuration file: a good one restarts workers one at a time without losing a
//! connection, a bad one is one logged line and the cluster keeps serving as it was.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{clients_for, Cluster, SteadyLoad};

const LONG: Duration = Duration::from_secs(30);

fn config(echo: &str) -> String {
    format!(
        "concurrency: 2\nhardShutdownDelay: 10s\nenv:\n  TEST_ECHO: '{echo}-{{index}}'\n  TEST_INIT_DELAY_MS: '200'\n"
    )
}

fn answers_by_index(cluster: &Cluster) -> Vec<serde_json::Value> {
    (0..2).map(|index| cluster.get(clients_for(index, 2, 1, 0)[0], "/").unwrap()).collect()
}

#[test]
fn a_reload_restarts_workers_one_at_a_time_and_loses_no_connection() {
    let cluster = Cluster::start(&config("v1"));
    cluster.wait_all_ready(2);
    let before = answers_by_index(&cluster);
    assert_eq!(before[0]["echo"], "v1-0");

    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let load = SteadyLoad::start(
        server,
        "/sleep/20",
        (0..4u32).map(|t| (t * 10..t * 10 + 10).map(support::client_address).collect()).collect(),
    );
    std::thread::sleep(Duration::from_millis(200));
    cluster.rewrite_config(&config("v2"));
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("every worker runs the new configuration", LONG);
    std::thread::sleep(Duration::from_millis(200));
    let (served, failed) = load.stop();

    eprintln!("figures: reload under load: sent {}, served {served}, failed {failed}", served + failed);
    assert_eq!(failed, 0, "a rolling restart loses no connection");
    assert!(served > 20);
    let after = answers_by_index(&cluster);
    for index in 0..2 {
        assert_eq!(after[index]["worker"], index as u64);
        assert_eq!(after[index]["echo"], format!("v2-{index}"), "the new environment is in effect");
        assert_ne!(after[index]["pid"], before[index]["pid"], "worker {index} was restarted");
    }
    let log = cluster.log();
    let stops: Vec<usize> = (0..2)
        .map(|i| {
            log.iter()
                .position(|l| l.contains(&format!("worker {i} (pid")) && l.contains("stopped for the reload"))
                .unwrap()
        })
        .collect();
    assert!(stops[0] < stops[1], "one worker at a time, in index order");
}

#[test]
fn a_bad_reload_is_one_line_and_changes_nothing() {
    let mut cluster = Cluster::start(&config("v1"));
    cluster.wait_all_ready(2);
    let before = answers_by_index(&cluster);
    cluster.rewrite_config("concurrency: 2\nconcurency: 3\n");
    cluster.signal(Signal::SIGHUP);
    let line = cluster.wait_for_log("reload refused", LONG);
    assert!(line.contains("cluster.yaml:3: unknown key `concurency`"), "{line}");
    let after = answers_by_index(&cluster);
    assert_eq!(
        before,
        after
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a["accepted_ms"] = before[a["worker"].as_u64().unwrap() as usize]["accepted_ms"].clone();
                a
            })
            .collect::<Vec<_>>(),
        "same workers, same environment"
    );
    assert!(cluster.running());
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn a_reload_whose_program_cannot_start_keeps_every_old_worker() {
    // Two kinds of broken release: a program that is not there, and one that dies before it is ready.
    // Each successor is started before the worker it would replace stops, so nothing changes.
    let base = "concurrency: 2\nhardShutdownDelay: 10s\nmetrics:\n  port: 0\n";
    let good = format!("{base}env:\n  TEST_ECHO: 'v1-{{index}}'\n");
    let mut cluster = Cluster::start(&good);
    let metrics = cluster.metrics_address();
    cluster.wait_all_ready(2);
    let before = answers_by_index(&cluster);
    let broken = [
        format!("{base}env:\n  TEST_ECHO: 'v2-{{index}}'\nworker:\n  command: [/nonexistent/sticky-worker]\n"),
        format!("{base}env:\n  TEST_ECHO: 'v3-{{index}}'\n  TEST_CRASH: '1'\n"),
    ];
    for (attempt, config) in broken.iter().enumerate() {
        cluster.rewrite_config(config);
        cluster.signal(Signal::SIGHUP);
        let line = cluster.wait_for_log_count("reload failed", attempt + 1, LONG);
        assert!(line.contains("worker 0's successor"), "{line}");
        let after = answers_by_index(&cluster);
        for index in 0..2 {
            assert_eq!(after[index]["pid"], before[index]["pid"], "worker {index} kept its process: {line}");
            assert_eq!(after[index]["echo"], format!("v1-{index}"));
        }
        let page = support::http_text(metrics, "/metrics").unwrap();
        assert!(page.contains(&format!("sticky_cluster_reload_failures_total {}\n", attempt + 1)), "{page}");
    }
    // Nothing changed: a worker revived after the failed reloads runs the program and environment it ran.
    let pid = before[0]["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    cluster.wait_for_log("reviving in", LONG);
    let revived = (0..100)
        .find_map(|_| {
            let answer = cluster.get(clients_for(0, 2, 1, 0)[0], "/").ok()?;
            (answer["pid"] != before[0]["pid"]).then_some(answer).or_else(|| {
                std::thread::sleep(Duration::from_millis(50));
                None
            })
        })
        .expect("index 0 is revived");
    assert_eq!(revived["echo"], "v1-0");
    assert!(!cluster.log().iter().any(|l| l.contains("stopped for the reload")), "no old worker was stopped");
    assert_eq!(cluster.stop()["reload_failures"], 2, "both failed reloads counted");
}
