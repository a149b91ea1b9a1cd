// Client behaviour against a scripted local HTTP server: wire format, error
// mapping, retry/backoff. No kvmfork server needed.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, beforeEach, describe, test } from "node:test";

import {
  APIError, AuthError, BadRequest, ExecError, KvmforkError, NetworkError, ProtocolError, RateLimitError,
  Sandbox, SandboxError, SandboxTimeout, ServerBusy, checkResult, formatResult, isOk, parseRetryAfter,
} from "../dist/esm/index.js";
import { errorReply, execAnswer, fakeServer, recordingOptions, send } from "./helpers.mjs";

delete process.env.KVMFORK_API_KEY;
delete process.env.ZEROBOOT_API_KEY;

let fake;
before(async () => { fake = await fakeServer(); });
after(async () => { await fake.close(); });
beforeEach(() => { fake.requests.length = 0; fake.script(); });

function client(extra) {
  const { slept, options } = recordingOptions(fake, extra);
  return { sb: new Sandbox(options), slept };
}

describe("wire format", () => {
  test("exec sends the documented request", async () => {
    fake.script({ json: execAnswer("2\n") });
    const result = await client().sb.exec("print(1 + 1)", { language: "python", timeout: 5 });
    const sent = fake.requests[0];
    assert.equal(sent.method, "POST");
    assert.equal(sent.path, "/v1/exec");
    assert.deepEqual(sent.json(), { code: "print(1 + 1)", language: "python", timeout_seconds: 5 });
    assert.match(sent.headers["content-type"], /^application\/json/);
    assert.equal(sent.headers.authorization, undefined);
    assert.equal(result.stdout, "2\n");
    assert.equal(result.output, "2\n");
    assert.equal(result.duration_ms, 2.5);
    assert.ok(isOk(result));
  });

  test("the timeout is left to the server default when not given", async () => {
    fake.script({ json: execAnswer() });
    await client().sb.exec("pass");
    assert.deepEqual(fake.requests[0].json(), { code: "pass", language: "python" });
  });

  test("a bare string option is the language", async () => {
    fake.script({ json: execAnswer("2\n") });
    assert.equal(await client().sb.run("console.log(2)", "node"), "2");
    assert.equal(fake.requests[0].json().language, "node");
  });

  test("the language option is the default of run, exec and runBatch; a call's own wins", async () => {
    fake.script({ json: execAnswer("2\n") }, { json: execAnswer() }, { json: execAnswer() }, { json: { results: [execAnswer(), execAnswer()] } });
    const sb = client({ language: "node" }).sb;
    assert.equal(sb.language, "node");
    assert.equal(await sb.run("console.log(1 + 1)"), "2");
    await sb.exec("console.log(1)");
    await sb.exec("print(1)", "python");
    await sb.runBatch(["a", { code: "b", language: "python" }]);
    assert.deepEqual(fake.requests.map((r) => r.json()), [
      { code: "console.log(1 + 1)", language: "node" },
      { code: "console.log(1)", language: "node" },
      { code: "print(1)", language: "python" },
      { executions: [{ code: "a", language: "node" }, { code: "b", language: "python" }] },
    ]);
  });

  test("without a language option runs are Python", async () => {
    fake.script({ json: execAnswer() });
    const sb = client().sb;
    assert.equal(sb.language, "python");
    await sb.run("print(1)");
    assert.equal(fake.requests[0].json().language, "python");
  });

  test("an empty or non-string language option is refused", () => {
    assert.throws(() => client({ language: "" }), TypeError);
    assert.throws(() => client({ language: 3 }), TypeError);
  });

  test("run strips trailing newlines only", async () => {
    fake.script({ json: execAnswer("a\n\nb\n\n") });
    assert.equal(await client().sb.run("x"), "a\n\nb");
  });

  test("pre-rename FORKD_URL / FORKD_API_KEY still work, with a warning", async () => {
    fake.script({ json: execAnswer() });
    const warn = console.warn;
    const warnings = [];
    console.warn = (msg) => warnings.push(String(msg));
    // The new names win over the old ones: hide them (sdk/run-tests.sh sets KVMFORK_URL).
    const hidden = ["KVMFORK_URL", "KVMFORK_API_KEY", "ZEROBOOT_API_KEY"].map((name) => [name, process.env[name]]);
    for (const [name] of hidden) delete process.env[name];
    process.env.FORKD_URL = fake.url;
    process.env.FORKD_API_KEY = "k-legacy";
    try {
      await new Sandbox().exec("pass");
    } finally {
      console.warn = warn;
      delete process.env.FORKD_URL;
      delete process.env.FORKD_API_KEY;
      for (const [name, value] of hidden) if (value !== undefined) process.env[name] = value;
    }
    assert.equal(fake.requests[0].headers.authorization, "Bearer k-legacy");
    assert.ok(warnings.some((w) => w.includes("KVMFORK_URL")), warnings.join("\n"));
  });

  test("constructor forms and key resolution", async () => {
    fake.script({ json: execAnswer() });
    await new Sandbox("k-positional", fake.url).exec("pass");
    await new Sandbox("k-with-options", { baseUrl: fake.url }).exec("pass");
    process.env.KVMFORK_API_KEY = "k-kvmfork-env";
    process.env.ZEROBOOT_API_KEY = "k-zeroboot-env";
    try {
      await new Sandbox({ baseUrl: fake.url }).exec("pass");
      delete process.env.KVMFORK_API_KEY;
      await new Sandbox({ baseUrl: fake.url }).exec("pass");
    } finally {
      delete process.env.KVMFORK_API_KEY;
      delete process.env.ZEROBOOT_API_KEY;
    }
    assert.deepEqual(fake.requests.map((r) => r.headers.authorization), [
      "Bearer k-positional", "Bearer k-with-options", "Bearer k-kvmfork-env", "Bearer k-zeroboot-env",
    ]);
  });

  test("a base URL path prefix is kept", async () => {
    fake.script({ json: { status: "ok", templates: {}, shards: [] } });
    await new Sandbox({ baseUrl: fake.url + "/kvmfork/" }).health();
    assert.equal(fake.requests[0].path, "/kvmfork/v1/health");
  });

  test("batch items of every form keep their order", async () => {
    fake.script({ json: { results: [0, 1, 2].map((i) => execAnswer(String(i))) } });
    const results = await client().sb.runBatch(
      ["a", { code: "b", language: "node", timeout: 3 }, { code: "c", timeout_seconds: 4 }],
      { timeout: 9 },
    );
    assert.equal(fake.requests[0].path, "/v1/exec/batch");
    assert.deepEqual(fake.requests[0].json(), { executions: [
      { code: "a", language: "python", timeout_seconds: 9 },
      { code: "b", language: "node", timeout_seconds: 3 },
      { code: "c", language: "python", timeout_seconds: 4 },
    ] });
    assert.deepEqual(results.map((r) => r.stdout), ["0", "1", "2"]);
  });

  test("a batch answer with the wrong count is a protocol error", async () => {
    fake.script({ json: { results: [execAnswer()] } });
    await assert.rejects(client().sb.runBatch(["a", "b"]), ProtocolError);
  });

  test("a batch item without code is refused before sending", async () => {
    await assert.rejects(client().sb.runBatch([{ language: "python" }]), TypeError);
    assert.equal(fake.requests.length, 0);
  });

  test("a non-JSON success is a protocol error", async () => {
    fake.script({ body: "<html>proxy</html>" });
    await assert.rejects(client().sb.exec("pass"), ProtocolError);
  });

  test("a malformed result is a protocol error", async () => {
    fake.script({ json: { stdout: "x" } });
    await assert.rejects(client().sb.exec("pass"), ProtocolError);
  });

  test("unknown fields are kept", async () => {
    fake.script({ json: execAnswer("x", { shard: 3 }) });
    assert.equal((await client().sb.exec("pass")).shard, 3);
  });

  test("a bad base URL is refused", () => {
    assert.throws(() => new Sandbox({ baseUrl: "ftp://example" }), KvmforkError);
  });
});

