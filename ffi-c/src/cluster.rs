//! The master as a handle, for an embedding that owns its signals: `sticky_cluster_start` runs the master on
//! a thread of its own and returns once it listens; `_reload`, `_stop` and `_wait` reach it from any thread.

use std::ffi::{c_char, c_int};
use std::sync::Mutex;
use std::thread::JoinHandle;

use ::sticky_cluster::config::Config;
use ::sticky_cluster::master::{self, Listener, Stop};
use ::sticky_cluster::ready::ReadyFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{
    utf8_argument, Failure, STICKY_ECLOSED, STICKY_ECONFIG, STICKY_EHARD, STICKY_EINTERNAL, STICKY_EINVAL, STICKY_OK,
};
use crate::options::{config_from_file, config_from_options, sticky_options};
use crate::run::{forward_signals, in_worker_environment, OnHangup};

/// A running cluster started by `sticky_cluster_start`: the master's thread and the way to reach it.
///
/// Opaque: released by `sticky_cluster_free`. `reload`, `stop`, `port` and `wait` may be called from any
/// thread, at the same time.
pub struct sticky_cluster {
    requests: UnboundedSender<Stop>,
    port: u16,
    /// The master's thread until a `wait` joins it, then its outcome for later calls.
    master: Mutex<MasterThread>,
}

struct MasterThread {
    thread: Option<JoinHandle<Result<c_int, Failure>>>,
    outcome: Option<Result<c_int, Failure>>,
}

/// Borrows the cluster behind a C pointer, or fails with `STICKY_EINVAL` for NULL.
///
/// # Safety
/// `cluster` must be NULL or a live handle from `sticky_cluster_start`.
unsafe fn cluster_ref<'a>(cluster: *const sticky_cluster) -> Result<&'a sticky_cluster, Failure> {
    cluster.as_ref().ok_or_else(|| Failure::null("cluster"))
}

impl sticky_cluster {
    /// Binds at once (a listen error is the caller's), then runs the master on its own thread.
    fn start(config: Config) -> Result<sticky_cluster, Failure> {
        if in_worker_environment() {
            return Err(Failure::new(
                STICKY_EINVAL,
                "this process is a sticky-cluster worker: call sticky_run or sticky_worker_open here, not \
                 sticky_cluster_start",
            ));
        }
        ::sticky_cluster::logging::init(&config.prefix, config.debug);
        let ready = ReadyFd::from_env().map_err(|reason| Failure::new(STICKY_ECONFIG, reason))?;
        let listener = master::bind(&config).inspect_err(|error| {
            if let Some(ready) = &ready {
                ready.error(error);
            }
        })?;
        let port =
            listener.local_addr().map_err(|e| ::sticky_cluster::Error::io("read the listener address", e))?.port();
        let (requests, received) = unbounded_channel();
        // One thread for the master's whole life: workers' PR_SET_PDEATHSIG is tied to the spawning thread.
        let thread = std::thread::Builder::new()
            .name("sticky-cluster-master".into())
            .spawn(move || run_master(config, listener, Requests::Handle(received), ready.as_ref()))
            .map_err(|e| ::sticky_cluster::Error::io("start the master thread", e))?;
        Ok(sticky_cluster { requests, port, master: Mutex::new(MasterThread { thread: Some(thread), outcome: None }) })
    }

    fn send(&self, request: Stop) -> Result<c_int, Failure> {
        self.requests.send(request).map_err(|_| Failure::new(STICKY_ECLOSED, "the cluster has already stopped"))?;
        Ok(STICKY_OK)
    }

    /// Joins the master once; every call answers its outcome.
    fn wait(&self) -> Result<c_int, Failure> {
        let mut master = self.master.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(thread) = master.thread.take() {
            let joined = thread.join().unwrap_or_else(|_| {
                Err(Failure::new(
                    STICKY_EINTERNAL,
                    "internal error (a bug in sticky-cluster): the master thread panicked",
                ))
            });
            master.outcome = Some(joined);
        }
        master.outcome.clone().unwrap_or_else(|| Err(Failure::new(STICKY_EINTERNAL, "the master thread was lost")))
    }
}

/// Where a master's requests come from: a handle's channel, or `sticky_run`'s signal handlers.
pub(crate) enum Requests {
    /// `sticky_cluster_*` calls, through the handle.
    Handle(UnboundedReceiver<Stop>),
    /// SIGTERM, SIGINT and SIGHUP, as `sticky_run` and `sticky_run_config` answer them.
    Signals(OnHangup),
}

