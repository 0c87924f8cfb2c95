//! The reuseport group in the real kernel: connections from many source addresses land on the listener the
//! routing hash names (IPv4 and dual-stack listeners on loopback; native IPv6 and link-local in a namespace),
//! and the real master puts link-local clients on Node's index in both routing modes.

mod support;

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use nix::sys::time::TimeVal;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use sticky_cluster::hash::route_index;
use sticky_cluster::reuseport::{
    accept_queue, bind_group, node_peer_text, peer_index, AcceptQueue, ReuseportGroup, TextForm,
};
use support::netns::{interface_index, must_run, run_ip, VethPair};

/// A blocking client connected from `source` (port chosen by the kernel) to `target`.
fn connect_from(source: SocketAddr, target: SocketAddr) -> io::Result<OwnedFd> {
    let family = if source.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // A lost SYN must fail the test in seconds, not after two minutes of retries.
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(5, 0))?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(source))?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(target))?;
    Ok(fd)
}

/// Accepts `expected` connections across the group's listeners, waiting on all of them with poll(2);
/// returns (listener index, peer) for each, and stops early only when nothing arrives for 5 seconds.
fn accept_all(group: &ReuseportGroup, expected: usize) -> Vec<(u32, SocketAddr)> {
    let listeners: Vec<TcpListener> =
        group.listeners().iter().map(|fd| TcpListener::from(fd.try_clone().expect("dup a listener"))).collect();
    for listener in &listeners {
        listener.set_nonblocking(true).expect("non-blocking listener");
    }
    let mut accepted = Vec::new();
    while accepted.len() < expected {
        let mut fds: Vec<PollFd> = listeners.iter().map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)).collect();
        let ready = poll(&mut fds, 5000u16).expect("poll the listeners");
        if ready == 0 {
            break;
        }
        for (index, listener) in listeners.iter().enumerate() {
            loop {
                match listener.accept() {
                    Ok((_stream, peer)) => accepted.push((index as u32, peer)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("accept on listener {index}: {e}"),
                }
            }
        }
    }
    accepted
}

/// `count` distinct loopback sources with one-, two- and three-digit bytes (all of 127/8 is local).
fn loopback_sources(count: usize) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| Ipv4Addr::new(127, (i % 256) as u8, (3 + 50 * (i / 256)) as u8, (i * 131 % 254 + 1) as u8))
        .collect()
}

/// Connects every source, accepts everything, and checks each connection's listener against `expected`.
fn check_routing(
    group: &ReuseportGroup,
    clients: &[(SocketAddr, SocketAddr)],
    expected: impl Fn(SocketAddr) -> u32,
) -> Vec<usize> {
    let connected: Vec<OwnedFd> = clients
        .iter()
        .map(|(source, target)| connect_from(*source, *target).unwrap_or_else(|e| panic!("{source} -> {target}: {e}")))
        .collect();
    let accepted = accept_all(group, clients.len());
    assert_eq!(accepted.len(), clients.len(), "connections accepted across the group");
    let mut per_listener = vec![0usize; group.concurrency() as usize];
    for (index, peer) in &accepted {
        assert_eq!(*index, expected(*peer), "{} landed on listener {index}", node_peer_text(*peer));
        per_listener[*index as usize] += 1;
    }
    drop(connected);
    per_listener
}

#[test]
fn ipv4_listener_puts_each_loopback_client_on_its_hashed_listener() {
    for n in [1, 2, 7] {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), n, 512).expect("bind the group");
        assert_eq!(group.text_form(), TextForm::Ipv4);
        let target = group.local_addr();
        let clients: Vec<_> =
            loopback_sources(300).into_iter().map(|ip| (SocketAddr::new(ip.into(), 0), target)).collect();
        let per_listener = check_routing(&group, &clients, |peer| route_index(peer.ip(), n));
        // The test means something only if the hash spread clients over every listener.
        assert!(per_listener.iter().all(|&count| count > 0), "{n} listeners: {per_listener:?}");
    }
}

