#!/usr/bin/env node
// Node's counterpart of fork_server.py for the workload suite: the fastest
// way a Node service could run each snippet in its own process without a VM.
//
// Node cannot fork() a warm process, so this server keeps --spares child
// processes started ahead of time (child_process.fork of this file with
// --child): each has booted V8 and Node's runtime and loaded the modules
// kvmfork's Node template loads, and waits on its IPC channel. An exec hands
// the code to one spare, which runs it like `node -e` (the body of an async
// function with require), its stdout/stderr going to real pipes the server
// reads; the spare exits when its event loop is empty and the server answers
// with kvmfork's JSON shape. A replacement spare is started at once, so the
// next exec finds one ready unless they arrive faster than Node boots.
//
// What it isolates: each run has its own process (memory, globals), nothing
// more — same user, same filesystem, same network as the server. It is the
// floor a process sandbox for Node could reach, not a sandbox.
//
// Usage: node_fork_server.js --listen 127.0.0.1:PORT [--spares N]
'use strict';

const childProcess = require('child_process');
const http = require('http');

const MAX_BODY = 4 * 1024 * 1024;
const MAX_OUTPUT = 1 << 20;
const DEFAULT_TIMEOUT_S = 30;
const MAX_TIMEOUT_S = 300;

class ExitSentinel {
  constructor(code) {
    this.code = code;
  }
}

function runChild() {
  // Loaded before the code arrives, like the template's agent does.
  for (const m of ['crypto', 'os', 'buffer', 'string_decoder', 'util', 'vm']) require(m);
  const vm = require('vm');
  const realExit = process.exit.bind(process);
  const out = [];
  const err = [];
  let exitCode = 0;
  const fail = (e) => {
    if (e instanceof ExitSentinel) {
      exitCode = e.code;
      return;
    }
    err.push(`${e && e.stack ? e.stack : e}\n`);
    exitCode = 1;
  };
  process.once('message', (msg) => {
    // Output is kept in memory and sent back over IPC when the snippet's
    // event loop is empty ('beforeExit', as kvmfork's Node agent does), so
    // the answer does not wait for the process's teardown.
    const capture = (list) => (chunk, encoding, callback) => {
      list.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
      if (typeof encoding === 'function') encoding();
      else if (typeof callback === 'function') callback();
      return true;
    };
    process.stdout.write = capture(out);
    process.stderr.write = capture(err);
    process.exit = (code) => {
      throw new ExitSentinel(code === undefined ? 0 : code | 0);
    };
    process.on('uncaughtException', fail);
    process.on('unhandledRejection', fail);
    process.once('beforeExit', () => {
      process.send({ stdout: out.join(''), stderr: err.join(''), exit_code: exitCode }, () => {
        realExit(0);
      });
    });
    process.channel.unref();
    const body = `(async function (require, module, exports) {\n${msg.code}\n})`;
    let fn;
    try {
      fn = vm.runInThisContext(body, { filename: '[eval]' });
    } catch (e) {
      fail(e);
      return;
    }
    const mod = { exports: {} };
    fn(require, mod, mod.exports).catch(fail);
  });
  process.send('ready');
}

function parseArgs(argv) {
  const out = { listen: null, spares: 1 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--listen') out.listen = argv[++i];
    else if (a === '--spares') out.spares = Number(argv[++i]);
    else throw new Error(`unknown argument ${a}`);
  }
  if (!out.listen || !/^[^:]+:\d+$/.test(out.listen)) throw new Error('--listen HOST:PORT is required');
  if (!Number.isInteger(out.spares) || out.spares < 1 || out.spares > 64) {
    throw new Error('--spares must be an integer in 1..64');
  }
  return out;
}

class Spares {
  constructor(count) {
    this.count = count;
    this.ready = [];
    this.waiters = [];
    this.stopping = false;
    for (let i = 0; i < count; i++) this.start();
  }

  start() {
    if (this.stopping) return;
    const child = childProcess.fork(__filename, ['--child'], {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    });
    const out = [];
    const err = [];
    const sizes = { out: 0, err: 0 };
    const collect = (list, key) => (chunk) => {
      if (sizes[key] < MAX_OUTPUT) list.push(chunk.subarray(0, MAX_OUTPUT - sizes[key]));
      sizes[key] += chunk.length;
    };
    child.stdout.on('data', collect(out, 'out'));
    child.stderr.on('data', collect(err, 'err'));
    // Both pipes drained and the process gone: only then is the output whole.
    let open = 3;
    let status = null;
    const done = () => {
      if (--open > 0) return;
      // Without a result message the child crashed or was killed: answer
      // with what it wrote to its real stdout/stderr and its exit status.
      if (child.onDone) child.onDone(Buffer.concat(out).toString(), Buffer.concat(err).toString(), status);
    };
    child.stdout.on('end', done);
    child.stderr.on('end', done);
    child.on('exit', (code, signal) => {
      status = signal ? -(require('os').constants.signals[signal] || 1) : code;
      this.ready = this.ready.filter((c) => c !== child);
      // A ready spare that died unused is replaced; one that never came up
      // is not (a broken node would otherwise respawn forever).
      if (!child.taken && child.wasReady && !this.stopping) this.start();
      done();
    });
    child.on('message', (msg) => {
      if (msg !== 'ready') {
        child.result = msg; // the snippet's answer; its exit follows
        if (child.onDone) child.onDone(msg.stdout, msg.stderr, msg.exit_code);
        child.onDone = null;
        return;
      }
      child.wasReady = true;
      const waiter = this.waiters.shift();
      if (waiter) waiter(child);
      else this.ready.push(child);
    });
    child.on('error', () => {});
  }