/// Runs the master on the calling thread's own current-thread runtime until it stops, writing the
/// `listening` and then the `stopped` (or `error`) line to `ready` when there is one.
pub(crate) fn run_master(
    config: Config,
    listener: Listener,
    requests: Requests,
    ready: Option<&ReadyFd>,
) -> Result<c_int, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ::sticky_cluster::Error::io("start the master's runtime", e));
    let outcome = runtime.and_then(|runtime| {
        runtime.block_on(async move {
            let requests = match requests {
                Requests::Handle(received) => received,
                // Installed inside the runtime: tokio's signal handlers need its context.
                Requests::Signals(on_hangup) => forward_signals(on_hangup)?,
            };
            let listening = |at: &master::Listening| {
                if let Some(ready) = ready {
                    ready.listening(at);
                }
            };
            master::run_reporting(config, listener, requests, listening).await
        })
    });
    match (&outcome, ready) {
        (Ok(outcome), Some(ready)) => ready.stopped(outcome),
        (Err(error), Some(ready)) => ready.error(error),
        (_, None) => {}
    }
    let outcome = outcome?;
    if outcome.graceful {
        Ok(STICKY_OK)
    } else {
        Err(Failure::new(STICKY_EHARD, "hard shutdown: some workers did not exit in time and were killed"))
    }
}

/// Writes a new handle to `out`.
///
/// # Safety
/// `out` must be NULL or writable.
unsafe fn hand_out(
    out: *mut *mut sticky_cluster,
    config: impl FnOnce() -> Result<Config, Failure>,
) -> Result<c_int, Failure> {
    if out.is_null() {
        return Err(Failure::null("out"));
    }
    let cluster = sticky_cluster::start(config()?)?;
    *out = Box::into_raw(Box::new(cluster));
    Ok(STICKY_OK)
}

sticky_fn! {
    /// Starts a cluster's master on a thread of its own and returns as soon as it listens: the handle for an
    /// embedding that keeps its own main loop and its own signal handling (see `sticky_cluster_reload`).
    ///
    /// Workers are spawned as `opts` says (NULL: the defaults; `worker_command` NULL: copies of this
    /// executable, which then find themselves in a worker environment: call `sticky_run` or
    /// `sticky_worker_open` there, see `sticky_in_worker`). Installs no signal handler: SIGTERM, SIGINT and
    /// SIGHUP are the program's (call `sticky_cluster_stop` and `sticky_cluster_reload`). Block the signals
    /// you `sigwait` for before this call, in every thread: the master's thread inherits the mask (workers
    /// start with an empty one).
    ///
    /// On success writes a new handle to `*out` (release it with `sticky_cluster_free`) and returns
    /// `STICKY_OK`. Errors, with nothing started: `STICKY_EINVAL` (out is NULL, or this process is a
    /// worker), `STICKY_ECONFIG` (the last error names the field), `STICKY_ELISTEN`, `STICKY_EIO`. A worker
    /// that cannot be started later is logged and retried, as by `sticky_run`. Workers are tied to the
    /// master's thread: stop and wait for the cluster before the program exits, or they are killed with it.
    /// `STICKY_CLUSTER_READY_FD` is honoured as by `sticky_run` (the first cluster started takes it).
    ///
    /// # Safety
    /// `opts` must be NULL or an initialised `sticky_options` whose strings and arrays are valid during
    /// the call; `out` must be NULL or point to writable memory for one pointer.
    pub unsafe fn sticky_cluster_start(opts: *const sticky_options, out: *mut *mut sticky_cluster) -> c_int {
        hand_out(out, || crate::options::config_of(opts))
    }
}

sticky_fn! {
    /// `sticky_cluster_start` with the options of a YAML file (the `sticky-cluster --config` format); without a
    /// `worker.command` there, workers are copies of this executable. A file that cannot be read or is
    /// invalid gives `STICKY_ECONFIG` with the file, line and key in the last error message.
    ///
    /// # Safety
    /// `yaml_path` must be NULL or a NUL-terminated string; `out` as for `sticky_cluster_start`.
    pub unsafe fn sticky_cluster_start_config(yaml_path: *const c_char, out: *mut *mut sticky_cluster) -> c_int {
        let path = utf8_argument(yaml_path, "yaml_path")?;
        hand_out(out, || config_from_file(path))
    }
}

sticky_fn! {
    /// The TCP port the cluster listens on (the one the kernel picked when `port` was 0), or -1 when
    /// `cluster` is NULL. Thread-safe.
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle.
    pub unsafe fn sticky_cluster_port(cluster: *const sticky_cluster) -> c_int {
        Ok(c_int::from(cluster_ref(cluster)?.port))
    } ?= -1
}

