//! Readiness as data: with `--ready-fd N` (or `STICKY_CLUSTER_READY_FD=N`) a master writes one JSON line
//! per lifecycle event on fd N, for the programs that drive it; the log stays the text for people.
//!
//! Every line is one JSON object: `version` (of this format, 1), `event`, the event's fields, `pid`.
//! - `listening`: the master listens; connections wait for their worker from now on. `address` (as
//!   `[::]:4000`), `host`, `port` (the kernel's pick when the configuration said 0), `workers`, `routing`
//!   (`handoff` or `kernel`), `metrics` (the Prometheus page's address, or null), `attach_socket` (the
//!   Unix socket attached workers dial, or null), `build` (the executable's build id).
//! - `upgraded`: after SIGUSR2 the new image has taken every socket and worker over; the fields of
//!   `listening`, `build` being the new one. `rolled_back`: the new image could not take over and the
//!   previous binary did (same fields). `upgrade_refused`: the new binary failed its preflight and
//!   nothing changed (`reason`). An exec that fails after the preflight is only logged.
//! - `stopped`: the master is about to exit: `graceful` (exit status 0), `routed` (connections per
//!   worker index), `redirected`, `closed`, `revivals`, `recovered`, `reload_failures` (see
//!   [`crate::master::Stats`]).
//! - `error`: the master exits with an error, before or after `listening`: `message`, the text of the
//!   `error:` line.
//!
//! `version` changes only when a field changes meaning or goes away; fields and events may be added
//! within a version, so readers skip what they do not know (and lines that are not JSON objects, when
//! the fd is a standard stream that workers write to as well).

use std::fmt::Display;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::master::{self, Outcome};

/// The variable that names the ready fd, as `--ready-fd` does (the flag wins when both are given).
pub const ENV_READY_FD: &str = "STICKY_CLUSTER_READY_FD";
/// The variable an upgrading master sets for its new image: the ready fd it had taken (its own number
/// by then, which may differ from the one the caller gave).
pub const ENV_UPGRADE_READY_FD: &str = "STICKY_CLUSTER_UPGRADE_READY_FD";
/// The version of the line format this build writes.
pub const VERSION: u32 = 1;

/// One line on the ready fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The format's version ([`VERSION`]).
    pub version: u32,
    /// What happened, with its fields.
    #[serde(flatten)]
    pub event: Event,
    /// The master's pid (the same across an upgrade in place).
    pub pid: u32,
}

impl Line {
    /// Reads one line as this build writes it; `None` for anything else (another version's line with
    /// a changed field, a line a worker wrote to a shared standard stream).
    pub fn parse(text: &str) -> Option<Line> {
        serde_json::from_str(text.trim()).ok()
    }
}

/// What a line reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The master listens.
    Listening(Listening),
    /// An upgrade in place succeeded: the new image listens on the same sockets.
    Upgraded(Listening),
    /// An upgrade in place failed after the exec and the previous binary took the cluster back.
    RolledBack(Listening),
    /// SIGUSR2's preflight refused the new binary; nothing changed.
    UpgradeRefused {
        /// Why, as the log says it.
        reason: String,
    },
    /// The master is about to exit, with its counters.
    Stopped(Stopped),
    /// The master exits with an error.
    Error {
        /// The error's text, as after `error:` on stderr.
        message: String,
    },
}

/// Where a master listens, as a line says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    /// The client listener's address.
    pub address: SocketAddr,
    /// Its host part.
    pub host: IpAddr,
    /// Its port.
    pub port: u16,
    /// The number of worker indexes (`concurrency`).
    pub workers: u32,
    /// `handoff` or `kernel`.
    pub routing: String,
    /// The metrics page's address, when `metrics` is configured.
    pub metrics: Option<SocketAddr>,
    /// Attach mode: the socket workers dial.
    pub attach_socket: Option<String>,
    /// The running executable's build id ([`crate::upgrade::build_id`]); in an embedding that is not
    /// the executable (the Node addon), the library's name and version.
    pub build: String,
}

impl Listening {
    /// The line's fields for what the master reported, with this executable's build id.
    pub fn of(at: &master::Listening) -> Listening {
        Listening::built(at, crate::upgrade::build_id())
    }

    /// The line's fields for what the master reported, with `build` as the build's identity.
    pub fn built(at: &master::Listening, build: String) -> Listening {
        Listening {
            address: at.address,
            host: at.address.ip(),
            port: at.address.port(),
            workers: at.workers,
            routing: at.routing.as_str().to_string(),
            metrics: at.metrics,
            attach_socket: at.attach_socket.as_ref().map(|path| path.to_string_lossy().into_owned()),
            build,
        }
    }
}

