// kvmfork guest agent for Node.js (PID 1 of the Node template, exec'ed by
// node_init.c as /usr/lib/kvmfork/agent.js).
//
// Boot: map the mailbox (kvmfork_mailbox.node), run every WARMUP snippet
// through the real request path and check its result (a mismatch is fatal:
// a broken template never reaches READY), full GC, ring READY. The snapshot
// is taken at that store; every fork resumes right after it with a request
// in the mailbox, runs it, writes the response and rings DONE.
//
// Exec semantics of a stateless request (no REQ_FLAG_SESSION) are `node -e`
// plus top-level await: the code is the body of an async function (exports,
// require, module, __filename, __dirname);
// console.* and process.stdout/stderr.write go straight into the mailbox's
// output areas; an uncaught exception or unhandled rejection prints its
// stack to stderr and gives exit code 1; process.exit(n) gives n (it throws
// a sentinel so PID 1 never exits); timers and promises settle before the
// answer (the VMM enforces the timeout).
//
// A session request (REQ_FLAG_SESSION) runs like a line of Node's REPL: the
// code is a script in the one global context, so top-level let/const/class
// (the global lexical scope) and var/function (the global object) declared
// by one exec are visible to the next; its completion value (the last
// expression statement's value), when not undefined, is reported as
// util.inspect(value) in the result area. Code with top-level await is
// rewritten the way the REPL does it (processTopLevelAwait below, ported
// from node's lib/internal/repl/await.js): declarations are hoisted into the
// script, the rest runs in an async arrow function whose last expression
// statement is returned, and the agent awaits it. Errors and process.exit(n)
// end the exec (stderr, exit code) and keep the session. Node has no
// interrupt entry (KVMFORK_MB_INTERRUPT_ENTRY_OFF stays 0): the VMM ends a
// timed-out Node session itself. Math.random and OpenSSL's DRBGs are
// reseeded from the fork seed on every stateless exec and on a session exec
// flagged REQ_FLAG_RESEED.
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
// The parser Node's REPL uses for top-level await; Debian ships it as files
// (node.sh copies them into the rootfs), node's own copy is internal.
const acorn = require('/usr/share/nodejs/acorn/dist/acorn.js');
const walk = require('/usr/share/nodejs/acorn-walk/dist/walk.js');
const REQ_FLAGS_KNOWN = C.REQ_FLAG_SESSION | C.REQ_FLAG_RESEED;

const MODE = process.argv.includes('--selftest')
  ? 'host-selftest'
  : process.env.KVMFORK_GUEST_SELFTEST === '1' ? 'guest-selftest' : 'serve';
const mailboxAddress = process.env.KVMFORK_MAILBOX_GPA;
const heapReserveMib = Number(process.env.KVMFORK_HEAP_RESERVE_MIB ?? C.NODE_HEAP_RESERVE_MIB);
delete process.env.KVMFORK_MAILBOX_GPA;
delete process.env.KVMFORK_GUEST_SELFTEST;
delete process.env.KVMFORK_HEAP_RESERVE_MIB;
// ArrayBuffer and Buffer memory from the never-trimmed brk heap, whose free
// reserve is populated before the snapshot (prepareTemplate).
addon.heapPolicy();

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
    return `${lines.filter((l) => !l.includes(AGENT_FRAME) && !l.includes('at process.emit (node:events') &&
      !l.includes('at Script.runInThisContext (node:vm:')).join('\n')}\n`;
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

// ---- session mode: top-level await the REPL's way ---------------------------

// Ported from node v18's lib/internal/repl/await.js (MIT, Node.js
// contributors), primordials replaced by plain calls. Returns the rewritten
// script, or null when the code has no top-level await (or cannot be
// parsed: V8 then reports the syntax error in its own words).
function isTopLevelDeclaration(state) {
  return state.ancestors[state.ancestors.length - 2] === state.body;
}

