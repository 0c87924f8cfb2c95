//! `sticky_options`: the YAML file's fields in C types, their defaults (`sticky_options_init`), and their
//! translation into a core `Config`, which core validates (`Config::validate`) as it does the file.

use std::collections::BTreeMap;
use std::ffi::{c_char, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sticky_cluster::client_address::{Cidr, ClientAddressSource, TrustedProxies};
use sticky_cluster::config::{whole_millis, Config, Overrides, Routing, WorkerSource};

use crate::error::{utf8_argument, Failure, STICKY_ECONFIG};

/// Cluster options: the fields of the YAML file (see the project's README), in C types.
///
/// Always start from `sticky_options_init`, then change fields: a zeroed struct is not a valid
/// configuration. Strings and arrays are borrowed: they must stay valid during the call they are given
/// to only (`sticky_run`, `sticky_cluster_start`, `sticky_cluster_reload`). These options always spawn
/// workers; for attach mode (the YAML `workers:` section, workers started elsewhere dial a Unix socket)
/// use `sticky_run_config` or `sticky_cluster_start_config`.
#[repr(C)]
pub struct sticky_options {
    /// TCP port clients connect to; 0 picks a free one (`sticky_cluster_port` names it, and so does the
    /// `listening` line on `STICKY_CLUSTER_READY_FD` for `sticky_run`).
    /// Default 8080.
    pub port: u16,
    /// Address to listen on. Default "::" (dual-stack, like Node; falls back to 0.0.0.0 without IPv6).
    pub host: *const c_char,
    /// Number of workers, 1 to 1024. Default: the number of CPUs (at most 1024).
    pub concurrency: u32,
    /// Log every worker start/exit and every routed connection on stderr. Default false.
    pub debug: bool,
    /// Text in front of every log line. Default "sticky-cluster:".
    pub prefix: *const c_char,
    /// Milliseconds a graceful shutdown may take before the remaining workers are killed
    /// (YAML `hardShutdownDelay`), 0 to 2147483647 (Node's largest timer). Default 60000.
    pub hard_shutdown_delay_ms: u64,
    /// Extra worker environment: a NULL-terminated array of "KEY=VALUE" strings, or NULL for none;
    /// `{index}` in a value becomes the worker's index. Default NULL.
    pub env: *const *const c_char,
    /// Worker program and arguments (YAML `worker.command`), a NULL-terminated argv array, run without
    /// a shell. NULL (the default) runs copies of the current executable (`/proc/self/exe`) with the
    /// same arguments, which is what `sticky_run` is for.
    pub worker_command: *const *const c_char,
    /// Working directory of the workers (YAML `worker.cwd`); NULL (the default) keeps the master's.
    pub worker_cwd: *const c_char,
    /// Connections that may wait for one worker that is not ready yet (YAML `queue.limit`), at
    /// least 1. Default 1024.
    pub queue_limit: u32,
    /// Milliseconds a connection may wait for its worker before it goes to the next ready one
    /// (YAML `queue.maxWait`). Default 10000.
    pub queue_max_wait_ms: u64,
    /// Where the routing hash takes the client address from (YAML `clientAddress`): "peer" (the
    /// default; NULL means the same), "proxy-protocol" or "x-forwarded-for".
    pub client_address: *const c_char,
    /// Proxies whose headers are believed (YAML `trustedProxies`): a NULL-terminated array of addresses
    /// or CIDR blocks such as "10.0.0.0/8", or NULL for none. Required when `client_address` is not
    /// "peer". Default NULL.
    pub trusted_proxies: *const *const c_char,
    /// Who routes connections (YAML `routing`): "handoff" (the master hands each socket on) or "kernel"
    /// (each worker accepts from its own SO_REUSEPORT listener, a BPF program routes; `sticky_worker_fd`
    /// and `sticky_worker_accept` work unchanged). NULL or the default: "handoff".
    pub routing: *const c_char,
    /// Listen backlog of the client listener, of each worker's listener with `routing` "kernel" (YAML
    /// `backlog`), at least 1; the kernel caps it at `net.core.somaxconn`. Default 1024.
    pub backlog: u32,
}

sticky_fn! {
    /// Fills `opts` with the defaults (the same as an empty YAML file). NULL does nothing.
    /// The strings it stores are static. Thread-safe.
    ///
    /// # Safety
    /// `opts` must be NULL or point to writable memory for one `sticky_options`.
    pub unsafe fn sticky_options_init(opts: *mut sticky_options) {
        let Some(opts) = opts.as_mut() else {
            return Ok(());
        };
        let defaults = Config::default();
        *opts = sticky_options {
            port: defaults.port,
            host: DEFAULT_HOST.as_ptr(),
            concurrency: defaults.concurrency,
            debug: defaults.debug,
            prefix: DEFAULT_PREFIX.as_ptr(),
            hard_shutdown_delay_ms: whole_millis(defaults.hard_shutdown_delay),
            env: std::ptr::null(),
            worker_command: std::ptr::null(),
            worker_cwd: std::ptr::null(),
            queue_limit: u32::try_from(defaults.queue_limit).unwrap_or(u32::MAX),
            queue_max_wait_ms: whole_millis(defaults.queue_max_wait),
            client_address: c"peer".as_ptr(),
            trusted_proxies: std::ptr::null(),
            routing: c"handoff".as_ptr(),
            backlog: defaults.backlog,
        };
        Ok(())
    }
}

/// `defaults::HOST` and `defaults::PREFIX` as static C strings (a test checks they agree).
const DEFAULT_HOST: &std::ffi::CStr = c"::";
const DEFAULT_PREFIX: &std::ffi::CStr = c"sticky-cluster:";

/// The options of a NULL `opts`: the defaults.
pub(crate) fn default_options() -> sticky_options {
    let mut opts = std::mem::MaybeUninit::<sticky_options>::uninit();
    // SAFETY: sticky_options_init writes every field of a non-NULL pointer.
    unsafe {
        sticky_options_init(opts.as_mut_ptr());
        opts.assume_init()
    }
}

/// The configuration `opts` describes (NULL: the defaults), validated.
///
/// # Safety
/// `opts` must be NULL or point to an initialised `sticky_options` whose pointers are valid as documented.
pub(crate) unsafe fn config_of(opts: *const sticky_options) -> Result<Config, Failure> {
    match opts.as_ref() {
        Some(opts) => config_from_options(opts),
        None => config_from_options(&default_options()),
    }
}

/// The configuration of a YAML file (the `sticky-cluster --config` format), validated; without a
/// `worker.command`, workers are copies of this program.
pub(crate) fn config_from_file(path: &str) -> Result<Config, Failure> {
    let mut config = Config::from_file(Path::new(path))?;
    if let WorkerSource::Spawn { command, .. } = &mut config.workers {
        if command.is_empty() {
            *command = this_program()?;
        }
    }
    Ok(config.apply(Overrides::default(), path)?)
}

/// The command that starts this same program again: its resolved executable and its arguments.
pub(crate) fn this_program() -> Result<Vec<String>, Failure> {
    let executable =
        std::env::current_exe().map_err(|e| sticky_cluster::Error::io("find this executable (/proc/self/exe)", e))?;
    let mut arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    if std::env::args_os().next().is_none() {
        // Some C runtimes do not hand argv to a Rust library; the kernel still has it.
        let cmdline =
            std::fs::read("/proc/self/cmdline").map_err(|e| sticky_cluster::Error::io("read /proc/self/cmdline", e))?;
        // NUL-terminated arguments: the piece after the last NUL is empty and not an argument.
        let mut pieces: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
        pieces.pop();
        arguments = pieces.into_iter().skip(1).map(|arg| std::ffi::OsStr::from_bytes(arg).to_os_string()).collect();
    }
    std::iter::once(executable.into_os_string())
        .chain(arguments)
        .enumerate()
        .map(|(position, argument)| {
            argument.into_string().map_err(|_| {
                Failure::new(
                    STICKY_ECONFIG,
                    format!("argument {position} of this program is not UTF-8: the worker command must be"),
                )
            })
        })
        .collect()
}

/// Reads a NULL-terminated array of C strings; `what` names it in errors.
///
/// # Safety
/// `array` must be NULL or a NULL-terminated array of NUL-terminated strings.
unsafe fn string_array(array: *const *const c_char, what: &str) -> Result<Vec<String>, Failure> {
    let mut strings = Vec::new();
    if array.is_null() {
        return Ok(strings);
    }
    loop {
        let item = *array.add(strings.len());
        if item.is_null() {
            return Ok(strings);
        }
        let name = format!("{what}[{}]", strings.len());
        strings.push(utf8_argument(item, &name)?.to_string());
    }
}

fn config_failure(message: String) -> Failure {
    Failure::new(STICKY_ECONFIG, message)
}

/// Checks the options as the YAML loader checks the file, and builds the master's configuration.
///
/// # Safety
/// Every pointer in `opts` must be NULL or valid as documented on [`sticky_options`].
pub(crate) unsafe fn config_from_options(opts: &sticky_options) -> Result<Config, Failure> {
    const ORIGIN: &str = "sticky_options";
    let defaults = Config::default();
    let text_or = |text: *const c_char, what: &str, default: String| {
        if text.is_null() {
            Ok(default)
        } else {
            utf8_argument(text, &format!("{ORIGIN}.{what}")).map(str::to_string)
        }
    };
    let mut env = BTreeMap::new();
    for entry in string_array(opts.env, &format!("{ORIGIN}.env"))? {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                env.insert(key.to_string(), value.to_string());
            }
            _ => return Err(config_failure(format!("{ORIGIN}.env: {entry:?} is not KEY=VALUE"))),
        }
    }
    let mut command = string_array(opts.worker_command, &format!("{ORIGIN}.worker_command"))?;
    if opts.worker_command.is_null() {
        command = this_program()?;
    } else if command.first().is_none_or(|program| program.trim().is_empty()) {
        return Err(config_failure(format!(
            "{ORIGIN}.worker_command: give the program and its arguments, or NULL for this program"
        )));
    }
    let cwd = if opts.worker_cwd.is_null() {
        None
    } else {
        Some(PathBuf::from(utf8_argument(opts.worker_cwd, &format!("{ORIGIN}.worker_cwd"))?))
    };
    let client_address = match opts.client_address.is_null() {
        true => ClientAddressSource::Peer,
        false => utf8_argument(opts.client_address, &format!("{ORIGIN}.client_address"))?
            .parse()
            .map_err(|reason| config_failure(format!("{ORIGIN}.client_address: {reason}")))?,
    };
    let mut trusted_proxies = Vec::new();
    for (position, text) in string_array(opts.trusted_proxies, &format!("{ORIGIN}.trusted_proxies"))?.iter().enumerate()
    {
        let cidr = text
            .parse::<Cidr>()
            .map_err(|reason| config_failure(format!("{ORIGIN}.trusted_proxies[{position}]: {reason}")))?;
        trusted_proxies.push(cidr);
    }
    let routing = match text_or(opts.routing, "routing", "handoff".into())?.parse::<Routing>() {
        Ok(routing) => routing,
        Err(reason) => return Err(config_failure(format!("{ORIGIN}.routing: {reason}"))),
    };
    let config = Config {
        routing,
        backlog: opts.backlog,
        port: opts.port,
        host: text_or(opts.host, "host", defaults.host)?,
        concurrency: opts.concurrency,
        debug: opts.debug,
        prefix: text_or(opts.prefix, "prefix", defaults.prefix)?,
        hard_shutdown_delay: Duration::from_millis(opts.hard_shutdown_delay_ms),
        env,
        workers: WorkerSource::Spawn { command, cwd },
        queue_limit: opts.queue_limit as usize,
        queue_max_wait: Duration::from_millis(opts.queue_max_wait_ms),
        client_address,
        trusted_proxies: TrustedProxies(trusted_proxies),
        // Options the C struct leaves to the YAML file (sticky_run_config): metrics, headerWait.
        ..defaults
    };
    config.validate().map_err(|invalid| {
        config_failure(match c_field(invalid.key) {
            Some(field) => invalid.naming(&format!("{ORIGIN}.{field}")),
            None => format!("{ORIGIN}: {invalid}"),
        })
    })?;
    Ok(config)
}

