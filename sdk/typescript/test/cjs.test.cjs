// The CommonJS build loads through the package's "require" export and works.
const assert = require("node:assert/strict");
const { createServer } = require("node:http");
const { test } = require("node:test");
const path = require("node:path");

const sdk = require(path.join(__dirname, ".."));

test("require() gives the CommonJS build with the full surface", async () => {
  assert.equal(require.resolve(path.join(__dirname, "..")), path.join(__dirname, "..", "dist", "cjs", "index.js"));
  for (const name of ["Sandbox", "ExecError", "SandboxTimeout", "RateLimitError", "ServerBusy", "AuthError", "BadRequest", "SandboxTool", "LiveSandbox", "Checkpoint", "SandboxNotFound", "QuotaExceeded"]) {
    assert.equal(typeof sdk[name], "function", name);
  }
  const server = createServer((req, res) => {
    const body = JSON.stringify({ id: "c", stdout: "2\n", stderr: "", exit_code: 0, fork_time_ms: 1, exec_time_ms: 1, total_time_ms: 2, timed_out: false, error: null });
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(body);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const sb = new sdk.Sandbox("k", `http://127.0.0.1:${server.address().port}`);
    assert.equal(await sb.run("print(1 + 1)"), "2");
  } finally {
    server.closeAllConnections?.();
    await new Promise((resolve) => server.close(resolve));
  }
});
