//! `routing: kernel` end to end: the real binary holding a `SO_REUSEPORT` group, real worker processes
//! (spawned and attached) accepting from their own listeners, real clients from many loopback addresses.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{client_address, clients_for, Attached, Cluster, SteadyLoad};

const LONG: Duration = Duration::from_secs(30);

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
}

/// 220 addresses × 2 rounds from 10 threads: every answer from the contract index, each client always
/// from the same process, Node's text of the client address.
fn assert_sticky(cluster: &Cluster, concurrency: u32) {
    let clients: Vec<Ipv4Addr> = (0..220).map(client_address).collect();
    let answers = support::ask_all(cluster.server(), &clients, 22, 2);
    assert_eq!(answers.len(), 440);
    support::assert_sticky(&answers, concurrency);
}

#[test]
fn spawned_workers_get_every_client_on_its_contract_index() {
    let cluster = Cluster::start("routing: kernel\nconcurrency: 4\n");
    cluster.wait_for_log("routing: kernel (", LONG);
    assert_sticky(&cluster, 4);
    let mut cluster = cluster;
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0), "graceful exit");
}

#[test]
fn attached_workers_receive_their_listener_and_are_routed_by_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workers.sock");
    let yaml = format!(
        "routing: kernel\nconcurrency: 3\ndebug: true\nhardShutdownDelay: 5s\nworkers:\n  socket: {:?}\n",
        socket.display().to_string()
    );
    let mut cluster = Cluster::start(&yaml);
    // Index 2's clients wait in its listener's accept queue until a worker attaches for it.
    let waiting_client = clients_for(2, 3, 1, 0)[0];
    let address = server(&cluster);
    let waiting = std::thread::spawn(move || support::get(waiting_client, address, "/"));
    let workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    for index in 0..2 {
        cluster.wait_for_log(&format!("worker {index} attached"), LONG);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "nobody serves index 2 yet");
    let last = Attached::start(&socket, Some(2), &[]);
    assert_eq!(waiting.join().unwrap().unwrap()["worker"], 2, "the waiting client reached index 2");
    assert_sticky(&cluster, 3);
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0), "attached workers drained and detached");
    drop((workers, last));
}

#[test]
fn kill_9_under_load_the_dead_workers_clients_wait_for_its_revival() {
    let cluster = Cluster::start("routing: kernel\nconcurrency: 2\nenv:\n  TEST_INIT_DELAY_MS: '400'\n");
    let victims = clients_for(0, 2, 20, 0);
    let others = clients_for(1, 2, 10, 0);
    let old_pid = cluster.get(victims[0], "/").unwrap()["pid"].as_u64().unwrap();
    let load = SteadyLoad::start(
        server(&cluster),
        "/",
        (0..2).map(|t| others.iter().copied().skip(t).step_by(2).collect()).collect(),
    );
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    cluster.wait_for_log("reviving", LONG);
    // Twenty clients arrive while index 0 has no process: they wait in its listener's queue.
    let address = server(&cluster);
    let during: Vec<_> = victims.iter().map(|&c| std::thread::spawn(move || support::get(c, address, "/"))).collect();
    let during: Vec<serde_json::Value> =
        during.into_iter().map(|h| h.join().unwrap().expect("served after revival")).collect();
    let (served, failed) = load.stop();
    for answer in &during {
        assert_eq!(answer["worker"], 0, "same index after revival");
        assert_ne!(answer["pid"].as_u64().unwrap(), old_pid, "a new process serves index 0");
    }
    assert!(served > 20, "the other worker kept serving: {served}");
    assert_eq!(failed, 0, "the other worker's clients saw no error");
}

#[test]
fn connections_completed_before_sigterm_are_all_served() {
    // Worker 0 says ready, then does not accept for 1.5 s: its clients sit in the kernel's accept queue.
    let cluster = Cluster::start(
        "routing: kernel\nconcurrency: 2\nmetrics:\n  port: 0\nhardShutdownDelay: 10s\n\
         env:\n  TEST_SLOW_INDEX: '0'\n  TEST_ACCEPT_PAUSE_MS: '1500'\n",
    );
    let metrics = cluster.metrics_address();
    cluster.get(clients_for(1, 2, 1, 0)[0], "/").unwrap();
    let address = server(&cluster);
    let queued: Vec<_> = clients_for(0, 2, 8, 0)
        .into_iter()
        .map(|c| std::thread::spawn(move || support::get(c, address, "/")))
        .collect();
    let mut page = String::new();
    for _ in 0..50 {
        page = support::http_text(metrics, "/metrics").unwrap();
        if page.contains("sticky_cluster_accept_queue_depth{worker=\"0\"} 8\n") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(page.contains("sticky_cluster_accept_queue_depth{worker=\"0\"} 8\n"), "{page}");
    assert!(page.contains("sticky_cluster_accept_queue_depth{worker=\"1\"} 0\n"), "{page}");
    let mut cluster = cluster;
    cluster.signal(Signal::SIGTERM);
    for handle in queued {
        assert_eq!(handle.join().unwrap().expect("a queued connection was served")["worker"], 0);
    }
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
}

/// What happened to the connections a load thread made: answered, refused at connect (no listener: the
/// kernel never completed them), or reset (at connect, by a listener closing mid-handshake, or after the
/// kernel completed them) or closed without an answer.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    served: u64,
    refused: u64,
    reset: u64,
}

