'use strict';
// sticky-cluster-native: the npm `sticky-cluster` API over the Rust core. The primary process runs the
// master (listen, hash the client address, hand the socket over); each worker is this same script,
// re-launched by the master, that serves the sockets it is handed on the user's server. Where no addon
// is built for the platform, the same contract runs in JavaScript (js/), loaded only then.

const fs = require('fs');
const http = require('http');
const net = require('net');
const os = require('os');
const util = require('util');
const { load } = require('./binding');

/** Carries the per-index part of `options.env` to the workers (JSON array, one object per index). */
const PER_WORKER_ENV = 'STICKY_CLUSTER_NATIVE_ENV';
const DEFAULT_PORT = 8080;
const DEFAULT_HARD_SHUTDOWN_DELAY = 60 * 1000;
/** The YAML's default: Node's own listen default (511) is smaller. */
const DEFAULT_BACKLOG = 1024;
/** Marks a worker of the JavaScript master: js/protocol.js's JS_WORKER_ENV, named here so js/ loads only when used. */
const JS_WORKER_ENV = 'STICKY_CLUSTER_JS_WORKER';
/** binding.js's code for "no addon for this platform": the one failure that falls back to JavaScript. */
const NOT_BUILT = 'ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT';

function isWorker() {
  return process.env.STICKY_CLUSTER_FD !== undefined || process.env.STICKY_CLUSTER_SOCKET !== undefined;
}

function isJsWorker() {
  return !isWorker() && process.env[JS_WORKER_ENV] !== undefined;
}

// A worker's own env(index) values must be in process.env before the user's code reads them, so they
// are applied as soon as this module is loaded, before startFn can run.
applyPerWorkerEnvironment();

/**
 * Starts a sticky cluster: in the primary process, the master (listen, route, supervise); in a worker,
 * `startFn(callback)`, whose `callback(server)` hands over the server that serves routed connections.
 */
function stickyCluster(startFn, options) {
  if (typeof startFn !== 'function') {
    throw new TypeError('sticky-cluster-native: startFn must be a function: (callback) => callback(server)');
  }
  const settings = normalizeOptions(options);
  if (isWorker()) return runWorker(startFn, settings);
  // A worker follows its master's implementation whatever STICKY_CLUSTER_NATIVE says; js/ is required
  // only on this path, so the native package works without it.
  if (isJsWorker()) return require('./js/worker').runJsWorker(startFn, settings);
  return runMaster(settings);
}

let selected = null;

/**
 * The primary's implementation, chosen once per process: STICKY_CLUSTER_NATIVE=0 forces JavaScript, =1
 * requires the addon (binding.js's error is thrown), unset tries the addon and falls back to JavaScript
 * where none is built for this platform, saying so on one line.
 */
