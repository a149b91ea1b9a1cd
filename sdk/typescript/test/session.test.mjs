// Live sandbox (session) API against a scripted local HTTP server: wire format
// of every route, error mapping, retry policy, disposal. No kvmfork server needed.
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, test } from "node:test";

import {
  APIError, BadRequest, Checkpoint, CheckpointNotFound, ExecError, LiveSandbox, NetworkError, PartialFailure, ProtocolError,
  QuotaExceeded, RateLimitError, Sandbox, SandboxEnded, SandboxExpired, SandboxList, SandboxNotFound, SandboxTimeout,
  ServerBusy,
} from "../dist/esm/index.js";
import { errorReply, execAnswer, fakeServer, recordingOptions, sandboxAnswer, sessionExecAnswer } from "./helpers.mjs";

delete process.env.KVMFORK_API_KEY;
delete process.env.ZEROBOOT_API_KEY;

const SBX = "sbx_n0_0_0_1";
const CKPT = "ckpt_n0_0_0_9";
const DELETED = { status: 204 };

let fake;
before(async () => { fake = await fakeServer(); });
after(async () => { await fake.close(); });
beforeEach(() => { fake.requests.length = 0; fake.script(); });

function client(extra) {
  const { slept, options } = recordingOptions(fake, extra);
  return { sb: new Sandbox(options), slept };
}

async function started(fields = {}) {
  const { sb: c, slept } = client();
  fake.script({ status: 201, json: sandboxAnswer(SBX, fields) });
  const sb = await c.createSandbox();
  fake.requests.length = 0;
  return { c, sb, slept };
}

const calls = () => fake.requests.map((r) => [r.method, r.path]);

