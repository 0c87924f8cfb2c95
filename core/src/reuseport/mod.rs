//! Kernel routing (`routing: kernel`): one `SO_REUSEPORT` listener per worker on the client port, and a
//! classic BPF program that makes the kernel itself put each SYN on listener `string_hash(text) % concurrency`.
//!
//! # The group
//! [`bind_group`] creates `concurrency` TCP listeners on one address with `SO_REUSEADDR` + `SO_REUSEPORT`
//! (dual-stack on `::`, as the handoff listener), attaches the program to the first one before any of them
//! listens (so no SYN is ever spread by the kernel's default hash), then calls `listen()` in index order: the
//! kernel's group order is the order of `listen()`, so listener `i` is socket `i` of the group. Closing a
//! listener moves the group's last socket into its slot, so the holder must keep every listener open;
//! [`ReuseportGroup::resize`] changes the size for a reload without moving any listener that stays.
//!
//! Never joining someone else's group: before the group exists, a probe socket binds the address *without*
//! `SO_REUSEPORT`, which fails with `EADDRINUSE` if anything already holds it (the same check as handoff
//! mode's bind). The probe must be closed before our sockets can bind, which leaves a window in which a
//! process of the same user (the kernel lets only the same uid join a group) could bind with `SO_REUSEPORT`;
//! so once the group listens, every listening socket on the port in `/proc/net/tcp` and `/proc/net/tcp6` whose
//! address overlaps ours must be one of our inodes, or the bind is refused. A socket of the same user that
//! joins later takes index `concurrency` or above, which the program never returns: it receives nothing as
//! long as our listeners stay open.
//!
//! # The program ([`program`])
//! IPv4 SYNs: the four source bytes at `SKF_NET_OFF + 12`, mixed as the text `a.b.c.d` (IPv4 listener) or
//! `::ffff:a.b.c.d` (IPv6 listener) from the last character to the first, digits by `DIV`/`MOD`. IPv6 SYNs
//! (version nibble 6): the exact text libuv's `inet_ntop6` prints (first longest zero run of two or more words
//! compressed, lower-case hex, `::a.b.c.d` and `::ffff:a.b.c.d` forms) and, for `fe80::/10` peers, `%ifname`
//! from the interface table read when the program is generated: the scope Node prints is the interface the
//! SYN arrived on (`SKF_AD_IFINDEX`). An interface created after the group (or one left out because the table
//! did not fit in 4,096 instructions) gets no suffix, so its link-local clients may land elsewhere than Node's
//! text says. Kernels read `skb->dev`, which differs from the scope only under VRF (l3mdev) setups.
//!
//! The program reads only the source address, so a SYN-cookie ACK (the connection made when the queue
//! overflowed) is placed on the same listener as its SYN would have been.
//!
//! # Measured (x86_64, Linux 6.18, 2026-11-27; `cargo test -p sticky-cluster reuseport`)
//! - Program length: 168 instructions on an IPv4 listener; 831 on an IPv6 listener with no interfaces, plus
//!   `5 + Σ (6 + 2 × name length)` for the interface table (`lo` + `eth0`: 860). The kernel's limit is 4,096
//!   (it accepts a generated program of 4,076 instructions: a 400-interface table cut to fit).
//! - Longest executed path: 149 (IPv4 listener), 172 (IPv4 client on an IPv6 listener), 476 over 100,000
//!   random IPv6 addresses, 550 for `febf:ffff:…:ffff` scoped to the last entry of a 3-interface table.
//! - Interpreter (`interpreter.rs`): the 35 contract vectors (full 32-bit hash and index), 100,000 random IPv4
//!   clients on each listener form and 100,000 random IPv6 clients (zero runs of every length, `::ffff:`,
//!   `::a.b.c.d`, link-local with known and unknown interfaces), each against `string_hash(Node text) % N`
//!   for N in 1, 2, 3, 4, 7, 64, 1000: no difference. The checker's static rules hold for every generated
//!   program, and the kernel refuses the same hand-written bad programs as the test checker.
//! - Real kernel (`core/tests/reuseport.rs`): 300 loopback sources × N = 1, 2, 7 on `127.0.0.1`; 300 IPv4
//!   sources plus `::1` on a dual-stack `[::]` group of 7; 305 clients in a network namespace (240 native
//!   IPv6, 5 link-local, 60 IPv4); every connection on listener `string_hash(text) % N`. A same-user socket
//!   joining the group afterwards received 0 of 300; a group grown from 3 to 5 and shrunk to 2 routed 300 of
//!   300 by its new size each time.

