// Test helpers: the live kvmfork server (KVMFORK_URL) and a scripted local HTTP server.
import { createServer } from "node:http";

export const MISSING_SERVER =
  "KVMFORK_URL is not set: these tests run against a live kvmfork server. Start one and run e.g. " +
  "KVMFORK_URL=http://127.0.0.1:8080 node --test test/*.test.mjs (add KVMFORK_TEST_API_KEY=<key> when the server " +
  "has KVMFORK_API_KEYS_FILE set), or use sdk/run-tests.sh.";

/** Base URL of the live server; throws (failing the test) when KVMFORK_URL is unset. */
export function liveUrl() {
  const url = process.env.KVMFORK_URL;
  if (!url) throw new Error(MISSING_SERVER);
  return url;
}

export function liveKey() {
  return process.env.KVMFORK_TEST_API_KEY || undefined;
}

/** A well-formed /v1/exec answer body. */
export function execAnswer(stdout = "", fields = {}) {
  return {
    id: "r-1", stdout, stderr: "", exit_code: 0, fork_time_ms: 0.5, exec_time_ms: 2, total_time_ms: 2.5,
    output: stdout, duration_ms: 2.5, timed_out: false, stdout_truncated: false, stderr_truncated: false,
    error: null, ...fields,
  };
}

/** A well-formed live sandbox description. */
export function sandboxAnswer(sandboxId = "sbx_n0_0_0_1", fields = {}) {
  return {
    sandbox_id: sandboxId, language: "python", template: "python-0123", created_at: 1764620000.5,
    expires_at: 1764620300.5, fork_time_ms: 0.3, execution_count: 0, memory_bytes: 0, metadata: null, ...fields,
  };
}

/** A well-formed /v1/sandboxes/{id}/exec answer body. */
export function sessionExecAnswer(stdout = "", { result = null, executionCount = 1, sandboxId = "sbx_n0_0_0_1", ...fields } = {}) {
  return {
    ...execAnswer(stdout, fields), sandbox_id: sandboxId, execution_count: executionCount,
    result: result === null ? null : { text: result, truncated: false },
  };
}

export function errorReply(status, code, message = "refused", headers = {}) {
  return { status, json: { error: { code, message } }, headers };
}

/**
 * Answers each request with the next scripted reply and records what it got.
 * A reply is {status, json | body, headers} or a function (req, res, body).
 * The last reply repeats when the script runs out.
 */
export async function fakeServer() {
  const fake = { replies: [], requests: [] };
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8");
      fake.requests.push({ method: req.method, path: req.url, headers: req.headers, body, json: () => JSON.parse(body) });
      const index = Math.min(fake.requests.length, fake.replies.length) - 1;
      const reply = fake.replies[index] ?? { status: 500 };
      if (typeof reply === "function") return reply(req, res, body);
      send(res, reply);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  fake.url = `http://127.0.0.1:${server.address().port}`;
  fake.script = (...replies) => { fake.replies = replies; };
  fake.close = () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(resolve); });
  return fake;
}

export function send(res, reply) {
  if (reply.status === 204) {
    res.writeHead(204, reply.headers ?? {});
    return res.end();
  }
  const body = reply.body ?? JSON.stringify(reply.json ?? {});
  res.writeHead(reply.status ?? 200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), ...(reply.headers ?? {}) });
  res.end(body);
}

/** Options for a client of a fake server that records retry waits instead of waiting. */
export function recordingOptions(fake, extra = {}) {
  const slept = [];
  return { slept, options: { baseUrl: fake.url, apiKey: "", maxRetries: 3, backoff: 0.5, maxBackoff: 30, sleep: async (s) => { slept.push(s); }, ...extra } };
}