/// A dual-stack group on `[::]:0`, or `None` (a skip outside CI) on a machine without IPv6.
fn dual_stack_group(n: u32) -> Option<ReuseportGroup> {
    match bind_group("[::]:0".parse().unwrap(), n, 512) {
        Ok(group) => Some(group),
        Err(sticky_cluster::Error::Listen { source, .. })
            if !must_run() && matches!(source.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)) =>
        {
            eprintln!("skipped: no IPv6 on this machine ({source})");
            None
        }
        Err(e) => panic!("bind the dual-stack group: {e}"),
    }
}

#[test]
fn dual_stack_listener_hashes_ipv4_clients_as_mapped_and_ipv6_loopback() {
    let n = 7;
    let Some(group) = dual_stack_group(n) else { return };
    assert_eq!(group.text_form(), TextForm::Ipv6);
    let port = group.local_addr().port();
    let mut clients: Vec<_> = loopback_sources(300)
        .into_iter()
        .map(|ip| (SocketAddr::new(ip.into(), 0), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)))
        .collect();
    clients.push((SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0), SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)));
    let per_listener = check_routing(&group, &clients, |peer| {
        // Node reports `::ffff:127.x.y.z` and `::1` here; route_index hashes exactly that text.
        assert!(peer.is_ipv6(), "a dual-stack listener reports IPv6 peers, got {peer}");
        route_index(peer.ip(), n)
    });
    assert!(per_listener.iter().all(|&count| count > 0), "{per_listener:?}");
}

#[test]
fn native_ipv6_and_link_local_clients_in_a_namespace() {
    let Some(VethPair { server, client, server_if, client_if }) = VethPair::create('c') else { return };
    let prefixes = ["2001:db8:5:0", "fd12:3456:789a:1"];
    let mut server_setup =
        format!("addr add 10.200.0.1/24 dev {server_if}\naddr add fe80::1/64 dev {server_if} nodad\n");
    let mut client_setup = format!("addr add fe80::1:1/64 dev {client_if} nodad\n");
    let mut sources: Vec<(IpAddr, IpAddr)> = Vec::new(); // (client source, server address)
    for prefix in prefixes {
        server_setup += &format!("addr add {prefix}::1/64 dev {server_if} nodad\n");
        // Interface ids with zero runs of every length and position, so the kernel compresses them all.
        for i in 0..120u16 {
            let id = match i % 6 {
                0 => format!("::{:x}", i + 2),
                1 => format!(":{:x}::1", i),
                2 => format!(":{:x}:0:{:x}:0", i * 3, i),
                3 => format!(":1:{:x}:0:0", i + 1),
                4 => format!(":{:x}:{:x}:{:x}:{:x}", i, 0xabc, i * 257, 7),
                _ => format!(":0:{:x}::", 0x1000 + i),
            };
            let source: Ipv6Addr = format!("{prefix}{id}").parse().expect("a generated address");
            client_setup += &format!("addr add {source}/64 dev {client_if} nodad\n");
            sources.push((source.into(), format!("{prefix}::1").parse().expect("server address")));
        }
    }
    for i in 2..62u8 {
        client_setup += &format!("addr add 10.200.0.{i}/24 dev {client_if}\n");
        sources.push((Ipv4Addr::new(10, 200, 0, i).into(), Ipv4Addr::new(10, 200, 0, 1).into()));
    }
    let link_local: Vec<Ipv6Addr> = ["fe80::100:1", "fe80::100:2", "fe80::2:0:0:3", "fe80::abc:def0:1:2", "fe80::5"]
        .iter()
        .map(|text| text.parse().expect("a link-local address"))
        .collect();
    for source in &link_local {
        client_setup += &format!("addr add {source}/64 dev {client_if} nodad\n");
    }
    run_ip(&["-n", &server.0, "-batch", "-"], &server_setup);
    run_ip(&["-n", &client.0, "-batch", "-"], &client_setup);

    let n = 7;
    let counts = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                server.enter();
                let group = bind_group("[::]:0".parse().unwrap(), n, 512).expect("bind the group in the namespace");
                assert!(
                    group.program().interfaces.iter().any(|(_, name)| *name == server_if),
                    "the program names the namespace's interfaces: {:?}",
                    group.program().interfaces
                );
                let port = group.local_addr().port();
                client.enter();
                let client_index = interface_index(&client_if);
                let mut clients: Vec<(SocketAddr, SocketAddr)> = sources
                    .iter()
                    .map(|(source, target)| (SocketAddr::new(*source, 0), SocketAddr::new(*target, port)))
                    .collect();
                for source in &link_local {
                    let scoped = |ip: Ipv6Addr, port| SocketAddr::V6(SocketAddrV6::new(ip, port, 0, client_index));
                    clients.push((scoped(*source, 0), scoped("fe80::1".parse().unwrap(), port)));
                }
                let connected: Vec<OwnedFd> = clients
                    .iter()
                    .map(|(s, t)| connect_from(*s, *t).unwrap_or_else(|e| panic!("{s} -> {t}: {e}")))
                    .collect();
                // Peer texts name the server's interface, so the check runs in the server's namespace.
                server.enter();
                let accepted = accept_all(&group, clients.len());
                drop(connected);
                assert_eq!(accepted.len(), clients.len());
                let (mut native, mut scoped) = (0, 0);
                for (index, peer) in &accepted {
                    let text = node_peer_text(*peer);
                    assert_eq!(*index, peer_index(*peer, n), "{text} landed on listener {index}");
                    if text.contains('%') {
                        assert!(text.ends_with(&format!("%{server_if}")), "{text}");
                        scoped += 1;
                    } else if peer.ip().to_string().contains(':') && !text.starts_with("::ffff:") {
                        native += 1;
                    }
                }
                (native, scoped, accepted.len())
            })
            .join()
            .expect("the namespace thread")
    });
    assert_eq!(counts, (240, 5, 305), "(native IPv6, link-local, all) connections on the predicted listener");
}

