// sticky-cluster-native from TypeScript: an ES module that sets every option (types from index.d.ts),
// checked by `npm run check` (tsc --strict --noEmit) and runnable as it is where TypeScript runs
// directly: Node 22.18 and later, Bun, Deno (`deno run -A app.ts`). PORT picks the port (default 8080).

import http from 'node:http';
import process from 'node:process';
import stickyCluster from 'sticky-cluster-native';
import type { Cluster, Options } from 'sticky-cluster-native';

const options: Options = {
  concurrency: 2,
  port: Number(process.env.PORT ?? 8080),
  host: '::',
  debug: process.env.NODE_ENV === 'development',
  prefix: 'ts-app:',
  env: (index: number) => ({ APP_SHARD: `shard-${index}`, APP_CACHE_MB: 64 }),
  hardShutdownDelay: 10_000,
  clientAddress: 'peer',
  trustedProxies: [],
  routing: 'handoff',
  backlog: 1024,
  queue: { limit: 1024, maxWait: 10_000, perSource: 1024 },
  // Port 0: a free one, logged as `metrics on http://...`.
  metrics: { port: Number(process.env.METRICS_PORT ?? 0), host: '127.0.0.1' },
  errorHandler: (error) => {
    console.error(`cannot listen on ${error.address}:${error.port}: ${error.code}`);
    process.exit(1);
  },
};

const cluster: Cluster | undefined = stickyCluster((callback) => {
  const server = http.createServer((request, response) => {
    response.setHeader('content-type', 'application/json');
    response.end(JSON.stringify({ shard: process.env.APP_SHARD, pid: process.pid, you: request.socket.remoteAddress }));
  });
  // Async setup goes here; connections wait in the master until callback(server).
  setTimeout(() => callback(server), 10);
}, options);

if (cluster) {
  const { implementation, address, port } = cluster;
  console.error(`ts-app: ${implementation} master on ${address ?? 'a port bound in a moment'}:${port ?? ''}`);
  process.once('SIGUSR2', () => cluster.stop(false));
}