/// The `sticky_options` field behind a YAML key, so that an error names what the C program set.
fn c_field(key: &str) -> Option<&'static str> {
    Some(match key {
        "concurrency" => "concurrency",
        "hardShutdownDelay" => "hard_shutdown_delay_ms",
        "backlog" => "backlog",
        "queue.limit" => "queue_limit",
        "queue.maxWait" => "queue_max_wait_ms",
        "clientAddress" => "client_address",
        "trustedProxies" => "trusted_proxies",
        "routing" => "routing",
        "worker.command" => "worker_command",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sticky_cluster::config::defaults;

    fn defaults() -> sticky_options {
        default_options()
    }

    #[test]
    fn the_static_default_strings_are_cores_defaults() {
        assert_eq!(DEFAULT_HOST.to_str(), Ok(defaults::HOST));
        assert_eq!(DEFAULT_PREFIX.to_str(), Ok(defaults::PREFIX));
    }

    #[test]
    fn default_options_match_an_empty_yaml_file() {
        // SAFETY: the defaults hold static strings and NULL arrays.
        let config = unsafe { config_from_options(&defaults()) }.unwrap();
        let from_yaml = Config::from_yaml("", "empty.yaml").unwrap();
        assert_eq!(config.port, from_yaml.port);
        assert_eq!(config.host, from_yaml.host);
        assert_eq!(config.prefix, from_yaml.prefix);
        assert_eq!(config.hard_shutdown_delay, from_yaml.hard_shutdown_delay);
        assert_eq!(config.queue_limit, from_yaml.queue_limit);
        assert_eq!(config.queue_max_wait, from_yaml.queue_max_wait);
        assert_eq!(config.backlog, from_yaml.backlog);
        let WorkerSource::Spawn { command, .. } = &config.workers else {
            panic!("spawn mode expected");
        };
        assert_eq!(Path::new(&command[0]), std::env::current_exe().unwrap());
    }

    #[test]
    fn env_entries_must_be_key_value() {
        let entries = [c"ROLE=web-{index}".as_ptr(), c"broken".as_ptr(), std::ptr::null()];
        let opts = sticky_options { env: entries.as_ptr(), ..defaults() };
        // SAFETY: entries is a NULL-terminated array of static strings.
        let failure = unsafe { config_from_options(&opts) }.unwrap_err();
        assert_eq!(failure.code, STICKY_ECONFIG);
        assert_eq!(failure.message, "sticky_options.env: \"broken\" is not KEY=VALUE");
        let entries = [c"ROLE=web-{index}".as_ptr(), std::ptr::null()];
        let opts = sticky_options { env: entries.as_ptr(), ..defaults() };
        // SAFETY: as above.
        let config = unsafe { config_from_options(&opts) }.unwrap();
        assert_eq!(config.env["ROLE"], "web-{index}");
    }

    #[test]
    fn client_address_needs_trusted_proxies_and_checks_them() {
        let opts = sticky_options { client_address: c"proxy-protocol".as_ptr(), ..defaults() };
        // SAFETY: static strings, NULL arrays.
        let failure = unsafe { config_from_options(&opts) }.unwrap_err();
        assert_eq!(failure.code, STICKY_ECONFIG);
        assert!(failure.message.starts_with("sticky_options.trusted_proxies is required"), "{}", failure.message);
        let proxies = [c"10.0.0.0/8".as_ptr(), c"2001:db8::/32".as_ptr(), std::ptr::null()];
        let opts = sticky_options { trusted_proxies: proxies.as_ptr(), ..opts };
        // SAFETY: a NULL-terminated array of static strings.
        let config = unsafe { config_from_options(&opts) }.unwrap();
        assert_eq!(config.client_address, ClientAddressSource::ProxyProtocol);
        assert!(config.trusted_proxies.contains("::ffff:10.1.2.3".parse().unwrap()));
        let bad = [c"10.1.2.3/8".as_ptr(), std::ptr::null()];
        let opts = sticky_options { trusted_proxies: bad.as_ptr(), ..opts };
        // SAFETY: as above.
        let failure = unsafe { config_from_options(&opts) }.unwrap_err();
        assert!(failure.message.starts_with("sticky_options.trusted_proxies[0]: "), "{}", failure.message);
        let opts = sticky_options { client_address: c"nginx".as_ptr(), ..defaults() };
        // SAFETY: as above.
        let failure = unsafe { config_from_options(&opts) }.unwrap_err();
        assert!(failure.message.starts_with("sticky_options.client_address: \"nginx\" is not one of"));
    }

    #[test]
    fn backlog_is_taken_and_zero_is_refused() {
        let opts = sticky_options { backlog: 64, ..defaults() };
        // SAFETY: defaults hold static strings.
        assert_eq!(unsafe { config_from_options(&opts) }.unwrap().backlog, 64);
        let opts = sticky_options { backlog: 0, ..defaults() };
        // SAFETY: as above.
        let failure = unsafe { config_from_options(&opts) }.unwrap_err();
        assert_eq!(failure.code, STICKY_ECONFIG);
        assert_eq!(failure.message, "sticky_options.backlog: must be at least 1, got 0");
    }

    #[test]
    fn concurrency_and_delay_out_of_bounds_are_refused_naming_the_field() {
        for (opts, message) in [
            (sticky_options { concurrency: 0, ..defaults() }, "sticky_options.concurrency: must be at least 1, got 0"),
            (
                sticky_options { concurrency: 4_000_000_000, ..defaults() },
                "sticky_options.concurrency: must be at most 1024, got 4000000000",
            ),
            (
                sticky_options { hard_shutdown_delay_ms: u64::MAX, ..defaults() },
                "sticky_options.hard_shutdown_delay_ms: must be at most 2147483647, got 18446744073709551615",
            ),
        ] {
            // SAFETY: defaults hold static strings.
            let failure = unsafe { config_from_options(&opts) }.unwrap_err();
            assert_eq!((failure.code, failure.message.as_str()), (STICKY_ECONFIG, message));
        }
        let opts = sticky_options { concurrency: 1024, hard_shutdown_delay_ms: 2_147_483_647, ..defaults() };
        // SAFETY: as above.
        assert!(unsafe { config_from_options(&opts) }.is_ok());
    }
}
