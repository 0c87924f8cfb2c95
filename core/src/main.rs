//! The `sticky-cluster` binary: configuration from YAML and flags, signals to shutdown requests,
//! errors to one `error: ...` line and a documented exit status.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sticky_cluster::activation::WorkerProtocol;
use sticky_cluster::client_address::Cidr;
use sticky_cluster::config::{parse_duration, Config, Overrides, Routing};
use sticky_cluster::master::{self, Stop};
use sticky_cluster::ready::{self, ReadyFd};
use sticky_cluster::{signals, upgrade, Error};

/// Exit statuses: 0 clean shutdown, 1 runtime failure or hard shutdown, 2 bad configuration or usage.
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

/// Sticky-session TCP router: every client address always reaches the same worker process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sticky-cluster",
    version,
    about,
    after_help = "Exit status: 0 after a graceful shutdown, \
1 on a runtime error or a hard shutdown, 2 for a bad configuration or command line."
)]
struct Cli {
    /// YAML configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TCP port for clients (overrides the file; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on (default `::`, dual-stack).
    #[arg(long)]
    host: Option<String>,
    /// Number of workers.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Log worker starts and exits and every routed connection.
    #[arg(long)]
    debug: bool,
    /// Graceful shutdown limit: milliseconds or a duration such as `60s`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    hard_shutdown_delay: Option<Duration>,
    /// A proxy whose PROXY or X-Forwarded-For headers are believed: an address or CIDR block such as
    /// `10.0.0.0/8`; repeat it for several. Replaces the file's `trustedProxies`.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_cidr)]
    trusted_proxies: Vec<Cidr>,
    /// Who routes: `handoff` (the master, default) or `kernel` (a SO_REUSEPORT group and a BPF program).
    #[arg(long, value_name = "MODE")]
    routing: Option<Routing>,
    /// Whether workers speak the channel protocol: `channel` (default) or `none` (any server accepting
    /// on the listener it inherits as fd 3; needs `--routing kernel`).
    #[arg(long, value_name = "PROTOCOL")]
    protocol: Option<WorkerProtocol>,
    /// Write one JSON line to this fd (inherited from the caller, kept open across an upgrade in place)
    /// when the master listens, after an upgrade and when it stops: see the README's "Ready fd".
    #[arg(long, value_name = "FD", env = ready::ENV_READY_FD, value_parser = ready::parse_fd)]
    ready_fd: Option<RawFd>,
    /// Validate the configuration, print the effective one, and exit (the ready fd is not looked at).
    #[arg(long)]
    check: bool,
    /// Worker command and its arguments (after `--`), run once per index.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    // An upgrade re-executes the binary at this path with these arguments (read before anything changes).
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let args: Vec<OsString> = std::env::args_os().collect();
    let inherited = match upgrade::inherited() {
        Ok(inherited) => inherited,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let cli = Cli::parse();
    let (config, origin) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            if let Some(inherited) = inherited {
                return roll_back(inherited, &error.to_string());
            }
            // A driver waiting on the ready fd hears why, when there is one to tell.
            if let Some(fd) = cli.ready_fd.filter(|&fd| !cli.check && ready::check(fd).is_ok()) {
                if let Ok(ready) = ReadyFd::take(fd) {
                    ready.error(&error);
                }
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check {
        print!("{}", config.to_yaml());
        println!("{}", upgrade::check_line());
        if config.routing == Routing::Kernel {
            match kernel_program(&config) {
                Ok(line) => println!("{line}"),
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        eprintln!("{origin}: configuration is valid");
        return ExitCode::SUCCESS;
    }
    sticky_cluster::logging::init(&config.prefix, config.debug);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let upgrade = Upgrade { binary, args };
    let arrival = match &inherited {
        None => Arrival::Started,
        Some(inherited) if inherited.can_roll_back() => Arrival::Upgraded,
        Some(_) => Arrival::RolledBack,
    };
    // Checked before the take-over, so that an image that cannot use it still goes back with it intact.
    let ready_fd = match ready_fd_number(&cli, inherited.is_some()) {
        Ok(fd) => fd,
        Err(reason) => {
            eprintln!("error: {reason}");
            return match inherited {
                Some(inherited) => roll_back(inherited, &reason),
                None => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let resumed = match inherited.map(|inherited| take_over(&config, inherited)) {
        Some(Ok(checked)) => Some(checked),
        Some(Err(exit)) => return exit,
        None => None,
    };
    // Read now: workers must not find a variable naming an fd they do not have.
    std::env::remove_var(ready::ENV_READY_FD);
    std::env::remove_var(ready::ENV_UPGRADE_READY_FD);
    let ready = match ready_fd.map(ReadyFd::take).transpose() {
        Ok(ready) => ready,
        Err(reason) if resumed.is_some() => {
            // The cluster is this image's now: it goes on without the lines rather than stop.
            tracing::error!("the ready fd {}: {reason}; no lines are written", ready_fd.unwrap_or(-1));
            None
        }
        Err(reason) => {
            eprintln!("error: --ready-fd {}: {reason}", ready_fd.unwrap_or(-1));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if ready.is_some() {
        // The lines name this executable's build: hashed now, before the listener is bound, not on the
        // master's thread with clients waiting (an upgraded image was told it by the state's check).
        upgrade::build_id();
    }
    match runtime.block_on(serve(config, cli, upgrade, resumed, ReadyLines { fd: ready.clone(), arrival })) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILURE),
        Err(error) => {
            eprintln!("error: {error}");
            if let Some(ready) = &ready {
                ready.error(&error);
            }
            ExitCode::from(if matches!(error, Error::Config(_)) { EXIT_CONFIG } else { EXIT_FAILURE })
        }
    }
}

/// How this image came to run the cluster, which its first ready line says.
#[derive(Debug, Clone, Copy)]
enum Arrival {
    /// Started by its caller: `listening`.
    Started,
    /// Executed by the previous image on SIGUSR2: `upgraded`.
    Upgraded,
    /// The previous binary again, after the new one could not take over: `rolled_back`.
    RolledBack,
}

/// The ready fd, if any, and which line announces this image.
struct ReadyLines {
    fd: Option<ReadyFd>,
    arrival: Arrival,
}

impl ReadyLines {
    /// The first line: where the cluster listens, as this image's arrival calls it.
    fn listening(&self, at: &master::Listening) {
        let Some(fd) = &self.fd else { return };
        let at = ready::Listening::of(at);
        fd.write(match self.arrival {
            Arrival::Started => ready::Event::Listening(at),
            Arrival::Upgraded => ready::Event::Upgraded(at),
            Arrival::RolledBack => ready::Event::RolledBack(at),
        });
    }
}

/// The ready fd's number, checked: an upgraded image's is the one the previous image passed on (the
/// caller's number on the command line may be closed by then); a fresh start's is `--ready-fd`.
fn ready_fd_number(cli: &Cli, upgraded: bool) -> Result<Option<RawFd>, String> {
    if upgraded {
        let Some(text) = std::env::var_os(ready::ENV_UPGRADE_READY_FD) else { return Ok(None) };
        let text = text.to_string_lossy();
        let fd = ready::parse_fd(&text).map_err(|reason| format!("{}: {reason}", ready::ENV_UPGRADE_READY_FD))?;
        return ready::check(fd).map(|()| Some(fd)).map_err(|reason| format!("the ready fd {fd}: {reason}"));
    }
    match cli.ready_fd {
        Some(fd) => ready::check(fd).map(|()| Some(fd)).map_err(|reason| format!("--ready-fd {fd}: {reason}")),
        None => Ok(None),
    }
}

/// How this master re-executes itself on SIGUSR2.
struct Upgrade {
    binary: PathBuf,
    args: Vec<OsString>,
}

/// This image is an upgrade: checks the state it inherited against the configuration, or goes back to
/// the binary that handed it over (nothing lost: it takes the same state back).
fn take_over(config: &Config, inherited: upgrade::Inherited) -> Result<master::Checked, ExitCode> {
    let fault = if inherited.can_roll_back() { upgrade::fault() } else { None };
    if let Some(ms) = fault.as_deref().and_then(|fault| fault.strip_prefix("pause ")) {
        std::thread::sleep(Duration::from_millis(ms.trim().parse().unwrap_or(0)));
    }
    let checked = match fault.as_deref() {
        Some("fail") => Err("the upgrade fault file says fail".to_string()),
        _ => master::check_upgrade_state(config, &inherited.state, !inherited.can_roll_back()),
    };
    checked.map_err(|reason| roll_back(inherited, &reason))
}

/// Executes the previous binary again with the state it handed over; exits only when even that failed.
fn roll_back(inherited: upgrade::Inherited, reason: &str) -> ExitCode {
    if !inherited.can_roll_back() {
        tracing::error!("cannot take over the cluster after rolling back: {reason}");
        eprintln!("error: cannot take over the cluster after rolling back: {reason}");
        return ExitCode::from(EXIT_FAILURE);
    }
    tracing::error!("upgrade failed: {reason}; going back to the previous binary");
    eprintln!("sticky-cluster: error upgrade failed: {reason}; going back to the previous binary");
    let error = inherited.roll_back();
    eprintln!("error: cannot go back to the previous binary: {error}");
    ExitCode::from(EXIT_FAILURE)
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    text.parse()
}

/// Re-reads the configuration for SIGHUP; a bad file is logged as one line and changes nothing.
fn reload(cli: &Cli) -> Option<Config> {
    if cli.config.is_none() {
        tracing::warn!("SIGHUP: there is no configuration file to reload");
        return None;
    }
    match load(cli) {
        Ok((config, origin)) => {
            tracing::info!("SIGHUP: reloading {origin}");
            Some(config)
        }
        Err(error) => {
            tracing::error!("reload refused, the cluster keeps its configuration: {error}");
            None
        }
    }
}

fn load(cli: &Cli) -> sticky_cluster::Result<(Config, String)> {
    let (config, origin) = match &cli.config {
        Some(path) => (Config::from_file(path)?, path.display().to_string()),
        None => (Config::default(), "command line".to_string()),
    };
    let overrides = Overrides {
        port: cli.port,
        host: cli.host.clone(),
        concurrency: cli.concurrency,
        debug: cli.debug,
        hard_shutdown_delay: cli.hard_shutdown_delay,
        command: cli.command.clone(),
        trusted_proxies: cli.trusted_proxies.clone(),
        routing: cli.routing,
        protocol: cli.protocol,
    };
    Ok((config.apply(overrides, &origin)?, origin))
}

/// `# kernel program: N instructions; ...`: what the kernel will run, generated as the master would.
fn kernel_program(config: &Config) -> sticky_cluster::Result<String> {
    use sticky_cluster::reuseport::{interfaces, program, text_form};
    let address =
        config.listen_addresses()?.into_iter().next().ok_or_else(|| Error::Config("host: no address".into()))?;
    let form = text_form(address);
    let interfaces = if form == program::TextForm::Ipv6 { interfaces() } else { Vec::new() };
    let program = program::generate(form, config.concurrency, &interfaces).map_err(Error::Config)?;
    Ok(format!("# kernel program: {} instructions; {}", program.instructions.len(), form.describe()))
}

/// Binds (or, after an upgrade, takes over what the previous image had), then runs the master with
/// SIGTERM/SIGINT as shutdown requests (the first is graceful, a second one is hard), SIGHUP as a reload
/// of the file and SIGUSR2 as an upgrade in place. Returns whether the shutdown was graceful.
async fn serve(
    config: Config,
    cli: Cli,
    upgrade: Upgrade,
    resumed: Option<master::Checked>,
    ready: ReadyLines,
) -> sticky_cluster::Result<bool> {
    let listener = match resumed {
        Some(_) => None,
        None => Some(master::bind(&config)?),
    };
    let ready_fd = ready.fd.clone();
    let on_upgrade: signals::OnUpgrade = Box::new(move || {
        let (binary, args, ready_fd) = (upgrade.binary.clone(), upgrade.args.clone(), ready_fd.clone());
        Box::pin(async move {
            tracing::info!("SIGUSR2: checking {} for an upgrade in place", binary.display());
            let checked = tokio::task::spawn_blocking(move || upgrade::preflight(&binary, &args)).await;
            match checked.map_err(|error| format!("the preflight failed: {error}")).and_then(|plan| plan) {
                Ok(mut plan) => {
                    // The caller's fd stays open in the new image, which writes `upgraded` to it.
                    if let Some(fd) = &ready_fd {
                        plan.pass_on.push((ready::ENV_UPGRADE_READY_FD.into(), fd.fd()));
                    }
                    Some(Stop::Upgrade(Box::new(plan)))
                }
                Err(reason) => {
                    tracing::error!("upgrade refused, nothing changed: {reason}");
                    if let Some(fd) = &ready_fd {
                        fd.write(ready::Event::UpgradeRefused { reason });
                    }
                    None
                }
            }
        })
    });
    let stop_rx = signals::forward(move || reload(&cli), Some(on_upgrade))?;
    // An upgraded image starts with every signal blocked: what came during the exec is delivered now.
    upgrade::unblock_signals();
    let listening = |at: &master::Listening| ready.listening(at);
    let outcome = match (listener, resumed) {
        (Some(listener), _) => master::run_reporting(config, listener, stop_rx, listening).await?,
        (None, Some(checked)) => master::resume(config, checked, stop_rx, listening).await?,
        (None, None) => return Err(Error::io("listen", std::io::Error::from(std::io::ErrorKind::NotFound))),
    };
    if let Some(fd) = &ready.fd {
        fd.stopped(&outcome);
    }
    Ok(outcome.graceful)
}