/// A master's counters when it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// Every worker exited on its own in time (the binary exits 0).
    pub graceful: bool,
    /// Connections handed to each worker index.
    pub routed: Vec<u64>,
    /// Connections that went to another worker because theirs was not ready in time.
    pub redirected: u64,
    /// Connections closed without being served.
    pub closed: u64,
    /// Worker processes started again after one died or stopped.
    pub revivals: u64,
    /// Connections taken back from a dead worker's channel and served again.
    pub recovered: u64,
    /// Reloads given up because a successor could not start.
    pub reload_failures: u64,
}

impl From<&Outcome> for Stopped {
    fn from(outcome: &Outcome) -> Stopped {
        let stats = &outcome.stats;
        Stopped {
            graceful: outcome.graceful,
            routed: stats.routed.clone(),
            redirected: stats.redirected,
            closed: stats.closed,
            revivals: stats.revivals,
            recovered: stats.recovered,
            reload_failures: stats.reload_failures,
        }
    }
}

/// A ready fd number as the flag and the variable spell it: a non-negative decimal integer.
pub fn parse_fd(text: &str) -> Result<RawFd, String> {
    text.trim().parse::<RawFd>().ok().filter(|fd| *fd >= 0).ok_or_else(|| format!("not an fd number: {text:?}"))
}

/// Checks, without taking it, that `fd` is open for writing; the reason otherwise.
pub fn check(fd: RawFd) -> Result<(), String> {
    // SAFETY: fcntl on a number: one that is not open answers EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(format!("not an open file descriptor ({})", std::io::Error::last_os_error()));
    }
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err("open for reading only".into());
    }
    Ok(())
}

/// The fd a master writes its lines to. Clones share it; writes are one `write` per line, whole lines
/// (well under `PIPE_BUF`) never interleave.
#[derive(Debug, Clone)]
pub struct ReadyFd {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Set after the first failed write: the reader is gone, the rest is not tried.
    failed: AtomicBool,
}

impl ReadyFd {
    /// Takes the caller's `fd` for this process's lines. It becomes close-on-exec, so workers do not
    /// inherit it and the reader sees the end of it when the master exits; a standard stream (0 to 2)
    /// is duplicated instead and stays as it is.
    pub fn take(fd: RawFd) -> Result<ReadyFd, String> {
        check(fd)?;
        let owned = if fd <= 2 {
            // SAFETY: fcntl duplicates an open fd to a new number (at least 3) or answers -1.
            let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if copy < 0 {
                return Err(format!("cannot duplicate it ({})", std::io::Error::last_os_error()));
            }
            // SAFETY: fcntl just made this descriptor; nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(copy) }
        } else {
            // SAFETY: fcntl on an open fd (checked above); the old flags are not needed.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(format!("cannot make it close-on-exec ({})", std::io::Error::last_os_error()));
            }
            // SAFETY: the caller handed this fd to this process for these lines alone.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        Ok(ReadyFd { inner: Arc::new(Inner { file: File::from(owned), failed: AtomicBool::new(false) }) })
    }

    /// The fd named by `STICKY_CLUSTER_READY_FD`, taken (the variable leaves the environment, so the
    /// workers' environment does not name an fd they do not have); `None` when it is not set.
    pub fn from_env() -> Result<Option<ReadyFd>, String> {
        let Some(text) = std::env::var_os(ENV_READY_FD) else { return Ok(None) };
        std::env::remove_var(ENV_READY_FD);
        let text = text.to_string_lossy();
        let taken =
            parse_fd(&text).and_then(ReadyFd::take).map_err(|reason| format!("{ENV_READY_FD}={text}: {reason}"))?;
        // Its lines will name this executable's build (the C library's host): hashed now, before a
        // master runs, not on its thread with clients waiting.
        crate::upgrade::build_id();
        Ok(Some(taken))
    }

    /// The fd number the lines go to in this process.
    pub fn fd(&self) -> RawFd {
        self.inner.file.as_raw_fd()
    }

    /// Writes one line for `event`. A reader that has gone away is logged once and not written to again;
    /// the master goes on either way.
    pub fn write(&self, event: Event) {
        if self.inner.failed.load(Ordering::Relaxed) {
            return;
        }
        let line = Line { version: VERSION, event, pid: std::process::id() };
        let written = serde_json::to_vec(&line).map_err(std::io::Error::other).and_then(|mut bytes| {
            bytes.push(b'\n');
            write_without_sigpipe(&self.inner.file, &bytes)
        });
        if let Err(error) = written {
            self.inner.failed.store(true, Ordering::Relaxed);
            tracing::warn!("the ready fd {}: {error}; no more lines are written to it", self.fd());
        }
    }

    /// The `listening` line.
    pub fn listening(&self, at: &master::Listening) {
        self.write(Event::Listening(Listening::of(at)));
    }

