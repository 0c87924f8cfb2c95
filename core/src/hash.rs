//! The routing hash: npm `string-hash` over the client address text exactly as Node prints it.
//! Keeping both halves identical to Node keeps every client on the same index after a move from the npm module.

use std::fmt::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// npm `string-hash`: 5381, then `h = (h * 33) ^ unit` for each UTF-16 unit from the last to the first.
pub fn string_hash(text: &str) -> u32 {
    let step = |hash: u32, unit: u32| hash.wrapping_mul(33) ^ unit;
    if text.is_ascii() {
        // Address texts are ASCII, where bytes are the UTF-16 units: no conversion on the hot path.
        return text.bytes().rev().fold(5381, |hash, byte| step(hash, u32::from(byte)));
    }
    text.chars().rev().fold(5381, |hash, c| {
        let mut units = [0u16; 2];
        c.encode_utf16(&mut units).iter().rev().fold(hash, |hash, &unit| step(hash, u32::from(unit)))
    })
}

/// The worker index for a client address: `string_hash(node_address_text(ip)) % concurrency`.
pub fn route_index(ip: IpAddr, concurrency: u32) -> u32 {
    // Formatted on the stack: this runs once per accepted connection.
    let mut text = AddressText { bytes: [0; 64], len: 0 };
    write_node_address(&mut text, ip);
    string_hash(text.as_str()) % concurrency.max(1)
}

/// The address text Node gives `socket.remoteAddress` (libuv's `inet_ntop`), which differs from Rust's
/// `Display` for IPv4-compatible addresses such as `::1.2.3.4`.
pub fn node_address_text(ip: IpAddr) -> String {
    let mut text = String::with_capacity(46);
    write_node_address(&mut text, ip);
    text
}

/// The text Node reports for an accepted peer: [`node_address_text`] plus `%ifname` for a link-local IPv6
/// peer with a scope, as Node's `AddressToJS` appends it (nothing when the index has no name).
pub fn node_peer_text(peer: SocketAddr) -> String {
    let mut text = node_address_text(peer.ip());
    if let SocketAddr::V6(v6) = peer {
        if is_scoped_link_local(v6) {
            if let Some(name) = interface_name(v6.scope_id()) {
                text.push('%');
                text.push_str(&name);
            }
        }
    }
    text
}

/// The worker index of a peer as `accept()` reports it: [`route_index`], or for a scoped link-local IPv6
/// peer the hash of its text with `%ifname`, as Node's `remoteAddress` gives it (the kernel program's too).
pub fn peer_index(peer: SocketAddr, concurrency: u32) -> u32 {
    match peer {
        SocketAddr::V6(v6) if is_scoped_link_local(v6) => string_hash(&node_peer_text(peer)) % concurrency.max(1),
        _ => route_index(peer.ip(), concurrency),
    }
}

fn is_scoped_link_local(peer: std::net::SocketAddrV6) -> bool {
    peer.ip().segments()[0] & 0xffc0 == 0xfe80 && peer.scope_id() > 0
}

fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// A fixed buffer long enough for any address text (at most 45 bytes).
struct AddressText {
    bytes: [u8; 64],
    len: usize,
}

impl AddressText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("address text is ASCII")
    }
}

impl Write for AddressText {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len + text.len();
        self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn write_node_address(out: &mut impl Write, ip: IpAddr) {
    let _ = match ip {
        IpAddr::V4(v4) => write!(out, "{v4}"),
        IpAddr::V6(v6) => write_node_ipv6(out, v6),
    };
}

fn write_node_ipv6(out: &mut impl Write, ip: Ipv6Addr) -> std::fmt::Result {
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
    for i in 0..8 {
        if in_best(i) {
            if i == best_base {
                out.write_char(':')?;
            }
            continue;
        }
        if i != 0 {
            out.write_char(':')?;
        }
        let embeds_ipv4 = i == 6 && best_base == 0 && (best_len == 6 || (best_len == 5 && words[5] == 0xffff));
        if embeds_ipv4 {
            let octets = ip.octets();
            return write!(out, "{}.{}.{}.{}", octets[12], octets[13], octets[14], octets[15]);
        }
        write!(out, "{:x}", words[i])?;
    }
    if best_len > 0 && best_base + best_len == 8 {
        out.write_char(':')?;
    }
    Ok(())
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
    fn the_longest_address_text_fits_the_stack_buffer() {
        let ip: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(route_index(ip, 1000), string_hash(&node_address_text(ip)) % 1000);
    }

    #[test]
    fn link_local_peers_get_their_interface_name_as_node_prints_it() {
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 0, 1));
        let name = interface_name(1).expect("interface 1 (lo) exists");
        assert_eq!(node_peer_text(scoped), format!("fe80::1%{name}"));
        assert_eq!(peer_index(scoped, 7), string_hash(&format!("fe80::1%{name}")) % 7);
        // Node appends nothing without a scope, or for an address that is not link-local.
        let unscoped = SocketAddr::V6(std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 0, 0));
        assert_eq!(node_peer_text(unscoped), "fe80::1");
        let global = SocketAddr::V6(std::net::SocketAddrV6::new("2001:db8::1".parse().unwrap(), 80, 0, 1));
        assert_eq!(node_peer_text(global), "2001:db8::1");
    }

    #[test]
    fn route_index_is_hash_modulo_concurrency() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(route_index(ip, 4), 340519950 % 4);
        assert_eq!(route_index(ip, 1), 0);
    }
}
