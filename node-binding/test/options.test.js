'use strict';
// Every option of the npm sticky-cluster API, the worker environment, shutdown and revival, each against
// a real cluster process driven by real clients from chosen loopback addresses.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const http = require('http');
const https = require('https');
const net = require('net');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const { io } = require('socket.io-client');
const { addressesPerIndex, clientAddress, getJson, listenBacklogs, routeIndex, startApp, waitFor, within } = require('./helpers');

const options = (values) => ({ FIXTURE_OPTIONS: JSON.stringify({ port: 0, ...values }) });

test('env(index), both index variables and the real client address reach each worker', async (t) => {
  const app = await startApp(t, 'chat-app.js', { ...options({ concurrency: 2 }), FIXTURE_ENV: '1' });
  const addresses = addressesPerIndex(21, 2);
  for (const [index, address] of addresses.entries()) {
    const seen = await getJson(app.port, '/whoami', address);
    assert.deepStrictEqual(
      { index: seen.index, compatIndex: seen.compatIndex, color: seen.color, shared: seen.shared, remoteAddress: seen.remoteAddress },
      { index, compatIndex: String(index), color: `color-${index}`, shared: 'shared', remoteAddress: `::ffff:${address}` }
    );
  }
});

test('errorHandler gets a Node-style Error with code EADDRINUSE', async (t) => {
  const occupier = net.createServer().listen(0, '::');
  await new Promise((resolve) => occupier.once('listening', resolve));
  t.after(() => occupier.close());
  const { port } = occupier.address();
  const app = await startApp(t, 'chat-app.js', { ...options({ port, concurrency: 1 }), FIXTURE_ERROR_HANDLER: '1' }, { waitForListening: false });
  const exit = await within(10000, app.exited, 'master with a taken port');
  assert.strictEqual(exit.code, 3, `stderr: ${app.stderr}`);
  const { errorHandler } = JSON.parse(app.stdout.trim().split('\n').pop());
  assert.deepStrictEqual(
    { isError: errorHandler.isError, code: errorHandler.code, syscall: errorHandler.syscall, port: errorHandler.port },
    { isError: true, code: 'EADDRINUSE', syscall: 'listen', port }
  );
  assert.match(errorHandler.message, new RegExp(`^listen EADDRINUSE: address already in use .*:${port}$`));
});

test('without errorHandler a listen error is printed and the master exits 1', async (t) => {
  const occupier = net.createServer().listen(0, '::');
  await new Promise((resolve) => occupier.once('listening', resolve));
  t.after(() => occupier.close());
  const { port } = occupier.address();
  const app = await startApp(t, 'chat-app.js', options({ port, concurrency: 1 }), { waitForListening: false });
  const exit = await within(10000, app.exited, 'master with a taken port');
  assert.strictEqual(exit.code, 1);
  assert.match(app.stdout, /EADDRINUSE/);
});

test('debug logs master and worker events under the prefix; quiet without it', async (t) => {
  const address = clientAddress(22, 0);
  const loud = await startApp(t, 'chat-app.js', options({ concurrency: 1, debug: true, prefix: 'chat-cluster:' }));
  await getJson(loud.port, '/whoami', address);
  await waitFor(loud, () => loud.stderr.includes(`connection from ::ffff:${address}:`));
  assert.match(loud.stderr, new RegExp(`^chat-cluster: debug connection ::ffff:${address.replace(/\./g, '\\.')} -> worker 0$`, 'm'));
  assert.match(loud.stderr, /^chat-cluster: debug worker 0 \(pid \d+\) ready$/m);
  assert.match(loud.stderr, /^chat-cluster: info listening on /m);

  const quiet = await startApp(t, 'chat-app.js', options({ concurrency: 1 }));
  await getJson(quiet.port, '/whoami', address);
  assert.match(quiet.stderr, /^sticky-cluster: info listening on /m);
  assert.doesNotMatch(quiet.stderr, / debug /);
});

