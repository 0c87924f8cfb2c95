//! `handoff`: the same workers with no master, behind our master, and behind the npm peers, loaded one after
//! the other by the same generator in one invocation, so ratios within the run compare like for like.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::load::{self, LoadOptions, LoadReport, ReplyCheck};
use crate::node;
use crate::procs::{self, Running};
use crate::proxy::Proxy;

pub use crate::handoff_report::{print_table, strict_problem};

/// Where the programs under test are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// This benchmark's own executable (its `worker` subcommand).
    pub bench: PathBuf,
    /// target/<profile>/sticky-cluster.
    pub master: PathBuf,
    /// target/<profile>/hello-worker.
    pub hello_worker: PathBuf,
}

impl Programs {
    /// The programs beside this executable in the target directory.
    pub fn beside_current_exe() -> Result<Programs, String> {
        let bench = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let dir = bench.parent().ok_or("this executable has no folder")?.to_path_buf();
        Ok(Programs { master: dir.join("sticky-cluster"), hello_worker: dir.join("hello-worker"), bench })
    }
}

/// One way of putting workers behind a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// (a) our Rust tokio worker, each process on its own SO_REUSEPORT listener.
    DirectTokio,
    /// (a) the minimal blocking accept loop, each process on its own SO_REUSEPORT listener.
    DirectBlocking,
    /// (a) Node http workers sharing one listening socket (cluster SCHED_NONE): no master in the path.
    DirectNode,
    /// (b) our master with our Rust tokio worker.
    MasterTokio,
    /// (b) our master with the examples' hello-worker.
    MasterHelloWorker,
    /// (b) our master with the minimal blocking accept loop.
    MasterBlocking,
    /// (k) our master in kernel mode (`--routing kernel`) with our Rust tokio worker.
    KernelTokio,
    /// (k) our master in kernel mode with the examples' hello-worker.
    KernelHelloWorker,
    /// (k) our master in kernel mode with the minimal blocking accept loop.
    KernelBlocking,
    /// (c) npm sticky-cluster 0.3.5 with Node http workers.
    NpmStickyCluster,
    /// (d) @socket.io/sticky 2.0.1 (round-robin) with Node http workers.
    SocketIoSticky,
    /// (e) our master through the Node binding, with Node http workers.
    NodeBinding,
    /// (k) our master in kernel mode through the Node binding (`routing: 'kernel'`), with Node http workers.
    KernelNodeBinding,
    /// (f) nginx `ip_hash` (http upstream) in front of Rust tokio workers, a port each.
    NginxIpHash,
    /// (g) HAProxy `balance source` in TCP mode in front of Rust tokio workers, a port each.
    HaproxySource,
}

impl Setup {
    /// Every setup, in the order the table shows them.
    pub const ALL: [Setup; 15] = [
        Setup::DirectTokio,
        Setup::MasterTokio,
        Setup::KernelTokio,
        Setup::MasterHelloWorker,
        Setup::KernelHelloWorker,
        Setup::DirectBlocking,
        Setup::MasterBlocking,
        Setup::KernelBlocking,
        Setup::DirectNode,
        Setup::NpmStickyCluster,
        Setup::SocketIoSticky,
        Setup::NodeBinding,
        Setup::KernelNodeBinding,
        Setup::NginxIpHash,
        Setup::HaproxySource,
    ];

    /// The letter for this setup.
    pub fn letter(self) -> char {
        match self {
            Setup::DirectTokio | Setup::DirectBlocking | Setup::DirectNode => 'a',
            Setup::MasterTokio | Setup::MasterHelloWorker | Setup::MasterBlocking => 'b',
            Setup::NpmStickyCluster => 'c',
            Setup::SocketIoSticky => 'd',
            Setup::NodeBinding => 'e',
            Setup::KernelTokio | Setup::KernelHelloWorker | Setup::KernelBlocking | Setup::KernelNodeBinding => 'k',
            Setup::NginxIpHash => 'f',
            Setup::HaproxySource => 'g',
        }
    }