/// `GET /` over `fd`, a connected client; the test worker's JSON answer.
fn worker_answer(fd: OwnedFd) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::from(fd);
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("a read timeout");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the answer");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {response:?}"))
}

#[test]
fn the_master_routes_link_local_clients_by_node_text_in_both_modes() {
    let Some(VethPair { server, client, server_if, client_if }) = VethPair::create('h') else { return };
    let sources: Vec<Ipv6Addr> = (1..=30u16).map(|i| Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0x100, i, i * 7)).collect();
    let mut client_setup = String::new();
    for source in &sources {
        client_setup += &format!("addr add {source}/64 dev {client_if} nodad\n");
    }
    run_ip(&["-n", &server.0, "-batch", "-"], &format!("addr add fe80::1/64 dev {server_if} nodad\n"));
    run_ip(&["-n", &client.0, "-batch", "-"], &client_setup);
    let concurrency = 5;
    // What Node's remoteAddress says in the server's namespace: the address, `%`, the server's interface.
    let expected: Vec<u32> = sources
        .iter()
        .map(|source| sticky_cluster::hash::string_hash(&format!("{source}%{server_if}")) % concurrency)
        .collect();
    for routing in ["handoff", "kernel"] {
        let answers: Vec<u32> = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // The master, and the workers it spawns, live in the server's namespace.
                    server.enter();
                    let cluster = support::Cluster::start(&format!("routing: {routing}\nconcurrency: {concurrency}\n"));
                    client.enter();
                    let client_index = interface_index(&client_if);
                    let scoped = |ip: Ipv6Addr, port| SocketAddr::V6(SocketAddrV6::new(ip, port, 0, client_index));
                    let target = scoped(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), cluster.port);
                    sources
                        .iter()
                        .map(|source| {
                            let fd = connect_from(scoped(*source, 0), target)
                                .unwrap_or_else(|e| panic!("{routing}: {source} -> {target}: {e}"));
                            let answer = worker_answer(fd);
                            answer["worker"].as_u64().unwrap_or_else(|| panic!("{answer}")) as u32
                        })
                        .collect()
                })
                .join()
                .expect("the namespace thread")
        });
        assert_eq!(answers, expected, "{routing}: workers of {sources:?}");
    }
    let spread: std::collections::BTreeSet<u32> = expected.iter().copied().collect();
    assert!(spread.len() >= 3, "30 link-local clients spread over the workers: {expected:?}");
}

