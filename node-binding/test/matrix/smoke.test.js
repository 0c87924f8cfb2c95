'use strict';
// The socket.io smoke set of the runtime matrix, for the runtime STICKY_CLUSTER_TEST_RUNTIME names and
// each implementation (native, JavaScript): sticky sessions over long-polling and with the websocket
// upgrade, revival under the same index, a graceful shutdown with open clients, workers that die with a
// killed primary, routing 'kernel' (native), an ES module app (`import`, npm: specifiers under Deno) and
// a CommonJS one (`require`). The apps run from the packed tarballs installed as a user installs them.
// Test names start with `[<runtime id> <implementation>]`: run-matrix.sh's table is made from them.

const test = require('node:test');
const assert = require('node:assert');
const http = require('http');
const net = require('net');
const { io } = require('socket.io-client');
const { addressesPerIndex, chatCrowd, failures, getJson, readyEvent, routeIndex, within } = require('../helpers');
const { commonJsChatApp, esmChatApp, eventually, installApp, isAlive, runtimeUnderTest, startCluster } = require('./harness');

const entry = runtimeUnderTest();
const CONCURRENCY = 4;
const CLIENTS = 40;
const MESSAGES = 10;

let app;
test.before(() => {
  app = installApp(`smoke-${entry.id}`, {
    files: {
      'esm-app.mjs': esmChatApp({ npmSpecifiers: entry.runtime === 'Deno' }),
      'chat-app.cjs': commonJsChatApp(),
    },
  });
});
test.after(() => app && app.remove());

/** A distinct block of loopback client addresses per runtime and implementation (127.<block>.x.y). */
function block(implementation, n) {
  const runtimeNumber = { node: 0, node22: 1, node24: 2, node26: 3, bun: 4, deno: 5 }[entry.id];
  return 100 + runtimeNumber * 20 + (implementation === 'js' ? 10 : 0) + n;
}

/** A socket.io client from `localAddress` that stays connected: `echoed` resolves on its first echo, `disconnected` with the reason. */
function openClient(t, port, localAddress, transports) {
  const agent = new http.Agent({ localAddress, keepAlive: true });
  const socket = io(`http://127.0.0.1:${port}`, { transports, agent, forceNew: true, reconnection: false });
  t.after(() => (socket.disconnect(), agent.destroy()));
  const echoed = new Promise((resolve, reject) => {
    socket.once('chat', resolve);
    socket.once('connect_error', reject);
  });
  socket.once('connect', () => socket.emit('chat', { from: localAddress, n: 1 }));
  return { echoed, disconnected: new Promise((resolve) => socket.once('disconnect', resolve)) };
}

/** `promise`, or an error naming `what` with the end of the cluster's log after `ms`. */
function withinLogged(ms, promise, what, cluster) {
  return within(ms, promise, what).catch((error) => {
    throw new Error(`${error.message}; the cluster's log ends:\n${cluster.stderr.slice(-4000)}`);
  });
}

/** GET /whoami over `agent` (a kept-alive connection) from 127.<block>.9.9. */
function getJsonWith(agent, port, addressBlock) {
  return new Promise((resolve, reject) => {
    const request = http.get({ host: '127.0.0.1', port, path: '/whoami', agent, localAddress: `127.${addressBlock}.9.9` }, (response) => {
      let body = '';
      response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
      response.on('end', () => resolve(JSON.parse(body)));
    });
    request.on('error', reject);
  });
}

async function sigterm(cluster, what) {
  cluster.child.kill('SIGTERM');
  const exit = await withinLogged(20000, cluster.exited, what, cluster);
  assert.deepStrictEqual(exit, { code: 0, signal: null }, cluster.stderr);
}

