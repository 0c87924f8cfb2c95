//! `sticky_run`: one call that is the master in the process a user starts and the worker in the
//! copies it spawns, like `require('sticky-cluster')(start, options)`; `sticky_run_config` from YAML.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use sticky_cluster::config::Config;
use sticky_cluster::master::{self, Stop};
use sticky_cluster::ready::ReadyFd;
use sticky_cluster::worker::{ENV_CHANNEL_FD, ENV_SOCKET};
use sticky_cluster::Worker;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{error, info, warn};

use crate::cluster::{self, Requests};
use crate::error::{utf8_argument, Failure, STICKY_ECONFIG, STICKY_EIO};
use crate::options::{config_from_file, config_of, sticky_options};
use crate::worker::sticky_worker;

/// The worker entry point `sticky_run` calls in each worker process.
///
/// `worker` is ready to use and owned by `sticky_run` (do not close it); `user` is the pointer given
/// to `sticky_run`. Call `sticky_worker_ready` once initialised, then accept until
/// `STICKY_ESHUTDOWN` or `STICKY_ECLOSED`; the return value becomes `sticky_run`'s.
pub type sticky_serve_fn = Option<unsafe extern "C" fn(worker: *mut sticky_worker, user: *mut c_void) -> c_int>;

sticky_fn! {
    /// Runs a sticky cluster: the master in the process a user starts, `serve` in every worker.
    ///
    /// Master role (no `STICKY_CLUSTER_FD`/`STICKY_CLUSTER_SOCKET` in the environment): listens as `opts`
    /// says (NULL: the defaults), spawns `concurrency` copies of the current executable with the same
    /// arguments (or `opts->worker_command`), routes every client address to the same worker, revives
    /// workers that die, and blocks the calling thread until SIGTERM or SIGINT: the first one drains the
    /// workers, a second one (or `hard_shutdown_delay_ms` running out) kills them. SIGHUP is logged and
    /// changes nothing: the options are the program's, in memory (to reload from C, run the master with
    /// `sticky_cluster_start` and call `sticky_cluster_reload`). Installs the process's SIGTERM, SIGINT and
    /// SIGHUP handlers for that (they stay installed after the call) and logs on stderr. Returns `STICKY_OK` after a graceful shutdown, `STICKY_EHARD` when workers had to be
    /// killed, or `STICKY_EINVAL`, `STICKY_ECONFIG`, `STICKY_ELISTEN`, `STICKY_ESPAWN`, `STICKY_EIO` before
    /// or while starting. Call it from the main thread, once, before starting other threads.
    /// With `STICKY_CLUSTER_READY_FD=N` in the environment (a driver that started this program), it
    /// writes the `sticky-cluster` binary's ready lines to fd N (JSON: `listening` with the port,
    /// `stopped` with the counters, `error`; see the README) and removes the variable; an N that is not
    /// an open, writable fd is `STICKY_ECONFIG`.
    ///
    /// Worker role: opens the worker (as `sticky_worker_open`), calls `serve(worker, user)`, closes the
    /// worker, and returns what `serve` returned (return `STICKY_OK` from `serve` for a clean exit);
    /// `STICKY_ENOTWORKER` or another code when the worker cannot be opened (then `serve` is not called).
    /// While `serve` runs, SIGTERM (when it still has its default action, which would kill the worker
    /// mid-request) is handled: the master's own SIGTERM comes after its shutdown message, which `accept`
    /// reports first as `STICKY_ESHUTDOWN`; a SIGTERM from someone else (systemd signals every process of a
    /// unit, an operator's `kill`) makes the worker stop accepting as `sticky_worker_stop_accepting` does, so
    /// `accept` returns what was already sent here, then `STICKY_ECLOSED`, and the master starts a successor.
    /// SIGTERM is blocked in the calling thread meanwhile (a thread of the library takes it), so none of
    /// `serve`'s blocking calls is interrupted; threads `serve` starts inherit that, and so do programs it
    /// executes: unblock SIGTERM in those (`posix_spawnattr_setsigmask`) if they must be signalled.
    /// Workers are still killed after `hard_shutdown_delay_ms`.
    ///
    /// `serve` must not be NULL (`STICKY_EINVAL`).
    ///
    /// # Safety
    /// `opts` must be NULL or point to an initialised `sticky_options` whose strings and arrays are
    /// valid as documented there; `serve` must be safe to call with a worker and `user`.
    pub unsafe fn sticky_run(opts: *const sticky_options, serve: sticky_serve_fn, user: *mut c_void) -> c_int {
        let serve = serve.ok_or_else(|| Failure::null("serve"))?;
        if in_worker_environment() {
            return run_worker(serve, user);
        }
        run_master(config_of(opts), OnHangup::Nothing)
    }
}

