'use strict';
// The two implementations side by side: the JavaScript hash against the shared vectors, both masters
// sending each client address to the same worker index, and how index.js chooses between them
// (STICKY_CLUSTER_NATIVE=0/1/unset, and a package copy that really has no addon).

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const http = require('http');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const { stringHash: jsStringHash } = require('../js/hash');
const { platformTriple } = require('../binding');
const { addressesPerIndex, clientAddress, getJson, routeIndex, startApp, stringHash, waitFor, within } = require('./helpers');

const packageDir = path.resolve(__dirname, '..');
const plainApp = path.join(__dirname, 'fixtures', 'plain-app.js');
const vectorsFile = path.resolve(__dirname, '..', '..', '..', 'shared', 'testdata', 'string-hash-vectors.json');
const options = (values) => ({ FIXTURE_OPTIONS: JSON.stringify({ port: 0, ...values }) });
const FALLBACK_LINE = /running the JavaScript implementation/g;

test('js/hash.js gives every shared string-hash vector its hash', () => {
  const { vectors } = JSON.parse(fs.readFileSync(vectorsFile, 'utf8'));
  assert.ok(vectors.length >= 30, `only ${vectors.length} vectors in ${vectorsFile}`);
  for (const vector of vectors) assert.strictEqual(jsStringHash(vector.text), vector.hash, JSON.stringify(vector));
  // Beyond addresses: surrogate pairs are hashed unit by unit, as npm string-hash does.
  for (const text of ['é', '😀::ffff:127.0.0.1', 'x'.repeat(1000)]) assert.strictEqual(jsStringHash(text), stringHash(text), text);
});

/** GET /whoami over IPv6 loopback from ::1. */
function getJsonIpv6(port) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '::1', port, path: '/whoami', localAddress: '::1', agent: false }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
        response.on('end', () => resolve(JSON.parse(body)));
      })
      .on('error', reject);
  });
}

const hasIpv6Loopback = () => Object.values(os.networkInterfaces()).flat().some((entry) => entry && entry.address === '::1');

test('native and js send each client address to the same worker index', async (t) => {
  const concurrency = 5;
  const native = await startApp(t, 'chat-app.js', { ...options({ concurrency }), STICKY_CLUSTER_NATIVE: '1' });
  const js = await startApp(t, 'chat-app.js', { ...options({ concurrency }), STICKY_CLUSTER_NATIVE: '0' });
  const addresses = Array.from({ length: 40 }, (_, n) => clientAddress(51, n));
  const seen = { native: new Map(), js: new Map() };
  for (const [name, app] of [['native', native], ['js', js]]) {
    for (const address of addresses) seen[name].set(address, await getJson(app.port, '/whoami', address));
    if (hasIpv6Loopback()) seen[name].set('::1', await getJsonIpv6(app.port));
  }
  if (!hasIpv6Loopback()) t.diagnostic('no ::1 on this machine: IPv4 clients only');
  for (const [address, fromNative] of seen.native) {
    const fromJs = seen.js.get(address);
    const expected = address === '::1' ? stringHash('::1') % concurrency : routeIndex(address, concurrency);
    assert.deepStrictEqual(
      { native: fromNative.index, js: fromJs.index, remote: fromJs.remoteAddress },
      { native: expected, js: expected, remote: fromNative.remoteAddress },
      address
    );
  }
  // Every index got some client, so the comparison covered all five workers.
  assert.strictEqual(new Set([...seen.js.values()].map((s) => s.index)).size, concurrency);
});

test('STICKY_CLUSTER_NATIVE=0 runs JavaScript with the addon built; unset runs native', async (t) => {
  const forced = await startApp(t, 'plain-app.js', { ...options({ concurrency: 1, debug: true }), STICKY_CLUSTER_NATIVE: '0' });
  await getJson(forced.port, '/', clientAddress(52, 0));
  assert.match(forced.stderr, /^sticky-cluster: debug implementation: js \(STICKY_CLUSTER_NATIVE=0\)$/m);
  assert.doesNotMatch(forced.stderr, FALLBACK_LINE);

  const auto = await startApp(t, 'plain-app.js', { ...options({ concurrency: 1, debug: true }), STICKY_CLUSTER_NATIVE: undefined });
  await waitFor(auto, () => /^fixture: implementation \w+$/m.test(auto.stderr));
  assert.match(auto.stderr, /^fixture: implementation native$/m);
  assert.match(auto.stderr, /^sticky-cluster: debug implementation: native \(the addon loaded\)$/m);
});

/** This package's JavaScript files without the addon: what a platform with no prebuilt package gets. */
function packageWithoutAddon(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-native-noaddon-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const copy = path.join(dir, 'sticky-cluster-native');
  fs.mkdirSync(copy);
  for (const file of ['index.js', 'binding.js', 'package.json']) fs.copyFileSync(path.join(packageDir, file), path.join(copy, file));
  fs.cpSync(path.join(packageDir, 'js'), path.join(copy, 'js'), { recursive: true });
  return copy;
}

function runPlainApp(env) {
  return spawnSync(process.execPath, [plainApp], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 10000 });
}

