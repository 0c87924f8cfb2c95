//! The binary's promises, end to end: the real binary, real worker processes, real TCP clients from many
//! loopback source addresses: signals and exit statuses, one-line errors, the log people read (one test
//! pins its format), the metrics page. Routing itself is asserted on the master's counters in
//! `routing.rs`, with the master in the test process.

mod support;

use std::net::Ipv4Addr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{client_address, clients_for, expected_index, Cluster, SteadyLoad};

const LONG: Duration = Duration::from_secs(30);

#[test]
fn a_killed_worker_is_revived_under_its_index_and_queued_clients_are_served() {
    let cluster = Cluster::start("concurrency: 2\nenv:\n  TEST_INIT_DELAY_MS: '300'\n");
    let victims = clients_for(0, 2, 10, 0);
    let others = clients_for(1, 2, 10, 0);
    let old_pid = cluster.get(victims[0], "/").unwrap()["pid"].as_u64().unwrap();

    // Steady load on both workers while worker 0 dies.
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let all: Vec<Ipv4Addr> = victims.iter().chain(&others).copied().collect();
    let load =
        SteadyLoad::start(server, "/", (0..4).map(|t| all.iter().copied().skip(t).step_by(4).collect()).collect());
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    cluster.wait_for_log("reviving", LONG);
    // Clients arriving while the new process initialises wait in the queue and reach it.
    let during: Vec<serde_json::Value> = victims.iter().map(|&c| cluster.get(c, "/").unwrap()).collect();
    let (served, failed) = load.stop();

    let log = cluster.log().join("\n");
    assert!(log.contains("signal 9 (SIGKILL)"), "exit reason logged:\n{log}");
    for answer in &during {
        assert_eq!(answer["worker"], 0, "same index after revival");
        assert_ne!(answer["pid"].as_u64().unwrap(), old_pid, "a new process serves index 0");
    }
    eprintln!("figures: kill -9 under steady load: sent {}, served {served}, failed {failed}", served + failed);
    assert!(served > 20, "load kept being served");
    // Only connections already inside the dead worker's channel (at most one per load thread) may be lost.
    assert!(failed <= 4, "lost {failed} connections");
    let mut cluster = cluster;
    assert!(cluster.running(), "the master never exits because a worker died");
    assert_eq!(cluster.stop()["revivals"], 1, "one revival, counted");
}

#[test]
fn a_crash_looping_worker_is_revived_with_growing_backoff() {
    let cluster = Cluster::start("concurrency: 1\nenv:\n  TEST_CRASH: '1'\n");
    let start_ticks = cluster.cpu_ticks();
    let started = std::time::Instant::now();
    let last = cluster.wait_for_log_count("reviving in", 5, LONG);
    let elapsed = started.elapsed();
    let ticks = cluster.cpu_ticks() - start_ticks;
    let lines: Vec<String> = cluster.log().into_iter().filter(|l| l.contains("reviving in")).collect();
    assert!(last.contains("exit status 3"), "{last}");
    let delays: Vec<f64> = lines
        .iter()
        .map(|line| {
            let text = line.split("reviving in ").nth(1).unwrap().split(' ').next().unwrap();
            let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic()).unwrap());
            number.parse::<f64>().unwrap() * if unit == "ms" { 0.001 } else { 1.0 }
        })
        .collect();
    for pair in delays.windows(2) {
        assert!(pair[1] > pair[0], "back-off must grow: {delays:?}");
    }
    for (attempt, line) in lines.iter().enumerate() {
        assert!(line.contains(&format!("(attempt {})", attempt + 1)), "{line}");
    }
    // Not spinning: the master used a small share of one core while waiting out the back-off.
    let ticks_per_second = 100.0;
    let cpu = ticks as f64 / ticks_per_second;
    assert!(cpu < elapsed.as_secs_f64() * 0.25, "master used {cpu}s of CPU in {elapsed:?}");
}

