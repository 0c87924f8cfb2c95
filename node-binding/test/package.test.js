'use strict';
// Installing the package from source the two ways a developer does, in fresh app folders outside the
// repository: `npm install <folder>` and `npm install <tarball from npm pack>` (built from the vendored
// sources), then running a cluster from each install. npm runs offline: the platform package (an optional
// dependency) is not in the registry's hands here, so both installs must compile. The prebuilt path is in
// prebuilt.test.js.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn, spawnSync } = require('child_process');
const { getJson, listening, within, withReadyFd } = require('./helpers');

const packageDir = path.resolve(__dirname, '..');
// The workspace's target dir: the tarball's dependency graph is the same, so only core and this crate
// compile again instead of a whole release build from nothing.
const cacheTarget = process.env.CARGO_TARGET_DIR || path.resolve(packageDir, '..', 'target');

function npm(args, cwd, env = {}) {
  const result = spawnSync('npm', [...args, '--offline', '--no-audit', '--no-fund'], {
    cwd,
    encoding: 'utf8',
    env: { ...process.env, npm_config_registry: 'http://127.0.0.1:9/', ...env },
    timeout: 9 * 60 * 1000,
  });
  assert.strictEqual(result.status, 0, `npm ${args.join(' ')} failed:\n${result.stdout}\n${result.stderr}`);
  return result.stdout;
}

function freshApp(t, name) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `sticky-native-${name}-`));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name, private: true }));
  fs.writeFileSync(
    path.join(dir, 'app.js'),
    `const http = require('http');
require('sticky-cluster-native')((callback) => {
  callback(http.createServer((request, response) => response.end(JSON.stringify({ index: Number(process.env.STICKY_CLUSTER_WORKER_INDEX) }))));
}, { concurrency: 2, port: 0 });
`
  );
  return dir;
}

/** Runs the installed app: it must serve a request and exit 0 on SIGTERM. */
async function runInstalledApp(t, dir) {
  const child = spawn(process.execPath, ['app.js'], withReadyFd({ cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] }));
  t.after(() => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL'));
  const app = { child, stderr: '' };
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  const exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  const { port } = await listening(app);
  const seen = await getJson(port, '/', '127.31.0.1');
  assert.ok(seen.index === 0 || seen.index === 1, JSON.stringify(seen));
  child.kill('SIGTERM');
  assert.strictEqual(await within(15000, exited, 'installed app after SIGTERM'), 0, app.stderr);
}

test('npm install <folder> builds the addon and the app runs', { timeout: 10 * 60 * 1000 }, async (t) => {
  // The install builds into this checkout: keep the addon run-tests.sh put there (the published one) for
  // the test files that run after this one.
  const inPlace = path.join(packageDir, 'sticky-cluster-native.node');
  const saved = fs.existsSync(inPlace) ? fs.readFileSync(inPlace) : null;
  t.after(() => {
    fs.rmSync(inPlace, { force: true });
    if (saved) fs.writeFileSync(inPlace, saved, { mode: 0o755 });
  });
  const dir = freshApp(t, 'folder-install');
  npm(['install', packageDir], dir);
  const installed = fs.realpathSync(path.join(dir, 'node_modules', 'sticky-cluster-native'));
  assert.ok(fs.existsSync(path.join(installed, 'sticky-cluster-native.node')));
  await runInstalledApp(t, dir);
});

test('npm install of the npm pack tarball builds from vendored sources outside the repo', { timeout: 10 * 60 * 1000 }, async (t) => {
  const packDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-native-pack-'));
  t.after(() => fs.rmSync(packDir, { recursive: true, force: true }));
  npm(['pack', '--pack-destination', packDir], packageDir);
  assert.ok(!fs.existsSync(path.join(packageDir, 'vendor')), 'postpack left vendor/ behind');
  const [tarball] = fs.readdirSync(packDir).filter((file) => file.endsWith('.tgz'));
  const listing = spawnSync('tar', ['tzf', path.join(packDir, tarball)], { encoding: 'utf8' }).stdout;
  assert.match(listing, /package\/vendor\/core\/src\/lib\.rs/);
  assert.doesNotMatch(listing, /\.node\n|node_modules|package\/test\//);

  const dir = freshApp(t, 'tarball-install');
  npm(['install', path.join(packDir, tarball)], dir, { CARGO_TARGET_DIR: cacheTarget });
  const installed = path.join(dir, 'node_modules', 'sticky-cluster-native');
  assert.ok(!fs.lstatSync(installed).isSymbolicLink());
  assert.ok(fs.existsSync(path.join(installed, 'sticky-cluster-native.node')));
  await runInstalledApp(t, dir);
});
