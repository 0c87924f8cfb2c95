'use strict';
// The proof: 4 workers, 60 socket.io clients from distinct loopback addresses, 20 messages each,
// first over long-polling only (every request of a session must reach the same worker), then with the
// websocket upgrade allowed; and the same crowd against plain node:cluster round-robin, which must fail.

const test = require('node:test');
const assert = require('node:assert');
const { startApp, chatCrowd, failures, routeIndex, within } = require('./helpers');

const CLIENTS = 60;
const MESSAGES = 20;
const CONCURRENCY = 4;

function sessionErrors(results) {
  return results.flatMap((r) => r.errors).filter((e) => /Session ID unknown|400/.test(e));
}

test('sticky-cluster-native keeps 60 long-polling socket.io clients on their workers', async (t) => {
  const app = await startApp(t, 'chat-app.js', { FIXTURE_OPTIONS: JSON.stringify({ concurrency: CONCURRENCY, port: 0 }) });
  const results = await within(60000, chatCrowd({ port: app.port, block: 11, count: CLIENTS, transports: ['polling'], messages: MESSAGES }), 'polling crowd');
  assert.deepStrictEqual(failures(results, MESSAGES), []);
  assert.deepStrictEqual(sessionErrors(results), []);
  for (const r of results) {
    assert.strictEqual(r.transport, 'polling', r.localAddress);
    assert.strictEqual(r.pids.size, 1, `${r.localAddress} was answered by ${r.pids.size} workers`);
  }
  // Clients that hash to the same index share a worker; every index served someone.
  const pidOfIndex = new Map();
  for (const r of results) {
    const index = routeIndex(r.localAddress, CONCURRENCY);
    const [pid] = r.pids;
    if (pidOfIndex.has(index)) assert.strictEqual(pidOfIndex.get(index), pid, `index ${index} has two pids`);
    pidOfIndex.set(index, pid);
  }
  assert.strictEqual(new Set(pidOfIndex.values()).size, CONCURRENCY);
});

test('sticky-cluster-native serves 60 clients with the websocket upgrade allowed', async (t) => {
  const app = await startApp(t, 'chat-app.js', { FIXTURE_OPTIONS: JSON.stringify({ concurrency: CONCURRENCY, port: 0 }) });
  const results = await within(
    60000,
    chatCrowd({ port: app.port, block: 12, count: CLIENTS, transports: ['polling', 'websocket'], messages: MESSAGES }),
    'upgrade crowd'
  );
  assert.deepStrictEqual(failures(results, MESSAGES), []);
  assert.deepStrictEqual(sessionErrors(results), []);
  for (const r of results) assert.strictEqual(r.pids.size, 1, r.localAddress);
  const upgraded = results.filter((r) => r.transport === 'websocket').length;
  assert.ok(upgraded > 0, 'no client upgraded to websocket');
});

test('the same crowd fails on a plain node:cluster round-robin cluster (the test can fail)', async (t) => {
  const app = await startApp(t, 'roundrobin-app.js', { FIXTURE_CONCURRENCY: String(CONCURRENCY) });
  const results = await within(60000, chatCrowd({ port: app.port, block: 13, count: CLIENTS, transports: ['polling'], messages: MESSAGES }), 'round-robin crowd');
  const failed = failures(results, MESSAGES);
  assert.ok(failed.length > 0, 'every client succeeded without sticky sessions: the sticky test proves nothing');
  assert.ok(sessionErrors(results).length > 0, `no "Session ID unknown"/400 among the failures:\n${failed.slice(0, 5).join('\n')}`);
  t.diagnostic(`round-robin: ${failed.length} of ${CLIENTS} clients failed, e.g. ${failed[0]}`);
});
