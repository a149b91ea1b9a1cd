"""Drives `kvmfork mcp` over stdio and streamable HTTP with the official
Python MCP client (the `mcp` package) against a live kvmfork server. Run by

    python tests/mcp_client.py /path/to/kvmfork

KVMFORK_URL and KVMFORK_TEST_API_KEY name the server and key; the MCP server
gets them as KVMFORK_URL / KVMFORK_API_KEY. Prints "N passed, N failed" and
exits non-zero on any failure.
"""

import asyncio
import json
import os
import re
import sys
import traceback

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

EXPECTED_TOOLS = {
    "run_code",
    "create_sandbox",
    "run_in_sandbox",
    "fork_sandbox",
    "delete_sandbox",
    "checkpoint_sandbox",
    "restore_sandbox",
}

passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def call(session, name, args):
    result = await session.call_tool(name, args)
    sc = result.structured_content
    # The text content is the same JSON as structuredContent.
    if sc is not None:
        try:
            same = json.loads(text_of(result)) == sc
        except ValueError:
            same = False
        check(f"{name}: text content is the structured JSON", same, text_of(result)[:300])
    return result, sc


async def main(binary):
    env = dict(os.environ)
    env["KVMFORK_URL"] = os.environ["KVMFORK_URL"]
    env["KVMFORK_API_KEY"] = os.environ.get("KVMFORK_TEST_API_KEY", "")
    params = StdioServerParameters(command=binary, args=["mcp"], env=env)
    async with stdio_client(params) as streams:
        async with ClientSession(*streams) as session:
            init = await session.initialize()
            check("initialize: server is kvmfork", init.server_info.name == "kvmfork", init.server_info)
            check("initialize: tools capability", init.capabilities.tools is not None, init.capabilities)

            tools = (await session.list_tools()).tools
            names = {t.name for t in tools}
            check("list_tools: the tool names", names == EXPECTED_TOOLS, sorted(names))
            for t in tools:
                schema = t.input_schema or {}
                check(
                    f"list_tools: {t.name} has an object schema and a description",
                    schema.get("type") == "object" and bool(t.description),
                    schema,
                )
            by_name = {t.name: t for t in tools}
            if "run_in_sandbox" in by_name:
                req = set(by_name["run_in_sandbox"].input_schema.get("required", []))
                check("list_tools: run_in_sandbox requires sandbox_id and code", req == {"sandbox_id", "code"}, req)

            r, sc = await call(session, "run_code", {"code": "print(1 + 1)"})
            check(
                "run_code print(1 + 1) -> 2",
                not r.is_error and sc and sc["stdout"] == "2\n" and sc["exit_code"] == 0 and sc["timed_out"] is False,
                sc,
            )

            r, sc = await call(session, "run_code", {"code": "import sys; print('e', file=sys.stderr); sys.exit(3)"})
            check(
                "run_code: stderr and exit code 3 (not a tool error)",
                not r.is_error and sc and sc["stderr"] == "e\n" and sc["exit_code"] == 3,
                sc,
            )

            r, sc = await call(session, "run_code", {"code": "while True: pass", "timeout_seconds": 1})
            check(
                "run_code: timeout -> timed_out and error.code timeout",
                not r.is_error and sc and sc["timed_out"] is True and (sc["error"] or {}).get("code") == "timeout",
                sc,
            )

            r, sc = await call(session, "run_code", {"code": "1", "language": "cobol"})
            check(
                "run_code: unknown language -> tool error 400 unknown_language",
                r.is_error and sc and sc["error"]["status"] == 400 and sc["error"]["code"] == "unknown_language",
                (r.is_error, sc),
            )

            r = await session.call_tool("run_code", {"timeout_seconds": 1})
            check(
                "run_code without code -> tool error naming the field",
                r.is_error and "code" in text_of(r),
                (r.is_error, text_of(r)),
            )

            r, sc = await call(session, "run_code", {"code": "print(1)", "timeout_seconds": -1})
            check(
                "run_code timeout_seconds -1 -> tool error invalid_argument",
                r.is_error and sc and sc["error"]["code"] == "invalid_argument",
                (r.is_error, sc),
            )

            r, sc = await call(session, "create_sandbox", {"ttl_seconds": 120})
            sid = (sc or {}).get("sandbox_id")
            check("create_sandbox -> sandbox_id", not r.is_error and bool(sid), sc)
            if not sid:
                return

            r, sc = await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "x = 1"})
            check(
                "run_in_sandbox x = 1 -> no result, execution_count 1",
                not r.is_error and sc and sc["result"] is None and sc["execution_count"] == 1,
                sc,
            )
            r, sc = await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "x + 1"})
            check(
                "run_in_sandbox x + 1 -> result 2, execution_count 2",
                not r.is_error and sc and (sc["result"] or {}).get("text") == "2" and sc["execution_count"] == 2,
                sc,
            )

            r, sc = await call(session, "checkpoint_sandbox", {"sandbox_id": sid})
            ckpt = (sc or {}).get("checkpoint_id")
            check("checkpoint_sandbox -> checkpoint_id", not r.is_error and bool(ckpt), sc)
            if ckpt:
                await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "x = 100"})
                r, sc = await call(session, "restore_sandbox", {"sandbox_id": sid, "checkpoint_id": ckpt})
                check("restore_sandbox", not r.is_error, sc)
                r, sc = await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "x"})
                check("restore_sandbox: x is 1 again", (sc or {}).get("result", {}).get("text") == "1", sc)

            r, sc = await call(session, "fork_sandbox", {"sandbox_id": sid, "count": 2})
            kids = (sc or {}).get("sandbox_ids") or []
            check("fork_sandbox 2 -> two child ids", not r.is_error and len(kids) == 2 and sid not in kids, sc)
            for kid in kids:
                r, sc = await call(session, "run_in_sandbox", {"sandbox_id": kid, "code": "x + 10"})
                check(f"fork child {kid[-6:]} sees x", (sc or {}).get("result", {}).get("text") == "11", sc)
                r, _ = await call(session, "delete_sandbox", {"sandbox_id": kid})
                check(f"delete fork child {kid[-6:]}", not r.is_error, text_of(r))

            r, sc = await call(session, "delete_sandbox", {"sandbox_id": sid})
            check("delete_sandbox", not r.is_error and sc == {"deleted": sid}, sc)

            r, sc = await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "x"})
            check(
                "run_in_sandbox on a deleted id -> tool error 404 sandbox_not_found",
                r.is_error and sc and sc["error"]["status"] == 404 and sc["error"]["code"] == "sandbox_not_found"
                and "sandbox_not_found" in text_of(r),
                (r.is_error, sc),
            )

            r, sc = await call(session, "run_in_sandbox", {"sandbox_id": "../exec", "code": "x"})
            check(
                "run_in_sandbox with a path-like id -> tool error invalid_argument",
                r.is_error and sc and sc["error"]["code"] == "invalid_argument",
                (r.is_error, sc),
            )

            r, sc = await call(session, "fork_sandbox", {"sandbox_id": "sbx_nope", "count": 1})
            check(
                "fork_sandbox on an unknown id -> tool error 404",
                r.is_error and sc and sc["error"]["status"] == 404,
                (r.is_error, sc),
            )

    # A wrong key: the server's 401 is a tool error, not a protocol failure.
    if os.environ.get("KVMFORK_TEST_API_KEY"):
        env["KVMFORK_API_KEY"] = "wrong-key"
        params = StdioServerParameters(command=binary, args=["mcp"], env=env)
        async with stdio_client(params) as streams:
            async with ClientSession(*streams) as session:
                await session.initialize()
                r, sc = await call(session, "run_code", {"code": "print(1)"})
                check(
                    "wrong API key -> tool error 401 unauthorized",
                    r.is_error and sc and sc["error"]["status"] == 401 and sc["error"]["code"] == "unauthorized",
                    (r.is_error, sc),
                )

    # Streamable HTTP: `kvmfork mcp --listen 127.0.0.1:0`, its address read
    # from its log line.
    env["KVMFORK_API_KEY"] = os.environ.get("KVMFORK_TEST_API_KEY", "")
    proc = await asyncio.create_subprocess_exec(
        binary, "mcp", "--listen", "127.0.0.1:0", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/mcp)", line)
        check("mcp --listen: announces its URL", m is not None, line)
        if m:
            async with streamable_http_client(m.group(1)) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    init = await session.initialize()
                    check("http: initialize", init.server_info.name == "kvmfork", init.server_info)
                    names = {t.name for t in (await session.list_tools()).tools}
                    check("http: list_tools", names == EXPECTED_TOOLS, sorted(names))
                    r, sc = await call(session, "run_code", {"code": "print(1 + 1)"})
                    check("http: run_code -> 2", not r.is_error and sc and sc["stdout"] == "2\n", sc)
                    r, sc = await call(session, "create_sandbox", {})
                    sid = (sc or {}).get("sandbox_id")
                    check("http: create_sandbox", not r.is_error and bool(sid), sc)
                    if sid:
                        await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "y = 20"})
                        r, sc = await call(session, "run_in_sandbox", {"sandbox_id": sid, "code": "y + 1"})
                        check("http: run_in_sandbox keeps state", (sc or {}).get("result", {}).get("text") == "21", sc)
                        r, _ = await call(session, "delete_sandbox", {"sandbox_id": sid})
                        check("http: delete_sandbox", not r.is_error, text_of(r))
                        r, sc = await call(session, "delete_sandbox", {"sandbox_id": sid})
                        check(
                            "http: deleting it again -> tool error sandbox_not_found",
                            r.is_error and sc and sc["error"]["code"] == "sandbox_not_found",
                            (r.is_error, sc),
                        )
    finally:
        proc.terminate()
        await proc.wait()

    # Only loopback addresses are accepted for --listen.
    bad = await asyncio.create_subprocess_exec(
        binary, "mcp", "--listen", "0.0.0.0:0", env=env, stderr=asyncio.subprocess.PIPE
    )
    err = (await bad.stderr.read()).decode()
    rc = await bad.wait()
    check("mcp --listen 0.0.0.0 is refused", rc != 0 and "loopback" in err, (rc, err))

    # No server at the URL: a tool error naming the URL.
    env["KVMFORK_URL"] = "http://127.0.0.1:9"
    params = StdioServerParameters(command=binary, args=["mcp"], env=env)
    async with stdio_client(params) as streams:
        async with ClientSession(*streams) as session:
            await session.initialize()
            r, sc = await call(session, "run_code", {"code": "print(1)"})
            check(
                "unreachable API -> tool error api_unreachable",
                r.is_error and sc and sc["error"]["code"] == "api_unreachable" and "127.0.0.1:9" in sc["error"]["message"],
                (r.is_error, sc),
            )


if __name__ == "__main__":
    if len(sys.argv) != 2 or "KVMFORK_URL" not in os.environ:
        print("usage: KVMFORK_URL=… [KVMFORK_TEST_API_KEY=…] python tests/mcp_client.py KVMFORK_BINARY", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1]), timeout=300))
    except BaseException:
        traceback.print_exc()
        failed += 1
        print("FAIL the MCP session ended with an exception")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
