'use strict';
// Finds the compiled addon: one built in place (next to this file, by `npm rebuild` or a checkout's build),
// else this machine's prebuilt package (sticky-cluster-native-<platform>-<arch>[-<libc>]), else one error
// that names the expected package, the npm lockfile pitfall and how to build from source.

const fs = require('fs');
const path = require('path');

/** The prefix of every prebuilt package's name: `sticky-cluster-native-linux-x64-gnu`. */
const PACKAGE_NAME = 'sticky-cluster-native';
/** The file an in-place build (scripts/build.js) writes next to this file. */
const LOCAL_ADDON = path.join(__dirname, `${PACKAGE_NAME}.node`);
/** Error code of load()'s failure; index.js keys its JavaScript fallback on it. */
const NOT_BUILT = 'ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT';

let libcCache;

/** The ELF interpreter named by `file`'s PT_INTERP header (e.g. /lib64/ld-linux-x86-64.so.2), or null. */
function elfInterpreter(file) {
  let fd;
  try {
    fd = fs.openSync(file, 'r');
    const header = Buffer.alloc(64);
    if (fs.readSync(fd, header, 0, 64, 0) < 64 || header.readUInt32BE(0) !== 0x7f454c46) return null;
    const is64 = header[4] === 2;
    const little = header[5] === 1;
    const u16 = (buffer, at) => (little ? buffer.readUInt16LE(at) : buffer.readUInt16BE(at));
    const u32 = (buffer, at) => (little ? buffer.readUInt32LE(at) : buffer.readUInt32BE(at));
    const word = (buffer, at) =>
      is64 ? Number(little ? buffer.readBigUInt64LE(at) : buffer.readBigUInt64BE(at)) : u32(buffer, at);
    const tableOffset = word(header, is64 ? 32 : 28);
    const entrySize = u16(header, is64 ? 54 : 42);
    const entries = u16(header, is64 ? 56 : 44);
    if (entrySize < (is64 ? 56 : 32) || entries > 256) return null;
    const table = Buffer.alloc(entrySize * entries);
    fs.readSync(fd, table, 0, table.length, tableOffset);
    for (let i = 0; i < entries; i += 1) {
      const entry = i * entrySize;
      if (u32(table, entry) !== 3 /* PT_INTERP */) continue;
      const offset = word(table, entry + (is64 ? 8 : 4));
      const size = word(table, entry + (is64 ? 32 : 16));
      if (size <= 0 || size > 4096) return null;
      const text = Buffer.alloc(size);
      fs.readSync(fd, text, 0, size, offset);
      return text.toString('latin1').replace(/\0.*$/s, '');
    }
    return null;
  } catch {
    return null;
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/** 'musl' or 'glibc' from a dynamic loader's path or a libc's self-description; null when it says neither. */
function libcFromText(text) {
  if (typeof text !== 'string') return null;
  if (/musl/i.test(text)) return 'musl';
  if (/ld-linux|GNU C Library|GLIBC|glibc/.test(text)) return 'glibc';
  return null;
}

/** glibc or musl as the running Node's diagnostic report tells it; null when that cannot be asked cheaply. */
function libcFromReport() {
  const report = process.report;
  // Without excludeNetwork (Node < 20.13) getReport() resolves every interface's address over DNS and
  // can stall for seconds: then the report is not asked at all.
  if (!report || typeof report.getReport !== 'function' || !('excludeNetwork' in report)) return null;
  const before = report.excludeNetwork;
  try {
    report.excludeNetwork = true;
    const { header, sharedObjects } = report.getReport();
    if (header && header.glibcVersionRuntime) return 'glibc';
    if (Array.isArray(sharedObjects) && sharedObjects.some((object) => /ld-musl-|libc\.musl-/.test(object))) {
      return 'musl';
    }
    return null;
  } catch {
    return null;
  } finally {
    report.excludeNetwork = before;
  }
}

/**
 * The C library this Node runs on: 'glibc', 'musl', or null when nothing says (never a guess). Asks, in
 * order, the dynamic loader that Node itself was linked against, Node's report, and /usr/bin/ldd.
 */
function libcFamily() {
  if (process.platform !== 'linux') return null;
  if (libcCache !== undefined) return libcCache;
  let found = libcFromText(elfInterpreter(process.execPath)) || libcFromReport();
  if (!found) {
    try {
      found = libcFromText(fs.readFileSync('/usr/bin/ldd', 'latin1').slice(0, 65536));
    } catch {
      found = null;
    }
  }
  libcCache = found;
  return found;
}

/**
 * The suffix of this machine's prebuilt package, napi-rs style: `linux-x64-gnu`, `linux-x64-musl`,
 * `linux-arm-gnueabihf`, `darwin-arm64`. On Linux with an unknown C library there is no libc part.
 */
function platformTriple() {
  const base = `${process.platform}-${process.arch}`;
  if (process.platform === 'win32') return `${base}-msvc`;
  if (process.platform !== 'linux') return base;
  const libc = libcFamily();
  if (!libc) return base;
  const abi = libc === 'musl' ? 'musl' : 'gnu';
  return process.arch === 'arm' ? `${base}-${abi}eabihf` : `${base}-${abi}`;
}

/** The platform packages the main package lists in optionalDependencies (the ones that are published). */
function shippedPackages() {
  try {
    const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, 'package.json'), 'utf8'));
    return Object.keys(manifest.optionalDependencies || {}).filter((name) => name.startsWith(`${PACKAGE_NAME}-`));
  } catch {
    return [];
  }
}

