'use strict';
// A worker of the JavaScript master: this same script, started with an IPC channel, serving the client
// sockets the master passes over it on the user's server. Shutdown is the native worker's (drain.js).

const http = require('http');
const net = require('net');
const protocol = require('./protocol');
const { createLogger } = require('./log');
const { createDrain } = require('./drain');

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
  const drain = createDrain({
    debug,
    // A SIGTERM from elsewhere: the master stops routing here and answers STOPPED after the last one.
    stopRouting: (channelEnded) => {
      if (!channelEnded && process.connected) process.send(protocol.message(protocol.STOPPING), () => {});
    },
    waitForChannelWithoutServer: true,
  });

  process.on('message', (message, handle) => {
    const kind = protocol.kindOf(message);
    if (kind === protocol.CONNECTION) {
      // Said before the socket is used: the master then closes its copy (until now it could take the
      // connection back if this process died).
      process.send(protocol.message(protocol.TAKEN, { seq: message.seq }), () => {});
      onConnection(handle);
    }
    // Node's IPC keeps order: every connection sent before the shutdown message has arrived by now.
    else if (kind === protocol.SHUTDOWN) drain.channelEnded('the master says shut down', 'shutdown');
    else if (kind === protocol.STOPPED) drain.channelEnded('the master routes nothing more here', 'closed');
  });
  // The master is gone (killed, crashed): die with it, as native workers do through PR_SET_PDEATHSIG.
  // A master exits only after its workers, so a disconnect here never cuts a graceful shutdown short.
  process.on('disconnect', () => {
    debug('channel: the master is gone; exiting');
    process.exit(1);
  });

  function onConnection(socket) {
    if (!(socket instanceof net.Socket)) return;
    const server = drain.server;
    if (!server) {
      // The master sends only after 'ready'; a socket without a server cannot be served.
      socket.destroy();
      return;
    }
    drain.track(socket);
    debug(`connection from ${socket.remoteAddress}:${socket.remotePort}`);
    // What net.Server's own accept path would apply to its sockets (http.Server wants half-open ones).
    socket.allowHalfOpen = Boolean(server.allowHalfOpen);
    if (server.noDelay) socket.setNoDelay(true);
    if (server.keepAlive) socket.setKeepAlive(true, server.keepAliveInitialDelay);
    server.emit('connection', socket);
    if (server.pauseOnConnect) socket.pause();
  }

  startFn(function callback(userServer) {
    if (drain.server || drain.draining) return;
    // Bun's http.Server is no net.Server (it is its own class over Bun's server), and serves sockets all the same.
    if (!(userServer instanceof net.Server || userServer instanceof http.Server)) {
      throw new TypeError('sticky-cluster-native: callback(server) needs a net.Server (http.Server, https.Server, ...)');
    }
    drain.serve(userServer);
    // Ready only now: connections for this index waited in the master during the user's async init.
    process.send(protocol.message(protocol.READY), () => {});
    debug('ready');
  });
  return undefined;
}

module.exports = { runJsWorker };
