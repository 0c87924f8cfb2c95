'use strict';
// index.d.ts against a TypeScript app: examples/typescript/app.ts sets every option of the Options
// interface and uses what the primary gets back; `tsc --strict --noEmit` (typescript pinned in that
// folder's package-lock.json) accepts it, and refuses it with one option's value made wrong, so the
// check can fail. Test names start with `[types]` for run-matrix.sh's table.

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const packageDir = path.resolve(__dirname, '..', '..');
const exampleDir = path.join(packageDir, 'examples', 'typescript');
const tsc = path.join(exampleDir, 'node_modules', '.bin', 'tsc');

/** Runs tsc --strict --noEmit on the project in `dir`: { status, output }. */
function check(dir) {
  assert.ok(fs.existsSync(tsc), `${tsc} is missing: npm ci in ${exampleDir}`);
  const result = spawnSync(tsc, ['--strict', '--noEmit', '-p', dir], { encoding: 'utf8', timeout: 120000 });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

/** The names of the Options interface in index.d.ts. */
function optionNames() {
  const types = fs.readFileSync(path.join(packageDir, 'index.d.ts'), 'utf8');
  const body = types.match(/interface Options \{([\s\S]*?)\n  \}/);
  assert.ok(body, 'index.d.ts has no interface Options');
  return [...body[1].matchAll(/^\s{4}(\w+)\?:/gm)].map((m) => m[1]);
}

test('[types] typescript: examples/typescript/app.ts sets every option of index.d.ts', () => {
  const app = fs.readFileSync(path.join(exampleDir, 'app.ts'), 'utf8');
  const names = optionNames();
  assert.ok(names.length >= 12, `only ${names.length} options found in index.d.ts: ${names}`);
  const missing = names.filter((name) => !new RegExp(`^\\s+${name}: `, 'm').test(app));
  assert.deepStrictEqual(missing, [], 'options of index.d.ts that app.ts does not set');
});

test('[types] typescript: tsc --strict --noEmit accepts the example, with the pinned TypeScript', () => {
  const version = JSON.parse(fs.readFileSync(path.join(exampleDir, 'node_modules', 'typescript', 'package.json'), 'utf8')).version;
  assert.strictEqual(version, require(path.join(exampleDir, 'package.json')).devDependencies.typescript);
  const { status, output } = check(exampleDir);
  assert.strictEqual(status, 0, output);
});

test('[types] typescript: tsc refuses an option of the wrong type, naming it', (t) => {
  // The example's copy with routing: 'fast', in a folder that shares its tsconfig and node_modules.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-types-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.symlinkSync(path.join(exampleDir, 'node_modules'), path.join(dir, 'node_modules'));
  fs.copyFileSync(path.join(exampleDir, 'tsconfig.json'), path.join(dir, 'tsconfig.json'));
  fs.copyFileSync(path.join(exampleDir, 'package.json'), path.join(dir, 'package.json'));
  const app = fs.readFileSync(path.join(exampleDir, 'app.ts'), 'utf8');
  const wrong = app.replace("routing: 'handoff'", "routing: 'fast'");
  assert.notStrictEqual(wrong, app, "app.ts no longer sets routing: 'handoff'");
  fs.writeFileSync(path.join(dir, 'app.ts'), wrong);
  const { status, output } = check(dir);
  assert.notStrictEqual(status, 0, 'tsc accepted routing: "fast"');
  assert.match(output, /app\.ts\(\d+,\d+\): error TS2322: Type '"fast"' is not assignable to type '"handoff" \| "kernel" \| undefined'/);
});
