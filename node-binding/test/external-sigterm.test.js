'use strict';
// A worker that gets SIGTERM from outside, not from its master (systemd's default KillMode signals every
// process of the unit; Kubernetes too) while clients are in flight and more keep coming (issue 18.1,
// Node part): it stops routing (core's kind 9 stopping / the JavaScript master's STOPPING), finishes the
// requests it has, exits on its own, and its index is revived; not one request is lost, and the master
// never kills the stopping worker.

const test = require('node:test');
const assert = require('node:assert');
const { clientAddress, getJson, routeIndex, startApp, waitFor, within } = require('./helpers');

const CONCURRENCY = 2;
const SLOW = 8;

test('a worker SIGTERMed from outside finishes its in-flight requests and loses nothing', { timeout: 90000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({ port: 0, concurrency: CONCURRENCY, debug: true }),
  });
  const victims = [];
  for (let n = 0; victims.length < 12; n += 1) if (routeIndex(clientAddress(91, n), CONCURRENCY) === 1) victims.push(clientAddress(91, n));
  const first = await getJson(app.port, '/whoami', victims[0]);
  assert.strictEqual(first.index, 1);
  const connected = () => (app.stderr.match(new RegExp(`worker 1 \\(pid ${first.pid}\\) connection from`, 'g')) || []).length;
  const before = connected();

  // Slow requests in flight in worker 1 when the signal comes (each takes 800 ms to answer).
  const slow = victims.slice(0, SLOW).map((address) => getJson(app.port, '/slow', address).then((seen) => ({ seen }), (error) => ({ error: error.message })));
  await waitFor(app, () => connected() >= before + SLOW);

  // New clients of index 1 keep coming while it stops and until its successor has answered.
  const answers = [];
  const errors = [];
  let revived = null;
  const loops = victims.slice(SLOW).map(async (address) => {
    for (let after = 0; revived === null || after < 10; after += revived === null ? 0 : 1) {
      try {
        const seen = await getJson(app.port, '/whoami', address);
        answers.push(seen);
        if (seen.index === 1 && seen.pid !== first.pid && revived === null) revived = seen.pid;
      } catch (error) {
        errors.push(`${address}: ${error.message}`);
        if (errors.length > 50) return;
      }
    }
  });
  process.kill(first.pid, 'SIGTERM');
  const slowResults = await within(20000, Promise.all(slow), 'the in-flight slow requests');
  await within(30000, Promise.all(loops), 'the clients during the stop');

  // Both masters log the stopping worker's own exit once it has finished: `worker 1 (pid P) stopped (...)`.
  const exitLine = await waitFor(app, () => (app.stderr.match(new RegExp(`worker 1 \\(pid ${first.pid}\\) stopped \\([^\\n]*`)) || [])[0]);
  t.diagnostic(
    `figures (${app.implementation || 'default'}): ${SLOW} in flight at SIGTERM, ${slowResults.filter((r) => r.seen).length} answered; ` +
      `${answers.length} requests during the stop, ${errors.length} lost; ${exitLine}`
  );
  assert.deepStrictEqual(slowResults.filter((r) => r.error), [], `every in-flight request answered; stderr:\n${app.stderr}`);
  for (const { seen } of slowResults) assert.deepStrictEqual([seen.slow, seen.pid], [true, first.pid], 'answered by the stopping worker');
  assert.deepStrictEqual(errors, [], `no request lost while the worker stopped; stderr:\n${app.stderr}`);
  assert.ok(revived, 'index 1 was revived');
  assert.match(exitLine, /exit status 0/, `the stopping worker exited on its own, not killed; stderr:\n${app.stderr}`);
  assert.doesNotMatch(app.stderr, /refused a write|ending it/, 'the master never took the stopping worker for a broken one');
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
});
