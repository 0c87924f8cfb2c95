'use strict';
// Test support: start a fixture cluster as a real process (killed when the test ends), find free
// loopback client addresses per worker index, and drive real socket.io clients from them.

const { execFileSync, spawn } = require('child_process');
const fs = require('fs');
const http = require('http');
const path = require('path');
const { io } = require('socket.io-client');

const FIXTURES = path.join(__dirname, 'fixtures');

/** npm string-hash over Node's remoteAddress text: the routing contract. */
function stringHash(text) {
  let hash = 5381;
  for (let i = text.length - 1; i >= 0; i -= 1) hash = (hash * 33) ^ text.charCodeAt(i);
  return hash >>> 0;
}

/** The worker index a client from `address` lands on behind a dual-stack listener. */
function routeIndex(address, concurrency) {
  return stringHash(`::ffff:${address}`) % concurrency;
}

/** The n-th distinct loopback client address (127.<block>.x.y), different per test file via `block`. */
function clientAddress(block, n) {
  return `127.${block}.${Math.floor(n / 250)}.${(n % 250) + 1}`;
}

/** A client address of `block` that routes to each index: addresses[index]. */
function addressesPerIndex(block, concurrency) {
  const found = new Array(concurrency).fill(null);
  for (let n = 0; found.includes(null); n += 1) {
    const address = clientAddress(block, n);
    const index = routeIndex(address, concurrency);
    if (found[index] === null) found[index] = address;
  }
  return found;
}

/** The implementation STICKY_CLUSTER_NATIVE asks for in `env` (1: native, 0: js), or null when unset. */
function expectedImplementation(env = process.env) {
  return { 0: 'js', 1: 'native' }[env.STICKY_CLUSTER_NATIVE] || null;
}

/**
 * Starts `fixtures/<script>` with the given environment and a ready fd (STICKY_CLUSTER_READY_FD=3, a
 * pipe: `app.ready` collects its JSON lines), waits for the master's `listening` line, and kills the
 * whole tree when the test ends. A fixture that reports its implementation (`fixture: implementation X`)
 * must run the one STICKY_CLUSTER_NATIVE asks for.
 */