mod proc_net;
pub mod program;

#[cfg(test)]
mod interpreter;

use crate::error::{Error, Result};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use proc_net::foreign_listeners;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

pub use crate::hash::{node_peer_text, peer_index};
pub use program::{Program, TextForm};

/// `concurrency` listeners on one port with the routing program attached, in group order.
#[derive(Debug)]
pub struct ReuseportGroup {
    listeners: Vec<OwnedFd>,
    address: SocketAddr,
    form: TextForm,
    program: Program,
}

impl ReuseportGroup {
    /// The listeners: listener `i` receives the clients whose routing index is `i`.
    pub fn listeners(&self) -> &[OwnedFd] {
        &self.listeners
    }

    /// Listener `index`, to hand to worker `index`; `None` past the group's end.
    pub fn listener(&self, index: u32) -> Option<BorrowedFd<'_>> {
        self.listeners.get(index as usize).map(|fd| fd.as_fd())
    }

    /// The number of listeners (the `concurrency` the program divides by).
    pub fn concurrency(&self) -> u32 {
        self.listeners.len() as u32
    }

    /// The bound address, with the port the kernel chose when asked for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Which client text the program hashes.
    pub fn text_form(&self) -> TextForm {
        self.form
    }

    /// The attached program (its length and the interfaces it names).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Gives up the listeners; closing any of them reorders the group, so the caller keeps them all open.
    pub fn into_listeners(self) -> Vec<OwnedFd> {
        self.listeners
    }

    /// Takes over a group this process made before it re-executed itself (an upgrade in place), as it is:
    /// the same listeners in the same order, the program already attached. `interfaces` is the table the
    /// program was generated with, so [`ReuseportGroup::program`] describes what the kernel runs.
    pub fn adopt(listeners: Vec<OwnedFd>, interfaces: Vec<(u32, String)>) -> Result<ReuseportGroup> {
        let first = listeners.first().ok_or_else(|| Error::Config("concurrency: no listener".into()))?;
        let address = bound_address(first).map_err(|e| Error::io("read an inherited listener's address", e))?;
        for listener in &listeners {
            let bound = bound_address(listener).map_err(|e| Error::io("read an inherited listener's address", e))?;
            let listening = socket::getsockopt(listener, sockopt::AcceptConn).unwrap_or(false);
            if bound != address || !listening {
                return Err(Error::io(
                    format!("adopt the listener group on {address}"),
                    io::Error::other(format!("fd {} is not one of its listeners", listener.as_raw_fd())),
                ));
            }
        }
        let form = text_form(address);
        let concurrency = listeners.len() as u32;
        let program = program::generate(form, concurrency, &interfaces).map_err(Error::Config)?;
        Ok(ReuseportGroup { listeners, address, form, program })
    }

    /// Changes the group to `concurrency` listeners (a reload) and attaches a program for the new size,
    /// generated with the interfaces present now. Growing: the new listeners join at the end and receive
    /// nothing until the new program is attached. Shrinking: the new program stops sending SYNs to the
    /// listeners past the new size, which are returned, last index first, for their workers to drain; dropping
    /// the returned `Vec` closes them in that order, so no remaining listener changes its index.
    pub fn resize(&mut self, concurrency: u32, backlog: i32) -> Result<Vec<OwnedFd>> {
        if concurrency == 0 {
            return Err(Error::Config("concurrency: a reuseport group needs at least one listener".into()));
        }
        let address = self.address;
        let program = program::generate(self.form, concurrency, &interfaces_for(self.form)).map_err(Error::Config)?;
        let mut added = Vec::new();
        for _ in self.concurrency()..concurrency {
            let fd = new_socket(address, true).map_err(|source| Error::Listen { address, source })?;
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(address))
                .map_err(|e| Error::Listen { address, source: e.into() })?;
            listen(&fd, backlog).map_err(|source| Error::Listen { address, source })?;
            added.push(fd);
        }
        let first = self.listeners.first().ok_or_else(|| Error::Config("concurrency: no listener".into()))?;
        attach(first, &program).map_err(|e| Error::io(format!("attach the routing program on {address}"), e))?;
        self.listeners.append(&mut added);
        self.program = program;
        let keep = (concurrency as usize).min(self.listeners.len());
        Ok(self.listeners.drain(keep..).rev().collect())
    }
}