const noop = () => {};
const awaitVisitorsWithoutAncestors = {
  ClassDeclaration(node, state, c) {
    if (isTopLevelDeclaration(state)) {
      state.prepend(node, `${node.id.name}=`);
      state.hoistedDeclarationStatements.push(`let ${node.id.name}; `);
    }
    walk.base.ClassDeclaration(node, state, c);
  },
  ForOfStatement(node, state, c) {
    if (node.await === true) state.containsAwait = true;
    walk.base.ForOfStatement(node, state, c);
  },
  FunctionDeclaration(node, state) {
    state.prepend(node, `this.${node.id.name} = ${node.id.name}; `);
    state.hoistedDeclarationStatements.push(`var ${node.id.name}; `);
  },
  FunctionExpression: noop,
  ArrowFunctionExpression: noop,
  MethodDefinition: noop,
  AwaitExpression(node, state, c) {
    state.containsAwait = true;
    walk.base.AwaitExpression(node, state, c);
  },
  ReturnStatement(node, state, c) {
    state.containsReturn = true;
    walk.base.ReturnStatement(node, state, c);
  },
  VariableDeclaration(node, state, c) {
    const variableKind = node.kind;
    const isIterableForDeclaration = ['ForOfStatement', 'ForInStatement']
      .includes(state.ancestors[state.ancestors.length - 2].type);
    if (variableKind === 'var' || isTopLevelDeclaration(state)) {
      state.replace(
        node.start,
        node.start + variableKind.length + (isIterableForDeclaration ? 1 : 0),
        variableKind === 'var' && isIterableForDeclaration ? '' : 'void' + (node.declarations.length === 1 ? '' : ' ('),
      );
      if (!isIterableForDeclaration) {
        for (const decl of node.declarations) {
          state.prepend(decl, '(');
          state.append(decl, decl.init ? ')' : '=undefined)');
        }
        if (node.declarations.length !== 1) state.append(node.declarations[node.declarations.length - 1], ')');
      }
      const hoisted = { var: [], let: [] };
      const register = (id) => {
        switch (id.type) {
          case 'Identifier':
            hoisted[variableKind === 'var' ? 'var' : 'let'].push(id.name);
            break;
          case 'ObjectPattern':
            for (const property of id.properties) register(property.value);
            break;
          case 'ArrayPattern':
            for (const element of id.elements) register(element);
            break;
        }
      };
      for (const decl of node.declarations) register(decl.id);
      for (const kind of ['var', 'let']) {
        if (hoisted[kind].length > 0) state.hoistedDeclarationStatements.push(`${kind} ${hoisted[kind].join(', ')}; `);
      }
    }
    walk.base.VariableDeclaration(node, state, c);
  },
};

const awaitVisitors = {};
for (const nodeType of Object.keys(walk.base)) {
  const callback = awaitVisitorsWithoutAncestors[nodeType] || walk.base[nodeType];
  awaitVisitors[nodeType] = (node, state, c) => {
    const isNew = node !== state.ancestors[state.ancestors.length - 1];
    if (isNew) state.ancestors.push(node);
    callback(node, state, c);
    if (isNew) state.ancestors.pop();
  };
}

function processTopLevelAwait(src) {
  const wrapPrefix = '(async () => { ';
  const wrapped = `${wrapPrefix}${src} })()`;
  const wrappedArray = wrapped.split('');
  let root;
  try {
    root = acorn.Parser.parse(wrapped, { ecmaVersion: 'latest' });
  } catch {
    return null;
  }
  const body = root.body[0].expression.callee.body;
  const state = {
    body,
    ancestors: [],
    hoistedDeclarationStatements: [],
    replace(from, to, str) {
      for (let i = from; i < to; i++) wrappedArray[i] = '';
      if (from === to) str += wrappedArray[from];
      wrappedArray[from] = str;
    },
    prepend(node, str) {
      wrappedArray[node.start] = str + wrappedArray[node.start];
    },
    append(node, str) {
      wrappedArray[node.end - 1] += str;
    },
    containsAwait: false,
    containsReturn: false,
  };
  walk.recursive(body, state, awaitVisitors);
  // No await after all, or a top-level return (not allowed): leave it.
  if (!state.containsAwait || state.containsReturn) return null;
  for (let i = body.body.length - 1; i >= 0; i--) {
    const node = body.body[i];
    if (node.type === 'EmptyStatement') continue;
    if (node.type === 'ExpressionStatement') {
      // `{ value: ... }` so that an awaited value that is itself a promise
      // is reported, not awaited again.
      state.prepend(node.expression, '{ value: (');
      state.prepend(node, 'return ');
      state.append(node.expression, ') }');
    }
    break;
  }
  return state.hoistedDeclarationStatements.join('') + wrappedArray.join('');
}