describe("create, get, list", () => {
  test("createSandbox sends the documented request", async () => {
    fake.script({ status: 201, json: sandboxAnswer(SBX, { metadata: { task: "t1" } }) });
    const sb = await client().sb.createSandbox({ language: "python", ttlSeconds: 60, metadata: { task: "t1" } });
    assert.deepEqual(calls(), [["POST", "/v1/sandboxes"]]);
    assert.deepEqual(fake.requests[0].json(), { language: "python", ttl_seconds: 60, metadata: { task: "t1" } });
    assert.ok(sb instanceof LiveSandbox);
    assert.deepEqual([sb.sandboxId, sb.id, sb.language, sb.template], [SBX, SBX, "python", "python-0123"]);
    assert.deepEqual(sb.metadata, { task: "t1" });
    assert.equal(sb.expiresAt, 1764620300.5);
    assert.equal(sb.createdAt, 1764620000.5);
    assert.equal(sb.executionCount, 0);
    assert.equal(sb.closed, false);
    assert.equal(sb.lastInfo.fork_time_ms, 0.3);
  });

  test("defaults are left to the server", async () => {
    fake.script({ status: 201, json: sandboxAnswer() });
    await client().sb.createSandbox();
    assert.deepEqual(fake.requests[0].json(), {});
  });

  test("from a checkpoint object or id", async () => {
    fake.script({ status: 201, json: sandboxAnswer() });
    const { sb: c } = client();
    const ckpt = new Checkpoint(c, CKPT, 4096, 1, "sbx_other");
    await c.createSandbox({ fromCheckpoint: ckpt, ttlSeconds: 30 });
    await c.createSandbox({ fromCheckpoint: CKPT });
    await ckpt.createSandbox({ ttlSeconds: 5 });
    assert.deepEqual(fake.requests.map((r) => r.json()), [
      { from_checkpoint: CKPT, ttl_seconds: 30 }, { from_checkpoint: CKPT }, { from_checkpoint: CKPT, ttl_seconds: 5 },
    ]);
  });

  test("from a missing checkpoint -> CheckpointNotFound", async () => {
    fake.script(errorReply(404, "checkpoint_not_found", "no checkpoint"));
    const error = await client().sb.createSandbox({ fromCheckpoint: CKPT }).catch((e) => e);
    assert.ok(error instanceof CheckpointNotFound, `${error}`);
    assert.equal(error.checkpointId, CKPT);
    assert.equal(error.status, 404);
  });

  test("createSandboxes returns each", async () => {
    fake.script({ status: 201, json: { sandboxes: [sandboxAnswer("sbx_a"), sandboxAnswer("sbx_b")] } });
    const group = await client().sb.createSandboxes(2, { ttlSeconds: 10 });
    assert.deepEqual(fake.requests[0].json(), { ttl_seconds: 10, count: 2 });
    assert.ok(group instanceof SandboxList && Array.isArray(group));
    assert.deepEqual(group.map((s) => s.sandboxId), ["sbx_a", "sbx_b"]);
    assert.deepEqual(group.errors, []);
  });

  test("createSandboxes partial failure deletes the started ones", async () => {
    fake.script(
      { status: 201, json: { sandboxes: [sandboxAnswer("sbx_a"), { error: { code: "too_many_sandboxes", message: "key holds 100" } }] } },
      DELETED,
    );
    const error = await client().sb.createSandboxes(2).catch((e) => e);
    assert.ok(error instanceof PartialFailure, `${error}`);
    assert.equal(error.errors.length, 1);
    assert.equal(error.errors[0].index, 1);
    assert.ok(error.errors[0].error instanceof QuotaExceeded);
    assert.match(error.errors[0].error.message, /key holds 100/);
    assert.equal(error.code, "too_many_sandboxes");
    assert.equal(error.status, 429);
    assert.deepEqual(calls().slice(1), [["DELETE", "/v1/sandboxes/sbx_a"]]);
  });

  test("createSandboxes of one reads the single answer", async () => {
    fake.script({ status: 201, json: sandboxAnswer() });
    const group = await client().sb.createSandboxes(1, { ttlSeconds: 10 });
    assert.deepEqual(fake.requests[0].json(), { ttl_seconds: 10 });
    assert.deepEqual(group.map((s) => s.sandboxId), [SBX]);
    assert.deepEqual(group.errors, []);
  });

  test("createSandboxes validates count", async () => {
    await assert.rejects(client().sb.createSandboxes(0), RangeError);
    assert.equal(fake.requests.length, 0);
  });

  test("getSandbox and quoting of ids", async () => {
    fake.script({ json: sandboxAnswer(SBX, { execution_count: 4, memory_bytes: 8192 }) });
    const sb = await client().sb.getSandbox(SBX);
    assert.deepEqual(calls(), [["GET", `/v1/sandboxes/${SBX}`]]);
    assert.equal(sb.executionCount, 4);
    assert.equal(sb.lastInfo.memory_bytes, 8192);
    fake.script(errorReply(404, "sandbox_not_found"));
    await assert.rejects(client().sb.getSandbox("a/../b?c"), SandboxNotFound);
    assert.equal(fake.requests[1].path, "/v1/sandboxes/a%2F..%2Fb%3Fc");
  });

  test("listSandboxes", async () => {
    fake.script({ json: { sandboxes: [sandboxAnswer("sbx_a"), sandboxAnswer("sbx_b")] } });
    const listed = await client().sb.listSandboxes();
    assert.deepEqual(calls(), [["GET", "/v1/sandboxes"]]);
    assert.deepEqual(listed.map((s) => s.sandboxId), ["sbx_a", "sbx_b"]);
    fake.script({ json: { sandboxes: null } });
    await assert.rejects(client().sb.listSandboxes(), ProtocolError);
  });

  for (const [name, broken] of [
    ["no sandbox_id", { language: "python" }],
    ["expires_at not a number", sandboxAnswer(SBX, { expires_at: "later" })],
    ["metadata not an object", sandboxAnswer(SBX, { metadata: [1] })],
  ]) {
    test(`a malformed description is a protocol error (${name})`, async () => {
      fake.script({ status: 201, json: broken });
      await assert.rejects(client().sb.createSandbox(), ProtocolError);
    });
  }
});