#[test]
fn a_socket_joining_the_group_later_receives_no_connection() {
    let n = 3;
    let group = bind_group("127.0.0.1:0".parse().unwrap(), n, 512).expect("bind the group");
    // Same user, SO_REUSEPORT, same address: the kernel lets it join, as socket n of the group.
    let intruder = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    socket::setsockopt(&intruder, sockopt::ReusePort, &true).unwrap();
    socket::bind(intruder.as_raw_fd(), &SockaddrStorage::from(group.local_addr())).expect("join the group");
    socket::listen(&intruder, socket::Backlog::new(512).unwrap()).unwrap();
    let target = group.local_addr();
    let clients: Vec<_> = loopback_sources(300).into_iter().map(|ip| (SocketAddr::new(ip.into(), 0), target)).collect();
    check_routing(&group, &clients, |peer| route_index(peer.ip(), n));
    let intruder_queue = accept_queue(intruder.as_fd()).unwrap();
    assert_eq!(intruder_queue.waiting, 0, "the program never returns an index past the group's own listeners");
}

#[test]
fn accept_queue_reports_waiting_connections_and_the_backlog() {
    let group = bind_group("127.0.0.1:0".parse().unwrap(), 1, 16).expect("bind the group");
    let listener = group.listener(0).unwrap();
    assert_eq!(accept_queue(listener).unwrap(), AcceptQueue { waiting: 0, limit: 16 });
    let clients: Vec<OwnedFd> = loopback_sources(3)
        .into_iter()
        .map(|ip| connect_from(SocketAddr::new(ip.into(), 0), group.local_addr()).unwrap())
        .collect();
    assert_eq!(accept_queue(listener).unwrap().waiting, 3);
    assert_eq!(accept_all(&group, 3).len(), 3);
    assert_eq!(accept_queue(listener).unwrap().waiting, 0);
    drop(clients);
    assert!(accept_queue(not_a_listener().as_fd()).is_err());
}

fn not_a_listener() -> OwnedFd {
    socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap()
}

#[test]
fn a_resized_group_routes_by_its_new_size() {
    let mut group = bind_group("127.0.0.1:0".parse().unwrap(), 3, 512).expect("bind the group");
    let target = group.local_addr();
    let clients: Vec<_> = loopback_sources(300).into_iter().map(|ip| (SocketAddr::new(ip.into(), 0), target)).collect();
    check_routing(&group, &clients, |peer| route_index(peer.ip(), 3));

    assert!(group.resize(5, 512).expect("grow to 5").is_empty());
    let per_listener = check_routing(&group, &clients, |peer| route_index(peer.ip(), 5));
    assert!(per_listener.iter().all(|&count| count > 0), "the new listeners take their share: {per_listener:?}");

    // Shrinking: the removed listeners come back last first, and the ones kept keep their indexes.
    let kept: Vec<u64> = group.listeners()[..2].iter().map(inode).collect();
    let removed = group.resize(2, 512).expect("shrink to 2");
    assert_eq!(removed.len(), 3);
    assert_eq!(accept_queue(removed[0].as_fd()).unwrap().waiting, 0);
    drop(removed);
    assert_eq!(group.listeners().iter().map(inode).collect::<Vec<_>>(), kept);
    check_routing(&group, &clients, |peer| route_index(peer.ip(), 2));
}

fn inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd).expect("fstat a listener").st_ino
}
