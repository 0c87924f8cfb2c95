//! `X-Forwarded-For` from an HTTP/1 request head: every such header, joined in order as HTTP says,
//! split into its entries; which entry is the client is decided by the caller from the right.

use std::net::{IpAddr, SocketAddr};

use super::PEEK_LIMIT;

/// What the first bytes of a connection say as an HTTP request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedFor {
    /// The head is complete: every `X-Forwarded-For` entry from left to right, `None` where an entry is
    /// not an address (`unknown`, an obfuscated name, garbage). Empty when the header is absent.
    Complete(Vec<Option<SocketAddr>>),
    /// The head is not complete yet; at least `needed` bytes in all are required.
    Incomplete {
        /// The least total length that could change the answer.
        needed: usize,
    },
    /// Not an HTTP/1 request head within [`PEEK_LIMIT`] bytes (binary data, or a head over the limit).
    NotHttp(String),
}

/// Reads the `X-Forwarded-For` entries of the request head at the start of `bytes`.
pub fn parse_forwarded_for(bytes: &[u8]) -> ForwardedFor {
    let window = &bytes[..bytes.len().min(PEEK_LIMIT)];
    let end = window.windows(4).position(|w| w == b"\r\n\r\n");
    let head = &window[..end.unwrap_or(window.len())];
    if let Some(byte) = head.iter().find(|&&b| (b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t')) || b == 0x7f) {
        return ForwardedFor::NotHttp(format!("control byte 0x{byte:02x} in the request head"));
    }
    let Some(end) = end else {
        return if bytes.len() < PEEK_LIMIT {
            ForwardedFor::Incomplete { needed: bytes.len() + 1 }
        } else {
            ForwardedFor::NotHttp(format!("no complete request head within {PEEK_LIMIT} bytes"))
        };
    };
    // Header values may carry obs-text (bytes >= 0x80); addresses never do, so lossy text is enough.
    let head = String::from_utf8_lossy(&window[..end]);
    let mut values: Vec<String> = Vec::new();
    let mut continuing = false;
    for line in head.split("\r\n").skip(1) {
        if line.starts_with([' ', '\t']) {
            // An obsolete folded line continues the previous header's value.
            if continuing {
                if let Some(last) = values.last_mut() {
                    last.push(' ');
                    last.push_str(line.trim());
                }
            }
            continue;
        }
        continuing = false;
        let Some((name, value)) = line.split_once(':') else { continue };
        // No whitespace may precede the colon (RFC 9112 section 5.1): such a line is not this header.
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            values.push(value.trim().to_string());
            continuing = true;
        }
    }
    let entries = values
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(parse_entry)
        .collect();
    ForwardedFor::Complete(entries)
}

/// `1.2.3.4`, `1.2.3.4:5`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:5` (port 0 when absent).
pub fn parse_entry(text: &str) -> Option<SocketAddr> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address);
    }
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[&str]) -> ForwardedFor {
        ForwardedFor::Complete(list.iter().map(|e| parse_entry(e)).collect())
    }

    #[test]
    fn every_entry_of_every_header_in_order() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 203.0.113.7, 10.0.0.2\r\n\r\n";
        assert_eq!(parse_forwarded_for(head), entries(&["203.0.113.7", "10.0.0.2"]));
        let several =
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nHost: a\r\nX-FORWARDED-FOR: 2.2.2.2,3.3.3.3\r\n\r\n";
        assert_eq!(parse_forwarded_for(several), entries(&["1.1.1.1", "2.2.2.2", "3.3.3.3"]));
        let v6 = b"GET / HTTP/1.1\r\nX-Forwarded-For: [2001:db8::1]:443, 2001:db8::2\r\n\r\n";
        assert_eq!(parse_forwarded_for(v6), entries(&["[2001:db8::1]:443", "2001:db8::2"]));
        let folded = b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1,\r\n 2.2.2.2\r\n\r\n";
        assert_eq!(parse_forwarded_for(folded), entries(&["1.1.1.1", "2.2.2.2"]));
    }

    #[test]
    fn absent_unknown_and_lookalike_headers() {
        assert_eq!(parse_forwarded_for(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), ForwardedFor::Complete(vec![]));
        let unknown = b"GET / HTTP/1.1\r\nX-Forwarded-For: unknown, 10.0.0.2\r\n\r\n";
        assert_eq!(parse_forwarded_for(unknown), ForwardedFor::Complete(vec![None, parse_entry("10.0.0.2")]));
        let spaced = b"GET / HTTP/1.1\r\nX-Forwarded-For : 1.2.3.4\r\n\r\n";
        assert_eq!(parse_forwarded_for(spaced), ForwardedFor::Complete(vec![]), "space before the colon");
        let in_body = b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert_eq!(parse_forwarded_for(in_body), ForwardedFor::Complete(vec![]), "the body is not the head");
    }

    #[test]
    fn incomplete_heads_binary_data_and_heads_over_the_limit() {
        assert_eq!(
            parse_forwarded_for(b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2"),
            ForwardedFor::Incomplete { needed: 37 }
        );
        assert!(matches!(parse_forwarded_for(b"\x16\x03\x01\x02\x00"), ForwardedFor::NotHttp(_)), "TLS");
        let mut big = b"GET / HTTP/1.1\r\nCookie: ".to_vec();
        big.resize(PEEK_LIMIT + 100, b'a');
        assert!(matches!(parse_forwarded_for(&big), ForwardedFor::NotHttp(_)));
        big.truncate(PEEK_LIMIT - 1);
        assert_eq!(parse_forwarded_for(&big), ForwardedFor::Incomplete { needed: PEEK_LIMIT });
        // A head that ends exactly at the limit still counts.
        let mut exact = b"GET / HTTP/1.1\r\nX-Forwarded-For: 9.9.9.9\r\nCookie: ".to_vec();
        exact.resize(PEEK_LIMIT - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_forwarded_for(&exact), entries(&["9.9.9.9"]));
    }
}