    /// The table label.
    pub fn label(self) -> &'static str {
        match self {
            Setup::DirectTokio => "no master · Rust tokio worker (SO_REUSEPORT)",
            Setup::DirectBlocking => "no master · blocking accept loop (SO_REUSEPORT)",
            Setup::DirectNode => "no master · Node http (cluster SCHED_NONE)",
            Setup::MasterTokio => "sticky-cluster · Rust tokio worker",
            Setup::MasterHelloWorker => "sticky-cluster · examples hello-worker",
            Setup::MasterBlocking => "sticky-cluster · blocking accept loop",
            Setup::NpmStickyCluster => "npm sticky-cluster 0.3.5 · Node http",
            Setup::SocketIoSticky => "@socket.io/sticky 2.0.1 · Node http",
            Setup::NodeBinding => "sticky-cluster via node-binding · Node http",
            Setup::KernelTokio => "sticky-cluster kernel routing · Rust tokio worker",
            Setup::KernelHelloWorker => "sticky-cluster kernel routing · examples hello-worker",
            Setup::KernelBlocking => "sticky-cluster kernel routing · blocking accept loop",
            Setup::KernelNodeBinding => "sticky-cluster kernel routing via node-binding · Node http",
            Setup::NginxIpHash => "nginx ip_hash (http upstream) · Rust tokio worker, a port each",
            Setup::HaproxySource => "HAProxy balance source (TCP mode) · Rust tokio worker, a port each",
        }
    }

    /// The no-master setup with the same workers, which this one's rate is divided by.
    pub fn baseline(self) -> Setup {
        match self {
            Setup::DirectTokio
            | Setup::MasterTokio
            | Setup::MasterHelloWorker
            | Setup::KernelTokio
            | Setup::KernelHelloWorker
            | Setup::NginxIpHash
            | Setup::HaproxySource => Setup::DirectTokio,
            Setup::DirectBlocking | Setup::MasterBlocking | Setup::KernelBlocking => Setup::DirectBlocking,
            _ => Setup::DirectNode,
        }
    }

    /// Whether a master process sits between clients and workers (its CPU and memory are measured).
    pub fn has_master(self) -> bool {
        self.letter() != 'a'
    }

    /// What the replies must show: routing by our hash for the masters that promise it.
    pub fn check(self, concurrency: u32) -> ReplyCheck {
        match self {
            // npm sticky-cluster hashes with string-hash too, so a client lands on the same index as with ours.
            Setup::MasterTokio
            | Setup::MasterHelloWorker
            | Setup::MasterBlocking
            | Setup::NpmStickyCluster
            | Setup::NodeBinding
            | Setup::KernelTokio
            | Setup::KernelHelloWorker
            | Setup::KernelBlocking
            | Setup::KernelNodeBinding => ReplyCheck::RemoteAndIndex { concurrency },
            // The proxies hash by rules of their own (ip_hash: the first three octets), so stickiness is
            // checked as "one worker per client address", not against our hash.
            Setup::NginxIpHash | Setup::HaproxySource => ReplyCheck::Sticky,
            _ => ReplyCheck::Remote,
        }
    }

    /// The proxy of rows (f) and (g).
    pub fn proxy(self) -> Option<Proxy> {
        match self {
            Setup::NginxIpHash => Some(Proxy::NginxIpHash),
            Setup::HaproxySource => Some(Proxy::HaproxySource),
            _ => None,
        }
    }

    /// The processes whose CPU and memory fill the master columns: the master alone (its workers are the same
    /// in every row), or a proxy with its worker processes (nginx's master and workers).
    pub fn master_pids(self, running: &Running) -> Vec<u32> {
        match self.proxy() {
            Some(_) => procs::tree(running.pid()),
            None if self.has_master() => vec![running.pid()],
            None => Vec::new(),
        }
    }

    fn uses_node(self) -> bool {
        matches!(
            self,
            Setup::DirectNode
                | Setup::NpmStickyCluster
                | Setup::SocketIoSticky
                | Setup::NodeBinding
                | Setup::KernelNodeBinding
        )
    }

    /// Whether our master routes this setup's connections in the kernel (`routing: kernel`).
    pub fn is_kernel(self) -> bool {
        matches!(self, Setup::KernelTokio | Setup::KernelHelloWorker | Setup::KernelBlocking | Setup::KernelNodeBinding)
    }

    /// Whether this setup needs the Node binding's addon.
    pub fn uses_binding(self) -> bool {
        matches!(self, Setup::NodeBinding | Setup::KernelNodeBinding)
    }

    /// Starts this setup and says where its clients connect: a free port asked of the kernel for the
    /// setups that need a number up front, our master's own pick (from its `listening` line) for ours.
    pub fn started(self, programs: &Programs, concurrency: u32) -> Result<(Running, SocketAddr), String> {
        let port = procs::free_port()?;
        let running = self.start(programs, port, concurrency)?;
        let port = match running.listening_port(Duration::from_secs(30)) {
            Some(Ok(port)) => port,
            Some(Err(reason)) => return Err(format!("{reason}; stderr: {}", running.log_tail(3))),
            None => port,
        };
        Ok((running, SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
    }

    /// Starts the workers (and master) of this setup on `port` (our master: on a port of the kernel's
    /// choice, which [`Setup::started`] reads).
    pub fn start(self, programs: &Programs, port: u16, concurrency: u32) -> Result<Running, String> {
        let bench_worker = |style: &str| -> Vec<String> {
            vec![programs.bench.display().to_string(), "worker".into(), "--style".into(), style.into()]
        };
        match self {
            Setup::DirectTokio | Setup::DirectBlocking => {
                let style = if self == Setup::DirectTokio { "tokio" } else { "blocking" };
                let mut running: Option<Running> = None;
                for index in 0..concurrency {
                    let mut command = Command::new(&programs.bench);
                    command
                        .args(["worker", "--style", style, "--direct-port", &port.to_string()])
                        .env("BENCH_WORKER_INDEX", index.to_string());
                    match running.as_mut() {
                        None => running = Some(Running::spawn(self.label(), &mut command)?),
                        Some(running) => running.add(&mut command)?,
                    }
                }
                running.ok_or_else(|| "concurrency must be at least 1".into())
            }
            Setup::MasterTokio | Setup::KernelTokio => {
                start_master(programs, concurrency, &bench_worker("tokio"), self)
            }
            Setup::MasterBlocking | Setup::KernelBlocking => {
                start_master(programs, concurrency, &bench_worker("blocking"), self)
            }
            Setup::MasterHelloWorker | Setup::KernelHelloWorker => {
                let command = [programs.hello_worker.display().to_string()];
                start_master(programs, concurrency, &command, self)
            }
            Setup::DirectNode
            | Setup::NpmStickyCluster
            | Setup::SocketIoSticky
            | Setup::NodeBinding
            | Setup::KernelNodeBinding => {
                let mode = match self {
                    Setup::DirectNode => "direct",
                    Setup::NpmStickyCluster => "sticky-cluster",
                    Setup::SocketIoSticky => "socketio-sticky",
                    Setup::KernelNodeBinding => "native-kernel",
                    _ => "native",
                };
                let dir = node::dir();
                let mut command = Command::new("node");
                command
                    .arg(dir.join("workers.js"))
                    .args([mode, &port.to_string(), &concurrency.to_string()])
                    .current_dir(&dir);
                Running::spawn(self.label(), &mut command)
            }
            Setup::NginxIpHash | Setup::HaproxySource => {
                let proxy = self.proxy().ok_or("a proxy row without a proxy")?;
                proxy.start(programs, port, concurrency, self.label())
            }
        }
    }
}

/// Our master on a port the kernel picks (its `listening` line names it: [`Running::listening_port`]).
fn start_master(programs: &Programs, concurrency: u32, worker: &[String], setup: Setup) -> Result<Running, String> {
    let routing = if setup.is_kernel() { "kernel" } else { "handoff" };
    let mut command = Command::new(&programs.master);
    command
        .args(["--port", "0", "--concurrency", &concurrency.to_string()])
        .args(["--routing", routing, "--hard-shutdown-delay", "2s", "--"])
        .args(worker);
    Running::spawn_master(setup.label(), command)
}

/// Options of the handoff benchmark.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// Measured seconds per setup.
    pub seconds: f64,
    /// Unmeasured load before each measurement.
    pub warmup: f64,
    /// Workers per setup.
    pub concurrency: u32,
    /// Connections the generator keeps open at once.
    pub in_flight: usize,
    /// Distinct 127.a.b.c source addresses.
    pub sources: u32,
    /// Threads of the load generator.
    pub client_threads: usize,
    /// Only these setup letters (a–g, k for the kernel-routing rows), or all.
    pub only: Option<String>,
    /// Times every setup is measured; the table shows the median rate.
    pub rounds: u32,
}

