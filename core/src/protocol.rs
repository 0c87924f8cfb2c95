//! The channel protocol between master and workers: one versioned message per `SOCK_SEQPACKET` datagram,
//! so a connection's fd (SCM_RIGHTS) can never be separated from the message that describes it.
//!
//! Wire format (all integers little-endian, addresses as below):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..2 | magic `SC` |
//! | 2 | protocol version ([`PROTOCOL_VERSION`]) |
//! | 3 | kind: 1 hello, 2 ready, 3 connection, 4 shutdown, 5 welcome, 6 refused, 7 listener, 8 channel, 9 stopping, 10 stopped |
//! | 4.. | body |
//!
//! Bodies: hello `index u32, pid u32` (index `u32::MAX` = any free index, attach mode only); ready: empty;
//! connection `peer addr, local addr` with exactly one fd attached, each addr `family u8 (4|6), port u16,
//! ip 16 bytes` (IPv4 in the first 4); shutdown `deadline_ms u64` (time left before the hard kill);
//! welcome `index u32, concurrency u32`; refused: UTF-8 reason; channel: empty, with exactly one fd (attach
//! mode: right after the welcome, the worker's end of a fresh channel pair; the master keeps a copy, so what
//! the worker never received survives its death, and the attach connection stays open only to tell the
//! master when the worker is gone); listener: empty, with exactly one fd (`routing: kernel`, attach mode: the
//! worker's `SO_REUSEPORT` listener, sent just before the welcome so the worker has it when the welcome
//! arrives); stopping, stopped: empty. Worker→master: hello, ready, stopping. Master→worker: listener,
//! welcome, channel, refused (attach mode), connection, shutdown, stopped.
//!
//! A worker that stops taking connections on its own (`Worker::stop_accepting`, e.g. on a SIGTERM that did
//! not come from the master) says **stopping** and keeps reading its channel: the master routes nothing
//! more to it (this index's connections wait for its successor, started at once in spawn mode), answers
//! **stopped** after the last connection it ever sent on that channel, and never treats the worker as
//! broken for draining. Everything before `stopped` is the worker's to serve; if it dies first, what it
//! never received is taken back and served by its successor. The JavaScript implementation's `draining`
//! message (node-binding/js/protocol.js) makes the same promises.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::{Error, Result};

/// The version this build speaks; a peer with another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;
/// Hello's index for "give me any free index" (attach mode).
pub const ANY_INDEX: u32 = u32::MAX;

const MAGIC: [u8; 2] = *b"SC";
const HEADER: usize = 4;
const ADDRESS_LEN: usize = 19;
/// Largest datagram either side sends; anything longer is garbage.
const MAX_DATAGRAM: usize = 1024;

/// One message of the channel protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Worker→master: this process is worker `index` (or [`ANY_INDEX`]) with this pid.
    Hello {
        /// The index the worker has (spawn) or claims (attach).
        index: u32,
        /// The worker's process id.
        pid: u32,
    },
    /// Worker→master: initialisation is done, send connections.
    Ready,
    /// Master→worker: a client connection; its fd travels with this message.
    Connection {
        /// The client's address.
        peer: SocketAddr,
        /// The master's listener address (the worker reads the connection's exact one with getsockname).
        local: SocketAddr,
    },
    /// Master→worker: stop accepting, finish what is running and exit within `deadline_ms`.
    Shutdown {
        /// Milliseconds left before the master kills the worker.
        deadline_ms: u64,
    },
    /// Master→worker (attach): the claim is accepted, you are `index` of `concurrency`.
    Welcome {
        /// The index this worker now holds.
        index: u32,
        /// How many workers the cluster has.
        concurrency: u32,
    },
    /// Master→worker (attach): the claim is refused, with the reason.
    Refused {
        /// Why the master refused.
        reason: String,
    },
    /// Master→worker (attach, after the welcome): the worker's end of its channel travels with this message.
    Channel,
    /// Master→worker (attach, `routing: kernel`): the worker's listener; its fd travels with this message.
    Listener,
    /// Worker→master: route nothing more to me; I serve what is already in my channel, then exit.
    Stopping,
    /// Master→worker, after `Stopping`: nothing follows on this channel but, maybe, a shutdown.
    Stopped,
}

