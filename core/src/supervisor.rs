//! Worker processes: spawning one per index with its private channel, describing how one ended,
//! and the back-off that keeps a crash loop from spinning a core.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{getpgid, Pid};
use tokio::process::{Child, Command};

use crate::config::defaults::{FIRST_BACKOFF, MAX_BACKOFF};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::worker::{ENV_CHANNEL_FD, ENV_CONCURRENCY, ENV_LISTEN_FD, ENV_WORKER_INDEX, ENV_WORKER_INDEX_COMPAT};

/// A freshly started worker process and the master's end of its channel (non-blocking).
pub struct Spawned {
    /// The process, to wait on.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// The master's end of the channel.
    pub channel: OwnedFd,
    /// The master's copy of the worker's end: while it is open, what the worker never received stays
    /// in the kernel, so the master can take it back when the worker dies (close-on-exec: no other
    /// child inherits it).
    pub worker_end: OwnedFd,
}

// The back-off's numbers are the configuration's defaults (shared with the JavaScript implementation).
pub use crate::config::defaults::CRASH_UPTIME;

/// Delay before the next revival after `crashes` consecutive short-lived runs (0: revive at once).
pub fn revival_delay(crashes: u32) -> Duration {
    match crashes {
        0 => Duration::ZERO,
        n => FIRST_BACKOFF.saturating_mul(1u32 << (n - 1).min(16)).min(MAX_BACKOFF),
    }
}

/// Starts `command` as worker `index` with one end of a fresh SEQPACKET socketpair as `STICKY_CLUSTER_FD`,
/// and in kernel mode its `listener` (the master keeps its own copy) as `STICKY_CLUSTER_LISTEN_FD`.
pub fn spawn_worker(
    config: &Config,
    command: &[String],
    cwd: Option<&std::path::Path>,
    index: u32,
    listener: Option<BorrowedFd<'_>>,
) -> Result<Spawned> {
    let spawn_error = |source: std::io::Error| Error::Spawn { index, program: command[0].clone(), source };
    let (master_end, worker_end) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| spawn_error(e.into()))?;
    fcntl(&master_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| spawn_error(e.into()))?;

    let mut process = Command::new(&command[0]);
    process.args(&command[1..]).stdin(Stdio::null()).kill_on_drop(false);
    if let Some(cwd) = cwd {
        process.current_dir(cwd);
    }
    for (key, value) in &config.env {
        process.env(key, value.replace("{index}", &index.to_string()));
    }
    let worker_fd = worker_end.as_raw_fd();
    process
        .env(ENV_WORKER_INDEX, index.to_string())
        .env(ENV_WORKER_INDEX_COMPAT, index.to_string())
        .env(ENV_CONCURRENCY, config.concurrency.to_string())
        .env(ENV_CHANNEL_FD, worker_fd.to_string())
        // Terminal signals (Ctrl-C) go to the master alone, which then shuts workers down in order.
        .process_group(0);
    let listen_fd = listener.map(|fd| fd.as_raw_fd());
    if let Some(fd) = listen_fd {
        process.env(ENV_LISTEN_FD, fd.to_string());
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        process.pre_exec(move || {
            // The channel end (and the listener in kernel mode) are close-on-exec so no other child inherits
            // them; this one must. So must stdout and stderr: some hosts (Node) mark fds 0-2 close-on-exec,
            // which would leave workers mute.
            for fd in [worker_fd, 1, 2].into_iter().chain(listen_fd) {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::fcntl(worker_fd, libc::F_GETFD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // No orphaned workers if the master itself is killed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = process.spawn().map_err(spawn_error)?;
    let pid = child.id().unwrap_or(0);
    Ok(Spawned { child, pid, channel: master_end, worker_end })
}

/// Sends `signal` to a spawned worker and every process of its process group (it leads one: spawned
/// with `process_group(0)`), so what it started itself does not outlive a hard stop. A worker that moved
/// to a group of its own is signalled by pid, and what is left in its first group too. A worker that
/// is already gone is ignored.
pub fn signal_worker(pid: u32, signal: Signal) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    let pid = Pid::from_raw(pid as i32);
    if getpgid(Some(pid)).is_ok_and(|group| group == pid) {
        let _ = killpg(pid, signal);
    } else {
        let _ = kill(pid, signal);
        let _ = killpg(pid, signal);
    }
}

/// `exit status 3` or `signal 9 (SIGKILL)`, for logs.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("signal {signal} ({name})"),
            Err(_) => format!("signal {signal}"),
        },
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(revival_delay(0), Duration::ZERO);
        assert_eq!(revival_delay(1), Duration::from_millis(100));
        assert_eq!(revival_delay(2), Duration::from_millis(200));
        assert_eq!(revival_delay(5), Duration::from_millis(1600));
        assert_eq!(revival_delay(40), MAX_BACKOFF);
    }

    #[test]
    fn exits_are_described_with_status_or_signal() {
        assert_eq!(describe_exit(&ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(describe_exit(&ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }
}