test('hardShutdownDelay kills a worker that never closes, and the master exits 1', async (t) => {
  const app = await startApp(t, 'chat-app.js', { ...options({ concurrency: 1, hardShutdownDelay: 1000 }), FIXTURE_STUBBORN: '1' });
  await getJson(app.port, '/whoami', clientAddress(23, 0));
  const started = Date.now();
  app.child.kill('SIGTERM');
  const exit = await within(15000, app.exited, 'master after SIGTERM');
  const took = Date.now() - started;
  assert.strictEqual(exit.code, 1, app.stderr);
  assert.ok(took >= 900, `exited after ${took} ms, before the 1000 ms delay`);
  assert.match(app.stderr, /hardShutdownDelay of 1s passed: killing the remaining workers/);
});

/** A socket.io client that stays connected; resolves once it has had one echo. */
function openClient(port, localAddress, transports) {
  return new Promise((resolve, reject) => {
    const agent = new http.Agent({ localAddress, keepAlive: true });
    const socket = io(`http://127.0.0.1:${port}`, { transports, agent, forceNew: true, reconnection: false });
    socket.disconnected$ = new Promise((done) => socket.once('disconnect', (reason) => done(reason)));
    socket.once('connect_error', reject);
    socket.once('chat', () => resolve(socket));
    socket.once('connect', () => socket.emit('chat', { from: localAddress, n: 1 }));
    socket.agent = agent;
  });
}

for (const signal of ['SIGTERM', 'SIGINT']) {
  test(`${signal} with open socket.io clients (polling and websocket) shuts down gracefully: exit 0`, async (t) => {
    const app = await startApp(t, 'chat-app.js', options({ concurrency: 2 }));
    const block = signal === 'SIGTERM' ? 24 : 25;
    const clients = [];
    for (let n = 0; n < 16; n += 1) {
      const transports = n % 2 ? ['websocket'] : ['polling'];
      clients.push(await within(15000, openClient(app.port, clientAddress(block, n), transports), 'client connect'));
    }
    t.after(() => clients.forEach((c) => (c.disconnect(), c.agent.destroy())));
    const started = Date.now();
    app.child.kill(signal);
    const exit = await within(20000, app.exited, `master after ${signal}`);
    assert.deepStrictEqual(exit, { code: 0, signal: null }, app.stderr);
    assert.ok(Date.now() - started < 10000, 'graceful shutdown took as long as a hard one');
    const reasons = await within(5000, Promise.all(clients.map((c) => c.disconnected$)), 'client disconnects');
    assert.strictEqual(reasons.length, 16);
    assert.match(app.stderr, /stopped: routed/);
  });
}

test('a request in progress at SIGTERM gets its response before the worker exits', async (t) => {
  const app = await startApp(t, 'chat-app.js', options({ concurrency: 1, debug: true }));
  const address = clientAddress(30, 0);
  const slow = getJson(app.port, '/slow', address);
  await waitFor(app, () => app.stderr.includes(`connection from ::ffff:${address}:`));
  app.child.kill('SIGTERM');
  assert.strictEqual((await within(5000, slow, 'slow response')).slow, true);
  assert.deepStrictEqual(await within(10000, app.exited, 'master after SIGTERM'), { code: 0, signal: null });
});

test('a second signal stops at once instead of waiting for hardShutdownDelay', async (t) => {
  const app = await startApp(t, 'chat-app.js', { ...options({ concurrency: 1 }), FIXTURE_STUBBORN: '1' });
  await getJson(app.port, '/whoami', clientAddress(28, 0));
  const started = Date.now();
  app.child.kill('SIGTERM');
  await waitFor(app, () => app.stderr.includes('shutting down'));
  app.child.kill('SIGINT');
  const exit = await within(10000, app.exited, 'master after two signals');
  assert.strictEqual(exit.code, 1, app.stderr);
  assert.ok(Date.now() - started < 10000);
  assert.match(app.stderr, /second signal: stopping at once/);
});

