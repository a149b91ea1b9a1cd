#!/usr/bin/env node
// An agent tool loop on kvmfork, without an LLM (TypeScript SDK, Anthropic-style messages).
//
// The loop is the one you would write around a chat model with tool use:
// send the conversation and the tool specs, run each tool_use block in a
// kvmfork sandbox, send back tool_result blocks, repeat until the model
// answers. ScriptedModel stands in for the model: it reads the tool results
// like a model would (it fixes its own TypeError from the traceback), so the
// example runs anywhere, deterministically. Swap it for a real client, e.g.
// `new Anthropic().messages.create({ messages, tools, ... })`.
//
//   (cd sdk/typescript && npm ci && npm run build)
//   KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_API_KEY=...] node examples/agent_loop.mjs
import { Sandbox } from "../sdk/typescript/dist/esm/index.js";

const TASK = "What are the mean, median and standard deviation of the squares of 1..50?";

// The program the "model" writes first: it concatenates a str and a float.
const FIRST_ATTEMPT = `\
import json
import numpy as np

squares = np.arange(1, 51) ** 2
stats = {"mean": float(squares.mean()), "median": float(np.median(squares)), "std": float(squares.std())}
print("mean is " + stats["mean"])
print(json.dumps(stats))
`;

class ScriptedModel {
  /** Plays the assistant's side of an Anthropic-style conversation with tools. */
  respond(messages, tools) {
    const toolName = tools[0].name; // use the tool the way the spec names it
    const last = messages[messages.length - 1];
    if (typeof last.content === "string") return this.#call(toolName, FIRST_ATTEMPT, "toolu_1");
    const result = last.content.find((block) => block.type === "tool_result").content;
    if (result.includes("TypeError") && result.includes("concatenate")) {
      // Read the traceback, fix the program, try again.
      return this.#call(toolName, FIRST_ATTEMPT.replace('"mean is " + stats["mean"]', 'f"mean is {stats[\'mean\']}"'), "toolu_2");
    }
    const jsonLine = result.trim().split("\n").pop();
    let stats;
    try {
      stats = JSON.parse(jsonLine);
    } catch {
      return { role: "assistant", content: [{ type: "text", text: `I could not compute the statistics:\n${result}` }] };
    }
    const text = `Squares of 1..50: mean ${stats.mean}, median ${stats.median}, standard deviation ${stats.std.toFixed(4)}.`;
    return { role: "assistant", content: [{ type: "text", text }], stop_reason: "end_turn" };
  }

  #call(name, code, id) {
    return { role: "assistant", content: [{ type: "tool_use", id, name, input: { code, language: "python" } }], stop_reason: "tool_use" };
  }
}

async function agentLoop(sandbox, model, task, maxTurns = 6) {
  const tool = sandbox.asTool({ languages: ["python"], timeout: 30 });
  const tools = [tool.spec("anthropic")];
  console.log(`tool spec sent to the model:\n${JSON.stringify(tools, null, 2)}`);
  const messages = [{ role: "user", content: task }];
  for (let turn = 1; turn <= maxTurns; turn++) {
    const reply = model.respond(messages, tools);
    messages.push(reply);
    const uses = reply.content.filter((block) => block.type === "tool_use");
    if (uses.length === 0) return reply.content.map((block) => block.text ?? "").join("");
    const results = [];
    for (const use of uses) {
      // Each call runs in a fresh kvmfork sandbox; independent calls could run concurrently.
      const output = use.name === tool.name ? await tool.call(use.input) : `error: no tool named ${use.name}`;
      console.log(`\n--- turn ${turn}: ${use.name} -> ${output.trim().slice(0, 300)}`);
      results.push({ type: "tool_result", tool_use_id: use.id, content: output });
    }
    messages.push({ role: "user", content: results });
  }
  throw new Error(`no answer after ${maxTurns} turns`);
}

const sandbox = new Sandbox(); // KVMFORK_URL / KVMFORK_API_KEY from the environment
const health = await sandbox.health();
console.log(`kvmfork at ${sandbox.baseUrl}: ${health.status}, languages ${JSON.stringify(health.languages)}`);
const answer = await agentLoop(sandbox, new ScriptedModel(), TASK);
console.log(`\n=== answer ===\n${answer}`);
process.exitCode = answer.includes("standard deviation") ? 0 : 1;