/// A message together with the fd that arrived with it ([`Message::Connection`] and [`Message::Listener`]).
#[derive(Debug)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// The connection's socket, owned by the receiver from now on.
    pub fd: Option<OwnedFd>,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Ready => 2,
            Message::Connection { .. } => 3,
            Message::Shutdown { .. } => 4,
            Message::Welcome { .. } => 5,
            Message::Refused { .. } => 6,
            Message::Channel => 8,
            Message::Listener => 7,
            Message::Stopping => 9,
            Message::Stopped => 10,
        }
    }

    /// The datagram for this message.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER + 2 * ADDRESS_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(PROTOCOL_VERSION);
        bytes.push(self.kind());
        match self {
            Message::Hello { index, pid } => {
                bytes.extend_from_slice(&index.to_le_bytes());
                bytes.extend_from_slice(&pid.to_le_bytes());
            }
            Message::Ready | Message::Channel | Message::Listener | Message::Stopping | Message::Stopped => {}
            Message::Connection { peer, local } => {
                encode_address(&mut bytes, peer);
                encode_address(&mut bytes, local);
            }
            Message::Shutdown { deadline_ms } => bytes.extend_from_slice(&deadline_ms.to_le_bytes()),
            Message::Welcome { index, concurrency } => {
                bytes.extend_from_slice(&index.to_le_bytes());
                bytes.extend_from_slice(&concurrency.to_le_bytes());
            }
            Message::Refused { reason } => {
                let reason = reason.as_bytes();
                bytes.extend_from_slice(&reason[..reason.len().min(MAX_DATAGRAM - HEADER)]);
            }
        }
        bytes
    }

    /// Parses one datagram; anything malformed is a [`Error::Protocol`] naming what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Message> {
        if bytes.len() < HEADER || bytes[..2] != MAGIC[..] {
            return Err(Error::Protocol(format!("not a sticky-cluster message ({} bytes)", bytes.len())));
        }
        if bytes[2] != PROTOCOL_VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {} is not supported (this side speaks {PROTOCOL_VERSION})",
                bytes[2]
            )));
        }
        let body = &bytes[HEADER..];
        let exact = |len: usize, name: &str| {
            if body.len() == len {
                Ok(())
            } else {
                Err(Error::Protocol(format!("{name} message has {} body bytes, expected {len}", body.len())))
            }
        };
        let u32_at = |at: usize| field(body, at).map(u32::from_le_bytes);
        match bytes[3] {
            1 => exact(8, "hello").and_then(|_| Ok(Message::Hello { index: u32_at(0)?, pid: u32_at(4)? })),
            2 => exact(0, "ready").map(|_| Message::Ready),
            3 => {
                exact(2 * ADDRESS_LEN, "connection")?;
                Ok(Message::Connection {
                    peer: decode_address(&body[..ADDRESS_LEN])?,
                    local: decode_address(&body[ADDRESS_LEN..])?,
                })
            }
            4 => exact(8, "shutdown")
                .and_then(|_| Ok(Message::Shutdown { deadline_ms: u64::from_le_bytes(field(body, 0)?) })),
            5 => exact(8, "welcome").and_then(|_| Ok(Message::Welcome { index: u32_at(0)?, concurrency: u32_at(4)? })),
            6 => Ok(Message::Refused { reason: String::from_utf8_lossy(body).into_owned() }),
            8 => exact(0, "channel").map(|_| Message::Channel),
            7 => exact(0, "listener").map(|_| Message::Listener),
            9 => exact(0, "stopping").map(|_| Message::Stopping),
            10 => exact(0, "stopped").map(|_| Message::Stopped),
            kind => Err(Error::Protocol(format!("unknown message kind {kind}"))),
        }
    }
}

