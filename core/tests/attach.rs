//! Attach mode: workers started elsewhere dial the master's Unix socket and claim an index; bad claims
//! are refused with a logged reason while the cluster keeps serving.

mod support;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use sticky_cluster::protocol::{recv_message, Message};
use support::{attach_cluster, client_address, clients_for, expected_index, Attached, Cluster};

const LONG: Duration = Duration::from_secs(30);

fn attach_worker(socket: &Path, index: Option<u32>) -> Attached {
    Attached::start(socket, index, &[])
}

#[test]
fn attached_workers_are_routed_stickily_and_a_missing_index_queues() {
    let (mut cluster, socket) = attach_cluster(4, "");
    let workers: Vec<Attached> = (0..3).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    for index in 0..3 {
        cluster.wait_for_log(&format!("worker {index} (pid"), LONG);
    }
    // Index 3 has no worker yet: its clients wait in the queue until one attaches.
    let waiting_client = clients_for(3, 4, 1, 0)[0];
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let waiting = std::thread::spawn(move || support::get(waiting_client, server, "/"));
    cluster.wait_for_log(&format!("connection ::ffff:{waiting_client} -> worker 3"), LONG);
    let last = attach_worker(&socket, None);
    assert_eq!(waiting.join().unwrap().unwrap()["worker"], 3, "the free index 3 was given to the new worker");

    for i in 0..200 {
        let client = client_address(i);
        let answer = cluster.get(client, "/").unwrap();
        assert_eq!(answer["worker"].as_u64().unwrap() as u32, expected_index(client, 4), "{client}");
    }
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0), "attached workers drained and detached");
    assert!(!socket.exists(), "the socket file is removed on exit");
    drop((workers, last));
}

#[test]
fn bad_claims_are_refused_and_the_master_keeps_serving() {
    let (mut cluster, socket) = attach_cluster(2, "");
    let _workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    cluster.wait_all_ready(2);

    // A second claim for a live index.
    let output = Command::new(support::test_worker())
        .env("STICKY_CLUSTER_SOCKET", &socket)
        .env("STICKY_CLUSTER_WORKER_INDEX", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("refused: index 1 is already attached"), "{stderr}");

    // An index out of range.
    let output = Command::new(support::test_worker())
        .env("STICKY_CLUSTER_SOCKET", &socket)
        .env("STICKY_CLUSTER_WORKER_INDEX", "7")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("index 7 is out of range (concurrency 2)"));

    // Garbage bytes and a wrong protocol version.
    for (datagram, reason) in [
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not a sticky-cluster message"),
        (
            {
                let mut hello = Message::Hello { index: 0, pid: 1 }.encode();
                hello[2] = 9;
                hello
            },
            "protocol version 9",
        ),
    ] {
        let dialer = support::dial(&socket);
        nix::sys::socket::send(dialer.as_raw_fd(), &datagram, nix::sys::socket::MsgFlags::empty()).unwrap();
        match recv_message(dialer.as_fd(), false).unwrap().message {
            Message::Refused { reason: text } => assert!(text.contains(reason), "{text}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        cluster.wait_for_log(reason, LONG);
    }

    // A peer uid that is not allowed (needs root to become another user).
    if nix::unistd::geteuid().is_root() {
        let dir = tempfile::tempdir().unwrap();
        let worker = dir.path().join("test-worker");
        std::fs::copy(support::test_worker(), &worker).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let output =
            Command::new(&worker).env("STICKY_CLUSTER_SOCKET", &socket).uid(65534).gid(65534).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("uid 65534") && stderr.contains("not in allowUids"), "{stderr}");
    }

    for i in 0..20 {
        let client = client_address(i);
        assert_eq!(cluster.get(client, "/").unwrap()["worker"].as_u64().unwrap() as u32, expected_index(client, 2));
    }
    assert!(cluster.running());
}

