'use strict';
// The JavaScript master, for machines without the native addon: listens, hashes each client address,
// and passes the socket to that index's worker over Node's IPC channel (as the npm sticky-cluster module
// does); queues connections for a worker that is not ready, revives dead workers, shuts down in order.
// It follows core/src/master.rs step for step, with the same log lines.

const net = require('net');
const { routeIndex } = require('./hash');
const { createLogger, describeExit, formatDuration, formatSocketAddress } = require('./log');
const protocol = require('./protocol');
const { CRASH_UPTIME_MS, revivalDelay, spawnWorker } = require('./spawn');

/** Connections one index may hold while its worker starts (core's queue.limit default). */
const QUEUE_LIMIT = 1024;
/** How long a queued connection waits for its worker before it goes elsewhere (core's queue.maxWait). */
const QUEUE_MAX_WAIT_MS = 10000;
const TICK_MS = 100;

/**
 * Starts the master. `envOf(index)` gives a worker's extra environment; `onListenError(error)` gets a
 * failed listen (nothing else starts then); `onEnd({ graceful })` is called once every worker is gone
 * after a stop. Returns `{ address, port, stop(hard) }`; address and port are null until bound.
 */
function startJsMaster(settings, { command, envOf, onListenError, onEnd }) {
  const log = createLogger(settings.prefix, settings.debug);
  const concurrency = settings.concurrency;
  const slots = Array.from({ length: concurrency }, (_, index) => ({
    index,
    generation: 0,
    state: 'down', // down | starting | ready | draining
    child: null,
    pid: 0,
    alive: false,
    started: 0,
    crashes: 0,
    shutdownSent: false,
    queue: [],
  }));
  const stats = { routed: new Array(concurrency).fill(0), redirected: 0, closed: 0, revivals: 0 };
  let bound = null;
  let shuttingDown = false;
  let hardKilled = false;
  let ended = false;
  let deadlineTimer = null;
  const ticker = setInterval(expireQueues, TICK_MS);

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
      log.info(`listening on ${formatSocketAddress(bound.address, bound.port)} with ${concurrency} workers`);
      if (!shuttingDown) slots.forEach((slot) => startWorker(slot.index));
      finishIfDone();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ host, port: settings.port, backlog: settings.backlog });
  }

  function startWorker(index) {
    const slot = slots[index];
    const child = spawnWorker(command, index, concurrency, envOf(index));
    slot.generation += 1;
    Object.assign(slot, { state: 'starting', child, pid: child.pid || 0, alive: true, started: Date.now(), shutdownSent: false });
    const generation = slot.generation;
    const current = () => slot.generation === generation;
    child.on('message', (message) => {
      if (!current()) return;
      const kind = protocol.kindOf(message);
      if (kind === protocol.READY) onReady(slot);
      else if (kind === protocol.DRAINING) retire(slot);
    });
    // A worker that could not be started at all (send errors go to their callbacks instead).
    child.on('error', (error) => {
      if (current() && child.pid === undefined) {
        log.error(`cannot start worker ${index}: ${error.message}`);
        onExit(slot, generation, 1, null);
      }
    });
    child.on('exit', (code, signal) => onExit(slot, generation, code, signal));
    log.debug(`worker ${index} started (pid ${slot.pid}, generation ${generation})`);
  }

  function route(socket) {
    // A client that resets while queued must not crash the master; its worker sees the reset.
    socket.on('error', () => {});
    const index = routeIndex(socket.remoteAddress || '', concurrency);
    log.debug(`connection ${socket.remoteAddress} -> worker ${index}`);
    deliver(index, socket);
  }

  /** Sends to the worker when it is ready, else queues (bounded), else redirects. */
  function deliver(index, socket) {
    const slot = slots[index];
    if (slot.state === 'ready' && slot.queue.length === 0) sendTo(index, socket);
    else if (slot.queue.length < QUEUE_LIMIT && !shuttingDown) slot.queue.push({ socket, arrived: Date.now() });
    else redirect(index, socket, 'its queue is full');
  }

  function sendTo(index, socket) {
    const slot = slots[index];
    stats.routed[index] += 1;
    slot.child.send(protocol.message(protocol.CONNECTION), socket, (error) => {
      if (!error) return;
      // The channel is closed (the worker died): the socket waits for the index's next worker.
      log.debug(`worker ${index}'s channel refused a connection (${error.code || error.message}); it waits for the next worker`);
      stats.routed[index] -= 1;
      if (shuttingDown || socket.destroyed) {
        stats.closed += 1;
        socket.destroy();
      } else {
        slot.queue.push({ socket, arrived: Date.now() });
      }
    });
  }

  /** Gives a connection whose own worker cannot take it to the next ready worker, or closes it. */
  function redirect(from, socket, why) {
    let next = null;
    for (let step = 1; step < concurrency && next === null; step += 1) {
      const index = (from + step) % concurrency;
      if (slots[index].state === 'ready') next = index;
    }
    if (next !== null && !shuttingDown) {
      stats.redirected += 1;
      log.debug(`connection ${socket.remoteAddress} for worker ${from} goes to worker ${next}: ${why}`);
      sendTo(next, socket);
    } else {
      stats.closed += 1;
      log.warn(`closing connection from ${socket.remoteAddress} for worker ${from}: ${why} and no other worker is ready`);
      socket.destroy();
    }
  }

  function expireQueues() {
    const now = Date.now();
    for (const slot of slots) {
      while (slot.queue.length > 0 && now - slot.queue[0].arrived >= QUEUE_MAX_WAIT_MS) {
        redirect(slot.index, slot.queue.shift().socket, 'it was not ready within queue.maxWait');
      }
    }
  }

  function closeQueue(slot) {
    for (const { socket } of slot.queue) socket.destroy();
    stats.closed += slot.queue.length;
    slot.queue = [];
  }

  function onReady(slot) {
    if (slot.state !== 'starting') return;
    log.debug(`worker ${slot.index} (pid ${slot.pid}) is ready; ${slot.queue.length} queued connections follow`);
    slot.state = 'ready';
    const queued = slot.queue;
    slot.queue = [];
    for (const { socket } of queued) sendTo(slot.index, socket);
  }

  /** Routes nothing more to a worker that stops (SIGTERM from outside); its index waits for the revival. */
  function retire(slot) {
    if (slot.state === 'draining') return;
    log.debug(`worker ${slot.index} (pid ${slot.pid}) is draining; its connections wait for its successor`);
    slot.state = 'draining';
    sendShutdown(slot);
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
    const how = describeExit(code, signal);
    if (shuttingDown) {
      log.debug(`worker ${slot.index} (pid ${slot.pid}) exited: ${how}`);
      closeQueue(slot);
      finishIfDone();
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

  function killAll() {
    hardKilled = true;
    for (const slot of slots) {
      if (slot.alive) slot.child.kill('SIGKILL');
    }
  }

  function stopListening() {
    shuttingDown = true;
    if (bound) server.close();
    for (const slot of slots) closeQueue(slot);
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
        sendShutdown(slot);
        // SIGTERM as well, as the npm module sends: a user's own SIGTERM listener sees the shutdown. Not on
        // Windows, where it would be TerminateProcess: the shutdown message alone drains the worker there.
        if (process.platform !== 'win32') slot.child.kill('SIGTERM');
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
        `closed ${stats.closed}, revivals ${stats.revivals}`
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
  };
}

module.exports = { startJsMaster };
