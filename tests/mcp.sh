#!/usr/bin/env bash
# `kvmfork mcp` driven over stdio and streamable HTTP (--listen) by the
# official Python MCP client (PyPI `mcp` 2.x, installed into a throwaway venv)
# against a live kvmfork server:
#
#   KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_TEST_API_KEY=<key>] bash tests/mcp.sh [KVMFORK_BINARY]
#
# The binary defaults to target/release/kvmfork of this checkout. Prints
# "N passed, N failed" (tests/mcp_client.py); exits non-zero on any failure.
set -euo pipefail

if [[ -z "${KVMFORK_URL:-}" ]]; then
  echo "tests/mcp.sh: KVMFORK_URL must point at a running kvmfork server (e.g. http://127.0.0.1:8080)" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/target/release/kvmfork}
[[ -x $bin ]] || { echo "tests/mcp.sh: no kvmfork binary at $bin (cargo build --release)" >&2; exit 2; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvmfork-mcp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check 'mcp>=2.3,<3'
"$tmp/venv/bin/python" -c 'import importlib.metadata as m; print("MCP client: mcp", m.version("mcp"))'
"$tmp/venv/bin/python" "$root/tests/mcp_client.py" "$bin"
