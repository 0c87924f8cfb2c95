//! Readiness of a worker that never says ready (`worker.protocol: none`), judged from its listener:
//! a process of the worker (it or a descendant) waits on the listener (an epoll set watching it for
//! input, or a thread blocked in `accept` on it), or its accept queue is being consumed.
//!
//! The first two read `/proc` of the worker's own processes (`fd`, `fdinfo`, `task/*/syscall`), which
//! the master may read since they are its descendants; a server that waits in `select`/`poll` shows
//! only by the third, once clients come. The master calls [`ReadinessProbe::look`] on its tick.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use crate::reuseport::accept_queue;

/// At most this many processes of one worker are looked at (gunicorn or hypercorn with a few workers).
const MAX_PROCESSES: usize = 64;

/// What showed that a worker accepts on its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// An epoll set of process `pid` watches the listener for new connections.
    Polled {
        /// The process (the worker or one of its descendants).
        pid: u32,
    },
    /// A thread of process `pid` is blocked in `accept` on the listener.
    Accepting {
        /// The process (the worker or one of its descendants).
        pid: u32,
    },
    /// The accept queue went down from `from` to `to` connections between two looks.
    Consumed {
        /// Connections waiting at the previous look.
        from: u32,
        /// Connections waiting now.
        to: u32,
    },
}

impl fmt::Display for Sign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sign::Polled { pid } => write!(f, "an epoll set of pid {pid} watches its listener"),
            Sign::Accepting { pid } => write!(f, "pid {pid} waits in accept() on its listener"),
            Sign::Consumed { from, to } => write!(f, "its accept queue went from {from} to {to}"),
        }
    }
}

/// Watches one worker's listener until the worker shows it accepts.
#[derive(Debug)]
pub struct ReadinessProbe {
    /// The listener's inode, as `/proc/PID/fd` links and epoll's fdinfo name it.
    inode: u64,
    last_waiting: Option<u32>,
}

impl ReadinessProbe {
    /// A probe of `listener` (the master's copy of the worker's listener).
    pub fn new(listener: BorrowedFd<'_>) -> io::Result<ReadinessProbe> {
        let stat = nix::sys::stat::fstat(listener).map_err(io::Error::from)?;
        Ok(ReadinessProbe { inode: stat.st_ino, last_waiting: None })
    }

    /// Looks once at worker `pid` and its listener: the first sign that it accepts, if any. A queue
    /// going down counts only when `queue_is_ours` (no other process accepts on the listener).
    pub fn look(&mut self, pid: u32, listener: BorrowedFd<'_>, queue_is_ours: bool) -> Option<Sign> {
        let waiting = accept_queue(listener).ok().map(|queue| queue.waiting);
        let previous = std::mem::replace(&mut self.last_waiting, waiting);
        if let (Some(from), Some(to), true) = (previous, waiting, queue_is_ours) {
            if to < from {
                return Some(Sign::Consumed { from, to });
            }
        }
        processes_of(pid).into_iter().find_map(|process| self.sign_in(process))
    }

    /// A sign in one process: its epoll sets, then its threads' current system calls.
    fn sign_in(&self, pid: u32) -> Option<Sign> {
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        let mut listener_fds = Vec::new();
        let mut epoll_fds = Vec::new();
        let socket_link = format!("socket:[{}]", self.inode);
        for entry in entries.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
            let Ok(target) = std::fs::read_link(entry.path()) else { continue };
            let target = target.to_string_lossy();
            if target == socket_link {
                listener_fds.push(fd);
            } else if target == "anon_inode:[eventpoll]" {
                epoll_fds.push(fd);
            }
        }
        if listener_fds.is_empty() {
            return None;
        }
        for epoll in epoll_fds {
            let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{epoll}")) else { continue };
            if info.lines().any(|line| epoll_watches(line, self.inode)) {
                return Some(Sign::Polled { pid });
            }
        }
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        for task in tasks.flatten() {
            let Ok(call) = std::fs::read_to_string(task.path().join("syscall")) else { continue };
            if accept_on(&call).is_some_and(|fd| listener_fds.contains(&fd)) {
                return Some(Sign::Accepting { pid });
            }
        }
        None
    }
}