// What a stateless exec gets as function parameters, a session has as
// globals (as in the REPL), created by its first exec.
const SESSION_GLOBALS = ['require', 'module', 'exports', '__filename', '__dirname'];
let sessionGlobalsReady = false;

function defineSessionGlobals() {
  if (sessionGlobalsReady) return;
  sessionGlobalsReady = true;
  const sessionModule = new Module(EVAL_FILENAME, null);
  sessionModule.filename = EVAL_FILENAME;
  sessionModule.paths = Module._nodeModulePaths(process.cwd());
  const values = {
    require: Module.createRequire(EVAL_FILENAME),
    module: sessionModule,
    exports: sessionModule.exports,
    __filename: '[eval]',
    __dirname: '.',
  };
  for (const name of SESSION_GLOBALS) {
    Object.defineProperty(globalThis, name, { configurable: true, writable: true, enumerable: false, value: values[name] });
  }
}

function runSession(exec, code) {
  defineSessionGlobals();
  let source = code;
  let awaited = false;
  if (code.includes('await')) {
    const rewritten = processTopLevelAwait(code);
    if (rewritten !== null) {
      source = rewritten;
      awaited = true;
    }
  }
  let value;
  try {
    value = new vm.Script(source, { filename: '[eval]' }).runInThisContext();
  } catch (error) {
    uncaught(error);
    return;
  }
  if (!awaited) {
    exec.result = value;
    return;
  }
  value.then((wrapper) => {
    if (current === exec && wrapper !== undefined) exec.result = wrapper.value;
  }, (error) => {
    if (current === exec) uncaught(error);
  });
}

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
    flags: view.getUint32(C.MB_REQ_FLAGS_OFF, true),
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
    result: undefined,
    startNs: addon.nowNs(),
  };
  current = exec;
  let refusal = null;
  if (req.language !== C.LANG_NODE) {
    refusal = `kvmfork agent: unsupported language ${req.language} (this template runs node)\n`;
  } else if (req.codeLen > C.MB_CODE_MAX) {
    refusal = `kvmfork agent: code is ${req.codeLen} bytes, the limit is ${C.MB_CODE_MAX}\n`;
  } else if ((req.flags & ~REQ_FLAGS_KNOWN) !== 0) {
    refusal = `kvmfork agent: unknown request flags 0x${req.flags.toString(16)} (this agent knows 0x${REQ_FLAGS_KNOWN.toString(16)})\n`;
  }
  if (refusal !== null) {
    exec.status = C.STATUS_BAD_REQUEST;
    capture(false, refusal);
    exec.terminated = true;
    return;
  }
  const session = (req.flags & C.REQ_FLAG_SESSION) !== 0;
  // The host sets RESEED on every stateless run; a stateless run without it
  // (an older host sends no flags) is reseeded all the same, so no fork is
  // ever left on the template's streams. A session exec only when flagged.
  if ((req.flags & C.REQ_FLAG_RESEED) !== 0 || !session) {
    reseedMathRandom();
    if (session) {
      // A session may hold crypto from an earlier exec (or from before a
      // fork) and use it without another require: reseed OpenSSL now.
      addon.reseed(forkSeed());
      opensslReseeded = true;
    } else {
      opensslReseeded = false;
    }
  }
  process.exitCode = undefined;
  const code = bytes.toString('utf8', C.MB_CODE_OFF, C.MB_CODE_OFF + req.codeLen);
  if (session) {
    runSession(exec, code);
    return;
  }
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
  // An exec that ended in an uncaught error or process.exit has no result.
  let resultLen = 0;
  if (exec.result !== undefined && !exec.terminated) {
    let text;
    try {
      text = util.inspect(exec.result);
    } catch (error) {
      text = null;
      capture(false, formatUncaught(error));
    }
    if (text !== null) {
      // Buffer#write stops at the last whole character that fits.
      resultLen = bytes.write(text, C.MB_RESULT_OFF, C.MB_RESULT_MAX, 'utf8');
      exec.flags |= C.RESP_FLAG_HAS_RESULT;
      if (Buffer.byteLength(text, 'utf8') > resultLen) exec.flags |= C.RESP_FLAG_RESULT_TRUNCATED;
    }
  }
  view.setUint32(C.MB_RESP_STATUS_OFF, exec.status, true);
  view.setInt32(C.MB_RESP_EXIT_CODE_OFF, exitCode, true);
  view.setUint32(C.MB_RESP_STDOUT_LEN_OFF, exec.stdoutLen, true);
  view.setUint32(C.MB_RESP_STDERR_LEN_OFF, exec.stderrLen, true);
  view.setUint32(C.MB_RESP_RESULT_LEN_OFF, resultLen, true);
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
    result: (exec.flags & C.RESP_FLAG_HAS_RESULT) !== 0
      ? bytes.toString('utf8', C.MB_RESULT_OFF, C.MB_RESULT_OFF + resultLen)
      : undefined,
    resultLen,
  };
}

