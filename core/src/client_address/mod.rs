//! The real client address behind a load balancer: which peers may name it (`trustedProxies`), and what
//! their PROXY protocol or `X-Forwarded-For` header says, read with MSG_PEEK before the handoff.

mod forwarded_for;
pub mod header_wait;
mod proxy_protocol;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;

pub use forwarded_for::{parse_entry, parse_forwarded_for, ForwardedFor};
pub use proxy_protocol::{parse_proxy_header, ProxyHeader, V1_MAX_LENGTH, V2_SIGNATURE};

/// Where the routing hash takes the client address from (YAML `clientAddress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressSource {
    /// The TCP peer, as the npm module does.
    #[default]
    Peer,
    /// A PROXY protocol v1 or v2 header (HAProxy `send-proxy`, AWS NLB, ...), mandatory from a trusted peer.
    ProxyProtocol,
    /// The rightmost `X-Forwarded-For` address that is not itself a trusted proxy.
    XForwardedFor,
}

impl ClientAddressSource {
    /// The name as the YAML file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAddressSource::Peer => "peer",
            ClientAddressSource::ProxyProtocol => "proxy-protocol",
            ClientAddressSource::XForwardedFor => "x-forwarded-for",
        }
    }
}

impl FromStr for ClientAddressSource {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "peer" => Ok(ClientAddressSource::Peer),
            "proxy-protocol" => Ok(ClientAddressSource::ProxyProtocol),
            "x-forwarded-for" => Ok(ClientAddressSource::XForwardedFor),
            _ => Err(format!("{text:?} is not one of peer, proxy-protocol, x-forwarded-for")),
        }
    }
}

/// The most bytes peeked for a header: a PROXY v2 header with TLVs, or an HTTP request head.
pub const PEEK_LIMIT: usize = 8192;

