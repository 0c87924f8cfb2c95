'use strict';
// The JavaScript master, for machines without the native addon: listens, hashes each client address,
// and passes the socket to that index's worker over Node's IPC channel (as the npm sticky-cluster module
// does); queues connections for a worker that is not ready, redirects what waits too long, shuts down in
// order. It follows core's master step for step, with the same log lines and metrics; the workers' lives
// are js/workers.js and the rolling restart js/reload.js (core: master/workers.rs, master/reload.rs).
//
// At most IN_FLIGHT_LIMIT connections per worker are on their way (in Node's IPC, which passes one handle
// at a time until the worker acknowledges it): the rest wait in this master's bounded queue, where they
// are visible, expire after queue.maxWait and are redirected, instead of in Node's unbounded handle queue.
// The master keeps its copy of each socket on its way until the worker says it took it, so when a worker
// dies first those connections are taken back and served by the index's next worker, as core takes back
// what a dead worker's channel holds.

const net = require('net');
const { routeIndex } = require('./hash');
const { createLogger, formatDuration, formatSocketAddress } = require('./log');
const { render, serveMetrics } = require('./metrics');
const protocol = require('./protocol');
const defaults = require('./defaults.json');

const TICK_MS = defaults.queueTickMs;
/** Connections sent to one worker and not yet acknowledged: the JavaScript master's channel capacity,
 * near what the native master's channel holds (~278), so both absorb the same bursts. */
const IN_FLIGHT_LIMIT = 256;

/** The master's state and its routing half; js/workers.js and js/reload.js add the rest of its methods. */
class JsMaster {
  constructor(settings, { command, envOf, onListening, onListenError, onEnd }) {
    this.settings = { ...settings };
    this.log = createLogger(settings.prefix, settings.debug);
    this.concurrency = settings.concurrency;
    Object.assign(this, { command, envOf, onListening, onListenError, onEnd });
    this.slots = Array.from({ length: this.concurrency }, (_, index) => ({
      index,
      generation: 0,
      // Connections for this index not yet on their way to a worker; bounded by queue.limit.
      queue: [],
      stuckReported: false,
      crashes: 0,
      // The worker that gets this index's connections (null: down, waiting for its revival).
      current: null,
      // A reload's new worker, starting beside `current`; it replaces it once ready.
      successor: null,
      // Earlier workers on their way out: they get nothing new, and what they never took comes back.
      retiring: [],
      downSince: Date.now(),
    }));
    this.stats = { routed: new Array(this.concurrency).fill(0), redirected: 0, closed: 0, revivals: 0, recovered: 0, reloadFailures: 0 };
    // running | draining (a graceful stop until the deadline) | killed
    this.phase = 'running';
    this.ended = false;
    this.bound = null;
    this.metricsServer = null;
    this.deadlineTimer = null;
    // queue.perSource: connections each client address has waiting in the queues, and the ones closed past it.
    this.waiting = new Map();
    this.perSourceClosed = 0;
    // An episode of connections closed unserved: { since, last, perSource, noWorker }, logged once.
    this.closing = null;
    this.restartsPending = [];
    this.restarting = null;
    this.beforeReload = null;
    this.ticker = setInterval(() => this.expireQueues(), TICK_MS);
    this.server = net.createServer({ pauseOnConnect: true }, (socket) => this.route(socket));
    this.server.on('error', (error) => {
      if (this.bound) this.log.warn(`accept failed: ${error.message}`);
    });
    this.listen(settings.host);
  }

  /** Whether the cluster still routes (neither draining nor killed). */
  get running() {
    return this.phase === 'running';
  }

  /** Binds the client listener on `host` (`::` falls back to 0.0.0.0 on a machine without IPv6). */
  listen(host) {
    const onError = (error) => {
      this.server.removeListener('listening', onListening);
      const noIpv6 = error.code === 'EAFNOSUPPORT' || error.code === 'EADDRNOTAVAIL';
      if (host === '::' && noIpv6) {
        this.log.info(`no IPv6 on this machine: listening on 0.0.0.0:${this.settings.port} instead of [::]`);
        this.listen('0.0.0.0');
        return;
      }
      this.listenFailed(error);
    };
    const onListening = () => {
      this.server.removeListener('error', onError);
      const address = this.server.address();
      this.bound = { address: address.address, port: address.port };
      if (this.settings.metrics) this.startMetrics();
      else this.listening();
    };
    this.server.once('error', onError);
    this.server.once('listening', onListening);
    // Node takes an int32 backlog; the kernel caps it at net.core.somaxconn long before that anyway.
    this.server.listen({ host, port: this.settings.port, backlog: Math.min(this.settings.backlog, 2147483647) });
  }

