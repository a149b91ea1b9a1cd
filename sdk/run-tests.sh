#!/usr/bin/env bash
# Runs the Python and TypeScript SDK test suites against a live kvmfork server.
#
#   KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_TEST_API_KEY=<key>] sdk/run-tests.sh [python|typescript|examples]...
#
# With no argument all three run (examples: the agent loops in examples/, which
# need the TypeScript build); the exit status is non-zero if any fails.
set -uo pipefail

if [[ -z "${KVMFORK_URL:-}" ]]; then
  echo "sdk/run-tests.sh: KVMFORK_URL must point at a running kvmfork server (e.g. http://127.0.0.1:8080)" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suites=("$@")
[[ ${#suites[@]} -eq 0 ]] && suites=(python typescript examples)

run_python() {
  if ! python3 -c 'import pytest' 2>/dev/null; then
    # PEP 668 system Pythons refuse a plain install; this is a throwaway CI/dev machine.
    python3 -m pip install --quiet 'pytest>=7' 2>/dev/null ||
      python3 -m pip install --quiet --break-system-packages 'pytest>=7' || return 1
  fi
  (cd "$here/python" && python3 -m pytest -p no:cacheprovider -q -rfE)
}

run_typescript() {
  local major
  major=$(node -p 'process.versions.node.split(".")[0]') || return 1
  if (( major < 18 )); then
    echo "sdk/run-tests.sh: Node >= 18 is needed (global fetch), found $(node --version)" >&2
    return 1
  fi
  (cd "$here/typescript" &&
    npm ci --no-audit --no-fund --loglevel=error &&
    npm run --silent build &&
    node --test test/*.test.mjs test/*.test.cjs)
}

run_example() {
  local name=$1 log
  shift
  log=$(mktemp)
  if KVMFORK_API_KEY="${KVMFORK_TEST_API_KEY:-}" "$@" >"$log" 2>&1; then
    echo "$name: ok"
    rm -f "$log"
    return 0
  fi
  echo "$name: FAILED"
  cat "$log"
  rm -f "$log"
  return 1
}

run_examples() {
  if [[ ! -f "$here/typescript/dist/esm/index.js" ]]; then
    (cd "$here/typescript" && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build) || return 1
  fi
  local rc=0
  run_example examples/agent_loop.py python3 "$here/../examples/agent_loop.py" || rc=1
  run_example examples/agent_loop.mjs node "$here/../examples/agent_loop.mjs" || rc=1
  return "$rc"
}

status=0
for suite in "${suites[@]}"; do
  case "$suite" in
    python | typescript | examples) ;;
    *) echo "sdk/run-tests.sh: unknown suite '$suite' (python, typescript or examples)" >&2; exit 2 ;;
  esac
  echo "=== SDK suite: $suite against $KVMFORK_URL ==="
  if ! "run_$suite"; then
    echo "=== SDK suite $suite FAILED ===" >&2
    status=1
  fi
done
exit "$status"