sticky_fn! {
    /// Hands the running cluster new options, as SIGHUP does for the `sticky-cluster` binary: the options are
    /// checked first, and invalid ones change nothing (`STICKY_ECONFIG`, the last error names the field).
    /// Valid ones are applied by the master: when the workers' command or environment changed, the workers are
    /// restarted one index at a time, each successor ready before the next index is replaced, with no
    /// connection lost (what waits for an index being replaced is queued for its successor). `port`, `host`,
    /// `concurrency`, `routing`, `backlog`, `debug` and `prefix` need a restart: the master keeps them and logs
    /// one line. `clientAddress`, `trusted_proxies` and the queue settings apply to new connections.
    ///
    /// Returns `STICKY_OK` once the master has the new options (it applies them in the background), or
    /// `STICKY_EINVAL` (NULL), `STICKY_ECONFIG`, `STICKY_ECLOSED` (the cluster has stopped). Thread-safe, but
    /// not async-signal-safe: never call it inside a signal handler (see the README: `sigwait` or a
    /// `signalfd` in a thread of your own).
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle; `opts` must be NULL or an initialised `sticky_options`
    /// whose strings and arrays are valid during the call.
    pub unsafe fn sticky_cluster_reload(cluster: *const sticky_cluster, opts: *const sticky_options) -> c_int {
        let cluster = cluster_ref(cluster)?;
        let opts = opts.as_ref().ok_or_else(|| Failure::null("opts"))?;
        cluster.send(Stop::Reload(Box::new(config_from_options(opts)?)))
    }
}

sticky_fn! {
    /// `sticky_cluster_reload` with the options of a YAML file, read again now: a file that cannot be read or
    /// is invalid changes nothing (`STICKY_ECONFIG`, with the file, line and key).
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle; `yaml_path` NULL or a NUL-terminated string.
    pub unsafe fn sticky_cluster_reload_config(cluster: *const sticky_cluster, yaml_path: *const c_char) -> c_int {
        let cluster = cluster_ref(cluster)?;
        let path = utf8_argument(yaml_path, "yaml_path")?;
        cluster.send(Stop::Reload(Box::new(config_from_file(path)?)))
    }
}

sticky_fn! {
    /// Asks the cluster to stop: gracefully (close the listener, let the workers drain, kill the rest after
    /// `hard_shutdown_delay_ms`), or at once when `hard` (what a second SIGTERM does to `sticky_run`). Returns
    /// at once (`sticky_cluster_wait` waits): `STICKY_OK`, `STICKY_EINVAL` (NULL) or `STICKY_ECLOSED` (it had
    /// already stopped). Thread-safe; not async-signal-safe.
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle.
    pub unsafe fn sticky_cluster_stop(cluster: *const sticky_cluster, hard: bool) -> c_int {
        cluster_ref(cluster)?.send(if hard { Stop::Hard } else { Stop::Graceful })
    }
}

sticky_fn! {
    /// Waits until the cluster has stopped (after `sticky_cluster_stop`, or on its own after a fatal error) and
    /// returns how: `STICKY_OK` (every worker exited in time), `STICKY_EHARD` (some were killed), or the
    /// error that stopped the master. Later calls return the same. Thread-safe.
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle.
    pub unsafe fn sticky_cluster_wait(cluster: *const sticky_cluster) -> c_int {
        cluster_ref(cluster)?.wait()
    }
}

sticky_fn! {
    /// Releases the handle. A cluster still running is stopped hard first and waited for (its workers are
    /// killed): stop it gracefully and wait before, to let them drain. NULL does nothing. No other call may use
    /// the handle during or after this one.
    ///
    /// # Safety
    /// `cluster` must be NULL or a live handle from `sticky_cluster_start` that no other thread is using.
    pub unsafe fn sticky_cluster_free(cluster: *mut sticky_cluster) {
        if cluster.is_null() {
            return Ok(());
        }
        let cluster = Box::from_raw(cluster);
        let _ = cluster.requests.send(Stop::Hard);
        let _ = cluster.wait();
        Ok(())
    }
}

sticky_fn! {
    /// Whether this process was started as a sticky-cluster worker (`STICKY_CLUSTER_FD` or
    /// `STICKY_CLUSTER_SOCKET` is set): a program that starts copies of itself with `sticky_cluster_start`
    /// asks this first, and serves as a worker (`sticky_run` or `sticky_worker_open`) when it is one.
    pub fn sticky_in_worker() -> bool {
        Ok(in_worker_environment())
    }
}
