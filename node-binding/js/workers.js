'use strict';
// The JavaScript master's workers (methods of js/master.js's JsMaster, as core's master/workers.rs is an
// impl block of its Master): start a worker for an index, hear what it says (ready, taken, stopping),
// retire it, take back what it never received when it is gone, and revive the index.

const { describeExit, formatDuration } = require('./log');
const protocol = require('./protocol');
const { CRASH_UPTIME_MS, revivalDelay, spawnWorker } = require('./spawn');

/** How long a dead worker's channel may stay open after its exit before what it never took is taken back. */
const CHANNEL_CLOSE_GRACE_MS = 1000;

module.exports = {
  /** Every worker of `slot` the master still accounts for: current, a reload's successor, retiring ones. */
  processesOf(slot) {
    return [slot.current, slot.successor, ...slot.retiring].filter(Boolean);
  },

  /** Starts a worker process for `index` as its `current` worker or as a reload's `successor`. */
  startProcess(index, role) {
    const slot = this.slots[index];
    const child = spawnWorker(this.command, index, this.concurrency, this.envOf(index));
    slot.generation += 1;
    const worker = {
      index,
      generation: slot.generation,
      child,
      pid: child.pid || 0,
      started: Date.now(),
      state: 'starting', // starting | ready
      // Connections sent and not yet acknowledged, by `seq`, oldest first: the master keeps their copies.
      inFlight: new Map(),
      nextSeq: 0,
      // Still to be told, after what is on its way: { terminate } sends SHUTDOWN (and SIGTERM).
      farewell: null,
      shutdownSent: false,
      stoppedSent: false,
      // Why it retires: 'reload' or 'asked' (it said STOPPING).
      cause: null,
      gone: false,
    };
    slot[role] = worker;
    child.on('message', (message) => {
      const kind = protocol.kindOf(message);
      if (kind === protocol.TAKEN) this.onTaken(worker, message.seq);
      else if (kind === protocol.READY) this.onReady(worker);
      else if (kind === protocol.STOPPING) this.onStopping(worker);
    });
    // A worker that could not be started at all (send errors go to their callbacks instead).
    child.on('error', (error) => {
      if (child.pid === undefined) {
        this.log.error(`cannot start worker ${index}: ${error.message}`);
        this.onExit(worker, 1, null);
      }
    });
    // What the worker took is known only once its channel is read to the end: act on its exit then
    // (a channel some other worker still holds gets CHANNEL_CLOSE_GRACE_MS).
    child.on('exit', (code, signal) => {
      if (!child.connected) return this.onExit(worker, code, signal);
      const grace = setTimeout(() => this.onExit(worker, code, signal), CHANNEL_CLOSE_GRACE_MS);
      child.once('disconnect', () => {
        clearTimeout(grace);
        this.onExit(worker, code, signal);
      });
    });
    this.log.debug(`worker ${index} started (pid ${worker.pid}, generation ${worker.generation})`);
    return worker;
  },

  /** READY: a current worker takes what waits for it; a reload's successor replaces its predecessor. */
  onReady(worker) {
    const slot = this.slots[worker.index];
    if (worker.state !== 'starting' || worker.gone) return;
    worker.state = 'ready';
    if (worker === slot.successor) return this.successorReady(worker.index);
    if (worker !== slot.current) return;
    this.log.debug(`worker ${worker.index} (pid ${worker.pid}) is ready; ${slot.queue.length} queued connections follow`);
    this.flush(worker.index);
  },

  /**
   * STOPPING: the worker (SIGTERM from elsewhere) gets nothing new; what is on its way still arrives,
   * then STOPPED (IPC keeps the order). Its index's connections wait for its successor, started now.
   */
  onStopping(worker) {
    const slot = this.slots[worker.index];
    this.sendStopped(worker);
    if (worker === slot.successor) {
      slot.successor = null;
      this.retire(slot, worker, 'reload');
      return this.reloadFailed(worker.index, 'stopped before it was ready');
    }
    if (worker !== slot.current) return;
    slot.current = slot.successor;
    slot.successor = null;
    if (slot.current === null) slot.downSince = Date.now();
    this.retire(slot, worker, 'asked');
    this.log.info(`worker ${worker.index} (pid ${worker.pid}) stopped taking connections; ${slot.queue.length} queued wait for its successor`);
    if (this.running && slot.current === null) {
      this.countCrash(slot, Date.now() - worker.started);
      this.scheduleRevival(worker.index);
    }
    this.flush(worker.index);
  },

  /** Moves `worker` to the index's retiring workers (`cause`: 'reload' or 'asked'). */
  retire(slot, worker, cause) {
    worker.cause = cause;
    slot.retiring.push(worker);
  },

  /** The answer to STOPPING, once: after every connection already on its way. */
  sendStopped(worker) {
    if (worker.stoppedSent || !worker.child.connected) return;
    worker.stoppedSent = true;
    worker.child.send(protocol.message(protocol.STOPPED), (error) => error && this.log.debug(`worker ${worker.index}: ${error.message}`));
  },

  /** SHUTDOWN (after what is on its way), then SIGTERM when asked, once. */
  sendFarewell(worker) {
    const { terminate } = worker.farewell;
    worker.farewell = null;
    if (worker.shutdownSent || worker.gone) return;
    worker.shutdownSent = true;
    if (worker.child.connected) {
      worker.child.send(protocol.message(protocol.SHUTDOWN), (error) => error && this.log.debug(`worker ${worker.index}: ${error.message}`));
    }
    // SIGTERM follows the message, as in core: a user's own SIGTERM listener sees the shutdown. Not on
    // Windows, where it would be TerminateProcess: the shutdown message alone drains the worker there.
    if (terminate && process.platform !== 'win32') worker.child.kill('SIGTERM');
  },

  /** A worker is gone (exited and its channel read to the end): take back, then revive or hand over. */
  onExit(worker, code, signal) {
    if (worker.gone) return;
    worker.gone = true;
    const slot = this.slots[worker.index];
    const { index, pid } = worker;
    const how = describeExit(code, signal);
    const role = worker === slot.current ? 'current' : worker === slot.successor ? 'successor' : 'retiring';
    if (role === 'current') {
      slot.current = null;
      slot.downSince = Date.now();
    } else if (role === 'successor') {
      slot.successor = null;
    } else {
      slot.retiring = slot.retiring.filter((other) => other !== worker);
    }
    const takenBack = this.takeBack(worker);
    if (takenBack > 0) this.log.info(`worker ${index} (pid ${pid}) left ${takenBack} connections unread; they wait for its successor`);
    if (!this.running) {
      this.log.debug(`worker ${index} (pid ${pid}) exited: ${how}`);
      // What came back goes to the index's ready worker (which is told to shut down after it), or is closed.
      if (slot.current && slot.current.state === 'ready' && this.phase === 'draining') this.flush(index);
      else this.closeQueue(slot);
      return this.finishIfDone();
    }
    if (role === 'retiring') {
      this.log.info(`worker ${index} (pid ${pid}) stopped${worker.cause === 'reload' ? ' for the reload' : ''} (${how})`);
      return this.flush(index);
    }
    if (role === 'successor') return this.reloadFailed(index, `exited before it was ready (${how})`);
    if (slot.successor) {
      // A reload's successor is starting: it takes over (and is current from now on).
      slot.current = slot.successor;
      slot.successor = null;
      this.log.info(`worker ${index} (pid ${pid}) exited (${how}); its successor takes over`);
      return this.flush(index);
    }
    const lived = Date.now() - worker.started;
    const crashes = this.countCrash(slot, lived);
    this.log.warn(
      `worker ${index} (pid ${pid}) exited after ${(lived / 1000).toFixed(1)}s: ${how}; ` +
        `reviving in ${formatDuration(revivalDelay(crashes))} (attempt ${Math.max(crashes, 1)})`
    );
    this.scheduleRevival(index);
  },

  /** A run shorter than CRASH_UPTIME_MS is one more crash in a row; a longer one resets the count. */
  countCrash(slot, lived) {
    slot.crashes = lived < CRASH_UPTIME_MS ? slot.crashes + 1 : 0;
    return slot.crashes;
  },

  /** Starts the index's next worker after the back-off, unless one runs by then or the cluster stops. */
  scheduleRevival(index) {
    const slot = this.slots[index];
    setTimeout(() => {
      if (!this.running || slot.current !== null) return;
      this.stats.revivals += 1;
      this.log.debug(`reviving worker ${index} after ${((Date.now() - slot.downSince) / 1000).toFixed(1)}s without one`);
      this.startProcess(index, 'current');
    }, revivalDelay(slot.crashes));
  },
};
