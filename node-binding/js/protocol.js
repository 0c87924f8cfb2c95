'use strict';
// What the JavaScript master and its workers say over Node's IPC channel: tagged messages, so a user's
// own process.send traffic is never mistaken for ours, and the variable that marks a JS worker.
//
// The messages follow core's channel protocol (core/src/protocol.rs), kind for kind:
//
// | here | core | direction | meaning |
// | --- | --- | --- | --- |
// | READY | 2 ready | worker → master | callback(server) ran: connections may flow |
// | CONNECTION (+ handle, `seq`) | 3 connection (+ fd) | master → worker | a routed client socket, numbered per worker |
// | TAKEN (`seq`) | (none: a datagram's fd is the worker's once received) | worker → master | that connection arrived; the master closes its copy (one numbered lower still on its way never arrived: Node dropped its handle, and it is sent again) |
// | SHUTDOWN | 4 shutdown | master → worker | the cluster stops: finish and exit; after every connection sent before it |
// | STOPPING | 9 stopping | worker → master | "stop routing to me" (the worker got SIGTERM from elsewhere) |
// | STOPPED | 10 stopped | master → worker | answer to STOPPING, after the last connection it will ever send here |
//
// What a worker that stops routing (STOPPING, or core's Worker::stop_accepting) is promised, by both
// masters alike: nothing new is routed to it; every connection already on its way still arrives, in
// order, before STOPPED; connections for its index wait in the master's queue for its successor (bounded
// by queue.limit and queue.maxWait, then the next ready worker); its exit is an ordinary one, after which
// the index is revived. So the worker serves what it was given and exits, and no client is lost.

/** Set in a worker's environment by the JavaScript master (the native one sets STICKY_CLUSTER_FD). */
const JS_WORKER_ENV = 'STICKY_CLUSTER_JS_WORKER';
/** The key every message of ours carries; its value is the message kind. */
const KEY = 'stickyClusterJs';

/** Master → worker: a routed client socket travels as the message's handle. */
const CONNECTION = 'connection';
/** Master → worker: nothing more will come; finish and exit. Queued after every connection sent before. */
const SHUTDOWN = 'shutdown';
/** Worker → master: the connection just received is the worker's now; the master closes its copy. */
const TAKEN = 'taken';
/** Worker → master: callback(server) ran; connections may flow. */
const READY = 'ready';
/** Worker → master: route nothing more to me (core's kind 9); answered with STOPPED. */
const STOPPING = 'stopping';
/** Master → worker: the answer to STOPPING, after the last connection sent here (core's kind 10). */
const STOPPED = 'stopped';

/** The kind of one of our messages, or null for anything else on the channel. */
function kindOf(message) {
  return message !== null && typeof message === 'object' && typeof message[KEY] === 'string' ? message[KEY] : null;
}

/** A message of `kind`, with `fields` (a CONNECTION's and its TAKEN's `seq`). */
function message(kind, fields = {}) {
  return { ...fields, [KEY]: kind };
}

module.exports = { JS_WORKER_ENV, CONNECTION, SHUTDOWN, TAKEN, READY, STOPPING, STOPPED, kindOf, message };
