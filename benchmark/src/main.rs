//! The `sticky-cluster-bench` command: one subcommand per benchmark (`hash`, `handoff`, `stream`,
//! `master-cost`) and `worker`, the Rust worker those benchmarks start.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sticky_cluster_bench::handoff::{self, HandoffOptions, Programs};
use sticky_cluster_bench::hash_bench::{self, HashOptions};
use sticky_cluster_bench::master_cost::{self, CostOptions};
use sticky_cluster_bench::stream::{self, StreamOptions};
use sticky_cluster_bench::worker::{self, Source, Style};

/// Benchmarks of sticky-cluster: routing hash, connection handoff, streaming, master cost.
#[derive(Debug, Parser)]
#[command(name = "sticky-cluster-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The npm sticky-cluster hash benchmark: int31 vs djb2 over random IPv4/IPv6 addresses.
    Hash {
        /// Buckets (workers) to spread the addresses over.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        num_workers: u32,
        /// Random addresses to hash, half IPv4 and half IPv6.
        #[arg(value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        num_ips: u64,
        /// Seed of the random addresses (the same seed gives the same addresses).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Do not time npm string-hash in Node over the same addresses.
        #[arg(long)]
        no_node: bool,
    },
    /// Connections per second and latency: no master, our master, the npm peers, nginx and HAProxy.
    Handoff {
        /// Measured seconds per setup.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Unmeasured seconds of load before each measurement.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Workers per setup.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Connections kept open at once by the load generator.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Distinct 127.a.b.c source addresses.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        sources: u32,
        /// Threads of the load generator.
        #[arg(long, default_value_t = 1)]
        client_threads: usize,
        /// Only the setups with these letters, e.g. `ab` or `ace` (k: the kernel-routing rows).
        #[arg(long)]
        only: Option<String>,
        /// Do not run `cargo build` for the master and hello-worker first.
        #[arg(long)]
        no_build: bool,
        /// Measure every setup this many times (in turn) and show the median rate.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        /// Fail (exit 1) when a setup was skipped or any connection failed or was misrouted.
        #[arg(long)]
        strict: bool,
    },
    /// Long-lived push streams, one per client: MB/s and CPU per GB, direct, our master, nginx, HAProxy.
    Stream {
        /// Measured seconds per setup.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Unmeasured seconds of streaming before each measurement.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Clients, one long-lived connection each from its own 127.a.b.c address.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        clients: u32,
        /// Workers per setup.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Only the setups with these letters: a (direct), b (our master), k (kernel routing), f (nginx), g (HAProxy).
        #[arg(long)]
        only: Option<String>,
        /// Do not run `cargo build` for the master and hello-worker first.
        #[arg(long)]
        no_build: bool,
        /// Fail (exit 1) when a setup did not run, moved no data, or any client failed or was misrouted.
        #[arg(long)]
        strict: bool,
    },
    /// Master CPU seconds per 100k routed connections and its memory with 4 and 64 workers, handoff and kernel.
    MasterCost {
        /// Worker counts, comma-separated.
        #[arg(long, default_value = "4,64", value_delimiter = ',')]
        workers: Vec<u32>,
        /// Connections routed per worker count.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Connections kept open at once by the load generator.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Threads of the load generator.
        #[arg(long, default_value_t = 1)]
        client_threads: usize,
        /// Do not run `cargo build` for the master and hello-worker first.
        #[arg(long)]
        no_build: bool,
    },
    /// A benchmark worker (started by `handoff`): the hello-worker's reply.
    Worker {
        /// Tokio task per connection, or a single-threaded blocking accept loop.
        #[arg(long, value_enum, default_value_t = StyleArg::Tokio)]
        style: StyleArg,
        /// Accept directly on this port (SO_REUSEPORT) instead of from the sticky-cluster master.
        #[arg(long)]
        direct_port: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StyleArg {
    Tokio,
    Blocking,
}

/// Exit statuses: 1 when a benchmark could not run, 2 for a bad command line (as clap's own errors).
const EXIT_USAGE: u8 = 2;

/// Why the command failed: bad usage (exit 2) or a benchmark that could not run (exit 1).
enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure::Run(reason)
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(error)) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Run(error)) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn usage(text: &str) -> Failure {
    Failure::Usage(text.to_string())
}

