// kvmfork guest agent for Node.js (PID 1 of the Node template, exec'ed by
// node_init.c as /usr/lib/kvmfork/agent.js).
//
// Boot: map the mailbox (kvmfork_mailbox.node), run every WARMUP snippet
// through the real request path and check its result (a mismatch is fatal:
// a broken template never reaches READY), full GC, ring READY. The snapshot
// is taken at that store; every fork resumes right after it with a request
// in the mailbox, runs it, writes the response and rings DONE.
//
// Exec semantics are `node -e` plus top-level await: the code is the body
// of an async function (exports, require, module, __filename, __dirname);
// console.* and process.stdout/stderr.write go straight into the mailbox's
// output areas; an uncaught exception or unhandled rejection prints its
// stack to stderr and gives exit code 1; process.exit(n) gives n (it throws
// a sentinel so PID 1 never exits); timers and promises settle before the
// answer (the VMM enforces the timeout).
//
// The request cycle runs in 'beforeExit' (node emits it whenever the event
// loop has nothing left to do): finish the current exec, ring, start the
// next one, then drain nextTicks/microtasks/rejections synchronously; if
// the code left nothing behind (no timers, handles or thread-pool work)
// answer right away,
// without another event-loop turn (each costs an epoll_wait syscall, ~0.5
// ms of emulated kernel time on PVM hosts).
//
// Usage outside the guest: node <flags> agent.js --selftest (anonymous
// mailbox, no doorbell): runs the warm-up checks and exits 0 when all pass.
'use strict';

const { Console } = require('console');
const EventEmitter = require('events');
const fs = require('fs');
const Module = require('module');
const path = require('path');
const timers = require('timers');
const util = require('util');
const vm = require('vm');
// Loaded into the template so execs that use them do not compile them.
require('crypto');
require('os');
require('buffer');
require('string_decoder');

const addon = require(path.join(__dirname, 'kvmfork_mailbox.node'));
const C = addon.contract;

const MODE = process.argv.includes('--selftest')
  ? 'host-selftest'
  : process.env.KVMFORK_GUEST_SELFTEST === '1' ? 'guest-selftest' : 'serve';
const mailboxAddress = process.env.KVMFORK_MAILBOX_GPA;
delete process.env.KVMFORK_MAILBOX_GPA;
delete process.env.KVMFORK_GUEST_SELFTEST;

function log(message) {
  fs.writeSync(2, `[${process.uptime().toFixed(3).padStart(9)}] kvmfork-agent(node): ${message}\n`);
}

function fatal(message) {
  addon.fatal(String(message)); // never returns
}

if (MODE !== 'host-selftest' && mailboxAddress === undefined) {
  fatal('KVMFORK_MAILBOX_GPA is not set (node_init.c sets it)');
}
const mailbox = addon.open(MODE === 'host-selftest' ? undefined : mailboxAddress);
const view = new DataView(mailbox);
const bytes = Buffer.from(mailbox);

// ---- output capture -------------------------------------------------------

let current = null; // the running exec (see startExec)

function capture(toStdout, chunk, encoding) {
  const exec = current;
  if (exec === null || exec.terminated) return; // node would have exited
  const base = toStdout ? C.MB_STDOUT_OFF : C.MB_STDERR_OFF;
  const used = toStdout ? exec.stdoutLen : exec.stderrLen;
  const room = (toStdout ? exec.stdoutCap : exec.stderrCap) - used;
  let written;
  let complete;
  if (typeof chunk === 'string') {
    const enc = typeof encoding === 'string' && Buffer.isEncoding(encoding) ? encoding : 'utf8';
    const need = Buffer.byteLength(chunk, enc);
    // Buffer#write stops at the last whole character that fits.
    written = room > 0 ? bytes.write(chunk, base + used, Math.min(room, need), enc) : 0;
    complete = need <= room;
  } else if (ArrayBuffer.isView(chunk)) {
    const src = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    written = room > 0 ? src.copy(bytes, base + used, 0, Math.min(room, src.length)) : 0;
    complete = src.length <= room;
  } else {
    throw new TypeError('The "chunk" argument must be of type string or an instance of Buffer or Uint8Array');
  }
  if (toStdout) {
    exec.stdoutLen += written;
    if (!complete) exec.flags |= C.RESP_FLAG_STDOUT_TRUNCATED;
  } else {
    exec.stderrLen += written;
    if (!complete) exec.flags |= C.RESP_FLAG_STDERR_TRUNCATED;
  }
}