describe("error mapping", () => {
  for (const [status, code, ErrorClass] of [
    [400, "unknown_language", BadRequest],
    [400, "invalid_timeout", BadRequest],
    [400, "batch_too_large", BadRequest],
    [413, "body_too_large", BadRequest],
    [431, "headers_too_large", BadRequest],
    [401, "unauthorized", AuthError],
    [404, "not_found", APIError],
    [405, "method_not_allowed", APIError],
    [408, "request_timeout", APIError],
    [500, "internal", APIError],
    [500, "template_failed", APIError],
  ]) {
    test(`${status} ${code} -> ${ErrorClass.name}, not retried`, async () => {
      fake.script(errorReply(status, code, "details here"));
      const { sb, slept } = client();
      const error = await sb.exec("pass").then(() => assert.fail("resolved"), (e) => e);
      assert.ok(error instanceof ErrorClass, `${error}`);
      assert.ok(error instanceof KvmforkError);
      assert.equal(error.name, ErrorClass.name);
      assert.equal(error.status, status);
      assert.equal(error.code, code);
      assert.match(error.message, /details here/);
      assert.equal(fake.requests.length, 1);
      assert.deepEqual(slept, []);
    });
  }

  test("a non-JSON error body is reported", async () => {
    fake.script({ status: 502, body: "Bad Gateway from proxy" });
    await assert.rejects(client().sb.exec("pass"), (e) => e instanceof APIError && e.status === 502 && /Bad Gateway from proxy/.test(e.message));
  });

  test("run rejects with ExecError carrying stderr and exit code", async () => {
    fake.script({ json: execAnswer("partial\n", { stderr: "Traceback...\nValueError: boom\n", exit_code: 1 }) });
    const error = await client().sb.run("raise ValueError('boom')").catch((e) => e);
    assert.ok(error instanceof ExecError && error instanceof SandboxError);
    assert.equal(error.exitCode, 1);
    assert.equal(error.stdout, "partial\n");
    assert.match(error.stderr, /ValueError: boom/);
    assert.match(error.message, /ValueError: boom/);
  });

  test("run rejects with SandboxTimeout on timed_out", async () => {
    fake.script({ json: execAnswer("", { exit_code: -1, timed_out: true }) });
    const error = await client().sb.run("while True: pass", { timeout: 2 }).catch((e) => e);
    assert.ok(error instanceof SandboxTimeout);
    assert.ok(error.result.timed_out);
    assert.match(error.message, /2s/);
  });

  test("run rejects with SandboxError when the guest failed", async () => {
    fake.script({ json: execAnswer("", { exit_code: -1, error: { code: "guest_crashed", message: "triple fault" } }) });
    const error = await client().sb.run("pass").catch((e) => e);
    assert.ok(error instanceof SandboxError && !(error instanceof ExecError) && !(error instanceof SandboxTimeout));
    assert.equal(error.code, "guest_crashed");
    assert.match(error.message, /triple fault/);
  });

  test("checkResult passes success through", async () => {
    fake.script({ json: execAnswer("ok") });
    const result = await client().sb.exec("pass");
    assert.equal(checkResult(result), result);
  });
});

