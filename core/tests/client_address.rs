//! Behind a load balancer every connection comes from the proxy: with `clientAddress` the master routes
//! by the client named in a PROXY protocol or X-Forwarded-For header, and the worker still gets the bytes.

mod support;

use std::net::{IpAddr, Ipv4Addr};

use support::Cluster;

fn route(ip: IpAddr) -> u64 {
    u64::from(sticky_cluster::hash::route_index(ip, 4))
}

#[test]
fn proxy_protocol_v1_routes_by_the_real_client() {
    let cluster = Cluster::start("concurrency: 4\nclientAddress: proxy-protocol\n");
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    let mut indexes = std::collections::HashSet::new();
    for round in 0..2 {
        for i in 1..=60u8 {
            let client = Ipv4Addr::new(203, 0, 113, i);
            let raw = format!("PROXY TCP4 {client} 10.0.0.1 4{i:03} 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
            // Every connection comes from the same proxy address.
            let answer = support::request(Ipv4Addr::new(127, 0, 0, 1), server, &raw).unwrap();
            assert_eq!(answer["worker"], route(IpAddr::V4(client)), "{client} round {round}");
            assert_eq!(answer["remote"], client.to_string(), "the worker is told the real client");
            indexes.insert(answer["worker"].as_u64().unwrap());
        }
    }
    assert_eq!(indexes.len(), 4, "clients behind one proxy spread over all workers");
    // A connection without a header is routed by its TCP peer, at once.
    let plain = support::get(Ipv4Addr::new(127, 0, 0, 9), server, "/").unwrap();
    assert_eq!(plain["worker"], route(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 9).to_ipv6_mapped())));
}

#[test]
fn x_forwarded_for_routes_by_the_first_address() {
    let cluster = Cluster::start("concurrency: 4\nclientAddress: x-forwarded-for\n");
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port));
    for i in 1..=40u16 {
        let client: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {client}, 10.0.0.7\r\n\r\n");
        let answer = support::request(Ipv4Addr::new(127, 0, 0, 1), server, &raw).unwrap();
        assert_eq!(answer["worker"], route(client), "{client}");
    }
}
