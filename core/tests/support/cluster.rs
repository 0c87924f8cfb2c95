//! The real `sticky-cluster` binary as a test's child: started on a config file with `--ready-fd` on a
//! pipe, waited for through its `listening` line, its log and ready lines collected; killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::{binary, clients_for, config_text, get};

/// Lines as a reader thread collects them, and whether their stream has ended.
type Collected<T> = Arc<(Mutex<(Vec<T>, bool)>, Condvar)>;

/// Reads `stream` line by line on a thread of its own into `sink` (each line through `parse`), and marks
/// the end of the stream.
fn collect<T: Send + 'static>(
    stream: impl Read + Send + 'static,
    sink: Collected<T>,
    parse: impl Fn(String) -> T + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.0.lock().unwrap().0.push(parse(line));
            sink.1.notify_all();
        }
        sink.0.lock().unwrap().1 = true;
        sink.1.notify_all();
    })
}

/// Makes `command` a master with `--ready-fd` on a new pipe (added as its first arguments) and returns
/// the pipe's read end. The write end is close-on-exec here, so that no other child of this test
/// process holds it: only the master inherits it, and the reader sees end of file when the master (and
/// every image of it after upgrades) is gone.
fn pass_ready_fd(command: &mut Command) -> OwnedFd {
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let ready_fd = ready_write.as_raw_fd();
    command.arg("--ready-fd").arg(ready_fd.to_string());
    // SAFETY: fcntl is async-signal-safe; the child runs nothing else before exec.
    unsafe {
        command.pre_exec(move || {
            // The closure owns the write end until the command is dropped after the spawn.
            let _owned = &ready_write;
            if libc::fcntl(ready_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ready_read
}

/// Waits until the stream behind `collected` has ended, or `deadline`.
fn wait_for_end<T>(collected: &Collected<T>, deadline: Instant) {
    let (lines, changed) = &**collected;
    let mut lines = lines.lock().unwrap();
    while !lines.1 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        lines = changed.wait_timeout(lines, left).unwrap().0;
    }
}

/// A running master, its collected log and ready lines, and the temp dir holding its config.
pub struct Cluster {
    child: Option<Child>,
    /// The client port the master listens on (from its `listening` line).
    pub port: u16,
    log: Collected<String>,
    /// The master's `--ready-fd` lines, parsed (a line that is not JSON fails the test that waits).
    ready: Collected<Value>,
    /// The threads reading the master's stderr and ready fd: each ends at end of file, after the master's
    /// last line (the ready fd: after the last image of an upgraded master).
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Scratch directory of this cluster (config file, markers).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the master with `yaml` (port 0 added) and the test worker as `worker.command`.
    pub fn start(yaml: &str) -> Cluster {
        Cluster::start_with(yaml, |_| {})
    }

    /// Like [`Cluster::start`], letting the test adjust the master's command first.
    pub fn start_with(yaml: &str, adjust: impl FnOnce(&mut Command)) -> Cluster {
        Cluster::start_program(&binary(), yaml, adjust)
    }

    /// Starts the master without waiting for it to listen (for tests of start-up failures).
    pub fn spawn(yaml: &str, adjust: impl FnOnce(&mut Command)) -> Cluster {
        Cluster::spawn_program(&binary(), yaml, adjust)
    }

    /// Like [`Cluster::start_with`], with `program` as the master's binary (a copy, for upgrade tests).
    pub fn start_program(program: &std::path::Path, yaml: &str, adjust: impl FnOnce(&mut Command)) -> Cluster {
        Cluster::spawn_program(program, yaml, adjust).listens()
    }

    /// Starts the binary with these arguments only (no file), and waits for it to listen.
    pub fn start_args(args: &[&std::ffi::OsStr]) -> Cluster {
        let mut command = Command::new(binary());
        let ready = pass_ready_fd(&mut command);
        command.args(args);
        Cluster::spawn_command(command, ready, tempfile::tempdir().unwrap()).listens()
    }

    /// Waits for the `listening` line and takes the port from it.
    fn listens(mut self) -> Cluster {
        let listening = self.wait_for_event("listening", 1, Duration::from_secs(20));
        self.port = listening["port"].as_u64().and_then(|port| u16::try_from(port).ok()).unwrap();
        self
    }

    fn spawn_program(program: &std::path::Path, yaml: &str, adjust: impl FnOnce(&mut Command)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cluster.yaml");
        std::fs::write(&config, config_text(yaml)).unwrap();
        let mut command = Command::new(program);
        let ready = pass_ready_fd(&mut command);
        command.arg("--config").arg(&config);
        adjust(&mut command);
        Cluster::spawn_command(command, ready, dir)
    }

    /// Starts `command` (its ready fd's read end is `ready`), collecting its stderr and ready lines.
    fn spawn_command(mut command: Command, ready_read: OwnedFd, dir: tempfile::TempDir) -> Cluster {
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        // The master holds the write end now: the reader sees end of file when the master is gone.
        drop(command);
        let log: Collected<String> = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let ready: Collected<Value> = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let log_reader = collect(stderr, log.clone(), |line| {
            eprintln!("[master] {line}");
            line
        });
        let ready_reader = collect(std::fs::File::from(ready_read), ready.clone(), |line| {
            eprintln!("[ready] {line}");
            serde_json::from_str(&line).unwrap_or_else(|e| Value::String(format!("not JSON ({e}): {line}")))
        });
        Cluster { child: Some(child), port: 0, log, ready, readers: vec![log_reader, ready_reader], dir }
    }

    /// Waits until `count` ready lines have `"event": event` and returns the last of them; panics with the
    /// log when the fd ends or `timeout` passes first.
    pub fn wait_for_event(&self, event: &str, count: usize, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.ready;
        let mut lines = lines.lock().unwrap();
        loop {
            let found: Vec<&Value> = lines.0.iter().filter(|line| line["event"] == event).collect();
            if found.len() >= count {
                let line = found[count - 1].clone();
                assert_eq!(line["version"], 1, "{line}");
                return line;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || lines.1 {
                let why = if lines.1 { "before the ready fd ended" } else { "in time" };
                let ready: Vec<String> = lines.0.iter().map(Value::to_string).collect();
                panic!(
                    "no {count} {event:?} lines {why} ({timeout:?}); ready lines:\n{}\nlog:\n{}",
                    ready.join("\n"),
                    self.log().join("\n")
                );
            }
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Every ready line so far.
    pub fn ready_lines(&self) -> Vec<Value> {
        self.ready.0.lock().unwrap().0.clone()
    }

    /// The `listening` line.
    pub fn listening(&self) -> Value {
        self.wait_for_event("listening", 1, Duration::from_secs(20))
    }

    /// The metrics page's address, from the `listening` line.
    pub fn metrics_address(&self) -> SocketAddr {
        let listening = self.listening();
        listening["metrics"].as_str().unwrap_or_else(|| panic!("no metrics address: {listening}")).parse().unwrap()
    }

    /// SIGTERM, the exit, and the master's `stopped` line (its counters).
    pub fn stop(&mut self) -> Value {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(60)).expect("the master exits on SIGTERM");
        self.wait_for_event("stopped", 1, Duration::from_secs(5))
    }

    /// Waits until every worker answers (so each has installed its signal handling).
    pub fn wait_all_ready(&self, concurrency: u32) {
        for index in 0..concurrency {
            self.get(clients_for(index, concurrency, 1, 1000)[0], "/").unwrap();
        }
    }

    /// Replaces the configuration file (as [`Cluster::start`] writes it), for reload tests.
    pub fn rewrite_config(&self, yaml: &str) {
        std::fs::write(self.dir.path().join("cluster.yaml"), config_text(yaml)).unwrap();
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().unwrap().0.clone()
    }

    /// Waits for a log line containing `needle` and returns it; panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until `count` log lines contain `needle`; returns the last of them.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.log;
        let mut lines = lines.lock().unwrap();
        loop {
            let found: Vec<&String> = lines.0.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= count {
                return found[count - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {count} log lines with {needle:?} within {timeout:?}; log:\n{}", lines.0.join("\n"));
            }
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for a log line containing any of `needles` and returns it; panics with the log after `timeout`.
    pub fn wait_for_any_log(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.log;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(line) = lines.0.iter().find(|l| needles.iter().any(|needle| l.contains(needle))) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no log line with any of {needles:?} within {timeout:?}; log:\n{}", lines.0.join("\n"));
            }
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Sends a signal to the master.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Waits for the master to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // The readers have every line once they have seen the end of the master's stderr (workers
                // that inherited it die with the master) and of its ready fd.
                let deadline = Instant::now() + Duration::from_secs(5);
                wait_for_end(&self.log, deadline);
                wait_for_end(&self.ready, deadline);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the master process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Number of open fds of the master.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }

    /// The master's open fds once it has settled: a connection's fd may outlive its answer by a moment
    /// (the worker can serve it before the master's thread runs the close after `sendmsg`), so this waits
    /// up to `timeout` for `expected` (or, without one, for two equal counts 100 ms apart) and returns the
    /// last count and what the fds were.
    pub fn settled_fds(&self, expected: Option<usize>, timeout: Duration) -> (usize, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut last = self.open_fds();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.open_fds();
            let done = match expected {
                Some(expected) => now == expected,
                None => now == last,
            };
            if done || Instant::now() >= deadline {
                let targets = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .map(|entries| {
                        entries
                            .flatten()
                            .map(|e| std::fs::read_link(e.path()).map_or("?".into(), |t| t.display().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                return (now, targets);
            }
            last = now;
        }
    }

    /// Pids of the master's worker processes (its children).
    pub fn worker_pids(&self) -> Vec<u32> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid())).unwrap_or_default();
        children.split_whitespace().map(|p| p.parse().unwrap()).collect()
    }

    /// Utime + stime of the master in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Where clients dial: 127.0.0.1 on the master's port.
    pub fn server(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `GET path` from `client` to the master; the worker's JSON answer.
    pub fn get(&self, client: Ipv4Addr, path: &str) -> std::io::Result<Value> {
        get(client, self.server(), path)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Workers carry PR_SET_PDEATHSIG, so killing the master takes them along.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
