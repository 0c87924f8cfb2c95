'use strict';
// The bounded wait for a worker that is not ready: a connection for a worker that never calls
// callback(server) waits in the master for queue.maxWait (10 s), then goes to the next ready worker;
// nothing is dropped silently, and the master's closing line counts the redirect.

const test = require('node:test');
const assert = require('node:assert');
const { addressesPerIndex, getJson, startApp, within } = require('./helpers');

test('a connection for a worker that never gets ready goes to the next one after 10 s', { timeout: 60000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({ port: 0, concurrency: 2 }),
    FIXTURE_NEVER_READY_INDEX: '1',
  });
  const [forZero, forOne] = addressesPerIndex(61, 2);
  assert.strictEqual((await getJson(app.port, '/whoami', forZero)).index, 0);
  const started = Date.now();
  const seen = await within(20000, getJson(app.port, '/whoami', forOne), 'the redirected request');
  const waited = Date.now() - started;
  assert.strictEqual(seen.index, 0, 'served by the ready worker');
  assert.strictEqual(seen.remoteAddress, `::ffff:${forOne}`);
  assert.ok(waited >= 9500 && waited < 15000, `waited ${waited} ms instead of about 10 s`);
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(15000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
  assert.match(app.stderr, /stopped: routed 2 connections \[2, 0\], redirected 1, closed 0, revivals 0/);
});