sticky_fn! {
    /// `sticky_run` with the options read from a YAML file (the `sticky-cluster --config` format).
    ///
    /// When the file has no `worker.command`, workers are copies of the current executable with the same
    /// arguments. In a worker process the file is not read. Errors as `sticky_run`; a file that cannot be
    /// read or is invalid gives `STICKY_ECONFIG` with the file, line and key in the last error message.
    /// SIGHUP reads the file again and applies it as `sticky_cluster_reload` would (workers whose command
    /// or environment changed restart one index at a time); a file that has become invalid is logged as
    /// one line and changes nothing, like the `sticky-cluster` binary's SIGHUP.
    ///
    /// # Safety
    /// `yaml_path` must be NULL or a NUL-terminated string; `serve` must be safe to call with a worker
    /// and `user`.
    pub unsafe fn sticky_run_config(yaml_path: *const c_char, serve: sticky_serve_fn, user: *mut c_void) -> c_int {
        let serve = serve.ok_or_else(|| Failure::null("serve"))?;
        let path = utf8_argument(yaml_path, "yaml_path")?;
        if in_worker_environment() {
            return run_worker(serve, user);
        }
        run_master(config_from_file(path), OnHangup::ReadFile(path.to_string()))
    }
}

/// Whether this process was started as a worker (its channel or the master's socket is in the environment).
pub(crate) fn in_worker_environment() -> bool {
    std::env::var_os(ENV_CHANNEL_FD).is_some() || std::env::var_os(ENV_SOCKET).is_some()
}

/// Worker role: the handle lives exactly as long as the `serve` call, and SIGTERM from someone else than
/// the master (systemd signals every process of a unit) makes it stop accepting and drain.
fn run_worker(
    serve: unsafe extern "C" fn(*mut sticky_worker, *mut c_void) -> c_int,
    user: *mut c_void,
) -> Result<c_int, Failure> {
    let worker = Box::into_raw(Box::new(sticky_worker::new(Worker::from_env()?)));
    // SAFETY: `worker` stays live until it is freed below, after the scope has joined every thread using it;
    // every function on it takes a shared reference.
    let shared = unsafe { &*worker };
    let watch = match TermWatch::install() {
        Ok(watch) => watch,
        Err(failure) => {
            // SAFETY: created above by Box::into_raw and not handed out yet.
            drop(unsafe { Box::from_raw(worker) });
            return Err(failure);
        }
    };
    let answer = std::thread::scope(|scope| {
        if let Some(watch) = &watch {
            scope.spawn(|| watch.stop_on_term(shared));
        }
        // SAFETY: `serve` is the caller's C function, given a live handle it was told not to close.
        let answer = unsafe { serve(worker, user) };
        if let Some(watch) = &watch {
            watch.finish();
        }
        answer
    });
    if let Some(watch) = watch {
        watch.restore();
    }
    // SAFETY: created above by Box::into_raw; serve was told not to close it; the scope has ended.
    drop(unsafe { Box::from_raw(worker) });
    Ok(answer)
}

/// The write end of the worker's SIGTERM pipe while one is open, for the signal handler (-1: none).
static TERM_PIPE: AtomicI32 = AtomicI32::new(-1);
/// What the pipe carries: a SIGTERM arrived, or the worker is done and the watching thread may end.
const TERM: u8 = 1;
const DONE: u8 = 0;

extern "C" fn on_sigterm(_: c_int) {
    let fd = TERM_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) and errno are async-signal-safe; the byte lives on this stack.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, [TERM].as_ptr().cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// SIGTERM during `serve`: the handler writes to a pipe (all it may do), and a thread reads it and tells
/// the master this worker stops accepting. `accept` then hands over what was already sent and answers
/// `STICKY_ECLOSED`, so `serve` returns having lost nothing. The master's own SIGTERM (it shuts down or
/// reloads) comes after its shutdown message, which `accept` reports first as `STICKY_ESHUTDOWN`.
///
/// SIGTERM is blocked in the thread that runs `serve` (and so in the threads it starts) and taken by the
/// watching thread alone: a handled signal would otherwise interrupt the program's blocking calls (a
/// `recv` with `SO_RCVTIMEO`, `poll`, `epoll_wait`) with `EINTR` mid-request, as ignoring it never did.
struct TermWatch {
    read: OwnedFd,
    write: OwnedFd,
    /// The `serve` thread's signal mask before, restored by `restore`.
    mask: libc::sigset_t,
}

/// `{SIGTERM}`.
fn sigterm_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set, sigaddset adds a valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

