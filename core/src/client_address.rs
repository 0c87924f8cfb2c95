//! The real client address behind a load balancer: read from a PROXY protocol (v1 or v2) header or an
//! HTTP `X-Forwarded-For` header with MSG_PEEK, so the worker still receives the untouched stream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

/// Where the routing hash takes the client address from (YAML `clientAddress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressSource {
    /// The TCP peer, as the npm module does.
    #[default]
    Peer,
    /// The source address of a PROXY protocol v1 or v2 header (HAProxy, AWS NLB, ...).
    ProxyProtocol,
    /// The first address of an HTTP `X-Forwarded-For` header.
    XForwardedFor,
}

/// How long the master waits for the first bytes before it routes by the TCP peer instead.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most it peeks for a header: a PROXY v2 header with TLVs, or an HTTP request head.
pub const PEEK_LIMIT: usize = 8192;

/// What the bytes seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// The header names this client.
    Found(SocketAddr),
    /// There is no usable header: route by the TCP peer.
    Absent,
    /// Not enough bytes yet to tell.
    NeedMore,
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY protocol v1 (`PROXY TCP4 src dst sport dport\r\n`) or v2 header.
pub fn parse_proxy_header(bytes: &[u8]) -> Peeked {
    if is_prefix(bytes, b"PROXY ") {
        return parse_proxy_v1(bytes);
    }
    if is_prefix(bytes, V2_SIGNATURE) {
        return parse_proxy_v2(bytes);
    }
    Peeked::Absent
}

/// Whether `bytes` and `marker` agree on their common length: a short read that could still become
/// the marker is not taken for a missing header.
fn is_prefix(bytes: &[u8], marker: &[u8]) -> bool {
    let common = bytes.len().min(marker.len());
    bytes[..common] == marker[..common]
}

fn parse_proxy_v1(bytes: &[u8]) -> Peeked {
    // The v1 line is at most 107 bytes including CRLF.
    let Some(end) = bytes.windows(2).take(107).position(|w| w == b"\r\n") else {
        return if bytes.len() < 107 { Peeked::NeedMore } else { Peeked::Absent };
    };
    let line = String::from_utf8_lossy(&bytes[..end]);
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "TCP4" | "TCP6", source, _, port, _] => match (source.parse::<IpAddr>(), port.parse::<u16>()) {
            (Ok(ip), Ok(port)) => Peeked::Found(SocketAddr::new(ip, port)),
            _ => Peeked::Absent,
        },
        _ => Peeked::Absent,
    }
}

fn parse_proxy_v2(bytes: &[u8]) -> Peeked {
    if bytes.len() < 16 {
        return Peeked::NeedMore;
    }
    let (version_command, family) = (bytes[12], bytes[13]);
    let length = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
    if version_command >> 4 != 2 || version_command & 0x0f != 1 {
        // A LOCAL command (health checks) or an unknown version: no client to speak of.
        return Peeked::Absent;
    }
    let body = &bytes[16..];
    match family >> 4 {
        1 if length >= 12 => match body.get(..12) {
            None => Peeked::NeedMore,
            Some(b) => Peeked::Found(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
                u16::from_be_bytes([b[8], b[9]]),
            )),
        },
        2 if length >= 36 => match body.get(..36) {
            None => Peeked::NeedMore,
            Some(b) => {
                let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
                Peeked::Found(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), u16::from_be_bytes([b[32], b[33]])))
            }
        },
        _ => Peeked::Absent,
    }
}

/// Reads the first address of `X-Forwarded-For` from an HTTP request head.
pub fn parse_forwarded_for(bytes: &[u8]) -> Peeked {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if bytes.len() < PEEK_LIMIT { Peeked::NeedMore } else { Peeked::Absent };
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        if !name.trim().eq_ignore_ascii_case("x-forwarded-for") {
            continue;
        }
        let first = value.split(',').next().unwrap_or("").trim();
        return match parse_address(first) {
            Some(address) => Peeked::Found(address),
            None => Peeked::Absent,
        };
    }
    Peeked::Absent
}

