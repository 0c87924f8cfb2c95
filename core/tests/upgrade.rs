//! SIGUSR2 re-executes the master in place: the same pid, the same workers (still its children), every
//! held connection on the same worker, no new client refused, reset, misrouted or stalled, the same fds,
//! counters going on; and when the new binary is not fit, nothing changes or the old one comes back.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::netns::{run_ip, VethPair};
use support::{connect_from, expected_index, Attached, Cluster};

const LONG: Duration = Duration::from_secs(30);

/// The master's binary as a copy at a path of its own, which an upgrade replaces the way a package
/// manager does (a new file renamed over the old one).
struct Build {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Build {
    fn new() -> Build {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sticky-cluster");
        let build = Build { dir, path };
        build.replace(0);
        build
    }

    /// Puts a build of the same code at the path, `generation` bytes longer: another build id.
    fn replace(&self, generation: usize) {
        let mut bytes = std::fs::read(support::binary()).unwrap();
        bytes.extend(std::iter::repeat_n(0u8, generation));
        self.install(&bytes);
    }

    /// Puts a shell script at the path (a build that cannot be run as the master).
    fn replace_with_script(&self, script: &str) {
        self.install(format!("#!/bin/sh\n{script}\n").as_bytes());
    }

    fn install(&self, bytes: &[u8]) {
        // A file that some process has open for writing cannot be executed (ETXTBSY), and a child that
        // another test's thread forks while this process holds a write fd keeps a copy of it until its own
        // exec. So this process writes only a staging file that is never run, and `cp`, a process of its
        // own that starts nothing, writes the file that is.
        let (staged, next) = (self.dir.path().join(".staged"), self.dir.path().join(".next"));
        std::fs::write(&staged, bytes).unwrap();
        let copied = std::process::Command::new("cp").arg(&staged).arg(&next).status().unwrap();
        assert!(copied.success(), "cp {}: {copied}", next.display());
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&next, &self.path).unwrap();
    }
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn sorted(mut pids: Vec<u32>) -> Vec<u32> {
    pids.sort_unstable();
    pids
}

/// Where clients dial the master: its address of each family, on its port.
#[derive(Clone, Copy)]
struct ServerAddresses {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    port: u16,
}

impl ServerAddresses {
    fn loopback(cluster: &Cluster) -> ServerAddresses {
        ServerAddresses { v4: Ipv4Addr::LOCALHOST, v6: Ipv6Addr::LOCALHOST, port: cluster.port }
    }

    /// The server's address in `client`'s family.
    fn for_client(&self, client: IpAddr) -> SocketAddr {
        match client {
            IpAddr::V4(_) => SocketAddr::new(self.v4.into(), self.port),
            IpAddr::V6(_) => SocketAddr::new(self.v6.into(), self.port),
        }
    }
}

/// A connection held open that answers `{"worker","pid"}` for every line.
struct Held {
    client: IpAddr,
    stream: TcpStream,
}

impl Held {
    fn open(client: impl Into<IpAddr>, server: ServerAddresses) -> Held {
        let client = client.into();
        let mut stream = connect_from(client, server.for_client(client)).unwrap_or_else(|e| panic!("{client}: {e}"));
        stream.write_all(b"LINES\n").unwrap();
        Held { client, stream }
    }

    fn ask(&mut self) -> std::io::Result<Value> {
        self.stream.write_all(b"?\n")?;
        let mut line = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            if self.stream.read(&mut byte)? == 0 {
                return Err(std::io::Error::other(format!("{} was closed", self.client)));
            }
            line.push(byte[0]);
        }
        serde_json::from_slice(&line).map_err(std::io::Error::other)
    }
}

/// New clients from rotating source addresses, each checked against its contract index and timed.
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 7]>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What [`Load`] counted.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    served: u64,
    refused: u64,
    reset: u64,
    other: u64,
    wrong_index: u64,
    slow_connects: u64,
    /// The longest a request took, connect to answer (ms): the gap a new client saw.
    longest_ms: u64,
}