// A Writable-shaped sink: what console and code writing to
// process.stdout/stderr need, without stream buffering or ticks.
class CaptureStream extends EventEmitter {
  constructor(fd) {
    super();
    this.fd = fd;
    this.isTTY = false;
    this.writable = true;
    this._toStdout = fd === 1;
  }

  write(chunk, encoding, callback) {
    if (typeof encoding === 'function') {
      callback = encoding;
      encoding = undefined;
    }
    capture(this._toStdout, chunk, encoding);
    if (typeof callback === 'function') process.nextTick(callback, null);
    return true;
  }

  end(chunk, encoding, callback) {
    if (typeof chunk === 'function') {
      callback = chunk;
      chunk = undefined;
    }
    if (chunk !== undefined && chunk !== null) this.write(chunk, encoding);
    if (typeof callback === 'function') process.nextTick(callback);
    return this;
  }

  cork() {}
  uncork() {}
  setDefaultEncoding() { return this; }
  hasColors() { return false; }
  getColorDepth() { return 1; }
  get writableLength() { return 0; }
  get writableHighWaterMark() { return 16384; }
}

const stdoutSink = new CaptureStream(1);
const stderrSink = new CaptureStream(2);
for (const [name, sink] of [['stdout', stdoutSink], ['stderr', stderrSink]]) {
  Object.defineProperty(process, name, { configurable: true, enumerable: true, get: () => sink });
}
// ignoreErrors: false -> console writes with one plain write() call.
globalThis.console = new Console({ stdout: stdoutSink, stderr: stderrSink, ignoreErrors: false, colorMode: false });

// ---- exit, uncaught errors, timers -----------------------------------------

class ExitSignal {
  constructor(code) {
    this.code = code;
  }
}

function normalizeExitCode(code) {
  if (code === undefined || code === null) return 0;
  const n = Number(code);
  return Number.isInteger(n) ? n & 0xff : 1;
}

process.exit = function exit(code) {
  throw new ExitSignal(normalizeExitCode(code === undefined ? process.exitCode : code));
};
process.reallyExit = process.exit;
process.abort = function abort() {
  throw new ExitSignal(134);
};

// Timers the code created, so process.exit / an uncaught error can stop
// them as a real process exit would (an interval would otherwise keep the
// loop alive until the timeout).
const liveTimers = new Set();
const liveImmediates = new Set();
const real = {
  setTimeout: timers.setTimeout,
  setInterval: timers.setInterval,
  setImmediate: timers.setImmediate,
  clearTimeout: timers.clearTimeout,
  clearImmediate: timers.clearImmediate,
};

function tracked(name, set) {
  const create = real[name];
  const wrapper = {
    [name]: function () {
      const handle = Reflect.apply(create, this, arguments);
      set.add(handle);
      return handle;
    },
  }[name];
  if (create[util.promisify.custom]) wrapper[util.promisify.custom] = create[util.promisify.custom];
  return wrapper;
}

for (const target of [globalThis, timers]) {
  target.setTimeout = tracked('setTimeout', liveTimers);
  target.setInterval = tracked('setInterval', liveTimers);
  target.setImmediate = tracked('setImmediate', liveImmediates);
}

function cancelTimers() {
  for (const t of liveTimers) real.clearTimeout(t);
  for (const i of liveImmediates) real.clearImmediate(i);
  liveTimers.clear();
  liveImmediates.clear();
}

// The agent's own frames (it started the code) are noise to the user.
const AGENT_FRAME = `(${__filename}:`;
function formatUncaught(error) {
  if (error instanceof Error || (error !== null && typeof error === 'object' && typeof error.stack === 'string')) {
    const lines = util.inspect(error).split('\n');
    return `${lines.filter((l) => !l.includes(AGENT_FRAME) && !l.includes('at process.emit (node:events')).join('\n')}\n`;
  }
  return `Uncaught ${util.inspect(error)}\n`;
}

function terminate(exec, code) {
  if (exec.terminated) return;
  exec.exitCode = code;
  exec.terminated = true;
  cancelTimers();
}

