'use strict';
// What both masters do the same way in the Node primary process: the command that re-runs this script
// as a worker, and the signals (SIGTERM/SIGINT drain, a second one stops at once; the exit code when the
// cluster has ended). SIGHUP is left to the embedding: see the README's "Reloading".

const fs = require('fs');
const { createLogger } = require('./log');

/** Counts the reloads in a worker's environment: each reload changes it, so every worker restarts (with
 * the code now on disk) even when its options did not change. */
const RELOAD_ENV = 'STICKY_CLUSTER_RELOAD';

/**
 * The command that re-runs this script as a worker: the primary's own runtime, flags, script and
 * arguments. Deno's process.execArgv is empty: its flags (`run`, the permissions, `--config`) are in the
 * kernel's copy of the command line, which Deno lets a program read only with --allow-all.
 */
function workerCommand() {
  if (!process.versions.deno) return [process.execPath, ...process.execArgv, ...process.argv.slice(1)];
  try {
    return [process.execPath, ...fs.readFileSync('/proc/self/cmdline', 'utf8').split('\0').slice(1, -1)];
  } catch {
    // What Deno's own child_process does with a Node-style command line of the deno binary.
    return [process.execPath, 'run', '-A', ...process.argv.slice(1)];
  }
}

/**
 * Listens for SIGTERM and SIGINT for the cluster that `attach` names: the first drains, a second (an
 * impatient Ctrl-C) kills at once, as the binary does. `exit(end)` removes the listeners and exits the
 * primary: 0 when the cluster ended gracefully, 1 otherwise; `release()` only removes them.
 */
function primarySignals(settings) {
  const log = createLogger(settings.prefix, settings.debug);
  let signals = 0;
  let cluster = null;
  const onSignal = (signal) => {
    signals += 1;
    if (cluster) cluster.stop(signals > 1);
    log.debug(`${signal}: ${signals > 1 ? 'hard' : 'graceful'} stop`);
  };
  const listen = (on) => {
    for (const signal of ['SIGTERM', 'SIGINT']) process[on ? 'on' : 'removeListener'](signal, onSignal);
  };
  return {
    /** Starts forwarding signals to `running` (anything with `stop(hard)`). */
    attach(running) {
      cluster = running;
      listen(true);
    },
    /** Stops listening (the cluster never started). */
    release: () => listen(false),
    /** The cluster has ended: `{ graceful, error }` gives the exit code. */
    exit(end) {
      listen(false);
      if (end.error) log.error(end.error);
      process.exit(end.graceful && !end.error ? 0 : 1);
    },
  };
}

module.exports = { RELOAD_ENV, workerCommand, primarySignals };