/// A block of addresses such as `10.0.0.0/8`, `2001:db8::/32` or a single `192.0.2.7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack
    /// listener reports IPv4 peers) matches the IPv4 block of its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; any other address as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an address block such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| bad())?;
        let network = canonical(network);
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                digits.parse::<u8>().ok().filter(|&p| p <= width).ok_or_else(|| {
                    format!("{text:?}: the prefix length must be at most {width} for this address family")
                })?
            }
            Some(_) => return Err(bad()),
        };
        let cidr = Cidr { network, prefix };
        if cidr.masked() != network {
            return Err(format!("{text:?} has host bits set: write {}", Cidr { network: cidr.masked(), prefix }));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn masked(&self) -> IpAddr {
        match self.network {
            IpAddr::V4(ip) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(ip) & mask).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The peers whose headers are believed (YAML `trustedProxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    /// Whether `ip` is in one of the blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(ip))
    }
}

/// What to do with a connection, given the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Route by `client`; first take `strip` bytes (a PROXY header) off the stream.
    Route {
        /// The address to route by and report to the worker.
        client: SocketAddr,
        /// Bytes to consume before the handoff (0: the stream stays untouched).
        strip: usize,
    },
    /// Wait until at least `needed` bytes in all are there.
    NeedMore {
        /// The least total length that could change the decision.
        needed: usize,
    },
    /// Close the connection: a trusted proxy broke the PROXY protocol.
    Reject(String),
}

/// Decides from the bytes peeked on a connection from `peer`, which must be a trusted proxy (anyone
/// else is routed by the TCP peer without looking). PROXY headers are mandatory and consumed; an
/// `X-Forwarded-For` head is read from the right past trusted addresses (nginx `real_ip_recursive`)
/// and left in the stream.
pub fn decide(source: ClientAddressSource, trusted: &TrustedProxies, peer: SocketAddr, bytes: &[u8]) -> Decision {
    match source {
        ClientAddressSource::Peer => Decision::Route { client: peer, strip: 0 },
        ClientAddressSource::ProxyProtocol => match parse_proxy_header(bytes) {
            ProxyHeader::Complete { length, client } => {
                Decision::Route { client: client.unwrap_or(peer), strip: length }
            }
            ProxyHeader::Incomplete { needed } => Decision::NeedMore { needed },
            ProxyHeader::Invalid(reason) => Decision::Reject(reason),
        },
        ClientAddressSource::XForwardedFor => match parse_forwarded_for(bytes) {
            ForwardedFor::Complete(entries) => {
                Decision::Route { client: rightmost_untrusted(&entries, trusted).unwrap_or(peer), strip: 0 }
            }
            ForwardedFor::Incomplete { needed } => Decision::NeedMore { needed },
            ForwardedFor::NotHttp(_) => Decision::Route { client: peer, strip: 0 },
        },
    }
}

/// Walks the entries from the right past trusted proxies: the first untrusted address is the client.
/// An entry that is not an address ends the walk at the last address seen (whoever wrote it cannot be
/// vouched for); when every entry is trusted, the leftmost one stands, as in nginx.
pub fn rightmost_untrusted(entries: &[Option<SocketAddr>], trusted: &TrustedProxies) -> Option<SocketAddr> {
    let mut last = None;
    for entry in entries.iter().rev() {
        match entry {
            Some(address) if trusted.contains(address.ip()) => last = Some(*address),
            Some(address) => return Some(*address),
            None => break,
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn cidrs_parse_match_and_refuse_host_bits() {
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains("10.1.200.3".parse().unwrap()));
        assert!(block.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped peers of a dual-stack listener");
        assert!(!block.contains("10.2.0.1".parse().unwrap()));
        assert!(!block.contains("::1".parse().unwrap()));
        let single: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(single.to_string(), "192.0.2.7/32");
        assert!(single.contains("192.0.2.7".parse().unwrap()) && !single.contains("192.0.2.8".parse().unwrap()));
        let everything: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("203.0.113.1".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()) && !v6.contains("2001:db9::1".parse().unwrap()));
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!("10.1.2.3/16".parse::<Cidr>().unwrap_err().contains("write 10.1.0.0/16"));
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("at most 32"));
        assert!("2001:db8::/129".parse::<Cidr>().is_err());
        for bad in ["", "10.0.0.0/", "10.0.0.0/+8", "10.0.0/8", "example.com", "10.0.0.0/8/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_past_trusted_proxies() {
        let proxies = trusted(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let walk = |list: &[&str]| {
            let entries: Vec<Option<SocketAddr>> = list.iter().map(|e| parse_entry(e)).collect();
            rightmost_untrusted(&entries, &proxies).map(|a| a.ip().to_string())
        };
        // The client wrote a fake address on the left; the proxies appended the real one.
        assert_eq!(walk(&["6.6.6.6", "203.0.113.7", "10.0.0.2"]).as_deref(), Some("203.0.113.7"));
        assert_eq!(walk(&["203.0.113.7"]).as_deref(), Some("203.0.113.7"));
        assert_eq!(walk(&["10.0.0.3", "10.0.0.2"]).as_deref(), Some("10.0.0.3"), "all trusted: the leftmost");
        assert_eq!(walk(&["6.6.6.6", "garbage", "10.0.0.2"]).as_deref(), Some("10.0.0.2"), "stops at garbage");
        assert_eq!(walk(&["6.6.6.6", "garbage"]), None);
        assert_eq!(walk(&[]), None);
        assert_eq!(walk(&["2001:db8::7", "2001:db8:ffff::1"]).as_deref(), Some("2001:db8::7"));
    }

    #[test]
    fn decisions_for_each_source() {
        let proxies = trusted(&["127.0.0.1"]);
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let proxy = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\nGET /";
        assert_eq!(
            decide(ClientAddressSource::ProxyProtocol, &proxies, peer, proxy),
            Decision::Route { client: "203.0.113.7:51000".parse().unwrap(), strip: 42 }
        );
        assert!(matches!(
            decide(ClientAddressSource::ProxyProtocol, &proxies, peer, b"GET / HTTP/1.1\r\n"),
            Decision::Reject(_)
        ));
        assert_eq!(
            decide(ClientAddressSource::ProxyProtocol, &proxies, peer, b"PROXY UNKNOWN\r\n"),
            Decision::Route { client: peer, strip: 15 }
        );
        let head = b"GET / HTTP/1.1\r\nX-Forwarded-For: 9.9.9.9, 203.0.113.9\r\n\r\n";
        assert_eq!(
            decide(ClientAddressSource::XForwardedFor, &proxies, peer, head),
            Decision::Route { client: "203.0.113.9:0".parse().unwrap(), strip: 0 }
        );
        assert_eq!(
            decide(ClientAddressSource::XForwardedFor, &proxies, peer, b"\x16\x03\x01"),
            Decision::Route { client: peer, strip: 0 }
        );
        assert_eq!(
            decide(ClientAddressSource::XForwardedFor, &proxies, peer, b"GET / HT"),
            Decision::NeedMore { needed: 9 }
        );
    }
}
