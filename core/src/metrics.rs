//! Metrics for operators: a Prometheus text page of the master's counters (connections routed per
//! worker, redirected, closed, revivals, queue depth, readiness), served on its own address.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
pub fn render(workers: &[WorkerGauge], redirected: u64, closed: u64, revivals: u64) -> String {
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
        &mut std::iter::once((None, redirected.to_string())),
    );
    family(
        "sticky_cluster_connections_closed_total",
        "counter",
        "Connections closed unserved (no ready worker in time, or shutdown).",
        &mut std::iter::once((None, closed.to_string())),
    );
    family(
        "sticky_cluster_worker_revivals_total",
        "counter",
        "Worker processes started again after one died.",
        &mut std::iter::once((None, revivals.to_string())),
    );
    page
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
        let page = render(&workers, 2, 1, 4);
        assert!(page.contains("sticky_cluster_connections_routed_total{worker=\"0\"} 5\n"));
        assert!(page.contains("sticky_cluster_queue_depth{worker=\"1\"} 3\n"));
        assert!(page.contains("sticky_cluster_worker_ready{worker=\"1\"} 0\n"));
        assert!(page.contains("sticky_cluster_connections_redirected_total 2\n"));
        assert!(page.contains("sticky_cluster_connections_closed_total 1\n"));
        assert!(page.contains("sticky_cluster_worker_revivals_total 4\n"));
        assert!(page.contains("# TYPE sticky_cluster_queue_depth gauge\n"));
    }
}
