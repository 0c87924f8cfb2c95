//! The processes a benchmark starts: a guard that ends each one's process group when dropped, and the
//! master's CPU time and memory read from /proc.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started server (a master and its workers, or a set of direct workers sharing a group), ended on drop.
pub struct Running {
    name: String,
    children: Vec<Child>,
    log: PathBuf,
}

impl Running {
    /// Starts `command` in a process group of its own, stderr to a log file read back on failure.
    pub fn spawn(name: &str, command: &mut Command) -> Result<Running, String> {
        let mut running = Running { name: name.to_string(), children: Vec::new(), log: log_path(name) };
        running.add(command)?;
        Ok(running)
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
    fn a_stopped_group_is_gone() {
        let mut running = Running::spawn("sleeper", Command::new("sleep").arg("30")).expect("sleep starts");
        let pid = running.pid();
        assert!(running.exited().is_none());
        running.stop();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || cpu_seconds(pid).is_none());
    }
}
