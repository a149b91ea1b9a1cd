#!/usr/bin/env python3
"""Session phase of tests/loadbalancer.sh: live sessions through the real HAProxy.

Run by tests/loadbalancer.sh with both nodes (node ids n1 and n2) UP behind
HAProxy running deploy/haproxy.cfg:

    loadbalancer_sessions.py LB_URL API_KEY NODE1_PORT NODE2_PORT ADMIN_SOCKET SURVIVORS_FILE

Every check prints one line "ok<TAB>what" or "FAIL<TAB>what" (the shell script
counts them); "note<TAB>..." lines explain a failure. Exit status 0 means the
phase ran to its end, whatever the checks said; anything else is a crash.
One session per node is left alive and written to SURVIVORS_FILE as
"NODE ID" lines, for the node-down and node-restart checks that follow.

The guest agent that keeps Python globals between session execs is being
finished separately: with older agents `x = 1` in one exec may not be
visible in the next. Nothing here depends on state persisting: every exec
prints a constant or computed value, and routing is checked by the answer's
status, stdout and `sandbox_id`, and by the nodes' own 404 counters.
"""
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request

LB, KEY, PORT1, PORT2, ADMIN_SOCKET, SURVIVORS = sys.argv[1:7]
PORTS = {"n1": PORT1, "n2": PORT2}
SANDBOX_ID = re.compile(r"^sbx_(n1|n2)_[0-9]+_[0-9]+_[0-9a-f]{32}$")
CHECKPOINT_ID = re.compile(r"^ckpt_(n1|n2)_[0-9]+_[0-9]+_[0-9a-f]{32}$")
SESSIONS = 6
EXECS = 20


def report(ok, what):
    print(("ok" if ok else "FAIL") + "\t" + what, flush=True)
    return ok


def note(what):
    print("note\t" + what[:400], flush=True)


def node_of(ident):
    return ident.split("_")[1]


def call(method, path, body=None, headers=None, base=LB):
    """(status, decoded JSON or text). body: a dict (sent in its key order) or a str."""
    data = None
    if body is not None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, (json.loads(raw) if raw else None)
    except ValueError:
        return status, raw.decode(errors="replace")


def error_code(doc):
    return doc.get("error", {}).get("code") if isinstance(doc, dict) else None


