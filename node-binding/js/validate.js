'use strict';
// The JavaScript master's check of option values, in core's words: the same bounds (from defaults.json,
// which core generates) and the same one-line messages as the native master's Config::validate, so an
// option refused by one implementation is refused by the other with the same text.

const defaults = require('./defaults.json');

/** Largest listen backlog, as core's (a u32; the kernel caps it at net.core.somaxconn). */
const MAX_BACKLOG = 4294967295;
/** Largest count core keeps in a u32. */
const MAX_COUNT = 4294967295;

/** A number as JavaScript prints it (`4000000000`, `1.5`, `Infinity`): the text after `got`. */
function numberText(value) {
  return String(value);
}

/** Why `value` breaks the rule (`name: must be at most 1024, got 4000000000`), or null when it is fine. */
function problem(name, value, { whole, min, max }) {
  if (typeof value !== 'number' || Number.isNaN(value)) return `${name}: must be a number, got ${String(value)}`;
  if (value < min) return `${name}: must be at least ${min}, got ${numberText(value)}`;
  if (value > max) return `${name}: must be at most ${max}, got ${numberText(value)}`;
  if (whole && !Number.isInteger(value)) return `${name}: must be a whole number, got ${numberText(value)}`;
  return null;
}

/** The numeric options with their bounds, as core checks them (after index.js applied the defaults). */
function rules(settings) {
  const list = [
    ['concurrency', settings.concurrency, { whole: true, min: defaults.minConcurrency, max: defaults.maxConcurrency }],
    ['port', settings.port, { whole: true, min: 0, max: 65535 }],
    ['hardShutdownDelay', settings.hardShutdownDelay, { whole: false, min: 0, max: defaults.maxHardShutdownDelayMs }],
    ['backlog', settings.backlog, { whole: true, min: 1, max: MAX_BACKLOG }],
    ['queue.limit', settings.queue.limit, { whole: true, min: 1, max: MAX_COUNT }],
    ['queue.maxWait', settings.queue.maxWait, { whole: false, min: 0, max: defaults.maxHardShutdownDelayMs }],
    ['queue.perSource', settings.queue.perSource, { whole: true, min: 1, max: MAX_COUNT }],
  ];
  if (settings.metrics) list.push(['metrics.port', settings.metrics.port, { whole: true, min: 0, max: 65535 }]);
  return list;
}

/** Throws a TypeError (`sticky-cluster-native: concurrency: must be at most 1024, got 4000000000`) for the first bad value. */
function validate(settings) {
  for (const [name, value, rule] of rules(settings)) {
    const text = problem(name, value, rule);
    if (text) throw new TypeError(`sticky-cluster-native: ${text}`);
  }
}

module.exports = { validate, problem, MAX_BACKLOG, MAX_COUNT };