/// One setup's outcome.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Which setup.
    pub setup: Setup,
    /// The load run, or why the setup did not run.
    pub result: Result<MeasuredRun, String>,
}

/// The figures of a setup that ran.
#[derive(Debug, Clone)]
pub struct MeasuredRun {
    /// The generator's report.
    pub load: LoadReport,
    /// Master CPU seconds during the measured run, when there is a master.
    pub master_cpu: Option<f64>,
    /// Master resident memory after the run, KiB.
    pub master_rss_kib: Option<u64>,
    /// Connections per second of each round.
    pub rates: Vec<f64>,
}

impl MeasuredRun {
    /// The median of the rounds' connections per second.
    pub fn rate(&self) -> f64 {
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        match rates.len() {
            0 => 0.0,
            n if n % 2 == 1 => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        }
    }

    /// Folds another round of the same setup into this one: counts and CPU add up, latencies merge.
    pub fn absorb(&mut self, other: MeasuredRun) {
        self.load.completed += other.load.completed;
        self.load.errors += other.load.errors;
        self.load.misrouted += other.load.misrouted;
        self.load.revisits += other.load.revisits;
        load::add_counts(&mut self.load.per_worker, &other.load.per_worker);
        self.load.elapsed += other.load.elapsed;
        self.load.latencies_us.extend(other.load.latencies_us);
        self.load.latencies_us.sort_unstable();
        for error in other.load.first_errors {
            if self.load.first_errors.len() < 5 {
                self.load.first_errors.push(error);
            }
        }
        self.master_cpu = self.master_cpu.zip(other.master_cpu).map(|(a, b)| a + b);
        self.master_rss_kib = self.master_rss_kib.max(other.master_rss_kib);
        self.rates.extend(other.rates);
    }
}

