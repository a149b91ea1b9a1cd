"""Exposing a sandbox to an LLM as a function-calling tool.

``spec()`` gives the JSON-schema description in the shape an LLM API wants;
calling the tool with the model's arguments runs the code and returns text
for the model: stdout on success, otherwise the exit status, stderr and
stdout, so the model can read its own traceback and fix the code.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .errors import BadRequest
from .models import ExecResult

if TYPE_CHECKING:
    from .client import Sandbox

Arguments = Union[str, Mapping[str, Any]]

#: Spec shapes understood by :meth:`SandboxTool.spec`.
FORMATS = ("openai", "anthropic", "json_schema")

# Output beyond this is cut before it goes back to the model (context budget).
MAX_TOOL_OUTPUT_CHARS = 20_000


class SandboxTool:
    """A ``run_code(code, language)`` tool backed by a :class:`~kvmfork.Sandbox`."""

    def __init__(self, sandbox: "Sandbox", name: str = "run_code",
                 description: Optional[str] = None,
                 languages: Sequence[str] = ("python", "node"), timeout: Optional[float] = None):
        if not languages:
            raise ValueError("a tool needs at least one language")
        self.sandbox = sandbox
        self.name = name
        self.languages = tuple(languages)
        self.timeout = timeout
        self.description = description or (
            f"Run a {' or '.join(self.languages)} program in a fresh, isolated sandbox VM "
            "(Python has numpy). Nothing persists between calls and there is no network: "
            "put everything in one program and print() the values you need. Returns stdout "
            "when the program succeeds, otherwise its exit status, stderr and stdout."
        )

    def parameters(self) -> Dict[str, Any]:
        """The JSON schema of the tool's arguments."""
        return {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "The complete program to run."},
                "language": {"type": "string", "enum": list(self.languages),
                             "description": f"Defaults to {self.languages[0]}."},
            },
            "required": ["code"],
            "additionalProperties": False,
        }

    def spec(self, format: str = "openai") -> Dict[str, Any]:
        """The tool description: ``openai`` (chat/completions ``tools`` entry),
        ``anthropic`` (``input_schema``) or ``json_schema`` (name, description, parameters)."""
        if format == "openai":
            return {"type": "function", "function": {
                "name": self.name, "description": self.description,
                "parameters": self.parameters()}}
        if format == "anthropic":
            return {"name": self.name, "description": self.description,
                    "input_schema": self.parameters()}
        if format == "json_schema":
            return {"name": self.name, "description": self.description,
                    "parameters": self.parameters()}
        raise ValueError(f"unknown tool spec format {format!r}; use one of {FORMATS}")

    def parse_arguments(self, arguments: Arguments) -> Tuple[str, str]:
        """``(code, language)`` from the model's arguments (a JSON string or a dict)."""
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, Mapping) or not isinstance(arguments.get("code"), str):
            raise ValueError("tool arguments need a 'code' string")
        return arguments["code"], str(arguments.get("language") or self.languages[0])

    def __call__(self, arguments: Arguments) -> str:
        """Runs the model's code; returns the text to hand back as the tool result."""
        try:
            code, language = self.parse_arguments(arguments)
        except ValueError as exc:
            return f"error: bad tool arguments: {exc}"
        try:
            result = self.sandbox.exec(code, language, self.timeout)
        except BadRequest as exc:
            # The model's fault (e.g. a language we do not run): let it retry.
            return f"error: the sandbox refused the request: {exc.message}"
        return format_result(result)


class AsyncSandboxTool(SandboxTool):
    """:class:`SandboxTool` whose call is a coroutine (for asyncio agent loops)."""

    async def __call__(self, arguments: Arguments) -> str:  # type: ignore[override]
        return await asyncio.to_thread(SandboxTool.__call__, self, arguments)


def format_result(result: ExecResult) -> str:
    """Compact text of a run for an LLM."""
    if result.ok:
        text = result.stdout if result.stdout.strip() else "(the program printed nothing)"
        if result.stdout_truncated:
            text += "\n[stdout was truncated by the sandbox]"
        return _clip(text)
    if result.timed_out:
        head = "the program was stopped: it ran past its time limit"
    elif result.error is not None:
        head = f"the sandbox failed ({result.error.code}): {result.error.message}"
    else:
        head = f"the program exited with status {result.exit_code}"
    parts = [head]
    if result.stderr:
        parts.append("stderr:\n" + result.stderr)
    if result.stdout:
        parts.append("stdout:\n" + result.stdout)
    return _clip("\n".join(parts))


def _clip(text: str) -> str:
    if len(text) <= MAX_TOOL_OUTPUT_CHARS:
        return text
    half = MAX_TOOL_OUTPUT_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
