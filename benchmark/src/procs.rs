//! The processes a benchmark starts: a guard that ends each one's process group when dropped, and the
//! master's CPU time and memory read from /proc.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sticky_cluster::ready::Stopped;

use crate::ready::ReadyLines;

/// A started server (a master and its workers, or a set of direct workers sharing a group), ended on drop.
pub struct Running {
    name: String,
    children: Vec<Child>,
    log: PathBuf,
    dirs: Vec<PathBuf>,
    /// Our master's ready lines, when the first process is one.
    ready: Option<ReadyLines>,
}

impl Running {
    /// Starts `command` in a process group of its own, stderr to a log file read back on failure.
    pub fn spawn(name: &str, command: &mut Command) -> Result<Running, String> {
        let mut running = Running {
            name: name.to_string(),
            children: Vec::new(),
            log: log_path(name),
            dirs: Vec::new(),
            ready: None,
        };
        running.add(command)?;
        Ok(running)
    }

    /// [`Running::spawn`] for our master: its ready lines are read (see [`Running::listening_port`]).
    pub fn spawn_master(name: &str, mut command: Command) -> Result<Running, String> {
        let ready = ReadyLines::attach(&mut command)?;
        let mut running = Running::spawn(name, &mut command)?;
        // The master alone holds the write end now: its end of file is the master's exit.
        drop(command);
        running.ready = Some(ready);
        Ok(running)
    }

    /// The port our master listens on, from its `listening` line (waiting up to `timeout`); `None` for
    /// servers that are not our master.
    pub fn listening_port(&self, timeout: Duration) -> Option<Result<u16, String>> {
        let ready = self.ready.as_ref()?;
        Some(ready.listening(timeout).map(|listening| listening.port).map_err(|e| format!("{}: {e}", self.name)))
    }

    /// Our master's counters once it has stopped (after [`Running::stop`]); `None` for other servers or
    /// a master that was killed before it could say.
    pub fn stopped(&self) -> Option<Stopped> {
        self.ready.as_ref()?.stopped(Duration::from_secs(1))
    }

    /// Starts one more process under this guard (another direct worker).
    pub fn add(&mut self, command: &mut Command) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.name))?;
        self.children.push(child);
        Ok(())
    }

    /// Starts a process that becomes the first one (whose pid `pid` reports), ahead of those already started.
    pub fn add_first(&mut self, command: &mut Command) -> Result<(), String> {
        self.add(command)?;
        self.children.rotate_right(1);
        Ok(())
    }

    /// Removes `dir` (a proxy's configuration and logs) once the processes are stopped.
    pub fn remove_on_stop(&mut self, dir: PathBuf) {
        self.dirs.push(dir);
    }

    /// The pids of the processes this guard started, the first first.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// The pid of the first process: the master, where there is one.
    pub fn pid(&self) -> u32 {
        self.children.first().map(Child::id).unwrap_or(0)
    }

    /// Whether the first process has exited, and how.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.children.first_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// The last lines the processes wrote to stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }

    /// SIGTERM to every process group, SIGKILL to what is left after two seconds, then reap.
    pub fn stop(&mut self) {
        for child in &self.children {
            signal_group(child.id(), libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until && self.children.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for child in &mut self.children {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        self.children.clear();
        let _ = std::fs::remove_file(&self.log);
        for dir in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

fn log_path(name: &str) -> PathBuf {
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    std::env::temp_dir().join(format!("sticky-cluster-bench-{}-{safe}.log", std::process::id()))
}

/// A TCP port free on the dual-stack wildcard address at the time of asking.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("[::]:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("cannot find a free port: {e}"))
}

/// User plus system CPU time of a process so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// `pid` and every process descended from it (nginx's workers under its master, a master's workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
            // The field after the parenthesised command name and the state is the parent pid.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|&&(_, p)| p == parent).map(|&(c, _)| c));
        next += 1;
    }
    found
}

/// CPU seconds of several processes together (those that have exited count as 0).
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&pid| cpu_seconds(pid)).sum()
}

/// `VmRSS` of several processes added up, KiB (shared pages count once per process).
pub fn rss_kib_of(pids: &[u32]) -> Option<u64> {
    let all: Vec<u64> = pids.iter().filter_map(|&pid| status_kib(pid, "VmRSS")).collect();
    (!all.is_empty()).then(|| all.iter().sum())
}

/// A `Vm…:` figure of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let burn: u64 = (0..3_000_000u64).map(std::hint::black_box).sum();
        assert!(burn > 0);
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(status_kib(pid, "VmRSS").is_some_and(|kib| kib > 100));
        assert!(status_kib(pid, "VmHWM") >= status_kib(pid, "VmRSS"));
    }

    #[test]
    fn a_process_tree_holds_the_children() {
        let mut running =
            Running::spawn("shell", Command::new("sh").args(["-c", "sleep 30 & sleep 30 & wait"])).expect("sh starts");
        let pid = running.pid();
        let until = Instant::now() + Duration::from_secs(5);
        while tree(pid).len() < 3 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(tree(pid).len(), 3, "sh and its two sleeps");
        assert!(rss_kib_of(&tree(pid)).is_some_and(|kib| kib > 0));
        assert!(cpu_seconds_of(&tree(pid)) >= 0.0);
        running.stop();
    }

    #[test]
    fn a_stopped_group_is_gone() {
        let mut running = Running::spawn("sleeper", Command::new("sleep").arg("30")).expect("sleep starts");
        let pid = running.pid();
        assert!(running.exited().is_none());
        running.stop();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || cpu_seconds(pid).is_none());
    }
}