for (const implementation of ['native', 'js']) {
  const tag = `[${entry.id} ${implementation}]`;

  test(`${tag} ${entry.label}, ES module import: ${CLIENTS} long-polling and ${CLIENTS} upgrading socket.io clients each stay on one worker`, { timeout: 120000 }, async (t) => {
    const cluster = await startCluster(t, entry, app, 'esm-app.mjs', { implementation, options: { concurrency: CONCURRENCY } });
    for (const [n, transports] of [
      [0, ['polling']],
      [1, ['polling', 'websocket']],
    ]) {
      const results = await withinLogged(60000, chatCrowd({ port: cluster.port, block: block(implementation, n), count: CLIENTS, transports, messages: MESSAGES }), `${transports} crowd`, cluster);
      assert.deepStrictEqual(failures(results, MESSAGES), []);
      const pidOfIndex = new Map();
      for (const r of results) {
        assert.strictEqual(r.pids.size, 1, `${r.localAddress} was answered by ${r.pids.size} workers`);
        assert.deepStrictEqual([...r.addresses], [`::ffff:${r.localAddress}`]);
        const index = routeIndex(r.localAddress, CONCURRENCY);
        const [pid] = r.pids;
        assert.strictEqual(pidOfIndex.get(index) ?? pid, pid, `index ${index} was served by two workers`);
        pidOfIndex.set(index, pid);
      }
      assert.strictEqual(new Set(pidOfIndex.values()).size, CONCURRENCY, 'not every worker served');
      if (transports.includes('websocket')) assert.ok(results.some((r) => r.transport === 'websocket'), 'no client upgraded to websocket');
      else assert.ok(results.every((r) => r.transport === 'polling'));
    }
    await sigterm(cluster, 'master after SIGTERM');
  });

  test(`${tag} ${entry.label}: a worker killed with SIGKILL is revived under the same index and serves its clients again`, { timeout: 60000 }, async (t) => {
    const cluster = await startCluster(t, entry, app, 'chat-app.cjs', { implementation, options: { concurrency: 2 } });
    const [forZero, forOne] = addressesPerIndex(block(implementation, 2), 2);
    const before = await getJson(cluster.port, '/whoami', forOne);
    const other = await getJson(cluster.port, '/whoami', forZero);
    assert.deepStrictEqual([before.index, other.index], [1, 0]);
    process.kill(before.pid, 'SIGKILL');
    // A request already on its way to the dead worker may be lost (the JavaScript master's Node IPC): retry.
    const after = await eventually(
      () => within(1500, getJson(cluster.port, '/whoami', forOne), 'whoami').then((seen) => seen.pid !== before.pid && seen, () => null),
      20000,
      'a revived worker 1'
    );
    assert.strictEqual(after.index, 1);
    assert.strictEqual(after.remoteAddress, `::ffff:${forOne}`);
    assert.strictEqual((await getJson(cluster.port, '/whoami', forZero)).pid, other.pid, 'worker 0 was restarted too');
    assert.match(cluster.stderr, /worker 1 \(pid \d+\) exited after [\d.]+s: signal 9 \(SIGKILL\); reviving/);
    await sigterm(cluster, 'master after SIGTERM');
  });

  test(`${tag} ${entry.label}: SIGTERM with open polling and websocket clients shuts down gracefully, every worker gone`, { timeout: 60000 }, async (t) => {
    const cluster = await startCluster(t, entry, app, 'chat-app.cjs', { implementation, options: { concurrency: 2 } });
    const clients = addressesPerIndex(block(implementation, 3), 2).map((localAddress, n) =>
      openClient(t, cluster.port, localAddress, n === 0 ? ['polling'] : ['websocket'])
    );
    await withinLogged(15000, Promise.all(clients.map((c) => c.echoed)), 'a first echo on every client', cluster);
    // And an HTTP keep-alive connection that waits idle for its next request: the drain ends it.
    const idleAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    t.after(() => idleAgent.destroy());
    await getJsonWith(idleAgent, cluster.port, block(implementation, 3));
    const workers = cluster.workers();
    assert.strictEqual(workers.length, 2);
    await sigterm(cluster, 'master after SIGTERM with open clients');
    const reasons = await withinLogged(15000, Promise.all(clients.map((c) => c.disconnected)), 'clients after the shutdown', cluster);
    assert.strictEqual(reasons.length, 2);
    for (const { pid } of workers) assert.ok(!isAlive(pid), `worker pid ${pid} outlived its master`);
    assert.match(cluster.stderr, /stopped: routed \d+ connections/);
  });

  test(`${tag} ${entry.label}, CommonJS require: the workers die with a primary killed by SIGKILL, and the port is free again`, { timeout: 60000 }, async (t) => {
    const cluster = await startCluster(t, entry, app, 'chat-app.cjs', { implementation, options: { concurrency: 2 } });
    for (const [index, address] of addressesPerIndex(block(implementation, 4), 2).entries()) {
      assert.strictEqual((await getJson(cluster.port, '/whoami', address)).index, index);
    }
    const workers = cluster.workers();
    cluster.child.kill('SIGKILL');
    await within(10000, cluster.exited, 'the killed primary');
    await eventually(() => workers.every(({ pid }) => !isAlive(pid)), 10000, `workers ${workers.map((w) => w.pid)} after their primary's SIGKILL`);
    // Nothing holds the port: a new server (not reusing the address of a listener) can bind it at once.
    const probe = net.createServer();
    await new Promise((resolve, reject) => probe.once('error', reject).listen(cluster.port, '::', resolve));
    await new Promise((resolve) => probe.close(resolve));
  });
}