/// Measures one setup: start, wait for answers, warm up, measure, stop.
pub fn measure(setup: Setup, programs: &Programs, options: &HandoffOptions) -> Result<MeasuredRun, String> {
    if setup.uses_node() {
        node::ensure_modules()?;
    }
    if setup.uses_binding() {
        let index = node::binding_dir().join("index.js");
        if !index.exists() {
            return Err(format!("{} does not exist yet", index.display()));
        }
    }
    let (mut running, target) = setup.started(programs, options.concurrency)?;
    let failed = |running: &mut Running, reason: String| {
        let exited = running.exited().map(|s| format!("; exited with {s}")).unwrap_or_default();
        format!("{reason}{exited}; stderr: {}", running.log_tail(3))
    };
    if let Err(reason) = wait_for_server(&mut running, target) {
        return Err(failed(&mut running, reason));
    }
    let mut load_options = LoadOptions {
        target,
        duration: Duration::from_secs_f64(options.warmup),
        max_connections: None,
        in_flight: options.in_flight,
        sources: options.sources,
        threads: options.client_threads,
        check: setup.check(options.concurrency),
    };
    if options.warmup > 0.0 {
        load::run(&load_options).map_err(|e| format!("load generator failed: {e}"))?;
    }
    let master = setup.master_pids(&running);
    let cpu_before = procs::cpu_seconds_of(&master);
    load_options.duration = Duration::from_secs_f64(options.seconds);
    let load = load::run(&load_options).map_err(|e| format!("load generator failed: {e}"))?;
    let cpu_after = procs::cpu_seconds_of(&master);
    let master_rss_kib = procs::rss_kib_of(&master);
    if let Some(status) = running.exited() {
        return Err(failed(&mut running, format!("the server exited during the run ({status})")));
    }
    if load.errors > 0 || load.misrouted > 0 {
        eprintln!(
            "  ({}) {} errors, {} misrouted; its log ends: {}",
            setup.letter(),
            load.errors,
            load.misrouted,
            running.log_tail(3)
        );
    }
    running.stop();
    note_master_counters(setup, &running);
    let master_cpu = (!master.is_empty()).then_some(cpu_after - cpu_before);
    let rates = vec![load.rate()];
    Ok(MeasuredRun { load, master_cpu, master_rss_kib, rates })
}

