'use strict';
// The published form of the package (issue 12): the tarballs of pack.sh, installed into fresh apps outside
// the repository on a PATH without cargo or rustc. With the platform package the app runs a real
// socket.io crowd on the prebuilt addon; without it the error names the package; where cargo exists,
// --build-from-source still compiles an addon that the loader then prefers.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const path = require('path');
const { spawn, spawnSync } = require('child_process');
const { chatCrowd, failures, getJson, listening, within, withReadyFd } = require('./helpers');
const {
  PLATFORM_ADDON,
  PLATFORM_PACKAGE,
  cacheTarget,
  envWithoutRust,
  freshAppDir,
  mappedAddons,
  npmOffline,
  packageDir,
  packedTarballs,
  version,
} = require('./install-helpers');

/** The glibc that the prebuilt addon may need at most (pack.sh's GLIBC_FLOOR). */
const GLIBC_FLOOR = '2.17';
const CONCURRENCY = 4;
const CLIENTS = 40;
const MESSAGES = 10;

function compareVersions(a, b) {
  const left = a.split('.').map(Number);
  const right = b.split('.').map(Number);
  for (let i = 0; i < Math.max(left.length, right.length); i += 1) {
    const difference = (left[i] || 0) - (right[i] || 0);
    if (difference !== 0) return difference;
  }
  return 0;
}

function tarList(tarball) {
  const result = spawnSync('tar', ['tzf', tarball], { encoding: 'utf8' });
  assert.strictEqual(result.status, 0, result.stderr);
  return result.stdout.split('\n').filter(Boolean).sort();
}

function tarRead(tarball, member, encoding = 'utf8') {
  const result = spawnSync('tar', ['xzOf', tarball, member], { encoding, maxBuffer: 64 * 1024 * 1024 });
  assert.strictEqual(result.status, 0, String(result.stderr));
  return result.stdout;
}

/** The app: the repository's socket.io chat fixture, requiring the installed package by name. */
function writeChatApp(dir) {
  const fixture = fs.readFileSync(path.join(__dirname, 'fixtures', 'chat-app.js'), 'utf8');
  const source = fixture.replace("require('../..')", "require('sticky-cluster-native')");
  assert.notStrictEqual(source, fixture, 'chat-app.js no longer requires the package as ../..');
  fs.writeFileSync(path.join(dir, 'chat-app.js'), source);
}