describe("retry and backoff", () => {
  test("429 is retried after the Retry-After seconds", async () => {
    fake.script(errorReply(429, "rate_limited", "slow down", { "Retry-After": "2" }), { json: execAnswer("done") });
    const { sb, slept } = client();
    assert.equal(await sb.run("pass"), "done");
    assert.deepEqual(slept, [2]);
    assert.equal(fake.requests.length, 2);
  });

  test("503 template_building is retried after the Retry-After seconds", async () => {
    const building = errorReply(503, "template_building", "node template building", { "Retry-After": "5" });
    fake.script(building, building, { json: execAnswer("built") });
    const { sb, slept } = client();
    assert.equal(await sb.run("pass", { language: "node" }), "built");
    assert.deepEqual(slept, [5, 5]);
    assert.equal(fake.requests.length, 3);
  });

  test("503 without Retry-After backs off exponentially, then rejects", async () => {
    fake.script(errorReply(503, "overloaded"));
    const { sb, slept } = client();
    const error = await sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof ServerBusy);
    assert.equal(error.retryAfter, undefined);
    assert.equal(fake.requests.length, 4);
    slept.forEach((delay, attempt) => {
      const ceiling = 0.5 * 2 ** attempt;
      assert.ok(delay >= ceiling / 2 && delay <= ceiling, `attempt ${attempt} waited ${delay}`);
    });
  });

  test("backoff is capped at maxBackoff", async () => {
    fake.script(errorReply(503, "overloaded"));
    const { sb, slept } = client({ maxRetries: 6, backoff: 1, maxBackoff: 3 });
    await assert.rejects(sb.exec("pass"), ServerBusy);
    assert.equal(slept.length, 6);
    assert.ok(Math.max(...slept) <= 3 && Math.min(...slept.slice(2)) >= 1.5, `${slept}`);
  });

  test("no retries when disabled", async () => {
    fake.script(errorReply(429, "rate_limited", "x", { "Retry-After": "7" }));
    const error = await client({ maxRetries: 0 }).sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof RateLimitError);
    assert.equal(error.retryAfter, 7);
    assert.equal(fake.requests.length, 1);
  });

  test("a Retry-After longer than maxBackoff is thrown at once", async () => {
    fake.script(errorReply(429, "rate_limited", "x", { "Retry-After": "120" }));
    const { sb, slept } = client();
    const error = await sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof RateLimitError);
    assert.equal(error.retryAfter, 120);
    assert.deepEqual(slept, []);
  });

  test("the default sleep really waits Retry-After", async () => {
    fake.script(errorReply(503, "overloaded", "x", { "Retry-After": "1" }), { json: execAnswer("late") });
    const sb = new Sandbox({ baseUrl: fake.url });
    const started = performance.now();
    assert.equal(await sb.run("pass"), "late");
    // Correctness, not speed: the client must not come back before it was told to.
    assert.ok(performance.now() - started >= 990);
  });

  test("a refused connection is retried, then a NetworkError with sent=false", async () => {
    const probe = createServer();
    await new Promise((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const port = probe.address().port;
    await new Promise((resolve) => probe.close(resolve));
    const slept = [];
    const sb = new Sandbox({ baseUrl: `http://127.0.0.1:${port}`, maxRetries: 2, sleep: async (s) => { slept.push(s); } });
    const error = await sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof NetworkError, `${error}`);
    assert.equal(error.sent, false);
    assert.equal(slept.length, 2);
  });

  test("a server that drops the connection gives a NetworkError with sent=true, not retried", async () => {
    fake.script((req, res) => { res.socket.destroy(); });
    const { sb, slept } = client();
    const error = await sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof NetworkError, `${error}`);
    assert.equal(error.sent, true);
    assert.deepEqual(slept, []);
  });

  test("an HTTP timeout is a NetworkError and is not retried", async () => {
    fake.script((req, res) => { setTimeout(() => send(res, { json: execAnswer() }), 1500); });
    const error = await client({ timeout: 0.3 }).sb.exec("pass").catch((e) => e);
    assert.ok(error instanceof NetworkError, `${error}`);
    assert.equal(error.sent, true);
    assert.equal(fake.requests.length, 1);
  });

  test("a caller's AbortSignal aborts the request", async () => {
    fake.script((req, res) => { setTimeout(() => send(res, { json: execAnswer() }), 1500); });
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error("caller gave up")), 100);
    await assert.rejects(client().sb.exec("pass", { signal: controller.signal }), /caller gave up/);
  });

  for (const [header, expected] of [["3", 3], ["1.5", 1.5], [" 0 ", 0], ["-4", 0], ["soon", undefined], [null, undefined]]) {
    test(`parseRetryAfter(${JSON.stringify(header)}) = ${expected}`, () => {
      assert.equal(parseRetryAfter(header), expected);
    });
  }

  test("parseRetryAfter reads an HTTP date", () => {
    const seconds = parseRetryAfter(new Date(Date.now() + 30_000).toUTCString());
    assert.ok(seconds >= 25 && seconds <= 31, `${seconds}`);
  });
});

