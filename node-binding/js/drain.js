'use strict';
// How a worker shuts down, the same for the native worker (index.js) and the JavaScript one (js/worker.js):
// on SIGTERM or the channel's end, close the server (engine.io closes its clients on 'close'), end idle
// keep-alive connections, finish responses in progress, and exit once the channel has ended and the last
// connection has closed. A user who listens for SIGTERM themselves decides when the worker exits.

const SWEEP_INTERVAL_MS = 100;
/** How long a connection that has sent nothing yet may take to send its request once draining starts. */
const IDLE_GRACE_MS = 2000;

/**
 * The drain state of one worker. `stopRouting()` runs when the drain starts (tell the master, or shut the
 * channel's read side); `waitForChannelWithoutServer`: a worker with no server yet still waits for the
 * channel's end before it exits (the JavaScript master answers the worker's STOPPING with STOPPED).
 */
function createDrain({ debug, stopRouting, waitForChannelWithoutServer }) {
  const sockets = new Set();
  let server = null;
  let draining = false;
  let drainStarted = 0;
  let channelEnded = false;
  let sweeper = null;

  const onSigterm = () => begin('SIGTERM');
  process.on('SIGTERM', onSigterm);
  const exitIsOurs = () => process.listeners('SIGTERM').every((listener) => listener === onSigterm);

  /**
   * Ends HTTP keep-alive connections that wait for nothing (they have read a request and hold no
   * response); responses in progress are sent with `Connection: close`. A connection that has sent
   * nothing yet gets a grace period to send its request.
   */
  function sweep() {
    const graceOver = Date.now() - drainStarted > IDLE_GRACE_MS;
    for (const socket of sockets) {
      const response = socket._httpMessage;
      // destroySoon: FIN after what is queued, then close, even on an allowHalfOpen (http) socket.
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

  function begin(reason) {
    if (draining) return;
    draining = true;
    drainStarted = Date.now();
    debug(`draining (${reason})`);
    stopRouting(channelEnded);
    if (!server) {
      if ((channelEnded || !waitForChannelWithoutServer) && exitIsOurs()) process.exit(0);
      return;
    }
    if (process.versions.deno) delete server.listening;
    // Bun (1.4) calls back but never emits 'close' for a server that never listened, and engine.io
    // closes its clients on that event: emit it then.
    let closed = false;
    server.once('close', () => (closed = true));
    server.close(() => closed || server.emit('close'));
    setImmediate(sweep);
    sweeper = setInterval(sweep, SWEEP_INTERVAL_MS);
    exitWhenDrained();
  }

  return {
    /** The user's server, once its start function has called back; null before. */
    get server() {
      return server;
    },
    /** Whether the drain has started (no new server is taken then). */
    get draining() {
      return draining;
    },
    /** Takes the user's server: connections are served on it from now on. */
    serve(userServer) {
      server = userServer;
      // Deno (2.9) ends every connection of a server that is not listening after its first response, which
      // breaks HTTP keep-alive and socket.io's long-polling: this server does serve, so it says it listens
      // (until the drain closes it).
      if (process.versions.deno) Object.defineProperty(server, 'listening', { value: true, configurable: true });
    },
    /** Counts a connection until it closes (a second call for the same socket does nothing). */
    track(socket) {
      if (sockets.has(socket)) return;
      sockets.add(socket);
      socket.once('close', () => {
        sockets.delete(socket);
        if (draining) exitWhenDrained();
      });
    },
    /** The channel has ended (`message` logged, `reason` the drain's): every connection routed here has arrived. */
    channelEnded(message, reason) {
      channelEnded = true;
      debug(`channel: ${message}`);
      begin(reason);
      exitWhenDrained();
    },
    /** Starts the drain (SIGTERM does the same). */
    begin,
  };
}

module.exports = { createDrain };
