#!/usr/bin/env bash
# The packages a user installs, tested as a user gets them, against a live
# kvmfork server:
#
#   KVMFORK_URL=http://127.0.0.1:8080 [KVMFORK_TEST_API_KEY=<key>] bash tests/packages.sh
#
# - Python: a wheel and an sdist built with PyPI's `build` (in a throwaway
#   venv), each installed into a fresh venv; the README's examples run from
#   outside the source tree, so the installed package is what is imported.
# - TypeScript: `npm pack` of the built SDK, `npm install <tarball>` into an
#   empty project; ESM `import` and CJS `require` against the server, and the
#   published types checked with `tsc --noEmit` on a small consumer.
# - Rust: `cargo install --path . --root <tmp>` (the worktree's target dir is
#   reused, so dependencies are not rebuilt); `kvmfork --version` names the
#   commit and the installed binary finds its guest sources.
#
# Everything is built in a temporary directory, removed at the end (npm and
# pip keep only their own download caches). Prints "N passed, N failed";
# exits non-zero on any failure.
set -euo pipefail

if [[ -z "${KVMFORK_URL:-}" ]]; then
  echo "tests/packages.sh: KVMFORK_URL must point at a running kvmfork server (e.g. http://127.0.0.1:8080)" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvmfork-packages.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export KVMFORK_URL KVMFORK_TEST_API_KEY="${KVMFORK_TEST_API_KEY:-}"
# What the examples read; the SDKs also look at these.
export KVMFORK_API_KEY="$KVMFORK_TEST_API_KEY"

passed=0
failed=0
# check NAME CMD...: runs CMD (output kept in a log, shown on failure).
check() {
  local name=$1 log="$tmp/check.log"
  shift
  if "$@" >"$log" 2>&1; then
    echo "ok   $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    sed 's/^/     | /' "$log" | tail -n 40
    failed=$((failed + 1))
  fi
}
# step NAME CMD...: like check, but a failure stops the section (returns 1).
step() { local before=$failed; check "$@"; ((failed == before)); }

