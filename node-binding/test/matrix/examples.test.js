'use strict';
// The examples a user runs, on the runtime STICKY_CLUSTER_TEST_RUNTIME names, from the packed tarballs
// installed as a user installs them: the npm sticky-cluster module's own example with only its require
// changed (examples/migration: express, an async init, options from the environment, plus a socket.io
// chat), and the repository's socket.io chat example (examples/socketio-chat). Real socket.io clients
// from chosen loopback addresses. Test names start with `[<runtime id> examples]` for run-matrix.sh's table.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const http = require('http');
const path = require('path');
const { io } = require('socket.io-client');
const { addressesPerIndex, getJson, listening, routeIndex, waitFor, within } = require('../helpers');
const { installApp, runtimeUnderTest, startCluster } = require('./harness');

const entry = runtimeUnderTest();
const tag = `[${entry.id} examples]`;
const packageDir = path.resolve(__dirname, '..', '..');
const runtimeNumber = { node: 0, node22: 1, node24: 2, node26: 3, bun: 4, deno: 5 }[entry.id];
// Client address blocks (127.<block>.x.y): the smoke set has 100-215; here block and block + 6 per test,
// migration 220-231, chat example 232-243, TypeScript 244-255.

/** The example's folder copied into an installed app: `files` from it, the packages linked from its node_modules. */
function exampleApp(t, name, exampleDir, files, packages, type = 'commonjs') {
  const sources = Object.fromEntries(files.map((file) => [file, fs.readFileSync(path.join(exampleDir, file), 'utf8')]));
  const app = installApp(`${name}-${entry.id}`, { files: sources, packages, modulesDir: exampleDir });
  t.after(app.remove);
  // As the examples' own package.json say: Deno takes a .js file for CommonJS only when told so.
  const manifestFile = path.join(app.dir, 'package.json');
  fs.writeFileSync(manifestFile, JSON.stringify({ ...JSON.parse(fs.readFileSync(manifestFile, 'utf8')), type }, null, 2));
  return app;
}

/** A socket.io client from `localAddress`; resolves once `firstEvent` came with { socket, connectedAt, first } (`first`: its payload). */
function connect(t, port, localAddress, transports, firstEvent = 'connect') {
  const agent = new http.Agent({ localAddress, keepAlive: true });
  const socket = io(`http://127.0.0.1:${port}`, { agent, transports, forceNew: true, reconnection: false, timeout: 15000 });
  t.after(() => (socket.disconnect(), agent.destroy()));
  const client = { socket };
  return new Promise((resolve, reject) => {
    socket.once(firstEvent, (payload) => resolve(Object.assign(client, { connectedAt: Date.now(), first: payload })));
    socket.once('connect_error', (error) => reject(new Error(`${localAddress}: ${error.message}`)));
  });
}

function getText(port, localAddress) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: '/', localAddress, agent: false }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
        response.on('end', () => resolve({ status: response.statusCode, body }));
      })
      .on('error', reject);
  });
}

/** The port of the cluster's `listening` ready line, which must say `workers`. */
async function listeningWith(cluster, workers) {
  const at = await listening(cluster, 30000);
  assert.strictEqual(at.workers, workers, JSON.stringify(at));
  return at.port;
}

async function sigterm(cluster) {
  cluster.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, cluster.exited, 'the example after SIGTERM'), { code: 0, signal: null }, cluster.stderr);
}