function uncaught(error) {
  const exec = current;
  if (exec === null) fatal(`agent error outside an exec: ${util.inspect(error)}`);
  if (error instanceof ExitSignal) {
    terminate(exec, error.code);
  } else if (!exec.terminated) {
    capture(false, formatUncaught(error));
    terminate(exec, 1);
  }
}

process.on('uncaughtException', uncaught);
process.on('unhandledRejection', uncaught);

// ---- per-fork randomness ---------------------------------------------------

// Math.random: V8's xorshift state is cloned into every fork, so it is
// replaced by xoshiro128** reseeded from the mailbox's per-fork seed.
const rng = new Uint32Array(4);

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

function nextUint32() {
  const s = rng;
  const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
  const t = s[1] << 9;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 11);
  return result;
}

Object.defineProperty(Math, 'random', {
  configurable: true,
  writable: true,
  enumerable: false,
  value: function random() {
    // 53 random bits, like V8's own.
    return ((nextUint32() >>> 5) * 67108864 + (nextUint32() >>> 6)) / 9007199254740992;
  },
});

function forkSeed() {
  return bytes.subarray(C.MB_FORK_SEED_OFF, C.MB_FORK_SEED_OFF + C.MB_SEED_LEN);
}

function reseedMathRandom() {
  const seed = forkSeed();
  for (let i = 0; i < 4; i++) rng[i] = seed.readUInt32LE(i * 4) ^ seed.readUInt32LE(16 + i * 4);
  if ((rng[0] | rng[1] | rng[2] | rng[3]) === 0) rng[0] = 0x9e3779b9; // xoshiro's one bad state
  for (let i = 0; i < 8; i++) nextUint32();
}

// OpenSSL's DRBG state (crypto.randomBytes, randomUUID, keys...) is cloned
// into every fork too. Reseeding it costs a getrandom syscall (emulated
// kernel work on PVM hosts), so it happens once per exec, when the code
// first loads a module that can reach OpenSSL's RNG; every such path starts
// with one of these requires.
const OPENSSL_MODULES = new Set(['crypto', 'tls', 'https', 'http2', '_tls_wrap']);
let opensslReseeded = false;
const realLoad = Module._load;
Module._load = function _load(request, parent, isMain) {
  if (!opensslReseeded && current !== null &&
      OPENSSL_MODULES.has(request.startsWith('node:') ? request.slice(5) : request)) {
    opensslReseeded = true;
    addon.reseed(forkSeed());
  }
  return Reflect.apply(realLoad, this, arguments);
};

// ---- the request path ------------------------------------------------------

const EVAL_FILENAME = path.join(process.cwd(), '[eval]');
const WRAPPER_HEAD = '(async function (exports, require, module, __filename, __dirname) {';
const WRAPPER_TAIL = '\n})';

function readRequest() {
  const stdoutCap = Math.min(view.getUint32(C.MB_REQ_STDOUT_CAP_OFF, true), C.MB_STDOUT_MAX);
  const stderrCap = Math.min(view.getUint32(C.MB_REQ_STDERR_CAP_OFF, true), C.MB_STDERR_MAX);
  return {
    seq: view.getBigUint64(C.MB_REQ_SEQ_OFF, true),
    language: view.getUint32(C.MB_REQ_LANGUAGE_OFF, true),
    codeLen: view.getUint32(C.MB_REQ_CODE_LEN_OFF, true),
    stdoutCap,
    stderrCap,
  };
}

