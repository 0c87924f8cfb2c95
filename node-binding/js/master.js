'use strict';
// The JavaScript master, for machines without the native addon: listens, hashes each client address,
// and passes the socket to that index's worker over Node's IPC channel (as the npm sticky-cluster module
// does); queues connections for a worker that is not ready, revives dead workers, shuts down in order.
// It follows core's master step for step, with the same log lines and metrics.
//
// At most IN_FLIGHT_LIMIT connections per worker are on their way (in Node's IPC, which passes one handle
// at a time until the worker acknowledges it): the rest wait in this master's bounded queue, where they
// are visible, expire after queue.maxWait and are redirected, instead of in Node's unbounded handle queue.
// The master keeps its copy of each socket on its way until the worker says it took it, so when a worker
// dies first those connections are taken back and served by the index's next worker, as core takes back
// what a dead worker's channel holds.

const net = require('net');
const { routeIndex } = require('./hash');
const { createLogger, describeExit, formatDuration, formatSocketAddress } = require('./log');
const { render, serveMetrics } = require('./metrics');
const protocol = require('./protocol');
const { CRASH_UPTIME_MS, revivalDelay, spawnWorker } = require('./spawn');
const defaults = require('./defaults.json');

const TICK_MS = defaults.queueTickMs;
/** Connections sent to one worker and not yet acknowledged: the JavaScript master's channel capacity. */
const IN_FLIGHT_LIMIT = 64;
/** How long a dead worker's channel may stay open after its exit before what it never took is taken back. */
const CHANNEL_CLOSE_GRACE_MS = 1000;

/**
 * Starts the master. `envOf(index)` gives a worker's extra environment; `onListenError(error)` gets a
 * failed listen (nothing else starts then); `onEnd({ graceful })` is called once every worker is gone
 * after a stop. Returns `{ address, port, stop(hard), reload(settings, envOf) }`; address and port are
 * null until bound. `settings` are checked already (js/validate.js).
 */
