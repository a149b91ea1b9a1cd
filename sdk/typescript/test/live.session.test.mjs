// Live sandboxes (sessions) against a live kvmfork server (KVMFORK_URL;
// KVMFORK_TEST_API_KEY when auth is on). These fail, never skip, when
// KVMFORK_URL is unset.
//
// The tests in the "session globals" suite check that Python globals persist
// between runs and that `result` holds the final expression's value: they need
// the guest agent that keeps a session's namespace. The others use files in
// /tmp, which persist with any agent.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { describe, test } from "node:test";

import { CheckpointNotFound, LiveSandbox, Sandbox, SandboxNotFound } from "../dist/esm/index.js";
import { liveKey, liveUrl } from "./helpers.mjs";

const TTL = 120;
const client = () => new Sandbox(liveKey(), liveUrl());
const tmpPath = () => `/tmp/kvmfork-sdk-${randomUUID()}`;
const write = (path, text) => `open(${JSON.stringify(path)}, 'w').write(${JSON.stringify(text)})`;
const read = (path) => `print(open(${JSON.stringify(path)}).read())`;

/** Runs `body(sb)` with a new live sandbox and deletes it afterwards (what `await using` does). */
async function withSandbox(c, options, body) {
  const sb = await c.createSandbox({ ttlSeconds: TTL, ...options });
  try {
    return await body(sb);
  } finally {
    await sb[Symbol.asyncDispose]();
  }
}

test("session lifecycle and not-found after delete", async () => {
  const c = client();
  const path = tmpPath();
  const marker = randomUUID();
  const sb = await c.createSandbox({ language: "python", ttlSeconds: TTL, metadata: { test: marker } });
  try {
    assert.ok(sb instanceof LiveSandbox && sb.sandboxId.startsWith("sbx_"));
    assert.equal(sb.language, "python");
    assert.deepEqual(sb.metadata, { test: marker });
    assert.ok(Math.abs(sb.expiresAt - sb.createdAt - TTL) <= 1);
    assert.equal(sb.executionCount, 0);
    assert.ok((await c.listSandboxes()).some((s) => s.sandboxId === sb.sandboxId));

    const first = await sb.runCode(`${write(path, "kept")}\nprint('one')`);
    assert.deepEqual([first.stdout, first.exit_code, first.execution_count, first.sandbox_id], ["one\n", 0, 1, sb.sandboxId]);
    const second = await sb.runCode(read(path));
    assert.deepEqual([second.stdout, second.execution_count], ["kept\n", 2]);
    assert.equal(sb.executionCount, 2);

    const info = (await c.getSandbox(sb.sandboxId)).lastInfo;
    assert.equal(info.execution_count, 2);
    const before = sb.expiresAt;
    assert.ok((await sb.setTimeout(TTL * 3)).expires_at > before + TTL);
  } finally {
    await sb.delete();
  }
  assert.equal(sb.closed, true);
  const error = await sb.info().catch((e) => e);
  assert.ok(error instanceof SandboxNotFound, `${error}`);
  assert.deepEqual([error.status, error.code, error.sandboxId], [404, "sandbox_not_found", sb.sandboxId]);
  await assert.rejects(sb.runCode("print(1)"), SandboxNotFound);
  await assert.rejects(c.getSandbox(sb.sandboxId), SandboxNotFound);
  assert.equal(await sb.close(), false);
});

test("an exception keeps the session", async () => {
  const path = tmpPath();
  await withSandbox(client(), {}, async (sb) => {
    await sb.runCode(write(path, "before"));
    const failed = await sb.runCode("1 / 0");
    assert.equal(failed.exit_code, 1);
    assert.match(failed.stderr, /ZeroDivisionError/);
    assert.equal(await sb.run(read(path)), "before");
  });
});

test("fork: two children continue from the parent", async () => {
  const path = tmpPath();
  await withSandbox(client(), {}, async (parent) => {
    await parent.runCode(write(path, "parent"));
    const children = await parent.fork(2);
    try {
      assert.equal(children.length, 2);
      assert.deepEqual(children.errors, []);
      assert.ok(children.pauseMs >= 0);
      const [a, b] = children;
      assert.ok(a.sandboxId !== b.sandboxId && a.sandboxId !== parent.sandboxId);
      assert.equal(await a.run(read(path)), "parent");
      assert.equal(await b.run(read(path)), "parent");
      await a.runCode(write(path, "child a"));
      assert.equal(await a.run(read(path)), "child a");
      assert.equal(await b.run(read(path)), "parent", "children must not share state");
      assert.equal(await parent.run(read(path)), "parent", "a child must not change its parent");
    } finally {
      for (const child of children) await child.close();
    }
    for (const child of children) await assert.rejects(child.info(), SandboxNotFound);
  });
});