async function startApp(t, script, env = {}, { waitForListening = true, reportsImplementation = script !== 'roundrobin-app.js' } = {}) {
  const child = spawn(process.execPath, [path.join(FIXTURES, script)], withReadyFd({ env: { ...process.env, ...env } }));
  const app = { child, stdout: '', stderr: '', port: null };
  child.stdout.setEncoding('utf8').on('data', (chunk) => (app.stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  app.ready = readyLines(child.stdio[3]);
  app.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  t.after(() => {
    // Workers die with the master (native: PR_SET_PDEATHSIG; js: when their IPC channel closes); a
    // leftover master is killed here.
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  if (waitForListening) {
    app.port = (await listening(app)).port;
    const expected = expectedImplementation({ ...process.env, ...env });
    if (reportsImplementation && expected) {
      app.implementation = await waitFor(app, () => (app.stderr.match(/^fixture: implementation (\w+)$/m) || [])[1]);
      if (app.implementation !== expected) {
        throw new Error(`STICKY_CLUSTER_NATIVE asks for ${expected}, but the cluster runs ${app.implementation}`);
      }
    }
  }
  return app;
}

/**
 * The JSON lines a master writes on its ready fd (the binary's `--ready-fd` format, core/src/ready.rs),
 * read from `stream` as they come: `lines` (every one so far), `next(event)` (waits up to 30 s for the
 * next one of that kind), `closed` (resolves once every writer has closed the pipe).
 */
function readyLines(stream) {
  const lines = [];
  const waiting = [];
  let buffer = '';
  stream.setEncoding('utf8').on('data', (chunk) => {
    buffer += chunk;
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      lines.push(JSON.parse(buffer.slice(0, end)));
      buffer = buffer.slice(end + 1);
      for (const waiter of waiting.splice(0)) waiter();
    }
  });
  const closed = new Promise((resolve) => stream.once('close', resolve));
  let seen = 0;
  const next = (event) =>
    within(
      30000,
      new Promise((resolve) => {
        const look = () => {
          const found = lines.findIndex((line, i) => i >= seen && line.event === event);
          if (found >= 0) {
            seen = found + 1;
            resolve(lines[found]);
          } else {
            waiting.push(look);
          }
        };
        look();
      }),
      `ready line ${event}`
    );
  return { lines, next, closed };
}

/** `options` for `spawn` with a ready pipe as fd 3, named by STICKY_CLUSTER_READY_FD (the Node front's variable). */
function withReadyFd(options = {}) {
  const stdio = [...(options.stdio || ['ignore', 'pipe', 'pipe'])];
  stdio[3] = 'pipe';
  return { ...options, env: { ...(options.env || process.env), STICKY_CLUSTER_READY_FD: '3' }, stdio };
}

/**
 * The ready lines a master writes to `file` (opened here for it: pass `fd` as its fd 3 with
 * STICKY_CLUSTER_READY_FD=3, then `done()` closes this process's copy): `lines` reads them again on
 * each look. A file and not a pipe, for Deno: its node:fs writes only to what it can reopen (a
 * socketpair, Node's 'pipe', it cannot).
 */
function readyFile(file) {
  const fd = fs.openSync(file, 'w');
  return {
    fd,
    done: () => fs.closeSync(fd),
    get lines() {
      const text = fs.readFileSync(file, 'utf8');
      return text.slice(0, text.lastIndexOf('\n') + 1).split('\n').filter(Boolean).map((line) => JSON.parse(line));
    },
  };
}

/**
 * The `listening` ready line of `app` (whose child was spawned `withReadyFd`), once written; rejects if
 * the app exits first or after `ms`. `app.ready` is the child's readyLines from the first call on.
 */
async function listening(app, ms = 15000) {
  if (!app.ready) app.ready = readyLines(app.child.stdio[3]);
  return waitFor(app, () => readyEvent(app, 'listening'), ms);
}

/** The first ready line of `event` the app wrote, or undefined. */
function readyEvent(app, event) {
  return app.ready.lines.find((line) => line.event === event);
}

/** The backlog (ss's Send-Q of a listening socket) of every TCP listener on `port`. */
function listenBacklogs(port) {
  const text = execFileSync('ss', ['-Hltn', `sport = :${port}`], { encoding: 'utf8' });
  return text
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((line) => Number(line.trim().split(/\s+/)[2]));
}

/** Resolves with check()'s first truthy result; rejects if the app exits first or after `ms`. */
function waitFor(app, check, ms = 15000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      const value = check();
      if (value) return resolve(value);
      if (app.child.exitCode !== null || app.child.signalCode !== null) {
        return reject(new Error(`the app exited (${app.child.exitCode ?? app.child.signalCode}); stderr:\n${app.stderr}`));
      }
      if (Date.now() - started > ms) return reject(new Error(`timed out; stderr:\n${app.stderr}`));
      setTimeout(poll, 20);
    };
    poll();
  });
}

