//! Error codes, their descriptions, the thread-local last error, and the panic boundary every
//! exported function runs inside, so no Rust panic ever unwinds into C.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const STICKY_OK: c_int = 0;
/// An argument is invalid: a NULL pointer where one is required, or a string that is not UTF-8.
pub const STICKY_EINVAL: c_int = 1;
/// This process was not started as a sticky-cluster worker (no `STICKY_CLUSTER_FD` or
/// `STICKY_CLUSTER_SOCKET`), or the variable names something that is not a worker channel.
pub const STICKY_ENOTWORKER: c_int = 2;
/// The worker fd is non-blocking and no connection is waiting: wait for it to be readable again.
pub const STICKY_EAGAIN: c_int = 3;
/// The master asked this worker to drain: finish the connections in hand and return or exit.
pub const STICKY_ESHUTDOWN: c_int = 4;
/// The channel to the master is closed (the master is gone, or it sent its last connection to a worker
/// that stopped accepting): exit.
pub const STICKY_ECLOSED: c_int = 5;
/// The master sent something this library does not understand (a version mismatch or a bug).
pub const STICKY_EPROTOCOL: c_int = 6;
/// The configuration is invalid, or the YAML file cannot be read; the last error names the field.
pub const STICKY_ECONFIG: c_int = 7;
/// The master cannot listen on the configured address (`sticky_last_os_error()` gives e.g. `EADDRINUSE`).
pub const STICKY_ELISTEN: c_int = 8;
/// A worker process could not be started.
pub const STICKY_ESPAWN: c_int = 9;
/// The master's attach socket refused this worker or could not be reached.
pub const STICKY_EATTACH: c_int = 10;
/// Any other operating-system error; `sticky_last_os_error()` gives the errno.
pub const STICKY_EIO: c_int = 11;
/// The cluster ended with a hard shutdown: some workers were killed (a second signal, or
/// `hard_shutdown_delay` ran out).
pub const STICKY_EHARD: c_int = 12;
/// An internal error (a bug in sticky-cluster) was caught at the boundary; the process may go on.
pub const STICKY_EINTERNAL: c_int = 13;

/// A failure on its way to C: the code to return and the message for `sticky_last_error_message`.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) code: c_int,
    pub(crate) message: String,
    pub(crate) os_error: i32,
}

impl Failure {
    /// A failure with no operating-system error behind it.
    pub(crate) fn new(code: c_int, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into(), os_error: 0 }
    }

    /// `STICKY_EINVAL` naming the argument that was NULL.
    pub(crate) fn null(argument: &str) -> Failure {
        Failure::new(STICKY_EINVAL, format!("{argument} must not be NULL"))
    }
}

impl From<sticky_cluster::Error> for Failure {
    fn from(error: sticky_cluster::Error) -> Failure {
        use sticky_cluster::Error;
        let message = error.to_string();
        let (code, os_error) = match &error {
            Error::ConfigRead { source, .. } => (STICKY_ECONFIG, source.raw_os_error()),
            Error::Config(_) => (STICKY_ECONFIG, None),
            Error::Listen { source, .. } => (STICKY_ELISTEN, source.raw_os_error()),
            Error::Spawn { source, .. } => (STICKY_ESPAWN, source.raw_os_error()),
            Error::Environment(_) => (STICKY_ENOTWORKER, None),
            Error::Attach { .. } => (STICKY_EATTACH, None),
            Error::Protocol(_) => (STICKY_EPROTOCOL, None),
            Error::ChannelClosed => (STICKY_ECLOSED, None),
            Error::Shutdown => (STICKY_ESHUTDOWN, None),
            Error::WouldBlock => (STICKY_EAGAIN, Some(libc::EAGAIN)),
            Error::Io { source, .. } => (STICKY_EIO, source.raw_os_error()),
        };
        Failure { code, message, os_error: os_error.unwrap_or(0) }
    }
}

thread_local! {
    static LAST_MESSAGE: RefCell<Option<CString>> = const { RefCell::new(None) };
    static LAST_OS_ERROR: Cell<i32> = const { Cell::new(0) };
}