  /** Nothing could be bound: nothing starts, and `onListenError` gets the error. */
  listenFailed(error) {
    this.server.close();
    clearInterval(this.ticker);
    this.ended = true;
    this.onListenError(error);
  }

  /** Everything is bound: says so, and starts one worker per index. */
  listening() {
    const { address, port } = this.bound;
    this.log.info(`listening on ${formatSocketAddress(address, port)} with ${this.concurrency} workers`);
    this.onListening({ address, port, workers: this.concurrency, metrics: this.metricsBound || null });
    if (this.running) for (const slot of this.slots) this.startProcess(slot.index, 'current');
    this.finishIfDone();
  }

  /** The metrics page, bound before the workers start (a bind error is a listen error, as in core). */
  startMetrics() {
    this.metricsServer = serveMetrics({
      ...this.settings.metrics,
      limit: defaults.scrapeLimit,
      snapshot: () =>
        render(
          this.slots.map((slot) => ({
            routed: this.stats.routed[slot.index],
            queued: slot.queue.length,
            ready: slot.current !== null && slot.current.state === 'ready',
          })),
          this.stats,
          {
            limit: this.settings.queue.perSource,
            busiest: Math.max(0, ...this.waiting.values()),
            closed: this.perSourceClosed,
          }
        ),
      onListening: (address, port) => {
        this.log.info(`metrics on http://${formatSocketAddress(address, port)}/metrics`);
        this.metricsBound = { address, port };
        this.listening();
      },
      onError: (error) => this.listenFailed(error),
    });
  }

  /** An accepted client: its index by the string-hash of its address, then deliver. */
  /** An accepted client: its index by the string-hash of its address, then deliver, unless its address
   * already has queue.perSource connections waiting. */
  route(socket) {
    // A client that resets while queued must not crash the master; its worker sees the reset.
    socket.on('error', () => {});
    const address = socket.remoteAddress || '';
    const index = routeIndex(address, this.concurrency);
    this.log.debug(`connection ${address} -> worker ${index}`);
    const perSource = this.settings.queue.perSource;
    if ((this.waiting.get(address) || 0) >= perSource) {
      this.perSourceClosed += 1;
      const why = `its address has ${perSource} connections waiting (queue.perSource)`;
      return this.closeUnserved(index, { socket, address, ticketed: false }, 'perSource', why);
    }
    this.deliver(index, this.waitingEntry(socket));
  }

  /** A queue entry for `socket`, counted against its address's queue.perSource until it leaves. */
  waitingEntry(socket) {
    const address = socket.remoteAddress || '';
    this.waiting.set(address, (this.waiting.get(address) || 0) + 1);
    return { socket, address, arrived: Date.now(), ticketed: true };
  }

  /** The entry has left the queues (sent or closed): its address has one fewer waiting. */
  release(entry) {
    if (!entry.ticketed) return;
    entry.ticketed = false;
    const left = this.waiting.get(entry.address) - 1;
    if (left > 0) this.waiting.set(entry.address, left);
    else this.waiting.delete(entry.address);
  }

  /** Queues the connection for its worker (bounded by queue.limit) and sends what the worker can take
   * now; past the bound it goes to the next ready worker. */
  deliver(index, entry) {
    const slot = this.slots[index];
    if (slot.queue.length < this.settings.queue.limit && this.running) {
      slot.queue.push(entry);
      this.flush(index);
    } else {
      this.reportStuck(slot, 'its queue is full; new connections go to other workers');
      this.redirect(index, entry, 'its queue is full');
    }
  }

  /** Sends the head of the queue while the current worker is ready and has room, then what each worker
   * of the index still has to be told (shutdown, once what waits for it is on its way). */
  flush(index) {
    const slot = this.slots[index];
    const current = slot.current;
    while (current && current.state === 'ready' && current.inFlight.size < IN_FLIGHT_LIMIT && slot.queue.length > 0) {
      const entry = slot.queue.shift();
      this.release(entry);
      if (entry.socket.destroyed) {
        // The client gave up while it waited.
        this.stats.closed += 1;
        continue;
      }
      this.send(current, entry.socket);
    }
    if (slot.queue.length === 0) slot.stuckReported = false;
    for (const worker of this.processesOf(slot)) {
      const waitsForQueue = worker === current && worker.state === 'ready' && slot.queue.length > 0;
      if (worker.farewell && !waitsForQueue) this.sendFarewell(worker);
    }
  }