impl Load {
    /// One thread per list of source addresses, each cycling through its list. The threads are in the
    /// network namespace of the thread that calls this (a new thread starts in its creator's).
    fn start(server: ServerAddresses, concurrency: u32, sources: &[Vec<IpAddr>]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 7]> = Arc::new(Default::default());
        let threads = sources
            .iter()
            .map(|clients| {
                let (stop, counts, clients) = (stop.clone(), counts.clone(), clients.clone());
                std::thread::spawn(move || {
                    for client in clients.iter().cycle() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let started = Instant::now();
                        let outcome = Load::one(*client, server.for_client(*client), concurrency);
                        counts[6].fetch_max(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                        let slot = match outcome {
                            Ok((true, slow)) => {
                                if slow {
                                    counts[5].fetch_add(1, Ordering::SeqCst);
                                }
                                0
                            }
                            Ok((false, _)) => 4,
                            Err(error) => match error.kind() {
                                std::io::ErrorKind::ConnectionRefused => 1,
                                std::io::ErrorKind::ConnectionReset => 2,
                                _ => 3,
                            },
                        };
                        counts[slot].fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load { stop, counts, threads }
    }

    /// One request: whether it reached its contract index, and whether connecting took over 900 ms
    /// (a SYN that had to be retransmitted).
    fn one(client: IpAddr, server: SocketAddr, concurrency: u32) -> std::io::Result<(bool, bool)> {
        let started = Instant::now();
        let mut stream = connect_from(client, server)?;
        let slow = started.elapsed() > Duration::from_millis(900);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let body = response.split("\r\n\r\n").nth(1).ok_or_else(|| std::io::Error::other("no answer"))?;
        let answer: Value = serde_json::from_str(body.trim()).map_err(std::io::Error::other)?;
        Ok((answer["worker"].as_u64() == Some(u64::from(expected_index(client, concurrency))), slow))
    }

    fn stop(self) -> Counts {
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().for_each(|thread| thread.join().unwrap());
        let count = |i: usize| self.counts[i].load(Ordering::SeqCst);
        Counts {
            served: count(0),
            refused: count(1),
            reset: count(2),
            other: count(3),
            wrong_index: count(4),
            slow_connects: count(5),
            longest_ms: count(6),
        }
    }
}

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
}

/// `threads` lists of 250 loopback sources, 127.30.0.1 on: one list per load thread.
fn loopback_sources(threads: u8) -> Vec<Vec<IpAddr>> {
    (0..threads)
        .map(|thread| {
            (0..250u32).map(|i| Ipv4Addr::new(127, 30 + thread, (i / 200) as u8, (i % 200 + 1) as u8).into()).collect()
        })
        .collect()
}

/// The routed total on the metrics page.
fn routed_total(metrics: SocketAddr) -> u64 {
    let page = support::http_text(metrics, "/metrics").unwrap();
    page.lines()
        .filter_map(|line| line.strip_prefix("sticky_cluster_connections_routed_total{"))
        .map(|line| line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Three upgrades in a row under load from `rotating` sources (one list per load thread), with `held`
/// connections open, checked as the issue asks.
fn three_upgrades(
    build: &Build,
    cluster: &mut Cluster,
    concurrency: u32,
    server: ServerAddresses,
    rotating: &[Vec<IpAddr>],
    held: &mut [Held],
) {
    let master = cluster.pid();
    let workers = sorted(cluster.worker_pids());
    assert_eq!(workers.len(), concurrency as usize);
    let before: Vec<Value> = held.iter_mut().map(|held| held.ask().unwrap()).collect();
    for (held, answer) in held.iter().zip(&before) {
        assert_eq!(answer["worker"], expected_index(held.client, concurrency), "{}", held.client);
    }
    let (fds, _) = cluster.settled_fds(None, Duration::from_secs(5));
    // The same load for as long without an upgrade: what "longest" is on this machine at this moment.
    let baseline = Load::start(server, concurrency, rotating);
    std::thread::sleep(Duration::from_millis(1200));
    let baseline = baseline.stop();
    let load = Load::start(server, concurrency, rotating);
    std::thread::sleep(Duration::from_millis(300));
    let mut builds = vec![];
    let started = Instant::now();
    for generation in 1..=3 {
        build.replace(generation);
        cluster.signal(Signal::SIGUSR2);
        let upgraded = cluster.wait_for_event("upgraded", generation, LONG);
        builds.push(upgraded["build"].as_str().unwrap().to_string());
        assert_eq!(upgraded["pid"], master, "{upgraded}");
        assert_eq!(upgraded["port"], cluster.port, "the same listener: {upgraded}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let took = started.elapsed();
    let counts = load.stop();
    eprintln!(
        "figures: three upgrades in {took:?} under load from {} rotating sources: {counts:?}, {} held \
         connections; without an upgrade, the longest request took {} ms of {} served",
        rotating.iter().map(Vec::len).sum::<usize>(),
        held.len(),
        baseline.longest_ms,
        baseline.served
    );
    builds.dedup();
    assert_eq!(builds.len(), 3, "three distinct builds took over: {builds:?}");
    assert_eq!(
        counts,
        Counts { served: counts.served, longest_ms: counts.longest_ms, ..Counts::default() },
        "no client refused, reset, misrouted or stalled"
    );
    assert!(counts.served > 100, "{counts:?}");
    assert_eq!(cluster.pid(), master);
    assert!(cluster.running());
    assert_eq!(sorted(cluster.worker_pids()), workers, "the same worker processes");
    for pid in &workers {
        assert_eq!(parent_of(*pid), master, "worker {pid} is still the master's child");
    }
    for (held, answer) in held.iter_mut().zip(&before) {
        let again = held.ask().unwrap_or_else(|e| panic!("held connection of {}: {e}", held.client));
        assert_eq!(again, *answer, "{} answers from the same worker and pid", held.client);
    }
    let (after, targets) = cluster.settled_fds(Some(fds), Duration::from_secs(5));
    assert_eq!(after, fds, "the master's fds after three upgrades: {targets:?}");
}

#[test]
fn three_upgrades_under_load_keep_every_connection_worker_and_counter() {
    let build = Build::new();
    let mut cluster = Cluster::start_program(&build.path, "concurrency: 4\nmetrics:\n  port: 0\n", |_| {});
    let metrics = cluster.metrics_address();
    cluster.wait_all_ready(4);
    let addresses = ServerAddresses::loopback(&cluster);
    let mut held: Vec<Held> = (0..200u32)
        .map(|i| Held::open(Ipv4Addr::new(127, 20, (i / 100) as u8, (i % 100 + 1) as u8), addresses))
        .collect();
    let routed_before = routed_total(metrics);
    three_upgrades(&build, &mut cluster, 4, addresses, &loopback_sources(4), &mut held);
    let routed_after = routed_total(metrics);
    assert!(routed_after > routed_before + 100, "the counters went on");
    drop(held);
    let stopped = cluster.stop();
    assert_eq!(stopped["graceful"], true);
    let routed: u64 = stopped["routed"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum();
    assert!(routed >= routed_after, "the last image's counters include the first's: {stopped}");
    assert_eq!(cluster.ready_lines().len(), 5, "listening, three upgraded, stopped: {:?}", cluster.ready_lines());
}

#[test]
fn a_build_that_fails_its_preflight_changes_nothing() {
    let build = Build::new();
    let cluster = Cluster::start_program(&build.path, "concurrency: 2\n", |_| {});
    cluster.wait_all_ready(2);
    let workers = sorted(cluster.worker_pids());
    build.replace_with_script("echo 'not a sticky-cluster'; exit 0");
    cluster.signal(Signal::SIGUSR2);
    let refused = cluster.wait_for_event("upgrade_refused", 1, LONG);
    assert!(refused["reason"].as_str().unwrap().contains("does not say which state versions it reads"), "{refused}");
    build.replace_with_script("echo 'error: cluster.yaml:1: no' >&2; exit 2");
    cluster.signal(Signal::SIGUSR2);
    let refused = cluster.wait_for_event("upgrade_refused", 2, LONG);
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains("refused the configuration") && reason.contains("cluster.yaml:1: no"), "{refused}");
    let line = cluster.wait_for_log_count("upgrade refused", 2, LONG);
    assert!(line.ends_with(reason), "the log says the same: {line}");
    assert_eq!(sorted(cluster.worker_pids()), workers);
    cluster.get(Ipv4Addr::new(127, 21, 0, 1), "/").expect("still serving");
    assert!(!cluster.log().iter().any(|l| l.contains("upgrading in place")));
}

#[test]
fn a_build_that_fails_after_the_exec_rolls_back_and_loses_nothing() {
    let build = Build::new();
    let fault = build.dir.path().join("fault");
    let mut cluster = Cluster::start_program(&build.path, "concurrency: 2\n", |command| {
        command.env("STICKY_CLUSTER_UPGRADE_FAULT_FILE", &fault);
    });
    cluster.wait_all_ready(2);
    let workers = sorted(cluster.worker_pids());
    let addresses = ServerAddresses::loopback(&cluster);
    let mut held: Vec<Held> =
        (0..20u32).map(|i| Held::open(Ipv4Addr::new(127, 22, 0, i as u8 + 1), addresses)).collect();
    let before: Vec<Value> = held.iter_mut().map(|held| held.ask().unwrap()).collect();
    std::fs::write(&fault, "fail").unwrap();
    let load = Load::start(addresses, 2, &loopback_sources(2));
    build.replace(1);
    cluster.signal(Signal::SIGUSR2);
    let line = cluster.wait_for_log("going back to the previous binary", LONG);
    assert!(line.contains("fault file says fail"), "{line}");
    let rolled_back = cluster.wait_for_event("rolled_back", 1, LONG);
    assert_eq!(rolled_back["build"], cluster.listening()["build"], "the previous build runs again");
    std::thread::sleep(Duration::from_millis(300));
    let counts = load.stop();
    eprintln!("figures: a failed upgrade rolled back under load: {counts:?}");
    assert_eq!(
        counts,
        Counts { served: counts.served, longest_ms: counts.longest_ms, ..Counts::default() },
        "nothing lost"
    );
    assert_eq!(sorted(cluster.worker_pids()), workers);
    for (held, answer) in held.iter_mut().zip(&before) {
        assert_eq!(held.ask().unwrap(), *answer);
    }
    drop(held);
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
    let events: Vec<Value> = cluster.ready_lines().iter().map(|line| line["event"].clone()).collect();
    assert_eq!(events, ["listening", "rolled_back", "stopped"], "no upgraded line for an upgrade that failed");
}

#[test]
fn sigterm_right_after_sigusr2_is_an_ordered_stop() {
    let build = Build::new();
    let mut cluster = Cluster::start_program(&build.path, "concurrency: 2\n", |_| {});
    cluster.wait_all_ready(2);
    build.replace(1);
    cluster.signal(Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(1));
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0), "{:?}", cluster.log());
    assert_eq!(cluster.wait_for_event("stopped", 1, LONG)["graceful"], true);
}

#[test]
fn connections_queued_for_a_starting_worker_and_a_worker_killed_in_the_gap_are_all_served() {
    // Worker 0 takes 3 s to start and 100 clients wait for it; worker 1 serves one connection per 50 ms and
    // is killed while the new image is paused (the gap made wide on purpose): what it never received
    // is taken back by the new image and served by its successor.
    let build = Build::new();
    let fault = build.dir.path().join("fault");
    let yaml = "concurrency: 2\nqueue:\n  maxWait: 30s\nenv:\n  TEST_SLOW_INDEX: '0'\n  TEST_INIT_DELAY_MS: '3000'\n  \
                TEST_SERVE_INTERVAL_MS: '50'\n";
    let cluster = Cluster::start_program(&build.path, yaml, |command| {
        command.env("STICKY_CLUSTER_UPGRADE_FAULT_FILE", &fault);
    });
    let victim = cluster.get(support::clients_for(1, 2, 1, 500)[0], "/").unwrap()["pid"].as_u64().unwrap();
    let clients: Vec<Ipv4Addr> =
        support::clients_for(0, 2, 100, 0).into_iter().chain(support::clients_for(1, 2, 100, 0)).collect();
    let server = server(&cluster);
    let requests: Vec<_> =
        clients.iter().map(|&client| std::thread::spawn(move || support::get(client, server, "/"))).collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&fault, "pause 600").unwrap();
    build.replace(1);
    cluster.signal(Signal::SIGUSR2);
    cluster.wait_for_log("upgrading in place", LONG);
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    cluster.wait_for_event("upgraded", 1, LONG);
    let answers: Vec<_> = requests.into_iter().map(|request| request.join().unwrap()).collect();
    let failed: Vec<String> = answers.iter().filter_map(|a| a.as_ref().err().map(|e| e.to_string())).collect();
    let log = cluster.log().join("\n");
    eprintln!(
        "figures: upgrade with 100 queued for a starting worker and a kill -9 in the gap: sent {}, lost {}",
        clients.len(),
        failed.len()
    );
    assert!(failed.len() <= 1, "at most the one in the killed worker's hands: {failed:?}\n{log}");
    for (client, answer) in clients.iter().zip(&answers) {
        if let Ok(answer) = answer {
            assert_eq!(answer["worker"], expected_index(*client, 2), "{client}");
        }
    }
    assert!(log.contains("left") && log.contains("connections unread"), "taken back after the upgrade:\n{log}");
}

#[test]
fn kernel_routing_in_a_network_namespace_keeps_its_listener_group_through_three_upgrades() {
    // The group's listeners, their order and their program are the kernel's: the upgrade must hand them
    // over untouched, so every source stays on its index with no process in the data path. The master and
    // its workers run in a server namespace, the clients on the other side of a veth pair, from addresses
    // of a real interface (IPv4 and native IPv6), not loopback's.
    let Some(VethPair { server, client, server_if, client_if }) = VethPair::create('u') else { return };
    let held_sources: Vec<IpAddr> = (0..300u32)
        .map(|i| Ipv4Addr::new(10, 23, (i / 150) as u8, (i % 150 * 17 % 254 + 1) as u8).into())
        .chain((0..100u16).map(|i| {
            // Interface ids the kernel and Node compress differently: a zero run at the end, the middle, none.
            let id = match i % 4 {
                0 => [0, 0, 0, i + 1],
                1 => [i + 1, 0, 0, 1],
                2 => [0xabc, i, 0x100, 0],
                _ => [1, 0, i + 1, 2],
            };
            Ipv6Addr::new(0xfd00, 0x23, 0, 0, id[0], id[1], id[2], id[3]).into()
        }))
        .collect();
    let rotating_sources: Vec<IpAddr> = (0..1000u32)
        .map(|i| Ipv4Addr::new(10, 23, (10 + i / 250) as u8, (i % 250 + 1) as u8).into())
        .chain((0..200u16).map(|i| Ipv6Addr::new(0xfd00, 0x23, 0, 0, 0, 0, 1, i + 1).into()))
        .collect();
    let rotating: Vec<Vec<IpAddr>> =
        (0..4).map(|thread| rotating_sources.iter().skip(thread).step_by(4).copied().collect()).collect();
    // The sources sit behind a route through the client's veth address: the server's neighbour table then
    // holds one entry per family, not 1,600 (the kernel's table is shared by every namespace and its
    // default gc_thresh3 is 1,024).
    run_ip(
        &["-n", &server.0, "-batch", "-"],
        &format!(
            "addr add 10.200.0.1/24 dev {server_if}\naddr add fd00:200::1/64 dev {server_if} nodad\n\
             route add 10.23.0.0/16 via 10.200.0.2\nroute add fd00:23::/64 via fd00:200::2\n"
        ),
    );
    let mut client_setup =
        format!("addr add 10.200.0.2/24 dev {client_if}\naddr add fd00:200::2/64 dev {client_if} nodad\n");
    for source in held_sources.iter().chain(&rotating_sources) {
        client_setup += &match source {
            IpAddr::V4(_) => format!("addr add {source}/32 dev {client_if}\n"),
            IpAddr::V6(_) => format!("addr add {source}/128 dev {client_if} nodad\n"),
        };
    }
    let started = Instant::now();
    run_ip(&["-n", &client.0, "-batch", "-"], &client_setup);
    eprintln!("{} client addresses added in {:?}", held_sources.len() + rotating_sources.len(), started.elapsed());
    let concurrency = 3;
    for family in [4, 6] {
        let mut per_worker = vec![0; concurrency as usize];
        for source in held_sources.iter().filter(|ip| if family == 4 { ip.is_ipv4() } else { ip.is_ipv6() }) {
            per_worker[expected_index(*source, concurrency) as usize] += 1;
        }
        assert!(per_worker.iter().all(|&n| n > 0), "IPv{family} sources spread over every worker: {per_worker:?}");
    }

    let build = Build::new();
    let yaml = format!("concurrency: {concurrency}\nrouting: kernel\n");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // The master, and the workers it spawns, inherit this thread's namespace.
                server.enter();
                let mut cluster = Cluster::start_program(&build.path, &yaml, |_| {});
                cluster.wait_all_ready(concurrency);
                for pid in std::iter::once(cluster.pid()).chain(cluster.worker_pids()) {
                    assert!(server.holds(pid), "process {pid} runs in the server's namespace");
                }
                // From here on this thread, and the load threads it starts, are clients.
                client.enter();
                let addresses = ServerAddresses {
                    v4: Ipv4Addr::new(10, 200, 0, 1),
                    v6: "fd00:200::1".parse().unwrap(),
                    port: cluster.port,
                };
                let mut held: Vec<Held> = held_sources.iter().map(|&source| Held::open(source, addresses)).collect();
                three_upgrades(&build, &mut cluster, concurrency, addresses, &rotating, &mut held);
                drop(held);
                cluster.signal(Signal::SIGTERM);
                assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
            })
            .join()
            .expect("the namespace thread")
    });
}