def not_found_total(port):
    """All 404s a node has answered, from its own /v1/metrics (read directly)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvmfork_http_requests_total{") and 'status="404"' in line
    )


def admin(command):
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(ADMIN_SOCKET)
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out.decode()


def session_exec(sid, code, want):
    """Runs code in session sid through HAProxy; (right answer?, status)."""
    status, doc = call("POST", f"/v1/sandboxes/{sid}/exec", {"code": code})
    good = (
        status == 200
        and isinstance(doc, dict)
        and doc.get("exit_code") == 0
        and doc.get("stdout") == want
        and doc.get("sandbox_id") == sid
    )
    if not good:
        note(f"exec in {sid}: {status} {doc}")
    return good, status


def create(body, headers=None):
    """POST /v1/sandboxes through HAProxy; the new id or None."""
    status, doc = call("POST", "/v1/sandboxes", body, headers)
    sid = doc.get("sandbox_id", "") if isinstance(doc, dict) else ""
    if status == 201 and SANDBOX_ID.match(sid):
        return sid
    note(f"create {str(body)[:80]}…: {status} {doc}")
    return None


def main():
    live = []  # every session this phase created and has not deleted yet
    not_found_before = {n: not_found_total(p) for n, p in PORTS.items()}

    # ---- sessions are balanced over both nodes ----
    created = [create({"ttl_seconds": 600, "metadata": {"k": k}}) for k in range(SESSIONS)]
    created = [s for s in created if s]
    live += created
    report(len(created) == SESSIONS, f"{len(created)} of {SESSIONS} sessions created through HAProxy (201, well-formed ids)")
    by_node = {n: [s for s in created if node_of(s) == n] for n in PORTS}
    if not report(
        all(by_node.values()),
        f"the sessions landed on both nodes (n1: {len(by_node['n1'])}, n2: {len(by_node['n2'])})",
    ):
        report(False, "session phase stopped: it needs a session on each node")
        return

    # ---- 20 execs in each, through HAProxy: each must reach its node ----
    right = 0
    statuses = {}
    for k, sid in enumerate(created):
        for j in range(EXECS):
            good, status = session_exec(sid, f"print({k} * 1000 + sum(range({j})))", f"{k * 1000 + j * (j - 1) // 2}\n")
            right += good
            statuses[status] = statuses.get(status, 0) + 1
    total = len(created) * EXECS
    report(right == total, f"{right} of {total} session execs through HAProxy answered 200 with the right stdout and sandbox_id")
    report(statuses.get(404, 0) == 0, f"no session exec got a 404 (statuses: {statuses})")

    # ---- fork one session on each node; the children live there too ----
    for n in PORTS:
        parent = by_node[n][0]
        status, doc = call("POST", f"/v1/sandboxes/{parent}/fork", {"count": 2, "ttl_seconds": 600})
        children = [f.get("sandbox_id", "") for f in doc.get("forks", [])] if isinstance(doc, dict) else []
        live += [c for c in children if SANDBOX_ID.match(c)]
        ok = status == 201 and len(children) == 2 and all(SANDBOX_ID.match(c) and node_of(c) == n for c in children)
        if not ok:
            note(f"fork of {parent}: {status} {doc}")
        ok = ok and all(session_exec(c, f"print('child', {i}, 6 * 7)", f"child {i} 42\n")[0] for i, c in enumerate(children))
        report(ok, f"a session on {n} forked through HAProxy: 2 children on {n}, each answers its exec")

    # ---- checkpoint on each node, new sessions from it land on its node ----
    checkpoints = []
    for n in PORTS:
        parent = by_node[n][-1]
        status, doc = call("POST", f"/v1/sandboxes/{parent}/checkpoints")
        ckpt = doc.get("checkpoint_id", "") if isinstance(doc, dict) else ""
        if not report(
            status == 201 and CHECKPOINT_ID.match(ckpt) and node_of(ckpt) == n,
            f"a session on {n} checkpointed through HAProxy (checkpoint on {n})",
        ):
            note(f"checkpoint of {parent}: {status} {doc}")
            continue
        checkpoints.append(ckpt)
        # The field after others, and once in hand-written JSON with
        # newlines around the colon: the proxy searches the whole buffered
        # body, not a fixed position.
        bodies = [
            {"ttl_seconds": 600, "metadata": {"from": "checkpoint"}, "from_checkpoint": ckpt},
            {"metadata": {"pad": "x" * 8000}, "ttl_seconds": 600, "from_checkpoint": ckpt},
            '{"ttl_seconds": 600,\n  "from_checkpoint"\n    :\n "%s"\n}' % ckpt,
        ]
        restored = [create(b) for b in bodies]
        live += [s for s in restored if s]
        ok = all(s and node_of(s) == n for s in restored)
        ok = ok and all(session_exec(s, f"print('restored', {i})", f"restored {i}\n")[0] for i, s in enumerate(restored))
        report(ok, f"{len(bodies)} sessions from_checkpoint {n} through HAProxy all landed on {n} and answer execs")

    # ---- a batch from_sandbox, the field last, goes to the session's node ----
    # Batches 2-4 put the field 20 KiB into the body: inside the 31 KiB
    # deploy/haproxy.cfg searches (tune.bufsize 32768), past the 15 KiB a
    # default HAProxy buffer would show (then they would be balanced, and
    # some would reach the other node).
    for n in PORTS:
        source = by_node[n][0]
        ok = True
        for t in range(5):
            pad = " # " + "x" * 20000 if t >= 2 else ""
            body = {"executions": [{"code": f"print({t} * 7){pad}"}, {"code": f"print('{n}', {t})"}], "from_sandbox": source}
            status, doc = call("POST", "/v1/exec/batch", body)
            outs = [r.get("stdout") for r in doc.get("results", [])] if isinstance(doc, dict) else []
            if status != 200 or outs != [f"{t * 7}\n", f"{n} {t}\n"]:
                ok = False
                note(f"batch from_sandbox {source}: {status} {doc}")
        report(ok, f"5 batches from_sandbox on {n} through HAProxy (3 with the field 20 KiB in) answered 200 with the right results")

    not_found_after = {n: not_found_total(p) for n, p in PORTS.items()}
    report(
        not_found_after == not_found_before,
        "neither node answered a 404 while sessions were used through HAProxy (no misrouted request; "
        f"404s n1 {not_found_after['n1'] - not_found_before['n1']:.0f}, n2 {not_found_after['n2'] - not_found_before['n2']:.0f})",
    )

    # ---- X-Kvmfork-Node picks the node for a request that names none ----
    for n in PORTS:
        status, doc = call("GET", "/v1/sandboxes", headers={"X-Kvmfork-Node": n})
        listed = {s.get("sandbox_id") for s in doc.get("sandboxes", [])} if isinstance(doc, dict) else set()
        mine = {s for s in live if node_of(s) == n}
        if not report(
            status == 200 and listed == mine,
            f"GET /v1/sandboxes with X-Kvmfork-Node: {n} lists exactly the {len(mine)} live sessions on {n}",
        ):
            note(f"listed {status} {sorted(listed)}, want {sorted(mine)}")
    status, doc = call("GET", "/v1/sandboxes", headers={"X-Kvmfork-Node": "n9"})
    report(status == 400 and error_code(doc) == "unknown_node", f"X-Kvmfork-Node naming an unknown node is refused (400 unknown_node; got {status} {error_code(doc)})")

    # ---- draining a node in the balanced backend keeps its sessions ----
    out = admin("set server kvmfork_nodes/kvmfork1 state drain")
    if out.strip():
        note(f"admin socket: {out}")
    try:
        new = [create({"ttl_seconds": 600}) for _ in range(4)]
        live += [s for s in new if s]
        report(all(s and node_of(s) == "n2" for s in new), "with kvmfork1 draining in kvmfork_nodes, 4 new sessions all went to n2")
        report(
            session_exec(by_node["n1"][0], "print('still', 1 + 1)", "still 2\n")[0],
            "a session on the draining node n1 still answers through HAProxy",
        )
    finally:
        admin("set server kvmfork_nodes/kvmfork1 state ready")

    # ---- delete everything but one session per node ----
    survivors = {n: by_node[n][0] for n in PORTS}
    statuses = {}
    for ckpt in checkpoints:
        status, _ = call("DELETE", f"/v1/checkpoints/{ckpt}")
        statuses[status] = statuses.get(status, 0) + 1
    doomed = [s for s in live if s not in survivors.values()]
    for sid in doomed:
        status, _ = call("DELETE", f"/v1/sandboxes/{sid}")
        statuses[status] = statuses.get(status, 0) + 1
    report(
        statuses == {204: len(checkpoints) + len(doomed)},
        f"{len(checkpoints)} checkpoints and {len(doomed)} sessions deleted through HAProxy (all 204; got {statuses})",
    )
    gone = 0
    for sid in doomed:
        status, doc = call("GET", f"/v1/sandboxes/{sid}")
        # The owning node's own "not found", not a foreign node's refusal.
        if status == 404 and error_code(doc) == "sandbox_not_found" and "not on this node" not in str(doc):
            gone += 1
        else:
            note(f"GET deleted {sid}: {status} {doc}")
    report(gone == len(doomed), f"{gone} of {len(doomed)} deleted sessions answer 404 sandbox_not_found from their own node")
    for n in PORTS:
        status, doc = call("GET", "/v1/sandboxes", headers={"X-Kvmfork-Node": n})
        listed = [s.get("sandbox_id") for s in doc.get("sandboxes", [])] if isinstance(doc, dict) else []
        report(status == 200 and listed == [survivors[n]], f"after the deletes {n} lists only the session kept for the next phases")

    with open(SURVIVORS, "w") as f:
        for n, sid in survivors.items():
            f.write(f"{n} {sid}\n")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    note(f"session phase took {time.monotonic() - started:.1f} s")
