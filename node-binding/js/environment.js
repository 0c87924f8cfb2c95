'use strict';
// A worker's environment from the `env(index)` option, for the native master: values the same for every
// worker go into the real environment; the rest travel as one JSON variable that each worker applies to
// process.env when it loads the package, before the user's code runs.

/** Carries the per-index part of `options.env` to the workers (JSON array, one object per index). */
const PER_WORKER_ENV = 'STICKY_CLUSTER_NATIVE_ENV';

/** What `env(index)` gives each worker, as text (undefined values left out), called once per index. */
function workerEnvironments(settings) {
  const perWorker = [];
  for (let index = 0; index < settings.concurrency; index += 1) {
    const values = settings.env(index);
    if (values !== undefined && values !== null && typeof values !== 'object') {
      throw new TypeError(`sticky-cluster-native: options.env(${index}) must return an object`);
    }
    const text = {};
    for (const [key, value] of Object.entries(values || {})) {
      if (value !== undefined) text[key] = String(value);
    }
    perWorker.push(text);
  }
  return perWorker;
}

/**
 * Calls env(index) for every worker. Values equal for all workers go into the real environment (seen
 * from process start); the rest travel as one JSON variable that each worker applies when it loads this
 * module. A value containing `{index}` travels that way too: core would substitute it. A value that is
 * each worker's own index is shared as `{index}`, which core substitutes.
 */
function splitEnvironment(settings) {
  const perWorker = workerEnvironments(settings);
  const shared = {};
  for (const key of new Set(perWorker.flatMap(Object.keys))) {
    const first = perWorker[0][key];
    if (first !== undefined && !first.includes('{index}') && perWorker.every((values) => values[key] === first)) {
      shared[key] = first;
      for (const values of perWorker) delete values[key];
    } else if (perWorker.every((values, index) => values[key] === String(index))) {
      // The worker's own index (the default env): core writes it itself, so the JSON stays small.
      shared[key] = '{index}';
      for (const values of perWorker) delete values[key];
    }
  }
  return { shared, perWorker };
}

/** In a native worker: puts its own part of PER_WORKER_ENV into process.env, and removes the variable. */
function applyPerWorkerEnvironment() {
  const text = process.env[PER_WORKER_ENV];
  if (text === undefined || !isNativeWorker()) return;
  delete process.env[PER_WORKER_ENV];
  let perWorker;
  try {
    perWorker = JSON.parse(text);
  } catch (error) {
    throw new Error(`sticky-cluster-native: ${PER_WORKER_ENV} is not valid JSON (${error.message})`);
  }
  const own = Array.isArray(perWorker) ? perWorker[Number(process.env.STICKY_CLUSTER_WORKER_INDEX)] : null;
  if (own && typeof own === 'object') Object.assign(process.env, own);
}

/** This process was started by the native master (STICKY_CLUSTER_FD) or attached to one (STICKY_CLUSTER_SOCKET). */
function isNativeWorker() {
  return process.env.STICKY_CLUSTER_FD !== undefined || process.env.STICKY_CLUSTER_SOCKET !== undefined;
}

module.exports = { PER_WORKER_ENV, workerEnvironments, splitEnvironment, applyPerWorkerEnvironment, isNativeWorker };
