//! `stream`: long-lived connections, one per client, each pushing data for a fixed time: MB/s and CPU per GB
//! with no master, behind our master (out of the data path after the handoff), and behind nginx and HAProxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sticky_cluster::hash::string_hash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::handoff::{load_average, Programs, Setup};
use crate::load::{self, ReplyCheck};
use crate::procs;
use crate::worker::STREAM_UPGRADE;

/// The setups measured, in table order: the same Rust tokio workers with no master, behind our master in
/// handoff and in kernel routing (SO_REUSEPORT steered by a BPF program, no process in the path), and behind
/// the proxies.
pub const SETUPS: [Setup; 5] =
    [Setup::DirectTokio, Setup::MasterTokio, Setup::KernelTokio, Setup::NginxIpHash, Setup::HaproxySource];

/// Longest a client may take to connect and read the stream's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of the stream benchmark.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Measured seconds per setup.
    pub seconds: f64,
    /// Unmeasured seconds of streaming before the measurement.
    pub warmup: f64,
    /// Long-lived connections, one per client, each from its own 127.a.b.c address.
    pub clients: u32,
    /// Workers per setup.
    pub concurrency: u32,
    /// Only the setups with these letters (a, b, k, f, g).
    pub only: Option<String>,
}

/// One setup's figures.
#[derive(Debug, Clone)]
pub struct StreamRun {
    /// Bytes the clients received during the measured time.
    pub bytes: u64,
    /// The measured time.
    pub elapsed: Duration,
    /// Clients whose connection failed, ended early or showed a wrong head.
    pub errors: u64,
    /// Clients answered by another worker than our hash names (masters that promise it).
    pub misrouted: u64,
    /// CPU seconds of the master or proxy during the measured time (none without one).
    pub master_cpu: Option<f64>,
    /// Resident memory of the master or proxy after the run, KiB.
    pub master_rss_kib: Option<u64>,
    /// CPU seconds of every process of the setup (workers, master or proxy) and of this client.
    pub total_cpu: f64,
    /// The first few error texts.
    pub first_errors: Vec<String>,
    /// Streams each worker index served: how the clients fell on the workers.
    pub per_worker: Vec<u32>,
}

