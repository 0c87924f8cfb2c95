'use strict';
// Readiness as data in the Node primary (issue 19 item 2): STICKY_CLUSTER_READY_FD=N gets the binary's
// `--ready-fd` lines (core/src/ready.rs) from either implementation: `listening` with where it listens,
// `stopped` with the counters (the same as the human `stopped:` line), `error` when it cannot start;
// the workers neither hold the fd nor see the variable; a bad fd is refused in one line.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const net = require('net');
const path = require('path');
const { spawnSync } = require('child_process');
const { addressesPerIndex, getJson, readyEvent, startApp, stoppedCounters, within } = require('./helpers');

const FIXTURE = path.join(__dirname, 'fixtures', 'plain-app.js');
const options = (values) => ({ FIXTURE_OPTIONS: JSON.stringify({ port: 0, ...values }) });

/** The targets of `pid`'s open fds (`socket:[123]`, `pipe:[456]`, paths). */
function fdTargets(pid) {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).map((fd) => {
    try {
      return fs.readlinkSync(path.join(dir, fd));
    } catch {
      return null; // closed meanwhile
    }
  });
}

test('the listening line says where the cluster listens, and the stopped line counts what it routed', async (t) => {
  const concurrency = 3;
  const app = await startApp(t, 'plain-app.js', options({ concurrency, metrics: { port: 0 } }));
  const listening = app.ready.lines[0];
  assert.strictEqual(listening.event, 'listening', JSON.stringify(app.ready.lines));
  assert.deepStrictEqual(
    { ...listening, metrics: typeof listening.metrics },
    {
      version: 1,
      event: 'listening',
      address: `[::]:${app.port}`,
      host: '::',
      port: app.port,
      workers: concurrency,
      routing: 'handoff',
      metrics: 'string',
      attach_socket: null,
      build: `sticky-cluster-native@${require('../package.json').version}`,
      pid: app.child.pid,
    }
  );
  assert.match(listening.metrics, /^127\.0\.0\.1:\d+$/);
  assert.notStrictEqual(Number(listening.metrics.split(':')[1]), 0, 'the metrics port the kernel picked');

  // 1, 2 and 3 requests for indexes 0, 1 and 2, each from an address of that index.
  const addresses = addressesPerIndex(73, concurrency);
  const workers = new Map();
  for (const [index, address] of addresses.entries()) {
    for (let n = 0; n <= index; n += 1) {
      const seen = await within(10000, getJson(app.port, '/', address), `GET / from ${address}`);
      assert.strictEqual(seen.index, index);
      workers.set(index, seen.pid);
    }
  }
  // The primary's end of the ready pipe (a socket: Node's 'pipe' is a socketpair) is still its fd 3;
  // no worker holds it or sees the variable.
  const readyEnd = fs.readlinkSync(`/proc/${app.child.pid}/fd/3`);
  assert.match(readyEnd, /^socket:\[\d+\]$/);
  for (const pid of workers.values()) {
    const environment = fs.readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    assert.ok(!environment.some((entry) => entry.startsWith('STICKY_CLUSTER_READY_FD=')), `worker ${pid}'s environment`);
    assert.ok(!fdTargets(pid).includes(readyEnd), `worker ${pid} holds the ready fd ${readyEnd}`);
  }

  app.child.kill('SIGTERM');
  const stopped = await stoppedCounters(app);
  assert.deepStrictEqual(stopped.perWorker, [1, 2, 3], stopped.text);
  assert.deepStrictEqual([stopped.redirected, stopped.closed, stopped.revivals, stopped.recovered], [0, 0, 0, 0], stopped.text);
  const line = readyEvent(app, 'stopped');
  assert.deepStrictEqual(line, { version: 1, event: 'stopped', graceful: true, routed: [1, 2, 3], redirected: 0, closed: 0, revivals: 0, recovered: 0, reload_failures: 0, pid: app.child.pid });
  // The human line says the same, in the one format both implementations print.
  assert.match(app.stderr, /^sticky-cluster: info stopped: routed 6 connections \[1, 2, 3\], redirected 0, closed 0, revivals 0, recovered 0$/m);
  assert.deepStrictEqual(app.ready.lines.map((entry) => entry.event), ['listening', 'stopped']);
});

test('a listen error is an error line before errorHandler runs', async (t) => {
  const occupier = net.createServer().listen(0, '127.0.0.1');
  await new Promise((resolve) => occupier.once('listening', resolve));
  t.after(() => occupier.close());
  const { port } = occupier.address();
  const app = await startApp(t, 'plain-app.js', options({ port, host: '127.0.0.1', concurrency: 1 }), { waitForListening: false });
  const exit = await within(10000, app.exited, 'master with a taken port');
  assert.strictEqual(exit.code, 1, app.stderr);
  await within(5000, app.ready.closed, 'the end of the ready fd');
  assert.strictEqual(app.ready.lines.length, 1, JSON.stringify(app.ready.lines));
  const [error] = app.ready.lines;
  assert.deepStrictEqual(Object.keys(error), ['version', 'event', 'message', 'pid']);
  assert.strictEqual(error.event, 'error');
  assert.match(error.message, new RegExp(`(EADDRINUSE|Address already in use).*|.*127\\.0\\.0\\.1:${port}`));
  assert.ok(error.message.includes(String(port)), error.message);
});

test('an option out of bounds is an error line with the thrown message', async (t) => {
  const app = await startApp(t, 'plain-app.js', options({ concurrency: 2000 }), { waitForListening: false });
  assert.strictEqual((await within(10000, app.exited, 'a refused start')).code, 4, app.stderr);
  await within(5000, app.ready.closed, 'the end of the ready fd');
  const thrown = JSON.parse(app.stdout.trim()).thrown;
  assert.strictEqual(thrown.message, 'sticky-cluster-native: concurrency: must be at most 1024, got 2000');
  assert.deepStrictEqual(app.ready.lines, [{ version: 1, event: 'error', message: 'concurrency: must be at most 1024, got 2000', pid: app.child.pid }]);
});

test('a ready fd that is not open for writing is refused in one line naming the variable', () => {
  const run = (fd, extra = {}) => {
    const result = spawnSync(process.execPath, [FIXTURE], {
      env: { ...process.env, ...options({ concurrency: 1 }), STICKY_CLUSTER_READY_FD: fd },
      encoding: 'utf8',
      timeout: 15000,
      ...extra,
    });
    assert.strictEqual(result.status, 4, result.stderr);
    return JSON.parse(result.stdout.trim()).thrown;
  };
  assert.deepStrictEqual(run('99'), {
    name: 'TypeError',
    message: 'sticky-cluster-native: STICKY_CLUSTER_READY_FD=99: not an open file descriptor (Bad file descriptor (os error 9))',
  });
  assert.strictEqual(run('three').message, 'sticky-cluster-native: STICKY_CLUSTER_READY_FD=three: not an fd number: "three"');
  const readOnly = fs.openSync(__filename, 'r');
  try {
    const thrown = run('3', { stdio: ['ignore', 'pipe', 'pipe', readOnly] });
    assert.strictEqual(thrown.message, 'sticky-cluster-native: STICKY_CLUSTER_READY_FD=3: open for reading only');
  } finally {
    fs.closeSync(readOnly);
  }
});
