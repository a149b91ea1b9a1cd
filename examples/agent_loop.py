#!/usr/bin/env python3
"""An agent tool loop on kvmfork, without an LLM.

The loop is the one you would write around a chat model with function
calling: send the conversation and the tool specs, run any tool call the
model makes in a kvmfork sandbox, append the result, repeat until the model
answers. ``ScriptedModel`` stands in for the model: it reads the tool results
like a model would (it fixes its own NameError from the traceback) so the
example runs anywhere, deterministically. Swap it for a real client, e.g.
``openai.OpenAI().chat.completions.create(messages=..., tools=tools)``.

    KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_API_KEY=...] python3 examples/agent_loop.py
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

try:
    from kvmfork import Sandbox
except ImportError:  # running from a checkout without `pip install ./sdk/python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk", "python", "src"))
    from kvmfork import Sandbox

TASK = "Estimate pi three different ways and tell me which estimate is closest."

# The program the "model" writes first: it forgets `import math`.
FIRST_ATTEMPT = """\
import json
import numpy as np

rng = np.random.default_rng(7)
points = rng.random((2, 20_000))
monte_carlo = 4 * np.mean((points ** 2).sum(axis=0) <= 1)
k = np.arange(20_000)
leibniz = 4 * np.sum((-1.0) ** k / (2 * k + 1))
n = np.arange(1, 1_000, dtype=float)
nilakantha = 3 + np.sum((-1.0) ** (n + 1) * 4 / ((2 * n) * (2 * n + 1) * (2 * n + 2)))
estimates = {"monte_carlo": float(monte_carlo), "leibniz": float(leibniz), "nilakantha": float(nilakantha)}
print(json.dumps({name: {"value": v, "error": abs(v - math.pi)} for name, v in estimates.items()}))
"""


class ScriptedModel:
    """Plays the assistant's side of an OpenAI-style chat with tools."""

    def respond(self, messages: List[Dict[str, Any]], tools: List[Dict[str, Any]]) -> Dict[str, Any]:
        tool_name = tools[0]["function"]["name"]  # use the tool the way the spec names it
        last = messages[-1]
        if last["role"] == "user":
            return self._call(tool_name, FIRST_ATTEMPT, call_id="call_1")
        result = last["content"]
        if "NameError" in result and "'math'" in result:
            # Read the traceback, fix the program, try again.
            return self._call(tool_name, "import math\n" + FIRST_ATTEMPT, call_id="call_2")
        try:
            estimates = json.loads(result.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"role": "assistant", "content": f"I could not compute the estimates:\n{result}"}
        best = min(estimates, key=lambda name: estimates[name]["error"])
        lines = [f"- {name}: {e['value']:.10f} (off by {e['error']:.2e})" for name, e in estimates.items()]
        return {"role": "assistant",
                "content": "Estimates of pi:\n" + "\n".join(lines) + f"\nClosest: {best}."}

    @staticmethod
    def _call(tool_name: str, code: str, call_id: str) -> Dict[str, Any]:
        arguments = json.dumps({"code": code, "language": "python"})
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": tool_name, "arguments": arguments}}]}


def agent_loop(sandbox: Sandbox, model: ScriptedModel, task: str, max_turns: int = 6) -> str:
    tool = sandbox.as_tool(languages=["python"], timeout=30)
    tools = [tool.spec("openai")]
    print("tool spec sent to the model:\n" + json.dumps(tools, indent=2))
    messages: List[Dict[str, Any]] = [
        {"role": "system", "content": "Solve the task by running code with the tools."},
        {"role": "user", "content": task},
    ]
    for turn in range(1, max_turns + 1):
        reply = model.respond(messages, tools)
        messages.append(reply)
        calls = reply.get("tool_calls") or []
        if not calls:
            return reply["content"]
        for call in calls:
            if call["function"]["name"] != tool.name:
                output = f"error: no tool named {call['function']['name']!r}"
            else:
                output = tool(call["function"]["arguments"])  # runs in a fresh kvmfork sandbox
            print(f"\n--- turn {turn}: {call['function']['name']} -> {output.strip()[:300]}")
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
    raise RuntimeError(f"no answer after {max_turns} turns")


def main() -> int:
    with Sandbox() as sandbox:  # KVMFORK_URL / KVMFORK_API_KEY from the environment
        health = sandbox.health()
        print(f"kvmfork at {sandbox.base_url}: {health['status']}, languages {health.get('languages')}")
        answer = agent_loop(sandbox, ScriptedModel(), TASK)
    print("\n=== answer ===\n" + answer)
    return 0 if "Closest:" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