fn encode_address(bytes: &mut Vec<u8>, address: &SocketAddr) {
    let mut ip = [0u8; 16];
    let family = match address.ip() {
        IpAddr::V4(v4) => {
            ip[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            ip = v6.octets();
            6
        }
    };
    bytes.push(family);
    bytes.extend_from_slice(&address.port().to_le_bytes());
    bytes.extend_from_slice(&ip);
}

/// `N` bytes of `body` from `at`; a message too short for them is a protocol error, never a panic.
fn field<const N: usize>(body: &[u8], at: usize) -> Result<[u8; N]> {
    body.get(at..at + N)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| Error::Protocol(format!("message cut short: no {N} bytes at {at}")))
}

fn decode_address(bytes: &[u8]) -> Result<SocketAddr> {
    let [family] = field::<1>(bytes, 0)?;
    let port = u16::from_le_bytes(field(bytes, 1)?);
    let ip: [u8; 16] = field(bytes, 3)?;
    let ip = match family {
        4 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        family => return Err(Error::Protocol(format!("unknown address family {family}"))),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Sends one message, with `fd` attached as SCM_RIGHTS when given. Never raises SIGPIPE; with
/// `nonblocking` a full channel answers `EAGAIN` instead of waiting.
pub fn send_message(
    channel: BorrowedFd<'_>,
    message: &Message,
    fd: Option<BorrowedFd<'_>>,
    nonblocking: bool,
) -> std::result::Result<(), Errno> {
    let bytes = message.encode();
    let iov = [IoSlice::new(&bytes)];
    let fds: [RawFd; 1] = [fd.map_or(-1, |fd| fd.as_raw_fd())];
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fd.is_some() { &rights } else { &[] };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match sendmsg::<UnixAddr>(channel.as_raw_fd(), &iov, cmsgs, flags, None) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one message. Every fd that arrives is owned at once (and closed again if the message is bad);
/// control data cut short (`MSG_CTRUNC`) is a protocol error. End of channel is [`Error::ChannelClosed`];
/// nothing waiting on a non-blocking receive is [`Error::WouldBlock`].
///
/// A process at its open-file limit cannot take the fd a connection (listener, channel) carries: the
/// kernel would close it and report `MSG_CTRUNC`, destroying the connection. So such a message is left
/// in the channel and the receive fails with [`is_fd_limit`]; messages without an fd still arrive.
pub fn recv_message(channel: BorrowedFd<'_>, nonblocking: bool) -> Result<Received> {
    if !has_fd_room(channel) {
        match peek_kind(channel, nonblocking)? {
            Some(kind) if KINDS_WITH_FD.contains(&kind) => {
                return Err(fd_limit_error());
            }
            // No fd expected (or garbage, which is refused either way): receive it.
            _ => {}
        }
    }
    let mut buffer = [0u8; MAX_DATAGRAM];
    // Room for more fds than any message carries, so a misbehaving peer shows up as extra fds, not loss.
    let mut control = nix::cmsg_space!([RawFd; 8]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let (bytes, message_flags, fds) = loop {
        control.iter_mut().for_each(|b| *b = 0);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        match recvmsg::<UnixAddr>(channel.as_raw_fd(), &mut iov, Some(&mut control), flags) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(Error::WouldBlock),
            Err(Errno::ECONNRESET) => return Err(Error::ChannelClosed),
            Err(errno) => return Err(Error::io("receive from the channel", errno)),
            Ok(received) => {
                let fds = match received.cmsgs() {
                    Ok(cmsgs) => owned_fds(cmsgs),
                    Err(_) => Vec::new(),
                };
                break (received.bytes, received.flags, fds);
            }
        }
    };
    // Whatever arrived and is not handed over goes to `closer::discard`: a peer's fd may block its close.
    let mut fds = Arrived(fds);
    if message_flags.contains(MsgFlags::MSG_CTRUNC) {
        // nix refuses to walk truncated control data; walk it by hand so no fd that did arrive leaks.
        crate::closer::discard_all(unsafe { fds_in_truncated_control(&mut control) });
        return Err(Error::Protocol("control data truncated (MSG_CTRUNC): fds were lost".into()));
    }
    if bytes == 0 && fds.0.is_empty() {
        return Err(Error::ChannelClosed);
    }
    if message_flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(Error::Protocol(format!("datagram longer than {MAX_DATAGRAM} bytes")));
    }
    let message = Message::decode(&buffer[..bytes])?;
    let wants_fd = matches!(message, Message::Connection { .. } | Message::Channel | Message::Listener);
    match (wants_fd, fds.0.len()) {
        (true, 1) => Ok(Received { message, fd: fds.0.pop() }),
        (false, 0) => Ok(Received { message, fd: None }),
        (_, count) => Err(Error::Protocol(format!("message kind {} arrived with {count} fds", message_name(&message)))),
    }
}

/// The fds one datagram brought; those still here when it is dropped are discarded.
struct Arrived(Vec<OwnedFd>);

impl Drop for Arrived {
    fn drop(&mut self) {
        crate::closer::discard_all(self.0.drain(..));
    }
}

/// Kinds that carry an fd: connection, listener, channel.
const KINDS_WITH_FD: [u8; 3] = [3, 7, 8];
const FD_LIMIT_CONTEXT: &str =
    "receive from the channel: no free file descriptor (open-file limit) for the next message's fd; it stays in the channel";

/// Whether `error` is [`recv_message`]'s "at the open-file limit, the message stays in the channel":
/// try again once fds are free, nothing was lost.
pub fn is_fd_limit(error: &Error) -> bool {
    matches!(error, Error::Io { context, .. } if context == FD_LIMIT_CONTEXT)
}

/// The error of a receive (or accept) left for later at the open-file limit; see [`is_fd_limit`].
pub(crate) fn fd_limit_error() -> Error {
    Error::io(FD_LIMIT_CONTEXT, Errno::EMFILE)
}

/// Whether this process can open one more fd now (a duplicate is made and closed again).
fn has_fd_room(channel: BorrowedFd<'_>) -> bool {
    match nix::fcntl::fcntl(channel, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0)) {
        Ok(fd) => {
            // SAFETY: fcntl just made this descriptor for us alone.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            true
        }
        Err(Errno::EMFILE | Errno::ENFILE) => false,
        // Anything else is for the receive itself to report.
        Err(_) => true,
    }
}

/// The kind of the next datagram (`None`: not one of ours, or empty), read with `MSG_PEEK` and no room
/// for control data, so no fd is installed and the datagram stays where it is.
fn peek_kind(channel: BorrowedFd<'_>, nonblocking: bool) -> Result<Option<u8>> {
    let mut header = [0u8; HEADER];
    let mut flags = libc::MSG_PEEK;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: a receive into a buffer of `HEADER` bytes this function owns.
        let peeked = unsafe { libc::recv(channel.as_raw_fd(), header.as_mut_ptr().cast(), HEADER, flags) };
        if peeked >= 0 {
            let ours = peeked as usize == HEADER && header[..2] == MAGIC[..];
            return Ok(ours.then_some(header[3]));
        }
        match Errno::last() {
            Errno::EINTR => continue,
            Errno::EAGAIN => return Err(Error::WouldBlock),
            Errno::ECONNRESET => return Err(Error::ChannelClosed),
            errno => return Err(Error::io("receive from the channel", errno)),
        }
    }
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "hello",
        Message::Ready => "ready",
        Message::Connection { .. } => "connection",
        Message::Shutdown { .. } => "shutdown",
        Message::Welcome { .. } => "welcome",
        Message::Refused { .. } => "refused",
        Message::Channel => "channel",
        Message::Listener => "listener",
        Message::Stopping => "stopping",
        Message::Stopped => "stopped",
    }
}

