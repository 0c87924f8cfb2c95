'use strict';
// Starting a JavaScript worker process: the same command line as the primary, an IPC channel for Node's
// handle passing, the index variables in its environment, and the revival back-off of core's supervisor.

const { spawn } = require('child_process');
const { JS_WORKER_ENV } = require('./protocol');
const defaults = require('./defaults.json');

/** A worker that lived shorter than this counts as a crash for back-off purposes (core's CRASH_UPTIME). */
const CRASH_UPTIME_MS = defaults.crashUptimeMs;
const FIRST_BACKOFF_MS = defaults.firstBackoffMs;
const MAX_BACKOFF_MS = defaults.maxBackoffMs;

/** Delay before the next revival after `crashes` consecutive short-lived runs (0: revive at once). */
function revivalDelay(crashes) {
  if (crashes === 0) return 0;
  return Math.min(FIRST_BACKOFF_MS * 2 ** Math.min(crashes - 1, 16), MAX_BACKOFF_MS);
}

/**
 * Starts worker `index`: `command` (the primary's own node, flags and script) with `extraEnv` from the
 * `env` option, then the index variables, which win as they do in the native master.
 */
function spawnWorker(command, index, concurrency, extraEnv) {
  const env = { ...process.env, ...extraEnv };
  // A primary started from inside some other worker must not hand that role on.
  delete env.STICKY_CLUSTER_FD;
  delete env.STICKY_CLUSTER_SOCKET;
  Object.assign(env, {
    STICKY_CLUSTER_WORKER_INDEX: String(index),
    stickycluster_worker_index: String(index),
    STICKY_CLUSTER_CONCURRENCY: String(concurrency),
    [JS_WORKER_ENV]: '1',
  });
  return spawn(command[0], command.slice(1), {
    env,
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    // Its own session, as the native master's process group: a terminal's Ctrl-C reaches the primary
    // alone, which then shuts the workers down in order. (On Windows it would cut the worker from the
    // console its output goes to.)
    detached: process.platform !== 'win32',
    windowsHide: true,
  });
}

module.exports = { CRASH_UPTIME_MS, revivalDelay, spawnWorker };
