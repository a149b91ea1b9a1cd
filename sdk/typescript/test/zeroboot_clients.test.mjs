// Zeroboot's published TypeScript client shape against a live kvmfork server:
// `run(code, { language, timeout })` resolving to `{ stdout, stderr, exitCode, ... }`.
// The client below is written here from the wire format (not Zeroboot's code),
// so these tests show such clients work against kvmfork unchanged, on /v1/exec
// as well as Zeroboot's unversioned /exec and /health.
// These fail, never skip, when KVMFORK_URL is unset.
import assert from "node:assert/strict";
import { test } from "node:test";

import { liveKey, liveUrl } from "./helpers.mjs";

// What Zeroboot's server answers for an exec (kvmfork adds more fields).
const ZEROBOOT_EXEC_FIELDS = ["id", "stdout", "stderr", "exit_code", "fork_time_ms", "exec_time_ms", "total_time_ms"];

function zerobootShapedClient(apiKey, baseUrl, execPath = "/v1/exec") {
  const base = baseUrl.replace(/\/+$/, "");
  const headers = { "Content-Type": "application/json", ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}) };
  return {
    async run(code, { language = "python", timeout = 30 } = {}) {
      const response = await fetch(base + execPath, {
        method: "POST",
        headers,
        body: JSON.stringify({ code, language, timeout_seconds: timeout }),
      });
      const body = await response.json();
      assert.equal(response.status, 200, JSON.stringify(body));
      const missing = ZEROBOOT_EXEC_FIELDS.filter((f) => !(f in body));
      assert.deepEqual(missing, [], `exec answer lacks Zeroboot fields: ${JSON.stringify(body)}`);
      return {
        id: body.id, stdout: body.stdout, stderr: body.stderr, exitCode: body.exit_code,
        forkTimeMs: body.fork_time_ms, execTimeMs: body.exec_time_ms, totalTimeMs: body.total_time_ms,
      };
    },
    async health(path = "/v1/health") {
      const response = await fetch(base + path);
      assert.equal(response.status, 200);
      return response.json();
    },
  };
}

for (const execPath of ["/v1/exec", "/exec"]) {
  test(`run() on ${execPath}: stdout and exit code`, async () => {
    const client = zerobootShapedClient(liveKey(), liveUrl(), execPath);
    const result = await client.run("print(1 + 1)", { language: "python", timeout: 10 });
    assert.deepEqual([result.stdout, result.stderr, result.exitCode], ["2\n", "", 0]);
    assert.equal(result.id.length, 36);
    assert.ok(result.totalTimeMs >= result.execTimeMs && result.forkTimeMs >= 0);
    const failed = await client.run("import sys; print('x'); sys.exit(3)");
    assert.deepEqual([result.stdout.length > 0, failed.stdout, failed.exitCode], [true, "x\n", 3]);
  });

  test(`run() on ${execPath} with language node`, async () => {
    const client = zerobootShapedClient(liveKey(), liveUrl(), execPath);
    const result = await client.run("console.log([1, 2, 3].map((x) => x * 2).join(','))", { language: "node", timeout: 10 });
    assert.deepEqual([result.stdout, result.exitCode], ["2,4,6\n", 0]);
    const thrown = await client.run("throw new Error('boom')", { language: "javascript" });
    assert.notEqual(thrown.exitCode, 0);
    assert.match(thrown.stderr, /boom/);
  });
}

for (const path of ["/v1/health", "/health"]) {
  test(`${path}: templates keyed by language`, async () => {
    const health = await zerobootShapedClient(liveKey(), liveUrl()).health(path);
    assert.equal(health.status, "ok");
    assert.ok(typeof health.templates === "object" && !Array.isArray(health.templates), JSON.stringify(health.templates));
    assert.equal(health.templates.python.ready, true);
    for (const [language, t] of Object.entries(health.templates)) {
      assert.equal(t.language, language);
      assert.ok(["ready", "building", "failed"].includes(t.state), t.state);
    }
  });
}
