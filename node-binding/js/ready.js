'use strict';
// Readiness as data in the Node primary: `STICKY_CLUSTER_READY_FD=N` names an fd for the binary's
// `--ready-fd` lines (one JSON object a line, core/src/ready.rs: `version` 1, `event`, its fields,
// `pid`), for the programs that drive a cluster; the log stays the text for people. The native master
// writes them from core; this file reads the variable for both fronts, writes the JavaScript master's
// lines, and the `error` line of a start refused before either master took the fd.

const fs = require('fs');
const util = require('util');
const { version } = require('../package.json');
const { formatSocketAddress } = require('./log');

/** The variable that names the ready fd (the binary's `--ready-fd`). */
const READY_FD_ENV = 'STICKY_CLUSTER_READY_FD';
/** The version of the line format, core's `ready::VERSION`. */
const VERSION = 1;
/** What the `listening` line says as `build`: this package (the executable is the JavaScript runtime). */
const BUILD = `sticky-cluster-native@${version}`;

/** A TypeError for the variable, in the words of core's `ReadyFd::from_env`. */
function refused(text, reason) {
  return new TypeError(`sticky-cluster-native: ${READY_FD_ENV}=${text}: ${reason}`);
}

/**
 * The fd number `STICKY_CLUSTER_READY_FD` names, taken out of the environment so that no worker's
 * environment names an fd it does not have; null when unset. Throws a TypeError for text that is not
 * a non-negative decimal number.
 */
function takeReadyFdNumber() {
  const text = process.env[READY_FD_ENV];
  if (text === undefined) return null;
  delete process.env[READY_FD_ENV];
  const fd = /^\s*\d+\s*$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(fd) || fd > 2147483647) throw refused(text, `not an fd number: ${JSON.stringify(text)}`);
  return fd;
}

/** An fs error as Rust prints an OS error (`Bad file descriptor (os error 9)`), so both fronts word it alike. */
function osErrorText(error) {
  const known = typeof error.errno === 'number' ? util.getSystemErrorMap().get(error.errno) : undefined;
  if (!known) return error.message;
  return `${known[1].charAt(0).toUpperCase()}${known[1].slice(1)} (os error ${-error.errno})`;
}

/** One line for `event` with `fields` on `fd`, in core's field order; throws what `write` throws. */
function writeLine(fd, event, fields) {
  fs.writeSync(fd, `${JSON.stringify({ version: VERSION, event, ...fields, pid: process.pid })}\n`);
}

/** The `error` line of a start that failed before a master took `fd` (null: no ready fd); never throws. */
function reportStartError(fd, error) {
  if (fd === null) return;
  try {
    const message = String(error && error.message ? error.message : error).replace(/^sticky-cluster-native: /, '');
    writeLine(takeReadyFd(fd), 'error', { message });
  } catch {
    // The fd was what the start refused, or its reader is gone: the thrown error says it all.
  }
}

/**
 * `fd`'s access mode as /proc/self/fdinfo says it (a file every runtime can read, where Deno's node:fs
 * cannot fstat a descriptor it did not open): 'read', 'write', or null when it is not open. Throws the
 * TypeError for the variable where the runtime will not let it be read (Deno without --allow-all).
 */
function accessMode(fd) {
  let text;
  try {
    text = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  } catch (error) {
    if (error.code === 'ENOENT') return null;
    // Deno without --allow-all (NotCapable): nothing in its node:fs can reach a descriptor it did not open.
    throw refused(String(fd), `this runtime cannot write to an fd it was given (${error.message.split('\n')[0]})`);
  }
  const flags = /^flags:\s*([0-7]+)$/m.exec(text);
  return flags && (parseInt(flags[1], 8) & 3) === 0 ? 'read' : 'write';
}

/**
 * Checks that `fd` is open for writing and returns the descriptor to write the lines to, kept out of
 * the workers so that the reader sees the end when the primary exits. Node has marked the fds it was
 * started with close-on-exec already (libuv's uv_disable_stdio_inheritance, 0 to 15 at least); for the
 * other runtimes and higher numbers, a pipe or a file is reopened through /proc/self/fd (a new,
 * close-on-exec description, and the only way Deno's node:fs writes to a descriptor it did not open)
 * and the old number closed where the runtime lets it. A standard stream stays as it is, and so does a
 * socket, which cannot be reopened (Node writes to it by number). Throws the TypeError core's
 * `ReadyFd::take` words.
 */
function takeReadyFd(fd) {
  const mode = accessMode(fd);
  if (mode === null) throw refused(String(fd), 'not an open file descriptor (Bad file descriptor (os error 9))');
  if (mode === 'read') throw refused(String(fd), 'open for reading only');
  if (fd <= 2) return fd;
  let moved = null;
  try {
    moved = fs.openSync(`/proc/self/fd/${fd}`, 'a');
  } catch {
    // A socket (ENXIO): written by its number below.
  }
  if (moved !== null) {
    try {
      fs.closeSync(fd);
    } catch {
      // Deno's node:fs closes only what it opened: the old number stays open, unused.
    }
    return moved;
  }
  try {
    fs.writeSync(fd, Buffer.alloc(0));
  } catch (error) {
    throw refused(String(fd), `a socket this runtime cannot write to by its number (${osErrorText(error)}); give a pipe or a file`);
  }
  return fd;
}

/**
 * The JavaScript master's lines on a taken fd: `listening`, `stopped`, `error`, as core writes them.
 * A reader that has gone away is logged once (`log.warn`) and not written to again.
 */
class ReadyLines {
  constructor(fd, log) {
    this.fd = fd;
    this.log = log;
    this.failed = false;
  }

  write(event, fields) {
    if (this.failed) return;
    try {
      writeLine(this.fd, event, fields);
    } catch (error) {
      this.failed = true;
      this.log.warn(`the ready fd ${this.fd}: ${error.message}; no more lines are written to it`);
    }
  }

  /** The master listens: `{ address, port }` bound, `metrics` the page's `{ address, port }` or null. */
  listening({ address, port, workers, metrics }) {
    this.write('listening', {
      address: formatSocketAddress(address, port),
      host: address,
      port,
      workers,
      routing: 'handoff',
      metrics: metrics ? formatSocketAddress(metrics.address, metrics.port) : null,
      attach_socket: null,
      build: BUILD,
    });
  }

  /** The master is about to exit: `graceful` and the counters of `stats` (js/master.js's). */
  stopped(graceful, stats) {
    const { routed, redirected, closed, revivals, recovered, reloadFailures } = stats;
    this.write('stopped', { graceful, routed, redirected, closed, revivals, recovered, reload_failures: reloadFailures });
  }

  /** The master exits with an error (a listen error: nothing started). */
  error(message) {
    this.write('error', { message });
  }
}

module.exports = { READY_FD_ENV, ReadyLines, reportStartError, takeReadyFd, takeReadyFdNumber };