/// The text form a group on `address` hashes: `a.b.c.d` on an IPv4 listener, `::ffff:a.b.c.d` and IPv6
/// text on an IPv6 one (what Node reports as `remoteAddress` on that listener).
pub fn text_form(address: SocketAddr) -> TextForm {
    if address.is_ipv4() {
        TextForm::Ipv4
    } else {
        TextForm::Ipv6
    }
}

/// The machine's interfaces (index, name), for the link-local suffix; empty if they cannot be listed.
pub fn interfaces() -> Vec<(u32, String)> {
    match nix::net::if_::if_nameindex() {
        Ok(list) => list.iter().map(|i| (i.index(), i.name().to_string_lossy().into_owned())).collect(),
        Err(_) => Vec::new(),
    }
}

/// Only IPv6 text has link-local peers to name.
fn interfaces_for(form: TextForm) -> Vec<(u32, String)> {
    if form == TextForm::Ipv6 {
        interfaces()
    } else {
        Vec::new()
    }
}

fn listen(fd: &OwnedFd, backlog: i32) -> io::Result<()> {
    // SAFETY: fd is an open socket; listen() has no memory-safety requirements.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the group: `concurrency` listeners on `address` (port 0: one port the kernel picks) with a
/// listen backlog of `backlog`, the program attached. Refuses an address another socket already holds.
pub fn bind_group(address: SocketAddr, concurrency: u32, backlog: i32) -> Result<ReuseportGroup> {
    if concurrency == 0 {
        return Err(Error::Config("concurrency: a reuseport group needs at least one listener".into()));
    }
    if backlog < 1 {
        return Err(Error::Config(format!("backlog: must be at least 1, got {backlog}")));
    }
    let form = text_form(address);
    let program = program::generate(form, concurrency, &interfaces_for(form)).map_err(Error::Config)?;
    // Port 0: another process may take the port the probe found before our group binds it; try another.
    let attempts = if address.port() == 0 { 5 } else { 1 };
    let mut attempt = 1;
    loop {
        match bind_once(address, concurrency, backlog, &program) {
            Err(Error::Listen { source, .. }) if attempt < attempts && source.kind() == io::ErrorKind::AddrInUse => {
                attempt += 1;
            }
            Ok(listeners) => {
                let first = listeners.first().ok_or_else(|| Error::Config("concurrency: no listener".into()))?;
                let address = bound_address(first).map_err(|source| Error::Listen { address, source })?;
                return Ok(ReuseportGroup { listeners, address, form, program });
            }
            Err(e) => return Err(e),
        }
    }
}

fn bind_once(address: SocketAddr, concurrency: u32, backlog: i32, program: &Program) -> Result<Vec<OwnedFd>> {
    let listen_error = |address: SocketAddr| move |source: io::Error| Error::Listen { address, source };

    // The probe: exclusive, so it fails on an address that any socket (ours or not) holds.
    let probe = new_socket(address, false).map_err(listen_error(address))?;
    socket::bind(probe.as_raw_fd(), &SockaddrStorage::from(address)).map_err(|e| listen_error(address)(e.into()))?;
    let address = bound_address(&probe).map_err(listen_error(address))?;
    // Closed before the group binds: a socket without SO_REUSEPORT excludes every other.
    drop(probe);

    let mut listeners = Vec::with_capacity(concurrency as usize);
    for index in 0..concurrency {
        let fd = new_socket(address, true).map_err(listen_error(address))?;
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(address)).map_err(|e| listen_error(address)(e.into()))?;
        if index == 0 {
            // Attached before the first listen(): the group is born with the program, so no SYN is ever
            // placed by the default hash.
            attach(&fd, program).map_err(|e| Error::io(format!("attach the routing program on {address}"), e))?;
        }
        listeners.push(fd);
    }
    for fd in &listeners {
        listen(fd, backlog).map_err(listen_error(address))?;
    }
    let ours: Vec<u64> = listeners.iter().map(inode).collect::<io::Result<_>>().map_err(listen_error(address))?;
    let foreign = foreign_listeners(address, &ours).map_err(|e| Error::io("read /proc/net/tcp", e))?;
    if foreign > 0 {
        let reason = format!("{foreign} socket(s) of another process joined the port while the group was created");
        return Err(Error::Listen { address, source: io::Error::new(io::ErrorKind::AddrInUse, reason) });
    }
    Ok(listeners)
}

