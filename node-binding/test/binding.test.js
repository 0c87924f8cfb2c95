'use strict';
// The loader's libc detection (binding.js): it reads the dynamic loader of real ELF files, asks Node's
// report only without network look-ups, and says "unknown" rather than guess.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const binding = require('../binding');

/** A minimal little-endian ELF64 file whose only program header is PT_INTERP naming `interpreter`. */
function elfWithInterpreter(interpreter) {
  const text = Buffer.from(`${interpreter}\0`, 'latin1');
  const header = Buffer.alloc(64);
  header.writeUInt32BE(0x7f454c46, 0);
  header[4] = 2; // ELFCLASS64
  header[5] = 1; // little-endian
  header[6] = 1;
  header.writeUInt16LE(3, 16); // ET_DYN
  header.writeUInt16LE(62, 18); // x86-64
  header.writeBigUInt64LE(64n, 32); // program headers right after the ELF header
  header.writeUInt16LE(64, 52);
  header.writeUInt16LE(56, 54);
  header.writeUInt16LE(1, 56);
  const programHeader = Buffer.alloc(56);
  programHeader.writeUInt32LE(3, 0); // PT_INTERP
  programHeader.writeBigUInt64LE(120n, 8);
  programHeader.writeBigUInt64LE(BigInt(text.length), 32);
  return Buffer.concat([header, programHeader, text]);
}

function tempFile(t, name, contents) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-native-elf-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, name);
  fs.writeFileSync(file, contents);
  return file;
}

test('the ELF interpreter of this node is glibc\'s loader, as ldd says', () => {
  const interpreter = binding.elfInterpreter(process.execPath);
  assert.match(interpreter, /^\/.*ld-linux-x86-64\.so\.2$/);
  const ldd = spawnSync('ldd', ['--version'], { encoding: 'utf8' });
  assert.match(`${ldd.stdout}${ldd.stderr}`, /GNU libc|GLIBC|GNU C Library/);
  assert.strictEqual(binding.libcFamily(), 'glibc');
  assert.strictEqual(binding.platformTriple(), 'linux-x64-gnu');
});

test('a musl loader in PT_INTERP reads as musl, a glibc one as glibc', (t) => {
  const musl = tempFile(t, 'musl-node', elfWithInterpreter('/lib/ld-musl-x86_64.so.1'));
  assert.strictEqual(binding.elfInterpreter(musl), '/lib/ld-musl-x86_64.so.1');
  assert.strictEqual(binding.libcFromText(binding.elfInterpreter(musl)), 'musl');
  const gnu = tempFile(t, 'gnu-node', elfWithInterpreter('/lib64/ld-linux-x86-64.so.2'));
  assert.strictEqual(binding.libcFromText(binding.elfInterpreter(gnu)), 'glibc');
});

test('files that are not ELF, or cut short, or absent give no answer rather than a guess', (t) => {
  assert.strictEqual(binding.elfInterpreter(tempFile(t, 'script', '#!/bin/sh\necho hi\n')), null);
  assert.strictEqual(binding.elfInterpreter(tempFile(t, 'short', elfWithInterpreter('/lib/ld-musl-x86_64.so.1').subarray(0, 70))), null);
  assert.strictEqual(binding.elfInterpreter('/nonexistent/node'), null);
  assert.strictEqual(binding.libcFromText('/lib/ld-something-else.so'), null);
  assert.strictEqual(binding.libcFromText(null), null);
});

test('the report is asked without network look-ups, and excludeNetwork is put back', () => {
  const report = process.report;
  assert.ok('excludeNetwork' in report, 'this Node has no process.report.excludeNetwork (< 20.13)');
  const before = report.excludeNetwork;
  const getReport = report.getReport;
  let askedWith = null;
  report.getReport = function (...args) {
    askedWith = report.excludeNetwork;
    return getReport.apply(report, args);
  };
  try {
    assert.strictEqual(binding.libcFromReport(), 'glibc');
  } finally {
    report.getReport = getReport;
  }
  assert.strictEqual(askedWith, true, 'getReport() ran with network look-ups on');
  assert.strictEqual(report.excludeNetwork, before);
});

test('on a platform without a published package, the error names the package it would need and says none exists', () => {
  // A child that reports itself as arm64 Linux: the libc answer (this machine's glibc) still holds.
  const script = `
    Object.defineProperty(process, 'arch', { value: 'arm64' });
    const binding = require(${JSON.stringify(path.join(__dirname, '..', 'binding.js'))});
    const saved = require('fs').existsSync;
    require('fs').existsSync = (file) => (file === binding.LOCAL_ADDON ? false : saved(file));
    try { binding.load(); console.log('loaded'); } catch (error) { console.log(JSON.stringify({ code: error.code, message: error.message })); }
  `;
  const result = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 10000 });
  assert.strictEqual(result.status, 0, result.stderr);
  const { code, message } = JSON.parse(result.stdout);
  assert.strictEqual(code, binding.NOT_BUILT);
  assert.match(message, /no prebuilt package exists for linux-arm64-gnu \(sticky-cluster-native-linux-arm64-gnu would be needed; published: linux-x64-gnu\)/);
  assert.match(message, /npm rebuild sticky-cluster-native --build-from-source/);
});

test('an install-time build that fails warns and lets npm install finish; --force and --build-from-source fail', () => {
  const build = path.join(__dirname, '..', 'scripts', 'build.js');
  const env = { ...process.env, CARGO: '/bin/false' };
  delete env.npm_config_build_from_source;
  const install = spawnSync(process.execPath, [build], { env, encoding: 'utf8', timeout: 30000 });
  assert.strictEqual(install.status, 0, install.stderr);
  assert.match(install.stderr, /cargo build failed \(exit status 1\)/);
  assert.match(install.stderr, /ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT|sticky-cluster-native-linux-x64-gnu is not installed/);
  const forced = spawnSync(process.execPath, [build, '--force'], { env, encoding: 'utf8', timeout: 30000 });
  assert.strictEqual(forced.status, 1, forced.stderr);
  const fromSource = spawnSync(process.execPath, [build], { env: { ...env, npm_config_build_from_source: 'true' }, encoding: 'utf8', timeout: 30000 });
  assert.strictEqual(fromSource.status, 1, fromSource.stderr);
});