fn graceful_shutdown_during_a_slow_request(signal: Signal) {
    let mut cluster = Cluster::start("concurrency: 2\nhardShutdownDelay: 20s\ndebug: true\n");
    cluster.wait_all_ready(2);
    let client = client_address(7);
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let request = std::thread::spawn(move || support::get(client, server, "/sleep/2000"));
    cluster.wait_for_log(&format!("connection ::ffff:{client} -> worker"), LONG);
    std::thread::sleep(Duration::from_millis(200));
    cluster.signal(signal);
    let answer = request.join().unwrap().expect("the running request completes");
    assert_eq!(answer["worker"].as_u64().unwrap() as u32, expected_index(client, 2));
    let status = cluster.wait_exit(LONG).expect("master exits after its workers");
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    assert_eq!(cluster.wait_for_event("stopped", 1, LONG)["graceful"], true, "the ready fd agrees");
    let exits = cluster.log().iter().filter(|l| l.contains("exited: exit status 0")).count();
    assert_eq!(exits, 2, "every worker exited on its own:\n{}", cluster.log().join("\n"));
}

#[test]
fn sigterm_lets_a_running_request_finish_and_exits_zero() {
    graceful_shutdown_during_a_slow_request(Signal::SIGTERM);
}

#[test]
fn sigint_lets_a_running_request_finish_and_exits_zero() {
    graceful_shutdown_during_a_slow_request(Signal::SIGINT);
}

#[test]
fn a_worker_ignoring_sigterm_is_killed_at_the_hard_shutdown_delay() {
    let mut cluster = Cluster::start("concurrency: 2\nhardShutdownDelay: 1s\nenv:\n  TEST_IGNORE_TERM: '1'\n");
    cluster.wait_all_ready(2);
    let workers = cluster.worker_pids();
    assert_eq!(workers.len(), 2);
    cluster.signal(Signal::SIGTERM);
    let status = cluster.wait_exit(LONG).expect("master exits after the hard delay");
    assert_eq!(status.code(), Some(1), "a hard shutdown exits 1");
    assert_eq!(cluster.wait_for_event("stopped", 1, LONG)["graceful"], false, "the ready fd agrees");
    assert!(cluster.log().iter().any(|l| l.contains("hardShutdownDelay of 1s passed")));
    for pid in workers {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} was left running");
    }
}

#[test]
fn a_second_signal_stops_at_once() {
    let mut cluster = Cluster::start("concurrency: 2\nhardShutdownDelay: 60s\nenv:\n  TEST_IGNORE_TERM: '1'\n");
    // Both workers up (their SIGTERM handling installed) before the signals.
    cluster.wait_all_ready(2);
    cluster.signal(Signal::SIGTERM);
    cluster.wait_for_log("shutting down", LONG);
    assert!(cluster.wait_exit(Duration::from_millis(500)).is_none(), "still waiting for the workers");
    cluster.signal(Signal::SIGINT);
    let status = cluster.wait_exit(LONG).expect("second signal ends it well before 60s");
    assert_eq!(status.code(), Some(1));
    assert!(cluster.log().iter().any(|l| l.contains("second signal")));
}

#[test]
fn a_port_in_use_is_one_clear_line_and_no_worker_starts() {
    let taken = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let markers = tempfile::tempdir().unwrap();
    let yaml = format!("concurrency: 2\nenv:\n  TEST_MARKER_DIR: {:?}\n", markers.path().display().to_string());
    let mut cluster = Cluster::spawn(&yaml, |command| {
        command.args(["--port", &port.to_string()]);
    });
    let status = cluster.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(1));
    let log = cluster.log();
    assert_eq!(log.len(), 1, "exactly one line: {log:?}");
    assert_eq!(log[0], format!("error: cannot listen on [::]:{port}: Address already in use (os error 98)"));
    let error = cluster.wait_for_event("error", 1, LONG);
    assert_eq!(format!("error: {}", error["message"].as_str().unwrap()), log[0], "the ready fd says the same");
    assert_eq!(std::fs::read_dir(markers.path()).unwrap().count(), 0, "no worker was started");
}

