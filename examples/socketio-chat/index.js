'use strict';
// An express + socket.io chat on a sticky cluster. Moving from the npm module is one line: the require
// below said 'sticky-cluster' before. Every worker runs this file; the master hands each client's
// connections to the same worker, so long-polling sessions work. Rooms span one worker here (add a
// socket.io adapter such as @socket.io/redis-adapter to chat across workers).

const http = require('http');
const path = require('path');
const express = require('express');
const { Server } = require('socket.io');

require('sticky-cluster-native')(
  (callback) => {
    const app = express();
    const server = http.createServer(app);
    const io = new Server(server);
    const worker = process.env.STICKY_CLUSTER_WORKER_INDEX;

    app.use(express.static(path.join(__dirname, 'public')));
    app.get('/whoami', (request, response) => {
      response.json({ worker: Number(worker), pid: process.pid, you: request.socket.remoteAddress });
    });

    io.on('connection', (socket) => {
      socket.emit('welcome', { worker: Number(worker), pid: process.pid });
      socket.on('chat', (text) => {
        io.emit('chat', { text: String(text).slice(0, 500), from: socket.id.slice(0, 6), worker: Number(worker) });
      });
    });

    // Anything async (database connections, caches) goes here; connections wait until callback(server).
    // Do not call server.listen(): the master listens.
    callback(server);
  },
  {
    concurrency: parseInt(process.env.WEB_CONCURRENCY, 10),
    port: parseInt(process.env.PORT, 10),
    debug: process.env.NODE_ENV === 'development',
  }
);