  /** Puts `socket` on its way to `worker`, numbered, keeping the master's copy until TAKEN. */
  send(worker, socket) {
    const seq = worker.nextSeq;
    worker.nextSeq += 1;
    worker.inFlight.set(seq, socket);
    this.stats.routed[worker.index] += 1;
    // keepOpen: this copy stays open until the worker's TAKEN, so a worker that dies first loses nothing.
    worker.child.send(protocol.message(protocol.CONNECTION, { seq }), socket, { keepOpen: true }, (error) => {
      // The channel is closed (the worker is dying): its exit takes the connection back.
      if (error) this.log.debug(`worker ${worker.index}'s channel refused a connection (${error.code || error.message})`);
    });
  }

  /**
   * The worker has its own copy of connection `seq`: close ours. IPC keeps the order, so one sent before
   * it and still on its way never arrived (Node drops a handle the worker could not receive, with
   * keepOpen without a retry): it goes back to the head of the queue and is sent again.
   */
  onTaken(worker, seq) {
    const socket = worker.inFlight.get(seq);
    if (socket === undefined) return;
    const lost = [];
    for (const [earlier, other] of worker.inFlight) {
      if (earlier >= seq) break;
      lost.push(this.waitingEntry(other));
      worker.inFlight.delete(earlier);
      this.stats.routed[worker.index] -= 1;
    }
    if (lost.length > 0) this.log.debug(`worker ${worker.index} never got ${lost.length} connections; sending them again`);
    this.slots[worker.index].queue.unshift(...lost);
    worker.inFlight.delete(seq);
    socket.destroy();
    this.flush(worker.index);
  }

  /** After `worker` is gone: what it never acknowledged goes back, in order, to the head of its
   * index's queue. Returns how many. */
  takeBack(worker) {
    const unreceived = [...worker.inFlight.values()];
    worker.inFlight = new Map();
    const alive = unreceived.filter((socket) => !socket.destroyed);
    // A client that gave up meanwhile is not served again: counted as closed.
    this.stats.closed += unreceived.length - alive.length;
    this.stats.routed[worker.index] -= unreceived.length;
    this.stats.recovered += alive.length;
    this.slots[worker.index].queue.unshift(...alive.map((socket) => this.waitingEntry(socket)));
    return alive.length;
  }

  /** Logs once per episode that a ready worker does not take what it is sent. */
  reportStuck(slot, what) {
    const current = slot.current;
    if (!current || current.state !== 'ready' || slot.stuckReported) return;
    slot.stuckReported = true;
    this.log.warn(`worker ${slot.index} (pid ${current.pid}) is not reading its channel (${slot.queue.length} connections wait): ${what}`);
  }

  /** Gives a connection whose own worker cannot take it to the next ready worker with room, or closes it.
   * A redirected connection waits up to queue.maxWait again at its new worker. */
  redirect(from, entry, why) {
    let next = null;
    for (let step = 1; step < this.concurrency && next === null; step += 1) {
      const slot = this.slots[(from + step) % this.concurrency];
      if (slot.current && slot.current.state === 'ready' && slot.queue.length < this.settings.queue.limit) next = slot.index;
    }
    if (next !== null && this.running) {
      this.stats.redirected += 1;
      this.log.debug(`connection ${entry.address} for worker ${from} goes to worker ${next}: ${why}`);
      entry.arrived = Date.now();
      this.slots[next].queue.push(entry);
      this.flush(next);
    } else {
      this.closeUnserved(from, entry, 'noWorker', `${why} and no other worker is ready`);
    }
  }

  /** Closes a connection unserved and counts it; the first of an episode is logged with why, as in core. */
  closeUnserved(index, entry, reason, why) {
    this.release(entry);
    entry.socket.destroy();
    this.stats.closed += 1;
    const now = Date.now();
    if (this.closing === null) {
      this.log.warn(
        `closing connection from ${entry.address} for worker ${index}: ${why}; further connections closed unserved ` +
          'are counted, and summed up when none was for a second'
      );
      this.closing = { since: now, last: now, perSource: 0, noWorker: 0 };
    }
    this.closing.last = now;
    this.closing[reason] += 1;
  }

  /** Ends an episode of closed connections a second after the last one, with their count. */
  endClosingEpisode() {
    const closing = this.closing;
    if (closing === null || Date.now() - closing.last < 1000) return;
    this.closing = null;
    this.log.warn(
      `closed ${closing.perSource + closing.noWorker} connections unserved over ${((closing.last - closing.since) / 1000).toFixed(1)}s: ` +
        `${closing.perSource} past queue.perSource, ${closing.noWorker} with no ready worker that had room`
    );
  }

