'use strict';
// Runs before `npm pack` / `npm publish`: copies the Rust sources the addon needs (this crate and core)
// into vendor/ as a standalone Cargo workspace, so the tarball builds on install outside the repository.
// scripts/postpack.js removes vendor/ again.

const fs = require('fs');
const path = require('path');

const packageDir = path.resolve(__dirname, '..');
const repoDir = path.resolve(packageDir, '..');
const vendorDir = path.join(packageDir, 'vendor');

function fail(message) {
  process.stderr.write(`sticky-cluster-native prepack: ${message}\n`);
  process.exit(1);
}

/** Keeps the TOML text minus the sections whose header `drop` accepts (headers are whole lines). */
function withoutSections(text, drop) {
  const kept = [];
  let dropping = false;
  for (const line of text.split('\n')) {
    const header = line.match(/^\s*(\[\[?[^\]]+\]\]?)\s*(#.*)?$/);
    if (header) dropping = drop(header[1]);
    if (!dropping) kept.push(line);
  }
  return kept.join('\n');
}

function copyTree(from, to) {
  fs.cpSync(from, to, { recursive: true, filter: (source) => !/[\\/](target|node_modules)$/.test(source) });
}

function main() {
  const rootManifest = path.join(repoDir, 'Cargo.toml');
  if (!fs.existsSync(rootManifest) || !fs.existsSync(path.join(repoDir, 'core', 'Cargo.toml'))) {
    fail(`expected the sticky-cluster repository around ${packageDir} (no ${rootManifest} or core/)`);
  }
  fs.rmSync(vendorDir, { recursive: true, force: true });
  fs.mkdirSync(vendorDir);

  // The workspace: the same shared package fields, dependency versions and profiles, two members.
  let workspace = fs.readFileSync(rootManifest, 'utf8');
  workspace = workspace.replace(/^members\s*=\s*\[[^\]]*\]/m, 'members = ["core", "node"]');
  // Path dependencies on members that are not vendored would not resolve.
  workspace = workspace
    .split('\n')
    .filter((line) => !/path\s*=\s*"(?!core")[^"]*"/.test(line))
    .join('\n');
  fs.writeFileSync(path.join(vendorDir, 'Cargo.toml'), workspace);
  const lock = path.join(repoDir, 'Cargo.lock');
  if (fs.existsSync(lock)) fs.copyFileSync(lock, path.join(vendorDir, 'Cargo.lock'));

  // core: library sources only; its tests, examples and dev-dependencies stay in the repository.
  const coreDir = path.join(vendorDir, 'core');
  fs.mkdirSync(coreDir);
  copyTree(path.join(repoDir, 'core', 'src'), path.join(coreDir, 'src'));
  if (fs.existsSync(path.join(repoDir, 'core', 'build.rs'))) {
    fs.copyFileSync(path.join(repoDir, 'core', 'build.rs'), path.join(coreDir, 'build.rs'));
  }
  const coreManifest = withoutSections(fs.readFileSync(path.join(repoDir, 'core', 'Cargo.toml'), 'utf8'), (header) =>
    ['[[example]]', '[[test]]', '[[bench]]', '[dev-dependencies]'].includes(header)
  );
  fs.writeFileSync(path.join(coreDir, 'Cargo.toml'), coreManifest);

  // This crate.
  const nodeDir = path.join(vendorDir, 'node');
  fs.mkdirSync(nodeDir);
  copyTree(path.join(packageDir, 'src'), path.join(nodeDir, 'src'));
  fs.copyFileSync(path.join(packageDir, 'build.rs'), path.join(nodeDir, 'build.rs'));
  fs.copyFileSync(path.join(packageDir, 'Cargo.toml'), path.join(nodeDir, 'Cargo.toml'));
  console.error(`sticky-cluster-native prepack: vendored core and the addon crate into ${vendorDir}`);
}

main();
