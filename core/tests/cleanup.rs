//! What the master leaves behind: nothing of an attached peer that hung up its attach connection but
//! kept its channel, no attach socket file that is not its own, and no child of a worker after a hard stop.

mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sticky_cluster::protocol::{recv_message, send_message, Message, Received, ANY_INDEX};
use support::Cluster;

const LONG: Duration = Duration::from_secs(30);

/// Attaches as a raw peer: hello, welcome, and the channel end the master gives; returns (link, channel).
fn attach_raw(socket: &std::path::Path) -> (OwnedFd, OwnedFd) {
    let link = support::dial(socket);
    send_message(link.as_fd(), &Message::Hello { index: ANY_INDEX, pid: std::process::id() }, None, false).unwrap();
    match recv_message(link.as_fd(), false).unwrap().message {
        Message::Welcome { .. } => {}
        other => panic!("expected the welcome, got {other:?}"),
    }
    match recv_message(link.as_fd(), false).unwrap() {
        Received { message: Message::Channel, fd: Some(channel) } => (link, channel),
        other => panic!("expected the channel, got {other:?}"),
    }
}

#[test]
fn a_peer_that_hangs_up_its_attach_link_but_keeps_its_channel_leaves_nothing_in_the_master() {
    let (cluster, socket) = support::attach_cluster(1, "");
    let (baseline, _) = cluster.settled_fds(None, Duration::from_secs(5));
    let mut kept = Vec::new();
    for round in 1..=20 {
        let (link, channel) = attach_raw(&socket);
        drop(link);
        cluster.wait_for_log_count("detached; its connections wait for a new attach", round, LONG);
        kept.push(channel);
    }
    let (after, fds) = cluster.settled_fds(Some(baseline), Duration::from_secs(5));
    eprintln!("figures: 20 peers hung up their attach link and kept their channel: master fds {baseline} -> {after}");
    assert!(after <= baseline, "the master kept {} fds of peers that are gone: {fds:?}", after - baseline);
    // And the channel a peer kept is closed on the master's side: the peer learns it was let go.
    for channel in &kept {
        assert!(matches!(recv_message(channel.as_fd(), true), Err(sticky_cluster::Error::ChannelClosed)));
    }
}

#[test]
fn a_master_leaves_an_attach_socket_file_that_is_not_its_own() {
    // Master A's socket file is removed and master B binds the same path; when A stops, B's file stays.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workers.sock");
    let yaml = format!(
        "concurrency: 1\ndebug: true\nhardShutdownDelay: 5s\nworkers:\n  socket: {:?}\n",
        socket.display().to_string()
    );
    let mut first = Cluster::start(&yaml);
    std::fs::remove_file(&socket).unwrap();
    let second = Cluster::start(&yaml);
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit(LONG).unwrap().code(), Some(0));
    let log = first.log().join("\n");
    assert!(socket.exists(), "the first master removed the second's socket file:\n{log}");
    let _worker = support::Attached::start(&socket, Some(0), &[]);
    second.wait_for_log("worker 0 attached", LONG);
    assert!(log.contains("is not this master's"), "leaving it is logged:\n{log}");
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_hard_stop_takes_the_workers_children_along() {
    // Workers that ignore SIGTERM, each with a child process: after hardShutdownDelay the master kills
    // the workers, and their children must not outlive them.
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&format!(
        "concurrency: 2\nhardShutdownDelay: 300ms\nenv:\n  TEST_IGNORE_TERM: '1'\n  TEST_CHILD_DIR: {:?}\n",
        dir.path().display().to_string()
    ));
    cluster.wait_all_ready(2);
    let children: Vec<u32> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_prefix("child-")?.parse().ok())
        .collect();
    assert_eq!(children.len(), 2, "each worker started its child");
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(1), "a hard stop");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children.iter().all(|&pid| gone(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survivors: Vec<u32> = children.iter().copied().filter(|&pid| !gone(pid)).collect();
    for &pid in &survivors {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    eprintln!("figures: hard stop of 2 workers with a child each: {} children outlived it", survivors.len());
    assert!(survivors.is_empty(), "children {survivors:?} outlived the hard stop");
}