/// Whether an epoll fdinfo line (`tfd: 3 events: 19 data: … pos:0 ino:1f2a sdev:8`) watches inode
/// `inode` for input.
fn epoll_watches(line: &str, inode: u64) -> bool {
    let mut fields = line.split_whitespace();
    if fields.next() != Some("tfd:") {
        return false;
    }
    let mut events = None;
    let mut watched = None;
    let rest: Vec<&str> = fields.collect();
    for (i, field) in rest.iter().enumerate() {
        if *field == "events:" {
            events = rest.get(i + 1).and_then(|hex| u32::from_str_radix(hex, 16).ok());
        } else if let Some(hex) = field.strip_prefix("ino:") {
            watched = u64::from_str_radix(hex, 16).ok();
        }
    }
    watched == Some(inode) && events.is_some_and(|events| events & libc::EPOLLIN as u32 != 0)
}

/// The fd a thread is blocked on in `accept`/`accept4`, from its `/proc/PID/task/TID/syscall` line
/// (`43 0x3 0x7ffd… …`: the call's number, then its arguments in hex).
fn accept_on(line: &str) -> Option<i32> {
    let mut fields = line.split_whitespace();
    let number: i64 = fields.next()?.parse().ok()?;
    if number != libc::SYS_accept && number != libc::SYS_accept4 {
        return None;
    }
    let fd = fields.next()?.strip_prefix("0x")?;
    i32::from_str_radix(fd, 16).ok()
}

/// `pid` and its descendants (through `/proc/PID/task/TID/children`), at most [`MAX_PROCESSES`].
fn processes_of(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() && found.len() < MAX_PROCESSES {
        let parent = found[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            for child in children.split_whitespace().filter_map(|text| text.parse().ok()) {
                if found.len() < MAX_PROCESSES && !found.contains(&child) {
                    found.push(child);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::process::{Command, Stdio};

    #[test]
    fn fdinfo_and_syscall_lines_are_read() {
        let line = "tfd:        3 events:       19 data:                3  pos:0 ino:1f2a sdev:8";
        assert!(epoll_watches(line, 0x1f2a));
        assert!(!epoll_watches(line, 0x1f2b));
        assert!(
            !epoll_watches("tfd:        3 events:        4 data: 0 pos:0 ino:1f2a sdev:8", 0x1f2a),
            "EPOLLOUT only"
        );
        assert!(!epoll_watches("pos:\t0", 0x1f2a));
        assert_eq!(accept_on(&format!("{} 0x3 0x7ffd 0x0 0x80800 0x0 0x0 0x7ffd 0x7f", libc::SYS_accept4)), Some(3));
        assert_eq!(accept_on("0 0x3 0x7ffd 0x1 0x0 0x0 0x0 0x7ffd 0x7f"), None, "read(2)");
        assert_eq!(accept_on("running"), None);
    }

    /// A process that does not hold the listener shows nothing; a queue that grows is no sign, one
    /// that goes down is.
    #[test]
    fn a_stranger_shows_no_sign_and_a_consumed_queue_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut probe = ReadinessProbe::new(listener.as_fd()).unwrap();
        // `sleep` holds nothing of ours: no sign from it.
        let mut sleeper = Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().unwrap();
        assert_eq!(probe.look(sleeper.id(), listener.as_fd(), true), None);
        let clients: Vec<_> =
            (0..3).map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap()).collect();
        assert_eq!(probe.look(sleeper.id(), listener.as_fd(), true), None, "a growing queue is no sign");
        let _accepted = listener.accept().unwrap();
        assert_eq!(probe.look(sleeper.id(), listener.as_fd(), true), Some(Sign::Consumed { from: 3, to: 2 }));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        drop(clients);
    }

    #[test]
    fn this_process_polling_or_accepting_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut probe = ReadinessProbe::new(listener.as_fd()).unwrap();
        let me = std::process::id();
        let address = listener.local_addr().unwrap();
        // A thread blocked in accept on it.
        let accepting = listener.try_clone().unwrap();
        let thread = std::thread::spawn(move || accepting.accept().map(|_| ()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut sign = None;
        while sign.is_none() && std::time::Instant::now() < deadline {
            sign = probe.look(me, listener.as_fd(), true);
            std::thread::yield_now();
        }
        assert_eq!(sign, Some(Sign::Accepting { pid: me }));
        let _client = std::net::TcpStream::connect(address).unwrap();
        thread.join().unwrap().unwrap();
        // An epoll set watching it.
        // SAFETY: plain system calls on descriptors this test owns.
        unsafe {
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            assert!(epoll >= 0);
            let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            assert_eq!(libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event), 0);
            let mut fresh = ReadinessProbe::new(listener.as_fd()).unwrap();
            assert_eq!(fresh.look(me, listener.as_fd(), false), Some(Sign::Polled { pid: me }));
            libc::close(epoll);
        }
    }
}