/** Starts the installed app (socket.io from the test folder's node_modules), killed when the test ends. */
async function startInstalledApp(t, dir, env) {
  const child = spawn(process.execPath, ['chat-app.js'], withReadyFd({
    cwd: dir,
    env: {
      ...env,
      NODE_PATH: path.join(__dirname, 'node_modules'),
      STICKY_CLUSTER_NATIVE: '1',
      FIXTURE_OPTIONS: JSON.stringify({ concurrency: CONCURRENCY, port: 0 }),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  }));
  const app = { child, stdout: '', stderr: '' };
  child.stdout.setEncoding('utf8').on('data', (chunk) => (app.stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  app.exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL'));
  app.port = (await listening(app)).port;
  return app;
}

async function stopApp(app) {
  app.child.kill('SIGTERM');
  assert.strictEqual(await within(20000, app.exited, 'installed app after SIGTERM'), 0, app.stderr);
}

test('the platform tarball holds only the addon, with os/cpu/libc, and the main package lists it at its exact version', () => {
  const { main, platform } = packedTarballs();
  assert.deepStrictEqual(tarList(platform), ['package/README.md', `package/${PLATFORM_ADDON}`, 'package/package.json'].sort());
  const manifest = JSON.parse(tarRead(platform, 'package/package.json'));
  assert.strictEqual(manifest.name, PLATFORM_PACKAGE);
  assert.strictEqual(manifest.version, version);
  assert.strictEqual(manifest.main, PLATFORM_ADDON);
  assert.deepStrictEqual([manifest.os, manifest.cpu, manifest.libc], [['linux'], ['x64'], ['glibc']]);

  const mainFiles = tarList(main);
  assert.ok(!mainFiles.some((file) => file.endsWith('.node')), `the main package carries an addon: ${mainFiles}`);
  const mainManifest = JSON.parse(tarRead(main, 'package/package.json'));
  assert.deepStrictEqual(mainManifest.optionalDependencies, { [PLATFORM_PACKAGE]: version });
});

/** What `objdump -T` says `file` needs from glibc: every GLIBC_ version, those above the floor, strong unversioned imports. */
function glibcNeeds(file) {
  const objdump = spawnSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  assert.strictEqual(objdump.status, 0, `objdump -T failed (binutils installed?): ${objdump.error || objdump.stderr}`);
  const versions = [...new Set(objdump.stdout.match(/GLIBC_[0-9][0-9.]*/g) || [])].map((v) => v.slice('GLIBC_'.length)).sort(compareVersions);
  // A libc function missing from the floor's glibc would link as a strong, unversioned undefined symbol.
  const unversioned = objdump.stdout
    .split('\n')
    .filter((line) => /\*UND\*/.test(line) && !/\(GLIBC_/.test(line) && !/\s w\s/.test(line))
    .filter((line) => !/\s(napi_|node_api_)\S*$/.test(line));
  return { versions, tooNew: versions.filter((v) => compareVersions(v, GLIBC_FLOOR) > 0), unversioned };
}

test(`the prebuilt addon needs no GLIBC_ symbol version above ${GLIBC_FLOOR} (objdump -T)`, (t) => {
  const { platform } = packedTarballs();
  const addon = path.join(fs.mkdtempSync(path.join(require('os').tmpdir(), 'sticky-native-glibc-')), PLATFORM_ADDON);
  t.after(() => fs.rmSync(path.dirname(addon), { recursive: true, force: true }));
  fs.writeFileSync(addon, tarRead(platform, `package/${PLATFORM_ADDON}`, 'buffer'));
  const needs = glibcNeeds(addon);
  assert.ok(needs.versions.length > 0, 'no GLIBC_ versions at all: this is not a glibc build');
  assert.deepStrictEqual(needs.tooNew, [], `symbols need glibc above ${GLIBC_FLOOR}`);
  assert.deepStrictEqual(needs.unversioned, []);
  t.diagnostic(`highest GLIBC_ version needed: ${needs.versions.at(-1)}`);
});

test('the in-repository tests run the published addon itself (run-tests.sh puts it in place)', { skip: !process.env.STICKY_CLUSTER_NATIVE_PACKED && 'run outside run-tests.sh' }, () => {
  const { platform } = packedTarballs();
  const published = tarRead(platform, `package/${PLATFORM_ADDON}`, 'buffer');
  const inPlace = fs.readFileSync(require('../binding').LOCAL_ADDON);
  assert.ok(inPlace.equals(published), `the in-place addon (${inPlace.length} bytes) is not the published one (${published.length} bytes)`);
});

test('both tarballs install without Rust and the app serves socket.io crowds on the prebuilt addon', { timeout: 5 * 60 * 1000 }, async (t) => {
  const { main, platform } = packedTarballs();
  const env = envWithoutRust();
  const dir = freshAppDir(t, 'prebuilt-install');
  const install = npmOffline(['install', platform, main], dir, env);
  assert.match(install.output, new RegExp(`using the prebuilt ${PLATFORM_PACKAGE} package`));
  const installed = path.join(dir, 'node_modules', 'sticky-cluster-native');
  assert.ok(!fs.existsSync(path.join(installed, 'sticky-cluster-native.node')), 'the install compiled an addon');
  const prebuilt = fs.realpathSync(path.join(dir, 'node_modules', PLATFORM_PACKAGE, PLATFORM_ADDON));

  writeChatApp(dir);
  const app = await startInstalledApp(t, dir, env);
  assert.deepStrictEqual(mappedAddons(app.child.pid), [prebuilt]);
  for (const [block, transports] of [
    [51, ['polling']],
    [52, ['polling', 'websocket']],
  ]) {
    const results = await within(60000, chatCrowd({ port: app.port, block, count: CLIENTS, transports, messages: MESSAGES }), `${transports} crowd`);
    assert.deepStrictEqual(failures(results, MESSAGES), []);
    for (const r of results) assert.strictEqual(r.pids.size, 1, `${r.localAddress} was answered by ${r.pids.size} workers`);
    const pids = new Set(results.map((r) => [...r.pids][0]));
    assert.strictEqual(pids.size, CONCURRENCY, `${CLIENTS} addresses reached ${pids.size} of ${CONCURRENCY} workers`);
    if (transports.includes('websocket')) assert.ok(results.some((r) => r.transport === 'websocket'), 'no client upgraded');
  }
  await stopApp(app);
});

test('the main package alone installs without Rust, and the error names the platform package and the lockfile fix', { timeout: 5 * 60 * 1000 }, async (t) => {
  const { main } = packedTarballs();
  const env = envWithoutRust();
  const dir = freshAppDir(t, 'main-only');
  const install = npmOffline(['install', main], dir, env);
  assert.match(install.output, /`cargo` was not found/);
  assert.match(install.output, new RegExp(PLATFORM_PACKAGE));

  const load = spawnSync(process.execPath, ['-e', "require('sticky-cluster-native/binding').load()"], { cwd: dir, env, encoding: 'utf8' });
  assert.notStrictEqual(load.status, 0, 'load() found an addon that was never installed');
  assert.match(load.stderr, /ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT/);
  assert.match(load.stderr, new RegExp(`the prebuilt package ${PLATFORM_PACKAGE} is not installed`));
  assert.match(load.stderr, /package-lock\.json/);
  assert.match(load.stderr, /npm rebuild sticky-cluster-native --build-from-source/);

  // An app that insists on the native addon stops with the same words.
  writeChatApp(dir);
  const run = spawnSync(process.execPath, ['chat-app.js'], {
    cwd: dir,
    env: { ...env, NODE_PATH: path.join(__dirname, 'node_modules'), STICKY_CLUSTER_NATIVE: '1', FIXTURE_OPTIONS: '{"port":0}' },
    encoding: 'utf8',
    timeout: 30000,
  });
  assert.notStrictEqual(run.status, 0);
  assert.match(run.stderr, new RegExp(`${PLATFORM_PACKAGE} is not installed`));
});

test('where cargo exists, npm rebuild --build-from-source compiles the addon and the loader prefers it', { timeout: 15 * 60 * 1000 }, async (t) => {
  const { main, platform } = packedTarballs();
  const dir = freshAppDir(t, 'build-from-source');
  npmOffline(['install', '--ignore-scripts', platform, main], dir, process.env);
  npmOffline(['rebuild', 'sticky-cluster-native', '--build-from-source'], dir, { ...process.env, CARGO_TARGET_DIR: cacheTarget });
  const built = path.join(dir, 'node_modules', 'sticky-cluster-native', 'sticky-cluster-native.node');
  assert.ok(fs.existsSync(built), 'no addon built in place');

  writeChatApp(dir);
  const app = await startInstalledApp(t, dir, process.env);
  assert.deepStrictEqual(mappedAddons(app.child.pid), [fs.realpathSync(built)]);
  const answer = await getJson(app.port, '/whoami', '127.53.0.1');
  assert.strictEqual(answer.remoteAddress, '::ffff:127.53.0.1');
  await stopApp(app);
});

test(`both floor checks (this test's and pack.sh --check-glibc) reject the addon plain cargo links against this machine's glibc`, () => {
  // The build-from-source test above compiled it with the host's glibc (2.36 on Debian 12).
  const plain = path.join(cacheTarget, 'release', 'libsticky_cluster_node.so');
  assert.ok(fs.existsSync(plain), `${plain} is missing`);
  const needs = glibcNeeds(plain);
  assert.ok(needs.tooNew.length > 0, `a host build needs nothing above ${GLIBC_FLOOR}: ${needs.versions}`);
  const check = spawnSync('bash', [path.join(packageDir, 'pack.sh'), '--check-glibc', plain], { encoding: 'utf8' });
  assert.notStrictEqual(check.status, 0, 'pack.sh accepted an addon above the floor');
  assert.match(check.stderr, new RegExp(`needs GLIBC_${needs.tooNew.at(-1).replace(/\./g, '\\.')}, above the floor ${GLIBC_FLOOR}`));
  assert.strictEqual(check.stderr.trim().split('\n').length, 1, check.stderr);
});
