'use strict';
// The JavaScript master's Prometheus page: the families of core/src/metrics.rs that apply to it, under
// the same names (routed, queue depth, readiness per worker; redirected, closed, revivals, recovered,
// reload failures, queue.perSource), so
// one dashboard reads either implementation.

const http = require('http');

/** One family: `# HELP`, `# TYPE`, then a line per worker index or a single value. */
function family(name, kind, help, values) {
  const lines = [`# HELP ${name} ${help}`, `# TYPE ${name} ${kind}`];
  for (const [worker, value] of values) lines.push(worker === null ? `${name} ${value}` : `${name}{worker="${worker}"} ${value}`);
  return lines.join('\n');
}

/** The page for `workers` ([{ routed, queued, ready }]), the master's counters and `perSource`
 * ({ limit, busiest, closed }: queue.perSource). */
function render(workers, { redirected, closed, revivals, recovered, reloadFailures }, perSource) {
  const perWorker = (pick) => workers.map((worker, index) => [index, pick(worker)]);
  return (
    [
      family('sticky_cluster_connections_routed_total', 'counter', 'Connections handed to each worker.', perWorker((w) => w.routed)),
      family('sticky_cluster_queue_depth', 'gauge', 'Connections waiting for a worker that is not ready.', perWorker((w) => w.queued)),
      family('sticky_cluster_worker_ready', 'gauge', '1 when the worker takes connections.', perWorker((w) => (w.ready ? 1 : 0))),
      family(
        'sticky_cluster_connections_redirected_total',
        'counter',
        'Connections served by another worker because theirs was not ready in time.',
        [[null, redirected]]
      ),
      family(
        'sticky_cluster_connections_closed_total',
        'counter',
        'Connections closed unserved (no ready worker in time, or shutdown).',
        [[null, closed]]
      ),
      family('sticky_cluster_worker_revivals_total', 'counter', 'Worker processes started again after one died.', [[null, revivals]]),
      family(
        'sticky_cluster_connections_recovered_total',
        'counter',
        "Connections taken back from a dead worker's channel (sent, never received) and served by another.",
        [[null, recovered]]
      ),
      family(
        'sticky_cluster_reload_failures_total',
        'counter',
        'Reloads given up because a successor could not start or get ready; the old workers kept serving.',
        [[null, reloadFailures]]
      ),
      family(
        'sticky_cluster_queue_per_source_limit',
        'gauge',
        'queue.perSource: connections of one client address that may wait in the master at once.',
        [[null, perSource.limit]]
      ),
      family(
        'sticky_cluster_queue_per_source_busiest',
        'gauge',
        'The most connections one client address has waiting in the master now.',
        [[null, perSource.busiest]]
      ),
      family(
        'sticky_cluster_connections_per_source_closed_total',
        'counter',
        'Connections closed unserved because their address had queue.perSource connections waiting.',
        [[null, perSource.closed]]
      ),
    ].join('\n') + '\n'
  );
}

/**
 * Serves `GET /metrics` with `snapshot()`'s page on `host:port`, at most `limit` scrapes at once (more
 * are closed unanswered, as in core). `onListening(address, port)` once bound, `onError(error)` if not.
 */
function serveMetrics({ host, port, limit, snapshot, onListening, onError }) {
  const server = http.createServer((request, response) => {
    if (request.method !== 'GET' || request.url !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try GET /metrics\n');
      return;
    }
    response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(snapshot());
  });
  server.maxConnections = limit;
  server.once('error', onError);
  server.listen({ host, port }, () => {
    server.removeListener('error', onError);
    const address = server.address();
    onListening(address.address, address.port);
  });
  return server;
}

module.exports = { render, serveMetrics };
