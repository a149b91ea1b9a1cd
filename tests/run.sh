#!/usr/bin/env bash
# kvmfork's test command (the README's second set-up command). Installs what the
# suites need, builds everything — the guest kernel, root filesystem and
# template are cached by a hash of their inputs, so only the first run is
# slow — then runs every suite: Rust unit and integration tests (VMM on tiny
# guests, fork engine on the real template, HTTP server, loadgen), the
# hardware-KVM path inside a nested QEMU guest (tests/hw-kvm), and the SDK
# suites and the installed packages (tests/packages.sh) against a live
# `kvmfork serve`. Needs root (apt) and /dev/kvm.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
step() { printf '\n== [%5ss] %s\n' "$SECONDS" "$*" >&2; }

step "checking /dev/kvm"
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
  echo "tests/run.sh: /dev/kvm is missing or not accessible: kvmfork's tests need KVM" >&2
  exit 1
fi

step "system packages"
pkgs=(prometheus haproxy curl fonts-dejavu-core bubblewrap nginx-light qemu-system-x86 busybox-static cpio python3-venv python3-numpy nodejs)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian prometheus package starts a system service; tests run their own.
systemctl stop prometheus prometheus-node-exporter 2>/dev/null || true
# So does nginx (the bench peer); the bench tests start their own on a free port.
systemctl stop nginx 2>/dev/null || true
# And haproxy; tests/loadbalancer.sh runs its own with deploy/haproxy.cfg.
systemctl stop haproxy 2>/dev/null || true

step "building kvmfork (release)"
cargo build --release --workspace --locked

step "style: rustfmt, and clippy with warnings as errors (Cargo.toml [lints])"
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings

step "guest templates (kernel, rootfs, boot, snapshot; cached by input hash)"
# The suites use exactly these (the cache may hold templates of other
# sources, e.g. from another checkout: never pick one by age).
KVMFORK_TEMPLATE=$(./target/release/kvmfork template build | tail -n 1)
KVMFORK_NODE_TEMPLATE=$(./target/release/kvmfork template build --language node | tail -n 1)
export KVMFORK_TEMPLATE KVMFORK_NODE_TEMPLATE

# The suites, the live server below and tests/loadbalancer.sh start
# `kvmfork serve` as root (this script needs root for apt): say so, or serve
# refuses to run its exec workers as root.
export KVMFORK_ALLOW_ROOT=1

step "Rust test suites"
cargo test --release --workspace --locked

step "hardware-KVM path in a nested QEMU guest (TCG-emulated AMD SVM; ~5 min)"
bash tests/hw-kvm/run.sh

step "Python suites: guest runner (vs python -c), tuning/check, the bench fork-server peer"
python3 -m unittest discover -s guest/agent -p 'test_*.py'
python3 -m unittest discover -s tuning -p 'test_*.py'
python3 -m unittest discover -s bench/peers -p 'test_*.py'

step "live server: SDK suites, installed packages and API spec"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
work=$(mktemp -d)
key="kvmfork-test-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '["%s"]\n' "$key" >"$work/keys.json"
./target/release/kvmfork serve --listen "127.0.0.1:$port" --api-keys-file "$work/keys.json" --rate-limit 1000 >"$work/serve.log" 2>&1 &
server=$!
cleanup() { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# `serve` answers at once and loads (or builds) its templates in the
# background: wait until every template is ready, and stop on a failed one.
ready=""
for _ in $(seq 1 600); do
  state=$(curl -fsS "http://127.0.0.1:$port/v1/health" 2>/dev/null | python3 -c '
import json, sys
t = json.load(sys.stdin)["templates"]
failed = [lang + ": " + str(e.get("error")) for lang, e in t.items() if e.get("state") == "failed"]
print("failed " + "; ".join(failed) if failed else "ready" if t and all(e.get("ready") for e in t.values()) else "building")
' 2>/dev/null) || state=""
  case "$state" in
    ready) ready=1; break ;;
    failed*) cat "$work/serve.log" >&2; echo "kvmfork serve: a template failed: ${state#failed }" >&2; exit 1 ;;
  esac
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; echo "kvmfork serve exited" >&2; exit 1; }
  sleep 0.5
done
[[ -n $ready ]] || { cat "$work/serve.log" >&2; echo "kvmfork serve: templates not ready after 300 s" >&2; exit 1; }
KVMFORK_URL="http://127.0.0.1:$port" KVMFORK_TEST_API_KEY="$key" bash sdk/run-tests.sh
KVMFORK_URL="http://127.0.0.1:$port" KVMFORK_TEST_API_KEY="$key" bash tests/mcp.sh
# The packages as a user installs them (wheel, sdist, npm tarball, cargo install).
KVMFORK_URL="http://127.0.0.1:$port" KVMFORK_TEST_API_KEY="$key" bash tests/packages.sh
bash docs/validate-openapi.sh

step "two kvmfork nodes behind HAProxy (deploy/haproxy.cfg)"
bash tests/loadbalancer.sh

step "all suites passed"