function startExec() {
  view.setUint32(C.MB_AGENT_STATE_OFF, C.STATE_RUNNING, true);
  const req = readRequest();
  const exec = {
    seq: req.seq,
    status: C.STATUS_OK,
    exitCode: 0,
    terminated: false,
    flags: 0,
    stdoutLen: 0,
    stderrLen: 0,
    stdoutCap: req.stdoutCap,
    stderrCap: req.stderrCap,
    startNs: addon.nowNs(),
  };
  current = exec;
  if (req.language !== C.LANG_NODE || req.codeLen > C.MB_CODE_MAX) {
    exec.status = C.STATUS_BAD_REQUEST;
    capture(false, req.language !== C.LANG_NODE
      ? `kvmfork agent: unsupported language ${req.language} (this template runs node)\n`
      : `kvmfork agent: code is ${req.codeLen} bytes, the limit is ${C.MB_CODE_MAX}\n`);
    exec.terminated = true;
    return;
  }
  reseedMathRandom();
  opensslReseeded = false;
  process.exitCode = undefined;
  const code = bytes.toString('utf8', C.MB_CODE_OFF, C.MB_CODE_OFF + req.codeLen);
  let fn;
  try {
    // The head is on line 0 so the code's line numbers match its source.
    fn = new vm.Script(`${WRAPPER_HEAD}\n${code}${WRAPPER_TAIL}`, { filename: '[eval]', lineOffset: -1 })
      .runInThisContext();
  } catch (error) {
    uncaught(error); // SyntaxError
    return;
  }
  const evalModule = new Module(EVAL_FILENAME, null);
  evalModule.filename = EVAL_FILENAME;
  evalModule.paths = Module._nodeModulePaths(process.cwd());
  const evalRequire = Module.createRequire(EVAL_FILENAME);
  let promise;
  try {
    promise = fn.call(globalThis, evalModule.exports, evalRequire, evalModule, '[eval]', '.');
  } catch (error) {
    uncaught(error);
    return;
  }
  promise.then(undefined, (error) => {
    if (current === exec) uncaught(error);
  });
}

function finishExec() {
  const exec = current;
  current = null;
  liveTimers.clear();
  liveImmediates.clear();
  const exitCode = exec.status !== C.STATUS_OK ? 0 : exec.terminated ? exec.exitCode : normalizeExitCode(process.exitCode);
  const execNs = Math.max(0, Math.round(addon.nowNs() - exec.startNs));
  view.setUint32(C.MB_RESP_STATUS_OFF, exec.status, true);
  view.setInt32(C.MB_RESP_EXIT_CODE_OFF, exitCode, true);
  view.setUint32(C.MB_RESP_STDOUT_LEN_OFF, exec.stdoutLen, true);
  view.setUint32(C.MB_RESP_STDERR_LEN_OFF, exec.stderrLen, true);
  view.setUint32(C.MB_RESP_FLAGS_OFF, exec.flags, true);
  view.setBigUint64(C.MB_RESP_EXEC_NS_OFF, BigInt(execNs), true);
  // Last, so a response with the right seq is always complete.
  view.setBigUint64(C.MB_RESP_SEQ_OFF, exec.seq, true);
  view.setUint32(C.MB_AGENT_STATE_OFF, C.STATE_DONE, true);
  return {
    status: exec.status,
    exitCode,
    flags: exec.flags,
    stdout: bytes.toString('utf8', C.MB_STDOUT_OFF, C.MB_STDOUT_OFF + exec.stdoutLen),
    stderr: bytes.toString('utf8', C.MB_STDERR_OFF, C.MB_STDERR_OFF + exec.stderrLen),
  };
}

// Writes a request as the VMM would (warm-up and self-test).
let warmupSeq = 0n;
function putRequest(code) {
  const len = bytes.write(code, C.MB_CODE_OFF, C.MB_CODE_MAX, 'utf8');
  warmupSeq += 1n;
  view.setBigUint64(C.MB_REQ_SEQ_OFF, warmupSeq, true);
  view.setUint32(C.MB_REQ_LANGUAGE_OFF, C.LANG_NODE, true);
  view.setUint32(C.MB_REQ_TIMEOUT_MS_OFF, 30000, true);
  view.setUint32(C.MB_REQ_CODE_LEN_OFF, len, true);
  view.setUint32(C.MB_REQ_STDOUT_CAP_OFF, 65536, true);
  view.setUint32(C.MB_REQ_STDERR_CAP_OFF, 65536, true);
  for (let i = 0; i < C.MB_SEED_LEN; i++) bytes[C.MB_FORK_SEED_OFF + i] = (i * 37 + Number(warmupSeq)) & 0xff;
}

// ---- warm-up snippets (also the self-test) ---------------------------------

// Each runs through the real request path before the snapshot (so V8 has
// compiled and often optimised what short execs use) and is checked.
const ALLOC_LOOP = `const keep = [];
for (let i = 0; i < 400000; i++) { keep.push({ i, s: 'x' + (i & 7) }); if (keep.length > 2000) keep.length = 0; }
console.log(keep.length > 0);`;