# ---------------------------------------------------------------- Python
python_build() {
  # A copy, so the build leaves no egg-info or build/ in the checkout.
  cp -r "$root/sdk/python" "$tmp/py-src"
  rm -rf "$tmp/py-src"/{build,dist} "$tmp/py-src"/src/*.egg-info
  python3 -m venv "$tmp/venv-build" &&
    "$tmp/venv-build/bin/pip" install --quiet --disable-pip-version-check build &&
    "$tmp/venv-build/bin/python" -m build --outdir "$tmp/py-dist" "$tmp/py-src" &&
    ls "$tmp"/py-dist/kvmfork-*.whl "$tmp"/py-dist/kvmfork-*.tar.gz
}

wheel_contents() {
  "$tmp/venv-build/bin/python" - "$tmp"/py-dist/kvmfork-*.whl <<'EOF'
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(names))
assert "kvmfork/py.typed" in names, "no kvmfork/py.typed"
for module in ("__init__", "client", "aio", "session", "tool", "transport"):
    assert f"kvmfork/{module}.py" in names, f"no kvmfork/{module}.py"
tests = [n for n in names if re.search(r"(^|/)(tests?/|test_[^/]*\.py$|conftest\.py$)", n)]
assert not tests, f"test files in the wheel: {tests}"
EOF
}

sdist_contents() {
  local list f
  list=$(tar -tzf "$tmp"/py-dist/kvmfork-*.tar.gz)
  echo "$list"
  for f in PKG-INFO pyproject.toml README.md src/kvmfork/__init__.py src/kvmfork/py.typed; do
    grep -qE "^kvmfork-[^/]+/$f\$" <<<"$list" || { echo "missing $f"; return 1; }
  done
}

venv_install() { # DIR PACKAGE-FILE
  python3 -m venv "$1" && "$1/bin/pip" install --quiet --disable-pip-version-check "$2"
}

# pyrun VENV CODE: the venv's Python, isolated (-I: no cwd, no PYTHONPATH,
# no user site), run from a directory outside the checkout.
pyrun() { (cd "$tmp/run" && "$1/bin/python" -I -c "$2"); }

python_checks() { # VENV LABEL
  local venv=$1 label=$2
  check "python ($label): the installed package is imported, version matches its metadata" pyrun "$venv" "
import importlib.metadata, kvmfork, sys
print(kvmfork.__file__)
assert kvmfork.__file__.startswith(sys.prefix), (kvmfork.__file__, sys.prefix)
assert '$root' not in kvmfork.__file__
assert kvmfork.__version__ == importlib.metadata.version('kvmfork'), kvmfork.__version__"
  check "python ($label): Sandbox(key).run('print(1 + 1)') == '2'" pyrun "$venv" "
import os
from kvmfork import Sandbox
out = Sandbox(os.environ['KVMFORK_TEST_API_KEY'] or None).run('print(1 + 1)')
assert out == '2', repr(out)"
}

python_examples() { # VENV
  local venv=$1
  check "python (wheel): multi-line numpy mean is 4.5" pyrun "$venv" "
from kvmfork import Sandbox
out = Sandbox().run('import numpy as np\nprint(np.arange(10).mean())')
assert out == '4.5', repr(out)"
  check "python (wheel): agent-style JSON answer parses back" pyrun "$venv" "
import json
from kvmfork import Sandbox
code = '''
import json, statistics
data = [3, 1, 4, 1, 5, 9, 2, 6]
print(json.dumps({\"n\": len(data), \"mean\": statistics.mean(data), \"sorted\": sorted(data)}))
'''
answer = json.loads(Sandbox().run(code))
assert answer == {'n': 8, 'mean': 3.875, 'sorted': [1, 1, 2, 3, 4, 5, 6, 9]}, answer"
  check "python (wheel): ten concurrent runs via asyncio.to_thread" pyrun "$venv" "
import asyncio
from kvmfork import Sandbox
sb = Sandbox()
async def main():
    return await asyncio.gather(*(asyncio.to_thread(sb.run, f'print({i} * {i})') for i in range(10)))
outs = asyncio.run(main())
assert outs == [str(i * i) for i in range(10)], outs"
  check "python (wheel): AsyncSandbox runs Python and Node" pyrun "$venv" "
import asyncio
from kvmfork import AsyncSandbox
async def main():
    async with AsyncSandbox() as sb:
        return await asyncio.gather(sb.run('print(6 * 7)'), sb.run('console.log(6 * 7)', language='node'))
outs = asyncio.run(main())
assert outs == ['42', '42'], outs"
}

section_python() {
  mkdir -p "$tmp/run"
  step "python: wheel and sdist built with PyPI build" python_build || return 0
  check "python: the wheel has py.typed and no test files" wheel_contents
  check "python: the sdist has the sources and py.typed" sdist_contents
  if step "python: the wheel installs into a fresh venv" venv_install "$tmp/venv-wheel" "$(ls "$tmp"/py-dist/kvmfork-*.whl)"; then
    python_checks "$tmp/venv-wheel" wheel
    python_examples "$tmp/venv-wheel"
  fi
  if step "python: the sdist installs into a fresh venv" venv_install "$tmp/venv-sdist" "$(ls "$tmp"/py-dist/kvmfork-*.tar.gz)"; then
    python_checks "$tmp/venv-sdist" sdist
  fi
}

# ------------------------------------------------------------ TypeScript
npm_quiet=(--no-audit --no-fund --loglevel=error)

ts_pack() {
  (cd "$root/sdk/typescript" &&
    npm ci "${npm_quiet[@]}" &&
    npm run --silent build &&
    npm pack --silent --pack-destination "$tmp" >"$tmp/pack-name") &&
    ls "$tmp/$(cat "$tmp/pack-name")"
}

ts_tarball_contents() {
  local list
  list=$(tar -tzf "$tmp/$(cat "$tmp/pack-name")")
  echo "$list"
  for f in package/package.json package/dist/esm/index.js package/dist/esm/index.d.ts package/dist/esm/package.json \
    package/dist/cjs/index.js package/dist/cjs/index.d.ts package/dist/cjs/package.json package/README.md; do
    grep -qx "$f" <<<"$list" || { echo "missing $f"; return 1; }
  done
  if grep -E '^package/(test|node_modules)/' <<<"$list"; then echo "tests or node_modules packed"; return 1; fi
}

ts_install() {
  mkdir -p "$tmp/ts-app"
  printf '{ "name": "kvmfork-consumer", "version": "1.0.0", "private": true }\n' >"$tmp/ts-app/package.json"
  (cd "$tmp/ts-app" && npm install "${npm_quiet[@]}" "$tmp/$(cat "$tmp/pack-name")") || return 1
  # No runtime dependencies: the SDK is all that was installed.
  local installed
  installed=$(cd "$tmp/ts-app/node_modules" && find . -mindepth 1 -maxdepth 2 -name '.*' -prune -o -print | sort | tr '\n' ' ')
  echo "node_modules: $installed"
  [[ $installed == "./@kvmfork ./@kvmfork/sdk " ]]
}

ts_esm() {
  cat >"$tmp/ts-app/esm.mjs" <<'EOF'
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { Sandbox, ExecError } from "@kvmfork/sdk";

const where = fileURLToPath(import.meta.resolve("@kvmfork/sdk"));
assert.ok(where.endsWith("/node_modules/@kvmfork/sdk/dist/esm/index.js"), where);
const apiKey = process.env.KVMFORK_TEST_API_KEY || undefined;
const py = new Sandbox(apiKey, process.env.KVMFORK_URL);
assert.equal(py.language, "python");
assert.equal(await py.run("print(1 + 1)"), "2");
const node = new Sandbox({ apiKey, language: "node" });
assert.equal(node.language, "node");
assert.equal(await node.run("console.log(1 + 1)"), "2");
assert.equal(await node.run("print(2 + 2)", "python"), "4");
await assert.rejects(node.run("process.exit(3)"), (e) => e instanceof ExecError && e.exitCode === 3);
console.log("esm ok");
EOF
  (cd "$tmp/run" && node "$tmp/ts-app/esm.mjs")
}

ts_cjs() {
  cat >"$tmp/ts-app/cjs.cjs" <<'EOF'
const assert = require("node:assert/strict");
const { Sandbox } = require("@kvmfork/sdk");

const where = require.resolve("@kvmfork/sdk");
assert.ok(where.endsWith("/node_modules/@kvmfork/sdk/dist/cjs/index.js"), where);
(async () => {
  const apiKey = process.env.KVMFORK_TEST_API_KEY || undefined;
  assert.equal(await new Sandbox({ apiKey }).run("print(1 + 1)"), "2");
  const node = new Sandbox({ apiKey, language: "node" });
  assert.equal(await node.run("console.log(1 + 1)"), "2");
  const results = await node.runBatch(["console.log('a')", { code: "print('b')", language: "python" }]);
  assert.deepEqual(results.map((r) => r.stdout), ["a\n", "b\n"]);
  console.log("cjs ok");
})().catch((e) => { console.error(e); process.exit(1); });
EOF
  (cd "$tmp/run" && node "$tmp/ts-app/cjs.cjs")
}

ts_types() {
  local app=$tmp/ts-app
  (cd "$app" && npm install "${npm_quiet[@]}" --save-dev "typescript@$(node -p 'require(process.argv[1]).devDependencies.typescript' "$root/sdk/typescript/package.json")") || return 1
  cat >"$app/consumer.mts" <<'EOF'
import { Sandbox, SandboxTimeout, type ExecResult, type SandboxOptions } from "@kvmfork/sdk";
const options: SandboxOptions = { language: "node", maxRetries: 1 };
const sb = new Sandbox(options);
const out: string = await sb.run("console.log(1 + 1)");
const result: ExecResult = await sb.exec("print(1)", { language: "python", timeout: 5 });
const code: number = result.exit_code;
const isTimeout: boolean = new Error() instanceof SandboxTimeout;
console.log(out, code, isTimeout);
EOF
  cat >"$app/consumer.cts" <<'EOF'
import { Sandbox, type ExecResult } from "@kvmfork/sdk";
export async function main(): Promise<string> {
  const results: ExecResult[] = await new Sandbox({ language: "python" }).runBatch(["print(1)"]);
  return results[0]!.stdout;
}
EOF
  # Both must fail: the types are real, not `any`.
  printf 'import { Sandbox } from "@kvmfork/sdk";\nconst n: number = await new Sandbox().run("x");\nconsole.log(n);\n' >"$app/bad-return.mts"
  printf 'import { Sandbox } from "@kvmfork/sdk";\nconsole.log(new Sandbox({ language: 3 }));\n' >"$app/bad-option.mts"
  cat >"$app/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "target": "ES2022", "lib": ["ES2022", "DOM"], "module": "NodeNext", "moduleResolution": "NodeNext",
    "strict": true, "noEmit": true, "skipLibCheck": false, "types": []
  },
  "files": ["consumer.mts", "consumer.cts"]
}
EOF
  (cd "$app" && ./node_modules/.bin/tsc --noEmit -p tsconfig.json) || return 1
  local bad
  for bad in bad-return bad-option; do
    sed "s/\"consumer.mts\", \"consumer.cts\"/\"$bad.mts\"/" "$app/tsconfig.json" >"$app/tsconfig.$bad.json"
    if (cd "$app" && ./node_modules/.bin/tsc --noEmit -p "tsconfig.$bad.json") >"$tmp/tsc-bad.log" 2>&1; then
      echo "tsc accepted $bad.mts"
      return 1
    fi
    grep -q "error TS2322" "$tmp/tsc-bad.log" || { cat "$tmp/tsc-bad.log"; return 1; }
  done
}

section_typescript() {
  mkdir -p "$tmp/run"
  step "typescript: npm pack of the built SDK" ts_pack || return 0
  check "typescript: the tarball has both builds, their types and no tests" ts_tarball_contents
  step "typescript: npm install <tarball> into an empty project (no other dependencies)" ts_install || return 0
  check "typescript: import (ESM) against the server; language option 'node'" ts_esm
  check "typescript: require (CJS) against the server; language option 'node'" ts_cjs
  check "typescript: tsc --noEmit on a consumer (ESM and CJS); wrong types are refused" ts_types
}

# ------------------------------------------------------------------ Rust
rust_install() {
  CARGO_TARGET_DIR="$root/target" cargo install --quiet --locked --path "$root" --root "$tmp/cargo" &&
    ls -l "$tmp/cargo/bin/kvmfork"
}

rust_version() {
  local want_version want_commit got
  want_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
  want_commit=$(git -C "$root" rev-parse --short HEAD)
  got=$(cd "$tmp/run" && "$tmp/cargo/bin/kvmfork" --version)
  echo "kvmfork --version: $got (HEAD $want_commit)"
  [[ $got =~ ^kvmfork\ ${want_version//./\\.}\ \(${want_commit}(-dirty)?\)$ ]]
}

rust_guest_sources() {
  # `template build` reads guest/ to find the cached template by the hash of
  # its inputs (it is cached: the server under test uses it).
  local got want
  got=$(cd "$tmp/run" && env -u KVMFORK_GUEST_DIR -u FORKD_GUEST_DIR timeout 120 "$tmp/cargo/bin/kvmfork" template build | tail -n 1)
  echo "installed binary: $got"
  [[ -n $got && -d $got ]] || return 1
  if [[ -x $root/target/release/kvmfork ]]; then
    want=$(cd "$tmp/run" && timeout 120 "$root/target/release/kvmfork" template build | tail -n 1)
    echo "target/release:   $want"
    [[ $got == "$want" ]]
  fi
}

section_rust() {
  mkdir -p "$tmp/run"
  step "rust: cargo install --path . --root <tmp>" rust_install || return 0
  check "rust: kvmfork --version prints the version and the git commit" rust_version
  check "rust: the installed binary finds its guest sources (template build from another directory)" rust_guest_sources
}

sections=("$@")
[[ ${#sections[@]} -eq 0 ]] && sections=(python typescript rust)
for s in "${sections[@]}"; do
  case "$s" in
    python | typescript | rust) ;;
    *) echo "tests/packages.sh: unknown section '$s' (python, typescript or rust)" >&2; exit 2 ;;
  esac
  echo "=== packages: $s (server $KVMFORK_URL) ==="
  "section_$s"
done
echo "$passed passed, $failed failed"
((failed == 0))