describe("runCode", () => {
  test("sends code and reads result and count", async () => {
    const { sb } = await started();
    fake.script({ json: sessionExecAnswer("", { result: "2", executionCount: 2 }) });
    const r = await sb.runCode("x + 1");
    assert.deepEqual(calls(), [["POST", `/v1/sandboxes/${SBX}/exec`]]);
    assert.deepEqual(fake.requests[0].json(), { code: "x + 1" });
    assert.equal(r.result, "2");
    assert.equal(r.result_truncated, false);
    assert.deepEqual([r.execution_count, r.sandbox_id, r.exit_code], [2, SBX, 0]);
    assert.equal(sb.executionCount, 2);
  });

  test("timeout and language are sent; a number is the timeout", async () => {
    const { sb } = await started();
    fake.script({ json: sessionExecAnswer() });
    await sb.runCode("pass", { timeout: 3.5, language: "python" });
    await sb.runCode("pass", 2);
    assert.deepEqual(fake.requests.map((r) => r.json()), [
      { code: "pass", language: "python", timeout_seconds: 3.5 }, { code: "pass", timeout_seconds: 2 },
    ]);
  });

  test("null, truncated and malformed results", async () => {
    const { sb } = await started();
    fake.script({ json: sessionExecAnswer() });
    assert.equal((await sb.runCode("x = 1")).result, null);
    fake.script({ json: { ...sessionExecAnswer(), result: { text: "'aaaa", truncated: true } } });
    const r = await sb.runCode("'a' * 10**7");
    assert.deepEqual([r.result, r.result_truncated], ["'aaaa", true]);
    fake.script({ json: { ...sessionExecAnswer(), result: "2" } });
    await assert.rejects(sb.runCode("1 + 1"), ProtocolError);
  });

  test("run throws like the stateless run", async () => {
    const { sb } = await started();
    fake.script({ json: sessionExecAnswer("", { stderr: "ZeroDivisionError: division by zero\n", exit_code: 1 }) });
    await assert.rejects(sb.run("1/0"), (e) => e instanceof ExecError && /ZeroDivisionError/.test(e.message));
    fake.script({ json: sessionExecAnswer("", { exit_code: -1, timed_out: true, error: { code: "timeout", message: "stopped" } }) });
    await assert.rejects(sb.run("while True: pass", 1), SandboxTimeout);
    fake.script({ json: sessionExecAnswer("hi\n\n") });
    assert.equal(await sb.run("print('hi')"), "hi");
  });
});

describe("fork", () => {
  test("returns children in order", async () => {
    const { c, sb } = await started();
    fake.script({ status: 201, json: { source_id: SBX, pause_ms: 0.9, forks: [sandboxAnswer("sbx_c1"), sandboxAnswer("sbx_c2")] } });
    const children = await sb.fork(2, { ttlSeconds: 60 });
    assert.deepEqual(calls(), [["POST", `/v1/sandboxes/${SBX}/fork`]]);
    assert.deepEqual(fake.requests[0].json(), { count: 2, ttl_seconds: 60 });
    const [a, b] = children;
    assert.deepEqual([a.sandboxId, b.sandboxId], ["sbx_c1", "sbx_c2"]);
    assert.deepEqual([children.pauseMs, children.sourceId, children.errors], [0.9, SBX, []]);
    assert.equal(a.client, c);
  });

  test("the default is one child", async () => {
    const { sb } = await started();
    fake.script({ status: 201, json: { source_id: SBX, pause_ms: 0.5, forks: [sandboxAnswer("sbx_c1")] } });
    const [child] = await sb.fork();
    assert.deepEqual(fake.requests[0].json(), { count: 1 });
    assert.equal(child.sandboxId, "sbx_c1");
  });

  test("partial failure deletes the started children and names each failure", async () => {
    const { sb } = await started();
    fake.script(
      { status: 201, json: { source_id: SBX, pause_ms: 1, forks: [
        sandboxAnswer("sbx_c1"),
        { error: { code: "too_many_sandboxes", message: "this key holds 100 sandboxes" } },
        { error: { code: "server_sandbox_limit", message: "server full" } },
      ] } },
      DELETED,
    );
    const error = await sb.fork(3).catch((e) => e);
    assert.ok(error instanceof PartialFailure, `${error}`);
    assert.deepEqual(error.errors.map((f) => f.index), [1, 2]);
    assert.ok(error.errors.every((f) => f.error instanceof QuotaExceeded && f.error instanceof RateLimitError));
    assert.deepEqual(error.errors.map((f) => f.error.code), ["too_many_sandboxes", "server_sandbox_limit"]);
    assert.match(error.message, /2 of 3/);
    assert.deepEqual(calls().slice(1), [["DELETE", "/v1/sandboxes/sbx_c1"]]);
  });

  test("allowPartial keeps the started children", async () => {
    const { sb } = await started();
    fake.script({ status: 201, json: { source_id: SBX, pause_ms: 1, forks: [{ error: { code: "fork_failed", message: "no memory" } }, sandboxAnswer("sbx_c2")] } });
    const children = await sb.fork(2, { allowPartial: true });
    assert.deepEqual(children.map((c) => c.sandboxId), ["sbx_c2"]);
    assert.equal(children.errors.length, 1);
    assert.equal(children.errors[0].index, 0);
    assert.equal(children.errors[0].error.code, "fork_failed");
    assert.equal(children.errors[0].error.status, 500);
    assert.equal(fake.requests.length, 1);
  });

  test("n is validated", async () => {
    const { sb } = await started();
    for (const bad of [0, -1, 1.5]) await assert.rejects(sb.fork(bad), RangeError);
    assert.equal(fake.requests.length, 0);
  });
});