/// A listener's accept queue as `TCP_INFO` reports it on a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections the kernel completed that no `accept()` has taken yet.
    pub waiting: u32,
    /// The queue's limit (the backlog, capped by `net.core.somaxconn`).
    pub limit: u32,
}

/// Reads the accept queue of a listener: the per-worker queue depth in kernel mode.
pub fn accept_queue(listener: BorrowedFd<'_>) -> io::Result<AcceptQueue> {
    // SAFETY: tcp_info is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len describe a writable buffer of len bytes, as getsockopt requires.
    let status = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if status != 0 {
        return Err(io::Error::last_os_error());
    }
    const TCP_LISTEN: u8 = 10; // include/net/tcp_states.h
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening TCP socket"));
    }
    // For a listener the kernel reports the queue in tcpi_unacked and its limit in tcpi_sacked.
    Ok(AcceptQueue { waiting: info.tcpi_unacked, limit: info.tcpi_sacked })
}

fn new_socket(address: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let family = if address.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    // Blocking: the fd's O_NONBLOCK is shared with every process it is handed to, so each worker picks its own.
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if address.is_ipv6() && address.ip().is_unspecified() {
        // Dual-stack like Node, whatever net.ipv6.bindv6only says; the same on every member, as the
        // kernel groups only sockets with equal IPV6_V6ONLY.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    Ok(fd)
}

fn bound_address(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let bound: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    if let Some(v4) = bound.as_sockaddr_in() {
        return Ok(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = bound.as_sockaddr_in6() {
        return Ok(SocketAddr::V6((*v6).into()));
    }
    Err(io::Error::other("getsockname returned a non-IP address"))
}

fn attach(fd: &OwnedFd, program: &Program) -> io::Result<()> {
    let mut instructions = program.instructions.clone();
    let fprog = libc::sock_fprog { len: instructions.len() as libc::c_ushort, filter: instructions.as_mut_ptr() };
    // The kernel copies the program during the call; `instructions` outlives it.
    socket::setsockopt(fd, sockopt::AttachReusePortCbpf, &fprog)?;
    Ok(())
}

fn inode(fd: &OwnedFd) -> io::Result<u64> {
    let stat = nix::sys::stat::fstat(fd)?;
    Ok(stat.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_without_reuseport_is_refused() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = holder.local_addr().unwrap();
        let error = bind_group(address, 2, 16).unwrap_err();
        assert!(matches!(&error, Error::Listen { source, .. } if source.kind() == io::ErrorKind::AddrInUse), "{error}");
    }

    #[test]
    fn a_foreign_reuseport_group_is_never_joined() {
        // Someone else's SO_REUSEPORT listener: joining it would be possible for us, so it must be refused.
        let other = new_socket("127.0.0.1:0".parse().unwrap(), true).unwrap();
        socket::bind(other.as_raw_fd(), &SockaddrStorage::from("127.0.0.1:0".parse::<SocketAddr>().unwrap())).unwrap();
        // SAFETY: other is an open, bound socket.
        assert_eq!(unsafe { libc::listen(other.as_raw_fd(), 8) }, 0);
        let address = bound_address(&other).unwrap();
        let error = bind_group(address, 2, 16).unwrap_err();
        assert!(matches!(&error, Error::Listen { source, .. } if source.kind() == io::ErrorKind::AddrInUse), "{error}");
    }

    #[test]
    fn the_proc_check_sees_a_listener_that_is_not_ours() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        let ours: Vec<u64> = group.listeners().iter().map(|fd| inode(fd).unwrap()).collect();
        assert_eq!(foreign_listeners(group.local_addr(), &ours).unwrap(), 0);
        // Forgetting one of ours makes it look foreign: the check counts it.
        assert_eq!(foreign_listeners(group.local_addr(), &ours[1..]).unwrap(), 1);
    }

    fn reuseport_socket() -> OwnedFd {
        new_socket("127.0.0.1:0".parse().unwrap(), true).unwrap()
    }

    #[test]
    fn the_kernel_accepts_a_program_at_the_instruction_limit() {
        let many: Vec<(u32, String)> = (1..=400).map(|i| (i, format!("interface{i:06}"))).collect();
        let program = program::generate(TextForm::Ipv6, 4, &many).unwrap();
        assert!(program.instructions.len() > program::MAX_INSTRUCTIONS - 40, "{}", program.instructions.len());
        eprintln!("longest generated program: {} instructions", program.instructions.len());
        attach(&reuseport_socket(), &program).expect("the kernel takes the longest program we generate");
    }

    #[test]
    fn the_test_checker_agrees_with_the_kernel() {
        use program::{JA, JEQ_K, LD_MEM, MOD_K, RET_A, ST};
        let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        let refused: [Vec<libc::sock_filter>; 5] = [
            vec![op(LD_MEM, 0, 0, 3), op(RET_A, 0, 0, 0)],
            vec![op(JEQ_K, 0, 1, 0), op(ST, 0, 0, 3), op(LD_MEM, 0, 0, 3), op(RET_A, 0, 0, 0)],
            vec![op(JA, 0, 0, 1), op(RET_A, 0, 0, 0)],
            vec![op(MOD_K, 0, 0, 0), op(RET_A, 0, 0, 0)],
            vec![op(ST, 0, 0, 0)],
        ];
        for instructions in refused {
            assert!(interpreter::check(&instructions).is_err(), "{instructions:?}");
            let error = attach(&reuseport_socket(), &Program { instructions, interfaces: Vec::new() }).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
        }
        let accepted =
            vec![op(JEQ_K, 0, 1, 0), op(ST, 0, 0, 3), op(ST, 0, 0, 3), op(LD_MEM, 0, 0, 3), op(RET_A, 0, 0, 0)];
        assert!(interpreter::check(&accepted).is_ok());
        attach(&reuseport_socket(), &Program { instructions: accepted, interfaces: Vec::new() }).unwrap();
    }

    #[test]
    fn bad_sizes_are_refused_with_the_key() {
        let address = "127.0.0.1:0".parse().unwrap();
        assert!(bind_group(address, 0, 16).unwrap_err().to_string().contains("concurrency"));
        assert!(bind_group(address, 2, 0).unwrap_err().to_string().contains("backlog"));
    }
}
