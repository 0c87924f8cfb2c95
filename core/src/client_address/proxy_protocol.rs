//! PROXY protocol v1 (text) and v2 (binary) headers, parsed from the bytes peeked so far: a complete
//! header with its length, the least number of bytes still needed, or why it is not a valid header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::PEEK_LIMIT;

/// The v2 signature (12 bytes) that starts every binary header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's limit).
pub const V1_MAX_LENGTH: usize = 107;

/// What the first bytes of a connection say as a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A valid header of `length` bytes. `client` is the source it names; `None` for a LOCAL command
    /// (the proxy's own health check), `UNKNOWN`/`UNSPEC` families or Unix sockets: the connection's
    /// own endpoints stand, as the specification asks.
    Complete {
        /// Bytes the header takes at the start of the stream.
        length: usize,
        /// The client it names, if any.
        client: Option<SocketAddr>,
    },
    /// Valid so far; at least `needed` bytes in all are required to decide.
    Incomplete {
        /// The least total length that could change the answer.
        needed: usize,
    },
    /// Not a PROXY header, or a broken one.
    Invalid(String),
}

/// Parses a PROXY v1 or v2 header at the start of `bytes`.
pub fn parse_proxy_header(bytes: &[u8]) -> ProxyHeader {
    if is_prefix(bytes, V2_SIGNATURE) {
        return parse_v2(bytes);
    }
    if is_prefix(bytes, b"PROXY ") {
        return parse_v1(bytes);
    }
    ProxyHeader::Invalid("no PROXY header".into())
}

/// Whether `bytes` and `marker` agree on their common length: a short read that could still become
/// the marker is not taken for a missing header.
fn is_prefix(bytes: &[u8], marker: &[u8]) -> bool {
    let common = bytes.len().min(marker.len());
    bytes[..common] == marker[..common]
}

fn invalid(reason: impl Into<String>) -> ProxyHeader {
    ProxyHeader::Invalid(reason.into())
}

fn parse_v1(bytes: &[u8]) -> ProxyHeader {
    let window = &bytes[..bytes.len().min(V1_MAX_LENGTH)];
    // Only printable ASCII may come before the CRLF: a stray byte is refused at once instead of
    // waiting for a line end that a broken sender may never write.
    let mut end = None;
    for (position, &byte) in window.iter().enumerate() {
        match byte {
            b'\r' => match window.get(position + 1) {
                Some(b'\n') => {
                    end = Some(position);
                    break;
                }
                Some(_) => return invalid("v1 header: CR without LF"),
                None => {}
            },
            0x20..=0x7e => {}
            _ => return invalid(format!("v1 header: byte 0x{byte:02x} before the line end")),
        }
    }
    let Some(end) = end else {
        return if bytes.len() < V1_MAX_LENGTH {
            ProxyHeader::Incomplete { needed: bytes.len() + 1 }
        } else {
            invalid(format!("v1 header: no line end within {V1_MAX_LENGTH} bytes"))
        };
    };
    // Checked above: everything before `end` is printable ASCII.
    let line = std::str::from_utf8(&window[..end]).unwrap_or_default();
    let length = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxyHeader::Complete { length, client: None },
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let parse_ip = |text: &str| -> Option<IpAddr> {
                if *family == "TCP4" {
                    text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                } else {
                    text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                }
            };
            let (Some(ip), Some(_)) = (parse_ip(source), parse_ip(destination)) else {
                return invalid(format!("v1 header: {family} with an address that is not {family}"));
            };
            match (parse_port(source_port), parse_port(destination_port)) {
                (Some(port), Some(_)) => ProxyHeader::Complete { length, client: Some(SocketAddr::new(ip, port)) },
                _ => invalid("v1 header: a port is not a number from 0 to 65535"),
            }
        }
        _ => invalid("v1 header: not `PROXY TCP4|TCP6 source destination port port`"),
    }
}

/// A decimal port as the specification writes it: digits only, no sign, no leading zero.
fn parse_port(text: &str) -> Option<u16> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

