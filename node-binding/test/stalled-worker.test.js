'use strict';
// A worker whose event loop is blocked (issue 18 items 2 and 3): it must stop taking connections, so the
// master's own contract applies: its queue for that worker fills up to queue.limit and shows in the
// metrics, the master logs that the worker is not reading, what waits longer than queue.maxWait (or does
// not fit) goes to the next worker, and a `kill -9` of the stuck worker loses nothing it had not taken:
// the master takes back what it had sent and serves it through the worker's successor. And one address
// cannot fill the queues: past queue.perSource its connections are closed and counted, in one log line.

const test = require('node:test');
const assert = require('node:assert');
const { clientAddress, getJson, httpText, routeIndex, startApp, stoppedCounters, waitFor, waitUntil, within } = require('./helpers');

const CONCURRENCY = 2;
const QUEUE_LIMIT = 100;
const CLIENTS = 400;

/** `count` loopback client addresses of `block` that route to worker `index`. */
function addressesFor(index, count, block) {
  const found = [];
  for (let n = 0; found.length < count; n += 1) {
    const address = clientAddress(block, n);
    if (routeIndex(address, CONCURRENCY) === index) found.push(address);
  }
  return found;
}

/** The value of metric `name` (with `worker="index"` when given) on a metrics page. */
function metric(page, name, index) {
  const labels = index === undefined ? '' : `\\{worker="${index}"\\}`;
  const match = page.match(new RegExp(`^${name}${labels} (\\d+)$`, 'm'));
  assert.ok(match, `no ${name}${index === undefined ? '' : ` of worker ${index}`} on the metrics page:\n${page}`);
  return Number(match[1]);
}

/** The value of `sticky_cluster_queue_depth{worker="index"}` on a metrics page. */
const queueDepth = (page, index) => metric(page, 'sticky_cluster_queue_depth', index);

test('a worker with a blocked event loop stops taking connections; the master queues, redirects, and takes back on kill -9', { timeout: 90000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({
      port: 0,
      concurrency: CONCURRENCY,
      queue: { limit: QUEUE_LIMIT, maxWait: 1000 },
      metrics: { port: 0 },
    }),
    FIXTURE_BLOCK_ON_SIGUSR2: '1',
  });
  const metricsPort = await waitFor(app, () => Number((app.stderr.match(/metrics on http:\/\/127\.0\.0\.1:(\d+)\/metrics/) || [])[1]));
  const [ready] = addressesFor(0, 1, 71);
  const victims = addressesFor(1, 20, 72);
  assert.strictEqual((await getJson(app.port, '/whoami', ready)).index, 0);
  const stuck = await getJson(app.port, '/whoami', victims[0]);
  assert.strictEqual(stuck.index, 1);

  process.kill(stuck.pid, 'SIGUSR2');
  await waitFor(app, () => app.stderr.includes('fixture: worker 1 blocking'));

  // Every client's answer, or its error: nothing may be lost.
  const answers = Array.from({ length: CLIENTS }, (_, n) =>
    getJson(app.port, '/whoami', victims[n % victims.length]).then(
      (seen) => ({ seen }),
      (error) => ({ error: error.message })
    )
  );
  let deepest = 0;
  await waitUntil(app, async () => {
    deepest = Math.max(deepest, queueDepth(await httpText(metricsPort, '/metrics'), 1));
    return deepest > 0;
  }, 20000);
  await waitFor(app, () => /worker 1 \(pid \d+\) is not reading its channel/.test(app.stderr), 20000);
  // What does not fit, or waits longer than queue.maxWait, is served by worker 0 meanwhile.
  let servedBeforeKill = 0;
  for (const answer of answers) answer.then(({ seen }) => seen && seen.pid !== stuck.pid && (servedBeforeKill += 1));
  await waitFor(app, () => servedBeforeKill > 0, 20000);
  deepest = Math.max(deepest, queueDepth(await httpText(metricsPort, '/metrics'), 1));

  process.kill(stuck.pid, 'SIGKILL');
  const results = await within(60000, Promise.all(answers), 'every client answered after the kill');
  const failed = results.filter((r) => r.error);
  const byIndex = [0, 0];
  for (const { seen } of results.filter((r) => r.seen)) byIndex[seen.index] += 1;
  const servedByStuck = results.filter((r) => r.seen && r.seen.pid === stuck.pid).length;

  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
  const stopped = await stoppedCounters(app);
  t.diagnostic(
    `figures (${app.implementation || 'default'}): sent ${CLIENTS} to a blocked worker, served ${CLIENTS - failed.length} ` +
      `(worker 0: ${byIndex[0]}, worker 1 after revival: ${byIndex[1]}), failed ${failed.length}, deepest queue ${deepest}, ` +
      `redirected ${stopped.redirected}, closed ${stopped.closed}, recovered ${stopped.recovered}`
  );
  assert.strictEqual(servedByStuck, 0, 'the blocked worker served nothing');
  // Served, or closed and counted; with these bounds (the native channel's ~278 or the JavaScript
  // master's 256 on their way, plus queue.limit) every one is served.
  assert.strictEqual(failed.length, stopped.closed, `every connection served or counted: ${stopped.text}\n${app.stderr}`);
  assert.deepStrictEqual(failed, [], 'every connection served');
  assert.ok(deepest > 0 && deepest <= QUEUE_LIMIT, `queue depth ${deepest} visible and within queue.limit ${QUEUE_LIMIT}`);
  assert.ok(byIndex[0] > 0, 'connections past the bound went to worker 0');
  assert.ok(byIndex[1] > 0, 'what the stuck worker never took was served by its successor');
  assert.ok(stopped.recovered > 0, `the master took back what the killed worker never received: ${stopped.text}`);
  assert.ok(stopped.redirected >= byIndex[0], `redirects counted: ${stopped.text}`);
  assert.strictEqual(stopped.revivals, 1);
});