/// What our master's stopped line says when it is worth a look: connections it closed unserved, or a
/// stop that had to kill workers.
pub fn note_master_counters(setup: Setup, running: &Running) {
    if let Some(stopped) = running.stopped().filter(|stopped| stopped.closed > 0 || !stopped.graceful) {
        eprintln!(
            "  ({}) the master closed {} connections unserved{}",
            setup.letter(),
            stopped.closed,
            if stopped.graceful { "" } else { " and had to kill workers at the stop" }
        );
    }
}

/// Waits up to 30 s for the server to answer, giving up at once when its first process has exited.
pub fn wait_for_server(running: &mut Running, target: SocketAddr) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..30 {
        if running.exited().is_some() {
            return Err(format!("{target} did not answer ({last})"));
        }
        match load::wait_until_answering(target, Duration::from_secs(1)) {
            Ok(()) => return Ok(()),
            Err(reason) => last = reason,
        }
    }
    Err(last)
}

/// Runs every selected setup and prints the table and the target lines.
pub fn run(programs: &Programs, options: &HandoffOptions) -> Vec<Measured> {
    print_header(programs, options);
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|s| options.only.as_deref().is_none_or(|only| only.contains(s.letter())))
        .collect();
    let mut results: Vec<Measured> = Vec::new();
    // Rounds go through every setup in turn, so a burst of other activity on the machine hits all of them.
    for round in 1..=options.rounds {
        for &setup in &setups {
            let earlier = results.iter_mut().find(|m| m.setup == setup);
            if earlier.as_ref().is_some_and(|m| m.result.is_err()) {
                continue;
            }
            eprintln!("round {round}: ({}) {} ...", setup.letter(), setup.label());
            let result = measure(setup, programs, options);
            if let Err(reason) = &result {
                eprintln!("  ({}) skipped: {reason}", setup.letter());
            }
            match (earlier, result) {
                (Some(measured), Ok(run)) => {
                    if let Ok(total) = measured.result.as_mut() {
                        total.absorb(run);
                    }
                }
                (Some(measured), Err(reason)) => measured.result = Err(reason),
                (None, result) => results.push(Measured { setup, result }),
            }
        }
    }
    print_table(&results, options);
    results
}

fn print_header(programs: &Programs, options: &HandoffOptions) {
    println!(
        "handoff: {} workers per setup, {} round(s) of {} s measured after {} s warm-up, {} connections in flight from {} source addresses, {} client thread(s)",
        options.concurrency, options.rounds, options.seconds, options.warmup, options.in_flight, options.sources, options.client_threads
    );
    println!("master: {}", programs.master.display());
    for proxy in [Proxy::NginxIpHash, Proxy::HaproxySource] {
        println!("{}: {}", proxy.program(), proxy.version().unwrap_or_else(|| "not installed".into()));
    }
    println!("load average before: {}", load_average());
}

/// Builds the master and hello-worker in the profile this executable was built with.
pub fn build_programs(programs: &Programs) -> Result<(), String> {
    let release = programs.bench.parent().and_then(Path::file_name).is_some_and(|name| name == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.arg("build").args(["-p", "sticky-cluster", "-p", "sticky-cluster-examples"]).current_dir(workspace);
    if release {
        command.arg("--release");
    }
    let status = command.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the master and hello-worker failed ({status})"));
    }
    Ok(())
}

/// /proc/loadavg, to show whether something else was running on the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}