describe("checkpoints", () => {
  test("checkpoint, restore and delete", async () => {
    const { sb } = await started();
    fake.script({ status: 201, json: { checkpoint_id: CKPT, dirty_bytes: 1 << 20, pause_ms: 2.5 } });
    const ckpt = await sb.checkpoint();
    assert.deepEqual(calls(), [["POST", `/v1/sandboxes/${SBX}/checkpoints`]]);
    assert.deepEqual([ckpt.checkpointId, ckpt.id, ckpt.dirtyBytes, ckpt.pauseMs, ckpt.sandboxId], [CKPT, CKPT, 1 << 20, 2.5, SBX]);
    fake.script({ json: sandboxAnswer(SBX, { execution_count: 1, restore_ms: 3.25 }) });
    const info = await sb.restore(ckpt);
    assert.equal(fake.requests[1].path, `/v1/sandboxes/${SBX}/restore`);
    assert.deepEqual(fake.requests[1].json(), { checkpoint_id: CKPT });
    assert.equal(info.restore_ms, 3.25);
    assert.equal(sb.executionCount, 1);
    await sb.restore(CKPT);
    assert.deepEqual(fake.requests[2].json(), { checkpoint_id: CKPT });
    fake.script(DELETED);
    await ckpt.delete();
    assert.deepEqual(calls()[3], ["DELETE", `/v1/checkpoints/${CKPT}`]);
    assert.equal(await ckpt.close(), false, "already deleted: no request");
    assert.equal(fake.requests.length, 4);
  });

  test("restore from a missing checkpoint -> CheckpointNotFound, not SandboxNotFound", async () => {
    const { sb } = await started();
    fake.script(errorReply(404, "checkpoint_not_found"));
    const error = await sb.restore(CKPT).catch((e) => e);
    assert.ok(error instanceof CheckpointNotFound && !(error instanceof SandboxNotFound), `${error}`);
    assert.equal(error.checkpointId, CKPT);
  });

  test("Symbol.asyncDispose deletes a checkpoint and tolerates it being gone", async () => {
    const { sb: c } = client();
    fake.script(DELETED);
    await new Checkpoint(c, CKPT, 0, 0, SBX)[Symbol.asyncDispose]();
    fake.script(errorReply(404, "checkpoint_not_found"));
    await new Checkpoint(c, CKPT, 0, 0, SBX)[Symbol.asyncDispose]();
    assert.deepEqual(calls(), [["DELETE", `/v1/checkpoints/${CKPT}`], ["DELETE", `/v1/checkpoints/${CKPT}`]]);
  });

  test("deleteCheckpoint by id", async () => {
    fake.script(errorReply(404, "checkpoint_not_found"));
    await assert.rejects(client().sb.deleteCheckpoint(CKPT), CheckpointNotFound);
    assert.deepEqual(calls(), [["DELETE", `/v1/checkpoints/${CKPT}`]]);
  });

  test("the checkpoint budget is a quota and not retried", async () => {
    const { sb, slept } = await started();
    fake.script(errorReply(429, "checkpoint_budget_exceeded", "over 1 GiB"));
    const error = await sb.checkpoint().catch((e) => e);
    assert.ok(error instanceof QuotaExceeded, `${error}`);
    assert.equal(error.retryAfter, undefined);
    assert.equal(fake.requests.length, 1);
    assert.deepEqual(slept, []);
  });
});