describe("health and metrics", () => {
  test("the health of a draining server is returned, not retried", async () => {
    fake.script({ status: 503, json: { status: "draining", templates: {}, shards: [] } });
    const { sb, slept } = client();
    assert.equal((await sb.health()).status, "draining");
    assert.equal(fake.requests.length, 1);
    assert.deepEqual(slept, []);
  });

  test("a 503 without a health body rejects", async () => {
    fake.script({ status: 503, body: "Service Unavailable" });
    await assert.rejects(client().sb.health(), ServerBusy);
    assert.equal(fake.requests.length, 1);
  });

  test("metrics text", async () => {
    fake.script({ body: "# TYPE kvmfork_x counter\nkvmfork_x 1\n" });
    assert.equal(await client().sb.metrics(), "# TYPE kvmfork_x counter\nkvmfork_x 1\n");
    assert.deepEqual([fake.requests[0].method, fake.requests[0].path], ["GET", "/v1/metrics"]);
  });
});

describe("concurrency", () => {
  test("one client serves many concurrent calls", async () => {
    fake.script((req, res, body) => send(res, { json: execAnswer(JSON.parse(body).code) }));
    const sb = client().sb;
    const outs = await Promise.all(Array.from({ length: 16 }, (_, i) => sb.run(`print(${i})`)));
    assert.deepEqual(outs, Array.from({ length: 16 }, (_, i) => `print(${i})`));
  });
});

