//! The exec step of a socket-activated worker: program path, argv and environment prepared before the
//! fork; in the child only async-signal-safe calls (fds into place, the pid's digits, `execve`).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::{LISTEN_FD, LISTEN_FD_NAME};

/// Variables of socket activation (`sd_listen_fds(3)`); inherited values are replaced, never passed on.
pub const ACTIVATION_VARIABLES: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for the decimal digits of any pid (`pid_t` is 32 bits) and the terminating NUL.
const PID_DIGITS: usize = 11;

/// A worker's exec, ready before the fork. Everything it points to is owned here and never moves.
#[derive(Debug)]
pub struct PreparedExec {
    program: CString,
    _argv: Vec<CString>,
    argv_pointers: Vec<*const libc::c_char>,
    environment: Vec<Vec<u8>>,
    environment_pointers: Vec<*const libc::c_char>,
    /// Index in `environment` of `LISTEN_PID=`, whose digits the child writes.
    listen_pid: usize,
    listener: RawFd,
    inherited: Vec<RawFd>,
}

// SAFETY: the raw pointers point into buffers this struct owns and never changes after `new`; the struct
// is used by one thread at a time (the spawning one, then the forked child).
unsafe impl Send for PreparedExec {}
// SAFETY: as above: nothing is mutated through a shared reference.
unsafe impl Sync for PreparedExec {}

impl PreparedExec {
    /// Prepares `argv` (program first) with exactly `environment` plus the activation variables, the
    /// program found on the environment's `PATH` as `execvp` would (relative entries from `cwd`), the
    /// `listener` to put at fd 3 and `inherited` fds to keep open across the exec.
    pub fn new(
        argv: &[String],
        mut environment: BTreeMap<OsString, OsString>,
        cwd: Option<&Path>,
        listener: RawFd,
        inherited: Vec<RawFd>,
    ) -> io::Result<PreparedExec> {
        let nul = || io::Error::new(io::ErrorKind::InvalidInput, "an argument or variable holds a NUL byte");
        let name = argv.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let program = find_program(name, environment.get(OsStr::new("PATH")).map(OsString::as_os_str), cwd)?;
        let program = CString::new(program.into_os_string().into_vec()).map_err(|_| nul())?;
        let argv: Vec<CString> =
            argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>().map_err(|_| nul())?;
        for name in ACTIVATION_VARIABLES {
            environment.remove(OsStr::new(name));
        }
        environment.insert("LISTEN_FDS".into(), "1".into());
        environment.insert("LISTEN_FDNAMES".into(), LISTEN_FD_NAME.into());
        let mut buffers = Vec::with_capacity(environment.len() + 1);
        for (key, value) in &environment {
            let mut entry = Vec::with_capacity(key.len() + value.len() + 2);
            entry.extend_from_slice(key.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            if entry.contains(&0) {
                return Err(nul());
            }
            entry.push(0);
            buffers.push(entry);
        }
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS, 0);
        buffers.push(listen_pid);
        let listen_pid = buffers.len() - 1;
        let argv_pointers = argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let environment_pointers =
            buffers.iter().map(|e| e.as_ptr().cast()).chain(std::iter::once(std::ptr::null())).collect();
        Ok(PreparedExec {
            program,
            _argv: argv,
            argv_pointers,
            environment: buffers,
            environment_pointers,
            listen_pid,
            listener,
            inherited,
        })
    }

    /// In the forked child: keeps the inherited fds open, puts the listener at fd 3 in blocking mode (a
    /// predecessor may have left it non-blocking: the flag belongs to the socket every holder shares),
    /// writes `LISTEN_PID` and replaces the process image. Returns only on failure.
    ///
    /// # Safety
    /// Call only in the child between fork and exec: it changes the process's fds and memory in place.
    pub unsafe fn exec_in_child(&mut self) -> io::Error {
        for &fd in &self.inherited {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return io::Error::last_os_error();
            }
        }
        if self.listener == LISTEN_FD {
            let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
            if flags < 0 || libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return io::Error::last_os_error();
            }
        } else if libc::dup2(self.listener, LISTEN_FD) < 0 {
            return io::Error::last_os_error();
        }
        let status = libc::fcntl(LISTEN_FD, libc::F_GETFL);
        if status < 0 || libc::fcntl(LISTEN_FD, libc::F_SETFL, status & !libc::O_NONBLOCK) < 0 {
            return io::Error::last_os_error();
        }
        let entry = &mut self.environment[self.listen_pid];
        write_decimal(&mut entry[LISTEN_PID_PREFIX.len()..], libc::getpid() as u32);
        libc::execve(self.program.as_ptr(), self.argv_pointers.as_ptr(), self.environment_pointers.as_ptr());
        io::Error::last_os_error()
    }
}

/// Writes `value` in decimal and a NUL into `out` (which has room for 10 digits and the NUL), without
/// allocating: safe between fork and exec.
fn write_decimal(out: &mut [u8], mut value: u32) {
    let mut digits = [0u8; 10];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (value % 10) as u8;
        count += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (slot, digit) in out.iter_mut().zip(digits[..count].iter().rev()) {
        *slot = *digit;
    }
    out[count] = 0;
}

/// The program `execvp` would run for `name`: a name with a slash as it is (the kernel resolves it
/// from the worker's directory), else the first executable `PATH` entry (relative entries from `cwd`).
fn find_program(name: &str, path: Option<&OsStr>, cwd: Option<&Path>) -> io::Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let search = path.map_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"), OsStr::to_os_string);
    for directory in std::env::split_paths(&search) {
        let directory = match cwd {
            Some(cwd) if directory.is_relative() => cwd.join(directory),
            _ => directory,
        };
        let candidate = directory.join(name);
        let Ok(text) = CString::new(candidate.as_os_str().as_bytes()) else { continue };
        // SAFETY: a NUL-terminated path; access only reads it.
        if candidate.is_file() && unsafe { libc::access(text.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("{name:?} is not an executable on PATH")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_with_their_terminator() {
        let mut out = [0xffu8; PID_DIGITS];
        write_decimal(&mut out, 4_294_967_295);
        assert_eq!(&out, b"4294967295\0");
        write_decimal(&mut out, 7);
        assert_eq!(&out[..2], b"7\0");
    }

    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        let path = OsString::from("/nonexistent:/bin:/usr/bin");
        assert!(find_program("sh", Some(&path), None).unwrap().ends_with("sh"));
        assert_eq!(find_program("./w", Some(&path), None).unwrap(), PathBuf::from("./w"));
        let missing = find_program("no-such-program-anywhere", Some(&path), None).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("no-such-program-anywhere"), "{missing}");
    }

    #[test]
    fn the_environment_gets_the_activation_variables_once() {
        let inherited: BTreeMap<OsString, OsString> =
            [("LISTEN_FDS".into(), "7".into()), ("PATH".into(), "/bin:/usr/bin".into())].into_iter().collect();
        let prepared = PreparedExec::new(&["sh".into()], inherited, None, 9, vec![]).unwrap();
        let entries: Vec<&[u8]> = prepared.environment.iter().map(|e| &e[..e.len() - 1]).collect();
        assert!(entries.contains(&&b"LISTEN_FDS=1"[..]));
        assert!(entries.contains(&&b"LISTEN_FDNAMES=sticky-cluster"[..]));
        assert_eq!(entries.iter().filter(|e| e.starts_with(b"LISTEN_FDS=")).count(), 1);
        assert_eq!(*prepared.environment_pointers.last().unwrap(), std::ptr::null());
    }
}
