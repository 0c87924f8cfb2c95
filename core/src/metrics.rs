//! Metrics for operators: a Prometheus text page of the master's counters (connections routed per
//! worker, redirected, closed, revivals, queue depth, readiness, header waits), served on its own address.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

use crate::client_address::header_wait::HeaderWaitGauge;

/// Scrapes answered at once; more are closed unanswered (a scraper polls every few seconds).
pub const SCRAPE_LIMIT: usize = crate::config::defaults::SCRAPE_LIMIT;

/// One worker index as the metrics page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerGauge {
    /// Connections handed to this index so far.
    pub routed: u64,
    /// Connections waiting for this index now.
    pub queued: usize,
    /// Whether the worker takes connections now.
    pub ready: bool,
}

/// Renders the page in the Prometheus text format.
pub fn render(
    workers: &[WorkerGauge],
    stats: &crate::master::Stats,
    header_wait: &HeaderWaitGauge,
    attach_handshakes: usize,
) -> String {
    let mut page = String::new();
    let mut family = |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (Option<usize>, String)>| {
        let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (worker, value) in values {
            match worker {
                Some(index) => _ = writeln!(page, "{name}{{worker=\"{index}\"}} {value}"),
                None => _ = writeln!(page, "{name} {value}"),
            }
        }
    };
    let per_worker = |f: fn(&WorkerGauge) -> String| workers.iter().enumerate().map(move |(i, w)| (Some(i), f(w)));
    family(
        "sticky_cluster_connections_routed_total",
        "counter",
        "Connections handed to each worker.",
        &mut per_worker(|w| w.routed.to_string()),
    );
    family(
        "sticky_cluster_queue_depth",
        "gauge",
        "Connections waiting for a worker that is not ready.",
        &mut per_worker(|w| w.queued.to_string()),
    );
    family(
        "sticky_cluster_worker_ready",
        "gauge",
        "1 when the worker takes connections.",
        &mut per_worker(|w| u8::from(w.ready).to_string()),
    );
    family(
        "sticky_cluster_connections_redirected_total",
        "counter",
        "Connections served by another worker because theirs was not ready in time.",
        &mut std::iter::once((None, stats.redirected.to_string())),
    );
    family(
        "sticky_cluster_connections_closed_total",
        "counter",
        "Connections closed unserved (no ready worker in time, or shutdown).",
        &mut std::iter::once((None, stats.closed.to_string())),
    );
    family(
        "sticky_cluster_worker_revivals_total",
        "counter",
        "Worker processes started again after one died.",
        &mut std::iter::once((None, stats.revivals.to_string())),
    );
    family(
        "sticky_cluster_connections_recovered_total",
        "counter",
        "Connections taken back from a dead worker's channel (sent, never received) and served by another.",
        &mut std::iter::once((None, stats.recovered.to_string())),
    );
    family(
        "sticky_cluster_reload_failures_total",
        "counter",
        "Reloads given up because a successor could not start or get ready; the old workers kept serving.",
        &mut std::iter::once((None, stats.reload_failures.to_string())),
    );
    let mut single = |name: &str, kind: &str, help: &str, value: String| {
        family(name, kind, help, &mut std::iter::once((None, value)));
    };
    single(
        "sticky_cluster_header_waiting",
        "gauge",
        "Connections from trusted proxies waiting for their PROXY or X-Forwarded-For header.",
        header_wait.waiting.to_string(),
    );
    single(
        "sticky_cluster_header_wait_limit",
        "gauge",
        "headerWait.limit: connections that may wait for their header at once.",
        header_wait.limit.to_string(),
    );
    single(
        "sticky_cluster_header_wait_refused_total",
        "counter",
        "Connections closed because headerWait.limit connections were waiting.",
        header_wait.refused.to_string(),
    );
    single(
        "sticky_cluster_proxy_header_rejected_total",
        "counter",
        "Connections from trusted proxies closed for a missing, broken or late PROXY header.",
        header_wait.rejected.to_string(),
    );
    single(
        "sticky_cluster_header_wait_timeouts_total",
        "counter",
        "Connections whose header did not come within headerWait.maxWait.",
        header_wait.timed_out.to_string(),
    );
    single(
        "sticky_cluster_attach_handshakes",
        "gauge",
        "Workers that dialed the attach socket and whose hello is awaited (at most 64 at once).",
        attach_handshakes.to_string(),
    );
    page
}