test('one address flooding a blocked worker is bounded by queue.perSource; other clients still get through', { timeout: 90000 }, async (t) => {
  const app = await startApp(t, 'chat-app.js', {
    FIXTURE_OPTIONS: JSON.stringify({
      port: 0,
      concurrency: CONCURRENCY,
      queue: { limit: 50, perSource: 10, maxWait: 60000 },
      metrics: { port: 0 },
    }),
    FIXTURE_BLOCK_ON_SIGUSR2: '1',
  });
  const metricsPort = await waitFor(app, () => Number((app.stderr.match(/metrics on http:\/\/127\.0\.0\.1:(\d+)\/metrics/) || [])[1]));
  const [flooder, otherForOne] = addressesFor(1, 2, 73);
  const [otherForZero] = addressesFor(0, 1, 73);
  const stuck = await getJson(app.port, '/whoami', flooder);
  process.kill(stuck.pid, 'SIGUSR2');
  await waitFor(app, () => app.stderr.includes('fixture: worker 1 blocking'));

  const settle = (promise) => promise.then((seen) => ({ seen }), (error) => ({ error: error.message }));
  const flood = Array.from({ length: CLIENTS }, () => settle(getJson(app.port, '/whoami', flooder)));
  await waitFor(app, () => /closing connection from ::ffff:\S+ for worker 1: its address has 10 connections waiting \(queue\.perSource\)/.test(app.stderr), 20000);
  // Another address of the same worker still queues, and one of the other worker is served at once.
  const other = settle(getJson(app.port, '/whoami', otherForOne));
  assert.strictEqual((await within(10000, getJson(app.port, '/whoami', otherForZero), 'the other worker')).index, 0);
  const page = await waitUntil(app, async () => {
    const text = await httpText(metricsPort, '/metrics');
    return queueDepth(text, 1) === 11 ? text : null;
  }, 20000);
  assert.strictEqual(metric(page, 'sticky_cluster_queue_per_source_busiest'), 10, page);
  assert.strictEqual(metric(page, 'sticky_cluster_queue_per_source_limit'), 10, page);
  const closedPerSource = metric(page, 'sticky_cluster_connections_per_source_closed_total');
  assert.ok(closedPerSource > 0, page);
  await waitFor(app, () => /closed \d+ connections unserved over [\d.]+s: \d+ past queue\.perSource, \d+ with no ready worker that had room/.test(app.stderr), 20000);

  process.kill(stuck.pid, 'SIGKILL');
  const results = await within(60000, Promise.all(flood), 'the flood after the kill');
  const otherResult = await within(30000, other, 'the other address of worker 1');
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(20000, app.exited, 'master after SIGTERM'), { code: 0, signal: null }, app.stderr);
  const stopped = await stoppedCounters(app);
  const failed = results.filter((r) => r.error).length;
  t.diagnostic(
    `figures (${app.implementation || 'default'}): one address sent ${CLIENTS} to a blocked worker, served ${CLIENTS - failed}, ` +
      `closed past queue.perSource ${closedPerSource}, closed in all ${stopped.closed}; the other address served by worker ${otherResult.seen && otherResult.seen.index}`
  );
  assert.ok(otherResult.seen && otherResult.seen.index === 1, `the other address was served by worker 1's successor: ${JSON.stringify(otherResult)}`);
  assert.strictEqual(failed, stopped.closed, `every flood connection served or counted: ${stopped.text}`);
  assert.strictEqual(failed, closedPerSource, 'the only ones closed are those past queue.perSource');
  assert.strictEqual((app.stderr.match(/closing connection from/g) || []).length, 1, 'one line for the episode');
});
