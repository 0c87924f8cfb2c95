'use strict';
// routing: 'kernel' through the Node binding: the Rust master holds one SO_REUSEPORT listener per worker
// and a BPF program routes; the Node workers' code is the same as in handoff mode.

const test = require('node:test');
const assert = require('node:assert');
const { clientAddress, getJson, listenBacklogs, routeIndex, startApp, waitFor } = require('./helpers');

const options = (values) => ({ FIXTURE_OPTIONS: JSON.stringify({ port: 0, ...values }), STICKY_CLUSTER_NATIVE: '1' });

test("routing: 'kernel' puts 200 addresses x 2 rounds on their string-hash worker", async (t) => {
  const concurrency = 3;
  const app = await startApp(t, 'plain-app.js', options({ concurrency, routing: 'kernel', debug: true }));
  assert.match(app.stderr, /routing: kernel \(\d+ instructions\)/);
  const pidOf = new Map();
  const used = new Array(concurrency).fill(0);
  for (let round = 0; round < 2; round += 1) {
    for (let n = 0; n < 200; n += 1) {
      const address = clientAddress(62, n);
      const answer = await getJson(app.port, '/', address);
      assert.strictEqual(answer.index, routeIndex(address, concurrency), `${address} round ${round}`);
      assert.strictEqual(answer.remoteAddress, `::ffff:${address}`);
      if (!pidOf.has(address)) pidOf.set(address, answer.pid);
      assert.strictEqual(answer.pid, pidOf.get(address), `${address} changed worker process`);
      used[answer.index] += 1;
    }
  }
  assert.ok(used.every((count) => count > 0), `every worker served: ${used}`);
  const native = app.stderr.match(/ready \(accepting from its own listener\)/g) || [];
  assert.strictEqual(native.length, concurrency, `every worker accepts natively:\n${app.stderr}`);
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await app.exited, { code: 0, signal: null }, app.stderr);
});

test('the backlog option reaches every worker\'s listener (Node listens again, and not with its 511)', async (t) => {
  const concurrency = 2;
  const app = await startApp(t, 'plain-app.js', options({ concurrency, routing: 'kernel', backlog: 64, debug: true }));
  await waitFor(app, () => (app.stderr.match(/\) ready/g) || []).length === concurrency);
  assert.deepStrictEqual(listenBacklogs(app.port), [64, 64]);
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await app.exited, { code: 0, signal: null }, app.stderr);
});

test("an unknown routing is refused with the option's name", async (t) => {
  const app = await startApp(t, 'plain-app.js', options({ routing: 'bpf' }), { waitForListening: false });
  const { code } = await app.exited;
  assert.strictEqual(code, 4, app.stderr);
  assert.match(app.stdout, /options\.routing must be 'handoff' or 'kernel', got 'bpf'/);
});

test('a backlog that is not a positive integer is refused with the option\'s name', async (t) => {
  const app = await startApp(t, 'plain-app.js', options({ backlog: -5 }), { waitForListening: false });
  const { code } = await app.exited;
  assert.strictEqual(code, 4, app.stderr);
  assert.match(app.stdout, /sticky-cluster-native: backlog: must be at least 1, got -5/);
});