/** The prebuilt packages to try on this machine: the exact one, or each libc's when the C library is unknown. */
function candidatePackages() {
  const triple = platformTriple();
  if (process.platform === 'linux' && !libcFamily()) {
    const suffixes = process.arch === 'arm' ? ['gnueabihf', 'musleabihf'] : ['gnu', 'musl'];
    return suffixes.map((suffix) => `${PACKAGE_NAME}-${triple}-${suffix}`);
  }
  return [`${PACKAGE_NAME}-${triple}`];
}

function notBuilt(message, cause) {
  const error = new Error(message, cause ? { cause } : undefined);
  error.code = NOT_BUILT;
  return error;
}

/** What a user can do about a missing addon: one message naming the package, the pitfall and the build. */
function explain(problems, installed) {
  const candidates = candidatePackages();
  const shipped = shippedPackages();
  const available = candidates.filter((name) => shipped.includes(name));
  let expected;
  if (installed.length > 0) {
    expected = `${installed.join(' and ')} is installed but does not load`;
  } else if (available.length > 0) {
    expected =
      `the prebuilt package ${available.join(' or ')} is not installed; it is one of this package's ` +
      'optionalDependencies. If your package-lock.json was made on another platform (a Mac, or Linux with ' +
      'another C library), npm left it out: delete package-lock.json and node_modules and run `npm install` ' +
      `again on this machine, or run \`npm install ${available[0]}\`; and do not install with ` +
      '--omit=optional / --no-optional';
  } else if (process.platform === 'linux' && !libcFamily()) {
    expected =
      `could not tell whether this Linux uses glibc or musl, and none of ${candidates.join(', ')} is installed`;
  } else {
    expected =
      `no prebuilt package exists for ${platformTriple()} (${candidates[0]} would be needed; published: ` +
      `${shipped.map((name) => name.slice(PACKAGE_NAME.length + 1)).join(', ') || 'none'})`;
  }
  const failures = problems.length > 0 ? ` (${problems.join('; ')})` : '';
  return (
    `${PACKAGE_NAME}: no native addon for ${platformTriple()}: ${expected}. To build it from source instead, ` +
    `install Rust (cargo >= 1.88) and run \`npm rebuild ${PACKAGE_NAME} --build-from-source\`${failures}`
  );
}

/** The name of the installed prebuilt package this machine would load, or null when none is installed. */
function installedPackage(from = __dirname) {
  return candidatePackages().find((name) => {
    try {
      require.resolve(name, { paths: [from] });
      return true;
    } catch {
      return false;
    }
  }) || null;
}

/** The message load() throws when nothing is installed: the expected package, the lockfile pitfall, the build. */
function missingAddonMessage() {
  return explain([], []);
}

/**
 * Loads the addon: the one built in place, else the platform package; otherwise throws an Error with code
 * ERR_STICKY_CLUSTER_NATIVE_NOT_BUILT whose message names the expected package and what to do.
 */
function load() {
  const problems = [];
  const installed = [];
  let firstFailure = null;
  if (fs.existsSync(LOCAL_ADDON)) {
    try {
      return require(LOCAL_ADDON);
    } catch (error) {
      problems.push(`${LOCAL_ADDON} does not load: ${error.message}`);
      firstFailure = error;
    }
  }
  for (const name of candidatePackages()) {
    let resolved;
    try {
      resolved = require.resolve(name);
    } catch {
      continue;
    }
    try {
      return require(resolved);
    } catch (error) {
      installed.push(name);
      problems.push(`${resolved}: ${error.message}`);
      firstFailure = firstFailure || error;
    }
  }
  throw notBuilt(explain(problems, installed), firstFailure);
}

module.exports = {
  load,
  platformTriple,
  libcFamily,
  candidatePackages,
  installedPackage,
  missingAddonMessage,
  elfInterpreter,
  libcFromReport,
  libcFromText,
  LOCAL_ADDON,
  NOT_BUILT,
  PACKAGE_NAME,
};