describe("timeout, info, delete, disposal", () => {
  test("setTimeout and info", async () => {
    const { sb } = await started();
    fake.script({ json: sandboxAnswer(SBX, { expires_at: 1764629999 }) });
    const info = await sb.setTimeout(900);
    assert.deepEqual(calls(), [["POST", `/v1/sandboxes/${SBX}/timeout`]]);
    assert.deepEqual(fake.requests[0].json(), { ttl_seconds: 900 });
    assert.equal(info.expires_at, 1764629999);
    assert.equal(sb.expiresAt, 1764629999);
    fake.script({ json: sandboxAnswer(SBX, { execution_count: 7 }) });
    assert.equal((await sb.info()).execution_count, 7);
    assert.equal(sb.executionCount, 7);
    assert.deepEqual(calls()[1], ["GET", `/v1/sandboxes/${SBX}`]);
    assert.equal(await sb.isRunning(), true);
    fake.script(errorReply(404, "sandbox_expired"));
    assert.equal(await sb.isRunning(), false);
  });

  test("delete, then close is a no-op", async () => {
    const { sb } = await started();
    fake.script(DELETED);
    await sb.delete();
    assert.deepEqual(calls(), [["DELETE", `/v1/sandboxes/${SBX}`]]);
    assert.equal(sb.closed, true);
    assert.equal(await sb.close(), false);
    assert.equal(fake.requests.length, 1);
  });

  test("delete of a gone sandbox rejects, close resolves false", async () => {
    const { sb } = await started();
    fake.script(errorReply(404, "sandbox_not_found"));
    await assert.rejects(sb.delete(), SandboxNotFound);
    assert.equal(sb.closed, false);
    assert.equal(await sb.close(), false);
    assert.equal(sb.closed, true);
    const other = (await started()).sb;
    fake.script(DELETED);
    assert.equal(await other.kill(), true);
  });

  test("Symbol.asyncDispose (await using) deletes the sandbox, quietly when it expired", async () => {
    const { sb } = await started();
    assert.equal(typeof sb[Symbol.asyncDispose], "function");
    fake.script(DELETED);
    await sb[Symbol.asyncDispose]();
    assert.deepEqual(calls(), [["DELETE", `/v1/sandboxes/${SBX}`]]);
    assert.equal(sb.closed, true);
    const expired = (await started()).sb;
    fake.script(errorReply(404, "sandbox_expired"));
    await expired[Symbol.asyncDispose]();
    assert.equal(expired.closed, true);
    const failing = (await started()).sb;
    fake.script(errorReply(500, "internal"));
    await assert.rejects(failing[Symbol.asyncDispose](), (e) => e instanceof APIError && e.status === 500);
  });
});

