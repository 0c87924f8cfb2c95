'use strict';
// What the JavaScript master and its workers say over Node's IPC channel: tagged messages, so a user's
// own process.send traffic is never mistaken for ours, and the variable that marks a JS worker.

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
/** Worker → master: the worker got SIGTERM from elsewhere; route nothing more to it. */
const DRAINING = 'draining';

/** The kind of one of our messages, or null for anything else on the channel. */
function kindOf(message) {
  return message !== null && typeof message === 'object' && typeof message[KEY] === 'string' ? message[KEY] : null;
}

/** A message of `kind`. */
function message(kind) {
  return { [KEY]: kind };
}

module.exports = { JS_WORKER_ENV, CONNECTION, SHUTDOWN, TAKEN, READY, DRAINING, kindOf, message };