function startJsMaster(settings, { command, envOf, onListenError, onEnd }) {
  settings = { ...settings };
  const log = createLogger(settings.prefix, settings.debug);
  const concurrency = settings.concurrency;
  const slots = Array.from({ length: concurrency }, (_, index) => ({
    index,
    generation: 0,
    state: 'down', // down | starting | ready | draining (stopping: its connections queue for its successor)
    // Asked to stop for a reload: its successor starts as soon as it exits.
    retiring: false,
    child: null,
    pid: 0,
    alive: false,
    started: 0,
    crashes: 0,
    shutdownSent: false,
    // Send the shutdown once the queue is in the worker (a graceful stop), then SIGTERM when `terminate`.
    pendingShutdown: null,
    // Connections sent and not yet acknowledged, by their `seq`, oldest first; this master keeps its
    // copies until then.
    inFlight: new Map(),
    nextSeq: 0,
    stuckReported: false,
    queue: [],
  }));
  let { limit: queueLimit, maxWait: queueMaxWait } = settings.queue;
  // A reload's rolling restart: indexes still to restart, and the one restarting now.
  let restartsPending = [];
  let restarting = null;
  const stats = { routed: new Array(concurrency).fill(0), redirected: 0, closed: 0, revivals: 0, recovered: 0 };
  let bound = null;
  let shuttingDown = false;
  let hardKilled = false;
  let ended = false;
  let deadlineTimer = null;
  const ticker = setInterval(expireQueues, TICK_MS);
  let metricsServer = null;

  const server = net.createServer({ pauseOnConnect: true }, route);
  server.on('error', (error) => {
    if (bound) log.warn(`accept failed: ${error.message}`);
  });
  listen(settings.host);

  function listen(host) {
    const onError = (error) => {
      server.removeListener('listening', onListening);
      const noIpv6 = error.code === 'EAFNOSUPPORT' || error.code === 'EADDRNOTAVAIL';
      if (host === '::' && noIpv6) {
        log.info(`no IPv6 on this machine: listening on 0.0.0.0:${settings.port} instead of [::]`);
        listen('0.0.0.0');
        return;
      }
      clearInterval(ticker);
      ended = true;
      onListenError(error);
    };
    const onListening = () => {
      server.removeListener('error', onError);
      const address = server.address();
      bound = { address: address.address, port: address.port };
      if (settings.metrics) {
        startMetrics();
        return;
      }
      listening();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ host, port: settings.port, backlog: settings.backlog });
  }

  function listening() {
    log.info(`listening on ${formatSocketAddress(bound.address, bound.port)} with ${concurrency} workers`);
    if (!shuttingDown) slots.forEach((slot) => startWorker(slot.index));
    finishIfDone();
  }

  /** The metrics page, bound before the workers start (a bind error is a listen error, as in core). */
  function startMetrics() {
    metricsServer = serveMetrics({
      ...settings.metrics,
      limit: defaults.scrapeLimit,
      snapshot: () =>
        render(
          slots.map((slot) => ({ routed: stats.routed[slot.index], queued: slot.queue.length, ready: slot.state === 'ready' })),
          stats
        ),
      onListening: (address, port) => {
        log.info(`metrics on http://${formatSocketAddress(address, port)}/metrics`);
        listening();
      },
      onError: (error) => {
        server.close();
        clearInterval(ticker);
        ended = true;
        onListenError(error);
      },
    });
  }

  function startWorker(index) {
    const slot = slots[index];
    const child = spawnWorker(command, index, concurrency, envOf(index));
    slot.generation += 1;
    Object.assign(slot, {
      state: 'starting',
      child,
      pid: child.pid || 0,
      alive: true,
      started: Date.now(),
      shutdownSent: false,
      stoppedSent: false,
      pendingShutdown: null,
      stuckReported: false,
    });
    const generation = slot.generation;
    const current = () => slot.generation === generation;
    child.on('message', (message) => {
      if (!current()) return;
      const kind = protocol.kindOf(message);
      if (kind === protocol.TAKEN) onTaken(slot, message.seq);
      else if (kind === protocol.READY) onReady(slot);
      else if (kind === protocol.STOPPING) stopRouting(slot);
    });
    // A worker that could not be started at all (send errors go to their callbacks instead).
    child.on('error', (error) => {
      if (current() && child.pid === undefined) {
        log.error(`cannot start worker ${index}: ${error.message}`);
        onExit(slot, generation, 1, null);
      }
    });
    // What the worker took is known only once its channel is read to the end: act on its exit then
    // (a channel some other process still holds gets CHANNEL_CLOSE_GRACE_MS).
    child.on('exit', (code, signal) => {
      if (!child.connected) return onExit(slot, generation, code, signal);
      const grace = setTimeout(() => onExit(slot, generation, code, signal), CHANNEL_CLOSE_GRACE_MS);
      child.once('disconnect', () => {
        clearTimeout(grace);
        onExit(slot, generation, code, signal);
      });
    });
    log.debug(`worker ${index} started (pid ${slot.pid}, generation ${generation})`);
  }

  function route(socket) {
    // A client that resets while queued must not crash the master; its worker sees the reset.
    socket.on('error', () => {});
    const index = routeIndex(socket.remoteAddress || '', concurrency);
    log.debug(`connection ${socket.remoteAddress} -> worker ${index}`);
    deliver(index, socket);
  }

  /** Queues the connection for its worker (bounded by queue.limit) and sends what the worker can take now;
   * past the bound it goes to the next ready worker. */
  function deliver(index, socket) {
    const slot = slots[index];
    if (slot.queue.length < queueLimit && !shuttingDown) {
      slot.queue.push({ socket, arrived: Date.now() });
      flush(slot);
    } else {
      reportStuck(slot, 'its queue is full; new connections go to other workers');
      redirect(index, socket, 'its queue is full');
    }
  }

  /** Sends the head of the queue when the worker is ready and took the last one, then a pending shutdown. */
  function flush(slot) {
    while (slot.state === 'ready' && slot.inFlight.size < IN_FLIGHT_LIMIT && slot.queue.length > 0) {
      const { socket } = slot.queue.shift();
      if (socket.destroyed) {
        // The client gave up while it waited.
        stats.closed += 1;
        continue;
      }
      send(slot, socket);
    }
    if (slot.queue.length === 0) slot.stuckReported = false;
    if (slot.pendingShutdown && (slot.state !== 'ready' || slot.queue.length === 0)) {
      const { terminate } = slot.pendingShutdown;
      slot.pendingShutdown = null;
      sendShutdown(slot);
      // SIGTERM follows the message, as in core: a user's own SIGTERM listener sees the shutdown. Not on
      // Windows, where it would be TerminateProcess: the shutdown message alone drains the worker there.
      if (terminate && slot.alive && process.platform !== 'win32') slot.child.kill('SIGTERM');
    }
  }

  function send(slot, socket) {
    const seq = slot.nextSeq;
    slot.nextSeq += 1;
    slot.inFlight.set(seq, socket);
    stats.routed[slot.index] += 1;
    // keepOpen: this copy stays open until the worker's TAKEN, so a worker that dies first loses nothing.
    slot.child.send(protocol.message(protocol.CONNECTION, { seq }), socket, { keepOpen: true }, (error) => {
      // The channel is closed (the worker is dying): its exit takes the connection back.
      if (error) log.debug(`worker ${slot.index}'s channel refused a connection (${error.code || error.message})`);
    });
  }

  /**
   * The worker has its own copy of connection `seq`: close ours. IPC keeps the order, so one sent before
   * it and still on its way never arrived (Node drops a handle the worker could not receive, with
   * keepOpen without a retry): it goes back to the head of the queue and is sent again.
   */
  function onTaken(slot, seq) {
    const socket = slot.inFlight.get(seq);
    if (socket === undefined) return;
    const lost = [];
    for (const [earlier, other] of slot.inFlight) {
      if (earlier >= seq) break;
      lost.push({ socket: other, arrived: Date.now() });
      slot.inFlight.delete(earlier);
      stats.routed[slot.index] -= 1;
    }
    if (lost.length > 0) log.debug(`worker ${slot.index} never got ${lost.length} connections; sending them again`);
    slot.queue.unshift(...lost);
    slot.inFlight.delete(seq);
    socket.destroy();
    flush(slot);
  }

  /** Logs once per episode that a ready worker does not take what it is sent. */
  function reportStuck(slot, what) {
    if (slot.state !== 'ready' || slot.stuckReported) return;
    slot.stuckReported = true;
    log.warn(`worker ${slot.index} (pid ${slot.pid}) is not reading its channel (${slot.queue.length} connections wait): ${what}`);
  }

  /** Gives a connection whose own worker cannot take it to the next ready worker with room, or closes it.
   * A redirected connection waits up to queue.maxWait again at its new worker. */
  function redirect(from, socket, why) {
    let next = null;
    for (let step = 1; step < concurrency && next === null; step += 1) {
      const index = (from + step) % concurrency;
      if (slots[index].state === 'ready' && slots[index].queue.length < queueLimit) next = index;
    }
    if (next !== null && !shuttingDown) {
      stats.redirected += 1;
      log.debug(`connection ${socket.remoteAddress} for worker ${from} goes to worker ${next}: ${why}`);
      slots[next].queue.push({ socket, arrived: Date.now() });
      flush(slots[next]);
    } else {
      stats.closed += 1;
      log.warn(`closing connection from ${socket.remoteAddress} for worker ${from}: ${why} and no other worker is ready`);
      socket.destroy();
    }
  }

  /** Every tick: connections that waited longer than queue.maxWait for their worker go to the next ready one. */
  function expireQueues() {
    const now = Date.now();
    for (const slot of slots) {
      const expired = () => slot.queue.length > 0 && now - slot.queue[0].arrived >= queueMaxWait;
      if (!expired()) continue;
      reportStuck(slot, 'connections waiting longer than queue.maxWait go to other workers');
      const due = [];
      while (expired()) due.push(slot.queue.shift().socket);
      for (const socket of due) redirect(slot.index, socket, 'it was not ready within queue.maxWait');
    }
  }

  function closeQueue(slot) {
    for (const { socket } of slot.queue) socket.destroy();
    stats.closed += slot.queue.length;
    slot.queue = [];
  }

  /** After worker `slot` died: what it never acknowledged goes back, in order, to the head of its queue. */
  function takeBack(slot) {
    const unreceived = [...slot.inFlight.values()];
    slot.inFlight = new Map();
    const arrived = Date.now();
    const alive = unreceived.filter((socket) => !socket.destroyed);
    // A client that gave up meanwhile is not served again: counted as closed.
    stats.closed += unreceived.length - alive.length;
    stats.routed[slot.index] -= unreceived.length;
    stats.recovered += alive.length;
    slot.queue.unshift(...alive.map((socket) => ({ socket, arrived })));
    return alive.length;
  }

  function onReady(slot) {
    if (slot.state !== 'starting') return;
    log.debug(`worker ${slot.index} (pid ${slot.pid}) is ready; ${slot.queue.length} queued connections follow`);
    slot.state = 'ready';
    flush(slot);
    if (restarting === slot.index) {
      restarting = null;
      restartNext();
    }
  }

  /**
   * STOPPING: routes nothing more to the worker (it got SIGTERM from elsewhere); what is on its way still
   * arrives, then STOPPED (IPC keeps the order). Its index's connections wait for its successor.
   */
  function stopRouting(slot) {
    if (slot.state !== 'draining') {
      log.debug(`worker ${slot.index} (pid ${slot.pid}) stops routing; its connections wait for its successor`);
      slot.state = 'draining';
    }
    if (slot.stoppedSent || !slot.child.connected) return;
    slot.stoppedSent = true;
    slot.child.send(protocol.message(protocol.STOPPED), (error) => error && log.debug(`worker ${slot.index}: ${error.message}`));
  }

  function sendShutdown(slot) {
    if (slot.shutdownSent || !slot.child.connected) return;
    slot.shutdownSent = true;
    // Queued by Node behind every connection handle still in flight, so the worker gets them all first.
    slot.child.send(protocol.message(protocol.SHUTDOWN), (error) => error && log.debug(`worker ${slot.index}: ${error.message}`));
  }

  function onExit(slot, generation, code, signal) {
    if (slot.generation !== generation || !slot.alive) return;
    slot.alive = false;
    slot.state = 'down';
    slot.pendingShutdown = null;
    const how = describeExit(code, signal);
    const takenBack = takeBack(slot);
    if (takenBack > 0) log.debug(`worker ${slot.index}: ${takenBack} connections it never took wait for its successor`);
    if (shuttingDown) {
      log.debug(`worker ${slot.index} (pid ${slot.pid}) exited: ${how}`);
      closeQueue(slot);
      finishIfDone();
      return;
    }
    if (slot.retiring) {
      slot.retiring = false;
      log.info(`worker ${slot.index} (pid ${slot.pid}) stopped for the reload (${how}); starting its successor`);
      startWorker(slot.index);
      return;
    }
    const lived = Date.now() - slot.started;
    slot.crashes = lived < CRASH_UPTIME_MS ? slot.crashes + 1 : 0;
    const delay = revivalDelay(slot.crashes);
    log.warn(
      `worker ${slot.index} (pid ${slot.pid}) exited after ${(lived / 1000).toFixed(1)}s: ${how}; ` +
        `reviving in ${formatDuration(delay)} (attempt ${Math.max(slot.crashes, 1)})`
    );
    setTimeout(() => {
      if (slot.generation !== generation || slot.alive || shuttingDown) return;
      stats.revivals += 1;
      startWorker(slot.index);
    }, delay);
  }

  /**
   * Takes new settings (checked already) and `nextEnvOf`: queue and hardShutdownDelay apply at once;
   * when a worker's environment changed, the workers restart one at a time, each successor ready before
   * the next index stops, its connections queued for it meanwhile. What needs a restart is logged.
   */
  function reload(next, nextEnvOf) {
    if (ended || shuttingDown) {
      log.warn('reload ignored: the cluster is shutting down');
      return false;
    }
    if (next.port !== settings.port || next.host !== settings.host || next.concurrency !== concurrency) {
      log.warn(
        `reload: port, host and concurrency changes need a restart; keeping ${settings.host}:${settings.port} with ${concurrency} workers`
      );
    }
    if (next.routing !== settings.routing || next.backlog !== settings.backlog) {
      log.warn('reload: routing and backlog changes need a restart (the listeners stay as they are)');
    }
    if (next.debug !== settings.debug || next.prefix !== settings.prefix) log.warn('reload: debug and prefix changes need a restart');
    ({ limit: queueLimit, maxWait: queueMaxWait } = next.queue);
    settings.hardShutdownDelay = next.hardShutdownDelay;
    settings.queue = next.queue;
    const changed = slots.some((slot) => JSON.stringify(envOf(slot.index)) !== JSON.stringify(nextEnvOf(slot.index)));
    envOf = nextEnvOf;
    if (!changed) {
      log.info('reload: applied (no worker restart needed)');
      return true;
    }
    log.info(`reload: restarting ${concurrency} workers one at a time`);
    restartsPending = slots.map((slot) => slot.index);
    if (restarting === null) restartNext();
    return true;
  }

  /** Asks the next worker of a rolling restart to stop; its successor starts when it exits. */
  function restartNext() {
    while (restartsPending.length > 0) {
      const slot = slots[restartsPending.shift()];
      // Down and waiting for its revival, which uses the new environment anyway.
      if (!slot.alive) continue;
      slot.retiring = true;
      // New connections for this index queue for the successor instead of reaching a stopping worker;
      // what is on its way still arrives, and what it never takes comes back at its exit.
      slot.state = 'draining';
      slot.pendingShutdown = { terminate: true };
      const generation = slot.generation;
      const delay = settings.hardShutdownDelay;
      setTimeout(() => {
        if (slot.generation !== generation || !slot.alive || !slot.retiring) return;
        log.warn(`worker ${slot.index} (pid ${slot.pid}) did not stop within hardShutdownDelay for the reload; killing it`);
        slot.child.kill('SIGKILL');
      }, delay).unref();
      restarting = slot.index;
      flush(slot);
      return;
    }
    log.info('reload: every worker runs the new configuration');
  }

  function killAll() {
    hardKilled = true;
    for (const slot of slots) {
      closeQueue(slot);
      if (slot.alive) slot.child.kill('SIGKILL');
    }
  }

  function stopListening() {
    shuttingDown = true;
    if (bound) server.close();
    if (metricsServer) metricsServer.close();
    // A ready worker still gets what waits for it, then the shutdown; what waits for a worker that is
    // not ready is closed and counted.
    for (const slot of slots) if (slot.state !== 'ready') closeQueue(slot);
  }

  function stop(hard) {
    if (ended) return false;
    if (hard) {
      log.warn('second signal: stopping at once');
      if (!shuttingDown) stopListening();
      killAll();
    } else if (!shuttingDown) {
      const delay = settings.hardShutdownDelay;
      log.info(`shutting down: ${concurrency} workers have ${formatDuration(delay)} to finish`);
      stopListening();
      deadlineTimer = setTimeout(() => {
        log.warn(`hardShutdownDelay of ${formatDuration(delay)} passed: killing the remaining workers`);
        killAll();
      }, delay);
      for (const slot of slots) {
        if (!slot.alive) continue;
        // SIGTERM as well, as the npm module sends, once the shutdown message is on its way.
        slot.pendingShutdown = { terminate: true };
        flush(slot);
      }
    }
    finishIfDone();
    return true;
  }

  function finishIfDone() {
    if (ended || !shuttingDown || slots.some((slot) => slot.alive)) return;
    ended = true;
    clearInterval(ticker);
    clearTimeout(deadlineTimer);
    const routed = stats.routed.reduce((sum, n) => sum + n, 0);
    log.info(
      `stopped: routed ${routed} connections [${stats.routed.join(', ')}], redirected ${stats.redirected}, ` +
        `closed ${stats.closed}, revivals ${stats.revivals}, recovered ${stats.recovered}`
    );
    onEnd({ graceful: !hardKilled });
  }

  return {
    get address() {
      return bound ? bound.address : null;
    },
    get port() {
      return bound ? bound.port : null;
    },
    stop: (hard = false) => stop(Boolean(hard)),
    reload,
  };
}

module.exports = { startJsMaster };