fn remember(failure: &Failure) {
    // Interior NULs cannot cross as a C string; a message never needs them.
    let text = CString::new(failure.message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_MESSAGE.try_with(|last| *last.borrow_mut() = Some(text));
    let _ = LAST_OS_ERROR.try_with(|last| last.set(failure.os_error));
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with no message".into()
    }
}

/// Runs an exported function's body: a [`Failure`] is remembered for `sticky_last_error_message`
/// and turned into `on_failure(code)`, and a panic becomes `STICKY_EINTERNAL` instead of unwinding into C.
pub(crate) fn boundary<T>(on_failure: impl Fn(c_int) -> T, body: impl FnOnce() -> Result<T, Failure>) -> T {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return value,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            STICKY_EINTERNAL,
            format!("internal error (a bug in sticky-cluster): {}", panic_text(payload.as_ref())),
        ),
    };
    // Remembering allocates; even that must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(|| remember(&failure)));
    on_failure(failure.code)
}

/// Reads a C string argument as UTF-8; `what` names it in the error.
///
/// # Safety
/// `text` must be NULL or point to a NUL-terminated string that outlives the returned reference.
pub(crate) unsafe fn utf8_argument<'a>(text: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if text.is_null() {
        return Err(Failure::null(what));
    }
    CStr::from_ptr(text).to_str().map_err(|_| Failure::new(STICKY_EINVAL, format!("{what} is not UTF-8")))
}

sticky_fn! {
    /// Describes an error code in one short English sentence.
    ///
    /// Returns a pointer to a static string (never NULL, never to be freed); an unknown code gives
    /// "unknown sticky-cluster error code". Thread-safe.
    pub fn sticky_strerror(code: c_int) -> *const c_char {
        let text: &'static CStr = match code {
            STICKY_OK => c"success",
            STICKY_EINVAL => c"invalid argument (NULL pointer or non-UTF-8 string)",
            STICKY_ENOTWORKER => c"not a sticky-cluster worker (start this program through sticky-cluster)",
            STICKY_EAGAIN => c"no connection is waiting (the worker fd is non-blocking)",
            STICKY_ESHUTDOWN => c"the master is shutting down: drain and exit",
            STICKY_ECLOSED => c"the master closed the channel (or sent its last connection): exit",
            STICKY_EPROTOCOL => c"channel protocol error",
            STICKY_ECONFIG => c"invalid configuration",
            STICKY_ELISTEN => c"cannot listen on the configured address",
            STICKY_ESPAWN => c"cannot start a worker process",
            STICKY_EATTACH => c"cannot attach to the master's socket",
            STICKY_EIO => c"operating-system error",
            STICKY_EHARD => c"hard shutdown: workers were killed",
            STICKY_EINTERNAL => c"internal error in sticky-cluster",
            _ => c"unknown sticky-cluster error code",
        };
        Ok(text.as_ptr())
    }
}

sticky_fn! {
    /// The message of the most recent failed sticky_ call on the calling thread, naming what went
    /// wrong (the variable, the file and line, the address), or "" when no call has failed yet.
    ///
    /// The string belongs to the library and stays valid until the next failing sticky_ call on the
    /// same thread; copy it to keep it. Successful calls leave it unchanged (like errno). Thread-safe:
    /// each thread has its own.
    pub fn sticky_last_error_message() -> *const c_char {
        let last = LAST_MESSAGE.try_with(|last| last.borrow().as_ref().map(|text| text.as_ptr()));
        Ok(last.ok().flatten().unwrap_or(c"".as_ptr()))
    }
}

sticky_fn! {
    /// The operating-system errno behind the most recent failed sticky_ call on the calling thread
    /// (for example `EADDRINUSE` after `STICKY_ELISTEN`), or 0 when there was none. Thread-safe.
    pub fn sticky_last_os_error() -> c_int {
        Ok(LAST_OS_ERROR.try_with(Cell::get).unwrap_or(0))
    } ?= 0
}