test('an https.Server works: TLS runs in the worker on the handed-over socket', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-native-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem')], { encoding: 'utf8' });
  if (made.error || made.status !== 0) {
    // In CI openssl is installed by .ci/run: its absence is a failure there, a skip elsewhere.
    assert.ok(process.env.CI !== 'true', `openssl could not make a test certificate: ${made.error || made.stderr}`);
    t.skip('openssl is not available to make a test certificate');
    return;
  }
  const app = await startApp(t, 'chat-app.js', { ...options({ concurrency: 2 }), FIXTURE_TLS_DIR: dir });
  const address = addressesPerIndex(29, 2)[1];
  const seen = await new Promise((resolve, reject) => {
    https
      .get({ host: '127.0.0.1', port: app.port, path: '/whoami', localAddress: address, rejectUnauthorized: false, agent: false }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
        response.on('end', () => resolve(JSON.parse(body)));
      })
      .on('error', reject);
  });
  assert.strictEqual(seen.index, 1);
  assert.strictEqual(seen.remoteAddress, `::ffff:${address}`);
});

test('a worker killed with SIGKILL is revived with the same index', async (t) => {
  const app = await startApp(t, 'chat-app.js', options({ concurrency: 2 }));
  const address = addressesPerIndex(26, 2)[1];
  const before = await getJson(app.port, '/whoami', address);
  assert.strictEqual(before.index, 1);
  process.kill(before.pid, 'SIGKILL');
  let after = null;
  await waitFor(app, () => {
    getJson(app.port, '/whoami', address).then((seen) => (after = seen), () => {});
    return after && after.pid !== before.pid;
  });
  assert.strictEqual(after.index, 1);
  assert.strictEqual(after.compatIndex, '1');
  assert.match(app.stderr, /worker 1 \(pid \d+\) exited .*signal 9 \(SIGKILL\); reviving/);
});

test('connections made during an async init wait for callback(server); none is lost', async (t) => {
  const app = await startApp(t, 'chat-app.js', { ...options({ concurrency: 2 }), FIXTURE_INIT_DELAY_MS: '1500' });
  const started = Date.now();
  const answers = await within(
    10000,
    Promise.all(Array.from({ length: 12 }, (_, n) => getJson(app.port, '/whoami', clientAddress(27, n)))),
    'requests during init'
  );
  assert.ok(Date.now() - started >= 1000, 'answered before the init finished');
  for (const [n, seen] of answers.entries()) {
    const address = clientAddress(27, n);
    assert.strictEqual(seen.index, routeIndex(address, 2), address);
    assert.strictEqual(seen.remoteAddress, `::ffff:${address}`);
  }
});

test('backlog sets the listen backlog of the master\'s listener (default 1024, not Node\'s 511)', async (t) => {
  // The kernel clamps a backlog to net.core.somaxconn (4096 by default since Linux 5.4).
  const somaxconn = Number(fs.readFileSync('/proc/sys/net/core/somaxconn', 'utf8'));
  for (const [values, expected] of [[{ backlog: 64 }, 64], [{}, Math.min(1024, somaxconn)]]) {
    const app = await startApp(t, 'plain-app.js', options({ concurrency: 1, ...values }));
    assert.deepStrictEqual(listenBacklogs(app.port), [expected], JSON.stringify(values));
    app.child.kill('SIGTERM');
    assert.deepStrictEqual(await app.exited, { code: 0, signal: null }, app.stderr);
  }
});

test('bad input is one clear line and a non-zero exit', () => {
  const pkg = path.join(__dirname, '..');
  const notAFunction = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(pkg)})(42)`], { encoding: 'utf8' });
  assert.notStrictEqual(notAFunction.status, 0);
  assert.match(notAFunction.stderr, /TypeError: sticky-cluster-native: startFn must be a function/);

  const badConcurrency = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(pkg)})(() => {}, { concurrency: -2 })`], { encoding: 'utf8' });
  assert.notStrictEqual(badConcurrency.status, 0);
  assert.match(badConcurrency.stderr, /TypeError: sticky-cluster-native: concurrency: must be at least 1, got -2/);

  const notAWorker = spawnSync(process.execPath, [path.join(__dirname, 'fixtures', 'chat-app.js')], {
    encoding: 'utf8',
    env: { ...process.env, STICKY_CLUSTER_FD: 'seven', STICKY_CLUSTER_WORKER_INDEX: '0' },
    timeout: 10000,
  });
  assert.notStrictEqual(notAWorker.status, 0);
  assert.match(notAWorker.stderr, /not a sticky-cluster worker/);
});