#[test]
fn sigterm_under_load_resets_few_and_the_figure_is_printed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = Cluster::start("routing: kernel\nconcurrency: 2\n");
    let address = server(&cluster);
    let exited = std::sync::Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let exited = exited.clone();
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                for i in (t..).step_by(4) {
                    if exited.load(Ordering::SeqCst) {
                        break;
                    }
                    match support::connect_from(client_address(i % 200), address) {
                        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => tally.refused += 1,
                        // A SYN that reached a listener as it closed: the kernel answers the handshake with RST.
                        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => tally.reset += 1,
                        Err(e) => panic!("connect: {e}"),
                        Ok(mut stream) => {
                            use std::io::{Read, Write};
                            let mut answer = String::new();
                            let ok = stream
                                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                                .and_then(|_| stream.read_to_string(&mut answer))
                                .is_ok();
                            if ok && answer.starts_with("HTTP/1.1 200") {
                                tally.served += 1;
                            } else {
                                tally.reset += 1;
                            }
                        }
                    }
                }
                tally
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut cluster = cluster;
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    exited.store(true, Ordering::SeqCst);
    let total = threads.into_iter().map(|t| t.join().unwrap()).fold(Tally::default(), |a, b| Tally {
        served: a.served + b.served,
        refused: a.refused + b.refused,
        reset: a.reset + b.reset,
    });
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default();
    // Printed for the README's figure (`cargo test --test kernel sigterm -- --nocapture`).
    println!("kernel-mode SIGTERM under load (4 threads): {total:?}, tcp_migrate_req={}", migrate.trim());
    assert!(total.served > 20, "load was served before the shutdown: {total:?}");
    assert!(total.refused > 0, "the load ran past the shutdown: {total:?}");
}

#[test]
fn a_port_another_process_listens_on_is_refused() {
    let taken = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cluster = Cluster::spawn("routing: kernel\nconcurrency: 2\n", |command| {
        command.args(["--port", &port.to_string()]);
    });
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(1));
    let log = cluster.log();
    assert_eq!(log.len(), 1, "exactly one line: {log:?}");
    assert_eq!(log[0], format!("error: cannot listen on [::]:{port}: Address already in use (os error 98)"));
}

fn check(args: &[&str], yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = Command::new(support::binary()).arg("--config").arg(&path).arg("--check").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    (output.status.code().unwrap(), String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
}

#[test]
fn a_client_address_from_headers_is_refused_with_kernel_routing() {
    for source in ["proxy-protocol", "x-forwarded-for"] {
        let yaml = format!("routing: kernel\nclientAddress: {source}\nworker:\n  command: [./w]\n");
        let (code, _, stderr) = check(&[], &yaml);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: FILE: clientAddress: only `peer` works with `routing: kernel`"), "{stderr}");
        // The flag meets the same check.
        let yaml = format!("clientAddress: {source}\nworker:\n  command: [./w]\n");
        let (code, _, stderr) = check(&["--routing", "kernel"], &yaml);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("clientAddress: only `peer`"), "{stderr}");
    }
    let (code, _, stderr) = check(&[], "routing: kernal\nworker:\n  command: [./w]\n");
    assert_eq!(code, 2);
    assert!(stderr.starts_with("error: FILE:1: routing: unknown variant `kernal`"), "{stderr}");
}

#[test]
fn check_prints_the_mode_the_backlog_and_the_program() {
    let (code, stdout, stderr) =
        check(&["--routing", "kernel"], "backlog: 64\nconcurrency: 3\nworker:\n  command: [./w]\n");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("routing: kernel\nbacklog: 64\n"), "{stdout}");
    let program = stdout.lines().find(|l| l.starts_with("# kernel program: ")).unwrap_or_else(|| panic!("{stdout}"));
    let length: usize = program["# kernel program: ".len()..].split_whitespace().next().unwrap().parse().unwrap();
    assert!((100..4096).contains(&length), "{program}");
    assert!(program.contains("::ffff:a.b.c.d"), "{program}");
    let (code, stdout, _) = check(&[], "worker:\n  command: [./w]\n");
    assert_eq!(code, 0);
    assert!(stdout.contains("routing: handoff\nbacklog: 1024\n") && !stdout.contains("# kernel program"), "{stdout}");
}

fn reload_config(echo: &str) -> String {
    format!(
        "routing: kernel\nconcurrency: 2\nhardShutdownDelay: 10s\n\
         env:\n  TEST_ECHO: '{echo}-{{index}}'\n  TEST_INIT_DELAY_MS: '200'\n"
    )
}

#[test]
fn a_rolling_restart_keeps_the_listeners_and_loses_no_connection() {
    let cluster = Cluster::start(&reload_config("v1"));
    cluster.wait_all_ready(2);
    let answers = |cluster: &Cluster| -> Vec<serde_json::Value> {
        (0..2).map(|index| cluster.get(clients_for(index, 2, 1, 0)[0], "/").unwrap()).collect()
    };
    let before = answers(&cluster);
    let load = SteadyLoad::start(
        server(&cluster),
        "/sleep/20",
        (0..4u32).map(|t| (t * 10..t * 10 + 10).map(client_address).collect()).collect(),
    );
    std::thread::sleep(Duration::from_millis(200));
    cluster.rewrite_config(&reload_config("v2"));
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("every worker runs the new configuration", LONG);
    std::thread::sleep(Duration::from_millis(200));
    let (served, failed) = load.stop();
    assert_eq!(failed, 0, "a rolling restart loses no connection: each successor takes the same listener");
    assert!(served > 20, "{served}");
    let after = answers(&cluster);
    for index in 0..2 {
        assert_eq!(after[index]["worker"], index as u64);
        assert_eq!(after[index]["echo"], format!("v2-{index}"), "the new environment is in effect");
        assert_ne!(after[index]["pid"], before[index]["pid"], "worker {index} was restarted");
    }
    assert_sticky(&cluster, 2);
}
