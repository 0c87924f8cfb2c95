'use strict';
// examples/socketio-chat as a user runs it (`npm start` is `node index.js`): the page is served and a
// chat message from one client reaches another client of the same worker.

const test = require('node:test');
const assert = require('node:assert');
const http = require('http');
const path = require('path');
const { spawn } = require('child_process');
const { io } = require('socket.io-client');
const { addressesPerIndex, listening, within, withReadyFd } = require('./helpers');

const exampleDir = path.resolve(__dirname, '..', '..', 'examples', 'socketio-chat');

function get(port, localAddress) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: '/', localAddress, agent: false }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (chunk) => (body += chunk));
        response.on('end', () => resolve({ status: response.statusCode, body }));
      })
      .on('error', reject);
  });
}

test('the socket.io chat example serves its page and relays chat messages', async (t) => {
  const child = spawn(
    process.execPath,
    ['index.js'],
    withReadyFd({ cwd: exampleDir, env: { ...process.env, PORT: '0', WEB_CONCURRENCY: '2' }, stdio: ['ignore', 'ignore', 'pipe'] })
  );
  const app = { child, stderr: '' };
  child.stderr.setEncoding('utf8').on('data', (chunk) => (app.stderr += chunk));
  const exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => child.exitCode === null && child.signalCode === null && child.kill('SIGKILL'));
  const at = await listening(app);
  assert.strictEqual(at.workers, 2, JSON.stringify(at));
  const { port } = at;

  const page = await get(port, '127.41.0.1');
  assert.strictEqual(page.status, 200);
  assert.match(page.body, /<title>sticky-cluster chat<\/title>/);

  // Two browsers that land on the same worker (rooms span one worker in this example).
  const [address] = addressesPerIndex(41, 2);
  const second = addressesPerIndex(42, 2)[0];
  const connect = (localAddress) =>
    new Promise((resolve, reject) => {
      const agent = new http.Agent({ localAddress, keepAlive: true });
      const socket = io(`http://127.0.0.1:${port}`, { agent, forceNew: true, reconnection: false, transports: ['polling'] });
      socket.once('welcome', (welcome) => resolve({ socket, welcome, agent }));
      socket.once('connect_error', reject);
    });
  const alice = await connect(address);
  const bob = await connect(second);
  t.after(() => [alice, bob].forEach((c) => (c.socket.disconnect(), c.agent.destroy())));
  assert.strictEqual(alice.welcome.worker, 0);
  assert.strictEqual(bob.welcome.worker, 0);
  const heard = new Promise((resolve) => bob.socket.on('chat', resolve));
  alice.socket.emit('chat', 'hello from alice');
  const message = await within(5000, heard, 'chat relay');
  assert.strictEqual(message.text, 'hello from alice');

  child.kill('SIGTERM');
  assert.strictEqual(await within(15000, exited, 'example after SIGTERM'), 0, app.stderr);
});
