'use strict';
// npm string-hash timed with the npm sticky-cluster benchmark's loop (last address first, `% CONCURRENCY`,
// scatter counts) over addresses the Rust driver wrote to a file, so both sides hash the same text.
// Usage: node hash-djb2.js <file with one address per line> <num_workers>
// Prints the npm benchmark's lines, then one JSON line the driver reads.

const fs = require('fs');
const hash = require('string-hash');

const [file, workersText] = process.argv.slice(2);
const workers = parseInt(workersText, 10);
if (!file || !(workers > 0)) {
  console.error('usage: node hash-djb2.js <ips file> <num_workers>');
  process.exit(2);
}
const ips = fs.readFileSync(file, 'utf8').split('\n').filter((line) => line.length > 0);

const scatter = new Array(workers).fill(0);
let start = process.hrtime.bigint();
let i = ips.length;
while (--i >= 0) scatter[hash(ips[i]) % workers]++;
const timeMs = Number(process.hrtime.bigint() - start) / 1e6;

// Steady state after the JIT has warmed up: the fastest of the passes run in 300 ms, as the Rust side does.
let passes = 0;
let sink = 0;
let fastest = Infinity;
const began = process.hrtime.bigint();
while (passes < 3 || Number(process.hrtime.bigint() - began) < 300e6) {
  const pass = process.hrtime.bigint();
  i = ips.length;
  while (--i >= 0) sink = (sink + (hash(ips[i]) % workers)) | 0;
  fastest = Math.min(fastest, Number(process.hrtime.bigint() - pass));
  passes++;
}
const hashesPerSecond = ips.length / (fastest / 1e9);

console.log('djb2');
console.log('  time (ms): ', timeMs);
console.log('  scatter: ', scatter);
console.log(JSON.stringify({ time_ms: timeMs, scatter, hashes_per_second: hashesPerSecond, sink }));