/// `1.2.3.4`, `1.2.3.4:5`, `2001:db8::1` or `[2001:db8::1]:5`.
fn parse_address(text: &str) -> Option<SocketAddr> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address);
    }
    text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// Peeks at a new connection until its header names the client, the header is known to be absent, or
/// [`PEEK_TIMEOUT`] passes; the bytes stay in the socket for the worker. Returns the address to route by.
pub async fn identify(stream: &tokio::net::TcpStream, source: ClientAddressSource, peer: SocketAddr) -> SocketAddr {
    let parse = match source {
        ClientAddressSource::Peer => return peer,
        ClientAddressSource::ProxyProtocol => parse_proxy_header,
        ClientAddressSource::XForwardedFor => parse_forwarded_for,
    };
    let mut buffer = vec![0u8; PEEK_LIMIT];
    let peek = async {
        let mut seen = 0;
        loop {
            let length = match stream.peek(&mut buffer).await {
                Ok(0) | Err(_) => return peer,
                Ok(length) => length,
            };
            match parse(&buffer[..length]) {
                Peeked::Found(client) => return client,
                Peeked::Absent => return peer,
                Peeked::NeedMore if length == seen => {
                    // Peeking does not consume, so the socket stays readable: wait a moment for more bytes.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Peeked::NeedMore => seen = length,
            }
        }
    };
    tokio::time::timeout(PEEK_TIMEOUT, peek).await.unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Peeked {
        Peeked::Found(text.parse().unwrap())
    }

    #[test]
    fn proxy_v1_gives_the_source_address() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse_proxy_header(header), found("203.0.113.7:51000"));
        assert_eq!(parse_proxy_header(b"PROXY TCP6 2001:db8::7 ::1 5 80\r\n"), found("[2001:db8::7]:5"));
        assert_eq!(parse_proxy_header(b"PROXY UNKNOWN\r\n"), Peeked::Absent);
        assert_eq!(parse_proxy_header(b"PROXY TCP4 203.0"), Peeked::NeedMore);
        assert_eq!(parse_proxy_header(b"PRO"), Peeked::NeedMore);
        assert_eq!(parse_proxy_header(b"GET / HTTP/1.1\r\n"), Peeked::Absent);
        assert_eq!(parse_proxy_header(&[b'P'; 200]), Peeked::Absent);
    }

    #[test]
    fn proxy_v2_gives_the_source_address() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xC3, 0x50, 0, 80]);
        assert_eq!(parse_proxy_header(&header), found("198.51.100.9:50000"));
        assert_eq!(parse_proxy_header(&header[..20]), Peeked::NeedMore);
        assert_eq!(parse_proxy_header(&header[..5]), Peeked::NeedMore);
        let mut local = header.clone();
        local[12] = 0x20;
        assert_eq!(parse_proxy_header(&local), Peeked::Absent, "LOCAL command: health check, no client");
        let mut v6 = V2_SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0, 36]);
        v6.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0; 16]);
        v6.extend_from_slice(&[0, 7, 0, 80]);
        assert_eq!(parse_proxy_header(&v6), found("[2001:db8::9]:7"));
    }

    #[test]
    fn x_forwarded_for_gives_the_first_address() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 203.0.113.7, 10.0.0.2\r\n\r\n";
        assert_eq!(parse_forwarded_for(head), found("203.0.113.7:0"));
        let v6 = b"GET / HTTP/1.1\r\nX-Forwarded-For: [2001:db8::1]:443\r\n\r\n";
        assert_eq!(parse_forwarded_for(v6), found("[2001:db8::1]:443"));
        assert_eq!(parse_forwarded_for(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Peeked::Absent);
        assert_eq!(parse_forwarded_for(b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2"), Peeked::NeedMore);
        assert_eq!(parse_forwarded_for(b"GET / HTTP/1.1\r\nX-Forwarded-For: nonsense\r\n\r\n"), Peeked::Absent);
    }
}