impl StreamRun {
    /// Megabytes (10^6) per second received by all clients.
    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn per_gb(&self, cpu: f64) -> f64 {
        cpu / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

/// Runs every selected setup and prints the table; each entry is a setup and its figures or why it did not run.
pub fn run(programs: &Programs, options: &StreamOptions) -> Vec<(Setup, Result<StreamRun, String>)> {
    println!(
        "stream: {} clients, one long-lived connection each (HTTP upgrade, then the worker pushes 64 KiB writes), {} workers, {} s measured after {} s",
        options.clients, options.concurrency, options.seconds, options.warmup
    );
    println!("load average before: {}", load_average());
    let mut results = Vec::new();
    for setup in SETUPS {
        if options.only.as_deref().is_some_and(|only| !only.contains(setup.letter())) {
            continue;
        }
        eprintln!("stream: ({}) {} ...", setup.letter(), setup.label());
        let result = measure(setup, programs, options);
        if let Err(reason) = &result {
            eprintln!("  ({}) skipped: {reason}", setup.letter());
        }
        results.push((setup, result));
    }
    print_table(&results);
    results
}

fn print_table(results: &[(Setup, Result<StreamRun, String>)]) {
    println!();
    println!("| case | setup | MB/s | vs (a) | streams per worker | errors | misrouted | master/proxy CPU s per GB | all processes CPU s per GB | master/proxy RSS MiB |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let direct = results.iter().find(|(s, _)| *s == Setup::DirectTokio).and_then(|(_, r)| r.as_ref().ok());
    for (setup, result) in results {
        match result {
            Ok(run) => {
                let ratio = direct.map(|d| format!("{:.0}%", 100.0 * run.mb_per_second() / d.mb_per_second()));
                let misrouted = match setup.check(2) {
                    ReplyCheck::RemoteAndIndex { .. } => run.misrouted.to_string(),
                    _ => "n/a".into(),
                };
                let cpu = run.master_cpu.map(|c| format!("{:.2}", run.per_gb(c))).unwrap_or_else(|| "–".into());
                let rss = run.master_rss_kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "–".into());
                let spread: Vec<String> = run.per_worker.iter().map(u32::to_string).collect();
                println!(
                    "| ({}) | {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {} |",
                    setup.letter(),
                    setup.label(),
                    run.mb_per_second(),
                    ratio.unwrap_or_else(|| "–".into()),
                    spread.join("/"),
                    run.errors,
                    misrouted,
                    cpu,
                    run.per_gb(run.total_cpu),
                    rss
                );
            }
            Err(reason) => println!("| ({}) | {} | skipped: {reason} | | | | | | | |", setup.letter(), setup.label()),
        }
    }
    println!();
    for (setup, result) in results {
        if let Ok(run) = result {
            for error in &run.first_errors {
                println!("({}) error sample: {error}", setup.letter());
            }
        }
    }
    let rate = |s: Setup| results.iter().find(|(x, _)| *x == s).and_then(|(_, r)| r.as_ref().ok());
    if let (Some(ours), Some(direct)) = (rate(Setup::MasterTokio), direct) {
        println!(
            "our master vs direct, streaming: {:.0}% of the MB/s (the master is out of the data path after the handoff)",
            100.0 * ours.mb_per_second() / direct.mb_per_second()
        );
    }
    if let (Some(kernel), Some(direct)) = (rate(Setup::KernelTokio), direct) {
        println!(
            "kernel routing vs direct, streaming: {:.0}% of the MB/s (no process but the worker ever touches a connection)",
            100.0 * kernel.mb_per_second() / direct.mb_per_second()
        );
    }
    for proxy in [Setup::NginxIpHash, Setup::HaproxySource] {
        if let (Some(ours), Some(other)) = (rate(Setup::MasterTokio), rate(proxy)) {
            println!(
                "our master vs ({}) {}: {:.2}x the MB/s, {:.2} vs {:.2} CPU s per GB over all processes",
                proxy.letter(),
                proxy.label(),
                ours.mb_per_second() / other.mb_per_second(),
                ours.per_gb(ours.total_cpu),
                other.per_gb(other.total_cpu)
            );
        }
    }
}

/// Under `--strict`: the first setup that did not run, or had an error or a misrouted client.
pub fn strict_problem(results: &[(Setup, Result<StreamRun, String>)]) -> Option<String> {
    results.iter().find_map(|(setup, result)| match result {
        Err(reason) => Some(format!("stream ({}) did not run: {reason}", setup.letter())),
        Ok(run) if run.errors > 0 || run.misrouted > 0 || run.bytes == 0 => Some(format!(
            "stream ({}) {}: {} errors, {} misrouted, {} bytes",
            setup.letter(),
            setup.label(),
            run.errors,
            run.misrouted,
            run.bytes
        )),
        _ => None,
    })
}

struct Shared {
    bytes: AtomicU64,
    stop: AtomicBool,
    errors: AtomicU64,
    misrouted: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    per_worker: Mutex<Vec<u32>>,
}

impl Shared {
    fn error(&self, text: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.first_errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < 5 {
            kept.push(text);
        }
    }
}

/// Measures one setup: start it, open every client's stream, warm up, count bytes and CPU, stop.
pub fn measure(setup: Setup, programs: &Programs, options: &StreamOptions) -> Result<StreamRun, String> {
    let (mut running, target) = setup.started(programs, options.concurrency)?;
    if let Err(reason) = crate::handoff::wait_for_server(&mut running, target) {
        let exited = running.exited().map(|s| format!("; exited with {s}")).unwrap_or_default();
        return Err(format!("{reason}{exited}; stderr: {}", running.log_tail(3)));
    }
    let master = setup.master_pids(&running);
    let everything: Vec<u32> = running.pids().into_iter().flat_map(procs::tree).collect();
    let me = std::process::id();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;
    let check = setup.check(options.concurrency);
    let shared = Arc::new(Shared {
        bytes: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        misrouted: AtomicU64::new(0),
        first_errors: Mutex::new(Vec::new()),
        per_worker: Mutex::new(vec![0; options.concurrency as usize]),
    });
    let mut run = runtime.block_on(async {
        let clients: Vec<_> = (0..options.clients)
            .map(|k| tokio::spawn(client(shared.clone(), stream_source(k), target, check)))
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(options.warmup)).await;
        let (bytes_before, cpu_before) = (shared.bytes.load(Ordering::Relaxed), procs::cpu_seconds_of(&master));
        let all_before = procs::cpu_seconds_of(&everything) + procs::cpu_seconds(me).unwrap_or(0.0);
        let began = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(options.seconds)).await;
        let elapsed = began.elapsed();
        let bytes = shared.bytes.load(Ordering::Relaxed) - bytes_before;
        let master_cpu = (!master.is_empty()).then(|| procs::cpu_seconds_of(&master) - cpu_before);
        let total_cpu = procs::cpu_seconds_of(&everything) + procs::cpu_seconds(me).unwrap_or(0.0) - all_before;
        shared.stop.store(true, Ordering::Relaxed);
        for client in clients {
            let _ = client.await;
        }
        StreamRun {
            bytes,
            elapsed,
            errors: 0,
            misrouted: 0,
            master_cpu,
            master_rss_kib: procs::rss_kib_of(&master),
            total_cpu,
            first_errors: Vec::new(),
            per_worker: Vec::new(),
        }
    });
    run.per_worker = std::mem::take(&mut *shared.per_worker.lock().unwrap_or_else(|e| e.into_inner()));
    run.errors = shared.errors.load(Ordering::Relaxed);
    run.misrouted = shared.misrouted.load(Ordering::Relaxed);
    run.first_errors = std::mem::take(&mut *shared.first_errors.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(status) = running.exited() {
        return Err(format!("the server exited during the run ({status}); stderr: {}", running.log_tail(3)));
    }
    running.stop();
    crate::handoff::note_master_counters(setup, &running);
    Ok(run)
}

/// One client: open the stream, check its head, then read and count until told to stop.
async fn client(shared: Arc<Shared>, source: Ipv4Addr, target: SocketAddr, check: ReplyCheck) {
    let opened = tokio::time::timeout(HEAD_TIMEOUT, open(source, target)).await;
    let (mut stream, head, rest) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(error)) => return shared.error(format!("from {source}: {error}")),
        Err(_) => return shared.error(format!("from {source}: no stream head within {HEAD_TIMEOUT:?}")),
    };
    match check_head(&head, source, check) {
        Ok(true) => {}
        Ok(false) => {
            shared.misrouted.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => return shared.error(error),
    }
    if let Some(worker) = json_value(&head, "worker").and_then(|w| w.parse::<usize>().ok()) {
        let mut counts = shared.per_worker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(worker) {
            *count += 1;
        }
    }
    shared.bytes.fetch_add(rest as u64, Ordering::Relaxed);
    let mut buffer = vec![0u8; 256 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        // A short timeout so that a stalled stream still notices the stop.
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
            Ok(Ok(0)) => return shared.error(format!("from {source}: the stream ended early")),
            Ok(Ok(read)) => {
                shared.bytes.fetch_add(read as u64, Ordering::Relaxed);
            }
            Ok(Err(error)) => return shared.error(format!("from {source}: {error}")),
            Err(_) => {}
        }
    }
}