/// At most [`SCRAPE_LIMIT`] scrapes served at once, so slow or flooding scrapers cannot hold the
/// master's fds; the first refusal of an episode is logged.
#[derive(Debug, Default)]
pub struct ScrapeLimit {
    active: Arc<AtomicUsize>,
    logged: Arc<AtomicBool>,
}

impl ScrapeLimit {
    /// Answers `stream` with `page` on a task, or closes it when [`SCRAPE_LIMIT`] scrapes are running.
    /// Returns whether it is answered. Must be called inside a tokio runtime.
    pub fn serve(&self, stream: TcpStream, page: String) -> bool {
        if self.active.fetch_add(1, Ordering::SeqCst) >= SCRAPE_LIMIT {
            self.active.fetch_sub(1, Ordering::SeqCst);
            if !self.logged.swap(true, Ordering::SeqCst) {
                warn!("{SCRAPE_LIMIT} metrics scrapes are running: closing new ones until they finish");
            }
            return false;
        }
        let (active, logged) = (self.active.clone(), self.logged.clone());
        tokio::spawn(async move {
            serve(stream, page).await;
            if active.fetch_sub(1, Ordering::SeqCst) == 1 {
                logged.store(false, Ordering::SeqCst);
            }
        });
        true
    }

    /// Scrapes being answered now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

/// Answers one HTTP request on `stream` with `page` (`/metrics` or `/`; anything else is 404).
pub async fn serve(stream: TcpStream, page: String) {
    let answer = async move {
        stream.set_nonblocking(true)?;
        let mut stream = tokio::net::TcpStream::from_std(stream)?;
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buffer[..read]);
        }
        let text = String::from_utf8_lossy(&head);
        let path = text.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = match path {
            "/metrics" | "/" => ("200 OK", page),
            _ => ("404 Not Found", "not found: try /metrics\n".to_string()),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    // A scraper that stalls must not hold its fd for long.
    let _: Result<std::io::Result<()>, _> = tokio::time::timeout(Duration::from_secs(5), answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_line_per_worker_and_the_totals() {
        let workers =
            [WorkerGauge { routed: 5, queued: 0, ready: true }, WorkerGauge { routed: 0, queued: 3, ready: false }];
        let waits = HeaderWaitGauge { waiting: 3, limit: 1024, refused: 7, rejected: 2, timed_out: 1 };
        let stats = crate::master::Stats {
            routed: vec![5, 0],
            redirected: 2,
            closed: 1,
            revivals: 4,
            recovered: 9,
            reload_failures: 6,
        };
        let page = render(&workers, &stats, &waits, 5);
        assert!(page.contains("sticky_cluster_connections_routed_total{worker=\"0\"} 5\n"));
        assert!(page.contains("sticky_cluster_queue_depth{worker=\"1\"} 3\n"));
        assert!(page.contains("sticky_cluster_worker_ready{worker=\"1\"} 0\n"));
        assert!(page.contains("sticky_cluster_connections_redirected_total 2\n"));
        assert!(page.contains("sticky_cluster_connections_closed_total 1\n"));
        assert!(page.contains("sticky_cluster_worker_revivals_total 4\n"));
        assert!(page.contains("sticky_cluster_connections_recovered_total 9\n"));
        assert!(page.contains("sticky_cluster_reload_failures_total 6\n"));
        assert!(page.contains("# TYPE sticky_cluster_queue_depth gauge\n"));
        assert!(page.contains("sticky_cluster_header_waiting 3\n"));
        assert!(page.contains("sticky_cluster_header_wait_refused_total 7\n"));
        assert!(page.contains("sticky_cluster_proxy_header_rejected_total 2\n"));
        assert!(page.contains("sticky_cluster_attach_handshakes 5\n"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn scrapes_past_the_limit_are_closed_unanswered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let limit = ScrapeLimit::default();
        // Scrapers that connect and say nothing hold their slot (until the 5 s answer limit).
        let mut silent = Vec::new();
        for _ in 0..SCRAPE_LIMIT {
            silent.push(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            assert!(limit.serve(listener.accept().unwrap().0, "page".into()));
        }
        let mut late = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!limit.serve(listener.accept().unwrap().0, "page".into()));
        let mut answer = Vec::new();
        std::io::Read::read_to_end(&mut late, &mut answer).unwrap();
        assert!(answer.is_empty(), "closed without an answer");
        assert_eq!(limit.active(), SCRAPE_LIMIT);
        drop(silent);
        for _ in 0..100 {
            if limit.active() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(limit.active(), 0, "a scraper that hangs up frees its slot");
    }
}