test(`[${entry.id} native] ${entry.label}: routing 'kernel' ${entry.runtime === 'Bun' ? 'is one clear error under Bun' : 'puts every address on its string-hash worker'}`, { timeout: 60000 }, async (t) => {
  if (entry.runtime === 'Bun') {
    const cluster = await startCluster(t, entry, app, 'chat-app.cjs', { implementation: 'native', options: { concurrency: 2, routing: 'kernel' }, waitForListening: false });
    const exit = await within(20000, cluster.exited, 'a kernel-routing primary under Bun');
    assert.notStrictEqual(exit.code, 0);
    assert.match(cluster.stderr, /sticky-cluster-native: options\.routing 'kernel' needs server\.listen\(\{ fd \}\) in the workers, which Bun [\d.]+ does not do/);
    assert.deepStrictEqual(cluster.workers(), [], 'workers were started');
    return;
  }
  const cluster = await startCluster(t, entry, app, 'chat-app.cjs', { implementation: 'native', options: { concurrency: 2, routing: 'kernel' } });
  const addresses = Array.from({ length: 20 }, (_, n) => `127.${block('native', 5)}.0.${n + 1}`);
  for (const address of addresses) {
    const seen = await within(10000, getJson(cluster.port, '/whoami', address), `whoami from ${address}`);
    assert.strictEqual(seen.index, routeIndex(address, 2), address);
    assert.strictEqual(seen.remoteAddress, `::ffff:${address}`);
  }
  await sigterm(cluster, 'master after SIGTERM');
});

if (entry.runtime === 'Deno') {
  test(`[${entry.id} js] ${entry.label}: a ready fd is one clear error under named permissions, and works with --allow-all`, { timeout: 60000 }, async (t) => {
    // Deno's node:fs reaches a descriptor it did not open only through /proc/self, which needs -A.
    const named = await startCluster(t, entry, app, 'chat-app.cjs', { implementation: 'js', env: { STICKY_CLUSTER_READY_FD: '1' }, waitForListening: false });
    const exit = await within(20000, named.exited, 'a JavaScript primary with a ready fd under named permissions');
    assert.notStrictEqual(exit.code, 0, named.stderr);
    assert.match(named.stderr, /sticky-cluster-native: STICKY_CLUSTER_READY_FD=1: this runtime cannot write to an fd it was given \(Requires all access to "\/proc\/self\/fdinfo\/1", run again with the --allow-all flag\)/);
    assert.deepStrictEqual(named.workers(), [], 'workers were started');
    const all = await startCluster(t, entry, app, 'chat-app.cjs', { implementation: 'js', options: { concurrency: 2 }, denoAllowAll: true });
    const listening = readyEvent(all, 'listening');
    assert.deepStrictEqual([listening.port, listening.workers, listening.routing], [all.port, 2, 'handoff']);
    await sigterm(all, 'master after SIGTERM');
    const stopped = readyEvent(all, 'stopped');
    assert.ok(stopped && stopped.graceful, JSON.stringify(all.ready.lines));
  });
}
