'use strict';
// Log lines of the JavaScript implementation in the native master's format (`prefix level message` on
// stderr; debug lines only with `debug`), so tests and people read the same lines from either one.

const os = require('os');

/** A logger `{ debug, info, warn, error }` writing `prefix level message` lines to stderr. */
function createLogger(prefix, debug) {
  const write = (level) => (message) => process.stderr.write(`${prefix} ${level} ${message}\n`);
  return { debug: debug ? write('debug') : () => {}, info: write('info'), warn: write('warn'), error: write('error') };
}

/** A duration as Rust's `Debug` prints it (`1s`, `1.5s`, `100ms`), the way the native master logs it. */
function formatDuration(ms) {
  if (ms >= 1000) return `${Number((ms / 1000).toFixed(3))}s`;
  return `${Math.round(ms)}ms`;
}

/** `exit status 3` or `signal 9 (SIGKILL)`, as core's describe_exit says it. */
function describeExit(code, signal) {
  if (code !== null && code !== undefined) return `exit status ${code}`;
  const number = os.constants.signals[signal];
  return number === undefined ? `signal ${signal}` : `signal ${number} (${signal})`;
}

/** A listen address as Rust prints a socket address: `[::]:8080`, `127.0.0.1:8080`. */
function formatSocketAddress(address, port) {
  return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
}

module.exports = { createLogger, describeExit, formatDuration, formatSocketAddress };
