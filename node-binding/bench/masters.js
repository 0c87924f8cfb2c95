'use strict';
// Native master against the JavaScript fallback, in the same run: the same http app (2 workers), the same
// load (new connection per request from 1,000 loopback addresses, 32 in flight), rounds alternating
// between the two. Prints rate, p50/p99 latency, errors, and the primary's CPU per 1k connections and RSS.
// Usage: node bench/masters.js [requests per round, default 4000] [rounds per implementation, default 3]

const http = require('http');
const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');

const REQUESTS = Number(process.argv[2] || 4000);
const ROUNDS = Number(process.argv[3] || 3);
const IN_FLIGHT = 32;
const ADDRESSES = 1000;
const TICKS_PER_SECOND = 100;

function startCluster(implementation) {
  // The master's ready lines on fd 3 (STICKY_CLUSTER_READY_FD): its port once it listens.
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'test', 'fixtures', 'plain-app.js')], {
    env: {
      ...process.env,
      STICKY_CLUSTER_NATIVE: implementation,
      STICKY_CLUSTER_READY_FD: '3',
      FIXTURE_OPTIONS: JSON.stringify({ port: 0, concurrency: 2 }),
    },
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let ready = '';
  child.stderr.setEncoding('utf8').on('data', (chunk) => (stderr += chunk));
  child.stdio[3].setEncoding('utf8').on('data', (chunk) => (ready += chunk));
  return new Promise((resolve, reject) => {
    const poll = setInterval(() => {
      const listening = ready
        .split('\n')
        .filter(Boolean)
        .map((line) => JSON.parse(line))
        .find((line) => line.event === 'listening');
      if (listening && stderr.includes('fixture: implementation')) {
        clearInterval(poll);
        // Both workers ready: the first requests would otherwise wait in the queue.
        setTimeout(() => resolve({ child, port: listening.port }), 1000);
      }
      if (child.exitCode !== null) reject(new Error(stderr));
    }, 20);
  });
}

function request(port, localAddress) {
  return new Promise((resolve) => {
    const started = process.hrtime.bigint();
    http
      .get({ host: '127.0.0.1', port, path: '/', localAddress, agent: false }, (response) => {
        response.resume();
        response.on('end', () => resolve(Number(process.hrtime.bigint() - started) / 1e6));
      })
      .on('error', () => resolve(null));
  });
}

async function load(port, count) {
  const latencies = [];
  let errors = 0;
  let next = 0;
  const started = process.hrtime.bigint();
  const lane = async () => {
    while (next < count) {
      const n = next++;
      const ms = await request(port, `127.60.${Math.floor((n % ADDRESSES) / 250)}.${(n % 250) + 1}`);
      if (ms === null) errors += 1;
      else latencies.push(ms);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, lane));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  return { rate: count / seconds, p50: at(0.5), p99: at(0.99), errors };
}

function cpuTicks(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

function rssKb(pid) {
  return Number(fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);
}

async function round(implementation) {
  const { child, port } = await startCluster(implementation);
  await load(port, 300);
  const ticks = cpuTicks(child.pid);
  const result = await load(port, REQUESTS);
  const cpuMsPer1k = ((cpuTicks(child.pid) - ticks) * 1000) / TICKS_PER_SECOND / (REQUESTS / 1000);
  const rss = rssKb(child.pid);
  child.kill('SIGTERM');
  await new Promise((resolve) => child.once('exit', resolve));
  return { implementation, ...result, cpuMsPer1k, rssMb: rss / 1024 };
}

(async () => {
  const rows = [];
  for (let n = 0; n < ROUNDS; n += 1) {
    for (const implementation of ['1', '0']) rows.push(await round(implementation));
  }
  const name = (row) => (row.implementation === '1' ? 'native' : 'js');
  for (const row of rows) {
    console.log(
      `${name(row).padEnd(6)} ${row.rate.toFixed(0).padStart(6)} conn/s  p50 ${row.p50.toFixed(2)} ms  p99 ${row.p99.toFixed(2)} ms  ` +
        `errors ${row.errors}  primary CPU ${row.cpuMsPer1k.toFixed(0)} ms/1k conns  primary RSS ${row.rssMb.toFixed(1)} MB`
    );
  }
  const median = (values) => values.sort((a, b) => a - b)[Math.floor(values.length / 2)];
  const of = (implementation, key) => median(rows.filter((row) => row.implementation === implementation).map((row) => row[key]));
  console.log(
    `median ratios js/native: rate ${(of('0', 'rate') / of('1', 'rate')).toFixed(2)}, p50 ${(of('0', 'p50') / of('1', 'p50')).toFixed(2)}, ` +
      `primary CPU per connection ${(of('0', 'cpuMsPer1k') / of('1', 'cpuMsPer1k')).toFixed(2)}, primary RSS ${(of('0', 'rssMb') / of('1', 'rssMb')).toFixed(2)}`
  );
})();