fn run(command: Bench) -> Result<(), Failure> {
    match command {
        Bench::Hash { num_workers, num_ips, seed, no_node } => Ok(hash_bench::run(&HashOptions {
            workers: num_workers,
            count: num_ips as usize,
            seed,
            with_node: !no_node,
        })?),
        Bench::Handoff {
            seconds,
            warmup,
            concurrency,
            in_flight,
            sources,
            client_threads,
            only,
            no_build,
            rounds,
            strict,
        } => {
            if seconds <= 0.0 || seconds > 600.0 || seconds.is_nan() || !(0.0..=60.0).contains(&warmup) {
                return Err(usage("--seconds must be in (0, 600] and --warmup in [0, 60]"));
            }
            if in_flight == 0 || client_threads == 0 {
                return Err(usage("--in-flight and --client-threads must be at least 1"));
            }
            if let Some(only) = &only {
                if only.is_empty() || !only.chars().all(|c| ('a'..='g').contains(&c) || c == 'k') {
                    return Err(Failure::Usage(format!("--only takes setup letters a to g and k, not {only:?}")));
                }
            }
            let programs = prepare(no_build)?;
            let options =
                HandoffOptions { seconds, warmup, concurrency, in_flight, sources, client_threads, only, rounds };
            let results = handoff::run(&programs, &options);
            if results.iter().all(|m| m.result.is_err()) {
                return Err(Failure::Run("no setup ran".into()));
            }
            if strict {
                if let Some(problem) = handoff::strict_problem(&results) {
                    return Err(Failure::Run(problem));
                }
            }
            Ok(())
        }
        Bench::Stream { seconds, warmup, clients, concurrency, only, no_build, strict } => {
            if seconds <= 0.0 || seconds > 600.0 || seconds.is_nan() || !(0.0..=60.0).contains(&warmup) {
                return Err(usage("--seconds must be in (0, 600] and --warmup in [0, 60]"));
            }
            if let Some(only) = &only {
                if only.is_empty() || !only.chars().all(|c| "abkfg".contains(c)) {
                    return Err(Failure::Usage(format!("--only takes the stream setups a, b, k, f, g, not {only:?}")));
                }
            }
            let programs = prepare(no_build)?;
            let results = stream::run(&programs, &StreamOptions { seconds, warmup, clients, concurrency, only });
            if results.iter().all(|(_, r)| r.is_err()) {
                return Err(Failure::Run("no setup ran".into()));
            }
            if strict {
                if let Some(problem) = stream::strict_problem(&results) {
                    return Err(Failure::Run(problem));
                }
            }
            Ok(())
        }
        Bench::MasterCost { workers, connections, in_flight, client_threads, no_build } => {
            if workers.is_empty() || workers.iter().any(|&w| w == 0 || w > 1024) {
                return Err(usage("--workers takes counts from 1 to 1024, comma-separated"));
            }
            if connections == 0 || in_flight == 0 || client_threads == 0 {
                return Err(usage("--connections, --in-flight and --client-threads must be at least 1"));
            }
            let programs = prepare(no_build)?;
            master_cost::run(&programs, &CostOptions { workers, connections, in_flight, client_threads })?;
            Ok(())
        }
        Bench::Worker { style, direct_port } => {
            let style = match style {
                StyleArg::Tokio => Style::Tokio,
                StyleArg::Blocking => Style::Blocking,
            };
            let source = direct_port.map_or(Source::Master, |port| Source::Direct { port });
            Ok(worker::run(source, style)?)
        }
    }
}

/// Finds (and unless told otherwise, builds) the master and hello-worker beside this executable.
fn prepare(no_build: bool) -> Result<Programs, String> {
    let programs = Programs::beside_current_exe()?;
    if !no_build {
        handoff::build_programs(&programs)?;
    }
    for program in [&programs.master, &programs.hello_worker] {
        if !program.exists() {
            return Err(format!(
                "{} is missing: build it with cargo build --release -p sticky-cluster -p sticky-cluster-examples",
                program.display()
            ));
        }
    }
    Ok(programs)
}
