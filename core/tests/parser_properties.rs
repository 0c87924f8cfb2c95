//! Property tests (a bounded fuzz) of the PROXY and X-Forwarded-For parsers: arbitrary and mutated bytes
//! never panic, verdicts are stable as bytes arrive, and generated valid headers read back exactly.
//! The seed is fixed and the cases bounded, so a run is repeatable and takes about a second.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sticky_cluster::client_address::{
    parse_forwarded_for, parse_proxy_header, rightmost_untrusted, ForwardedFor, ProxyHeader, TrustedProxies,
    PEEK_LIMIT, V1_MAX_LENGTH, V2_SIGNATURE,
};

fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0x57_1c_c1), failure_persistence: None, ..Config::default() }
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ]
}

fn v1_header(source: SocketAddr, destination_port: u16) -> Vec<u8> {
    let (family, destination) = match source.ip() {
        IpAddr::V4(_) => ("TCP4", "10.0.0.1".to_string()),
        IpAddr::V6(_) => ("TCP6", "2001:db8::1".to_string()),
    };
    format!("PROXY {family} {} {destination} {} {destination_port}\r\n", source.ip(), source.port()).into_bytes()
}

fn v2_header(source: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    let mut body = Vec::new();
    match source.ip() {
        IpAddr::V4(ip) => {
            header.extend_from_slice(&[0x21, 0x11]);
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&[10, 0, 0, 1]);
        }
        IpAddr::V6(ip) => {
            header.extend_from_slice(&[0x21, 0x21]);
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&[0; 16]);
        }
    }
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&80u16.to_be_bytes());
    body.extend_from_slice(tlvs);
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}

/// What every verdict on `bytes` must satisfy, and how it must relate to the verdicts on its prefixes.
fn check_proxy_verdicts(bytes: &[u8]) -> Result<(), TestCaseError> {
    let full = parse_proxy_header(bytes);
    match &full {
        ProxyHeader::Complete { length, .. } => {
            prop_assert!(*length <= bytes.len());
            prop_assert_eq!(&parse_proxy_header(&bytes[..*length]), &full, "a header stands on its own bytes");
        }
        ProxyHeader::Incomplete { needed } => {
            prop_assert!(*needed > bytes.len(), "needed {} with {} bytes", needed, bytes.len());
            prop_assert!(*needed <= PEEK_LIMIT, "a wait the peek limit cannot serve");
        }
        ProxyHeader::Invalid(_) => {}
    }
    for cut in 0..bytes.len() {
        match parse_proxy_header(&bytes[..cut]) {
            // More bytes never repair a broken header or change a complete one.
            ProxyHeader::Invalid(_) => prop_assert!(matches!(full, ProxyHeader::Invalid(_)), "cut {}", cut),
            complete @ ProxyHeader::Complete { .. } => prop_assert_eq!(&complete, &full, "cut {}", cut),
            ProxyHeader::Incomplete { needed } => prop_assert!(needed > cut),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn proxy_arbitrary_bytes_give_consistent_verdicts(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
        check_proxy_verdicts(&bytes)?;
    }

    #[test]
    fn proxy_bytes_after_a_signature_give_consistent_verdicts(
        v2 in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
        bytes.extend_from_slice(&tail);
        check_proxy_verdicts(&bytes)?;
    }

    #[test]
    fn proxy_valid_headers_read_back_exactly(
        ip in ip(),
        port in any::<u16>(),
        destination_port in any::<u16>(),
        v2 in any::<bool>(),
        tlvs in proptest::collection::vec(any::<u8>(), 0..64),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let source = SocketAddr::new(ip, port);
        let header = if v2 { v2_header(source, &tlvs) } else { v1_header(source, destination_port) };
        prop_assert!(v2 || header.len() <= V1_MAX_LENGTH);
        let mut stream = header.clone();
        stream.extend_from_slice(&rest);
        prop_assert_eq!(
            parse_proxy_header(&stream),
            ProxyHeader::Complete { length: header.len(), client: Some(source) }
        );
        check_proxy_verdicts(&stream)?;
    }

    #[test]
    fn proxy_mutated_headers_never_panic_and_stay_consistent(
        ip in ip(),
        port in any::<u16>(),
        v2 in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut header = if v2 { v2_header(SocketAddr::new(ip, port), &[]) } else { v1_header(SocketAddr::new(ip, port), 80) };
        for (at, byte) in flips {
            let at = at.index(header.len());
            header[at] = byte;
        }
        check_proxy_verdicts(&header)?;
    }
}

fn entry_text(address: SocketAddr, form: u8) -> String {
    match (address.ip(), form % 3) {
        (ip, 0) => ip.to_string(),
        (IpAddr::V6(ip), 1) => format!("[{ip}]"),
        _ => address.to_string(),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn forwarded_for_arbitrary_bytes_give_consistent_verdicts(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        http in any::<bool>(),
    ) {
        let mut head = if http { b"GET / HTTP/1.1\r\nX-Forwarded-For: ".to_vec() } else { Vec::new() };
        head.extend_from_slice(&bytes);
        let full = parse_forwarded_for(&head);
        if let ForwardedFor::Incomplete { needed } = full {
            prop_assert!(needed > head.len() && needed <= PEEK_LIMIT);
        }
        for cut in 0..head.len() {
            match parse_forwarded_for(&head[..cut]) {
                ForwardedFor::NotHttp(_) => prop_assert!(matches!(full, ForwardedFor::NotHttp(_)), "cut {}", cut),
                complete @ ForwardedFor::Complete(_) => prop_assert_eq!(&complete, &full, "cut {}", cut),
                ForwardedFor::Incomplete { needed } => prop_assert!(needed > cut),
            }
        }
    }

    #[test]
    fn forwarded_for_entries_in_several_headers_read_back_in_order(
        addresses in proptest::collection::vec((ip(), any::<u16>(), any::<u8>()), 1..8),
        split in proptest::collection::vec(any::<bool>(), 8),
        upper in any::<bool>(),
    ) {
        let name = if upper { "X-FORWARDED-FOR" } else { "x-forwarded-for" };
        let mut head = String::from("GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: a\r\n");
        let mut line = Vec::new();
        let mut expected = Vec::new();
        for (i, (ip, port, form)) in addresses.iter().enumerate() {
            let address = SocketAddr::new(*ip, if form % 3 == 2 { *port } else { 0 });
            line.push(entry_text(address, *form));
            expected.push(Some(address));
            if split[i] || i == addresses.len() - 1 {
                head += &format!("{name}: {}\r\nCookie: io=abc\r\n", line.join(", "));
                line.clear();
            }
        }
        head += "\r\n";
        prop_assert_eq!(parse_forwarded_for(head.as_bytes()), ForwardedFor::Complete(expected.clone()));
        // The walk from the right: with nothing trusted, the rightmost entry; with everything, the leftmost.
        let none = TrustedProxies::default();
        prop_assert_eq!(rightmost_untrusted(&expected, &none), *expected.last().unwrap());
        let all = TrustedProxies(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        prop_assert_eq!(rightmost_untrusted(&expected, &all), expected[0]);
    }
}