test('a missing addon: =1 throws binding.js error, unset falls back and says so once', async (t) => {
  const copy = packageWithoutAddon(t);
  const strict = runPlainApp({ ...options({ concurrency: 1 }), FIXTURE_PACKAGE: copy, STICKY_CLUSTER_NATIVE: '1' });
  assert.strictEqual(strict.status, 4, strict.stderr);
  const { thrown } = JSON.parse(strict.stdout.trim());
  assert.strictEqual(thrown.code, 'ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT');
  assert.ok(thrown.message.includes(`sticky-cluster-native-${platformTriple()}`), thrown.message);

  const app = await startApp(t, 'plain-app.js', { ...options({ concurrency: 2 }), FIXTURE_PACKAGE: copy, STICKY_CLUSTER_NATIVE: undefined });
  // Both workers have loaded the package (and served) before the lines are counted.
  for (const [index, address] of addressesPerIndex(53, 2).entries()) {
    assert.strictEqual((await getJson(app.port, '/', address)).index, index);
  }
  await waitFor(app, () => /^fixture: implementation \w+$/m.test(app.stderr));
  assert.match(app.stderr, /^fixture: implementation js$/m);
  assert.strictEqual((app.stderr.match(FALLBACK_LINE) || []).length, 1, app.stderr);
  assert.match(app.stderr, new RegExp(`^sticky-cluster: warn running the JavaScript implementation .*sticky-cluster-native-${platformTriple()}`, 'm'));
  app.child.kill('SIGTERM');
  assert.deepStrictEqual(await within(10000, app.exited, 'fallback cluster after SIGTERM'), { code: 0, signal: null });
});

test('a bad STICKY_CLUSTER_NATIVE and a JS worker without a master are one clear error each', () => {
  const bad = runPlainApp({ ...options({ concurrency: 1 }), STICKY_CLUSTER_NATIVE: 'yes' });
  assert.strictEqual(bad.status, 4, bad.stderr);
  assert.match(JSON.parse(bad.stdout.trim()).thrown.message, /STICKY_CLUSTER_NATIVE must be 0 \(JavaScript\), 1 \(native\) or unset, got "yes"/);

  const orphan = runPlainApp({ ...options({ concurrency: 1 }), STICKY_CLUSTER_JS_WORKER: '1', STICKY_CLUSTER_WORKER_INDEX: '0' });
  assert.strictEqual(orphan.status, 4, orphan.stderr);
  assert.match(JSON.parse(orphan.stdout.trim()).thrown.message, /not a sticky-cluster worker: .*no IPC channel/);
});

/** Option values out of core's bounds (issue 18.9) and the one line both implementations must refuse each with. */
const BAD_OPTIONS = [
  [{ concurrency: 4e9 }, 'concurrency: must be at most 1024, got 4000000000'],
  [{ concurrency: 2 ** 32 + 1 }, 'concurrency: must be at most 1024, got 4294967297'],
  [{ concurrency: 3500 }, 'concurrency: must be at most 1024, got 3500'],
  [{ concurrency: 1.5 }, 'concurrency: must be a whole number, got 1.5'],
  [{ concurrency: -2 }, 'concurrency: must be at least 1, got -2'],
  [{ hardShutdownDelay: 2 ** 31 }, 'hardShutdownDelay: must be at most 2147483647, got 2147483648'],
  [{ hardShutdownDelay: '::Infinity' }, 'hardShutdownDelay: must be at most 2147483647, got Infinity'],
  [{ hardShutdownDelay: -5 }, 'hardShutdownDelay: must be at least 0, got -5'],
  [{ port: 70000 }, 'port: must be at most 65535, got 70000'],
  [{ port: 80.5 }, 'port: must be a whole number, got 80.5'],
  [{ backlog: -5 }, 'backlog: must be at least 1, got -5'],
  [{ backlog: 2 ** 32 }, 'backlog: must be at most 4294967295, got 4294967296'],
  [{ queue: { limit: 0.5 } }, 'queue.limit: must be at least 1, got 0.5'],
  [{ queue: { maxWait: 2 ** 31 } }, 'queue.maxWait: must be at most 2147483647, got 2147483648'],
  [{ queue: { perSource: 2.5 } }, 'queue.perSource: must be a whole number, got 2.5'],
  [{ metrics: { port: 65536 } }, 'metrics.port: must be at most 65535, got 65536'],
];

test('every option out of bounds is the same one-line TypeError from both implementations', () => {
  for (const [values, expected] of BAD_OPTIONS) {
    const thrown = {};
    for (const [name, native] of [['native', '1'], ['js', '0']]) {
      const run = runPlainApp({ FIXTURE_OPTIONS: JSON.stringify({ port: 0, ...values }), STICKY_CLUSTER_NATIVE: native });
      assert.strictEqual(run.status, 4, `${name} ${JSON.stringify(values)}: ${run.stderr}`);
      thrown[name] = JSON.parse(run.stdout.trim()).thrown;
    }
    const line = `sticky-cluster-native: ${expected}`;
    assert.deepStrictEqual(
      { native: [thrown.native.name, thrown.native.message], js: [thrown.js.name, thrown.js.message] },
      { native: ['TypeError', line], js: ['TypeError', line] },
      JSON.stringify(values)
    );
  }
});