#[test]
fn a_detached_index_waits_for_the_next_attach() {
    let (cluster, socket) = attach_cluster(2, "");
    let mut workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    cluster.wait_all_ready(2);
    drop(workers.remove(0));
    cluster.wait_for_log("worker 0 (pid", LONG);
    cluster.wait_for_log("detached; its connections wait", LONG);
    let client = clients_for(0, 2, 1, 0)[0];
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let waiting = std::thread::spawn(move || support::get(client, server, "/"));
    cluster.wait_for_log(&format!("connection ::ffff:{client} -> worker 0"), LONG);
    let _again = Attached::start(&socket, Some(0), &[]);
    assert_eq!(waiting.join().unwrap().unwrap()["worker"], 0);
}

#[test]
fn a_killed_attached_worker_loses_nothing_that_waited_in_its_channel() {
    // As for spawned workers: one attached worker serving one connection per 50 ms, 100 clients at once,
    // killed after 1 s; the worker attached next serves everything the dead one never received.
    let (cluster, socket) = attach_cluster(1, "queue:\n  maxWait: 30s\n");
    let mut first = { Attached::start(&socket, None, &[("TEST_SERVE_INTERVAL_MS", "50")]) };
    cluster.wait_all_ready(1);
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let clients: Vec<std::net::Ipv4Addr> = (0..100u8).map(|i| std::net::Ipv4Addr::new(127, 4, 1, i + 1)).collect();
    let load = std::thread::spawn(move || {
        let threads: Vec<_> =
            clients.iter().map(|&client| std::thread::spawn(move || support::get(client, server, "/"))).collect();
        threads.into_iter().map(|thread| thread.join().unwrap()).collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(1));
    let old_pid = first.0.id();
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    cluster.wait_for_log("detached; its connections wait for a new attach", LONG);
    let _second = Attached::start(&socket, Some(0), &[]);
    let answers = load.join().unwrap();
    let served = answers.iter().filter(|answer| answer.is_ok()).count();
    let by_successor = answers
        .iter()
        .filter(|answer| answer.as_ref().is_ok_and(|a| a["pid"].as_u64() != Some(u64::from(old_pid))))
        .count();
    eprintln!("figures: attached kill -9: sent 100, served {served}, by the next attached worker {by_successor}");
    assert!(served >= 99, "{served} of 100 answered:\n{}", cluster.log().join("\n"));
    assert!(by_successor >= 50, "the next attached worker served what the dead one left ({by_successor})");
}

fn attach_yaml(socket: &Path, mode: &str, allow_uids: &str) -> String {
    format!(
        "concurrency: 2\ndebug: true\nhardShutdownDelay: 5s\nworkers:\n  socket: {:?}\n  mode: {mode}\n  allowUids: {allow_uids}\n",
        socket.display().to_string()
    )
}

#[test]
fn the_socket_gets_exactly_its_octal_mode_whatever_the_umask() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    for (written, expected) in [("0o660", 0o660), ("0660", 0o660), ("\"0640\"", 0o640)] {
        let socket = dir.path().join(format!("m{expected:o}.sock"));
        let cluster = Cluster::start_with(&attach_yaml(&socket, written, "[]"), |command| {
            // SAFETY: umask is async-signal-safe; the child runs nothing else before exec.
            unsafe {
                command.pre_exec(|| {
                    libc::umask(0o077);
                    Ok(())
                });
            }
        });
        let mode = std::fs::symlink_metadata(&socket).unwrap().mode() & 0o7777;
        assert_eq!(mode, expected, "{written} under umask 077 gives {mode:04o}");
        drop(cluster);
    }
}

#[test]
fn a_symlink_or_a_live_masters_socket_is_never_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A symlink where the socket should be: refused, and its target keeps its mode.
    let target = dir.path().join("precious");
    std::fs::write(&target, "data").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut refused = Cluster::spawn(&attach_yaml(&link, "\"0666\"", "[]"), |_| {});
    assert_eq!(refused.wait_exit(LONG).unwrap().code(), Some(1));
    refused.wait_for_log("exists and is not a socket", LONG);
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());

    // A second master on a live master's socket: refused, and the first keeps serving attaches.
    let socket = dir.path().join("live.sock");
    let first = Cluster::start(&attach_yaml(&socket, "\"0600\"", "[]"));
    let mut second = Cluster::spawn(&attach_yaml(&socket, "\"0600\"", "[]"), |_| {});
    assert_eq!(second.wait_exit(LONG).unwrap().code(), Some(1));
    second.wait_for_log("another master is listening on this socket", LONG);
    let _workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    first.wait_all_ready(2);

    // A stale socket file (its master gone) is replaced.
    drop((first, _workers));
    assert!(socket.exists(), "a killed master leaves its socket file behind");
    let again = Cluster::start(&attach_yaml(&socket, "\"0600\"", "[]"));
    let _workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    again.wait_all_ready(2);
}

