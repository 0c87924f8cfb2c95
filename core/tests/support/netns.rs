//! Network namespaces for tests that need addresses loopback cannot give: a veth pair between a server's
//! and a client's namespace, entered per thread, deleted with their interfaces when dropped.

use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Under CI every test must run: a missing capability is a failure there, a skip elsewhere.
pub fn must_run() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A named network namespace, deleted (with its interfaces) when dropped.
pub struct Namespace(pub String);

impl Namespace {
    pub fn create(name: String) -> Namespace {
        run_ip(&["netns", "add", &name], "");
        Namespace(name)
    }

    /// Enters this namespace on the calling thread. Network namespaces are per thread: a thread, or a
    /// process, started afterwards from this thread is in it too; the test's other threads are not.
    pub fn enter(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("open the namespace");
        // SAFETY: file is an open namespace fd; setns only changes this thread's network namespace.
        let status = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(status, 0, "setns {}: {}", self.0, io::Error::last_os_error());
    }

    /// Whether process `pid` is in this namespace.
    pub fn holds(&self, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let inode = |path: String| std::fs::metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}")).ino();
        inode(format!("/proc/{pid}/ns/net")) == inode(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip args...` with `stdin` as its input (`-batch -` reads its commands there); panics if it fails.
pub fn run_ip(args: &[&str], stdin: &str) {
    let mut child = Command::new("ip").args(args).stdin(Stdio::piped()).spawn().expect("run ip");
    io::Write::write_all(&mut child.stdin.take().expect("ip's stdin"), stdin.as_bytes()).expect("feed ip");
    let status = child.wait().expect("wait for ip");
    assert!(status.success(), "ip {args:?} failed: {status}");
}

/// Two namespaces joined by a veth pair (`server_if` in the server's, `client_if` in the client's), every
/// link up; deleted when dropped. None without root and iproute2 (a skip, and a failure under CI).
pub struct VethPair {
    pub server: Namespace,
    pub client: Namespace,
    pub server_if: String,
    pub client_if: String,
}

impl VethPair {
    /// `tag` keeps the names of concurrent tests apart.
    pub fn create(tag: char) -> Option<VethPair> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let have_ip = Command::new("ip").arg("-V").output().is_ok_and(|out| out.status.success());
        if !(root && have_ip) {
            assert!(!must_run(), "CI=true: this test needs root and iproute2 (root: {root}, ip: {have_ip})");
            eprintln!("skipped: needs root and iproute2");
            return None;
        }
        let id = std::process::id();
        let (server_if, client_if) = (format!("s{tag}s{id}"), format!("s{tag}c{id}"));
        let server = Namespace::create(format!("sticky-{tag}-srv-{id}"));
        let client = Namespace::create(format!("sticky-{tag}-cli-{id}"));
        run_ip(
            &["-n", &server.0, "-batch", "-"],
            &format!(
                "link add {server_if} type veth peer name {client_if} netns {}\nlink set lo up\nlink set {server_if} up\n",
                client.0
            ),
        );
        run_ip(&["-n", &client.0, "-batch", "-"], &format!("link set lo up\nlink set {client_if} up\n"));
        Some(VethPair { server, client, server_if, client_if })
    }
}

/// The index of the interface `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("index of {name}: {e}"))
}
