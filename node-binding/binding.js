'use strict';
// Finds the compiled addon: the one built on install (next to this file), else a per-platform prebuilt
// package (sticky-cluster-native-<platform>-<arch>[-<libc>]), else one clear line saying how to build it.

const path = require('path');
const fs = require('fs');

/** The name suffix of the prebuilt package for this machine, e.g. `linux-x64-gnu`. */
function platformTriple() {
  let triple = `${process.platform}-${process.arch}`;
  if (process.platform === 'linux') {
    const report = process.report && process.report.getReport ? process.report.getReport() : null;
    const glibc = report && report.header && report.header.glibcVersionRuntime;
    triple += glibc ? '-gnu' : '-musl';
  }
  return triple;
}

/** Loads the addon, or throws one clear line naming what is missing and how to build it. */
function load() {
  const local = path.join(__dirname, 'sticky-cluster-native.node');
  if (fs.existsSync(local)) return require(local);
  const prebuilt = `sticky-cluster-native-${platformTriple()}`;
  try {
    return require(prebuilt);
  } catch (error) {
    if (error.code !== 'MODULE_NOT_FOUND') throw error;
  }
  const hint = new Error(
    `sticky-cluster-native: no compiled addon (${local} is missing and no ${prebuilt} package is installed); ` +
      'install Rust (cargo) and run `npm rebuild sticky-cluster-native`'
  );
  hint.code = 'ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT';
  throw hint;
}

module.exports = { load, platformTriple };
