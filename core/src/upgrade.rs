//! Upgrading the master in place (SIGUSR2), the process half: the preflight of the new binary, the build
//! id, the state handed to the new image in an inherited memfd, the raw `execve` with signals blocked
//! across it, and the rollback to the old binary (kept open as an fd) when the new image cannot take over.
//!
//! The master keeps its pid through `execve`, so spawned workers stay its children with their death
//! signal armed (it belongs to the thread that forked them: the one thread that also execs), and every
//! fd it clears `FD_CLOEXEC` on survives: listeners, channels, queued connections. `master::run` and
//! `master::resume` own what is in the state; this module owns how it travels.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The state memfd's fd number in the new image's environment.
pub const ENV_STATE_FD: &str = "STICKY_CLUSTER_UPGRADE_STATE_FD";
/// The old binary's fd number in the new image's environment (for a rollback).
pub const ENV_ROLLBACK_FD: &str = "STICKY_CLUSTER_UPGRADE_ROLLBACK_FD";
/// Set when the image is the old binary taking its state back after a failed upgrade.
pub const ENV_ROLLED_BACK: &str = "STICKY_CLUSTER_UPGRADE_ROLLED_BACK";
/// For the upgrade's own tests: a file whose content the new image obeys before it takes over (`fail`:
/// refuse the state, so the rollback runs; `pause <ms>`: wait that long first, widening the gap).
pub const ENV_FAULT_FILE: &str = "STICKY_CLUSTER_UPGRADE_FAULT_FILE";
/// The state format this build writes.
pub const STATE_VERSION: u32 = 1;
/// The state formats this build reads.
pub const READS_STATE_VERSIONS: &[u32] = &[1];
/// How long the new binary's preflight may take.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(30);
/// The line `--check` prints for the preflight.
const CHECK_LINE_PREFIX: &str = "# upgrade: build ";

/// This image's build id, once known.
static BUILD_ID: OnceLock<String> = OnceLock::new();

/// An identity of the running executable: 16 hex digits of a hash of its bytes, so two builds (or a
/// copy with a byte changed) tell apart in the log. `unknown` if it cannot be read. Hashed once per
/// image, at the first call; an upgraded image is told its own by its predecessor's state instead
/// ([`know_build_id`]).
pub fn build_id() -> String {
    BUILD_ID.get_or_init(hash_executable).clone()
}

/// Takes `id` as this image's build id, without hashing the executable: an upgraded image learns it from
/// the state (what this binary said in its preflight), since hashing the whole file on the master's
/// thread in the gap would hold up every new client (about 190 ms for a debug build). No effect once known.
pub(crate) fn know_build_id(id: &str) {
    let _ = BUILD_ID.set(id.to_string());
}

/// FNV-1a over the running executable's bytes.
fn hash_executable() -> String {
    let Ok(mut file) = std::fs::File::open("/proc/self/exe") else { return "unknown".into() };
    // FNV-1a over the file: no dependency, and the same value in every build of this function.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                for &byte in &buffer[..read] {
                    hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
                }
            }
            Err(_) => return "unknown".into(),
        }
    }
    format!("{hash:016x}")
}

/// What `--check` prints for a preflight: this build and the state versions it reads.
pub fn check_line() -> String {
    let versions: Vec<String> = READS_STATE_VERSIONS.iter().map(u32::to_string).collect();
    format!("{CHECK_LINE_PREFIX}{}; reads state versions {}", build_id(), versions.join(","))
}

/// An upgrade that passed its preflight: what to execute, with which arguments and environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The new binary (the path this master was started from).
    pub binary: PathBuf,
    /// The arguments, `argv[0]` included: the same as this master's.
    pub args: Vec<OsString>,
    /// The new binary's build id, from its preflight.
    pub new_build: String,
    /// This binary's build id.
    pub old_build: String,
    /// Fds of this master's caller that the new image keeps as well (the `--ready-fd` pipe), each with
    /// the environment variable that names it there.
    pub pass_on: Vec<(String, RawFd)>,
}

/// Runs `binary --check` with this master's arguments and reads what it says: it must accept the
/// configuration (exit 0) and read [`STATE_VERSION`]. Blocks the calling thread (at most 30 s).
pub fn preflight(binary: &Path, args: &[OsString]) -> Result<Plan, String> {
    let mut command = std::process::Command::new(binary);
    command
        .arg("--check")
        .args(args.iter().skip(1))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Not one of ours: no state, no rollback.
        .env_remove(ENV_STATE_FD)
        .env_remove(ENV_ROLLBACK_FD);
    let mut child = command.spawn().map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < PREFLIGHT_TIMEOUT => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} --check did not finish within {PREFLIGHT_TIMEOUT:?}", binary.display()));
            }
            Err(error) => return Err(format!("waiting for {} --check: {error}", binary.display())),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    if !status.success() {
        let said = stderr.lines().rfind(|line| !line.trim().is_empty()).unwrap_or("").trim().to_string();
        return Err(format!("{} --check refused the configuration ({status}): {said}", binary.display()));
    }
    let Some(line) = stdout.lines().find_map(|line| line.strip_prefix(CHECK_LINE_PREFIX)) else {
        return Err(format!("{} --check does not say which state versions it reads", binary.display()));
    };
    let (build, versions) = line.split_once("; reads state versions ").unwrap_or((line, ""));
    let reads = versions.split(',').any(|version| version.trim() == STATE_VERSION.to_string());
    if !reads {
        return Err(format!(
            "{} reads state versions {}, not {STATE_VERSION}",
            binary.display(),
            if versions.is_empty() { "(none)" } else { versions }
        ));
    }
    Ok(Plan {
        binary: binary.to_path_buf(),
        args: args.to_vec(),
        new_build: build.trim().to_string(),
        old_build: build_id(),
        pass_on: Vec::new(),
    })
}

