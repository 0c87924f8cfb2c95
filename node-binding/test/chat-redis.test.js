'use strict';
// Issue 13: examples/socketio-chat with a real Redis (Debian's redis-server, started here on a loopback port
// of its own) and @socket.io/redis-adapter. Two apps of 4 workers each stand for two hosts; 60 socket.io
// clients from distinct loopback addresses, spread over both, each message must reach every client exactly
// once; a worker killed with SIGKILL comes back and its clients, reconnecting, get the next messages.
// Without Redis the same crowd hears only its own worker (what the adapter buys).

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const http = require('http');
const net = require('net');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');
const { io } = require('socket.io-client');
const { clientAddress, listening, waitFor, within, withReadyFd } = require('./helpers');

const exampleDir = path.resolve(__dirname, '..', '..', 'examples', 'socketio-chat');
const WORKERS = 4;
const CLIENTS = 60;
const MESSAGES_PER_CLIENT = 3;

/** The redis-server binary on PATH (or Debian's place for it), or null. */
function findRedisServer() {
  const dirs = (process.env.PATH || '').split(':').concat(['/usr/bin', '/usr/sbin', '/usr/local/bin']);
  for (const dir of dirs) {
    const candidate = path.join(dir || '.', 'redis-server');
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

/** A loopback port nobody listens on right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Starts redis-server on a free loopback port, without persistence, and kills it when the test ends
 * (also if the test fails or the test process exits early). Under CI=true a missing binary is a failure.
 */
async function startRedis(t) {
  const binary = findRedisServer();
  if (!binary) {
    if (process.env.CI === 'true') assert.fail('redis-server not found (Debian package redis-server; .ci/run installs it)');
    t.skip('redis-server not installed (apt-get install redis-server)');
    return null;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-redis-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  let lastError = '';
  // Another process may take the free port between the probe and redis-server's bind: try a few.
  for (let attempt = 0; attempt < 5; attempt += 1) {
    const port = await freePort();
    const child = spawn(binary, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const redis = { child, stdout: '', stderr: '', port, url: `redis://127.0.0.1:${port}` };
    child.stdout.setEncoding('utf8').on('data', (chunk) => (redis.stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk) => (redis.stderr += chunk));
    const kill = () => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL');
    process.once('exit', kill);
    t.after(kill);
    try {
      const logs = { child, get stderr() { return redis.stdout + redis.stderr; } };
      await waitFor(logs, () => /Ready to accept connections/.test(redis.stdout), 10000);
      return redis;
    } catch (error) {
      lastError = error.message;
      kill();
    }
  }
  throw new Error(`redis-server did not start: ${lastError}`);
}

/** Runs the example (`node index.js`, as `npm start` does) with 4 workers; resolves once it listens. */
async function startExample(t, env) {
  const child = spawn(
    process.execPath,
    ['index.js'],
    withReadyFd({
      cwd: exampleDir,
      env: { ...process.env, PORT: '0', WEB_CONCURRENCY: String(WORKERS), NODE_ENV: 'development', ...env },
      stdio: ['ignore', 'ignore', 'pipe'],
    })
  );
  const app = { child, stderr: '' };
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  app.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  // Workers die with the master; a master left over by a failed test is killed here.
  t.after(() => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL'));
  const at = await listening(app);
  assert.strictEqual(at.workers, WORKERS, JSON.stringify(at));
  app.port = at.port;
  return app;
}

/**
 * A chat client from `localAddress` on `app` (a label for figures). It reconnects by itself (as a browser
 * does) and records every welcome (worker, pid) and how often it heard each chat text.
 */
function chatter(port, app, localAddress) {
  const agent = new http.Agent({ localAddress, keepAlive: true });
  const socket = io(`http://127.0.0.1:${port}`, {
    agent,
    forceNew: true,
    transports: ['polling', 'websocket'],
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    timeout: 10000,
  });
  const client = { app, localAddress, socket, agent, welcomes: [], heard: new Map(), errors: [] };
  socket.on('welcome', (welcome) => client.welcomes.push(welcome));
  socket.on('chat', (message) => client.heard.set(message.text, (client.heard.get(message.text) || 0) + 1));
  socket.on('connect_error', (error) => client.errors.push(`connect_error: ${error.message}`));
  client.close = () => {
    socket.disconnect();
    agent.destroy();
  };
  return client;
}

/** The worker a client is on now: its last welcome. */
const placeOf = (client) => client.welcomes[client.welcomes.length - 1];

/**
 * Waits until every client has had `count` welcomes (a first connection, or one more after a reconnect);
 * rejects after 60 s (a loaded 2-core machine starts 8 workers slowly) naming the clients still waiting and
 * what they saw, with the apps' logs.
 */
async function welcomed(clients, count, what, apps) {
  const started = Date.now();
  while (!clients.every((c) => c.welcomes.length >= count)) {
    if (Date.now() - started > 60000) {
      const waiting = clients.filter((c) => c.welcomes.length < count);
      const seen = waiting.map((c) => `${c.localAddress} (host ${c.app}, ${c.welcomes.length} welcomes, ${c.errors.slice(-2).join('; ')})`);
      throw new Error(`${what}: not welcomed after 60 s: ${seen.join(', ')}\n${apps.map((a) => a.stderr).join('\n')}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Every sender sends `perClient` messages at once; then counts, for every listener and every message,
 * how often it arrived. Waits until nothing is missing (or `ms`), then a little longer for late duplicates.
 */
async function chatRound(label, senders, listeners, perClient, { ms = 20000, expectAll = true } = {}) {
  const texts = [];
  for (const [n, sender] of senders.entries()) {
    for (let k = 0; k < perClient; k += 1) {
      const text = `${label} ${n} ${k}`;
      texts.push({ text, sender });
      sender.socket.emit('chat', text);
    }
  }
  const missing = () => listeners.some((l) => texts.some(({ text }) => !l.heard.has(text)));
  const started = Date.now();
  while (expectAll && missing() && Date.now() - started < ms) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, expectAll ? 300 : 1500));
  const figures = {
    clients: listeners.length,
    messages: texts.length,
    expected: 0,
    delivered: 0,
    duplicates: 0,
    lost: 0,
    crossWorker: 0,
    crossHost: 0,
  };
  for (const { text, sender } of texts) {
    const from = placeOf(sender);
    for (const listener of listeners) {
      const copies = listener.heard.get(text) || 0;
      const to = placeOf(listener);
      figures.expected += 1;
      if (copies === 0) {
        figures.lost += 1;
        continue;
      }
      figures.delivered += 1;
      figures.duplicates += copies - 1;
      if (listener.app !== sender.app) figures.crossHost += 1;
      else if (to.pid !== from.pid) figures.crossWorker += 1;
    }
  }
  return figures;
}

/** One line of figures for diagnostics and assertion messages. */
const summary = (f) =>
  `${f.clients} clients, ${f.messages} messages, ${f.expected} expected deliveries: delivered ${f.delivered} ` +
  `(${f.crossWorker} to another worker of the same host, ${f.crossHost} to the other host), ` +
  `duplicates ${f.duplicates}, lost ${f.lost}`;

/** Disconnects the clients, stops both apps with SIGTERM, and checks that they end cleanly. */
async function stopAll(clients, apps) {
  for (const client of clients) client.close();
  for (const app of apps) app.child.kill('SIGTERM');
  for (const app of apps) {
    const { code } = await within(20000, app.exited, 'example after SIGTERM');
    assert.strictEqual(code, 0, app.stderr);
  }
}

test('with Redis, chat messages reach every client on every worker of both hosts exactly once, also after a SIGKILL', async (t) => {
  const redis = await startRedis(t);
  if (!redis) return;
  const hosts = [await startExample(t, { REDIS_URL: redis.url }), await startExample(t, { REDIS_URL: redis.url })];
  const clients = [];
  t.after(() => clients.forEach((c) => c.close()));
  for (let n = 0; n < CLIENTS; n += 1) {
    const host = n % 2;
    clients.push(chatter(hosts[host].port, host, clientAddress(70, n)));
  }
  await welcomed(clients, 1, 'first connection', hosts);
  for (const host of [0, 1]) {
    const workers = new Set(clients.filter((c) => c.app === host).map((c) => placeOf(c).worker));
    assert.strictEqual(workers.size, WORKERS, `host ${host}: clients on workers ${[...workers]} only`);
  }
  const pids = new Set(clients.map((c) => placeOf(c).pid));
  assert.strictEqual(pids.size, 2 * WORKERS, 'every worker of both hosts has its own pid');

  const first = await chatRound('first', clients, clients, MESSAGES_PER_CLIENT);
  t.diagnostic(`redis, first round: ${summary(first)}`);
  assert.deepStrictEqual([first.lost, first.duplicates], [0, 0], summary(first));
  assert.ok(first.crossHost > 0 && first.crossWorker > 0, summary(first));

  // SIGKILL one worker of host 0: its clients lose their connection, reconnect to the revived worker
  // (same index, new pid), and hear the next round like everyone else.
  const victim = placeOf(clients[0]);
  const orphans = clients.filter((c) => c.app === 0 && placeOf(c).pid === victim.pid);
  const others = clients.filter((c) => !orphans.includes(c));
  const killedAt = Date.now();
  process.kill(victim.pid, 'SIGKILL');
  await welcomed(orphans, 2, 'reconnection after SIGKILL', hosts);
  const backAfterMs = Date.now() - killedAt;
  for (const orphan of orphans) {
    assert.strictEqual(placeOf(orphan).worker, victim.worker, `${orphan.localAddress} moved to another index`);
    assert.notStrictEqual(placeOf(orphan).pid, victim.pid, `${orphan.localAddress} still on the killed pid`);
  }
  for (const other of others) assert.strictEqual(other.welcomes.length, 1, `${other.localAddress} reconnected too`);

  const second = await chatRound('after-kill', clients, clients, MESSAGES_PER_CLIENT);
  const kill = `SIGKILL of worker ${victim.worker} (pid ${victim.pid}), ${orphans.length} clients back within ${backAfterMs} ms`;
  t.diagnostic(`redis, after ${kill}: ${summary(second)}`);
  assert.deepStrictEqual([second.lost, second.duplicates], [0, 0], summary(second));
  assert.strictEqual(redis.child.exitCode, null, 'redis-server died during the test');

  await stopAll(clients, hosts);
});

test("without Redis, a message reaches only the clients of its sender's worker (what the adapter adds)", async (t) => {
  const hosts = [await startExample(t, { REDIS_URL: '' }), await startExample(t, { REDIS_URL: '' })];
  const clients = [];
  t.after(() => clients.forEach((c) => c.close()));
  for (let n = 0; n < CLIENTS; n += 1) {
    const host = n % 2;
    clients.push(chatter(hosts[host].port, host, clientAddress(71, n)));
  }
  await welcomed(clients, 1, 'first connection', hosts);
  const round = await chatRound('alone', clients, clients, 1, { expectAll: false });
  t.diagnostic(`no redis: ${summary(round)}`);
  assert.strictEqual(round.duplicates, 0, summary(round));
  assert.strictEqual(round.crossHost + round.crossWorker, 0, summary(round));
  // Each message reaches exactly the clients of the sender's own worker (sender included).
  const samePidListeners = clients.map((sender) => clients.filter((l) => placeOf(l).pid === placeOf(sender).pid).length);
  assert.strictEqual(round.delivered, samePidListeners.reduce((a, b) => a + b, 0), summary(round));
  assert.ok(round.lost > round.delivered, summary(round));

  await stopAll(clients, hosts);
});
