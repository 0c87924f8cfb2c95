//! Which sockets listen on a port, from `/proc/net/tcp` and `/proc/net/tcp6`,
//! used to check that a new group is alone on its port: no other process's listener joined it or overlaps it.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Counts listening sockets on `address`'s port whose address overlaps it and whose inode is not ours.
pub(super) fn foreign_listeners(address: SocketAddr, ours: &[u64]) -> io::Result<usize> {
    let mut foreign = 0;
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let table = match std::fs::read_to_string(path) {
            Ok(table) => table,
            // No IPv6 in this kernel: no tcp6 table, and no IPv6 listener to meet.
            Err(e) if e.kind() == io::ErrorKind::NotFound && v6 => continue,
            Err(e) => return Err(e),
        };
        for line in table.lines().skip(1) {
            let Some(entry) = parse_proc_line(line, v6) else { continue };
            let same_port = entry.listening && entry.port == address.port();
            if same_port && overlaps(entry.ip, address.ip()) && !ours.contains(&entry.inode) {
                foreign += 1;
            }
        }
    }
    Ok(foreign)
}

struct ProcEntry {
    ip: IpAddr,
    port: u16,
    listening: bool,
    inode: u64,
}

/// One row of `/proc/net/tcp{,6}`: addresses are the raw network-order words printed as host integers.
fn parse_proc_line(line: &str, v6: bool) -> Option<ProcEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    let (ip_hex, port_hex) = local.split_once(':')?;
    let words: Option<Vec<[u8; 4]>> = (0..ip_hex.len() / 8)
        .map(|i| Some(u32::from_str_radix(ip_hex.get(8 * i..8 * i + 8)?, 16).ok()?.to_ne_bytes()))
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match (v6, bytes.len()) {
        (false, 4) => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        (true, 16) => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(ProcEntry {
        ip,
        port: u16::from_str_radix(port_hex, 16).ok()?,
        listening: *state == "0A",
        inode: inode.parse().ok()?,
    })
}

/// Whether a listener on `theirs` takes some of the connections for `ours` (same port assumed): equal
/// addresses (an IPv4-mapped IPv6 address equals its IPv4 one), or either side a wildcard.
fn overlaps(theirs: IpAddr, ours: IpAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        ip => ip,
    };
    let (theirs, ours) = (canonical(theirs), canonical(ours));
    theirs == ours || theirs.is_unspecified() || ours.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_rows_parse_to_addresses_ports_and_inodes() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1";
        let entry = parse_proc_line(v4, false).unwrap();
        assert_eq!(entry.ip, IpAddr::from([127, 0, 0, 1]));
        assert_eq!((entry.port, entry.listening, entry.inode), (8080, true, 12345));
        let v6 = "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1";
        let entry = parse_proc_line(v6, true).unwrap();
        assert_eq!(entry.ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!((entry.port, entry.inode), (80, 777));
    }

    #[test]
    fn wildcards_and_mapped_addresses_overlap() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(overlaps(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(overlaps(ip("::"), ip("127.0.0.1")));
        assert!(overlaps(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(!overlaps(ip("127.0.0.2"), ip("127.0.0.1")));
    }
}