#[test]
fn a_privileged_port_without_permission_is_one_clear_line() {
    // As root, drop to nobody for the master; its binary is copied where nobody may run it. Where the
    // machine lets everyone bind low ports (net.ipv4.ip_unprivileged_port_start = 0, as in some
    // containers), the master runs in a network namespace of its own that has the usual limit of 1024.
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("sticky-cluster");
    std::fs::copy(support::binary(), &binary).unwrap();
    let is_root = nix::unistd::geteuid().is_root();
    let unprivileged_start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024);
    if is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let master_args = ["--port", "1", "--host", "127.0.0.1", "--concurrency", "1", "--", "/bin/true"];
    let mut command;
    if is_root && unprivileged_start <= 1 {
        command = std::process::Command::new("unshare");
        command.arg("--net").arg("sh").arg("-c").arg(
            "ip link set lo up && echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start && \
             exec setpriv --reuid 65534 --regid 65534 --clear-groups \"$0\" \"$@\"",
        );
        command.arg(&binary).args(master_args);
    } else {
        command = std::process::Command::new(&binary);
        command.args(master_args);
        if is_root {
            command.uid(65534).gid(65534);
        }
    }
    assert!(is_root || unprivileged_start > 1, "port 1 is not privileged on this machine and we cannot make it so");
    // Never hang: a master that did get the port would run until killed.
    let mut child = command.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + LONG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the master did not exit: it could listen on port 1");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "error: cannot listen on 127.0.0.1:1: Permission denied (os error 13)");
}

