//! Socket activation end to end (`routing: kernel`, `worker.protocol: none`): the real binary spawning a
//! real server that knows nothing of sticky-cluster (`workers/activated.py`, standard library only, and the
//! example Go server `examples/go-server`, built with `go`), real clients from many loopback addresses. The
//! Python suite (`python/tests`) does the same with uvicorn, gunicorn and hypercorn and the real socket.io
//! client.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const LONG: Duration = Duration::from_secs(30);

fn worker_script() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers/activated.py").display().to_string()
}

/// A protocol-none cluster of `concurrency` activated workers; `extra` YAML and worker arguments added.
fn start(concurrency: u32, extra: &str, arguments: &[&str]) -> Cluster {
    Cluster::start(&config(concurrency, extra, arguments))
}

fn config(concurrency: u32, extra: &str, arguments: &[&str]) -> String {
    let mut argv = vec!["python3".to_string(), worker_script()];
    argv.extend(arguments.iter().map(|a| a.to_string()));
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "concurrency: {concurrency}\nrouting: kernel\ndebug: true\nhardShutdownDelay: 10s\n{extra}\n\
         worker:\n  protocol: none\n  command: [{}]\n",
        argv.join(", ")
    )
}

/// The pid of worker `index`'s `generation`, once the master judged it ready from its listener.
fn wait_accepting(cluster: &Cluster, index: u32, generation: u64) -> u32 {
    let line = cluster.wait_for_log_count(&format!("worker {index} started (pid "), generation as usize, LONG);
    let pid: u32 = line.split("(pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    cluster.wait_for_log(&format!("worker {index} (pid {pid}) is accepting"), LONG);
    pid
}

fn metrics_page(cluster: &Cluster) -> String {
    let address = cluster.metrics_address();
    http_text(address, "/metrics").unwrap()
}

#[test]
fn protocol_none_workers_are_socket_activated_and_routed_stickily() {
    let cluster = start(2, "metrics:\n  port: 0\n", &["--index={index}", "--fd={listen_fd}", "--backlog={backlog}"]);
    let pids = [wait_accepting(&cluster, 0, 1), wait_accepting(&cluster, 1, 1)];
    let clients: Vec<_> = (0..120).map(client_address).collect();
    let answers = ask_all(cluster.server(), &clients, 30, 2);
    assert_sticky(&answers, 2);
    for (_, answer) in &answers {
        let index = answer["worker"].as_u64().unwrap() as usize;
        assert_eq!(answer["pid"], pids[index], "the pid the master started is the one serving");
        assert_eq!(answer["listen_pid"], answer["pid"], "LISTEN_PID is the worker's own pid");
        assert_eq!(answer["listen_fds"], "1");
        assert_eq!(answer["names"], "sticky-cluster");
        assert_eq!(answer["listen_fd_variable"], "3");
        assert_eq!(answer["channel"], serde_json::Value::Null, "no channel for a worker that never reads one");
        assert_eq!(answer["blocking_at_start"], true);
        let argv: Vec<String> = serde_json::from_value(answer["argv"].clone()).unwrap();
        assert_eq!(argv, [format!("--index={index}"), "--fd=3".into(), "--backlog=1024".into()]);
    }
    let page = metrics_page(&cluster);
    for index in 0..2 {
        assert!(page.contains(&format!("sticky_cluster_worker_ready{{worker=\"{index}\"}} 1\n")), "{page}");
        assert!(page.contains(&format!("sticky_cluster_accept_queue_depth{{worker=\"{index}\"}} 0\n")), "{page}");
    }
    let log = cluster.log().join("\n");
    assert!(log.contains("pid") && log.contains("in accept() on its listener"), "the readiness sign is logged: {log}");
}

#[test]
fn a_revived_worker_gets_its_listener_back_blocking_and_its_clients() {
    // The first worker sets O_NONBLOCK on the listener, which every holder shares; its successor must
    // not inherit it (a blocking server would spin or fail on EAGAIN).
    let cluster = start(2, "", &["--leave-nonblocking"]);
    let victim = wait_accepting(&cluster, 0, 1);
    wait_accepting(&cluster, 1, 1);
    let mine = clients_for(0, 2, 20, 0);
    for &client in &mine {
        assert_eq!(cluster.get(client, "/").unwrap()["pid"], victim);
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let successor = wait_accepting(&cluster, 0, 2);
    assert_ne!(successor, victim);
    for &client in &mine {
        let answer = cluster.get(client, "/").unwrap();
        assert_eq!(answer["pid"], successor, "{client} is served on its index by the revived worker");
        assert_eq!(answer["blocking_at_start"], true, "the successor got a blocking listener");
    }
    // The select()-based worker shows no epoll or accept: its readiness came from the listener's queue
    // or the time limit, and the log says which.
    assert!(cluster.log().iter().any(|line| line.contains(&format!("worker 0 (pid {successor}) is accepting"))));
}

#[test]
fn a_sighup_rolling_restart_of_protocol_none_workers_completes() {
    let cluster = start(2, "env:\n  TEST_VERSION: 'v1'\nmetrics:\n  port: 0\n", &[]);
    wait_accepting(&cluster, 0, 1);
    wait_accepting(&cluster, 1, 1);
    cluster.rewrite_config(&config(2, "env:\n  TEST_VERSION: 'v2'\nmetrics:\n  port: 0\n", &[]));
    cluster.signal(Signal::SIGHUP);
    cluster.wait_for_log("reload: every worker runs the new configuration", LONG);
    for index in 0..2 {
        for &client in &clients_for(index, 2, 5, 0) {
            let answer = cluster.get(client, "/").unwrap();
            assert_eq!(answer["version"], "v2", "{client} still reached an old worker");
            assert_eq!(answer["worker"], index);
        }
    }
    let page = metrics_page(&cluster);
    assert!(page.contains("sticky_cluster_worker_ready{worker=\"0\"} 1\n"), "{page}");
    assert!(page.contains("sticky_cluster_worker_ready{worker=\"1\"} 1\n"), "{page}");
}

#[test]
fn the_sh_c_form_works_past_fd_9() {
    // Listener fds above 9 in the master (a dozen workers); each worker still finds its own as fd 3,
    // which dash accepts in redirections.
    let argv = format!("exec python3 {} 3<&3", worker_script());
    let yaml = format!(
        "concurrency: 12\nrouting: kernel\ndebug: true\nworker:\n  protocol: none\n  command: [sh, -c, {argv:?}]\n"
    );
    let cluster = Cluster::start(&yaml);
    for index in 0..12 {
        wait_accepting(&cluster, index, 1);
        let answer = cluster.get(clients_for(index, 12, 1, 0)[0], "/").unwrap();
        assert_eq!(answer["worker"], index);
        assert_eq!(answer["listen_pid"], answer["pid"], "sh exec'd the server in the same pid");
    }
}

#[test]
fn sigterm_ends_protocol_none_workers_and_the_master_exits_0() {
    let mut cluster = start(2, "", &[]);
    wait_accepting(&cluster, 0, 1);
    wait_accepting(&cluster, 1, 1);
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
}

fn run_binary(args: &[&str], yaml: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary());
    if let Some(yaml) = yaml {
        let path = dir.path().join("cluster.yaml");
        std::fs::write(&path, yaml).unwrap();
        command.arg("--config").arg(path);
    }
    let output = command.args(args).output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn handoff_only_settings_are_refused_with_exit_2_naming_the_key() {
    let cases: [(&[&str], Option<&str>, &str); 5] = [
        (&["--protocol", "none", "--", "w"], None, "worker.protocol: `none` needs `routing: kernel`"),
        (
            &["--routing", "kernel"],
            Some("worker:\n  command: [w]\n  protocol: none\nqueue:\n  limit: 5\n"),
            "queue.limit: does not apply to `worker.protocol: none`",
        ),
        (
            &["--routing", "kernel", "--protocol", "none"],
            Some("clientAddress: proxy-protocol\ntrustedProxies: [10.0.0.0/8]\nworker:\n  command: [w]\n"),
            "clientAddress: only `peer`",
        ),
        (&["--", "w", "--fd", "{listen_fd}"], None, "worker.command: {listen_fd}"),
        (&["--routing", "kernel", "--", "w", "{idx}"], None, "unknown placeholder {idx}"),
    ];
    for (args, yaml, expected) in cases {
        let (status, stderr) = run_binary(args, yaml);
        assert_eq!(status, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// The example Go server (`examples/go-server`: the standard library, its listener found through
/// `LISTEN_FDS` as go-systemd's `activation` finds it), built with the machine's `go`.
fn go_server() -> PathBuf {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/go-server/main.go");
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = scratch.join("go-server");
    let status = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .env("GOCACHE", scratch.join("go-cache"))
        .env("GOPATH", scratch.join("go-path"))
        .status()
        .unwrap_or_else(|e| panic!("go is missing ({e}): install Debian's golang-go, as .ci/run does"));
    assert!(status.success(), "go build of {} failed", source.display());
    out
}

#[test]
fn an_unmodified_go_server_finds_its_listener_through_listen_fds() {
    let server = go_server().display().to_string();
    let yaml = format!(
        "concurrency: 2\nrouting: kernel\ndebug: true\nhardShutdownDelay: 10s\n\
         worker:\n  protocol: none\n  command: [{server:?}]\n"
    );
    let mut cluster = Cluster::start(&yaml);
    let pids = [wait_accepting(&cluster, 0, 1), wait_accepting(&cluster, 1, 1)];
    let clients: Vec<_> = (0..200).map(client_address).collect();
    let answers = ask_all(cluster.server(), &clients, 25, 2);
    let mut used = [0; 2];
    for (client, answer) in &answers {
        let index = answer["worker"].as_u64().unwrap() as usize;
        assert_eq!(index as u32, expected_index(*client, 2), "{client} reached the wrong worker");
        assert_eq!(answer["pid"], pids[index], "{client}: served by the process the master started");
        assert_eq!(answer["remote"], client.to_string(), "Go sees the client's own address");
        used[index] += 1;
    }
    assert!(used.iter().all(|&n| n > 0), "every worker serves: {used:?}");
    // A kill -9: the successor, on index 0, gets the listener and index 0's clients.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), Signal::SIGKILL).unwrap();
    let successor = wait_accepting(&cluster, 0, 2);
    for &client in &clients_for(0, 2, 20, 0) {
        let answer = cluster.get(client, "/").unwrap();
        assert_eq!((answer["worker"].as_u64(), answer["pid"].as_u64()), (Some(0), Some(successor as u64)), "{client}");
    }
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0), "SIGTERM: each Go server shuts down, exit 0");
    eprintln!(
        "figures: go server: {} answers from 200 addresses on string_hash % 2 ({used:?}); kill -9 of pid {} revived \
         as pid {successor}; SIGTERM exit 0",
        answers.len(),
        pids[0]
    );
}