/// The `k`-th client's address: spread over the second-to-last and last octets (a stride through the handoff
/// generator's addresses), since a few dozen addresses that differ in one octet only are not a client
/// population: HAProxy's `balance source` sent all of 127.1.0–63.1 to one of two workers.
fn stream_source(k: u32) -> Ipv4Addr {
    load::source_address(k.wrapping_mul(4099) % 62_500)
}

/// Connects from `source`, asks for a stream, and reads through the head and the worker's JSON line. Returns
/// the stream, that text, and how many data bytes came with it.
async fn open(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<(TcpStream, String, usize)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    // Closed with RST at the end: the clients stop mid-stream, and nothing should linger in TIME_WAIT.
    socket.set_zero_linger()?;
    let mut stream = socket.connect(target).await?;
    let request =
        format!("GET /stream HTTP/1.1\r\nHost: bench\r\nUpgrade: {STREAM_UPGRADE}\r\nConnection: Upgrade\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::with_capacity(4096);
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the stream head"));
        }
        got.extend_from_slice(&buffer[..read]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if let Some(line) = got[end + 4..].iter().position(|&b| b == b'\n') {
                let head_len = end + 4 + line + 1;
                let head = String::from_utf8_lossy(&got[..head_len]).into_owned();
                return Ok((stream, head, got.len() - head_len));
            }
        }
        if got.len() > 64 * 1024 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "no stream head in 64 KiB"));
        }
    }
}

