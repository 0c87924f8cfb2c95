'use strict';
// Issue 10: socket.io through a real HAProxy (Debian's package; balance source, send-proxy-v2) in front of
// two "hosts": two sticky-cluster masters (the binary, clientAddress: proxy-protocol, trustedProxies =
// HAProxy's address) whose workers are this package's socket.io fixture. 100 clients from distinct loopback
// addresses, long-polling only and with the websocket upgrade: every session holds (a polling handshake
// that reaches another worker fails with "Session ID unknown"), each on one worker process, which sees the
// client's address. And the Node master with x-forwarded-for behind a trusted proxy.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn, spawnSync } = require('child_process');
const { chatClient, clientAddress, failures, getJson, listening, stringHash, startApp, waitFor, within } = require('./helpers');

const repo = path.resolve(__dirname, '..', '..');
const CONCURRENCY = 2;
const CLIENTS = 100;
const MESSAGES = 5;

/** The first executable `name` on PATH or in `extra` directories, or null. */
function findBinary(name, extra = []) {
  const dirs = (process.env.PATH || '').split(':').concat(extra);
  for (const dir of dirs) {
    const candidate = path.join(dir || '.', name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

/** A missing program fails under CI=true and skips elsewhere, with what to install. */
function required(t, binary, what) {
  if (binary) return true;
  if (process.env.CI === 'true') assert.fail(`${what} not found`);
  t.skip(`${what} not found`);
  return false;
}

/** Starts a process killed when the test ends; collects its stderr (fd 3 is a pipe, for a ready fd). */
function start(t, command, args) {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe', 'pipe'] });
  const app = { child, stderr: '' };
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  const kill = () => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL');
  process.once('exit', kill);
  t.after(kill);
  return app;
}

/** One host: the sticky-cluster binary with socket.io workers, behind a trusted proxy on 127.0.0.1. */
async function startHost(t, binary, dir, name) {
  const config = path.join(dir, `${name}.yaml`);
  const worker = path.join(__dirname, 'fixtures', 'chat-app.js');
  fs.writeFileSync(
    config,
    `port: 0\nhost: 127.0.0.1\nconcurrency: ${CONCURRENCY}\nclientAddress: proxy-protocol\n` +
      `trustedProxies: [127.0.0.1/32]\nworker:\n  command: ${JSON.stringify([process.execPath, worker])}\n`
  );
  const host = start(t, binary, ['--config', config, '--ready-fd', '3']);
  host.port = (await listening(host)).port;
  return host;
}

test('socket.io sessions hold through HAProxy (balance source, send-proxy-v2) in front of two hosts', async (t) => {
  const haproxy = findBinary('haproxy', ['/usr/sbin']);
  const targetDir = process.env.CARGO_TARGET_DIR || path.join(repo, 'target');
  const binary = [path.join(targetDir, 'debug', 'sticky-cluster'), path.join(targetDir, 'release', 'sticky-cluster')].find(
    (candidate) => fs.existsSync(candidate)
  );
  if (!required(t, haproxy, 'haproxy (Debian package haproxy; .ci/run installs it)')) return;
  if (!required(t, binary, `the sticky-cluster binary in ${targetDir} (cargo build -p sticky-cluster)`)) return;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'haproxy-socketio-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const hosts = [await startHost(t, binary, dir, 'host-a'), await startHost(t, binary, dir, 'host-b')];

  const frontPort = await freePort();
  const example = fs.readFileSync(path.join(repo, 'examples', 'haproxy', 'haproxy.cfg'), 'utf8');
  const config = example
    .replace('bind :80', `bind 127.0.0.1:${frontPort}`)
    .replace('10.0.0.11:8080', `127.0.0.1:${hosts[0].port}`)
    .replace('10.0.0.12:8080', `127.0.0.1:${hosts[1].port}`);
  const configPath = path.join(dir, 'haproxy.cfg');
  fs.writeFileSync(configPath, config);
  const check = spawnSync(haproxy, ['-c', '-f', configPath], { encoding: 'utf8' });
  assert.strictEqual(check.status, 0, check.stderr);
  const front = start(t, haproxy, ['-db', '-f', configPath]);
  await waitFor(front, () => probe(frontPort));
  const hostOfPid = new Map();
  hosts.forEach((host, index) => {
    const children = fs.readFileSync(`/proc/${host.child.pid}/task/${host.child.pid}/children`, 'utf8');
    for (const pid of children.split(/\s+/).filter(Boolean)) hostOfPid.set(Number(pid), index);
  });
  const hostsUsed = new Set();
  const pidsUsed = new Set();

  for (const [block, transports] of [
    [31, ['polling']],
    [32, ['polling', 'websocket']],
  ]) {
    // A new TCP connection for every request (no keep-alive), so each long-polling request and the websocket
    // upgrade must find the session's worker again through HAProxy and the master; messages spaced out so
    // that long-polls come and go and the upgrade (if allowed) happens meanwhile.
    const crowd = [];
    for (let n = 0; n < CLIENTS; n += 1) {
      const localAddress = clientAddress(block, n);
      crowd.push(
        chatClient({ port: frontPort, localAddress, transports, messages: MESSAGES, keepAlive: false, pauseMs: 100, timeoutMs: 30000 })
      );
    }
    const results = await within(90000, Promise.all(crowd), `${transports} crowd`);
    assert.deepStrictEqual(failures(results, MESSAGES), [], `${transports}`);
    for (const r of results) {
      assert.strictEqual(r.pids.size, 1, `${r.localAddress} was answered by ${r.pids.size} workers`);
      // The worker sees the client's address from the PROXY header, not HAProxy's.
      assert.deepStrictEqual([...r.addresses], [r.localAddress], `socket.handshake.address of ${r.localAddress}`);
      const [pid] = r.pids;
      assert.ok(hostOfPid.has(pid), `pid ${pid} is no host's worker`);
      hostsUsed.add(hostOfPid.get(pid));
      pidsUsed.add(pid);
    }
    if (transports.includes('websocket')) {
      assert.ok(results.some((r) => r.transport === 'websocket'), 'no client upgraded to websocket');
    }
  }
  assert.strictEqual(hostsUsed.size, 2, 'balance source spreads the clients over both hosts');
  // Routed by the client address from the PROXY header, not by HAProxy's own: every worker of both hosts.
  assert.strictEqual(pidsUsed.size, 2 * CONCURRENCY, `${pidsUsed.size} of ${2 * CONCURRENCY} workers served clients`);
  for (const host of hosts) {
    assert.doesNotMatch(host.stderr, /closed a connection from trusted proxy/, 'HAProxy always sent its header');
  }
});

test('x-forwarded-for from a trusted proxy chooses the worker, and the worker sees that client', async (t) => {
  const concurrency = 3;
  const options = { port: 0, concurrency, clientAddress: 'x-forwarded-for', trustedProxies: ['127.0.0.1/32'] };
  const app = await startApp(t, 'chat-app.js', { FIXTURE_OPTIONS: JSON.stringify(options), STICKY_CLUSTER_NATIVE: '1' });
  const seen = async (from, forwarded) => {
    const answer = await getJson(app.port, '/whoami', from, { 'x-forwarded-for': forwarded });
    return { index: answer.index, remoteAddress: answer.remoteAddress };
  };
  // The rightmost address that is not a trusted proxy is the client.
  for (const client of ['10.1.2.3', '203.0.113.77', '2001:db8::5']) {
    const expected = { index: stringHash(client) % concurrency, remoteAddress: client };
    assert.deepStrictEqual(await seen('127.0.0.1', `198.51.100.9, ${client}, 127.0.0.1`), expected, client);
  }
  // From a peer that is not trusted the header is ignored: routed and seen by its own address.
  const untrusted = clientAddress(33, 7);
  const own = `::ffff:${untrusted}`;
  assert.deepStrictEqual(await seen(untrusted, '10.1.2.3'), { index: stringHash(own) % concurrency, remoteAddress: own });
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await app.exited, { code: 0, signal: null }, app.stderr);
});

/** A loopback port nobody listens on right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = require('net').createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Whether something accepts on 127.0.0.1:port right now (HAProxy's frontend is up). */
let probing = null;
function probe(port) {
  if (probing === null) {
    probing = false;
    const socket = require('net').connect(port, '127.0.0.1');
    socket.once('connect', () => {
      probing = true;
      socket.destroy();
    });
    socket.once('error', () => {
      probing = null;
    });
  }
  return probing === true;
}