describe("LLM tool", () => {
  test("spec formats", () => {
    const sb = new Sandbox({ baseUrl: fake.url });
    const openai = sb.toolSpec("openai");
    assert.equal(openai.type, "function");
    assert.equal(openai.function.name, "run_code");
    assert.deepEqual(openai.function.parameters.required, ["code"]);
    assert.deepEqual(openai.function.parameters.properties.language.enum, ["python", "node"]);
    const anthropic = sb.asTool({ name: "python", languages: ["python"] }).spec("anthropic");
    assert.equal(anthropic.name, "python");
    assert.deepEqual(anthropic.input_schema.properties.language.enum, ["python"]);
    assert.throws(() => sb.toolSpec("yaml"), RangeError);
  });

  test("call returns stdout, or status and stderr for the model", async () => {
    fake.script({ json: execAnswer("42\n") }, { json: execAnswer("", { exit_code: 1, stderr: "ZeroDivisionError\n" }) });
    const tool = client().sb.asTool({ timeout: 4 });
    assert.equal(await tool.call('{"code": "print(6 * 7)"}'), "42\n");
    assert.match(await tool.call({ code: "1/0" }), /exited with status 1\nstderr:\nZeroDivisionError/);
    assert.deepEqual(fake.requests[0].json(), { code: "print(6 * 7)", language: "python", timeout_seconds: 4 });
    assert.match(await tool.call({ nocode: 1 }), /bad tool arguments/);
  });

  test("a refused request goes back to the model as text", async () => {
    fake.script(errorReply(400, "unknown_language", "no cobol"));
    assert.match(await client().sb.asTool().call({ code: "x", language: "cobol" }), /refused the request.*no cobol/);
  });

  test("formatResult cuts huge output", () => {
    const text = formatResult({ ...execAnswer("y".repeat(50_000)) });
    assert.ok(text.length < 21_000 && text.includes("characters cut"));
  });
});