/// Checks the head of a stream as `load::check_reply` checks a reply: 101, the remote the worker saw, and for
/// the masters that promise it, the worker index of our hash. `Ok(false)`: another worker answered.
pub fn check_head(head: &str, source: Ipv4Addr, check: ReplyCheck) -> Result<bool, String> {
    if !head.starts_with("HTTP/1.1 101") {
        let first = head.lines().next().unwrap_or("(empty)");
        return Err(format!("from {source}: unexpected stream head {first:?}"));
    }
    let field = |name: &str| json_value(head, name);
    let remote = field("remote").ok_or_else(|| format!("from {source}: stream head has no remote"))?;
    let expected = if check == ReplyCheck::Sticky { Ipv4Addr::LOCALHOST } else { source };
    if remote != expected.to_string() && remote != format!("::ffff:{expected}") {
        return Err(format!("from {source}: the worker saw remote {remote}, not {expected}"));
    }
    match check {
        ReplyCheck::RemoteAndIndex { concurrency } => {
            let worker = field("worker").and_then(|w| w.parse::<u32>().ok());
            let worker = worker.ok_or_else(|| format!("from {source}: stream head has no worker index"))?;
            Ok(worker == string_hash(&remote) % concurrency.max(1))
        }
        ReplyCheck::Remote | ReplyCheck::Sticky => Ok(true),
    }
}

/// The value of `"name":` in the JSON line after a stream's head, without quotes.
fn json_value(head: &str, name: &str) -> Option<String> {
    let line = head.rsplit("\r\n\r\n").next().unwrap_or("");
    let key = format!("\"{name}\":");
    let rest = &line[line.find(&key)? + key.len()..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    rest.find(['"', ',', '}']).map(|end| rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::stream_head;

    #[test]
    fn a_stream_head_is_checked_like_a_reply() {
        let source = Ipv4Addr::new(127, 1, 0, 7);
        let peer = SocketAddr::from((source, 4000));
        let index = string_hash("::ffff:127.1.0.7") % 2;
        let right = stream_head(index, peer);
        assert_eq!(check_head(&right, source, ReplyCheck::RemoteAndIndex { concurrency: 2 }), Ok(true));
        let wrong = stream_head(1 - index, peer);
        assert_eq!(check_head(&wrong, source, ReplyCheck::RemoteAndIndex { concurrency: 2 }), Ok(false));
        assert!(check_head(&right, Ipv4Addr::new(127, 1, 0, 8), ReplyCheck::Remote).is_err());
        assert!(check_head(&right, source, ReplyCheck::Sticky).is_err());
        let proxied = stream_head(0, SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)));
        assert_eq!(check_head(&proxied, source, ReplyCheck::Sticky), Ok(true));
        assert!(check_head("HTTP/1.1 200 OK\r\n\r\n{}\n", source, ReplyCheck::Remote).is_err());
    }
}
