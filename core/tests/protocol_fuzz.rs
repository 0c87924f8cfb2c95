//! Property tests of the channel protocol with a fixed seed and a bounded number of cases (so CI is
//! repeatable and quick): the decoder and the real receive path never panic and never leak an fd.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use sticky_cluster::protocol::{recv_message, Message, PROTOCOL_VERSION};
use sticky_cluster::Error;

fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_c1a5),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

fn any_message() -> impl Strategy<Value = Message> {
    let address = (any::<bool>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(v4, ip, port)| {
        let ip: std::net::IpAddr = if v4 {
            std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into()
        } else {
            std::net::Ipv6Addr::from(ip).into()
        };
        std::net::SocketAddr::new(ip, port)
    });
    prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(index, pid)| Message::Hello { index, pid }),
        Just(Message::Ready),
        (address.clone(), address).prop_map(|(peer, local)| Message::Connection { peer, local }),
        any::<u64>().prop_map(|deadline_ms| Message::Shutdown { deadline_ms }),
        (any::<u32>(), any::<u32>()).prop_map(|(index, concurrency)| Message::Welcome { index, concurrency }),
        "[ -~]{0,200}".prop_map(|reason| Message::Refused { reason }),
        Just(Message::Channel),
        Just(Message::Listener),
    ]
}

/// Bytes that look like our header often enough to reach every body decoder.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (0u8..11, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(kind, body)| {
            let mut bytes = vec![b'S', b'C', PROTOCOL_VERSION, kind];
            bytes.extend(body);
            bytes
        }),
        any_message().prop_flat_map(|message| {
            let bytes = message.encode();
            let len = bytes.len();
            (Just(bytes), 0..=len, any::<u8>()).prop_map(|(mut bytes, at, value)| {
                // A valid message, then one byte changed or the tail cut off.
                if at < bytes.len() && value % 2 == 0 {
                    bytes[at] = value;
                } else {
                    bytes.truncate(at);
                }
                bytes
            })
        }),
    ]
}

/// How many of this process's fds point at `path`.
fn open_fds_to(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn every_message_round_trips(message in any_message()) {
        prop_assert_eq!(Message::decode(&message.encode()).unwrap(), message);
    }

    #[test]
    fn the_decoder_answers_any_bytes_without_panicking(bytes in datagram()) {
        match Message::decode(&bytes) {
            // Whatever decodes is canonical: encoding it again gives a message that decodes the same.
            Ok(message) => prop_assert_eq!(Message::decode(&message.encode()).unwrap(), message),
            Err(error) => prop_assert!(matches!(error, Error::Protocol(_)), "{error}"),
        }
    }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn the_receive_path_owns_every_fd_and_never_panics(bytes in datagram(), fd_count in 0usize..40, oversize in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("passed-fd");
        std::fs::write(&marker, b"").unwrap();
        let marker = marker.canonicalize().unwrap();
        let (sender, receiver): (OwnedFd, OwnedFd) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let bytes = if oversize { vec![b'S'; 1500] } else { bytes };
        {
            let files: Vec<std::fs::File> = (0..fd_count).map(|_| std::fs::File::open(&marker).unwrap()).collect();
            let fds: Vec<i32> = files.iter().map(|file| file.as_raw_fd()).collect();
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            let iov = [std::io::IoSlice::new(&bytes)];
            sendmsg::<UnixAddr>(sender.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
        }
        let received = recv_message(receiver.as_fd(), true);
        let expect_fd = matches!(&received, Ok(r) if r.fd.is_some());
        match &received {
            Ok(r) => {
                prop_assert!(!oversize, "an oversize datagram is refused");
                let wants_fd = matches!(r.message, Message::Connection { .. } | Message::Channel | Message::Listener);
                prop_assert_eq!(wants_fd, expect_fd);
                prop_assert_eq!(fd_count, usize::from(wants_fd));
            }
            Err(Error::ChannelClosed) => prop_assert!(bytes.is_empty() && fd_count == 0),
            Err(error) => prop_assert!(matches!(error, Error::Protocol(_)), "{error}"),
        }
        prop_assert_eq!(open_fds_to(&marker), usize::from(expect_fd), "only an accepted connection keeps its fd");
        drop(received);
        prop_assert_eq!(open_fds_to(&marker), 0);
    }
}