#[test]
fn emfile_while_accepting_backs_off_and_serving_resumes() {
    // 1 worker that needs 2 s to start: connections queue in the master and hold its fds. Only the
    // master gets the low limit, after start-up, so the worker can still take 60 connections at once.
    let cluster = Cluster::start("concurrency: 1\ndebug: true\nenv:\n  TEST_INIT_DELAY_MS: '2000'\n");
    // The worker must have started before the limit is lowered, or it would inherit it.
    cluster.wait_for_log("worker 0 started", LONG);
    let limit = cluster.open_fds() as u64 + 15;
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    let pid = cluster.pid() as libc::pid_t;
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &rlimit, std::ptr::null_mut()) }, 0);
    let clients: Vec<Ipv4Addr> = (0..60).map(client_address).collect();
    let answers: Vec<_> = std::thread::scope(|scope| {
        let cluster = &cluster;
        let handles: Vec<_> = clients.iter().map(|&c| scope.spawn(move || cluster_get(cluster, c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers.len(), 60);
    assert!(answers.iter().all(|a| a["worker"] == 0));
    let log = cluster.log().join("\n");
    let met = log.matches("accepting on the client listener failed: Too many open files").count();
    assert!(met >= 1, "EMFILE was met and logged:\n{log}");
    // Once per episode: each episode ends with a line saying accepting works again.
    let ended = log.matches("accepting on the client listener again").count();
    assert!(met <= ended + 1, "{met} episodes started, {ended} ended:\n{log}");

    fn cluster_get(cluster: &Cluster, client: Ipv4Addr) -> serde_json::Value {
        cluster.get(client, "/").unwrap_or_else(|e| panic!("{client}: {e}"))
    }
}

#[test]
fn the_master_leaks_no_fds_over_20000_connections() {
    let cluster = Cluster::start("concurrency: 2\n");
    // Warm up: every worker ready and every lazily opened fd of the runtime in place.
    for i in 0..50 {
        cluster.get(client_address(i), "/").unwrap();
    }
    let (before, before_fds) = cluster.settled_fds(None, LONG);
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let threads: Vec<_> = (0..8u32)
        .map(|thread| {
            std::thread::spawn(move || {
                for i in 0..2500u32 {
                    let client = client_address((thread * 2500 + i) % 200);
                    support::get(client, server, "/").unwrap_or_else(|e| panic!("{client}: {e}"));
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    // A leak stays; a connection's fd closed a moment after its answer does not.
    let (after, after_fds) = cluster.settled_fds(Some(before), Duration::from_secs(5));
    assert_eq!(after, before, "master fd count changed over 20,000 connections: {before_fds:?} -> {after_fds:?}");
}

#[test]
fn debug_logs_worker_lifecycle_and_every_route() {
    let mut cluster = Cluster::start("concurrency: 2\ndebug: true\nprefix: 'demo:'\n");
    cluster.wait_all_ready(2);
    let client = client_address(3);
    let index = expected_index(client, 2);
    cluster.get(client, "/").unwrap();
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
    let log = cluster.log();
    let has = |needle: &str| log.iter().any(|l| l.starts_with("demo: ") && l.contains(needle));
    assert!(has("listening on [::]:"), "{log:?}");
    assert!(has("worker 0 started (pid") && has("worker 1 started (pid"), "{log:?}");
    assert!(has(&format!("connection ::ffff:{client} -> worker {index}")), "{log:?}");
    assert!(has("worker 0 (pid") && has("exited: exit status 0"), "{log:?}");
}

#[test]
fn quiet_by_default() {
    let mut cluster = Cluster::start("concurrency: 1\n");
    cluster.wait_all_ready(1);
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
    let log = cluster.log();
    assert!(!log.iter().any(|l| l.contains("connection ") || l.contains("started (pid")), "{log:?}");
}

#[test]
fn quick_start_from_flags_without_a_file() {
    let worker = support::test_worker();
    let args: Vec<&std::ffi::OsStr> =
        ["--port", "0", "--concurrency", "3", "--debug", "--"].iter().map(|a| a.as_ref()).collect();
    let mut cluster = Cluster::start_args(&[&args[..], &[worker.as_os_str()]].concat());
    let listening = cluster.listening();
    assert_eq!(
        (&listening["host"], &listening["workers"], &listening["routing"]),
        (&"::".into(), &3.into(), &"handoff".into())
    );
    let client = client_address(9);
    let answer = cluster.get(client, "/").unwrap();
    assert_eq!(answer["worker"].as_u64().unwrap() as u32, expected_index(client, 3));
    cluster.signal(Signal::SIGTERM);
    let status = cluster.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(0), "{:?}", status.signal());
}

#[test]
fn metrics_show_routes_queues_readiness_and_revivals() {
    let cluster = Cluster::start(
        "concurrency: 2\nmetrics:\n  port: 0\nenv:\n  TEST_SLOW_INDEX: '1'\n  TEST_INIT_DELAY_MS: '1500'\n",
    );
    let address = cluster.metrics_address();
    let page = || support::http_text(address, "/metrics").unwrap();

    // A client of the slow worker waits in its queue meanwhile.
    let waiting = clients_for(1, 2, 1, 0)[0];
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let request = std::thread::spawn(move || support::get(waiting, server, "/"));
    cluster.get(clients_for(0, 2, 1, 0)[0], "/").unwrap();
    let mut during = page();
    for _ in 0..50 {
        if during.contains("sticky_cluster_queue_depth{worker=\"1\"} 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        during = page();
    }
    assert!(during.starts_with("HTTP/1.1 200 OK"), "{during}");
    assert!(during.contains("sticky_cluster_queue_depth{worker=\"1\"} 1\n"), "{during}");
    assert!(during.contains("sticky_cluster_worker_ready{worker=\"0\"} 1\n"), "{during}");
    assert!(during.contains("sticky_cluster_worker_ready{worker=\"1\"} 0\n"), "{during}");
    assert!(during.contains("sticky_cluster_connections_routed_total{worker=\"0\"} 1\n"), "{during}");

    assert_eq!(request.join().unwrap().unwrap()["worker"], 1);
    let after = page();
    assert!(after.contains("sticky_cluster_connections_routed_total{worker=\"1\"} 1\n"), "{after}");
    assert!(after.contains("sticky_cluster_queue_depth{worker=\"1\"} 0\n"), "{after}");
    assert!(after.contains("sticky_cluster_worker_revivals_total 0\n"), "{after}");
    assert!(support::http_text(address, "/other").unwrap().starts_with("HTTP/1.1 404"));
}

#[test]
fn a_full_channel_keeps_connections_queued_and_loses_nothing() {
    // The worker says ready and then reads nothing for a while: the channel to it fills up, and the rest
    // wait in the master's queue (room for all 2,000 here) until the worker reads again.
    let cluster =
        Cluster::start("concurrency: 1\ndebug: true\nqueue:\n  limit: 4096\nenv:\n  TEST_ACCEPT_PAUSE_MS: '1500'\n");
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    cluster.wait_for_log("is ready", LONG);
    // About 2 KB of channel buffer per waiting connection is nowhere near enough for 2,000 of them.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let mut streams: Vec<std::net::TcpStream> = (0..2000)
        .map(|i| {
            let mut stream = support::connect_from(client_address(i % 200), server).unwrap();
            std::io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            stream
        })
        .collect();
    cluster.wait_for_log("channel is full", LONG);
    for stream in &mut streams {
        let mut response = String::new();
        std::io::Read::read_to_string(stream, &mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains("\"worker\":0"), "{response:?}");
    }
}

#[test]
fn the_human_log_format_stays_as_documented() {
    // People (and their log tooling) read these lines; programs read the ready fd, whose counters the
    // stopped line must agree with.
    let mut cluster = Cluster::start(
        "concurrency: 2
prefix: 'demo:'
hardShutdownDelay: 20s
",
    );
    let port = cluster.port;
    // The ready line may come before the log line's reader has it.
    cluster.wait_for_log("listening on", LONG);
    let log = cluster.log();
    assert_eq!(log.first(), Some(&format!("demo: info listening on [::]:{port} with 2 workers")), "{log:?}");
    let victim = clients_for(0, 2, 1, 0)[0];
    let pid = cluster.get(victim, "/").unwrap()["pid"].as_u64().unwrap();
    cluster.get(clients_for(1, 2, 1, 0)[0], "/").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let revival = cluster.wait_for_log("reviving in", LONG);
    let head = format!("demo: warn worker 0 (pid {pid}) exited after ");
    let (lived, tail) = revival.strip_prefix(&head).and_then(|rest| rest.split_once("s: ")).expect(&revival);
    assert!(lived.parse::<f64>().is_ok_and(|s| s >= 0.0) && lived.contains('.'), "{revival}");
    // Back-off 100 ms after a short life (a crash), none after a long one.
    let tails =
        ["signal 9 (SIGKILL); reviving in 100ms (attempt 1)", "signal 9 (SIGKILL); reviving in 0ns (attempt 1)"];
    assert!(tails.contains(&tail), "{revival}");
    cluster.get(victim, "/").expect("index 0 serves again");
    let stopped = cluster.stop();
    let routed: Vec<u64> = stopped["routed"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert_eq!(routed, vec![2, 1]);
    let expected = format!(
        "demo: info stopped: routed {} connections {routed:?}, redirected {}, closed {}, revivals {}, recovered {}",
        routed.iter().sum::<u64>(),
        stopped["redirected"],
        stopped["closed"],
        stopped["revivals"],
        stopped["recovered"]
    );
    let log = cluster.log();
    assert_eq!(log.last(), Some(&expected), "{log:?}");
    assert!(log.contains(&"demo: info shutting down: 2 workers have 20s to finish".to_string()), "{log:?}");
}
