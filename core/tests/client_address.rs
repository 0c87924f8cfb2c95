//! Behind a load balancer every connection comes from the proxy: the master believes a PROXY or
//! X-Forwarded-For header from `trustedProxies` only, routes by the client it names, and closes
//! connections from a trusted proxy that break the PROXY protocol; anyone else is routed by its peer.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::{connect_from, Cluster};

const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn route(ip: IpAddr) -> u64 {
    u64::from(sticky_cluster::hash::route_index(ip, 4))
}

fn server(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port))
}

/// Sends `raw` from `client` and returns whatever comes back until the master or worker closes.
fn exchange(client: Ipv4Addr, server: SocketAddr, raw: &[u8]) -> String {
    let mut stream = connect_from(client, server).unwrap();
    stream.write_all(raw).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The `sticky_cluster_*` value named `metric` on the metrics page.
fn metric(port: u16, metric: &str) -> u64 {
    let page = support::http_text(SocketAddr::from(([127, 0, 0, 1], port)), "/metrics").unwrap();
    let line = page.lines().find(|l| l.starts_with(&format!("{metric} "))).unwrap_or_else(|| panic!("{page}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn proxy_protocol_v1_and_v2_from_a_trusted_proxy_route_by_the_real_client() {
    let cluster = Cluster::start("concurrency: 4\nclientAddress: proxy-protocol\ntrustedProxies: [127.0.0.1/32]\n");
    let mut indexes = std::collections::HashSet::new();
    for round in 0..2 {
        for i in 1..=60u8 {
            let client = Ipv4Addr::new(203, 0, 113, i);
            let raw = if i % 2 == 0 {
                format!("PROXY TCP4 {client} 10.0.0.1 4{i:03} 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes()
            } else {
                let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
                v2.extend_from_slice(&client.octets());
                v2.extend_from_slice(&[10, 0, 0, 1, 0x9c, 0x40, 0, 80]);
                v2.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
                v2
            };
            let answer = exchange(PROXY, server(&cluster), &raw);
            let body: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
            assert_eq!(body["worker"], route(IpAddr::V4(client)), "{client} round {round}");
            assert_eq!(body["remote"], client.to_string(), "the worker is told the real client");
            assert_eq!(body["first_line"], "GET / HTTP/1.1", "the PROXY header is taken off the stream");
            indexes.insert(body["worker"].as_u64().unwrap());
        }
    }
    assert_eq!(indexes.len(), 4, "clients behind one proxy spread over all workers");
}

#[test]
fn an_untrusted_peer_cannot_choose_its_worker_and_its_stream_is_untouched() {
    let cluster = Cluster::start("concurrency: 4\nclientAddress: proxy-protocol\ntrustedProxies: [127.0.0.1/32]\n");
    for i in 2..40u8 {
        let direct = Ipv4Addr::new(127, 0, 0, i);
        // A client that connects directly and claims to be 1.2.3.4.
        let raw = "PROXY TCP4 1.2.3.4 10.0.0.1 1000 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let answer = exchange(direct, server(&cluster), raw.as_bytes());
        let body: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["worker"], route(IpAddr::V6(direct.to_ipv6_mapped())), "{direct}: routed by its peer");
        assert_eq!(body["remote"], format!("::ffff:{direct}"), "{direct}: reported as its peer");
        assert_eq!(body["first_line"], "PROXY TCP4 1.2.3.4 10.0.0.1 1000 80", "the worker gets every byte");
    }
}

#[test]
fn a_trusted_proxy_without_a_valid_header_is_closed_counted_and_logged_once() {
    let metrics = free_port();
    let mut cluster = Cluster::start(&format!(
        "concurrency: 2\nclientAddress: proxy-protocol\ntrustedProxies: [127.0.0.1]\nheaderWait:\n  maxWait: 800ms\n\
         metrics:\n  port: {metrics}\n"
    ));
    let server = server(&cluster);
    // No header, a broken one, TCP4 with an IPv6 address: closed without an answer.
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\nGET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 2001:db8::1 5.6.7.8 1 80\r\nGET / HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(exchange(PROXY, server, raw), "", "{}", String::from_utf8_lossy(raw));
    }
    // A header that never completes: closed at headerWait.maxWait.
    let started = Instant::now();
    assert_eq!(exchange(PROXY, server, b"PROXY TCP4 1.2."), "");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(metric(metrics, "sticky_cluster_proxy_header_rejected_total"), 4);
    assert_eq!(metric(metrics, "sticky_cluster_header_wait_timeouts_total"), 1);
    assert_eq!(metric(metrics, "sticky_cluster_header_waiting"), 0);
    let warnings = cluster.log().iter().filter(|l| l.contains("closed a connection from trusted proxy")).count();
    assert_eq!(warnings, 1, "one warning per peer per minute: {:?}", cluster.log());
    // The metrics scrapes come from 127.0.0.1 too, and they are not on the client port: still served.
    assert!(cluster.running());
}

#[test]
fn x_forwarded_for_takes_the_rightmost_untrusted_address() {
    let cluster =
        Cluster::start("concurrency: 4\nclientAddress: x-forwarded-for\ntrustedProxies: [127.0.0.1, 10.0.0.0/8]\n");
    for i in 1..=40u16 {
        let client: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
        // The client forged the leftmost entry; its proxy appended the real address, then an inner proxy.
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nCookie: x\r\nX-Forwarded-For: {client}, 10.0.0.7\r\n\r\n"
        );
        let answer = support::request(PROXY, server(&cluster), &raw).unwrap();
        assert_eq!(answer["worker"], route(client), "{client}");
        assert_eq!(answer["remote"], client.to_string());
        assert_eq!(answer["first_line"], "GET / HTTP/1.1", "X-Forwarded-For leaves the stream untouched");
    }
    // From an untrusted peer the header means nothing.
    let direct = Ipv4Addr::new(127, 0, 0, 5);
    let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 2001:db8::1\r\n\r\n";
    let answer = support::request(direct, server(&cluster), raw).unwrap();
    assert_eq!(answer["remote"], format!("::ffff:{direct}"));
    // A head over 8 KiB is not read: routed by the peer, and the worker still gets all of it.
    let big = format!("GET / HTTP/1.1\r\nCookie: {}\r\nX-Forwarded-For: 2001:db8::1\r\n\r\n", "a".repeat(9000));
    let answer = support::request(PROXY, server(&cluster), &big).unwrap();
    assert_eq!(answer["remote"], "::ffff:127.0.0.1");
}

#[test]
fn without_trusted_proxies_a_proxy_source_is_refused_at_start() {
    let mut cluster = Cluster::spawn("clientAddress: x-forwarded-for\n", |_| {});
    let status = cluster.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(2));
    cluster.wait_for_log("trustedProxies is required when clientAddress is x-forwarded-for", Duration::from_secs(5));
}

fn check(args: &[&str], yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = std::process::Command::new(support::binary()).arg("--config").arg(&path).args(args).output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn trusted_proxy_flags_replace_the_file_and_bad_ones_exit_2() {
    let yaml = "clientAddress: proxy-protocol\ntrustedProxies: [10.0.0.0/8]\nworker:\n  command: [./w]\n";
    let (code, stdout, stderr) = check(&["--check", "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "::1"], yaml);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("trustedProxies: [\"127.0.0.1/32\", \"::1/128\"]\n"), "{stdout}");
    assert!(stdout.contains("headerWait:\n  limit: 1024\n  maxWait: 5000\n"), "{stdout}");
    let (code, _, stderr) = check(&["--check", "--trusted-proxy", "10.1.2.3/8"], yaml);
    assert_eq!(code, 2);
    assert!(stderr.contains("--trusted-proxy") && stderr.contains("has host bits set"), "{stderr}");
    let (code, _, stderr) = check(&["--check"], "clientAddress: proxy-protocol\nworker:\n  command: [./w]\n");
    assert_eq!(code, 2);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("trustedProxies is required"), "{stderr}");
}