/// Blocks every signal on this thread (the master's): from here until the new image has installed its
/// handlers, signals stay pending instead of being lost in the exec.
pub fn block_signals() {
    // SAFETY: a full set built by sigfillset, and the old mask is not needed.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Unblocks every signal: pending ones (a SIGTERM that came during the upgrade) are delivered now.
pub fn unblock_signals() {
    // SAFETY: as in block_signals.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &all, std::ptr::null_mut());
    }
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a number: an unknown one answers EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let wanted = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, wanted) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A memfd holding `bytes`, positioned at the start, close-on-exec until [`exec`] says otherwise.
fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // The system call itself: glibc's wrapper is newer (2.27) than the oldest glibc the npm addon, which
    // links this crate, supports (2.17).
    // SAFETY: a NUL-terminated name and flags; the kernel returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, c"sticky-cluster-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

fn c_string(text: &OsStr) -> std::io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| std::io::Error::other("an argument or variable holds a NUL byte"))
}

/// The environment of this process, with `extra` set (replacing what it names), as `execve` takes it.
fn environment(extra: &[(&str, String)]) -> std::io::Result<Vec<CString>> {
    let mut variables = Vec::new();
    for (key, value) in std::env::vars_os() {
        if extra.iter().any(|(name, _)| OsStr::new(name) == key) {
            continue;
        }
        let mut pair = key;
        pair.push("=");
        pair.push(value);
        variables.push(c_string(&pair)?);
    }
    for (name, value) in extra {
        variables.push(c_string(OsStr::new(&format!("{name}={value}")))?);
    }
    Ok(variables)
}

