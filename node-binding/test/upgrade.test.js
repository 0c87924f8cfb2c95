'use strict';
// Issue 20: socket.io through the sticky-cluster binary, its workers this package's socket.io fixture, while
// the master is upgraded in place twice (SIGUSR2 re-executes it with the same pid): websockets opened before
// the upgrades carry on after them, and long-polling sessions whose requests keep arriving across the gaps
// (each on a new TCP connection, routed by the master) all complete on one worker each.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');
const { chatClient, clientAddress, failures, readyLines, routeIndex, within } = require('./helpers');

const repo = path.resolve(__dirname, '..', '..');
const CONCURRENCY = 2;
const CLIENTS = 40;
const MESSAGES = 15;

test('websockets and long-polling sessions carry on through two upgrades of the master in place', async (t) => {
  const targetDir = process.env.CARGO_TARGET_DIR || path.join(repo, 'target');
  const built = [path.join(targetDir, 'debug', 'sticky-cluster'), path.join(targetDir, 'release', 'sticky-cluster')].find(
    (candidate) => fs.existsSync(candidate)
  );
  assert.ok(built, `the sticky-cluster binary in ${targetDir} (cargo build -p sticky-cluster)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'upgrade-socketio-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  // The master runs from a copy that each upgrade replaces, as a package manager would (a new file renamed
  // over the old one); a byte more makes another build.
  const binary = path.join(dir, 'sticky-cluster');
  const install = (extra) => {
    fs.writeFileSync(`${binary}.next`, Buffer.concat([fs.readFileSync(built), Buffer.alloc(extra)]), { mode: 0o755 });
    fs.renameSync(`${binary}.next`, binary);
  };
  install(0);
  const config = path.join(dir, 'cluster.yaml');
  const worker = path.join(__dirname, 'fixtures', 'chat-app.js');
  fs.writeFileSync(
    config,
    `port: 0\nhost: 127.0.0.1\nconcurrency: ${CONCURRENCY}\nworker:\n  command: ${JSON.stringify([process.execPath, worker])}\n`
  );
  const master = spawn(binary, ['--config', config, '--ready-fd', '3'], { stdio: ['ignore', 'ignore', 'pipe', 'pipe'] });
  let stderr = '';
  master.stderr.setEncoding('utf8').on('data', (chunk) => (stderr += chunk));
  const exited = new Promise((resolve) => master.once('exit', (code, signal) => resolve({ code, signal })));
  t.after(() => master.exitCode === null && master.signalCode === null && master.kill('SIGKILL'));
  const ready = readyLines(master.stdio[3]);
  const { port } = await ready.next('listening');

  // Websockets first, so that they are open when the upgrades come; then polling sessions, whose every
  // request (keep-alive off) is a new connection the master routes, some of them during the gaps.
  const crowd = [];
  for (let n = 0; n < CLIENTS; n += 1) {
    const options = { port, messages: MESSAGES, pauseMs: 200, timeoutMs: 60000 };
    crowd.push(chatClient({ ...options, localAddress: clientAddress(41, n), transports: ['websocket'] }));
    crowd.push(chatClient({ ...options, localAddress: clientAddress(42, n), transports: ['polling'], keepAlive: false }));
  }
  const builds = [];
  for (const extra of [1, 2]) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    install(extra);
    master.kill('SIGUSR2');
    const upgraded = await ready.next('upgraded');
    assert.strictEqual(upgraded.pid, master.pid, 'the same pid');
    assert.strictEqual(upgraded.port, port, 'the same listener');
    builds.push(upgraded.build);
  }
  const results = await within(90000, Promise.all(crowd), 'the crowd');
  assert.deepStrictEqual(failures(results, MESSAGES), [], stderr);
  assert.strictEqual(new Set(builds).size, 2, `two distinct builds took over: ${builds}`);
  const workers = fs.readFileSync(`/proc/${master.pid}/task/${master.pid}/children`, 'utf8').split(/\s+/).filter(Boolean);
  assert.strictEqual(workers.length, CONCURRENCY, 'the same workers, still the master\'s children');
  const pidOfIndex = new Map();
  for (const r of results) {
    assert.strictEqual(r.pids.size, 1, `${r.localAddress} was answered by ${r.pids.size} workers`);
    const index = routeIndex(r.localAddress, CONCURRENCY);
    const [pid] = r.pids;
    if (!pidOfIndex.has(index)) pidOfIndex.set(index, pid);
    assert.strictEqual(pidOfIndex.get(index), pid, `${r.localAddress}: index ${index} is one process`);
    assert.ok(workers.includes(String(pid)), `pid ${pid} is one of the workers that were there from the start`);
  }
  assert.ok(
    results.some((r) => r.transport === 'websocket'),
    'websocket clients stayed on websocket'
  );
  master.kill('SIGTERM');
  assert.deepStrictEqual(await exited, { code: 0, signal: null }, stderr);
  const stopped = ready.lines.find((line) => line.event === 'stopped');
  assert.ok(stopped && stopped.graceful, JSON.stringify(stopped));
});