function selectImplementation(settings) {
  if (selected) return selected;
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
      logLine(
        settings.prefix,
        'warn',
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
  if (settings.debug && !selected.announced) logLine(settings.prefix, 'debug', `implementation: ${selected.name} (${selected.why})`);
  selected.announced = true;
  return selected;
}

/** The npm module's defaults (`||`, so 0/NaN fall back as there), plus `host`; port 0 picks a free port. */
function normalizeOptions(options) {
  if (options === undefined || options === null) options = {};
  if (typeof options !== 'object') throw new TypeError('sticky-cluster-native: options must be an object');
  const cpus = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  const settings = {
    prefix: options.prefix || 'sticky-cluster:',
    concurrency: options.concurrency || cpus || 1,
    port: options.port === 0 ? 0 : options.port || DEFAULT_PORT,
    host: options.host || '::',
    debug: Boolean(options.debug),
    hardShutdownDelay: options.hardShutdownDelay || DEFAULT_HARD_SHUTDOWN_DELAY,
    clientAddress: options.clientAddress || 'peer',
    trustedProxies: options.trustedProxies || [],
    env: options.env || ((index) => ({ stickycluster_worker_index: index })),
    routing: options.routing || 'handoff',
    backlog: options.backlog || DEFAULT_BACKLOG,
    errorHandler:
      options.errorHandler ||
      ((error) => {
        console.log(error);
        process.exit(1);
      }),
  };
  const problem = (name, expected, value) =>
    new TypeError(`sticky-cluster-native: options.${name} must be ${expected}, got ${util.inspect(value)}`);
  if (!Number.isInteger(settings.concurrency) || settings.concurrency < 1) {
    throw problem('concurrency', 'a positive integer', options.concurrency);
  }
  if (!Number.isInteger(settings.port) || settings.port < 0 || settings.port > 65535) {
    throw problem('port', 'an integer from 0 to 65535', options.port);
  }
  if (typeof settings.host !== 'string') throw problem('host', 'a string', options.host);
  if (typeof settings.prefix !== 'string') throw problem('prefix', 'a string', options.prefix);
  if (typeof settings.hardShutdownDelay !== 'number' || !(settings.hardShutdownDelay >= 0)) {
    throw problem('hardShutdownDelay', 'a number of milliseconds', options.hardShutdownDelay);
  }
  if (settings.routing !== 'handoff' && settings.routing !== 'kernel') {
    throw problem('routing', "'handoff' or 'kernel'", options.routing);
  }
  if (!Number.isInteger(settings.backlog) || settings.backlog < 1) {
    throw problem('backlog', 'a positive integer', options.backlog);
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
  return settings;
}

// ---------------------------------------------------------------------------------------------------
// Master role: the Node primary process.

function runMaster(settings) {
  const implementation = selectImplementation(settings);
  const { shared, perWorker } = splitEnvironment(settings);
  const command = relaunchCommand();
  let signals = 0;
  let cluster = null;
  const onSignal = (signal) => {
    signals += 1;
    // The first signal drains; a second one (an impatient Ctrl-C) kills at once, as the binary does.
    if (cluster) cluster.stop(signals > 1);
    if (settings.debug) logLine(settings.prefix, 'debug', `${signal}: ${signals > 1 ? 'hard' : 'graceful'} stop`);
  };
  const onEnd = (end) => {
    listenSignals(false);
    if (end.error) logLine(settings.prefix, 'error', end.error);
    process.exit(end.graceful && !end.error ? 0 : 1);
  };
  const listenSignals = (on) => {
    process[on ? 'on' : 'removeListener']('SIGTERM', onSignal);
    process[on ? 'on' : 'removeListener']('SIGINT', onSignal);
  };
  if (implementation.name === 'js' && settings.clientAddress !== 'peer') {
    // Reading proxy headers is the native master's; routing by the balancer's address would break stickiness.
    throw new TypeError(
      `sticky-cluster-native: options.clientAddress '${settings.clientAddress}' needs the native addon ` +
        '(the JavaScript implementation routes by the TCP peer only)'
    );
  }
  if (settings.routing === 'kernel' && process.versions.bun) {
    // Its http.Server.listen({ fd }) binds a new port instead: workers would say ready and never accept.
    throw new TypeError(
      `sticky-cluster-native: options.routing 'kernel' needs server.listen({ fd }) in the workers, which Bun ${process.versions.bun} ` +
        "does not do (it listens on a new port instead); use routing 'handoff' under Bun"
    );
  }
  if (implementation.name === 'js' && settings.routing === 'kernel') {
    throw new TypeError("sticky-cluster-native: options.routing 'kernel' needs the native addon (the JavaScript implementation routes in the master)");
  }
  if (implementation.name === 'js') {
    const { startJsMaster } = require('./js/master');
    cluster = startJsMaster(settings, {
      command,
      // Each worker is spawned on its own here, so its whole env(index) is in its real environment.
      envOf: (index) => ({ ...shared, ...perWorker[index] }),
      onListenError: (error) => {
        listenSignals(false);
        settings.errorHandler(error);
      },
      onEnd,
    });
    listenSignals(true);
    return jsClusterObject(cluster);
  }
  const native = implementation.addon;
  const env = { ...shared, [PER_WORKER_ENV]: JSON.stringify(perWorker) };
  let started;
  try {
    started = native.startCluster(
      {
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
      },
      onEnd
    );
  } catch (error) {
    process.nextTick(settings.errorHandler, error);
    return undefined;
  }
  if (typeof started.stop !== 'function') {
    // Like the npm module's `server.on('error', errorHandler)`: asynchronous, with a Node-style Error.
    process.nextTick(settings.errorHandler, listenError(started));
    return undefined;
  }
  cluster = started;
  listenSignals(true);
  return {
    implementation: 'native',
    address: cluster.address,
    port: cluster.port,
    stop: (hard = false) => cluster.stop(Boolean(hard)),
  };
}

/**
 * How a worker is started: the primary's own runtime, flags, script and arguments. Deno's
 * process.execArgv is empty: its flags (`run`, the permissions, `--config`) are in the kernel's copy of
 * the command line, which Deno lets a program read only with --allow-all.
 */
function relaunchCommand() {
  if (!process.versions.deno) return [process.execPath, ...process.execArgv, ...process.argv.slice(1)];
  try {
    return [process.execPath, ...fs.readFileSync('/proc/self/cmdline', 'utf8').split('\0').slice(1, -1)];
  } catch {
    // What Deno's own child_process does with a Node-style command line of the deno binary.
    return [process.execPath, 'run', '-A', ...process.argv.slice(1)];
  }
}

/** What the primary gets from the JavaScript master: address and port are read once it is bound. */
function jsClusterObject(cluster) {
  return {
    implementation: 'js',
    // Null until the listener is bound (a tick after the call; the native master binds at once).
    get address() {
      return cluster.address;
    },
    get port() {
      return cluster.port;
    },
    stop: (hard = false) => cluster.stop(Boolean(hard)),
  };
}

/**
 * Calls env(index) for every worker. Values equal for all workers go into the real environment (seen
 * from process start); the rest travel as one JSON variable that each worker applies when it loads this
 * module. A value containing `{index}` travels that way too: core would substitute it.
 */
function splitEnvironment(settings) {
  const perWorker = [];
  for (let index = 0; index < settings.concurrency; index += 1) {
    const values = settings.env(index);
    if (values !== undefined && values !== null && typeof values !== 'object') {
      throw new TypeError(`sticky-cluster-native: options.env(${index}) must return an object`);
    }
    const text = {};
    for (const [key, value] of Object.entries(values || {})) {
      if (value !== undefined) text[key] = String(value);
    }
    perWorker.push(text);
  }
  const shared = {};
  for (const key of new Set(perWorker.flatMap(Object.keys))) {
    const first = perWorker[0][key];
    if (first !== undefined && !first.includes('{index}') && perWorker.every((values) => values[key] === first)) {
      shared[key] = first;
      for (const values of perWorker) delete values[key];
    }
  }
  return { shared, perWorker };
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

function logLine(prefix, level, message) {
  process.stderr.write(`${prefix} ${level} ${message}\n`);
}

// ---------------------------------------------------------------------------------------------------
// Worker role: this script, re-launched by the master with STICKY_CLUSTER_FD.

function applyPerWorkerEnvironment() {
  const text = process.env[PER_WORKER_ENV];
  if (text === undefined || !isWorker()) return;
  delete process.env[PER_WORKER_ENV];
  let perWorker;
  try {
    perWorker = JSON.parse(text);
  } catch (error) {
    throw new Error(`sticky-cluster-native: ${PER_WORKER_ENV} is not valid JSON (${error.message})`);
  }
  const own = Array.isArray(perWorker) ? perWorker[Number(process.env.STICKY_CLUSTER_WORKER_INDEX)] : null;
  if (own && typeof own === 'object') Object.assign(process.env, own);
}

/**
 * A net.Socket over a connected socket fd this process owns. Bun (1.4) leaves `new net.Socket({ fd })`
 * without a handle (nothing is read, writes fail with ERR_SOCKET_CLOSED); its `connect({ fd })` adopts it.
 */
function adoptSocket(fd, allowHalfOpen) {
  if (process.versions.bun) return new net.Socket({ allowHalfOpen }).connect({ fd });
  return new net.Socket({ fd, readable: true, writable: true, allowHalfOpen });
}

function runWorker(startFn, settings) {
  const native = load();
  const worker = native.openWorker();
  // The channel belongs to this process alone: a child it starts must not take itself for a worker.
  delete process.env.STICKY_CLUSTER_FD;
  const debug = settings.debug
    ? (message) => logLine(settings.prefix, 'debug', `worker ${worker.index} (pid ${process.pid}) ${message}`)
    : () => {};
  // The shutdown (SIGTERM or the channel's end) is the JavaScript worker's too: js/drain.js. Without a
  // server the accept thread never started, so nothing is left to wait for.
  const drain = require('./js/drain').createDrain({
    debug,
    // Shuts the channel's read side: what is already queued still arrives, then the accept thread ends.
    stopRouting: () => worker.stop(),
    waitForChannelWithoutServer: false,
  });

  function onConnection(routed) {
    const server = drain.server;
    let socket;
    try {
      socket = adoptSocket(routed.fd, Boolean(server.allowHalfOpen));
    } catch (error) {
      fs.closeSync(routed.fd);
      logLine(settings.prefix, 'error', `worker ${worker.index}: cannot open routed connection: ${error.message}`);
      return;
    }
    drain.track(socket);
    debug(`connection from ${routed.remoteAddress}:${routed.remotePort}`);
    // Served even while draining: the master routed it before it stopped, and nothing is dropped.

    if (routed.proxied) {
      // The client's address came from a trusted balancer (PROXY protocol, X-Forwarded-For): the app sees
      // the client, not the balancer, as behind nginx's real_ip (socket.io's handshake.address, req.ip).
      // X-Forwarded-For carries no port (0 here): remotePort then stays the socket's own.
      Object.defineProperties(socket, {
        remoteAddress: { value: routed.remoteAddress, configurable: true },
        remoteFamily: { value: net.isIPv6(routed.remoteAddress) ? 'IPv6' : 'IPv4', configurable: true },
        ...(routed.remotePort ? { remotePort: { value: routed.remotePort, configurable: true } } : {}),
      });
    }
    // What net.Server's own accept path would apply to its sockets.
    if (server.noDelay) socket.setNoDelay(true);
    if (server.keepAlive) socket.setKeepAlive(true, server.keepAliveInitialDelay);
    if (server.pauseOnConnect) socket.pause();
    server.emit('connection', socket);
  }

  startFn(function callback(userServer) {
    if (drain.server || drain.draining) return;
    // Bun's http.Server is no net.Server (it is its own class over Bun's server), and serves sockets all the same.
    if (!(userServer instanceof net.Server || userServer instanceof http.Server)) {
      throw new TypeError('sticky-cluster-native: callback(server) needs a net.Server (http.Server, https.Server, ...)');
    }
    drain.serve(userServer);
    const server = userServer;
    const listenFd = worker.listenFd;
    // Every connection routed before the end has been handed over by then (the calls keep their order).
    worker.start(onConnection, (end) => drain.channelEnded(end.message, end.reason));
    if (listenFd === null) {
      // Ready only now: connections for this index waited in the master during the user's async init.
      worker.ready();
      debug('ready');
      return;
    }
    // routing: 'kernel': Node accepts from this worker's own listener (clients waited in its kernel accept
    // queue meanwhile); the accept thread only waits for the shutdown and then drains what is left.
    server.on('connection', (socket) => drain.track(socket));
    // Node listens again on a handle it is given: with the master's backlog, not its own default of 511.
    server.listen({ fd: listenFd }, worker.listenBacklog, () => {
      worker.ready();
      debug('ready (accepting from its own listener)');
    });
  });
  return undefined;
}

module.exports = stickyCluster;