  take(callback) {
    const child = this.ready.shift();
    if (child) callback(child);
    else this.waiters.push(callback);
  }

  stop() {
    this.stopping = true;
    for (const c of this.ready) c.kill('SIGKILL');
  }
}

function respond(res, status, payload) {
  const body = JSON.stringify(payload);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function parseExec(body) {
  let request;
  try {
    request = JSON.parse(body);
  } catch (e) {
    throw new Error(`body is not JSON: ${e.message}`);
  }
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    throw new Error('body must be a JSON object');
  }
  if (typeof request.code !== 'string') throw new Error('code must be a string');
  const language = request.language === undefined ? 'node' : request.language;
  if (!['node', 'javascript', 'js', 'nodejs'].includes(language)) {
    throw new Error(`this server runs node, not ${JSON.stringify(language)}`);
  }
  const timeout = request.timeout_seconds === undefined ? DEFAULT_TIMEOUT_S : request.timeout_seconds;
  if (typeof timeout !== 'number' || !(timeout > 0 && timeout <= MAX_TIMEOUT_S)) {
    throw new Error('timeout_seconds out of range');
  }
  return { code: request.code, timeout };
}

let nextId = 0;

function exec(spares, res, code, timeout) {
  const started = process.hrtime.bigint();
  spares.take((child) => {
    const handed = process.hrtime.bigint();
    child.taken = true;
    spares.start();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeout * 1000);
    child.onDone = (stdout, stderr, status) => {
      child.onDone = null;
      clearTimeout(timer);
      // The answer is in: the process's teardown is not waited for.
      if (!timedOut) child.kill('SIGKILL');
      const end = process.hrtime.bigint();
      const ms = (a, b) => Math.round(Number(b - a) / 1e3) / 1e3;
      nextId += 1;
      respond(res, 200, {
        id: `node-${process.pid}-${nextId}`,
        stdout,
        stderr: timedOut ? 'timed out\n' : stderr,
        output: stdout,
        exit_code: status === null ? -1 : status,
        timed_out: timedOut,
        error: null,
        fork_time_ms: ms(started, handed),
        exec_time_ms: ms(handed, end),
        total_time_ms: ms(started, end),
        duration_ms: ms(started, end),
      });
    };
    child.send({ code });
  });
}

function serve(args) {
  const spares = new Spares(args.spares);
  const server = http.createServer((req, res) => {
    const route = req.url.split('?')[0];
    if (route === '/v1/health') {
      if (req.method !== 'GET') return respond(res, 405, { error: 'use GET' });
      return respond(res, 200, { status: 'ok' });
    }
    if (route !== '/v1/exec') return respond(res, 404, { error: 'no such route' });
    if (req.method !== 'POST') return respond(res, 405, { error: 'use POST' });
    const chunks = [];
    let size = 0;
    let refused = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        if (!refused) {
          refused = true;
          res.setHeader('Connection', 'close');
          respond(res, 413, { error: 'body too large' });
          req.destroy();
        }
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (refused) return;
      let parsed;
      try {
        parsed = parseExec(Buffer.concat(chunks).toString());
      } catch (e) {
        return respond(res, 400, { error: `bad exec request: ${e.message}` });
      }
      exec(spares, res, parsed.code, parsed.timeout);
    });
  });
  server.keepAliveTimeout = 60000;
  const [host, port] = [args.listen.slice(0, args.listen.lastIndexOf(':')), Number(args.listen.split(':').pop())];
  const stop = () => {
    spares.stop();
    server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.listen(port, host, () => {
    process.stderr.write(`node_fork_server: listening on ${args.listen} with ${args.spares} spare(s)\n`);
  });
}

if (process.argv[2] === '--child') {
  runChild();
} else {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`node_fork_server: ${e.message}\nusage: node_fork_server.js --listen HOST:PORT [--spares N]\n`);
    process.exit(2);
  }
  serve(args);
}
