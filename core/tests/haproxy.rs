//! More than one machine: a real HAProxy (Debian's package) with `balance source` and `send-proxy-v2`
//! in front of two clusters ("hosts" on two ports). Every client stays on one host and one worker, and
//! each worker is told the client's real address from the PROXY v2 header.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{client_address, Cluster};

/// A running HAProxy, killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|path| path.is_file());
    found.expect("haproxy is missing: install Debian's package (apt-get install haproxy), as .ci/run does")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The configuration of examples/haproxy/haproxy.cfg, with the test's ports.
fn haproxy_config(port: u16, hosts: &[u16]) -> String {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/haproxy/haproxy.cfg"))
        .expect("examples/haproxy/haproxy.cfg");
    let mut config = example.replace("bind :80", &format!("bind 127.0.0.1:{port}"));
    for (i, port) in hosts.iter().enumerate() {
        config = config.replace(&format!("10.0.0.{}:8080", 11 + i), &format!("127.0.0.1:{port}"));
    }
    assert!(!config.contains("10.0.0."), "every example address is replaced:\n{config}");
    config
}

fn start_haproxy(hosts: &[u16]) -> Haproxy {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, haproxy_config(port, hosts)).unwrap();
    let check = Command::new(haproxy_binary()).arg("-c").arg("-f").arg(&path).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
    let log = dir.path().join("haproxy.log");
    let child = Command::new(haproxy_binary())
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut haproxy = Haproxy { child, port, _dir: dir };
    // Ready when its frontend accepts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = haproxy.child.try_wait().unwrap();
        let log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(exited.is_none(), "haproxy exited ({exited:?}):\n{}", log());
        assert!(Instant::now() < deadline, "haproxy did not listen on {port} within 20 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    haproxy
}

#[test]
fn two_hosts_behind_haproxy_keep_every_session_and_see_real_clients() {
    const CONCURRENCY: u32 = 3;
    const CLIENTS: u32 = 120;
    let yaml = format!("concurrency: {CONCURRENCY}\nclientAddress: proxy-protocol\ntrustedProxies: [127.0.0.1/32]\n");
    let hosts = [Cluster::start(&yaml), Cluster::start(&yaml)];
    for host in &hosts {
        host.wait_all_ready(CONCURRENCY);
    }
    let haproxy = start_haproxy(&[hosts[0].port, hosts[1].port]);
    let front = SocketAddr::from(([127, 0, 0, 1], haproxy.port));
    let host_of_pid: HashMap<u64, usize> = hosts
        .iter()
        .enumerate()
        .flat_map(|(host, cluster)| cluster.worker_pids().into_iter().map(move |pid| (u64::from(pid), host)))
        .collect();
    let mut served_by: HashMap<Ipv4Addr, u64> = HashMap::new();
    let mut hosts_used = HashSet::new();
    for round in 0..3 {
        for i in 0..CLIENTS {
            let client = client_address(i);
            let answer = support::get(client, front, "/").unwrap_or_else(|e| panic!("{client} round {round}: {e}"));
            assert_eq!(answer["remote"], client.to_string(), "{client}: the worker sees the real client");
            assert_eq!(answer["first_line"], "GET / HTTP/1.1", "the PROXY v2 header never reaches the worker");
            let expected = sticky_cluster::hash::route_index(IpAddr::V4(client), CONCURRENCY);
            assert_eq!(answer["worker"], expected, "{client}: routed by its own address on the host");
            let pid = answer["pid"].as_u64().unwrap();
            let host = *host_of_pid.get(&pid).unwrap_or_else(|| panic!("pid {pid} is no host's worker"));
            hosts_used.insert(host);
            let first = *served_by.entry(client).or_insert(pid);
            assert_eq!(pid, first, "{client} round {round}: the same worker process on the same host");
        }
    }
    assert_eq!(hosts_used.len(), 2, "balance source spreads {CLIENTS} clients over both hosts");
    for host in &hosts {
        assert!(
            !host.log().iter().any(|l| l.contains("closed a connection from trusted proxy")),
            "no connection from HAProxy lacked its header"
        );
    }
}

/// The YAML block under `sticky-cluster.yaml: |` in a Kubernetes ConfigMap (4-space indented).
fn config_map_yaml(manifest: &str) -> String {
    let start = manifest.find("sticky-cluster.yaml: |\n").expect("a ConfigMap with sticky-cluster.yaml");
    manifest[start..]
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect()
}

#[test]
fn the_example_configurations_for_load_balancers_are_valid() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(root.join("examples/kubernetes/load-balancer.yaml")).unwrap();
    let from_manifest = dir.path().join("k8s.yaml");
    std::fs::write(&from_manifest, config_map_yaml(&manifest)).unwrap();
    for config in [root.join("examples/haproxy/sticky-cluster.yaml"), from_manifest] {
        let output = Command::new(support::binary()).arg("--check").arg("--config").arg(&config).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{}: {}", config.display(), String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("clientAddress: proxy-protocol\n"), "{stdout}");
        assert!(!stdout.contains("trustedProxies: []"), "{stdout}");
    }
}