impl TermWatch {
    /// Takes SIGTERM when it still has its default action (die at once, mid-request); a handler or an
    /// ignore the program chose is left alone, and then there is nothing to watch (`None`). Call it on the
    /// thread that will run `serve`.
    fn install() -> Result<Option<TermWatch>, Failure> {
        // SAFETY: sigaction with a zeroed struct only reads the current disposition.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut current) } != 0 {
            return Err(os_failure("read the SIGTERM disposition"));
        }
        if current.sa_sigaction != libc::SIG_DFL {
            return Ok(None);
        }
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new fds into the array, which are then owned here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os_failure("create the SIGTERM pipe"));
        }
        // SAFETY: both fds are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Blocked here first: a SIGTERM from now on waits for the watching thread, which unblocks it.
        // SAFETY: pthread_sigmask reads a valid set and writes the old mask into a live sigset_t.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigterm_set(), &mut mask) } != 0 {
            return Err(os_failure("block SIGTERM"));
        }
        let watch = TermWatch { read, write, mask };
        TERM_PIPE.store(watch.write.as_raw_fd(), Ordering::SeqCst);
        // SAFETY: the handler only loads an atomic and calls write(2); SA_RESTART keeps the watching
        // thread's read going.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigterm as extern "C" fn(c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            let failure = os_failure("handle SIGTERM");
            watch.restore();
            return Err(failure);
        }
        Ok(Some(watch))
    }

    /// The watching thread: takes SIGTERM; on it, stops accepting; on DONE (or a broken pipe), ends.
    fn stop_on_term(&self, worker: &sticky_worker) {
        // SAFETY: unblocks SIGTERM for this thread only, from a valid set.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &sigterm_set(), std::ptr::null_mut()) };
        let mut byte = [DONE];
        loop {
            // SAFETY: reads one byte into a live buffer from an fd this watch owns.
            let got = unsafe { libc::read(self.read.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
            if got < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if got != 1 || byte[0] != TERM {
                return;
            }
            // A master that is gone, or an error now, leaves nothing to do: `accept` reports it.
            let _ = worker.inner().stop_accepting();
        }
    }

    /// `serve` returned: a later SIGTERM does nothing (the handler stays, with no pipe), and the watching
    /// thread ends.
    fn finish(&self) {
        TERM_PIPE.store(-1, Ordering::SeqCst);
        // SAFETY: writes one byte from a live buffer to an fd this watch owns.
        unsafe { libc::write(self.write.as_raw_fd(), [DONE].as_ptr().cast(), 1) };
    }

    /// Gives the `serve` thread its signal mask back (after the watching thread has ended), and closes the pipe.
    fn restore(self) {
        TERM_PIPE.store(-1, Ordering::SeqCst);
        // SAFETY: sets this thread's mask to the one saved in `install` on this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.mask, std::ptr::null_mut()) };
    }
}

fn os_failure(context: &str) -> Failure {
    let error = std::io::Error::last_os_error();
    Failure { code: STICKY_EIO, message: format!("{context}: {error}"), os_error: error.raw_os_error().unwrap_or(0) }
}

/// Master role: bind, then run on a current-thread runtime in the calling thread. Workers get
/// PR_SET_PDEATHSIG tied to the spawning thread, and this thread lives exactly as long as the master.
/// Master role of `sticky_run*`: with `STICKY_CLUSTER_READY_FD` set, the binary's `--ready-fd` lines go
/// to that fd (the program a driver started is the master, as the binary would be).
fn run_master(config: Result<Config, Failure>, on_hangup: OnHangup) -> Result<c_int, Failure> {
    let ready = ReadyFd::from_env().map_err(|reason| Failure::new(STICKY_ECONFIG, reason))?;
    let bound = config.and_then(|config| {
        sticky_cluster::logging::init(&config.prefix, config.debug);
        Ok((master::bind(&config)?, config))
    });
    match bound {
        Ok((listener, config)) => cluster::run_master(config, listener, Requests::Signals(on_hangup), ready.as_ref()),
        Err(failure) => {
            if let Some(ready) = &ready {
                ready.error(&failure.message);
            }
            Err(failure)
        }
    }
}

/// What SIGHUP means to a master that `sticky_run*` runs.
pub(crate) enum OnHangup {
    /// `sticky_run`: the options are the program's, in memory; there is nothing to read again.
    Nothing,
    /// `sticky_run_config`: read the file again and apply it; a bad one changes nothing.
    ReadFile(String),
}

impl OnHangup {
    fn reload(&self) -> Option<Config> {
        match self {
            OnHangup::Nothing => {
                warn!(
                    "SIGHUP: sticky_run keeps its options in memory, there is nothing to reload (a C program reloads \
                     with sticky_cluster_start and sticky_cluster_reload)"
                );
                None
            }
            OnHangup::ReadFile(path) => match config_from_file(path) {
                Ok(config) => {
                    info!("SIGHUP: reloading {path}");
                    Some(config)
                }
                Err(failure) => {
                    error!("reload refused, the cluster keeps its configuration: {}", failure.message);
                    None
                }
            },
        }
    }
}

/// SIGTERM and SIGINT as shutdown requests (the first graceful, the next hard), SIGHUP as `on_hangup` says
/// (core's one signal loop; SIGUSR2 is left alone: an embedding cannot upgrade in place). Must run inside
/// the master's runtime; the handlers stay installed afterwards.
pub(crate) fn forward_signals(on_hangup: OnHangup) -> sticky_cluster::Result<UnboundedReceiver<Stop>> {
    sticky_cluster::signals::forward(move || on_hangup.reload(), None)
}