fn owned_fds(cmsgs: impl Iterator<Item = ControlMessageOwned>) -> Vec<OwnedFd> {
    let mut owned = Vec::new();
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors for us; nobody else owns them.
            owned.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    owned
}

/// Walks a zero-initialised control buffer after `MSG_CTRUNC` and takes ownership of every fd in it.
///
/// # Safety
/// `control` must be the buffer the kernel filled in the last `recvmsg`, zeroed before that call.
unsafe fn fds_in_truncated_control(control: &mut [u8]) -> Vec<OwnedFd> {
    let mut header: libc::msghdr = std::mem::zeroed();
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = control.len() as _;
    let mut owned = Vec::new();
    let mut cmsg = libc::CMSG_FIRSTHDR(&header);
    while !cmsg.is_null() && (*cmsg).cmsg_len as usize >= std::mem::size_of::<libc::cmsghdr>() {
        if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
            let data_len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for i in 0..data_len / std::mem::size_of::<RawFd>() {
                let fd = std::ptr::read_unaligned(data.add(i));
                if fd >= 0 {
                    owned.push(OwnedFd::from_raw_fd(fd));
                }
            }
        }
        cmsg = libc::CMSG_NXTHDR(&header, cmsg);
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        let messages = [
            Message::Hello { index: 3, pid: 4242 },
            Message::Hello { index: ANY_INDEX, pid: 1 },
            Message::Ready,
            Message::Connection {
                peer: "[::ffff:127.0.0.9]:50000".parse().unwrap(),
                local: "127.0.0.1:8080".parse().unwrap(),
            },
            Message::Shutdown { deadline_ms: 60_000 },
            Message::Welcome { index: 7, concurrency: 8 },
            Message::Refused { reason: "index 2 is already attached".into() },
            Message::Channel,
            Message::Listener,
            Message::Stopping,
            Message::Stopped,
        ];
        for message in messages {
            assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }
    }

    #[test]
    fn garbage_and_wrong_versions_are_protocol_errors() {
        assert!(matches!(Message::decode(b"GET / HTTP/1.1"), Err(Error::Protocol(_))));
        let mut hello = Message::Hello { index: 0, pid: 1 }.encode();
        hello[2] = 99;
        let error = Message::decode(&hello).unwrap_err().to_string();
        assert!(error.contains("version 99"), "{error}");
        let mut short = Message::Ready.encode();
        short[3] = 1;
        assert!(matches!(Message::decode(&short), Err(Error::Protocol(_))));
    }

    #[test]
    fn a_connection_fd_travels_with_its_message_and_arrives_cloexec() {
        let (master, worker) = pair();
        let (payload, _keep) = pair();
        let message =
            Message::Connection { peer: "127.0.0.5:1234".parse().unwrap(), local: "[::1]:80".parse().unwrap() };
        send_message(master.as_fd(), &message, Some(payload.as_fd()), false).unwrap();
        let received = recv_message(worker.as_fd(), false).unwrap();
        assert_eq!(received.message, message);
        let fd = received.fd.expect("fd attached");
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds must be close-on-exec");
    }

    #[test]
    fn an_fd_on_a_message_that_carries_none_is_refused() {
        let (master, worker) = pair();
        let (payload, _keep) = pair();
        send_message(master.as_fd(), &Message::Ready, Some(payload.as_fd()), false).unwrap();
        assert!(matches!(recv_message(worker.as_fd(), false), Err(Error::Protocol(_))));
    }

    #[test]
    fn peeking_at_a_connection_leaves_it_and_its_fd_in_the_channel() {
        let (master, worker) = pair();
        let (payload, _keep) = pair();
        let message =
            Message::Connection { peer: "127.0.0.5:1234".parse().unwrap(), local: "[::1]:80".parse().unwrap() };
        send_message(master.as_fd(), &message, Some(payload.as_fd()), false).unwrap();
        assert_eq!(peek_kind(worker.as_fd(), true).unwrap(), Some(3));
        assert!(KINDS_WITH_FD.contains(&3));
        let received = recv_message(worker.as_fd(), true).unwrap();
        assert_eq!(received.message, message);
        assert!(received.fd.is_some(), "the fd was still there after the peek");
        assert!(matches!(peek_kind(worker.as_fd(), true), Err(Error::WouldBlock)));
        assert!(is_fd_limit(&fd_limit_error()) && !is_fd_limit(&Error::WouldBlock));
    }

    #[test]
    fn end_of_channel_and_empty_nonblocking_receive_are_distinct() {
        let (master, worker) = pair();
        assert!(matches!(recv_message(worker.as_fd(), true), Err(Error::WouldBlock)));
        drop(master);
        assert!(matches!(recv_message(worker.as_fd(), false), Err(Error::ChannelClosed)));
    }
}
