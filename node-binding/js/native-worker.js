'use strict';
// A worker of the native master: joins the cluster through the addon (the channel in STICKY_CLUSTER_FD),
// takes each routed socket on the event loop and serves it on the user's server. Shutdown is js/drain.js.

const fs = require('fs');
const http = require('http');
const net = require('net');
const { load } = require('../binding');
const { createLogger } = require('./log');

/** Connections a native worker takes from its channel per event-loop turn before it lets I/O run. */
const TAKE_BATCH = 64;

/**
 * A net.Socket over a connected socket fd this process owns. Bun (1.4) leaves `new net.Socket({ fd })`
 * without a handle (nothing is read, writes fail with ERR_SOCKET_CLOSED); its `connect({ fd })` adopts it.
 */
function adoptSocket(fd, allowHalfOpen) {
  if (process.versions.bun) return new net.Socket({ allowHalfOpen }).connect({ fd });
  return new net.Socket({ fd, readable: true, writable: true, allowHalfOpen });
}

/** Runs `startFn(callback)` in a worker started by the native master. */
function runNativeWorker(startFn, settings) {
  const native = load();
  const worker = native.openWorker();
  // The channel belongs to this process alone: a child it starts must not take itself for a worker.
  delete process.env.STICKY_CLUSTER_FD;
  const log = createLogger(settings.prefix, settings.debug);
  const debug = (message) => log.debug(`worker ${worker.index} (pid ${process.pid}) ${message}`);
  // The shutdown (SIGTERM or the channel's end) is the JavaScript worker's too: js/drain.js. Without a
  // server the accept thread never started, so nothing is left to wait for.
  const drain = require('./drain').createDrain({
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
      log.error(`worker ${worker.index}: cannot open routed connection: ${error.message}`);
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
    // The watcher thread only says when something waits; this event loop takes it, a batch per turn, so
    // a worker whose loop is blocked leaves its connections in the channel, where the master sees them.
    const takeWaiting = () => {
      for (let n = 0; n < TAKE_BATCH; n += 1) {
        const taken = worker.take();
        if (taken === null) return;
        if (taken.end) {
          // Every connection routed before the end has been taken by now: the channel keeps their order.
          drain.channelEnded(taken.end.message, taken.end.reason);
          return;
        }
        try {
          onConnection(taken.connection);
        } catch (error) {
          // A throwing 'connection' listener must not leave the rest of the channel untaken.
          setImmediate(takeWaiting);
          throw error;
        }
      }
      setImmediate(takeWaiting);
    };
    worker.start(takeWaiting);
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

module.exports = { runNativeWorker };
