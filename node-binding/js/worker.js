'use strict';
// A worker of the JavaScript master: this same script, started with an IPC channel, serving the client
// sockets the master passes over it on the user's server. Shutdown follows the native worker: close the
// server, end idle keep-alive connections, finish responses in progress, exit once the last one ends.

const net = require('net');
const protocol = require('./protocol');
const { createLogger } = require('./log');

const SWEEP_INTERVAL_MS = 100;
/** How long a connection that has sent nothing yet may take to send its request once draining starts. */
const IDLE_GRACE_MS = 2000;

/** Runs `startFn(callback)` in a worker started by the JavaScript master. */
function runJsWorker(startFn, settings) {
  if (typeof process.send !== 'function') {
    throw new Error(
      `sticky-cluster-native: not a sticky-cluster worker: ${protocol.JS_WORKER_ENV} is set but there is no IPC channel to a master`
    );
  }
  const index = Number(process.env.STICKY_CLUSTER_WORKER_INDEX);
  // The role belongs to this process alone: a child it starts must not take itself for a worker.
  delete process.env[protocol.JS_WORKER_ENV];
  const log = createLogger(settings.prefix, settings.debug);
  const debug = (message) => log.debug(`worker ${index} (pid ${process.pid}) ${message}`);
  const sockets = new Set();
  let server = null;
  let draining = false;
  let drainStarted = 0;
  let channelEnded = false;
  let sweeper = null;

  const onSigterm = () => drain('SIGTERM');
  process.on('SIGTERM', onSigterm);
  // A user who listens for SIGTERM themselves decides when the worker exits.
  const exitIsOurs = () => process.listeners('SIGTERM').every((listener) => listener === onSigterm);

  process.on('message', (message, handle) => {
    const kind = protocol.kindOf(message);
    if (kind === protocol.CONNECTION) onConnection(handle);
    else if (kind === protocol.SHUTDOWN) onChannelEnd('the master says shut down');
  });
  // The master is gone (killed, crashed): die with it, as native workers do through PR_SET_PDEATHSIG.
  // A master exits only after its workers, so a disconnect here never cuts a graceful shutdown short.
  process.on('disconnect', () => {
    debug('channel: the master is gone; exiting');
    process.exit(1);
  });

  function onConnection(socket) {
    if (!(socket instanceof net.Socket)) return;
    if (!server) {
      // The master sends only after 'ready'; a socket without a server cannot be served.
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      if (draining) exitWhenDrained();
    });
    debug(`connection from ${socket.remoteAddress}:${socket.remotePort}`);
    // What net.Server's own accept path would apply to its sockets (http.Server wants half-open ones).
    socket.allowHalfOpen = Boolean(server.allowHalfOpen);
    if (server.noDelay) socket.setNoDelay(true);
    if (server.keepAlive) socket.setKeepAlive(true, server.keepAliveInitialDelay);
    server.emit('connection', socket);
    if (server.pauseOnConnect) socket.pause();
  }

  function onChannelEnd(why) {
    // Node's IPC keeps order: every connection sent before the shutdown message has arrived by now.
    channelEnded = true;
    debug(`channel: ${why}`);
    drain('shutdown');
    exitWhenDrained();
  }

  /** Ends keep-alive connections that wait for nothing; responses in progress get `Connection: close`. */
  function sweep() {
    const graceOver = Date.now() - drainStarted > IDLE_GRACE_MS;
    for (const socket of sockets) {
      const response = socket._httpMessage;
      if (socket.parser && !response && (socket.bytesRead > 0 || graceOver)) socket.destroySoon();
      else if (response && !response.headersSent) response.shouldKeepAlive = false;
    }
  }

  function exitWhenDrained() {
    if (!draining || !channelEnded || sockets.size > 0) return;
    if (sweeper) clearInterval(sweeper);
    sweeper = null;
    debug('drained');
    if (exitIsOurs()) process.exit(0);
  }

  function drain(reason) {
    if (draining) return;
    draining = true;
    drainStarted = Date.now();
    debug(`draining (${reason})`);
    // A SIGTERM from elsewhere: the master stops routing here and answers with the shutdown message.
    if (!channelEnded && process.connected) process.send(protocol.message(protocol.DRAINING), () => {});
    if (!server) {
      if (channelEnded && exitIsOurs()) process.exit(0);
      return;
    }
    // 'close' is what tells socket.io (engine.io) to close its clients.
    server.close(() => {});
    setImmediate(sweep);
    sweeper = setInterval(sweep, SWEEP_INTERVAL_MS);
    exitWhenDrained();
  }

  startFn(function callback(userServer) {
    if (server || draining) return;
    if (!(userServer instanceof net.Server)) {
      throw new TypeError('sticky-cluster-native: callback(server) needs a net.Server (http.Server, https.Server, ...)');
    }
    server = userServer;
    // Ready only now: connections for this index waited in the master during the user's async init.
    process.send(protocol.message(protocol.READY), () => {});
    debug('ready');
  });
  return undefined;
}

module.exports = { runJsWorker };