const WARMUP = [
  { code: 'console.log(1+1)', stdout: '2\n' },
  { code: 'console.log([1,2,3,4,5].reduce((a,b)=>a+b)/5)', stdout: '3\n' },
  {
    code: `const o = { a: 1, b: [1, 2, { c: 'x' }], d: null, e: 'str' };
console.log(JSON.stringify(o)); console.log(JSON.parse('{"k":[1,2]}').k.length); console.log(o);
console.log('%s=%d', 'n', 42, [1, 2], new Map([[1, 2]]), new Set([3]));`,
    stdout: `{"a":1,"b":[1,2,{"c":"x"}],"d":null,"e":"str"}\n2\n{ a: 1, b: [ 1, 2, { c: 'x' } ], d: null, e: 'str' }\nn=42 [ 1, 2 ] Map(1) { 1 => 2 } Set(1) { 3 }\n`,
  },
  {
    code: `const a = []; for (let i = 0; i < 1000; i++) a.push(i * i);
console.log(a.filter(x => x % 2).map(x => x + 1).slice(0, 3).join(','), Math.max(...a), 'abc'.toUpperCase(), \`t\${1}\`,
  [3, 1, 2].sort((x, y) => x - y), Object.entries({ x: 1 }), [..."héllo"].reverse().join(''), (0.1 + 0.2).toFixed(2));`,
    stdout: "2,10,26 998001 ABC t1 [ 1, 2, 3 ] [ [ 'x', 1 ] ] olléh 0.30\n",
  },
  {
    code: `async function f(x) { await null; return x * 2; }
const sleep = ms => new Promise(r => setTimeout(r, ms));
await sleep(1); console.log(await f(21)); setTimeout(() => console.log('later'), 2); setImmediate(() => console.log('immediate'));`,
    stdout: '42\nimmediate\nlater\n',
  },
  { code: 'Promise.all([1, Promise.resolve(2)]).then(v => console.log(v.join("+")))', stdout: '1+2\n' },
  { code: "console.error('e'); process.stdout.write('w\\n'); process.exit(3); console.log('not reached')", stdout: 'w\n', stderr: 'e\n', exitCode: 3 },
  { code: 'process.exitCode = 4', exitCode: 4 },
  { code: 'const t = setInterval(() => {}, 1); setTimeout(() => process.exit(), 3)', exitCode: 0 },
  { code: "throw new Error('boom')", stderrIncludes: 'Error: boom\n    at [eval]:1:7', exitCode: 1 },
  { code: "setTimeout(() => { throw new TypeError('late') }, 1); setInterval(() => {}, 1000)", stderrIncludes: 'TypeError: late', exitCode: 1 },
  { code: "Promise.reject(new RangeError('rejected'))", stderrIncludes: 'RangeError: rejected', exitCode: 1 },
  { code: 'throw 42', stderr: 'Uncaught 42\n', exitCode: 1 },
  { code: 'let = ;', stderrIncludes: 'SyntaxError', exitCode: 1 },
  {
    code: "const { randomBytes, createHash } = require('crypto'); console.log(randomBytes(16).length, createHash('sha256').update('abc').digest('hex').slice(0, 8), Math.random() < 1)",
    stdout: '16 ba7816bf true\n',
  },
  { code: "const path = require('path'); const fs = require('fs'); fs.writeFileSync('/tmp/kvmfork-warm', 'ok'); console.log(fs.readFileSync('/tmp/kvmfork-warm', 'utf8'), path.join('a', 'b')); fs.unlinkSync('/tmp/kvmfork-warm')", stdout: 'ok a/b\n' },
  // Thread-pool work (async crypto, fs) keeps the loop alive without being
  // an "active resource"; the answer must wait for it.
  { code: "require('crypto').randomBytes(4, (e, b) => console.log(b.length))", stdout: '4\n' },
  { code: "require('fs').readFile('/etc/hosts', (e, d) => console.log(e === null))", stdout: 'true\n' },
  { code: ALLOC_LOOP, stdout: 'true\n' },
  { code: ALLOC_LOOP, stdout: 'true\n' },
  { code: "console.log('x'.repeat(70000).length); process.stdout.write('y'.repeat(70000))", stdout: '70000\n' + 'y'.repeat(65536 - 6), flags: 1 },
  { code: 'console.log(1+1)', stdout: '2\n' },
];

