'use strict';
// The JavaScript master's front, for platforms without the addon: refuses what only core can do, starts
// the master of js/master.js in this process, and gives the primary the native front's
// `{ address, port, stop, reload }`.

const { workerEnvironments } = require('./environment');
const { createLogger } = require('./log');
const { ReadyLines, takeReadyFd } = require('./ready');
const { normalizeOptions } = require('./options');
const { RELOAD_ENV, primarySignals, workerCommand } = require('./primary');
const { startJsMaster } = require('./master');
const { validate } = require('./validate');

/** Throws for what the JavaScript master cannot do, naming the option. */
function refuseNativeOnly(settings) {
  if (settings.clientAddress !== 'peer') {
    // Reading proxy headers is the native master's; routing by the balancer's address would break stickiness.
    throw new TypeError(
      `sticky-cluster-native: options.clientAddress '${settings.clientAddress}' needs the native addon ` +
        '(the JavaScript implementation routes by the TCP peer only)'
    );
  }
  if (settings.routing === 'kernel') {
    throw new TypeError("sticky-cluster-native: options.routing 'kernel' needs the native addon (the JavaScript implementation routes in the master)");
  }
}

/**
 * Every worker's whole environment from `env(index)`, called once per index (after the bounds are
 * checked): each worker is spawned on its own, so nothing travels as JSON. Returns `index => env`.
 */
function envOf(settings, reloads = 0) {
  const envs = workerEnvironments(settings);
  if (reloads > 0) for (const env of envs) env[RELOAD_ENV] = String(reloads);
  return (index) => envs[index];
}

/**
 * Starts the JavaScript master, its ready lines (js/ready.js) on `readyFd` when not null; returns `{ implementation, address, port, stop, reload }` (address and
 * port are null until the listener is bound, a tick later). Throws a TypeError for an option out of
 * bounds (in core's words) or one only the native master has; a listen error goes to `errorHandler`.
 */
function start(settings, addon, readyFd = null) {
  validate(settings);
  refuseNativeOnly(settings);
  const ready = readyFd === null ? null : new ReadyLines(takeReadyFd(readyFd), createLogger(settings.prefix, settings.debug));
  const signals = primarySignals(settings);
  const cluster = startJsMaster(settings, {
    command: workerCommand(),
    envOf: envOf(settings),
    onListening: (at) => ready && ready.listening(at),
    onListenError: (error) => {
      if (ready) ready.error(error.message);
      signals.release();
      settings.errorHandler(error);
    },
    onEnd: (end) => {
      if (ready) ready.stopped(end.graceful, end.stats);
      signals.exit(end);
    },
  });
  signals.attach(cluster);
  let reloads = 0;
  return {
    implementation: 'js',
    get address() {
      return cluster.address;
    },
    get port() {
      return cluster.port;
    },
    stop: (hard = false) => cluster.stop(Boolean(hard)),
    reload: (changes) => {
      const reloaded = normalizeOptions({ ...settings.given, ...changes });
      validate(reloaded);
      refuseNativeOnly(reloaded);
      // The running concurrency stays (a change needs a restart): one environment per running worker.
      const nextEnvOf = envOf({ ...reloaded, concurrency: settings.concurrency }, reloads + 1);
      reloads += 1;
      return cluster.reload(reloaded, nextEnvOf);
    },
  };
}

module.exports = { start };