#[test]
fn attached_workers_stay_attached_through_three_upgrades() {
    let build = Build::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workers.sock");
    let yaml = format!("concurrency: 2\nworkers:\n  socket: {:?}\n", socket.display().to_string());
    let mut cluster = Cluster::start_program(&build.path, &yaml, |_| {});
    let workers: Vec<Attached> = (0..2).map(|i| Attached::start(&socket, Some(i), &[])).collect();
    cluster.wait_all_ready(2);
    let addresses = ServerAddresses::loopback(&cluster);
    let mut held: Vec<Held> =
        (0..100u32).map(|i| Held::open(Ipv4Addr::new(127, 24, 0, i as u8 + 1), addresses)).collect();
    let before: Vec<Value> = held.iter_mut().map(|held| held.ask().unwrap()).collect();
    let load = Load::start(addresses, 2, &loopback_sources(2));
    for generation in 1..=3 {
        build.replace(generation);
        cluster.signal(Signal::SIGUSR2);
        let upgraded = cluster.wait_for_event("upgraded", generation, LONG);
        assert_eq!(upgraded["attach_socket"], socket.display().to_string(), "{upgraded}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let counts = load.stop();
    eprintln!("figures: attach mode, three upgrades under load: {counts:?}");
    assert_eq!(counts, Counts { served: counts.served, longest_ms: counts.longest_ms, ..Counts::default() });
    for (held, answer) in held.iter_mut().zip(&before) {
        assert_eq!(held.ask().unwrap(), *answer, "{}", held.client);
    }
    let log = cluster.log().join("\n");
    assert!(!log.contains("detached"), "no worker was let go:\n{log}");
    for (index, mut worker) in workers.into_iter().enumerate() {
        assert!(worker.0.try_wait().unwrap().is_none(), "attached worker {index} still runs");
    }
    // A connection to a new index after the upgrades still reaches the attached workers' channels.
    drop(held);
    cluster.signal(Signal::SIGTERM);
    assert_eq!(cluster.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn a_connection_waiting_for_its_proxy_header_is_handed_over_with_what_it_sent() {
    // A trusted proxy has sent half a PROXY header when the upgrade starts; the new image reads the rest
    // and routes by the client the header names.
    let build = Build::new();
    let yaml =
        "concurrency: 2\nclientAddress: proxy-protocol\ntrustedProxies: [127.25.0.1]\nheaderWait:\n  maxWait: 20s\n";
    let cluster = Cluster::start_program(&build.path, yaml, |_| {});
    cluster.wait_all_ready(2);
    let mut proxied = connect_from(Ipv4Addr::new(127, 25, 0, 1), server(&cluster)).unwrap();
    proxied.write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 5000 ").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    build.replace(1);
    cluster.signal(Signal::SIGUSR2);
    cluster.wait_for_event("upgraded", 1, LONG);
    let line = cluster.wait_for_log("upgraded in place", LONG);
    assert!(line.contains("1 waiting for a header"), "{line}");
    proxied.write_all(b"8080\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    proxied.read_to_string(&mut response).unwrap();
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_eq!(body["remote"], "10.1.2.3", "routed and served as the client the header names: {response}");
    assert_eq!(body["first_line"], "GET / HTTP/1.1", "the header was taken off the stream");
}

#[test]
fn a_worker_dialing_during_the_upgrade_is_welcomed_by_the_new_image() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::{AsFd, AsRawFd};
    use sticky_cluster::protocol::{recv_message, send_message, Message};
    let build = Build::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.sock");
    let yaml = format!("concurrency: 1\nmetrics:\n  port: 0\nworkers:\n  socket: {:?}\n", path.display().to_string());
    let cluster = Cluster::start_program(&build.path, &yaml, |_| {});
    let metrics = cluster.metrics_address();
    let dialer = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
    connect(dialer.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    // Its uid is checked at accept; the master now waits for its hello.
    let deadline = Instant::now() + LONG;
    while !support::http_text(metrics, "/metrics").unwrap().contains("sticky_cluster_attach_handshakes 1\n") {
        assert!(Instant::now() < deadline, "the handshake never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    build.replace(1);
    cluster.signal(Signal::SIGUSR2);
    cluster.wait_for_event("upgraded", 1, LONG);
    send_message(dialer.as_fd(), &Message::Hello { index: 0, pid: std::process::id() }, None, false).unwrap();
    let answer = recv_message(dialer.as_fd(), false).unwrap();
    assert_eq!(answer.message, Message::Welcome { index: 0, concurrency: 1 });
}