test("checkpoint and restore", async () => {
  const c = client();
  const path = tmpPath();
  await withSandbox(c, {}, async (sb) => {
    await sb.runCode(write(path, "at checkpoint"));
    const ckpt = await sb.checkpoint();
    assert.ok(ckpt.checkpointId.startsWith("ckpt_") && ckpt.dirtyBytes > 0 && ckpt.pauseMs >= 0);
    await sb.runCode(write(path, "after checkpoint"));
    const info = await sb.restore(ckpt);
    assert.ok(info.restore_ms >= 0);
    assert.equal(await sb.run(read(path)), "at checkpoint");
    await withSandbox(c, { fromCheckpoint: ckpt }, async (copy) => {
      assert.notEqual(copy.sandboxId, sb.sandboxId);
      assert.equal(await copy.run(read(path)), "at checkpoint");
    });
    await ckpt.delete();
    const error = await sb.restore(ckpt).catch((e) => e);
    assert.ok(error instanceof CheckpointNotFound, `${error}`);
    assert.equal(error.checkpointId, ckpt.checkpointId);
  });
});

test("a batch from a sandbox leaves it unchanged", async () => {
  const path = tmpPath();
  await withSandbox(client(), {}, async (sb) => {
    await sb.runCode(write(path, "base"));
    const results = await sb.runBatch([read(path), `${write(path, "candidate 1")}\n${read(path)}`, { code: "import sys; sys.exit(4)" }]);
    assert.deepEqual(results.map((r) => r.stdout), ["base\n", "candidate 1\n", ""]);
    assert.deepEqual(results.map((r) => r.exit_code), [0, 0, 4]);
    assert.equal(await sb.run(read(path)), "base");
  });
});

test("LiveSandbox.create with its own client; Symbol.asyncDispose deletes", async () => {
  const sb = await LiveSandbox.create({ apiKey: liveKey(), baseUrl: liveUrl(), ttlSeconds: TTL });
  assert.equal(await sb.run("print('own client')"), "own client");
  await sb[Symbol.asyncDispose]();
  await assert.rejects(client().getSandbox(sb.sandboxId), SandboxNotFound);
});

test("unknown ids are not found", async () => {
  const c = client();
  await assert.rejects(c.getSandbox(`sbx_${randomUUID()}`), SandboxNotFound);
  await assert.rejects(c.deleteCheckpoint(`ckpt_${randomUUID()}`), CheckpointNotFound);
});

describe("session globals (need the agent that keeps a session's Python namespace)", () => {
  test("globals persist and the final expression is the result", async () => {
    await withSandbox(client(), {}, async (sb) => {
      const first = await sb.runCode("x = 1");
      assert.deepEqual([first.exit_code, first.result, first.execution_count], [0, null, 1]);
      const second = await sb.runCode("x + 1");
      assert.deepEqual([second.exit_code, second.result, second.execution_count], [0, "2", 2], second.stderr);
      assert.equal((await sb.runCode("'text'")).result, "'text'");
    });
  });

  test("fork children see the parent's globals and diverge", async () => {
    await withSandbox(client(), {}, async (parent) => {
      await parent.runCode("x = 10");
      const children = await parent.fork(2);
      try {
        const [a, b] = children;
        await a.runCode("x += 1");
        assert.equal((await a.runCode("x")).result, "11");
        assert.equal((await b.runCode("x")).result, "10");
        assert.equal((await parent.runCode("x")).result, "10");
      } finally {
        for (const child of children) await child.close();
      }
    });
  });

  test("restore rolls back globals", async () => {
    await withSandbox(client(), {}, async (sb) => {
      await sb.runCode("x = 1");
      const ckpt = await sb.checkpoint();
      try {
        await sb.runCode("x = 2");
        await sb.restore(ckpt);
        assert.equal((await sb.runCode("x")).result, "1");
      } finally {
        await ckpt.close();
      }
    });
  });
});
