//! `sticky_run`: one call that is the master in the process a user starts and the worker in the
//! copies it spawns, like `require('sticky-cluster')(start, options)`; `sticky_run_config` from YAML.

use std::ffi::{c_char, c_int, c_void};

use sticky_cluster::config::Config;
use sticky_cluster::master::{self, Stop};
use sticky_cluster::worker::{ENV_CHANNEL_FD, ENV_SOCKET};
use sticky_cluster::Worker;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tracing::{error, info, warn};

use crate::cluster::{self, Requests};
use crate::error::{utf8_argument, Failure, STICKY_EIO};
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
    ///
    /// Worker role: opens the worker (as `sticky_worker_open`), calls `serve(worker, user)`, closes the
    /// worker, and returns what `serve` returned (return `STICKY_OK` from `serve` for a clean exit);
    /// `STICKY_ENOTWORKER` or another code when the worker cannot be opened (then `serve` is not called).
    /// Before calling `serve` it sets SIGTERM to ignored when it still has its default action, so the
    /// master's shutdown arrives as `STICKY_ESHUTDOWN` instead of killing the worker mid-request
    /// (workers are still killed after `hard_shutdown_delay_ms`).
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
        run_master(config_of(opts)?, OnHangup::Nothing)
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
        run_master(config_from_file(path)?, OnHangup::ReadFile(path.to_string()))
    }
}

/// Whether this process was started as a worker (its channel or the master's socket is in the environment).
pub(crate) fn in_worker_environment() -> bool {
    std::env::var_os(ENV_CHANNEL_FD).is_some() || std::env::var_os(ENV_SOCKET).is_some()
}

/// Leaves a SIGTERM handler the program installed alone; only the default action (die at once) is
/// replaced, because the master's SIGTERM comes with the shutdown message that `accept` reports.
fn ignore_default_sigterm() -> Result<(), Failure> {
    // SAFETY: sigaction with a zeroed struct only reads the current disposition; SIG_IGN needs no handler.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut current) != 0 {
            return Err(os_failure("read the SIGTERM disposition"));
        }
        if current.sa_sigaction == libc::SIG_DFL {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            if libc::sigaction(libc::SIGTERM, &ignore, std::ptr::null_mut()) != 0 {
                return Err(os_failure("ignore SIGTERM"));
            }
        }
    }
    Ok(())
}

fn os_failure(context: &str) -> Failure {
    let error = std::io::Error::last_os_error();
    Failure { code: STICKY_EIO, message: format!("{context}: {error}"), os_error: error.raw_os_error().unwrap_or(0) }
}

/// Worker role: the handle lives exactly as long as the `serve` call.
fn run_worker(
    serve: unsafe extern "C" fn(*mut sticky_worker, *mut c_void) -> c_int,
    user: *mut c_void,
) -> Result<c_int, Failure> {
    ignore_default_sigterm()?;
    let worker = Box::into_raw(Box::new(sticky_worker::new(Worker::from_env()?)));
    // SAFETY: `worker` is a live handle until it is freed below; `serve` is the caller's C function.
    let answer = unsafe { serve(worker, user) };
    // SAFETY: created above by Box::into_raw; serve was told not to close it.
    drop(unsafe { Box::from_raw(worker) });
    Ok(answer)
}

/// Master role: bind, then run on a current-thread runtime in the calling thread. Workers get
/// PR_SET_PDEATHSIG tied to the spawning thread, and this thread lives exactly as long as the master.
fn run_master(config: Config, on_hangup: OnHangup) -> Result<c_int, Failure> {
    sticky_cluster::logging::init(&config.prefix, config.debug);
    let listener = master::bind(&config)?;
    cluster::run_master(config, listener, Requests::Signals(on_hangup))
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

/// SIGTERM and SIGINT as shutdown requests (the first graceful, the next hard), SIGHUP as `on_hangup` says.
/// Must run inside the master's runtime; the handlers stay installed afterwards.
pub(crate) fn forward_signals(on_hangup: OnHangup) -> sticky_cluster::Result<UnboundedReceiver<Stop>> {
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| sticky_cluster::Error::io(format!("install the {name} handler"), e))
    };
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = install(SignalKind::hangup(), "SIGHUP")?;
    let (requests, received) = unbounded_channel();
    tokio::spawn(async move {
        let mut stop_request = Stop::Graceful;
        loop {
            let request = tokio::select! {
                _ = terminate.recv() => std::mem::replace(&mut stop_request, Stop::Hard),
                _ = interrupt.recv() => std::mem::replace(&mut stop_request, Stop::Hard),
                _ = hangup.recv() => match on_hangup.reload() {
                    Some(config) => Stop::Reload(Box::new(config)),
                    None => continue,
                },
            };
            if requests.send(request).is_err() {
                return;
            }
        }
    });
    Ok(received)
}
