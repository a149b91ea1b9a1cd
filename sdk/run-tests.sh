#!/usr/bin/env bash
# Runs the Python and TypeScript SDK test suites against a live forkd server.
#
#   FORKD_URL=http://127.0.0.1:8080 [FORKD_TEST_API_KEY=<key>] sdk/run-tests.sh [python|typescript]...
#
# With no argument both suites run; the exit status is non-zero if either fails.
set -uo pipefail

if [[ -z "${FORKD_URL:-}" ]]; then
  echo "sdk/run-tests.sh: FORKD_URL must point at a running forkd server (e.g. http://127.0.0.1:8080)" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suites=("$@")
[[ ${#suites[@]} -eq 0 ]] && suites=(python typescript)

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

status=0
for suite in "${suites[@]}"; do
  case "$suite" in
    python | typescript) ;;
    *) echo "sdk/run-tests.sh: unknown suite '$suite' (python or typescript)" >&2; exit 2 ;;
  esac
  echo "=== SDK suite: $suite against $FORKD_URL ==="
  if ! "run_$suite"; then
    echo "=== SDK suite $suite FAILED ===" >&2
    status=1
  fi
done
exit "$status"
