//! The routing hash: npm `string-hash` over the client address text exactly as Node prints it.
//! Keeping both halves identical to Node keeps every client on the same index after a move from the npm module.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

/// npm `string-hash`: 5381, then `h = (h * 33) ^ unit` for each UTF-16 unit from the last to the first.
pub fn string_hash(text: &str) -> u32 {
    let units: Vec<u16> = text.encode_utf16().collect();
    units.iter().rev().fold(5381u32, |hash, &unit| hash.wrapping_mul(33) ^ u32::from(unit))
}

/// The worker index for a client address: `string_hash(node_address_text(ip)) % concurrency`.
pub fn route_index(ip: IpAddr, concurrency: u32) -> u32 {
    string_hash(&node_address_text(ip)) % concurrency.max(1)
}

/// The address text Node gives `socket.remoteAddress` (libuv's `inet_ntop`), which differs from Rust's
/// `Display` for IPv4-compatible addresses such as `::1.2.3.4`.
pub fn node_address_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => node_ipv6_text(v6),
    }
}

fn node_ipv6_text(ip: Ipv6Addr) -> String {
    let words = ip.segments();
    // The first longest run of two or more zero words is the one written as `::`.
    let (mut best_base, mut best_len) = (usize::MAX, 0usize);
    let mut run_start = None;
    for i in 0..=8 {
        let zero = words.get(i) == Some(&0);
        match (zero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                if i - start > best_len && i - start >= 2 {
                    (best_base, best_len) = (start, i - start);
                }
                run_start = None;
            }
            _ => {}
        }
    }
    let in_best = |i: usize| best_len > 0 && i >= best_base && i < best_base + best_len;
    let mut text = String::with_capacity(40);
    for i in 0..8 {
        if in_best(i) {
            if i == best_base {
                text.push(':');
            }
            continue;
        }
        if i != 0 {
            text.push(':');
        }
        let embeds_ipv4 = i == 6 && best_base == 0 && (best_len == 6 || (best_len == 5 && words[5] == 0xffff));
        if embeds_ipv4 {
            let octets = ip.octets();
            let _ = write!(text, "{}.{}.{}.{}", octets[12], octets[13], octets[14], octets[15]);
            return text;
        }
        let _ = write!(text, "{:x}", words[i]);
    }
    if best_len > 0 && best_base + best_len == 8 {
        text.push(':');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_hashes_to_the_seed() {
        assert_eq!(string_hash(""), 5381);
    }

    #[test]
    fn hash_walks_utf16_units_from_the_end() {
        // One unit: (5381 * 33) ^ 'a'.
        assert_eq!(string_hash("a"), (5381u32 * 33) ^ 97);
        // Two units: the last one is mixed in first.
        assert_eq!(string_hash("ab"), ((5381u32 * 33) ^ 98).wrapping_mul(33) ^ 97);
        // A character outside the BMP is two surrogate units, as in JavaScript.
        assert_eq!(string_hash("😀"), ((5381u32 * 33) ^ 0xDE00).wrapping_mul(33) ^ 0xD83D);
    }

    #[test]
    fn route_index_is_hash_modulo_concurrency() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(route_index(ip, 4), 340519950 % 4);
        assert_eq!(route_index(ip, 1), 0);
    }
}