/** Like waitFor, for an async check: resolves with its first truthy result, polled one at a time. */
async function waitUntil(app, check, ms = 15000) {
  const started = Date.now();
  for (;;) {
    const value = await check();
    if (value) return value;
    if (app.child.exitCode !== null || app.child.signalCode !== null) {
      throw new Error(`the app exited (${app.child.exitCode ?? app.child.signalCode}); stderr:\n${app.stderr}`);
    }
    if (Date.now() - started > ms) throw new Error(`timed out; stderr:\n${app.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** GET `path` from 127.0.0.1:`port` (a metrics page); resolves with the body text. */
function httpText(port, path_) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: path_, agent: false }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
        response.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

/**
 * The master's closing counters from its `stopped` ready line (after the app exited: the line is
 * written before the exit): `{ text, routed (the total), perWorker, redirected, closed, revivals, recovered }`.
 */
async function stoppedCounters(app) {
  await app.exited;
  await within(5000, app.ready.closed, 'the end of the ready fd');
  const stopped = readyEvent(app, 'stopped');
  if (!stopped) throw new Error(`no 'stopped' ready line: ${JSON.stringify(app.ready.lines)}\n${app.stderr}`);
  return {
    text: JSON.stringify(stopped),
    routed: stopped.routed.reduce((sum, n) => sum + n, 0),
    perWorker: stopped.routed,
    redirected: stopped.redirected,
    closed: stopped.closed,
    revivals: stopped.revivals,
    recovered: stopped.recovered,
  };
}

/** Rejects if `promise` takes longer than `ms`. */
function within(ms, promise, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** GET `path` from the cluster with the client bound to `localAddress`; resolves with the parsed JSON. */
function getJson(port, path_, localAddress, headers = {}) {
  return new Promise((resolve, reject) => {
    const request = http.get({ host: '127.0.0.1', port, path: path_, localAddress, headers, agent: false }, (response) => {
      let body = '';
      response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
      response.on('end', () => {
        try {
          resolve(JSON.parse(body));
        } catch (error) {
          reject(new Error(`not JSON (status ${response.statusCode}): ${body}`));
        }
      });
    });
    request.on('error', reject);
  });
}

/**
 * One socket.io client from `localAddress`: connects, sends `messages` chat messages one after the other
 * and waits for each echo. Resolves with what happened; never rejects (errors are counted by callers).
 * `keepAlive: false` opens a new TCP connection for every request; `pauseMs` spaces the messages out;
 * `addresses` collects the client address each echo says the worker saw.
 */
function chatClient({ port, localAddress, transports, messages, keepAlive = true, pauseMs = 0, timeoutMs = 20000 }) {
  return new Promise((resolve) => {
    const result = { localAddress, connected: false, echoed: 0, pids: new Set(), addresses: new Set(), errors: [], transport: null };
    const agent = new http.Agent({ localAddress, keepAlive });
    const socket = io(`http://127.0.0.1:${port}`, {
      transports,
      agent,
      forceNew: true,
      reconnection: false,
      timeout: 10000,
    });
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      result.transport = socket.io.engine ? socket.io.engine.transport.name : null;
      socket.disconnect();
      agent.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => {
      result.errors.push(`timeout after ${result.echoed} echoes`);
      finish();
    }, timeoutMs);
    const describe = (error) =>
      [error.message, error.description && (error.description.message || error.description), error.context && error.context.responseText]
        .filter(Boolean)
        .join(' / ');
    socket.on('connect_error', (error) => {
      result.errors.push(`connect_error: ${describe(error)}`);
      finish();
    });
    socket.on('disconnect', (reason, details) => {
      if (!finished) {
        result.errors.push(`disconnect: ${reason}${details ? ` (${describe(details)})` : ''}`);
        finish();
      }
    });
    // After finish() the client tears its own requests down (agent.destroy()): those errors are not failures.
    socket.io.engine?.on?.('error', (error) => {
      if (!finished) result.errors.push(`engine: ${describe(error)}`);
    });
    let sent = 0;
    const sendNext = () => {
      sent += 1;
      socket.emit('chat', { from: localAddress, n: sent });
    };
    socket.on('chat', (echo) => {
      if (echo.from !== localAddress || echo.n !== sent) {
        result.errors.push(`wrong echo ${JSON.stringify(echo)} for message ${sent}`);
      }
      result.echoed += 1;
      result.pids.add(echo.pid);
      result.addresses.add(echo.address);
      if (result.echoed === messages) finish();
      else if (pauseMs > 0) setTimeout(sendNext, pauseMs);
      else sendNext();
    });
    socket.on('connect', () => {
      result.connected = true;
      sendNext();
    });
  });
}

/** Runs `count` chat clients at once from distinct loopback addresses of `block`. */
async function chatCrowd({ port, block, count, transports, messages }) {
  const clients = [];
  for (let n = 0; n < count; n += 1) {
    clients.push(chatClient({ port, localAddress: clientAddress(block, n), transports, messages }));
  }
  return Promise.all(clients);
}

/** One line per failed client, for assertion messages. */
function failures(results, messages) {
  return results
    .filter((r) => !r.connected || r.echoed !== messages || r.errors.length > 0)
    .map((r) => `${r.localAddress}: connected=${r.connected} echoed=${r.echoed} ${r.errors.join('; ')}`);
}

module.exports = {
  addressesPerIndex,
  chatClient,
  chatCrowd,
  clientAddress,
  expectedImplementation,
  failures,
  getJson,
  httpText,
  routeIndex,
  listening,
  readyEvent,
  readyFile,
  readyLines,
  withReadyFd,
  stoppedCounters,
  startApp,
  stringHash,
  waitFor,
  waitUntil,
  listenBacklogs,
  within,
};