// Writes a request as the VMM would (warm-up and self-test).
// seedSalt: which fork seed (default: a different one per request).
let warmupSeq = 0n;
function putRequest(code, flags, seedSalt) {
  const len = bytes.write(code, C.MB_CODE_OFF, C.MB_CODE_MAX, 'utf8');
  warmupSeq += 1n;
  view.setBigUint64(C.MB_REQ_SEQ_OFF, warmupSeq, true);
  view.setUint32(C.MB_REQ_LANGUAGE_OFF, C.LANG_NODE, true);
  view.setUint32(C.MB_REQ_FLAGS_OFF, flags, true);
  view.setUint32(C.MB_REQ_TIMEOUT_MS_OFF, 30000, true);
  view.setUint32(C.MB_REQ_CODE_LEN_OFF, len, true);
  view.setUint32(C.MB_REQ_STDOUT_CAP_OFF, 65536, true);
  view.setUint32(C.MB_REQ_STDERR_CAP_OFF, 65536, true);
  for (let i = 0; i < C.MB_SEED_LEN; i++) {
    bytes[C.MB_FORK_SEED_OFF + i] = (i * 37 + (seedSalt ?? Number(warmupSeq))) & 0xff;
  }
}

// ---- warm-up snippets (also the self-test) ---------------------------------

// Each runs through the real request path before the snapshot (so V8 has
// compiled and often optimised what short execs use) and is checked.
const ALLOC_LOOP = `const keep = [];
for (let i = 0; i < 400000; i++) { keep.push({ i, s: 'x' + (i & 7) }); if (keep.length > 2000) keep.length = 0; }
console.log(keep.length > 0);`;

const SESSION = C.REQ_FLAG_SESSION;
const RESEED = C.REQ_FLAG_RESEED;

