//! `master-cost`: what the master itself costs, in handoff and kernel routing: CPU seconds per 100k routed
//! connections (read from /proc/<pid>/stat around a count-bounded load) and resident memory with N hello-workers.

use std::time::Duration;

use crate::handoff::{Programs, Setup};
use crate::load::{self, LoadOptions};
use crate::procs;

/// Options of the master-cost benchmark.
#[derive(Debug, Clone)]
pub struct CostOptions {
    /// Worker counts to measure.
    pub workers: Vec<u32>,
    /// Connections routed per measurement.
    pub connections: u64,
    /// Connections the generator keeps open at once.
    pub in_flight: usize,
    /// Threads of the load generator.
    pub client_threads: usize,
}

/// One worker count's figures in one routing mode.
#[derive(Debug, Clone)]
pub struct Cost {
    /// `handoff` or `kernel`.
    pub routing: &'static str,
    /// Workers behind the master.
    pub workers: u32,
    /// Connections answered.
    pub completed: u64,
    /// Connections that failed.
    pub errors: u64,
    /// Connections answered by another worker than `string_hash(remote) % workers`.
    pub misrouted: u64,
    /// Answered connections per second.
    pub rate: f64,
    /// Master CPU seconds (user + system) while routing them.
    pub cpu_seconds: f64,
    /// Master VmRSS once every worker answered, before the load, KiB.
    pub rss_idle_kib: u64,
    /// Master VmRSS after the load, KiB.
    pub rss_after_kib: u64,
    /// Master VmHWM (peak RSS) after the load, KiB.
    pub rss_peak_kib: u64,
}

/// Measures every worker count and prints the table.
pub fn run(programs: &Programs, options: &CostOptions) -> Result<Vec<Cost>, String> {
    println!("load average before: {}", crate::handoff::load_average());
    let mut costs = Vec::new();
    for &workers in &options.workers {
        // Handoff and kernel routing alternate per worker count, so a burst of other load hits both.
        for setup in [Setup::MasterHelloWorker, Setup::KernelHelloWorker] {
            let routing = if setup.is_kernel() { "kernel" } else { "handoff" };
            eprintln!("master cost with {workers} hello-workers, routing {routing} ...");
            costs.push(measure(programs, options, workers, setup)?);
        }
    }
    println!(
        "master cost: sticky-cluster with N examples hello-workers, {} connections per row, {} in flight",
        options.connections, options.in_flight
    );
    println!();
    println!("| routing | workers | connections | errors | misrouted | conn/s | master CPU s | master CPU s per 100k conn | RSS idle MiB | RSS after MiB | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for cost in &costs {
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
            cost.routing,
            cost.workers,
            cost.completed,
            cost.errors,
            cost.misrouted,
            cost.rate,
            cost.cpu_seconds,
            cost.cpu_seconds * 100_000.0 / cost.completed.max(1) as f64,
            mib(cost.rss_idle_kib),
            mib(cost.rss_after_kib),
            mib(cost.rss_peak_kib)
        );
    }
    println!();
    for cost in &costs {
        let us = cost.cpu_seconds * 1e6 / cost.completed.max(1) as f64;
        let target = if cost.routing == "kernel" { " (issue 11's target: ≈ 0)" } else { "" };
        println!(
            "{} routing, {} workers: master CPU {us:.2} µs per connection{target}, {} errors, {} misrouted",
            cost.routing, cost.workers, cost.errors, cost.misrouted
        );
    }
    Ok(costs)
}

fn measure(programs: &Programs, options: &CostOptions, workers: u32, setup: Setup) -> Result<Cost, String> {
    let (mut running, target) = setup.started(programs, workers)?;
    let pid = running.pid();
    load::wait_until_answering(target, Duration::from_secs(60))
        .map_err(|reason| format!("{reason}; stderr: {}", running.log_tail(3)))?;
    let mut load_options = LoadOptions {
        target,
        duration: Duration::from_millis(500),
        max_connections: None,
        in_flight: options.in_flight,
        sources: 4096,
        threads: options.client_threads,
        check: setup.check(workers),
    };
    // A short warm-up so that every worker has said ready and taken connections before memory is read.
    load::run(&load_options).map_err(|e| format!("load generator failed: {e}"))?;
    let rss_idle_kib = procs::status_kib(pid, "VmRSS").ok_or("cannot read the master's VmRSS")?;
    let cpu_before = procs::cpu_seconds(pid).ok_or("cannot read the master's CPU time")?;
    load_options.duration = Duration::from_secs(300);
    load_options.max_connections = Some(options.connections);
    let report = load::run(&load_options).map_err(|e| format!("load generator failed: {e}"))?;
    let cpu_after = procs::cpu_seconds(pid).ok_or("cannot read the master's CPU time")?;
    let rss_after_kib = procs::status_kib(pid, "VmRSS").unwrap_or(0);
    let rss_peak_kib = procs::status_kib(pid, "VmHWM").unwrap_or(0);
    if let Some(status) = running.exited() {
        return Err(format!("the master exited during the run ({status}); stderr: {}", running.log_tail(3)));
    }
    running.stop();
    crate::handoff::note_master_counters(setup, &running);
    Ok(Cost {
        routing: if setup.is_kernel() { "kernel" } else { "handoff" },
        workers,
        completed: report.completed,
        errors: report.errors,
        misrouted: report.misrouted,
        rate: report.rate(),
        cpu_seconds: cpu_after - cpu_before,
        rss_idle_kib,
        rss_after_kib,
        rss_peak_kib,
    })
}