#[test]
fn handshakes_are_bounded_and_silent_dialers_do_not_block_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workers.sock");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let yaml = format!("{}metrics:\n  port: {metrics}\n", attach_yaml(&socket, "\"0600\"", "[]"));
    let cluster = Cluster::start(&yaml);
    let silent: Vec<std::os::fd::OwnedFd> =
        (0..sticky_cluster::attach::HANDSHAKE_LIMIT).map(|_| support::dial(&socket)).collect();
    // Every slot is held by a dialer that says nothing: the next one is refused with the reason.
    let mut refused = None;
    for _ in 0..50 {
        let output = Command::new(support::test_worker()).env("STICKY_CLUSTER_SOCKET", &socket).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if stderr.contains("other workers are attaching") {
            refused = Some(stderr);
            break;
        }
        // The master may not have accepted every silent dialer yet.
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused.is_some(), "the 65th handshake is refused");
    let page = support::http_text(std::net::SocketAddr::from(([127, 0, 0, 1], metrics)), "/metrics").unwrap();
    let gauge = format!("sticky_cluster_attach_handshakes {}\n", sticky_cluster::attach::HANDSHAKE_LIMIT);
    assert!(page.contains(&gauge), "{page}");
    cluster.wait_for_log("handshakes finish", LONG);
    drop(silent);
    // Each silent dialer's hang-up ends its handshake (logged as a refusal), freeing its slot.
    cluster.wait_for_log_count("refused a worker on", sticky_cluster::attach::HANDSHAKE_LIMIT, LONG);
    let _workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    cluster.wait_all_ready(2);
}

#[test]
fn allow_uids_changes_apply_on_sighup() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("allow_uids_changes_apply_on_sighup needs root to run a worker as another uid; checked in CI");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("workers.sock");
    let worker = dir.path().join("test-worker");
    std::fs::copy(support::test_worker(), &worker).unwrap();
    let cluster = Cluster::start(&attach_yaml(&socket, "\"0666\"", "[]"));
    let as_nobody = || {
        let mut command = Command::new(&worker);
        command.env("STICKY_CLUSTER_SOCKET", &socket).uid(65534).gid(65534);
        command
    };
    // Refused at accept, before the hello is read, yet the worker always learns why (20 tries: the
    // hello may or may not be queued when the master closes).
    for _ in 0..20 {
        let output = as_nobody().output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("uid 65534") && stderr.contains("not in allowUids"), "refused: {stderr}");
    }
    cluster.rewrite_config(&attach_yaml(&socket, "\"0666\"", "[65534]"));
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("allowUids is now [65534]", LONG);
    let _nobody = Attached(as_nobody().stdin(Stdio::null()).spawn().unwrap());
    cluster.wait_for_log("attached (pid", LONG);
    let line = cluster.wait_for_log("uid 65534)", LONG);
    assert!(line.contains("attached"), "{line}");
}

#[test]
fn check_prints_the_mode_as_written_in_octal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    for (written, printed) in [("0o660", "\"0660\""), ("0660", "\"0660\""), ("\"0640\"", "\"0640\"")] {
        std::fs::write(&path, format!("workers:\n  socket: /run/x.sock\n  mode: {written}\n")).unwrap();
        let output = Command::new(support::binary()).arg("--check").arg("--config").arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(&format!("  mode: {printed}\n")), "{written}: {stdout}");
    }
    std::fs::write(&path, "workers:\n  socket: /run/x.sock\n  mode: 660\n").unwrap();
    let output = Command::new(support::binary()).arg("--check").arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("workers.mode: \"660\" is not an octal file mode"));
}
