'use strict';
// reload(options) on what the primary gets back (issue 18.11), driven the way the README tells an
// embedding to: SIGHUP → cluster.reload({ env }). The workers restart one at a time with the new
// environment while clients keep connecting (each successor ready before its predecessor stops, as in
// core), and not one request is lost.

const test = require('node:test');
const assert = require('node:assert');
const { addressesPerIndex, getJson, httpText, startApp, waitFor, within } = require('./helpers');

const CONCURRENCY = 2;

test('SIGHUP → reload({ env }) restarts the workers one at a time, and no request is lost', { timeout: 90000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({ port: 0, concurrency: CONCURRENCY, debug: true, hardShutdownDelay: 20000 }),
    FIXTURE_ENV: '1',
    FIXTURE_RELOAD_ON_SIGHUP: '1',
  });
  const addresses = addressesPerIndex(81, CONCURRENCY);
  const before = [];
  for (const [index, address] of addresses.entries()) {
    const seen = await getJson(app.port, '/whoami', address);
    assert.deepStrictEqual([seen.index, seen.color], [index, `color-${index}`]);
    before.push(seen.pid);
  }

  // Clients from both indexes keep connecting (a new connection per request) through the whole reload.
  const answers = [];
  const errors = [];
  let reloaded = false;
  const loops = addresses.flatMap((address) =>
    [0, 1].map(async () => {
      for (let extra = 0; !reloaded || extra < 20; extra += reloaded ? 1 : 0) {
        try {
          answers.push({ address, at: Date.now(), ...(await getJson(app.port, '/whoami', address)) });
        } catch (error) {
          errors.push(`${address}: ${error.message}`);
        }
      }
    })
  );
  await waitFor(app, () => answers.length >= 20);
  process.kill(app.child.pid, 'SIGHUP');
  await waitFor(app, () => app.stderr.includes('fixture: reload accepted'));
  await waitFor(app, () => app.stderr.includes('reload: every worker runs the new configuration'), 60000);
  reloaded = true;
  await within(30000, Promise.all(loops), 'the clients after the reload');

  assert.deepStrictEqual(errors, [], `no request lost during the reload; stderr:\n${app.stderr}`);
  // Each index now runs a new process with the new environment, at the same index.
  for (const [index, address] of addresses.entries()) {
    const seen = await getJson(app.port, '/whoami', address);
    assert.deepStrictEqual([seen.index, seen.color], [index, `reloaded-${index}`]);
    assert.notStrictEqual(seen.pid, before[index], `worker ${index} was restarted`);
  }
  // One at a time, each successor first: worker 0's successor is ready before its predecessor stops and
  // before worker 1's successor is ready, which in turn comes before worker 1's predecessor stops.
  const stopped = (index) => app.stderr.search(new RegExp(`worker ${index} \\(pid ${before[index]}\\) stopped for the reload`));
  const successorReady = (index) => app.stderr.search(new RegExp(`worker ${index} \\(pid (?!${before[index]}\\))\\d+\\) ready`));
  await waitFor(app, () => stopped(0) >= 0 && stopped(1) >= 0);
  assert.ok(
    successorReady(0) < stopped(0) && successorReady(0) < successorReady(1) && successorReady(1) < stopped(1),
    `successor-first, one index at a time; stderr:\n${app.stderr}`
  );
  const colors = new Set(answers.map((a) => a.color));
  t.diagnostic(
    `figures (${app.implementation || 'default'}): ${answers.length} requests during the reload, ${errors.length} lost, ` +
      `colors seen: ${[...colors].sort().join(' ')}`
  );
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
});

test('a reload whose workers cannot start changes nothing: the old workers keep serving, the failure is counted', { timeout: 90000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({ port: 0, concurrency: CONCURRENCY, metrics: { port: 0 } }),
    FIXTURE_ENV: '1',
    FIXTURE_RELOAD_ON_SIGHUP: '1',
    FIXTURE_RELOAD_BROKEN: '1',
  });
  const metricsPort = await waitFor(app, () => Number((app.stderr.match(/metrics on http:\/\/127\.0\.0\.1:(\d+)\/metrics/) || [])[1]));
  const addresses = addressesPerIndex(82, CONCURRENCY);
  const before = [];
  for (const address of addresses) before.push((await getJson(app.port, '/whoami', address)).pid);
  process.kill(app.child.pid, 'SIGHUP');
  await waitFor(app, () => /reload failed: worker 0's successor exited before it was ready/.test(app.stderr), 30000);
  for (const [index, address] of addresses.entries()) {
    const seen = await getJson(app.port, '/whoami', address);
    assert.deepStrictEqual([seen.index, seen.pid, seen.color], [index, before[index], `color-${index}`], 'the old worker serves on');
  }
  assert.match(await httpText(metricsPort, '/metrics'), /^sticky_cluster_reload_failures_total 1$/m);
  assert.doesNotMatch(app.stderr, /stopped for the reload/);
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
});
