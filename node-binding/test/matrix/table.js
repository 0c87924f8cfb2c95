'use strict';
// The runtime matrix's table, made from one run's results: `node table.js RESULTS_DIR [--check README]`.
// RESULTS_DIR holds the TAP output of each run of run-matrix.sh (<runtime id>.<set>[.<implementation>].tap,
// each ending with a `# exit N` line). Every cell comes from tests: the smoke set's and the examples'
// test names start with `[<runtime id> <native|js|examples>]`, the whole suite's file counts as a whole.
// Prints the table; with --check, fails unless README's table (between the runtime-matrix markers) is
// this one and package.json's `engines` admits every runtime version that passed.

const fs = require('fs');
const path = require('path');
const { runtimes } = require('../runtimes/runtimes');

const START = '<!-- runtime-matrix:start (made by test/matrix/table.js from a run of run-matrix.sh) -->';
const END = '<!-- runtime-matrix:end -->';

/** One TAP file: its top-level tests ({ name, ok }), its pass/fail totals and the runner's exit status. */
function readTap(file) {
  if (!fs.existsSync(file)) return null;
  const text = fs.readFileSync(file, 'utf8');
  const tests = [...text.matchAll(/^(not ok|ok) \d+ - (.*?)(?: # SKIP.*)?$/gm)].map((m) => ({ name: m[2], ok: m[1] === 'ok', skipped: / # SKIP/.test(m[0]) }));
  const number = (pattern) => Number((text.match(pattern) || [])[1] ?? NaN);
  return { tests, passed: number(/^# pass (\d+)$/m), failed: number(/^# fail (\d+)$/m), exit: number(/^# exit (\d+)$/m) };
}

/** Whether a whole run passed: tests ran, none failed, exit 0 (its own skips fail it under CI=true). */
function runPassed(run) {
  return Boolean(run) && run.passed > 0 && run.failed === 0 && run.exit === 0;
}

/** 'pass' when every test matching `filter` passed (at least one), 'fail' when one failed, null when none ran. */
function verdict(run, filter) {
  if (!run) return null;
  const chosen = run.tests.filter(filter);
  if (chosen.length === 0) return null;
  return chosen.every((t) => t.ok && !t.skipped) ? 'pass' : 'fail';
}

/** The table's rows: one per runtime, each cell a word and how it was tested. */
function rows(dir) {
  return runtimes().map((entry) => {
    const read = (name) => readTap(path.join(dir, `${entry.id}.${name}.tap`));
    const smoke = read('smoke');
    const examples = read('examples');
    const suite = { native: read('suite.native'), js: read('suite.js') };
    const hasSuite = suite.native !== null || suite.js !== null;
    const tagged = (kind) => (t) => t.name.startsWith(`[${entry.id} ${kind}] `);
    const isKernel = (t) => /routing 'kernel'/.test(t.name);
    /** A cell: the smoke tests chosen, and the whole suite's run where there is one. */
    const cell = (filter, suiteRun, works = 'works') => {
      const results = [verdict(smoke, filter), ...(hasSuite ? [runPassed(suiteRun) ? 'pass' : 'fail'] : [])];
      if (results.includes(null) || results.length === 0) return 'not tested';
      return results.every((r) => r === 'pass') ? works : '**fails**';
    };
    const kernelTest = smoke && smoke.tests.find((t) => tagged('native')(t) && isKernel(t));
    const kernelWorks = kernelTest && /one clear error/.test(kernelTest.name) ? 'no: a one-line error (its `listen({ fd })` binds a new port)' : 'works';
    const exampleNames = [
      ['migration', /npm sticky-cluster example/],
      ['chat', /socket\.io chat example/],
      ['TypeScript', /TypeScript example/],
    ]
      .map(([label, pattern]) => [label, verdict(examples, (t) => tagged('examples')(t) && pattern.test(t.name))])
      .filter(([, result]) => result !== null)
      .map(([label, result]) => (result === 'pass' ? label : `**${label} fails**`));
    const modules = ['ES module import', 'CommonJS require'].map((what) =>
      verdict(smoke, (t) => t.name.includes(`, ${what}:`) && (tagged('native')(t) || tagged('js')(t)))
    );
    const [major] = entry.version.split('.');
    return {
      entry,
      label: entry.machine ? `Node ${major} (the machine's \`node\`)` : entry.label,
      native: cell((t) => tagged('native')(t) && !isKernel(t), suite.native),
      kernel: cell((t) => tagged('native')(t) && isKernel(t), suite.native, kernelWorks),
      js: cell(tagged('js'), suite.js),
      modules: modules.includes(null) ? 'not tested' : modules.every((m) => m === 'pass') ? 'both work' : '**fails**',
      examples: exampleNames.join(', ') || 'not tested',
      testedBy: [hasSuite ? 'whole suite, both implementations' : null, 'smoke set', 'examples', entry.machine ? 'whole suite: `run-tests.sh`' : null]
        .filter(Boolean)
        .join('; '),
    };
  });
}

/** The markdown table. */
function table(dir) {
  const lines = [
    '| runtime | native master | native, `routing: \'kernel\'` | JavaScript master | `import` / `require` | examples run | tested by |',
    '| --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const row of rows(dir)) {
    lines.push(`| ${row.label} | ${row.native} | ${row.kernel} | ${row.js} | ${row.modules} | ${row.examples} | ${row.testedBy} |`);
  }
  return lines.join('\n');
}

/** Whether `version` satisfies a range of `^X.Y.Z` and `>=X.Y.Z` parts joined by `||` (all engines uses). */
function satisfies(version, range) {
  const parse = (text) => text.split('.').map(Number);
  const compare = (a, b) => a.reduce((order, part, i) => order || part - b[i], 0);
  const have = parse(version);
  return range.split('||').some((part) => {
    const match = part.trim().match(/^(\^|>=)(\d+\.\d+\.\d+)$/);
    if (!match) throw new Error(`table.js: engines range part '${part.trim()}' is neither ^X.Y.Z nor >=X.Y.Z`);
    const floor = parse(match[2]);
    if (compare(have, floor) < 0) return false;
    return match[1] === '>=' || have[0] === floor[0];
  });
}

/** Problems with package.json's engines against this run: each passing runtime's version must satisfy them. */
function engineProblems(dir) {
  const engines = require('../../package.json').engines || {};
  const problems = [];
  for (const row of rows(dir)) {
    if ([row.native, row.js].some((cell) => cell !== 'works')) continue;
    const key = row.entry.runtime.toLowerCase();
    if (!engines[key]) problems.push(`package.json engines has no '${key}' although ${row.entry.label} passed`);
    else if (!satisfies(row.entry.version, engines[key])) problems.push(`package.json engines.${key} '${engines[key]}' excludes ${row.entry.label}, which passed`);
  }
  return problems;
}

if (require.main === module) {
  const [dir, flag, readme] = process.argv.slice(2);
  if (!dir || (flag && (flag !== '--check' || !readme))) {
    console.error('usage: node table.js RESULTS_DIR [--check README.md]');
    process.exit(2);
  }
  const made = table(dir);
  console.log(made);
  if (flag === '--check') {
    const text = fs.readFileSync(readme, 'utf8');
    const start = text.indexOf(START);
    const end = text.indexOf(END);
    const problems = engineProblems(dir);
    if (start < 0 || end < start) problems.push(`${readme} has no runtime-matrix markers (${START} ... ${END})`);
    else if (text.slice(start + START.length, end).trim() !== made) {
      problems.push(`${readme}: the runtime table differs from this run's; put the table above between its markers`);
    }
    for (const problem of problems) console.log(`not ok - ${problem}`);
    process.exit(problems.length === 0 ? 0 : 1);
  }
}

module.exports = { table, satisfies, START, END };