// Request flags: `req` (default RESEED, as the host sends a stateless run);
// `seed`: a salt that picks the fork seed (default: one per request); expected `result` (undefined: none) and
// response `flags` (HAS_RESULT is implied by `result`).
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
  // Session mode through the same path. The template must hold no session
  // state, so these declare nothing in the global scope: they keep their
  // state in globalThis.kvmforkWarm, which prepareTemplate deletes.
  { req: SESSION | RESEED, code: 'kvmforkWarm = { n: 1 }', result: '{ n: 1 }' },
  { req: SESSION, code: 'kvmforkWarm.n += 1; kvmforkWarm.n * 10', result: '20' },
  { req: SESSION, code: "console.log(kvmforkWarm.n); [kvmforkWarm.n, 's', null, { deep: [1, 2] }]", stdout: '2\n', result: "[ 2, 's', null, { deep: [ 1, 2 ] } ]" },
  { req: SESSION, code: 'kvmforkWarm.v = await Promise.resolve(kvmforkWarm.n * 21); kvmforkWarm.v', result: '42' },
  { req: SESSION, code: "await new Promise((r) => setTimeout(r, 1)); setTimeout(() => console.log('timer', kvmforkWarm.v), 1); undefined", stdout: 'timer 42\n' },
  { req: SESSION, code: "kvmforkWarm.n = 5; throw new Error('kept')", stderrIncludes: 'Error: kept\n    at [eval]:1:', exitCode: 1 },
  { req: SESSION, code: 'kvmforkWarm.n', result: '5' },
  { req: SESSION, code: 'kvmforkWarm.n = 6; process.exit(4); kvmforkWarm.n = 7', exitCode: 4 },
  { req: SESSION, code: "await Promise.reject(new RangeError('rejected'))", stderrIncludes: 'RangeError: rejected', exitCode: 1 },
  { req: SESSION, code: 'let = ;', stderrIncludes: 'SyntaxError', exitCode: 1 },
  { req: SESSION, code: "kvmforkWarm.n === 6 && typeof require === 'function' && typeof module", result: "'object'" },
  { req: SESSION, code: "require('crypto').randomBytes(4).length", result: '4' },
  { req: SESSION, code: 'null', result: 'null' },
  { req: SESSION, code: 'undefined' },
];

// Only in the self-tests (the process ends afterwards): session cases that
// declare globals, which no template may carry.
const SESSION_SELFTEST = [
  { req: SESSION | RESEED, code: "let a = 1; const b = [a]; class K { get k() { return a; } } function f(n) { return n * 2; } var v = 'v'" },
  { req: SESSION, code: 'a += 1; f(a) + b.length + new K().k', result: '7' },
  { req: SESSION, code: 'const c = await Promise.resolve(a * 10); let [d, { e }] = [c + 1, { e: v }]; function g() { return c; } class L {}' },
  { req: SESSION, code: 'console.log(c, d, e, g(), typeof L); a', stdout: '20 21 v 20 function\n', result: '2' },
  { req: SESSION, code: 'let a = 5', stderrIncludes: "SyntaxError: Identifier 'a' has already been declared", exitCode: 1 },
  { req: SESSION, code: 'await 1; a', result: '2' },
  { req: SESSION, code: 'for await (const x of [Promise.resolve(3)]) last = x; last', result: '3' },
  { req: SESSION, code: 'Promise.resolve(1)', result: 'Promise { 1 }' },
  { req: SESSION, code: '(await Promise.resolve({ p: Promise.resolve(2) })).p', result: 'Promise { 2 }' },
  // RESEED decides Math.random: without it the stream goes on; with the
  // same fork seed it starts over; with another seed it differs.
  { req: SESSION | RESEED, seed: 0x33, code: 'r1 = Math.random(); typeof r1', result: "'number'" },
  { req: SESSION, seed: 0x33, code: 'Math.random() !== r1', result: 'true' },
  { req: SESSION | RESEED, seed: 0x33, code: 'Math.random() === r1', result: 'true' },
  { req: SESSION | RESEED, seed: 0x44, code: 'Math.random() !== r1', result: 'true' },
  { req: 0, seed: 0x33, code: 'console.log(Math.random() === r1)', stdout: 'true\n' },
  {
    req: SESSION,
    code: "Array(100).fill('é'.repeat(10000))",
    result: utf8Prefix(util.inspect(Array(100).fill('é'.repeat(10000))), C.MB_RESULT_MAX),
    flags: C.RESP_FLAG_RESULT_TRUNCATED,
  },
  { req: 0x80, code: '1', status: C.STATUS_BAD_REQUEST, stderrIncludes: 'unknown request flags 0x80' },
  { req: RESEED, code: '1 + 1' },
  { req: SESSION, code: 'a', result: '2' },
];

