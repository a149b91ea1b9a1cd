// The SDK against a live kvmfork server (KVMFORK_URL; KVMFORK_TEST_API_KEY when auth is on).
// These fail, never skip, when KVMFORK_URL is unset.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { AuthError, BadRequest, ExecError, NetworkError, Sandbox, SandboxTimeout, isOk } from "../dist/esm/index.js";
import { liveKey, liveUrl } from "./helpers.mjs";

const sandbox = () => new Sandbox(liveKey(), liveUrl());

test("print(1 + 1) -> '2'", async () => {
  assert.equal(await sandbox().run("print(1 + 1)"), "2");
});

test("numpy mean", async () => {
  assert.equal(await sandbox().run("import numpy as np; print(np.mean([1, 2, 3, 4]))"), "2.5");
});

test("ten concurrent runs", async () => {
  const sb = sandbox();
  const results = await Promise.all(Array.from({ length: 10 }, (_, i) => sb.exec(`print(${i} * ${i})`)));
  assert.deepEqual(results.map((r) => r.stdout), Array.from({ length: 10 }, (_, i) => `${i * i}\n`));
  assert.equal(new Set(results.map((r) => r.id)).size, 10, "every run must be its own sandbox");
});

test("an exception rejects with ExecError carrying the traceback", async () => {
  const error = await sandbox().run("def f():\n    raise ValueError('boom')\nf()").catch((e) => e);
  assert.ok(error instanceof ExecError, `${error}`);
  assert.equal(error.exitCode, 1);
  assert.match(error.stderr, /Traceback \(most recent call last\)/);
  assert.match(error.stderr, /ValueError: boom/);
});

test("sys.exit(3)", async () => {
  const result = await sandbox().exec("import sys; print('before'); sys.exit(3)");
  assert.equal(result.exit_code, 3);
  assert.equal(result.stdout, "before\n");
  assert.ok(!isOk(result));
  await assert.rejects(sandbox().run("import sys; sys.exit(3)"), (e) => e instanceof ExecError && e.exitCode === 3);
});

test("a timeout", async () => {
  const error = await sandbox().run("while True: pass", { timeout: 2 }).catch((e) => e);
  assert.ok(error instanceof SandboxTimeout, `${error}`);
  assert.equal(error.result.timed_out, true);
  assert.equal(error.result.exit_code, -1);
});

test("stdout and stderr are separate", async () => {
  const r = await sandbox().exec("import sys; print('out'); print('err', file=sys.stderr)");
  assert.deepEqual([r.stdout, r.stderr, r.exit_code], ["out\n", "err\n", 0]);
});

test("unicode round trip", async () => {
  const text = "héllo wörld ✓ 日本 🚀";
  assert.equal(await sandbox().run(`print(${JSON.stringify(text)})`), text);
});

test("result fields", async () => {
  const r = await sandbox().exec("print('x')");
  assert.ok(r.id);
  assert.equal(r.output, r.stdout);
  assert.equal(r.duration_ms, r.total_time_ms);
  assert.ok(r.fork_time_ms >= 0 && r.exec_time_ms >= 0 && r.total_time_ms >= r.exec_time_ms);
  assert.deepEqual([r.timed_out, r.stdout_truncated, r.stderr_truncated, r.error], [false, false, false, null]);
});

test("every run starts from the clean template", async () => {
  const sb = sandbox();
  const path = `/tmp/kvmfork-sdk-${randomUUID()}`;
  const dirty = `import builtins\nbuiltins.kvmfork_sdk_marker = 1\ntry:\n    open(${JSON.stringify(path)}, 'w').write('x')\nexcept OSError:\n    pass\nprint('dirtied')`;
  assert.equal(await sb.run(dirty), "dirtied");
  assert.equal(await sb.run(`import builtins, os; print(hasattr(builtins, 'kvmfork_sdk_marker'), os.path.exists(${JSON.stringify(path)}))`), "False False");
});

test("batch keeps order", async () => {
  const codes = Array.from({ length: 6 }, (_, i) => `print(${i})`);
  codes[3] = "import sys; sys.exit(7)";
  const results = await sandbox().runBatch(codes);
  assert.deepEqual(results.map((r) => r.stdout), ["0\n", "1\n", "2\n", "", "4\n", "5\n"]);
  assert.deepEqual(results.map((r) => r.exit_code), [0, 0, 0, 7, 0, 0]);
});

test("bad language -> BadRequest unknown_language", async () => {
  await assert.rejects(sandbox().run("print(1)", { language: "cobol" }), (e) => e instanceof BadRequest && e.status === 400 && e.code === "unknown_language");
});

test("bad timeout -> BadRequest invalid_timeout", async () => {
  await assert.rejects(sandbox().exec("print(1)", { timeout: 0 }), (e) => e instanceof BadRequest && e.status === 400 && e.code === "invalid_timeout");
});

test("health", async () => {
  const health = await sandbox().health();
  assert.equal(health.status, "ok");
  assert.ok(typeof health.templates === "object" && !Array.isArray(health.templates), JSON.stringify(health.templates));
  assert.equal(health.templates.python.ready, true);
  assert.equal(health.templates.python.state, "ready");
  for (const t of Object.values(health.templates)) assert.ok(["ready", "building", "failed"].includes(t.state), t.state);
  assert.ok(Array.isArray(health.shards) && health.shards.length > 0);
  assert.ok(health.languages.includes("python"));
});

test("metrics are Prometheus text", async () => {
  const sb = sandbox();
  await sb.run("print(1)");
  const text = await sb.metrics();
  assert.match(text, /^# TYPE /m);
  const samples = text.split("\n").filter((l) => l && !l.startsWith("#"));
  assert.ok(samples.length > 0 && samples.every((l) => l.trim().split(/\s+/).length >= 2));
});

test("LLM tool round trip", async () => {
  const tool = sandbox().asTool();
  assert.equal(await tool.call('{"code": "print(6 * 7)"}'), "42\n");
  assert.match(await tool.call({ code: "1 / 0" }), /exited with status 1[\s\S]*ZeroDivisionError/);
});

test("authentication", async () => {
  const key = liveKey();
  if (key) {
    const wrong = new Sandbox(`not-a-valid-key-${randomUUID()}`, { baseUrl: liveUrl(), maxRetries: 0 });
    await assert.rejects(wrong.run("print(1)"), (e) => e instanceof AuthError && e.status === 401 && e.code === "unauthorized");
    assert.equal(await new Sandbox(key, liveUrl()).run("print(1)"), "1");
  } else {
    // Auth is off: any key, or none, is accepted.
    assert.equal(await new Sandbox("any-key", liveUrl()).run("print(1)"), "1");
  }
});

test("an unreachable server is a NetworkError", async () => {
  liveUrl();
  await assert.rejects(new Sandbox({ baseUrl: "http://127.0.0.1:9", maxRetries: 0 }).health(), NetworkError);
});