  /** Every tick: connections that waited longer than queue.maxWait for their worker go to the next ready one. */
  expireQueues() {
    this.endClosingEpisode();
    const now = Date.now();
    for (const slot of this.slots) {
      const expired = () => slot.queue.length > 0 && now - slot.queue[0].arrived >= this.settings.queue.maxWait;
      if (!expired()) continue;
      this.reportStuck(slot, 'connections waiting longer than queue.maxWait go to other workers');
      const due = [];
      while (expired()) due.push(slot.queue.shift());
      for (const entry of due) this.redirect(slot.index, entry, 'it was not ready within queue.maxWait');
    }
  }

  /** Closes and counts every connection waiting for `slot`. */
  closeQueue(slot) {
    for (const entry of slot.queue) {
      this.release(entry);
      entry.socket.destroy();
    }
    this.stats.closed += slot.queue.length;
    slot.queue = [];
  }

  /** SIGTERM/SIGINT: drain (shutdown to every worker, kill after hardShutdownDelay), or `hard`: kill now. */
  stop(hard) {
    if (this.ended) return false;
    if (hard) {
      this.log.warn('second signal: stopping at once');
      if (this.running) this.stopListening();
      this.killAll();
    } else if (this.running) {
      const delay = this.settings.hardShutdownDelay;
      this.log.info(`shutting down: ${this.concurrency} workers have ${formatDuration(delay)} to finish`);
      this.stopListening();
      this.deadlineTimer = setTimeout(() => {
        this.log.warn(`hardShutdownDelay of ${formatDuration(delay)} passed: killing the remaining workers`);
        this.killAll();
      }, delay);
      for (const slot of this.slots) {
        // SIGTERM as well, as the npm module sends, once the shutdown message is on its way.
        for (const worker of this.processesOf(slot)) worker.farewell = { terminate: true };
        this.flush(slot.index);
      }
    }
    this.finishIfDone();
    return true;
  }

  /** Closes the listeners; the queues of workers that are not ready are closed and counted. */
  stopListening() {
    this.phase = 'draining';
    if (this.bound) this.server.close();
    if (this.metricsServer) this.metricsServer.close();
    // A ready worker still gets what waits for it, then the shutdown; what waits for a worker that is
    // not ready is closed and counted.
    for (const slot of this.slots) if (!slot.current || slot.current.state !== 'ready') this.closeQueue(slot);
  }

  /** SIGKILL to every worker process; every queue closed and counted. */
  killAll() {
    this.phase = 'killed';
    for (const slot of this.slots) {
      this.closeQueue(slot);
      for (const worker of this.processesOf(slot)) worker.child.kill('SIGKILL');
    }
  }

  /** Once stopping and no worker process is left: the closing counters line, then `onEnd`. */
  finishIfDone() {
    if (this.ended || this.running || this.slots.some((slot) => this.processesOf(slot).length > 0)) return;
    this.ended = true;
    clearInterval(this.ticker);
    clearTimeout(this.deadlineTimer);
    const { routed, redirected, closed, revivals, recovered } = this.stats;
    this.log.info(
      `stopped: routed ${routed.reduce((sum, n) => sum + n, 0)} connections [${routed.join(', ')}], ` +
        `redirected ${redirected}, closed ${closed}, revivals ${revivals}, recovered ${recovered}`
    );
    this.onEnd({ graceful: this.phase !== 'killed', stats: this.stats });
  }
}

Object.assign(JsMaster.prototype, require('./workers'), require('./reload'));

/**
 * Starts the master. `envOf(index)` gives a worker's extra environment; `onListenError(error)` gets a
 * failed listen (nothing else starts then), `onListening({ address, port, workers, metrics })` the
 * bound addresses before the first worker starts; `onEnd({ graceful, stats })` is called once every worker is gone
 * after a stop. Returns `{ address, port, stop(hard), reload(settings, envOf) }`; address and port are
 * null until bound. `settings` are checked already (js/validate.js).
 */
function startJsMaster(settings, hooks) {
  const master = new JsMaster(settings, hooks);
  return {
    get address() {
      return master.bound ? master.bound.address : null;
    },
    get port() {
      return master.bound ? master.bound.port : null;
    },
    stop: (hard = false) => master.stop(Boolean(hard)),
    reload: (next, nextEnvOf) => master.reload(next, nextEnvOf),
  };
}

module.exports = { startJsMaster, IN_FLIGHT_LIMIT };
