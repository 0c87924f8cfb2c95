'use strict';
// Test support for installing the published form of the package: the two tarballs of pack.sh, fresh app
// folders outside the repository, npm without the registry, and a PATH on which no Rust toolchain exists.

const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const packageDir = path.resolve(__dirname, '..');
const version = require('../package.json').version;
/** The prebuilt package this repository publishes for the test machine. */
const PLATFORM_PACKAGE = 'sticky-cluster-native-linux-x64-gnu';
/** The addon's file name inside the platform package (napi-rs naming). */
const PLATFORM_ADDON = 'sticky-cluster-native.linux-x64-gnu.node';
/** The workspace's cargo target dir: source builds in tests reuse its compiled dependencies. */
const cacheTarget = process.env.CARGO_TARGET_DIR || path.resolve(packageDir, '..', 'target');

let packedDir = null;

/**
 * The folder with both tarballs: the one run-tests.sh made (STICKY_CLUSTER_NATIVE_PACKED), else a fresh
 * `bash pack.sh` (cheap once cargo's target dir holds the build).
 */
function packedTarballs() {
  if (!packedDir) {
    packedDir = process.env.STICKY_CLUSTER_NATIVE_PACKED || fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-native-packed-'));
    const main = path.join(packedDir, `sticky-cluster-native-${version}.tgz`);
    if (!fs.existsSync(main)) {
      const result = spawnSync('bash', [path.join(packageDir, 'pack.sh'), packedDir], { encoding: 'utf8', timeout: 20 * 60 * 1000 });
      assert.strictEqual(result.status, 0, `pack.sh failed:\n${result.stdout}\n${result.stderr}`);
    }
  }
  return {
    dir: packedDir,
    main: path.join(packedDir, `sticky-cluster-native-${version}.tgz`),
    platform: path.join(packedDir, `${PLATFORM_PACKAGE}-${version}.tgz`),
  };
}

/** process.env.PATH minus every folder that holds cargo, rustc or rustup; asserts that none is left. */
function pathWithoutRust() {
  const tools = ['cargo', 'rustc', 'rustup'];
  const kept = (process.env.PATH || '')
    .split(path.delimiter)
    .filter((dir) => dir && !tools.some((tool) => fs.existsSync(path.join(dir, tool))));
  // node must stay reachable for npm's scripts, whichever folder it came from.
  const nodeDir = path.dirname(process.execPath);
  if (!kept.includes(nodeDir) && !tools.some((tool) => fs.existsSync(path.join(nodeDir, tool)))) kept.push(nodeDir);
  const joined = kept.join(path.delimiter);
  const which = spawnSync('sh', ['-c', 'command -v cargo || command -v rustc'], { env: { PATH: joined }, encoding: 'utf8' });
  assert.notStrictEqual(which.status, 0, `a Rust tool is still on the PATH: ${which.stdout}`);
  return joined;
}

/** The environment of a machine without Rust: no cargo or rustc on PATH, no CARGO override. */
function envWithoutRust() {
  const env = { ...process.env, PATH: pathWithoutRust() };
  delete env.CARGO;
  delete env.RUSTC;
  return env;
}

/**
 * Runs npm in `cwd` without the registry (--offline: nothing may come from the network, so an optional
 * dependency that is not given as a tarball is left out exactly as a stale lockfile would leave it out).
 * Returns { status, output }; `expectSuccess` asserts status 0.
 */
function npmOffline(args, cwd, env, { expectSuccess = true } = {}) {
  const result = spawnSync('npm', [...args, '--offline', '--no-audit', '--no-fund', '--foreground-scripts'], {
    cwd,
    env: { ...env, npm_config_registry: 'http://127.0.0.1:9/' },
    encoding: 'utf8',
    timeout: 15 * 60 * 1000,
  });
  const output = `${result.stdout}\n${result.stderr}`;
  if (expectSuccess) assert.strictEqual(result.status, 0, `npm ${args.join(' ')} failed:\n${output}`);
  return { status: result.status, output };
}

/** A new app folder in the system temp dir (outside the repository), removed when the test ends. */
function freshAppDir(t, name) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `sticky-native-${name}-`));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name, private: true, version: '1.0.0' }));
  return dir;
}

/** The paths of the addons (*.node) mapped into process `pid`, from /proc/<pid>/maps. */
function mappedAddons(pid) {
  const maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8');
  return [...new Set(maps.split('\n').map((line) => line.split(/\s+/)[5]).filter((file) => file && file.endsWith('.node')))];
}

module.exports = {
  PLATFORM_ADDON,
  PLATFORM_PACKAGE,
  cacheTarget,
  envWithoutRust,
  freshAppDir,
  mappedAddons,
  npmOffline,
  packageDir,
  packedTarballs,
  pathWithoutRust,
  version,
};