describe("errors and retries", () => {
  for (const [code, cls, reason] of [
    ["sandbox_not_found", SandboxNotFound, "not_found"],
    ["sandbox_expired", SandboxExpired, "expired"],
    ["sandbox_ended", SandboxEnded, "ended"],
  ]) {
    test(`${code} -> ${cls.name} from every operation`, async () => {
      const { sb, slept } = await started();
      fake.script(errorReply(404, code, "the sandbox is gone: details"));
      for (const call of [() => sb.runCode("x"), () => sb.fork(), () => sb.checkpoint(), () => sb.setTimeout(5), () => sb.info(), () => sb.runBatch(["x"])]) {
        const error = await call().catch((e) => e);
        assert.ok(error instanceof SandboxNotFound, `${error}`);
        assert.equal(error.constructor, cls);
        assert.deepEqual([error.status, error.code, error.reason, error.sandboxId], [404, code, reason, SBX]);
        assert.match(error.message, /details/);
      }
      assert.deepEqual(slept, []);
    });
  }

  test("a plain 404 is not a sandbox error", async () => {
    const { sb } = await started();
    fake.script(errorReply(404, "not_found", "no such path"));
    const error = await sb.runCode("x").catch((e) => e);
    assert.ok(error instanceof APIError && !(error instanceof SandboxNotFound), `${error}`);
  });

  for (const code of ["too_many_sandboxes", "server_sandbox_limit"]) {
    test(`${code} is thrown at once`, async () => {
      const { sb: c, slept } = client();
      fake.script(errorReply(429, code));
      const error = await c.createSandbox().catch((e) => e);
      assert.ok(error instanceof QuotaExceeded && error instanceof RateLimitError, `${error}`);
      assert.equal(error.code, code);
      assert.equal(fake.requests.length, 1);
      assert.deepEqual(slept, []);
    });
  }

  test("a quota with Retry-After is retried", async () => {
    const { sb: c, slept } = client();
    fake.script(errorReply(429, "too_many_sandboxes", "full", { "Retry-After": "2" }), { status: 201, json: sandboxAnswer() });
    assert.equal((await c.createSandbox()).sandboxId, SBX);
    assert.deepEqual(slept, [2]);
    assert.equal(fake.requests.length, 2);
  });

  test("rate_limited and sandbox_busy are retried", async () => {
    const { sb, slept } = await started();
    fake.script(
      errorReply(429, "rate_limited", "slow down", { "Retry-After": "1" }),
      errorReply(503, "sandbox_busy", "busy", { "Retry-After": "1" }),
      { json: sessionExecAnswer("ok\n") },
    );
    assert.equal(await sb.run("print('ok')"), "ok");
    assert.deepEqual(slept, [1, 1]);
  });

  test("sandbox_busy after retries is ServerBusy", async () => {
    const { sb } = await started();
    fake.script(errorReply(503, "sandbox_busy", "busy", { "Retry-After": "1" }));
    const error = await sb.runCode("x").catch((e) => e);
    assert.ok(error instanceof ServerBusy && error.code === "sandbox_busy", `${error}`);
    assert.equal(fake.requests.length, 4);
  });

  for (const code of ["invalid_ttl", "language_mismatch", "invalid_metadata"]) {
    test(`${code} is a BadRequest`, async () => {
      fake.script(errorReply(400, code));
      await assert.rejects(client().sb.createSandbox({ ttlSeconds: 0 }), (e) => e instanceof BadRequest && e.code === code);
    });
  }
});

describe("batch from a sandbox", () => {
  test("sends from_sandbox and per-item options", async () => {
    const { sb } = await started();
    fake.script({ json: { results: [execAnswer("0\n"), execAnswer("1\n")] } });
    const results = await sb.runBatch(["print(x)", { code: "print(y)", timeout: 2, language: "python" }], { timeout: 5 });
    assert.deepEqual(calls(), [["POST", "/v1/exec/batch"]]);
    assert.deepEqual(fake.requests[0].json(), { from_sandbox: SBX, executions: [
      { code: "print(x)", timeout_seconds: 5 }, { code: "print(y)", language: "python", timeout_seconds: 2 },
    ] });
    assert.deepEqual(results.map((r) => r.stdout), ["0\n", "1\n"]);
  });

  test("checks the answer", async () => {
    const { sb } = await started();
    assert.deepEqual(await sb.runBatch([]), []);
    assert.equal(fake.requests.length, 0);
    fake.script({ json: { results: [execAnswer()] } });
    await assert.rejects(sb.runBatch(["a", "b"]), ProtocolError);
    await assert.rejects(sb.runBatch([{ language: "python" }]), TypeError);
  });
});

describe("LiveSandbox.create / connect", () => {
  test("without a client makes one from the options", async () => {
    fake.script({ status: 201, json: sandboxAnswer() });
    const sb = await LiveSandbox.create({ baseUrl: fake.url, apiKey: "k-own", language: "python", ttlSeconds: 30 });
    assert.equal(fake.requests[0].headers.authorization, "Bearer k-own");
    assert.deepEqual(fake.requests[0].json(), { language: "python", ttl_seconds: 30 });
    assert.equal(sb.client.baseUrl, fake.url);
    fake.script({ json: sandboxAnswer() });
    const again = await LiveSandbox.connect(SBX, { client: sb.client });
    assert.equal(again.sandboxId, SBX);
    assert.deepEqual(calls()[1], ["GET", `/v1/sandboxes/${SBX}`]);
  });

  test("an unreachable server is a NetworkError", async () => {
    await assert.rejects(LiveSandbox.create({ baseUrl: "http://127.0.0.1:9", maxRetries: 0 }), NetworkError);
  });
});
