'use strict';
// sticky-cluster-native: the npm `sticky-cluster` API over the Rust core. This file only normalizes the
// options, tells which role this process has, picks an implementation and calls its `start`:
//   primary → js/native-master.js (core's master, through the addon) or js/js-master.js (the same
//             contract in JavaScript, where no addon is built); both return { address, port, stop, reload };
//   worker  → js/native-worker.js or js/worker.js, whichever master started it.
// The per-worker part of `env(index)` is applied at load (js/environment.js), before startFn runs.

const { load, NOT_BUILT } = require('./binding');
const { applyPerWorkerEnvironment, isNativeWorker } = require('./js/environment');
const { createLogger } = require('./js/log');
const { normalizeOptions } = require('./js/options');
const { JS_WORKER_ENV } = require('./js/protocol');
const { reportStartError, takeReadyFdNumber } = require('./js/ready');

// A worker's own env(index) values must be in process.env before the user's code reads them, so they
// are applied as soon as this module is loaded, before startFn can run.
applyPerWorkerEnvironment();

/** The two implementations of the primary, each `start(settings, addon, readyFd)` → `{ address, port, stop, reload }`. */
const IMPLEMENTATIONS = {
  native: () => require('./js/native-master'),
  js: () => require('./js/js-master'),
};

/**
 * Starts a sticky cluster: in the primary process, the master (listen, route, supervise); in a worker,
 * `startFn(callback)`, whose `callback(server)` hands over the server that serves routed connections.
 */
function stickyCluster(startFn, options) {
  if (typeof startFn !== 'function') {
    throw new TypeError('sticky-cluster-native: startFn must be a function: (callback) => callback(server)');
  }
  // A worker follows its master's implementation whatever STICKY_CLUSTER_NATIVE says.
  if (isNativeWorker()) return require('./js/native-worker').runNativeWorker(startFn, normalizeOptions(options));
  if (process.env[JS_WORKER_ENV] !== undefined) return require('./js/worker').runJsWorker(startFn, normalizeOptions(options));
  // STICKY_CLUSTER_READY_FD: the binary's ready lines (js/ready.js); a start refused before a master
  // took the fd says why there too.
  const readyFd = takeReadyFdNumber();
  try {
    const settings = normalizeOptions(options);
    const implementation = selectImplementation(settings);
    return IMPLEMENTATIONS[implementation.name]().start(settings, implementation.addon, readyFd);
  } catch (error) {
    reportStartError(readyFd, error);
    throw error;
  }
}

let selected = null;

/**
 * The primary's implementation, chosen once per process: STICKY_CLUSTER_NATIVE=0 forces JavaScript, =1
 * requires the addon (binding.js's error is thrown), unset tries the addon and falls back to JavaScript
 * where none is built for this platform, saying so on one line.
 */
function selectImplementation(settings) {
  if (selected) return selected;
  const log = createLogger(settings.prefix, settings.debug);
  const wanted = process.env.STICKY_CLUSTER_NATIVE;
  if (wanted === '0') {
    selected = { name: 'js', why: 'STICKY_CLUSTER_NATIVE=0' };
  } else if (wanted === '1') {
    selected = { name: 'native', addon: load(), why: 'STICKY_CLUSTER_NATIVE=1' };
  } else if (wanted === undefined || wanted === '') {
    try {
      selected = { name: 'native', addon: load(), why: 'the addon loaded' };
    } catch (error) {
      if (error.code !== NOT_BUILT) throw error;
      const reason = error.message.replace(/^sticky-cluster-native: /, '');
      log.warn(
        `running the JavaScript implementation (slower, for development machines): ${reason}; ` +
          'STICKY_CLUSTER_NATIVE=0 chooses it without this line, =1 makes it an error'
      );
      selected = { name: 'js', why: 'no addon', announced: true };
    }
  } else {
    throw new TypeError(
      `sticky-cluster-native: STICKY_CLUSTER_NATIVE must be 0 (JavaScript), 1 (native) or unset, got ${JSON.stringify(wanted)}`
    );
  }
  if (!selected.announced) log.debug(`implementation: ${selected.name} (${selected.why})`);
  selected.announced = true;
  return selected;
}

module.exports = stickyCluster;