test(`${tag} ${entry.label}: the npm sticky-cluster example runs with only its require changed, and its socket.io chat stays on one worker per client`, { timeout: 90000 }, async (t) => {
  const exampleDir = path.join(packageDir, 'examples', 'migration');
  const app = exampleApp(t, 'migration', exampleDir, ['index.js'], ['async', 'express', 'socket.io']);
  const original = fs.readFileSync(path.join(exampleDir, 'index.js'), 'utf8');
  assert.match(original, /^var sticky = require\('sticky-cluster-native'\);$/m);
  // What a user who moves gets: no STICKY_CLUSTER_NATIVE, options from the environment as the original reads them.
  const env = { PORT: '0', WEB_CONCURRENCY: '2', NODE_ENV: 'development', STICKY_CLUSTER_NATIVE: '', FIXTURE_OPTIONS: '' };
  const started = Date.now();
  // Under Deno as `deno run -A index.js` (the smoke set gives each permission by name).
  const cluster = await startCluster(t, entry, app, 'index.js', { env, waitForListening: false, denoAllowAll: true });
  cluster.port = await listeningWith(cluster, 2);
  await waitFor(cluster, () => /^sticky-cluster: debug implementation: native \(the addon loaded\)$/m.test(cluster.stderr), 10000);

  // Clients that come during the workers' 2 s async init wait for callback(server); two per worker index.
  const block = 220 + runtimeNumber;
  const addresses = [addressesPerIndex(block, 2), addressesPerIndex(block + 6, 2)];
  const clients = await within(
    30000,
    Promise.all(addresses.flatMap((pair, round) => pair.map((address) => connect(t, cluster.port, address, round === 0 ? ['polling'] : ['polling', 'websocket'])))),
    'four chat clients'
  );
  assert.ok(Math.min(...clients.map((c) => c.connectedAt)) - started >= 1500, 'a client was served before the async init ended');
  // Worker index i: clients[i] (polling only) and clients[2 + i] (upgrade allowed) share a worker and its chat.
  const pids = [];
  for (const index of [0, 1]) {
    const [alice, bob] = [clients[index], clients[2 + index]];
    const heard = new Promise((resolve) => bob.socket.once('chat', resolve));
    alice.socket.emit('chat', `hello from ${addresses[0][index]}`);
    const message = await within(10000, heard, `chat relay on worker ${index}`);
    assert.strictEqual(message.text, `hello from ${addresses[0][index]}`);
    const page = await getText(cluster.port, addresses[0][index]);
    assert.deepStrictEqual(page, { status: 200, body: `Handled by PID = ${message.pid}` }, `the page and the chat of index ${index} come from one worker`);
    pids.push(message.pid);
  }
  // From the relayed messages themselves: the sender's own copy of its message may still be on its way.
  assert.notStrictEqual(pids[0], pids[1], 'both indexes were served by one worker');
  await sigterm(cluster);
});

test(`${tag} ${entry.label}: the socket.io chat example serves its page and relays chat messages`, { timeout: 60000 }, async (t) => {
  const exampleDir = path.resolve(packageDir, '..', 'examples', 'socketio-chat');
  const app = exampleApp(t, 'chat-example', exampleDir, ['index.js'], ['express', 'socket.io']);
  fs.symlinkSync(path.join(exampleDir, 'public'), path.join(app.dir, 'public'));
  const cluster = await startCluster(t, entry, app, 'index.js', { env: { PORT: '0', WEB_CONCURRENCY: '2', STICKY_CLUSTER_NATIVE: '' }, waitForListening: false });
  cluster.port = await listeningWith(cluster, 2);

  const block = 232 + runtimeNumber;
  const page = await getText(cluster.port, `127.${block}.0.1`);
  assert.strictEqual(page.status, 200);
  assert.match(page.body, /<title>sticky-cluster chat<\/title>/);
  // Two browsers that land on worker 0 (a message reaches the clients of its sender's worker, without Redis).
  const [alice, bob] = await Promise.all(
    [addressesPerIndex(block, 2)[0], addressesPerIndex(block + 6, 2)[0]].map((address) => connect(t, cluster.port, address, ['polling'], 'welcome'))
  );
  assert.deepStrictEqual([alice.first.worker, bob.first.worker], [0, 0]);
  const heard = new Promise((resolve) => bob.socket.once('chat', resolve));
  alice.socket.emit('chat', 'hello from alice');
  assert.strictEqual((await within(10000, heard, 'chat relay')).text, 'hello from alice');
  await sigterm(cluster);
});

/** Node strips TypeScript's types by itself from 22.18 on; Bun and Deno always run TypeScript. */
function runsTypeScript() {
  if (entry.runtime !== 'Node') return true;
  const [major, minor] = entry.version.split('.').map(Number);
  return major > 22 || (major === 22 && minor >= 18);
}

if (runsTypeScript()) {
  test(`${tag} ${entry.label}: the TypeScript example runs as it is, every option set`, { timeout: 60000 }, async (t) => {
    const exampleDir = path.join(packageDir, 'examples', 'typescript');
    const app = exampleApp(t, 'typescript', exampleDir, ['app.ts'], [], 'module');
    const cluster = await startCluster(t, entry, app, 'app.ts', { env: { PORT: '0', STICKY_CLUSTER_NATIVE: '' }, waitForListening: false });
    cluster.port = await listeningWith(cluster, 2);
    // The example's prefix option, on the human line. Stderr is a pipe of its own, read apart from the
    // ready file: its lines may come after the listening line.
    await waitFor(cluster, () => /^ts-app: info listening on \S*:\d+ with 2 workers$/m.test(cluster.stderr), 10000);
    await waitFor(cluster, () => /^ts-app: native master on /m.test(cluster.stderr), 10000);
    const block = 244 + runtimeNumber;
    for (const address of [...addressesPerIndex(block, 2), ...addressesPerIndex(block + 6, 2)]) {
      const seen = await within(10000, getJson(cluster.port, '/', address), `GET / from ${address}`);
      assert.deepStrictEqual([seen.shard, seen.you], [`shard-${routeIndex(address, 2)}`, `::ffff:${address}`]);
    }
    await sigterm(cluster);
  });
}
