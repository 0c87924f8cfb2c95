// Types of sticky-cluster-native: the npm sticky-cluster API (same options, same defaults) plus `host`.
/// <reference types="node" />
import * as net from 'net';

declare namespace stickyCluster {
  /** Hands the worker's server over; do not call `server.listen()`. */
  type Callback = (server: net.Server) => void;
  /** Runs in every worker: set the app up (async is fine), then `callback(server)`. */
  type InitializeFn = (callback: Callback) => void;

  interface Options {
    /** Number of workers, 1 to 1024. Default: the number of CPUs (at most 1024). */
    concurrency?: number;
    /** Port clients connect to. Default: 8080; 0 picks a free port. */
    port?: number;
    /** Address to listen on. Default: `::` (dual-stack, like Node). */
    host?: string;
    /** Log every worker start/exit and every routed connection to stderr. Default: false. */
    debug?: boolean;
    /** Text in front of every log line. Default: `sticky-cluster:`. */
    prefix?: string;
    /** Extra environment per worker index. Default: `index => ({ stickycluster_worker_index: index })`. */
    env?: (index: number) => Record<string, string | number | boolean | undefined>;
    /** Milliseconds a graceful shutdown may take before workers are killed, 0 to 2147483647. Default: 60000. */
    hardShutdownDelay?: number;
    /** Where the routing hash takes the client address from (native master only). Default: 'peer'. */
    clientAddress?: 'peer' | 'proxy-protocol' | 'x-forwarded-for';
    /** Balancers whose PROXY/X-Forwarded-For headers are believed (CIDR blocks); required unless clientAddress is 'peer'. */
    trustedProxies?: string[];
    /** `handoff` (default: the master hands each socket on) or `kernel` (each worker accepts from its own
     *  SO_REUSEPORT listener, routed by a BPF program; native addon only). */
    routing?: 'handoff' | 'kernel';
    /** Listen backlog of the client listener (each worker's with routing 'kernel'). Default: 1024. */
    backlog?: number;
    /** Connections that wait for one worker that does not take them (starting, or its event loop blocked):
     *  at most `limit` (default 1024) for at most `maxWait` ms (default 10000), then the next ready worker;
     *  at most `perSource` (default 1024) from one client address over every queue, past it closed and counted. */
    queue?: { limit?: number; maxWait?: number; perSource?: number };
    /** Serve Prometheus metrics (`GET /metrics`: routed, queue depth, readiness, redirected, closed, revivals,
     *  recovered) on `host` (default 127.0.0.1) and `port` (0 picks a free one, logged as `metrics on ...`). */
    metrics?: { port: number; host?: string };
    /** Gets listen errors (a Node-style Error with `code`, e.g. EADDRINUSE). Default: log and exit 1. */
    errorHandler?: (error: NodeJS.ErrnoException & { address?: string; port?: number }) => void;
  }

  /** Which master runs: the Rust addon, or the JavaScript fallback where no addon is built. */
  type Implementation = 'native' | 'js';

  /** What the primary process gets back (the npm module returns nothing; workers get undefined). */
  interface Cluster {
    /** `'native'` or `'js'`, chosen by `STICKY_CLUSTER_NATIVE` (0: js, 1: native or throw, unset: native where built). */
    readonly implementation: Implementation;
    /** The address the master listens on, as Node prints it; `null` with `'js'` until the listener is bound. */
    readonly address: string | null;
    /** The port the master listens on (the real one when 0 was asked for); `null` with `'js'` until bound. */
    readonly port: number | null;
    /** Stops the cluster as SIGTERM does; `hard` kills the workers at once. False once it has ended. */
    stop(hard?: boolean): boolean;
    /** Restarts the workers one at a time (each successor ready before the next index stops; no connection
     *  is lost), with `changes` applied over the options `start` was given: `env`, `queue` and
     *  `hardShutdownDelay` take effect; port, host, concurrency, routing, backlog, debug and prefix need a
     *  restart (logged). Throws a TypeError for an option out of bounds; false once the cluster has ended.
     *  Call it from your own `process.on('SIGHUP')` (see the README's "Reloading"). */
    reload(changes?: Options): boolean;
  }
}

/**
 * Starts a sticky cluster: in the primary the master, in each worker `startFn(callback)`. Throws the
 * `ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT` error when `STICKY_CLUSTER_NATIVE=1` and no addon is built.
 */
declare function stickyCluster(
  startFn: stickyCluster.InitializeFn,
  options?: stickyCluster.Options
): stickyCluster.Cluster | undefined;

export = stickyCluster;
