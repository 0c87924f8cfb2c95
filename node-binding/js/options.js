'use strict';
// The options of the npm sticky-cluster API as both implementations take them: the npm module's defaults
// (from core's defaults.json) and a check of the JavaScript types. Values and bounds are checked by the
// implementation that starts (core's Config::validate, or js/validate.js in the same words).

const net = require('net');
const os = require('os');
const util = require('util');
const defaults = require('./defaults.json');

/**
 * The npm module's defaults (`||`, so 0/NaN fall back as there), plus `host`; port 0 picks a free port.
 * Checks the JavaScript types here; values and bounds are checked by the implementation that starts
 * (core's Config::validate, or js/validate.js in the same words).
 */
function normalizeOptions(options) {
  if (options === undefined || options === null) options = {};
  if (typeof options !== 'object') throw new TypeError('sticky-cluster-native: options must be an object');
  const cpus = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  const settings = {
    prefix: options.prefix || defaults.prefix,
    // One per CPU, within core's bound even on a machine with more CPUs than that.
    concurrency: options.concurrency || Math.min(cpus || 1, defaults.maxConcurrency),
    port: options.port === 0 ? 0 : options.port || defaults.port,
    host: options.host || defaults.host,
    debug: Boolean(options.debug),
    hardShutdownDelay: options.hardShutdownDelay || defaults.hardShutdownDelayMs,
    clientAddress: options.clientAddress || 'peer',
    trustedProxies: options.trustedProxies || [],
    env: options.env || ((index) => ({ stickycluster_worker_index: index })),
    routing: options.routing || 'handoff',
    backlog: options.backlog || defaults.backlog,
    queue: normalizeQueue(options.queue),
    metrics: normalizeMetrics(options.metrics),
    errorHandler:
      options.errorHandler ||
      ((error) => {
        console.log(error);
        process.exit(1);
      }),
  };
  const problem = (name, expected, value) =>
    new TypeError(`sticky-cluster-native: options.${name} must be ${expected}, got ${util.inspect(value)}`);
  for (const name of ['concurrency', 'port', 'hardShutdownDelay', 'backlog']) {
    if (typeof settings[name] !== 'number') throw problem(name, 'a number', options[name]);
  }
  if (typeof settings.host !== 'string') throw problem('host', 'a string', options.host);
  if (typeof settings.prefix !== 'string') throw problem('prefix', 'a string', options.prefix);
  if (settings.routing !== 'handoff' && settings.routing !== 'kernel') {
    throw problem('routing', "'handoff' or 'kernel'", options.routing);
  }
  if (typeof settings.env !== 'function') throw problem('env', 'a function (index) => object', options.env);
  if (!['peer', 'proxy-protocol', 'x-forwarded-for'].includes(settings.clientAddress)) {
    throw problem('clientAddress', "'peer', 'proxy-protocol' or 'x-forwarded-for'", options.clientAddress);
  }
  if (!Array.isArray(settings.trustedProxies) || !settings.trustedProxies.every((c) => typeof c === 'string')) {
    throw problem('trustedProxies', 'an array of address blocks such as "10.0.0.0/8"', options.trustedProxies);
  }
  if (typeof settings.errorHandler !== 'function') {
    throw problem('errorHandler', 'a function (error) => void', options.errorHandler);
  }
  // What the user gave, for reload(changes): the changes are applied over it and normalized again.
  Object.defineProperty(settings, 'given', { value: { ...options }, enumerable: false });
  return settings;
}

/** `queue: { limit, maxWait, perSource }`: how many connections may wait for one worker, for how long
 * (ms), and how many from one client address over every worker's queue. */
function normalizeQueue(queue) {
  if (queue === undefined || queue === null) queue = {};
  if (typeof queue !== 'object') {
    throw new TypeError(`sticky-cluster-native: options.queue must be an object { limit, maxWait }, got ${util.inspect(queue)}`);
  }
  const settings = {
    limit: queue.limit || defaults.queueLimit,
    maxWait: queue.maxWait || defaults.queueMaxWaitMs,
    perSource: queue.perSource || defaults.queuePerSource,
  };
  for (const name of ['limit', 'maxWait', 'perSource']) {
    if (typeof settings[name] !== 'number') {
      throw new TypeError(`sticky-cluster-native: options.queue.${name} must be a number, got ${util.inspect(queue[name])}`);
    }
  }
  return settings;
}

/** `metrics: { port, host }`: where the master serves its Prometheus page; null (the default) for none. */
function normalizeMetrics(metrics) {
  if (metrics === undefined || metrics === null || metrics === false) return null;
  if (typeof metrics !== 'object') {
    throw new TypeError(`sticky-cluster-native: options.metrics must be an object { port, host }, got ${util.inspect(metrics)}`);
  }
  const settings = { port: metrics.port, host: metrics.host || defaults.metricsHost };
  if (typeof settings.port !== 'number') {
    throw new TypeError(`sticky-cluster-native: options.metrics.port must be a number, got ${util.inspect(metrics.port)}`);
  }
  if (typeof settings.host !== 'string' || net.isIP(settings.host) === 0) {
    throw new TypeError(`sticky-cluster-native: options.metrics.host must be an IP address, got ${util.inspect(metrics.host)}`);
  }
  return settings;
}

module.exports = { normalizeOptions };
