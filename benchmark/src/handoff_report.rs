//! The handoff benchmark's report: the Markdown table, the lines comparing setups and targets, and the
//! `--strict` verdict.

use crate::handoff::{HandoffOptions, Measured, MeasuredRun, Setup};
use crate::load::ReplyCheck;
fn rate_of(results: &[Measured], setup: Setup) -> Option<f64> {
    results.iter().find(|m| m.setup == setup)?.result.as_ref().ok().map(MeasuredRun::rate)
}

/// Master CPU microseconds per answered connection, over every round of the setup.
fn master_us_per_connection(results: &[Measured], setup: Setup) -> Option<f64> {
    let run = results.iter().find(|m| m.setup == setup)?.result.as_ref().ok()?;
    let cpu = run.master_cpu?;
    (run.load.completed > 0).then(|| cpu * 1e6 / run.load.completed as f64)
}

/// Prints the results table (Markdown) and the lines comparing against the targets.
pub fn print_table(results: &[Measured], options: &HandoffOptions) {
    println!();
    println!("| case | setup | conn/s (median) | rounds min–max | vs (a) same workers | p50 ms | p99 ms | errors | misrouted | master CPU s per 100k conn | master RSS MiB |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for measured in results {
        let setup = measured.setup;
        match &measured.result {
            Ok(run) => {
                let rate = run.rate();
                let ratio = match rate_of(results, setup.baseline()) {
                    Some(base) if setup.baseline() != setup => format!("{:.0}%", 100.0 * rate / base),
                    _ if setup.baseline() == setup => "100%".into(),
                    _ => "–".into(),
                };
                let cpu = run
                    .master_cpu
                    .filter(|_| run.load.completed > 0)
                    .map(|s| format!("{:.2}", s * 100_000.0 / run.load.completed as f64))
                    .unwrap_or_else(|| "–".into());
                let rss = run.master_rss_kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "–".into());
                let misrouted = match setup.check(options.concurrency) {
                    ReplyCheck::RemoteAndIndex { .. } => run.load.misrouted.to_string(),
                    // Behind a proxy: of the connections from an address seen before, those on another worker.
                    ReplyCheck::Sticky => format!("{} of {} repeat", run.load.misrouted, run.load.revisits),
                    ReplyCheck::Remote => "n/a".into(),
                };
                let low = run.rates.iter().copied().fold(f64::INFINITY, f64::min);
                let high = run.rates.iter().copied().fold(0.0, f64::max);
                println!(
                    "| ({}) | {} | {:.0} | {:.0}–{:.0} | {} | {:.2} | {:.2} | {} | {} | {} | {} |",
                    setup.letter(),
                    setup.label(),
                    rate,
                    low,
                    high,
                    ratio,
                    run.load.percentile_ms(0.50),
                    run.load.percentile_ms(0.99),
                    run.load.errors,
                    misrouted,
                    cpu,
                    rss
                );
            }
            Err(reason) => {
                println!("| ({}) | {} | skipped: {} | | | | | | | | |", setup.letter(), setup.label(), reason)
            }
        }
    }
    println!();
    for measured in results {
        if let Ok(run) = &measured.result {
            for error in &run.load.first_errors {
                println!("({}) error sample: {error}", measured.setup.letter());
            }
        }
    }
    let spread: Vec<String> = results
        .iter()
        .filter_map(|m| {
            let counts = &m.result.as_ref().ok()?.load.per_worker;
            let counts: Vec<String> = counts.iter().map(u64::to_string).collect();
            Some(format!("({}) {}: {}", m.setup.letter(), m.setup.label(), counts.join("/")))
        })
        .collect();
    println!("replies per worker index: {}", spread.join("; "));
    let ratio = |a: Setup, b: Setup| rate_of(results, a).zip(rate_of(results, b)).map(|(x, y)| x / y);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(r) = ratio(Setup::MasterTokio, Setup::DirectTokio) {
        println!(
            "our master vs direct accept (Rust tokio worker): {:.0}% (target >= 80%: {})",
            r * 100.0,
            verdict(r >= 0.8)
        );
    }
    if let Some(r) = ratio(Setup::MasterBlocking, Setup::DirectBlocking) {
        println!(
            "our master vs direct accept (blocking accept loop): {:.0}% (target >= 80%: {})",
            r * 100.0,
            verdict(r >= 0.8)
        );
    }
    // Issue 11's targets: the kernel routes at the cost of direct accept (>= 97%) with no master CPU per
    // connection; the handoff master keeps >= 85% of direct.
    for (kernel, handoff) in [
        (Setup::KernelTokio, Setup::MasterTokio),
        (Setup::KernelHelloWorker, Setup::MasterHelloWorker),
        (Setup::KernelBlocking, Setup::MasterBlocking),
        (Setup::KernelNodeBinding, Setup::NodeBinding),
    ] {
        let base = kernel.baseline();
        if let Some(r) = ratio(kernel, base) {
            let per_connection = master_us_per_connection(results, kernel)
                .map(|us| format!(", master CPU {us:.2} µs per connection (target ≈ 0)"))
                .unwrap_or_default();
            println!(
                "kernel routing vs direct accept ({}): {:.1}% (target >= 97%: {}){per_connection}",
                kernel.label(),
                r * 100.0,
                verdict(r >= 0.97)
            );
        }
        if let Some(r) = ratio(handoff, base) {
            let per_connection = master_us_per_connection(results, handoff)
                .map(|us| format!(", master CPU {us:.2} µs per connection"))
                .unwrap_or_default();
            println!(
                "handoff routing vs direct accept ({}): {:.1}% (target >= 85%: {}){per_connection}",
                handoff.label(),
                r * 100.0,
                verdict(r >= 0.85)
            );
        }
        if let Some(r) = ratio(kernel, handoff) {
            println!("kernel vs handoff routing, same workers ({}): {r:.2}x the rate", kernel.label());
        }
    }
    for setup in [Setup::NodeBinding, Setup::KernelNodeBinding] {
        match results.iter().find(|m| m.setup == setup).map(|m| &m.result) {
            Some(Err(reason)) => println!("({}) {} skipped: {reason}", setup.letter(), setup.label()),
            None => println!("({}) {} not selected", setup.letter(), setup.label()),
            Some(Ok(_)) => {}
        }
    }
    if let Some(r) = ratio(Setup::NodeBinding, Setup::NpmStickyCluster) {
        println!("(e) vs (c), same Node workers: {r:.2}x (target >= 5x: {})", verdict(r >= 5.0));
    }
    if let Some(r) = ratio(Setup::NodeBinding, Setup::SocketIoSticky) {
        println!("(e) vs (d), same Node workers: {r:.2}x");
    }
    // The master's own routing capacity, independent of how fast the workers are: connections per CPU-second.
    let capacity = |setup: Setup| {
        let run = results.iter().find(|m| m.setup == setup)?.result.as_ref().ok()?;
        run.master_cpu.filter(|&s| s > 0.0).map(|s| run.load.completed as f64 / s)
    };
    // Kernel routing is left out: its master routes nothing, so a figure would divide by clock-tick noise.
    let capacities: Vec<String> = Setup::ALL
        .into_iter()
        .filter(|s| !s.is_kernel())
        .filter_map(|s| capacity(s).map(|c| format!("({}) {}: {c:.0}", s.letter(), s.label())))
        .collect();
    if !capacities.is_empty() {
        println!("master routing capacity, connections per master CPU-second: {}", capacities.join("; "));
    }
    if let Some(r) = capacity(Setup::NodeBinding).zip(capacity(Setup::NpmStickyCluster)).map(|(x, y)| x / y) {
        println!("(e) vs (c), connections per master CPU-second: {r:.1}x (target >= 5x: {})", verdict(r >= 5.0));
    }
    for proxy in [Setup::NginxIpHash, Setup::HaproxySource] {
        let (Some(r), Some(letter)) = (ratio(Setup::MasterTokio, proxy), Some(proxy.letter())) else { continue };
        let per_cpu = capacity(Setup::MasterTokio).zip(capacity(proxy)).map(|(x, y)| x / y);
        let per_cpu =
            per_cpu.map(|c| format!(", {c:.1}x connections per CPU-second of master vs proxy")).unwrap_or_default();
        println!("(b) our master vs ({letter}) {}, same Rust workers: {r:.2}x the rate{per_cpu}", proxy.label());
    }
    if let Some(r) = ratio(Setup::MasterTokio, Setup::NpmStickyCluster) {
        println!("(b) Rust workers vs (c) Node workers (not like for like: the workers differ too): {r:.2}x");
    }
}

/// Under `--strict`: the first setup that was skipped (the Node binding's rows too: `benchmark/test.sh` and
/// `run-handoff.sh` build its addon first), failed connections or reached the wrong worker.
pub fn strict_problem(results: &[Measured]) -> Option<String> {
    results.iter().find_map(|m| match &m.result {
        Err(reason) => Some(format!("({}) {} did not run: {reason}", m.setup.letter(), m.setup.label())),
        Ok(run) if run.load.errors > 0 || run.load.misrouted > 0 => Some(format!(
            "({}) {}: {} failed and {} misrouted connections",
            m.setup.letter(),
            m.setup.label(),
            run.load.errors,
            run.load.misrouted
        )),
        // Stickiness behind a proxy is only seen when a client address comes back: a run too short for that
        // checked nothing.
        Ok(run) if m.setup.check(2) == ReplyCheck::Sticky && run.load.revisits == 0 => Some(format!(
            "({}) {}: no client address connected twice, so stickiness was not checked (use fewer --sources)",
            m.setup.letter(),
            m.setup.label()
        )),
        _ => None,
    })
}
