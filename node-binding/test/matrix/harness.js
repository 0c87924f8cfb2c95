'use strict';
// Test support of the runtime matrix: the runtime under test (STICKY_CLUSTER_TEST_RUNTIME, an id of
// ../runtimes/runtimes.js), an app folder outside the repository with both packed tarballs installed as a
// user installs them (offline, no Rust on PATH), and clusters of that app started with that runtime, each
// killed with all its workers when the test ends. The test runner itself is the machine's Node.

const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');
const { runtime } = require('../runtimes/runtimes');
const { listening, readyFile, waitFor } = require('../helpers');
const { envWithoutRust, npmOffline, packedTarballs } = require('../install-helpers');

const testDir = path.resolve(__dirname, '..');

/** The runtime this file runs its apps with; fails (never skips) when none is named or it is not installed. */
function runtimeUnderTest() {
  const id = process.env.STICKY_CLUSTER_TEST_RUNTIME;
  assert.ok(id, 'STICKY_CLUSTER_TEST_RUNTIME names no runtime (run-matrix.sh sets it)');
  const entry = runtime(id);
  assert.ok(entry.machine || fs.existsSync(entry.bin), `${entry.label} is not installed at ${entry.bin}: bash test/runtimes/install.sh`);
  return entry;
}

/**
 * A new app folder in the system temp dir with both tarballs installed by npm (offline, on a PATH without
 * cargo), third-party packages linked from `modulesDir`'s node_modules (their own dependencies resolve
 * from there), and `files`: { name: text }. Removed by `remove()`.
 */
function installApp(name, { files = {}, packages = ['socket.io', 'express'], modulesDir = testDir } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `sticky-matrix-${name}-`));
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name, private: true, version: '1.0.0' }, null, 2));
  const { main, platform } = packedTarballs();
  npmOffline(['install', platform, main], dir, envWithoutRust());
  for (const pkg of packages) {
    const target = path.join(modulesDir, 'node_modules', pkg);
    assert.ok(fs.existsSync(target), `${target} is missing: npm ci in ${modulesDir}`);
    fs.symlinkSync(target, path.join(dir, 'node_modules', pkg));
  }
  for (const [file, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, file), text);
  return { dir, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** The socket.io chat fixture of the in-repository tests, requiring the installed package by name. */
function commonJsChatApp() {
  const fixture = fs.readFileSync(path.join(testDir, 'fixtures', 'chat-app.js'), 'utf8');
  const source = fixture.replace("require('../..')", "require('sticky-cluster-native')");
  assert.notStrictEqual(source, fixture, 'fixtures/chat-app.js no longer requires the package as ../..');
  return source;
}

/** The ES module fixture; with `npmSpecifiers` (Deno's way) its imports name npm: packages. */
function esmChatApp({ npmSpecifiers = false } = {}) {
  const source = fs.readFileSync(path.join(__dirname, 'fixtures', 'esm-app.mjs'), 'utf8');
  if (!npmSpecifiers) return source;
  const rewritten = source.replace("from 'socket.io'", "from 'npm:socket.io'").replace("from 'sticky-cluster-native'", "from 'npm:sticky-cluster-native'");
  assert.strictEqual((rewritten.match(/from 'npm:/g) || []).length, 2, 'esm-app.mjs imports changed');
  return rewritten;
}

/** Whether process `pid` still runs (a zombie has exited: only its parent has not collected it yet). */
function isAlive(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Resolves once `check()` is truthy (with its value); rejects after `ms` naming `what`. */
async function eventually(check, ms, what) {
  const started = Date.now();
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() - started > ms) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * Starts `file` of `app` with `entry`'s runtime: STICKY_CLUSTER_NATIVE for `implementation`, options
 * (port 0 and debug, whose lines name every worker's pid, unless given) as FIXTURE_OPTIONS. Waits for the
 * master's `listening` ready line (fd 3, a file) and checks the implementation the fixture reports. The primary and every
 * worker it ever started are killed when the test ends. `denoAllowAll`: Deno runs it with -A.
 */
async function startCluster(t, entry, app, file, { implementation, options = {}, env = {}, waitForListening = true, denoAllowAll = false } = {}) {
  const [bin, ...args] = entry.argv(file, { denoAllowAll });
  // Deno's JavaScript master can write to an fd it was given only with --allow-all (js/ready.js; the
  // smoke set checks the one-line refusal): under named permissions it is the one run that reads the
  // human line instead.
  const withReady = !(entry.runtime === 'Deno' && implementation === 'js' && !denoAllowAll);
  const ready = withReady ? readyFile(path.join(app.dir, `ready-${Date.now()}-${Math.random().toString(36).slice(2)}.jsonl`)) : null;
  const child = spawn(bin, args, {
    cwd: app.dir,
    env: {
      ...process.env,
      STICKY_CLUSTER_NATIVE: implementation === 'js' ? '0' : '1',
      FIXTURE_OPTIONS: JSON.stringify({ port: 0, debug: true, ...options }),
      ...env,
      ...(ready ? { STICKY_CLUSTER_READY_FD: '3' } : {}),
    },
    stdio: ready ? ['ignore', 'pipe', 'pipe', ready.fd] : ['ignore', 'pipe', 'pipe'],
  });
  if (ready) ready.done();
  const cluster = { child, stdout: '', stderr: '', port: null, ready };
  child.stdout.setEncoding('utf8').on('data', (chunk) => (cluster.stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk) => (cluster.stderr += chunk));
  cluster.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  /** Every worker pid the master said it started, oldest first: [{ index, pid }]. */
  cluster.workers = () => [...cluster.stderr.matchAll(/worker (\d+) started \(pid (\d+)/g)].map((m) => ({ index: Number(m[1]), pid: Number(m[2]) }));
  t.after(() => {
    for (const pid of [child.pid, ...cluster.workers().map((w) => w.pid)]) {
      try {
        if (isAlive(pid)) process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
  });
  if (waitForListening) {
    cluster.port = ready
      ? (await listening(cluster, 30000)).port
      : await waitFor(cluster, () => Number((cluster.stderr.match(/listening on \S*:(\d+) with \d+ workers/) || [])[1]), 30000);
    const reported = await waitFor(cluster, () => (cluster.stderr.match(/^fixture: implementation (\w+)$/m) || [])[1], 30000);
    assert.strictEqual(reported, implementation, cluster.stderr);
  }
  return cluster;
}

module.exports = { commonJsChatApp, esmChatApp, eventually, installApp, isAlive, runtimeUnderTest, startCluster, testDir };
