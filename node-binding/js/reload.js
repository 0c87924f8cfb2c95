'use strict';
// The JavaScript master's reload (methods of js/master.js's JsMaster, as core's master/reload.rs): apply
// new settings, and restart the workers one at a time, each successor started beside its predecessor and
// ready before the predecessor is asked to stop; a successor that cannot start leaves the old worker in
// place and the reload is counted as failed.

module.exports = {
  /**
   * Takes new settings (checked already) and `nextEnvOf`: queue and hardShutdownDelay apply at once;
   * when a worker's environment changed, the workers restart one at a time. What needs a restart is
   * logged and kept. Returns false once the cluster is stopping.
   */
  reload(next, nextEnvOf) {
    const { settings, log } = this;
    if (this.ended || !this.running) {
      log.warn('reload ignored: the cluster is shutting down');
      return false;
    }
    if (next.port !== settings.port || next.host !== settings.host || next.concurrency !== this.concurrency) {
      log.warn(
        `reload: port, host and concurrency changes need a restart; keeping ${settings.host}:${settings.port} with ${this.concurrency} workers`
      );
    }
    if (next.routing !== settings.routing || next.backlog !== settings.backlog) {
      log.warn('reload: routing and backlog changes need a restart (the listeners stay as they are)');
    }
    if (next.debug !== settings.debug || next.prefix !== settings.prefix) log.warn('reload: debug and prefix changes need a restart');
    settings.queue = next.queue;
    settings.hardShutdownDelay = next.hardShutdownDelay;
    const changed = this.slots.some((slot) => JSON.stringify(this.envOf(slot.index)) !== JSON.stringify(nextEnvOf(slot.index)));
    if (!changed) {
      log.info('reload: applied (no worker restart needed)');
      return true;
    }
    if (this.beforeReload === null) this.beforeReload = this.envOf;
    this.envOf = nextEnvOf;
    log.info(`reload: restarting ${this.concurrency} workers one at a time`);
    this.restartsPending = this.slots.map((slot) => slot.index);
    if (this.restarting === null) this.restartNext();
    return true;
  },

  /** Starts the successor of the next index whose worker is ready (a down one revives with the new
   * environment anyway); it replaces its predecessor once ready. */
  restartNext() {
    while (this.restartsPending.length > 0) {
      const index = this.restartsPending.shift();
      const slot = this.slots[index];
      if (!slot.current || slot.current.state !== 'ready' || slot.successor) continue;
      const successor = this.startProcess(index, 'successor');
      this.after(this.settings.hardShutdownDelay, () => {
        if (slot.successor !== successor || successor.state === 'ready') return;
        slot.successor = null;
        this.retire(slot, successor, 'reload');
        successor.child.kill('SIGKILL');
        this.reloadFailed(index, 'was not ready within hardShutdownDelay');
      });
      this.restarting = index;
      return;
    }
    this.beforeReload = null;
    this.log.info('reload: every worker runs the new configuration');
  },

  /** A reload's successor is ready: it takes the index's connections; its predecessor is asked to finish. */
  successorReady(index) {
    const slot = this.slots[index];
    const old = slot.current;
    slot.current = slot.successor;
    slot.successor = null;
    if (old) {
      this.retire(slot, old, 'reload');
      old.farewell = { terminate: true };
      this.after(this.settings.hardShutdownDelay, () => {
        if (old.gone) return;
        this.log.warn(`worker ${index} (pid ${old.pid}) did not stop within hardShutdownDelay for the reload; killing it`);
        old.child.kill('SIGKILL');
      });
    }
    this.flush(index);
    if (this.restarting === index) {
      this.restarting = null;
      this.restartNext();
    }
  },

  /** The reload stops where it is: the workers not yet restarted keep the environment they had. */
  reloadFailed(index, why) {
    this.stats.reloadFailures += 1;
    this.restartsPending = [];
    this.restarting = null;
    if (this.beforeReload !== null) this.envOf = this.beforeReload;
    this.beforeReload = null;
    this.log.error(`reload failed: worker ${index}'s successor ${why}; the workers keep their previous command and environment`);
  },

  /** Runs `task` after `ms` unless the cluster has ended; the timer does not keep the primary alive. */
  after(ms, task) {
    setTimeout(() => {
      if (!this.ended) task();
    }, ms).unref();
  },
};
