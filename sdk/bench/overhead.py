#!/usr/bin/env python3
"""Client-side latency of the Python SDK against a live kvmfork server.

Runs ``--requests`` sequential ``exec`` calls (after ``--warmup``) and prints
percentiles of the wall time seen by the caller, the server's
``total_time_ms``, and their difference: what HTTP, JSON and the SDK add.

    KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_API_KEY=...] python3 sdk/bench/overhead.py -n 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "src"))
from kvmfork import Sandbox  # noqa: E402

PERCENTILES = (50, 90, 99, 99.9)


def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def report(name: str, values: list) -> None:
    values = sorted(values)
    cells = "  ".join(f"p{p:g}={percentile(values, p):8.3f}" for p in PERCENTILES)
    print(f"{name:<22} {cells}  max={values[-1]:8.3f}  (ms, n={len(values)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--code", default="print(1 + 1)")
    args = parser.parse_args()
    if not os.environ.get("KVMFORK_URL"):
        sys.exit("KVMFORK_URL must point at a running kvmfork server")

    walls, servers, overheads = [], [], []
    with Sandbox() as sb:
        for i in range(args.warmup + args.requests):
            started = time.perf_counter()
            result = sb.exec(args.code)
            wall = (time.perf_counter() - started) * 1000
            if not result.ok:
                sys.exit(f"run failed: exit {result.exit_code}, {result.error}, {result.stderr[-300:]}")
            if i >= args.warmup:
                walls.append(wall)
                servers.append(result.total_time_ms)
                overheads.append(wall - result.total_time_ms)
    print(f"kvmfork-python SDK, sequential exec of {args.code!r} against {os.environ['KVMFORK_URL']}")
    report("wall (caller)", walls)
    report("server total_time_ms", servers)
    report("wall - server", overheads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
