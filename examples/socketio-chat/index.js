'use strict';
// An express + socket.io chat on a sticky cluster. Moving from the npm module is one line: the require
// below said 'sticky-cluster' before. Every worker runs this file; the master hands each client's
// connections to the same worker, so long-polling sessions work. With REDIS_URL set, io.emit goes through
// Redis (@socket.io/redis-adapter) and reaches the clients of every worker on every host; without it, a
// message reaches only the clients of the worker its sender is on.

const http = require('http');
const os = require('os');
const path = require('path');
const express = require('express');
const { Server } = require('socket.io');

/** One stderr line per worker event, tagged with the worker's index. */
function log(text) {
  process.stderr.write(`chat[${process.env.STICKY_CLUSTER_WORKER_INDEX}]: ${text}\n`);
}

/**
 * Connects `io` to Redis at `url`: one client publishes, a duplicate subscribes (a subscribed Redis
 * connection can do nothing else). Resolves once both are connected and the adapter is in place, so the
 * first client served already hears the other workers.
 */
async function useRedisAdapter(io, url) {
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pubClient = createClient({ url });
  const subClient = pubClient.duplicate();
  for (const [name, client] of [['publish', pubClient], ['subscribe', subClient]]) {
    // Without an 'error' listener a Redis outage would crash the worker; the client retries by itself
    // (at start too: connect() waits), so one line per outage is enough. Messages sent during it reach
    // this worker's clients at once, the other workers late (the client queues the publish) or never.
    let down = false;
    client.on('error', (error) => {
      if (!down) log(`redis ${name} connection: ${error.message || error.code}; retrying`);
      down = true;
    });
    client.on('ready', () => {
      if (down) log(`redis ${name} connection back`);
      down = false;
    });
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  io.adapter(createAdapter(pubClient, subClient));
}

require('sticky-cluster-native')(
  (callback) => {
    const worker = Number(process.env.STICKY_CLUSTER_WORKER_INDEX);
    const host = os.hostname();
    const app = express();
    const server = http.createServer(app);
    const io = new Server(server);

    app.use(express.static(path.join(__dirname, 'public')));
    app.get('/whoami', (request, response) => {
      response.json({ worker, pid: process.pid, host, you: request.socket.remoteAddress });
    });

    io.on('connection', (socket) => {
      socket.emit('welcome', { worker, pid: process.pid, host });
      socket.on('chat', (text) => {
        io.emit('chat', { text: String(text).slice(0, 500), from: socket.id.slice(0, 6), worker, pid: process.pid, host });
      });
    });

    // Anything async (database connections, caches) goes here; connections wait until callback(server).
    // Do not call server.listen(): the master listens.
    if (process.env.REDIS_URL) {
      useRedisAdapter(io, process.env.REDIS_URL).then(
        () => callback(server),
        (error) => {
          // A bad REDIS_URL, say: the master revives the worker, which says so again.
          log(`cannot use Redis at ${process.env.REDIS_URL}: ${error.message}`);
          process.exit(1);
        }
      );
    } else {
      callback(server);
    }
  },
  {
    concurrency: parseInt(process.env.WEB_CONCURRENCY, 10),
    port: parseInt(process.env.PORT, 10),
    debug: process.env.NODE_ENV === 'development',
  }
);
