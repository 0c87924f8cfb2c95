'use strict';
// The native master's front: translates the options for the Rust addon (core validates them, with the
// same one-line errors as js/validate.js), starts core's master on its own thread, and gives the
// primary `{ address, port, stop, reload }`. Routing, queueing and supervision are all core's.

const util = require('util');
const { PER_WORKER_ENV, splitEnvironment } = require('./environment');
const { normalizeOptions } = require('./options');
const { RELOAD_ENV, primarySignals, workerCommand } = require('./primary');

/** The addon's options for `settings` (after index.js applied the defaults). */
function addonOptions(settings, command, env) {
  return {
    port: settings.port,
    host: settings.host,
    concurrency: settings.concurrency,
    debug: settings.debug,
    prefix: settings.prefix,
    hardShutdownDelayMs: settings.hardShutdownDelay,
    clientAddress: settings.clientAddress,
    trustedProxies: settings.trustedProxies,
    command,
    env,
    routing: settings.routing,
    backlog: settings.backlog,
    queueLimit: settings.queue.limit,
    queueMaxWaitMs: settings.queue.maxWait,
    queuePerSource: settings.queue.perSource,
    metricsHost: settings.metrics ? settings.metrics.host : undefined,
    metricsPort: settings.metrics ? settings.metrics.port : undefined,
  };
}

/** Runs `call()`; an option core refuses becomes the TypeError js/validate.js would throw, in core's words. */
function checked(call) {
  try {
    return call();
  } catch (error) {
    if (error.code === 'InvalidArg') throw new TypeError(`sticky-cluster-native: ${error.message}`);
    throw error;
  }
}

/**
 * The addon's options with the workers' environment from `env(index)`, once the values are known valid;
 * `reloads` > 0 marks the environment of a reload's workers (RELOAD_ENV), so every reload restarts them.
 */
function fullOptions(addon, settings, command, reloads = 0) {
  // Checked before env(index) is called once per worker: a concurrency of 4e9 is refused, not iterated.
  checked(() => addon.checkOptions(addonOptions(settings, command, {})));
  const { shared, perWorker } = splitEnvironment(settings);
  const env = { ...shared, [PER_WORKER_ENV]: JSON.stringify(perWorker) };
  if (reloads > 0) env[RELOAD_ENV] = String(reloads);
  return addonOptions(settings, command, env);
}

/** The Error Node's own `server.listen` would give: `listen EADDRINUSE: address already in use :::8080`. */
function listenError(failure) {
  const errno = -failure.errno;
  let code = 'UNKNOWN';
  let description = failure.message;
  if (failure.errno > 0) {
    code = util.getSystemErrorName(errno);
    const known = util.getSystemErrorMap().get(errno);
    if (known) description = known[1];
  }
  const error = new Error(`listen ${code}: ${description} ${failure.address}:${failure.port}`);
  return Object.assign(error, { code, errno, syscall: 'listen', address: failure.address, port: failure.port });
}

/**
 * Starts the native master with `addon` (binding.js's), its ready lines on `readyFd` when not null; returns `{ implementation, address, port, stop,
 * reload }`, or undefined when it could not listen (then `errorHandler` gets a Node-style Error, a tick
 * later, as with the npm module's `server.on('error')`). Throws a TypeError for an option out of bounds.
 */
function start(settings, addon, readyFd = null) {
  if (settings.routing === 'kernel' && process.versions.bun) {
    // Its http.Server.listen({ fd }) binds a new port instead: workers would say ready and never accept.
    throw new TypeError(
      `sticky-cluster-native: options.routing 'kernel' needs server.listen({ fd }) in the workers, which Bun ${process.versions.bun} ` +
        "does not do (it listens on a new port instead); use routing 'handoff' under Bun"
    );
  }
  const command = workerCommand();
  const options = fullOptions(addon, settings, command);
  const signals = primarySignals(settings);
  let started;
  try {
    // The addon takes the ready fd (close-on-exec) and core writes the lines, as in the binary.
    const withReady = readyFd === null ? options : { ...options, readyFd };
    started = checked(() => addon.startCluster(withReady, (end) => signals.exit(end)));
  } catch (error) {
    if (error instanceof TypeError) throw error;
    process.nextTick(settings.errorHandler, error);
    return undefined;
  }
  if (typeof started.stop !== 'function') {
    process.nextTick(settings.errorHandler, listenError(started));
    return undefined;
  }
  const cluster = started;
  signals.attach(cluster);
  let reloads = 0;
  return {
    implementation: 'native',
    address: cluster.address,
    port: cluster.port,
    stop: (hard = false) => cluster.stop(Boolean(hard)),
    reload: (changes) => {
      const options = fullOptions(addon, normalizeOptions({ ...settings.given, ...changes }), command, reloads + 1);
      reloads += 1;
      return cluster.reload(options);
    },
  };
}

module.exports = { start };