/// Replaces this process's image with `plan.binary`, handing it `state` (and `keep`: the fds the state
/// names) and the old binary for a rollback. Signals must be blocked already ([`block_signals`]).
/// Returns only when the exec failed; then every fd is close-on-exec again and nothing has changed.
pub fn exec(plan: &Plan, state: &[u8], keep: &[RawFd]) -> std::io::Error {
    let attempt = || -> std::io::Result<std::convert::Infallible> {
        let state_fd = memfd_with(state)?;
        // The running binary, even if its file was replaced or removed meanwhile.
        let old_binary = std::fs::File::open("/proc/self/exe")?;
        let path = c_string(plan.binary.as_os_str())?;
        let args: Vec<CString> = plan.args.iter().map(|arg| c_string(arg)).collect::<std::io::Result<_>>()?;
        let mut extra = vec![
            (ENV_STATE_FD, state_fd.as_raw_fd().to_string()),
            (ENV_ROLLBACK_FD, old_binary.as_raw_fd().to_string()),
        ];
        extra.extend(plan.pass_on.iter().map(|(name, fd)| (name.as_str(), fd.to_string())));
        let env = environment(&extra)?;
        let inherited: Vec<RawFd> = keep
            .iter()
            .copied()
            .chain([state_fd.as_raw_fd(), old_binary.as_raw_fd()])
            .chain(plan.pass_on.iter().map(|(_, fd)| *fd))
            .collect();
        let error = exec_keeping(&path, &args, &env, &inherited, |path, argv, envp| {
            // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive the call.
            unsafe { libc::execve(path, argv, envp) };
        });
        drop((state_fd, old_binary));
        Err(error)
    };
    match attempt() {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

/// Clears `FD_CLOEXEC` on `inherited`, calls `exec` (which returns only on failure) and, when it
/// returns, sets `FD_CLOEXEC` on them again and gives the exec's error.
fn exec_keeping(
    path: &CString,
    args: &[CString],
    env: &[CString],
    inherited: &[RawFd],
    exec: impl FnOnce(*const libc::c_char, *const *const libc::c_char, *const *const libc::c_char),
) -> std::io::Error {
    let argv: Vec<*const libc::c_char> = args.iter().map(|arg| arg.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = env.iter().map(|var| var.as_ptr()).chain([std::ptr::null()]).collect();
    let mut cleared = Vec::new();
    let mut failure = None;
    for &fd in inherited {
        match set_cloexec(fd, false) {
            Ok(()) => cleared.push(fd),
            Err(error) => {
                failure = Some(std::io::Error::other(format!("keep fd {fd} open across the exec: {error}")));
                break;
            }
        }
    }
    let error = match failure {
        Some(error) => error,
        None => {
            exec(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            std::io::Error::last_os_error()
        }
    };
    for fd in cleared {
        let _ = set_cloexec(fd, true);
    }
    error
}

/// What a master that was re-executed into this image inherited: the state, and the old binary.
#[derive(Debug)]
pub struct Inherited {
    /// The state the old image wrote.
    pub state: Vec<u8>,
    /// The memfd holding it (kept for a rollback).
    state_fd: OwnedFd,
    /// The old binary, to go back to; `None` in an image that is itself a rollback.
    rollback: Option<OwnedFd>,
}

/// Reads what a previous image of this master handed over, if this image is an upgrade (or a rollback):
/// the variables leave the environment and the fds become close-on-exec.
pub fn inherited() -> Result<Option<Inherited>, String> {
    let Some(text) = std::env::var_os(ENV_STATE_FD) else { return Ok(None) };
    let rolled_back = std::env::var_os(ENV_ROLLED_BACK).is_some();
    let rollback_text = std::env::var_os(ENV_ROLLBACK_FD);
    for name in [ENV_STATE_FD, ENV_ROLLBACK_FD, ENV_ROLLED_BACK] {
        std::env::remove_var(name);
    }
    let take = |name: &str, text: &OsStr| -> Result<OwnedFd, String> {
        let fd: RawFd = text.to_string_lossy().trim().parse().map_err(|_| format!("{name}: not an fd number"))?;
        set_cloexec(fd, true).map_err(|e| format!("{name}={fd}: {e}"))?;
        // SAFETY: the previous image made this fd for this image alone and named it here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let state_fd = take(ENV_STATE_FD, &text)?;
    let rollback = match rollback_text {
        Some(text) if !rolled_back => Some(take(ENV_ROLLBACK_FD, &text)?),
        Some(text) => {
            drop(take(ENV_ROLLBACK_FD, &text));
            None
        }
        None => None,
    };
    let mut file = std::fs::File::from(state_fd.try_clone().map_err(|e| format!("the state memfd: {e}"))?);
    let mut state = Vec::new();
    file.read_to_end(&mut state).map_err(|e| format!("read the upgrade state: {e}"))?;
    Ok(Some(Inherited { state, state_fd, rollback }))
}

impl Inherited {
    /// Whether this image can still go back to the binary that handed over (it is not a rollback itself).
    pub fn can_roll_back(&self) -> bool {
        self.rollback.is_some()
    }

    /// Executes the old binary again with the same state and arguments, marked as a rollback so that it
    /// does not try to go back further. Returns only when that failed.
    pub fn roll_back(self) -> std::io::Error {
        let Some(old_binary) = self.rollback else {
            return std::io::Error::other("this image is a rollback already");
        };
        let attempt = || -> std::io::Result<std::io::Error> {
            let mut state = std::fs::File::from(self.state_fd.try_clone()?);
            state.rewind()?;
            let args: Vec<CString> = std::env::args_os().map(|arg| c_string(&arg)).collect::<std::io::Result<_>>()?;
            let env = environment(&[
                (ENV_STATE_FD, self.state_fd.as_raw_fd().to_string()),
                (ENV_ROLLBACK_FD, old_binary.as_raw_fd().to_string()),
                (ENV_ROLLED_BACK, "1".into()),
            ])?;
            let inherited = [self.state_fd.as_raw_fd(), old_binary.as_raw_fd()];
            let binary = old_binary.as_raw_fd();
            let none = CString::default();
            Ok(exec_keeping(&none, &args, &env, &inherited, |_, argv, envp| {
                // SAFETY: as in exec; fexecve runs the file the fd names.
                unsafe { libc::fexecve(binary, argv, envp) };
            }))
        };
        attempt().unwrap_or_else(|error| error)
    }
}

/// What the upgrade's fault file asks of this image (tests of the upgrade itself), if anything.
pub fn fault() -> Option<String> {
    let path = std::env::var_os(ENV_FAULT_FILE)?;
    std::fs::read_to_string(path).ok().map(|text| text.trim().to_string()).filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_line_names_this_build_and_the_versions_it_reads() {
        let line = check_line();
        assert!(line.starts_with(CHECK_LINE_PREFIX), "{line}");
        assert!(line.ends_with("; reads state versions 1"), "{line}");
        assert_eq!(build_id(), build_id(), "the same executable, the same id");
        assert_eq!(build_id().len(), 16);
    }

    #[test]
    fn a_failed_exec_leaves_every_fd_close_on_exec() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let plan = Plan {
            binary: PathBuf::from("/nonexistent/sticky-cluster"),
            args: vec!["sticky-cluster".into()],
            new_build: "x".into(),
            old_build: "y".into(),
            pass_on: Vec::new(),
        };
        let error = exec(&plan, b"{}", &[fd]);
        assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{error}");
        // SAFETY: fcntl on an open fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn a_binary_that_does_not_say_what_it_reads_fails_the_preflight() {
        let error = preflight(Path::new("/bin/true"), &["sticky-cluster".into()]).unwrap_err();
        assert!(error.contains("does not say which state versions it reads"), "{error}");
        let error = preflight(Path::new("/bin/false"), &["sticky-cluster".into()]).unwrap_err();
        assert!(error.contains("refused the configuration"), "{error}");
    }
}
