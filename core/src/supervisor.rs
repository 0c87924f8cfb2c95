//! Worker processes: spawning one per index with its private channel, describing how one ended,
//! and the back-off that keeps a crash loop from spinning a core.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{getpgid, Pid};
use tokio::process::{Child, Command};

use crate::activation::exec::PreparedExec;
use crate::activation::{Placeholders, WorkerProtocol, LISTEN_FD};
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

/// Starts `command` as worker `index` with one end of a fresh SEQPACKET socketpair as `STICKY_CLUSTER_FD`
/// (`worker.protocol: none`: the master keeps both ends), and in kernel mode its `listener` (the master
/// keeps its own copy) socket-activated: fd 3, `LISTEN_FDS=1`, `LISTEN_PID` (its own pid),
/// `LISTEN_FDNAMES`, and `STICKY_CLUSTER_LISTEN_FD=3`. `{index}`, `{concurrency}`, `{backlog}` and
/// `{listen_fd}` in the arguments are filled in.
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
    // fd 3 is the listener's place in the worker: the channel must come in under another number.
    let worker_end = if worker_end.as_raw_fd() <= LISTEN_FD && listener.is_some() {
        let moved = fcntl(&worker_end, FcntlArg::F_DUPFD_CLOEXEC(LISTEN_FD + 1)).map_err(|e| spawn_error(e.into()))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(moved) }
    } else {
        worker_end
    };
    let speaks_protocol = config.worker_protocol == WorkerProtocol::Channel;
    let placeholders = Placeholders { index, concurrency: config.concurrency, backlog: config.backlog };
    let argv: Vec<String> = command.iter().map(|argument| placeholders.expand(argument)).collect();

    let mut process = Command::new(&argv[0]);
    process.args(&argv[1..]).stdin(Stdio::null()).kill_on_drop(false);
    if let Some(cwd) = cwd {
        process.current_dir(cwd);
    }
    let mut environment: Vec<(String, String)> =
        config.env.iter().map(|(key, value)| (key.clone(), value.replace("{index}", &index.to_string()))).collect();
    let worker_fd = worker_end.as_raw_fd();
    environment.extend([
        (ENV_WORKER_INDEX.to_string(), index.to_string()),
        (ENV_WORKER_INDEX_COMPAT.to_string(), index.to_string()),
        (ENV_CONCURRENCY.to_string(), config.concurrency.to_string()),
    ]);
    if speaks_protocol {
        environment.push((ENV_CHANNEL_FD.to_string(), worker_fd.to_string()));
    }
    let listen_fd = listener.map(|fd| fd.as_raw_fd());
    if listen_fd.is_some() {
        environment.push((ENV_LISTEN_FD.to_string(), LISTEN_FD.to_string()));
    }
    // Terminal signals (Ctrl-C) go to the master alone, which then shuts workers down in order.
    process.process_group(0);
    let channel_fd = speaks_protocol.then_some(worker_fd);
    // The channel end (and the listener in kernel mode) are close-on-exec so no other child inherits
    // them; this one must. So must stdout and stderr: some hosts (Node) mark fds 0-2 close-on-exec,
    // which would leave workers mute.
    let inherited: Vec<RawFd> = channel_fd.into_iter().chain([1, 2]).collect();
    let mut activation = match listen_fd {
        Some(listen_fd) => {
            let mut full: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
            full.extend(environment.iter().map(|(key, value)| (key.into(), value.into())));
            let prepared = PreparedExec::new(&argv, full, cwd, listen_fd, inherited.clone()).map_err(spawn_error)?;
            Some(prepared)
        }
        None => {
            process.envs(environment);
            None
        }
    };
    // The master as it is now: a child whose parent is another process by the time its death signal is
    // armed was orphaned in between (the master died) and would never get the signal.
    // SAFETY: getpid has no requirements.
    let master_pid = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec (the activation exec allocates nothing).
    unsafe {
        process.pre_exec(move || {
            for &fd in &inherited {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = channel_fd {
                if libc::fcntl(fd, libc::F_GETFD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // No orphaned workers if the master itself is killed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != master_pid {
                libc::_exit(1);
            }
            match activation.as_mut() {
                // Returns only when execve failed: the error reaches `spawn` as usual.
                Some(prepared) => Err(prepared.exec_in_child()),
                None => Ok(()),
            }
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

/// Kills what is left of a spawned worker's process group (it leads its own) once the worker itself is
/// gone; true when something was still there.
pub fn end_process_group(pid: u32) -> bool {
    pid > 1 && nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
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
