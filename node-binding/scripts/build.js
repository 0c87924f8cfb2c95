'use strict';
// Builds the addon from source with plain cargo and copies it to sticky-cluster-native.node.
// On `npm install` it does nothing when this machine's prebuilt package (an optional dependency) is
// installed, and a failed or impossible build (no cargo) leaves the install intact with a warning: the
// loader then explains what is missing. `--force` (npm run build) and `npm rebuild --build-from-source`
// always build, and fail loudly. Two source layouts:
// the repository (this folder is a member of the Cargo workspace) and the npm tarball (vendor/, made
// by scripts/prepack.js, holds a standalone workspace with a copy of core).

const { spawnSync } = require('child_process');
const fs = require('fs');
const path = require('path');
const { installedPackage, missingAddonMessage } = require('../binding');

const packageDir = path.resolve(__dirname, '..');
const addon = path.join(packageDir, 'sticky-cluster-native.node');

const force = process.argv.includes('--force') || /^(true|1)$/.test(process.env.npm_config_build_from_source || '');

/** A build directory to delete whatever happens (the tarball's own vendor/target). */
let cleanupDir = null;

/** A build asked for by hand fails the command; one run by `npm install` warns and lets the install finish. */
function fail(message) {
  process.stderr.write(`sticky-cluster-native: ${message}\n`);
  if (cleanupDir) fs.rmSync(cleanupDir, { recursive: true, force: true });
  if (force) process.exit(1);
  process.stderr.write(`${missingAddonMessage()}\n`);
  process.exit(0);
}

/** The repository workspace when this folder is one of its members, else the vendored one. */
function sourceLayout() {
  const workspace = path.join(packageDir, '..', 'Cargo.toml');
  if (fs.existsSync(workspace) && /^\s*\[workspace\]/m.test(fs.readFileSync(workspace, 'utf8'))) {
    return { cwd: packageDir, args: [], cleanup: null };
  }
  const vendored = path.join(packageDir, 'vendor', 'Cargo.toml');
  if (fs.existsSync(vendored)) {
    const ownTarget = !process.env.CARGO_TARGET_DIR;
    const target = path.join(packageDir, 'vendor', 'target');
    return {
      cwd: path.join(packageDir, 'vendor'),
      args: ownTarget ? ['--target-dir', target] : [],
      // A release target dir is hundreds of MB: node_modules keeps only the addon.
      cleanup: ownTarget ? target : null,
    };
  }
  return null;
}

function main() {
  const prebuilt = installedPackage(packageDir);
  if (!force && prebuilt) {
    console.log(`sticky-cluster-native: using the prebuilt ${prebuilt} package`);
    return;
  }
  const layout = sourceLayout();
  if (!layout) fail(`no Rust sources found in ${packageDir} (neither the repository workspace nor vendor/)`);
  cleanupDir = layout.cleanup;
  const cargo = process.env.CARGO || 'cargo';
  const profile = process.argv.includes('--debug') ? [] : ['--release'];
  const args = ['build', ...profile, '-p', 'sticky-cluster-node', '--message-format=json-render-diagnostics', ...layout.args];
  console.error(`sticky-cluster-native: building the addon: ${cargo} ${args.join(' ')} (in ${layout.cwd})`);
  const result = spawnSync(cargo, args, {
    cwd: layout.cwd,
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 256 * 1024 * 1024,
    encoding: 'utf8',
  });
  if (result.error && result.error.code === 'ENOENT') {
    fail(`\`${cargo}\` was not found, so the addon cannot be built from source here`);
  }
  if (result.error) fail(`cannot run ${cargo}: ${result.error.message}`);
  if (result.status !== 0) fail(`cargo build failed (exit status ${result.status})`);
  let library = null;
  for (const line of result.stdout.split('\n')) {
    if (!line.startsWith('{')) continue;
    const message = JSON.parse(line);
    if (message.reason === 'compiler-artifact' && message.target && message.target.name === 'sticky_cluster_node') {
      library = message.filenames.find((file) => /\.(so|dylib|dll)$/.test(file)) || library;
    }
  }
  if (!library) fail('cargo finished but reported no sticky_cluster_node library');
  // Copy to a fresh inode: a running process may have the old file mapped.
  fs.rmSync(addon, { force: true });
  fs.copyFileSync(library, addon);
  if (layout.cleanup) fs.rmSync(layout.cleanup, { recursive: true, force: true });
  console.error(`sticky-cluster-native: built ${addon}`);
}

main();
