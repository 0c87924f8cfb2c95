'use strict';
// The Node side of the handoff benchmark: the same tiny HTTP worker behind each way of routing connections.
// Every worker answers any request with {"worker":<index>,"pid":<pid>,"remote":"<address>"} and
// `Connection: close`, byte for byte the Rust hello-worker's reply.
// Usage: node workers.js <direct|sticky-cluster|socketio-sticky|native|native-kernel> <port> <concurrency>

const cluster = require('cluster');
const http = require('http');
const { EventEmitter } = require('events');
const path = require('path');

const [mode, portText, concurrencyText] = process.argv.slice(2);
const port = parseInt(portText, 10);
const concurrency = parseInt(concurrencyText, 10);
if (!(port > 0) || !(concurrency > 0)) {
  console.error('usage: node workers.js <direct|sticky-cluster|socketio-sticky|native|native-kernel> <port> <concurrency>');
  process.exit(2);
}

function answer(index) {
  return (req, res) => {
    const body = JSON.stringify({ worker: index, pid: process.pid, remote: req.socket.remoteAddress }) + '\n';
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'Content-Length': Buffer.byteLength(body),
      Connection: 'close',
    });
    res.end(body);
  };
}

function forkAll() {
  for (let index = 0; index < concurrency; index++) cluster.fork({ BENCH_WORKER_INDEX: String(index) });
}

switch (mode) {
  // No master in the path: the workers share one listening socket and the kernel hands out connections.
  case 'direct':
    cluster.schedulingPolicy = cluster.SCHED_NONE;
    if (cluster.isPrimary) forkAll();
    else http.createServer(answer(Number(process.env.BENCH_WORKER_INDEX))).listen(port, '::');
    break;

  // npm sticky-cluster 0.3.5: its master hashes remoteAddress and sends the handle over Node's IPC.
  case 'sticky-cluster':
    require('sticky-cluster')(
      (serve) => serve(http.createServer(answer(Number(process.env.stickycluster_worker_index)))),
      { concurrency, port, hardShutdownDelay: 1000 }
    );
    break;

  // @socket.io/sticky: the primary reads the first chunk, picks a worker (round-robin: its default,
  // least-connection, counts socket.io sessions only and so sends every plain request to one worker).
  case 'socketio-sticky': {
    const { setupMaster, setupWorker } = require('@socket.io/sticky');
    if (cluster.isPrimary) {
      // Its README's setup: the first chunk travels as a Buffer, which needs the advanced serialization.
      cluster.setupPrimary({ serialization: 'advanced' });
      const server = http.createServer();
      setupMaster(server, { loadBalancingMethod: 'round-robin' });
      server.listen(port, '::', forkAll);
    } else {
      const server = http.createServer(answer(Number(process.env.BENCH_WORKER_INDEX)));
      // setupWorker wants a socket.io server; the HTTP server and an engine to subscribe to are all it uses.
      setupWorker({ httpServer: server, engine: new EventEmitter() });
    }
    break;
  }

  // Our master, through the Node binding (npm package sticky-cluster-native, same API as npm sticky-cluster);
  // native-kernel: the same with routing 'kernel' (each worker's server accepts on its own listener).
  case 'native':
  case 'native-kernel': {
    const binding = process.env.STICKY_CLUSTER_NODE_BINDING || path.join(__dirname, '..', '..', 'node-binding');
    const index = () => Number(process.env.STICKY_CLUSTER_WORKER_INDEX ?? process.env.stickycluster_worker_index);
    require(binding)((serve) => serve(http.createServer(answer(index()))), {
      concurrency,
      port,
      hardShutdownDelay: 1000,
      routing: mode === 'native-kernel' ? 'kernel' : 'handoff',
    });
    break;
  }

  default:
    console.error(`unknown mode ${mode}: expected direct, sticky-cluster, socketio-sticky, native or native-kernel`);
    process.exit(2);
}