// The longest prefix of text that fits in max UTF-8 bytes, whole characters only.
function utf8Prefix(text, max) {
  const buffer = Buffer.alloc(max);
  return buffer.toString('utf8', 0, buffer.write(text, 0, max, 'utf8'));
}

const SNIPPETS = MODE === 'serve' ? WARMUP : [...WARMUP, ...SESSION_SELFTEST];

function check(snippet, result) {
  const problems = [];
  const want = (name, got, expected) => {
    if (got !== expected) problems.push(`${name}: got ${util.inspect(got)}, want ${util.inspect(expected)}`);
  };
  want('status', result.status, snippet.status ?? C.STATUS_OK);
  want('exit code', result.exitCode, snippet.exitCode ?? 0);
  if (snippet.stdout !== undefined || snippet.exitCode === undefined) want('stdout', result.stdout, snippet.stdout ?? '');
  if (snippet.stderr !== undefined) want('stderr', result.stderr, snippet.stderr);
  if (snippet.stderrIncludes !== undefined && !result.stderr.includes(snippet.stderrIncludes)) {
    problems.push(`stderr ${util.inspect(result.stderr)} lacks ${util.inspect(snippet.stderrIncludes)}`);
  }
  if (snippet.stderr === undefined && snippet.stderrIncludes === undefined) want('stderr', result.stderr, '');
  want('flags', result.flags, (snippet.flags ?? 0) | (snippet.result !== undefined ? C.RESP_FLAG_HAS_RESULT : 0));
  want('result', result.result, snippet.result);
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
  // No session state in the template: every VM's session starts clean.
  delete globalThis.kvmforkWarm;
  for (const name of SESSION_GLOBALS) delete globalThis[name];
  sessionGlobalsReady = false;
  fullGc(); // a compact heap; both semi-spaces were touched by the warm-up
  // PID 1 is the guest's init: only there may the addon set kernel knobs.
  const heap = addon.prefaultHeap(heapReserveMib, process.pid === 1);
  log(`pre-faulted ${heapReserveMib} MiB heap + 2 MiB stack in ${heap.seconds.toFixed(3)} s ` +
      `(${heap.pageFaults} page faults, ${heap.anonHugeMib} MiB in huge pages, ${heap.freeMib} MiB free` +
      `${process.pid === 1 && !heap.hugePages ? '; kernel without transparent huge pages' : ''})`);
  view.setBigUint64(C.MB_RESP_SEQ_OFF, 0n, true);
  view.setUint32(C.MB_RESP_STDOUT_LEN_OFF, 0, true);
  view.setUint32(C.MB_RESP_STDERR_LEN_OFF, 0, true);
  view.setUint32(C.MB_RESP_RESULT_LEN_OFF, 0, true);
  view.setUint32(C.MB_RESP_FLAGS_OFF, 0, true);
  bytes.fill(0, C.MB_FORK_SEED_OFF, C.MB_FORK_SEED_OFF + C.MB_SEED_LEN);
  addon.tscEnd();
  view.setUint32(C.MB_AGENT_STATE_OFF, C.STATE_READY, true);
}

// Starts the next request (warm-up snippet, or the VMM's after a ring).
// Returns false when the agent is done (self-test finished).
function startNext() {
  if (warmupIndex < SNIPPETS.length) {
    const snippet = SNIPPETS[warmupIndex];
    putRequest(snippet.code, snippet.req ?? RESEED, snippet.seed);
    startExec();
    return true;
  }
  if (!readyRung) {
    readyRung = true;
    if (failures.length > 0) fatal(failures.join('\n'));
    prepareTemplate();
    if (MODE !== 'serve') {
      log(`self-test passed: ${SNIPPETS.length} snippets`);
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
  if (warmupIndex < SNIPPETS.length) {
    const problem = check(SNIPPETS[warmupIndex], result);
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
log(`agent loaded (${MODE}); warming up with ${SNIPPETS.length} snippets`);
