//! Our master's ready lines (`STICKY_CLUSTER_READY_FD`), read on a thread of their own: a benchmark waits
//! for `listening` and takes the port from it, instead of guessing a free port and polling it.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sticky_cluster::ready::{Event, Line, Listening, Stopped, ENV_READY_FD};

/// The lines read so far, and whether the fd has ended (the master is gone).
type Shared = Arc<(Mutex<(Vec<Line>, bool)>, Condvar)>;

/// The read end of a master's ready fd.
pub struct ReadyLines {
    shared: Shared,
}

impl ReadyLines {
    /// Gives `command` a new pipe as its ready fd, named in its environment (its arguments stay as they
    /// are), and reads the other end. The write end is close-on-exec in this process and belongs to the
    /// command's `pre_exec` closure: it closes here when the command is dropped after its spawn.
    pub fn attach(command: &mut Command) -> Result<ReadyLines, String> {
        let mut fds: [RawFd; 2] = [0; 2];
        // SAFETY: pipe2 writes two new fds into the array or fails.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("cannot make the ready pipe: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just made both; nothing else owns them.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let write_fd = fds[1];
        command.env(ENV_READY_FD, write_fd.to_string());
        // SAFETY: fcntl is async-signal-safe; the child runs nothing else before exec.
        unsafe {
            command.pre_exec(move || {
                let _owned = &write_end;
                if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let shared: Shared = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let sink = shared.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(std::fs::File::from(read_end)).lines() {
                let Ok(text) = text else { break };
                if let Some(line) = Line::parse(&text) {
                    sink.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.push(line);
                    sink.1.notify_all();
                }
            }
            sink.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).1 = true;
            sink.1.notify_all();
        });
        Ok(ReadyLines { shared })
    }

    /// The first line `pick` takes, waiting up to `timeout`; `None` when the fd ended or time ran out.
    fn wait<T>(&self, timeout: Duration, pick: impl Fn(&Event) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.shared;
        let mut lines = lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(found) = lines.0.iter().find_map(|line| pick(&line.event)) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if lines.1 || left.is_zero() {
                return None;
            }
            lines = changed.wait_timeout(lines, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }

    /// Where the master listens, once it does (an `error` line's message, the end of the fd or `timeout`
    /// otherwise).
    pub fn listening(&self, timeout: Duration) -> Result<Listening, String> {
        let found = self.wait(timeout, |event| match event {
            Event::Listening(listening) => Some(Ok(listening.clone())),
            Event::Error { message } => Some(Err(message.clone())),
            _ => None,
        });
        found.unwrap_or_else(|| Err(format!("no listening line on the ready fd within {timeout:?}")))
    }

    /// The master's counters when it stopped, if it did within `timeout`.
    pub fn stopped(&self, timeout: Duration) -> Option<Stopped> {
        self.wait(timeout, |event| match event {
            Event::Stopped(stopped) => Some(stopped.clone()),
            _ => None,
        })
    }
}