function check(snippet, result) {
  const problems = [];
  const want = (name, got, expected) => {
    if (got !== expected) problems.push(`${name}: got ${util.inspect(got)}, want ${util.inspect(expected)}`);
  };
  want('status', result.status, C.STATUS_OK);
  want('exit code', result.exitCode, snippet.exitCode ?? 0);
  if (snippet.stdout !== undefined || snippet.exitCode === undefined) want('stdout', result.stdout, snippet.stdout ?? '');
  if (snippet.stderr !== undefined) want('stderr', result.stderr, snippet.stderr);
  if (snippet.stderrIncludes !== undefined && !result.stderr.includes(snippet.stderrIncludes)) {
    problems.push(`stderr ${util.inspect(result.stderr)} lacks ${util.inspect(snippet.stderrIncludes)}`);
  }
  if (snippet.stderr === undefined && snippet.stderrIncludes === undefined) want('stderr', result.stderr, '');
  want('flags', result.flags, snippet.flags ?? 0);
  if (problems.length > 0) {
    return `warm-up snippet ${util.inspect(snippet.code.slice(0, 60))}: ${problems.join('; ')}`;
  }
  return null;
}

// ---- the cycle -------------------------------------------------------------

let warmupIndex = 0;
let readyRung = false;
const failures = [];

// A full GC without --expose-gc (which would leave gc() in user code's
// global scope): the flag is set late and gc() is taken from a throwaway
// context.
function fullGc() {
  require('v8').setFlagsFromString('--expose-gc');
  vm.runInNewContext('gc')();
}

function prepareTemplate() {
  fullGc(); // a compact heap; both semi-spaces were touched by the warm-up
  view.setBigUint64(C.MB_RESP_SEQ_OFF, 0n, true);
  view.setUint32(C.MB_RESP_STDOUT_LEN_OFF, 0, true);
  view.setUint32(C.MB_RESP_STDERR_LEN_OFF, 0, true);
  bytes.fill(0, C.MB_FORK_SEED_OFF, C.MB_FORK_SEED_OFF + C.MB_SEED_LEN);
  addon.tscEnd();
  view.setUint32(C.MB_AGENT_STATE_OFF, C.STATE_READY, true);
}

// Starts the next request (warm-up snippet, or the VMM's after a ring).
// Returns false when the agent is done (self-test finished).
function startNext() {
  if (warmupIndex < WARMUP.length) {
    putRequest(WARMUP[warmupIndex].code);
    startExec();
    return true;
  }
  if (!readyRung) {
    readyRung = true;
    if (failures.length > 0) fatal(failures.join('\n'));
    prepareTemplate();
    if (MODE !== 'serve') {
      log(`self-test passed: ${WARMUP.length} snippets`);
      process.exitCode = 0;
      fs.writeSync(1, 'KVMFORK-SELFTEST-OK\n');
      if (MODE === 'guest-selftest') addon.powerOff();
      return false;
    }
    log(`ready after ${process.uptime().toFixed(1)} s: ringing the doorbell`);
    // The snapshot is taken at this store; forks resume right after it
    // with their request in the mailbox.
    addon.ring(C.DOORBELL_READY);
  } else {
    addon.ring(C.DOORBELL_DONE);
  }
  startExec();
  return true;
}

function finishCurrent() {
  const result = finishExec();
  if (warmupIndex < WARMUP.length) {
    const problem = check(WARMUP[warmupIndex], result);
    if (problem !== null) failures.push(problem);
    warmupIndex += 1;
  }
}

function onLoopIdle() {
  for (;;) {
    if (current !== null) finishCurrent();
    if (!startNext()) return;
    // Run what the code queued (nextTicks, promise jobs, rejection
    // handling) now; if it left nothing for the event loop (libuv's own
    // test, as node's before 'beforeExit'), answer without another loop
    // turn.
    process._tickCallback();
    if (addon.loopAlive()) return;
  }
}

process.on('beforeExit', onLoopIdle);
addon.tscBegin();
log(`agent loaded (${MODE}); warming up with ${WARMUP.length} snippets`);
