//! Smoke tests of the benchmark's parts (no timing thresholds): the hashes against known values, the load
//! generator against a real direct worker and through a real master, and the `hash` command's output.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use sticky_cluster::config::{Config, WorkerSource};
use sticky_cluster::hash::{node_address_text, string_hash};
use sticky_cluster::master::{self, Stop};
use sticky_cluster_bench::hashing::{djb2_ascii, int31_bytes, int31_hash, int31_text};
use sticky_cluster_bench::load::{self, LoadOptions, ReplyCheck};
use sticky_cluster_bench::procs::{self, Running};

const BENCH: &str = env!("CARGO_BIN_EXE_sticky-cluster-bench");

#[test]
fn djb2_matches_the_string_hash_contract_vectors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/string-hash-vectors.json");
    let text = std::fs::read_to_string(&path).expect("the shared string-hash vectors are readable");
    let vectors: serde_json::Value = serde_json::from_str(&text).expect("the vectors are JSON");
    let vectors = vectors["vectors"].as_array().expect("a vectors array");
    assert!(vectors.len() >= 10);
    for vector in vectors {
        let text = vector["text"].as_str().expect("text");
        let hash = vector["hash"].as_u64().expect("hash") as u32;
        assert_eq!(string_hash(text), hash, "core string_hash of {text}");
        assert_eq!(djb2_ascii(text), hash, "the benchmark's byte-wise djb2 of {text}");
        if let Ok(ip) = vector["input"].as_str().expect("input").parse::<IpAddr>() {
            assert_eq!(node_address_text(ip), text, "Node's text of {ip}");
        }
    }
}

#[test]
fn int31_matches_sticky_session_by_hand() {
    // seed 0, one part 1: r = 1; r += 1 << 10 -> 1025; r ^= 1025 >> 6 (16) -> 1041.
    // hash += hash << 3 -> 9369; hash ^= 9369 >> 11 (4) -> 9373; hash += 9373 << 15 -> 307143837.
    assert_eq!(int31_hash([Some(1)], 0), 307_143_837);
    // An unparsable part (NaN in JavaScript) leaves the state at 0, so "::ffff:10.0.0.1", whose first
    // dot-separated part is "::ffff:10", hashes like the parts 0, 0, 1 from a zero state: the same as [1].
    assert_eq!(int31_text("::ffff:10.0.0.1", 5), 307_143_837);
    assert_eq!(int31_text("fe80::1", 777), 0);
    // Values of the npm benchmark's formula evaluated by Node (int32 shifts, sign-keeping %).
    assert_eq!(int31_text("1.2.3.4", 12_345), 3_997_725_834);
    assert_eq!(int31_text("127.0.0.1", 999_999_999), 3_886_760_011);
    assert_eq!(int31_text("2001:db8::1", 42), 3_899_674_281);
    // sticky-session's master hashes the address bytes, from a seed that may be negative.
    assert_eq!(int31_bytes(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), -123_456_789), 285_775_249);
    assert_eq!(int31_bytes(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), i32::MAX), 3_950_914_081);
    assert_eq!(int31_bytes("2001:db8::1".parse().unwrap(), -1), 824_620_140);
}

fn one_second_of_load(target: SocketAddr, check: ReplyCheck) -> load::LoadReport {
    load::wait_until_answering(target, Duration::from_secs(20)).expect("the server answers");
    load::run(&LoadOptions {
        target,
        duration: Duration::from_secs(1),
        max_connections: None,
        in_flight: 8,
        sources: 512,
        threads: 1,
        check,
    })
    .expect("the load generator runs")
}

#[test]
fn load_generator_against_a_direct_worker_completes_without_errors() {
    let port = procs::free_port().unwrap();
    let mut command = Command::new(BENCH);
    command.args(["worker", "--style", "tokio", "--direct-port", &port.to_string()]);
    let _worker = Running::spawn("direct worker", &mut command).expect("the worker starts");
    let report = one_second_of_load(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), ReplyCheck::Remote);
    assert!(report.completed > 0, "no connection completed");
    assert_eq!(report.errors, 0, "errors: {:?}", report.first_errors);
    assert_eq!(report.latencies_us.len() as u64, report.completed);
    assert!(report.percentile_ms(0.5) <= report.percentile_ms(0.99));
}

#[test]
fn load_through_a_real_master_lands_on_the_hashed_worker() {
    let config = Config {
        port: 0,
        concurrency: 3,
        hard_shutdown_delay: Duration::from_secs(2),
        workers: WorkerSource::Spawn {
            command: vec![BENCH.into(), "worker".into(), "--style".into(), "blocking".into()],
            cwd: None,
        },
        ..Config::default()
    };
    let listener = master::bind(&config).expect("the master binds");
    let port = listener.local_addr().unwrap().port();
    let (stop, stop_rx) = tokio::sync::mpsc::unbounded_channel();
    let (done, outcome) = mpsc::channel();
    // The master lives on one thread for its whole run: workers' death signal is tied to that thread.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = done.send(runtime.block_on(master::run(config, listener, stop_rx)));
    });
    let report = one_second_of_load(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ReplyCheck::RemoteAndIndex { concurrency: 3 },
    );
    stop.send(Stop::Graceful).unwrap();
    let outcome = outcome.recv_timeout(Duration::from_secs(10)).expect("the master stops").expect("a clean run");
    assert!(report.completed > 0, "no connection completed");
    assert_eq!(report.errors, 0, "errors: {:?}", report.first_errors);
    assert_eq!(report.misrouted, 0, "a reply came from a worker other than the hashed one");
    assert!(outcome.stats.routed.iter().sum::<u64>() >= report.completed);
    assert_eq!(outcome.stats.closed, 0);
}

#[test]
fn hash_command_prints_the_npm_benchmark_format() {
    let output = Command::new(BENCH).args(["hash", "4", "2000", "--no-node"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(&lines[..3], ["generating random ips...", "benchmarking...", "int31"]);
    assert!(lines[3].starts_with("  time (ms):  "));
    assert!(lines[4].starts_with("  scatter:  ["));
    let djb2 = lines.iter().position(|l| *l == "djb2").expect("a djb2 section");
    let scatter = lines[djb2 + 2].trim_start_matches("  scatter:  ");
    let buckets: Vec<u64> = serde_json::from_str(scatter).expect("a JSON-like scatter list");
    assert_eq!(buckets.len(), 4);
    assert_eq!(buckets.iter().sum::<u64>(), 2000);
    assert!(stdout.contains("throughput:") && stdout.contains("chi-square"));
}

#[test]
fn bad_arguments_are_one_clear_error() {
    let output = Command::new(BENCH).args(["hash", "0", "100"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.lines().next().unwrap_or("").contains("'0'"), "{stderr}");
    let output = Command::new(BENCH).args(["handoff", "--only", "xyz", "--no-build"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "error: --only takes setup letters a to g and k, not \"xyz\""
    );
}