fn parse_v2(bytes: &[u8]) -> ProxyHeader {
    if bytes.len() < 16 {
        return ProxyHeader::Incomplete { needed: 16 };
    }
    let (version_command, family_protocol) = (bytes[12], bytes[13]);
    let body_length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let length = 16 + body_length;
    if version_command >> 4 != 2 {
        return invalid(format!("v2 header: version {} (only 2 exists)", version_command >> 4));
    }
    let command = version_command & 0x0f;
    if command > 1 {
        return invalid(format!("v2 header: unknown command {command}"));
    }
    let (family, protocol) = (family_protocol >> 4, family_protocol & 0x0f);
    if family > 3 || protocol > 2 {
        return invalid(format!("v2 header: unknown address family/protocol 0x{family_protocol:02x}"));
    }
    let address_length = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if command == 1 && body_length < address_length {
        return invalid(format!("v2 header: {body_length} address bytes, family {family} needs {address_length}"));
    }
    if length > PEEK_LIMIT {
        return invalid(format!("v2 header: {length} bytes, more than the {PEEK_LIMIT} accepted"));
    }
    if bytes.len() < length {
        return ProxyHeader::Incomplete { needed: length };
    }
    let body = &bytes[16..length];
    // LOCAL (command 0) is the proxy speaking for itself; a datagram or unspecified protocol names no
    // TCP client. Either way the connection's own endpoints stand.
    let client = match (command, family, protocol) {
        (1, 1, 1) => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(body[0], body[1], body[2], body[3])),
            u16::from_be_bytes([body[8], body[9]]),
        )),
        (1, 2, 1) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([body[32], body[33]])))
        }
        _ => None,
    };
    ProxyHeader::Complete { length, client }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(length: usize, client: &str) -> ProxyHeader {
        ProxyHeader::Complete { length, client: Some(client.parse().unwrap()) }
    }

    fn is_invalid(header: ProxyHeader) -> bool {
        matches!(header, ProxyHeader::Invalid(_))
    }

    fn v2(command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family_protocol);
        header.extend_from_slice(&(body.len() as u16).to_be_bytes());
        header.extend_from_slice(body);
        header
    }

    #[test]
    fn v1_gives_the_source_and_the_header_length() {
        let line = "PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n";
        let header = format!("{line}GET / HTTP/1.1\r\n");
        assert_eq!(parse_proxy_header(header.as_bytes()), complete(line.len(), "203.0.113.7:51000"));
        assert_eq!(parse_proxy_header(b"PROXY TCP6 2001:db8::7 ::1 5 80\r\n"), complete(33, "[2001:db8::7]:5"));
        assert_eq!(parse_proxy_header(b"PROXY UNKNOWN\r\n"), ProxyHeader::Complete { length: 15, client: None });
        assert_eq!(parse_proxy_header(b"PROXY TCP4 203.0"), ProxyHeader::Incomplete { needed: 17 });
        assert_eq!(parse_proxy_header(b"PRO"), ProxyHeader::Incomplete { needed: 4 });
        assert_eq!(parse_proxy_header(b""), ProxyHeader::Incomplete { needed: 16 });
    }

    #[test]
    fn v1_refuses_what_the_specification_does_not_allow() {
        assert!(is_invalid(parse_proxy_header(b"GET / HTTP/1.1\r\n")));
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n")), "TCP4 with IPv6");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP6 10.0.0.2 10.0.0.1 1 2\r\n")), "TCP6 with IPv4");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 10.0.0.2 ::1 1 2\r\n")), "TCP4, IPv6 destination");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n")), "signed port");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n")), "leading zero");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n")), "port range");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n")), "missing field");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n")), "double space");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4 1.2.3.4\x00")), "NUL before the line end");
        assert!(is_invalid(parse_proxy_header(b"PROXY TCP4\rX")), "CR without LF");
    }

    #[test]
    fn v1_is_accepted_up_to_107_bytes_and_refused_past() {
        // UNKNOWN may carry anything up to the line end: pad it to exactly the limit.
        let padded = |total: usize| {
            let mut line = b"PROXY UNKNOWN ".to_vec();
            line.resize(total - 2, b'x');
            line.extend_from_slice(b"\r\n");
            line
        };
        assert_eq!(parse_proxy_header(&padded(107)), ProxyHeader::Complete { length: 107, client: None });
        assert!(is_invalid(parse_proxy_header(&padded(108))));
        // Without a line end: still incomplete at 106 bytes, refused at 107.
        let open = vec![b'x'; 100];
        let mut partial = b"PROXY ".to_vec();
        partial.extend_from_slice(&open);
        assert_eq!(parse_proxy_header(&partial), ProxyHeader::Incomplete { needed: 107 });
        partial.push(b'x');
        assert!(is_invalid(parse_proxy_header(&partial)));
        // The longest real header (TCP6, full addresses, 5-digit ports) fits.
        let longest = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), 104);
        assert!(matches!(parse_proxy_header(longest.as_bytes()), ProxyHeader::Complete { length: 104, .. }));
    }

    #[test]
    fn v2_gives_the_source_address_and_length() {
        let header = v2(1, 0x11, &[198, 51, 100, 9, 10, 0, 0, 1, 0xC3, 0x50, 0, 80]);
        assert_eq!(parse_proxy_header(&header), complete(28, "198.51.100.9:50000"));
        assert_eq!(parse_proxy_header(&header[..20]), ProxyHeader::Incomplete { needed: 28 });
        assert_eq!(parse_proxy_header(&header[..15]), ProxyHeader::Incomplete { needed: 16 });
        assert_eq!(parse_proxy_header(&header[..5]), ProxyHeader::Incomplete { needed: 16 });
        let mut body = "2001:db8::9".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0, 7, 0, 80]);
        assert_eq!(parse_proxy_header(&v2(1, 0x21, &body)), complete(52, "[2001:db8::9]:7"));
        // TLVs after the addresses count in the length and are skipped.
        let mut with_tlv = vec![1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 80];
        with_tlv.extend_from_slice(&[0x04, 0, 2, 0xAB, 0xCD]);
        assert_eq!(parse_proxy_header(&v2(1, 0x11, &with_tlv)), complete(33, "1.2.3.4:9"));
    }

    #[test]
    fn v2_local_and_unspec_keep_the_connection_endpoints() {
        let local = v2(0, 0x00, &[]);
        assert_eq!(parse_proxy_header(&local), ProxyHeader::Complete { length: 16, client: None });
        let local_with_addresses = v2(0, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(parse_proxy_header(&local_with_addresses), ProxyHeader::Complete { length: 28, client: None });
        assert_eq!(parse_proxy_header(&v2(1, 0x00, &[])), ProxyHeader::Complete { length: 16, client: None });
        let datagram = v2(1, 0x12, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(parse_proxy_header(&datagram), ProxyHeader::Complete { length: 28, client: None });
    }

    #[test]
    fn v2_refuses_short_lengths_bad_versions_and_oversize() {
        assert!(is_invalid(parse_proxy_header(&v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8]))), "INET needs 12 bytes");
        assert!(is_invalid(parse_proxy_header(&v2(1, 0x21, &[0; 20]))), "INET6 needs 36 bytes");
        let mut version_one = v2(1, 0x11, &[0; 12]);
        version_one[12] = 0x11;
        assert!(is_invalid(parse_proxy_header(&version_one)));
        assert!(is_invalid(parse_proxy_header(&v2(2, 0x11, &[0; 12]))), "command 2");
        assert!(is_invalid(parse_proxy_header(&v2(1, 0x41, &[0; 12]))), "family 4");
        let mut huge = v2(1, 0x11, &[0; 12]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(is_invalid(parse_proxy_header(&huge[..16])), "over the peek limit: refused before waiting");
    }
}