    /// The `stopped` line.
    pub fn stopped(&self, outcome: &Outcome) {
        self.write(Event::Stopped(Stopped::from(outcome)));
    }

    /// The `error` line.
    pub fn error(&self, error: &dyn Display) {
        self.write(Event::Error { message: error.to_string() });
    }
}

/// Writes `bytes` with SIGPIPE blocked on this thread, so that a reader that has gone away is an EPIPE
/// and not the death of a host program that keeps SIGPIPE's default action (a C program's `sticky_run`);
/// the SIGPIPE that write raised is taken off again unless one was pending already.
fn write_without_sigpipe(file: &File, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: signal sets built by sigemptyset/sigaddset, masks of this thread only, and a zero timeout.
    unsafe {
        let mut sigpipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut sigpipe);
        libc::sigaddset(&mut sigpipe, libc::SIGPIPE);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &sigpipe, &mut old);
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let written = (&*file).write_all(bytes);
        if !was_pending && written.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EPIPE)) {
            let now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            libc::sigtimedwait(&sigpipe, std::ptr::null_mut(), &now);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::Stats;
    use std::io::Read;

    fn pipe() -> (File, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just made the read end; nothing else owns it.
        (File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) }), fds[1])
    }

    #[test]
    fn the_lines_are_the_documented_json() {
        let (mut reader, write_end) = pipe();
        let ready = ReadyFd::take(write_end).unwrap();
        let at = master::Listening {
            address: "[::]:4000".parse().unwrap(),
            metrics: Some("127.0.0.1:9100".parse().unwrap()),
            attach_socket: None,
            workers: 4,
            routing: crate::config::Routing::Handoff,
        };
        ready.listening(&at);
        let stats =
            Stats { routed: vec![3, 0], redirected: 1, closed: 2, revivals: 1, recovered: 4, reload_failures: 0 };
        ready.stopped(&Outcome { graceful: true, stats });
        ready.write(Event::UpgradeRefused { reason: "no".into() });
        drop(ready);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let pid = std::process::id();
        let build = crate::upgrade::build_id();
        assert_eq!(
            lines[0],
            format!(
                r#"{{"version":1,"event":"listening","address":"[::]:4000","host":"::","port":4000,"workers":4,"routing":"handoff","metrics":"127.0.0.1:9100","attach_socket":null,"build":"{build}","pid":{pid}}}"#
            )
        );
        assert_eq!(
            lines[1],
            format!(
                r#"{{"version":1,"event":"stopped","graceful":true,"routed":[3,0],"redirected":1,"closed":2,"revivals":1,"recovered":4,"reload_failures":0,"pid":{pid}}}"#
            )
        );
        assert_eq!(lines[2], format!(r#"{{"version":1,"event":"upgrade_refused","reason":"no","pid":{pid}}}"#));
        assert_eq!(lines.len(), 3);
        let parsed = Line::parse(lines[1]).unwrap();
        assert!(matches!(parsed.event, Event::Stopped(Stopped { closed: 2, .. })), "{parsed:?}");
    }

    #[test]
    fn a_gone_reader_is_not_an_error_for_the_master() {
        // In a process of its own: SIGPIPE's default action (as in a C program) would end it, and the
        // other tests of this binary must keep Rust's (ignored).
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ready::tests::a_gone_reader_with_sigpipe_at_its_default", "--ignored", "--quiet"])
            .env("STICKY_CLUSTER_TEST_SIGPIPE", "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{status:?}");
    }

    #[test]
    #[ignore = "run by a_gone_reader_is_not_an_error_for_the_master in a process of its own"]
    fn a_gone_reader_with_sigpipe_at_its_default() {
        assert!(std::env::var_os("STICKY_CLUSTER_TEST_SIGPIPE").is_some(), "changes the process's SIGPIPE");
        let (reader, write_end) = pipe();
        drop(reader);
        let ready = ReadyFd::take(write_end).unwrap();
        // SAFETY: sets this process's SIGPIPE disposition to the default (this test is its only one).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        ready.error(&"first");
        ready.error(&"second");
        assert!(ready.inner.failed.load(Ordering::Relaxed));
    }

    #[test]
    fn an_fd_that_cannot_take_lines_is_named() {
        assert_eq!(parse_fd("x"), Err("not an fd number: \"x\"".into()));
        assert_eq!(parse_fd("-1"), Err("not an fd number: \"-1\"".into()));
        assert!(check(100_000).unwrap_err().starts_with("not an open file descriptor"));
        let (reader, write_end) = pipe();
        assert_eq!(check(reader.as_raw_fd()), Err("open for reading only".into()));
        assert_eq!(check(write_end), Ok(()));
        drop(ReadyFd::take(write_end).unwrap());
    }
}
