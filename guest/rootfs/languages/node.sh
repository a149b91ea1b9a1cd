# Language recipe: Node.js 18 (Debian bookworm's nodejs + libnode108).
# Sourced by ../build.sh, which calls the language_* functions below.
#
# Every source of the Node agent lives next to this file as node_* so that
# build.sh's cache key (which hashes rootfs/languages/<language>[._]*) covers
# it without touching any input of the Python key:
#   node_init.c     PID 1: mounts, boot entropy, then exec node (C)
#   node_mailbox.c  N-API addon: mailbox ArrayBuffer, doorbell store, TSC,
#                   OpenSSL reseed, contract constants
#   node_agent.js   the agent: warm-up, READY, request loop (node -e semantics)
# ../../agent-node/ is only the list of C files build.sh links into /init
# (symlinks to node_init.c and to the language-neutral ../../agent/*.c).

# Packages whose dependency closure (no recommends) forms the guest.
LANGUAGE_PACKAGES="nodejs"

# JavaScript libraries Debian unbundled from node. libnode loads five files
# of them at start-up (externalized builtins: acorn, acorn-walk,
# cjs-module-lexer, undici's fetch bundle); language_fixup copies just those
# back after the common prune removed /usr/share. busboy and xtend are
# undici's dependencies, already inside that bundle.
LANGUAGE_SKIPPED_PACKAGES="node-acorn node-cjs-module-lexer node-undici node-busboy node-xtend"
NODE_SHARED_BUILTINS="node-acorn:usr/share/nodejs/acorn/dist/acorn.js
  node-acorn:usr/share/nodejs/acorn-walk/dist/walk.js
  node-cjs-module-lexer:usr/share/nodejs/cjs-module-lexer/lexer.js
  node-cjs-module-lexer:usr/share/nodejs/cjs-module-lexer/dist/lexer.js
  node-undici:usr/share/nodejs/undici/undici-fetch.js"

# The agent's C files: node_init.c plus the language-neutral PID 1 modules.
AGENT_DIR=$GUEST_DIR/agent-node

# V8/node flags of the agent (also used by the build-time self-test, so a
# flag this node does not know fails the build, not the minutes-long boot).
# --single-threaded: no V8 background compile/GC threads (every thread
#   switch is emulated kernel work on PVM hosts); --v8-pool-size=1: one idle
#   platform worker instead of one per CPU; --no-write-protect-code-memory:
#   no mprotect pair per JIT code allocation in a fork; fixed 8 MiB
#   semi-spaces: the warm-up touches both, forks allocate into faulted pages
#   and V8 never shrinks or grows them; --no-memory-reducer: no GC timers.
NODE_AGENT_FLAGS="--single-threaded --v8-pool-size=1 --no-write-protect-code-memory
  --min-semi-space-size=8 --max-semi-space-size=8 --no-memory-reducer"

# Build-only packages, pinned to the guest's versions: node_api.h for the
# addon, OpenSSL's headers for RAND_seed.
# $1: the resolved "name version arch" list.
language_build_packages() {
    local node ssl
    node=$(awk '$1 == "libnode108" { print $2 }' "$1")
    ssl=$(awk '$1 == "libssl3" { print $2 }' "$1")
    [ -n "$node" ] || die "libnode108 is not in the resolved package list"
    [ -n "$ssl" ] || die "libssl3 is not in the resolved package list"
    echo "libnode-dev=$node"
    echo "libssl-dev=$ssl"
}

# The agent-node/*.c symlinks include "agent.h" relative to their target.
language_agent_cflags() {
    echo "-I$GUEST_DIR/agent"
}

language_agent_libs() {
    :
}

language_fixup() {
    local root=$1 dev=$work/dev lib=$1/usr/lib/x86_64-linux-gnu entry package file name version arch
    local unpacked=$work/node-builtins
    for entry in $NODE_SHARED_BUILTINS; do
        package=${entry%%:*} file=${entry#*:}
        if [ ! -d "$unpacked/$package" ]; then
            read -r name version arch < <(awk -v p="$package" '$1 == p' "$work/packages")
            [ -n "$version" ] || die "$package is not in the resolved package list"
            mkdir -p "$unpacked/$package"
            dpkg-deb -x "$CACHE_DIR/debs/$(deb_file "$name" "$version" "$arch")" "$unpacked/$package"
        fi
        install -D -m 0644 "$unpacked/$package/$file" "$root/$file"
    done
    install -d "$root/usr/lib/kvmfork"
    install -m 0644 "$HERE/languages/node_agent.js" "$root/usr/lib/kvmfork/agent.js"
    # /init reads node's command line from here, one argument per line.
    printf '%s\n' $NODE_AGENT_FLAGS >"$root/usr/lib/kvmfork/node-flags"
    # The addon resolves napi_* from the node binary at load time.
    gcc -O2 -g0 -fPIC -shared -Wall -Wextra -Werror -std=gnu11 \
        -ffile-prefix-map="$work"=/build -I"$GUEST_DIR" -I"$dev/usr/include/node" -I"$dev/usr/include" \
        -I"$dev/usr/include/x86_64-linux-gnu" \
        -o "$root/usr/lib/kvmfork/kvmfork_mailbox.node" "$HERE/languages/node_mailbox.c" \
        "$GUEST_DIR/agent/heap.c" \
        -L"$lib" -l:libcrypto.so.3 -Wl,-rpath-link,"$lib" -Wl,--build-id=none ||
        die "building the N-API addon failed"
    strip "$root/usr/lib/kvmfork/kvmfork_mailbox.node"
}

language_prune() {
    local root=$1
    # Every command but node and busybox; OpenSSL engines/providers node
    # never loads by default; docs.
    find "$root/usr/bin" -mindepth 1 \( -name node -o -name nodejs -o -name busybox \) -prune -o -exec rm -f {} +
    rm -rf "$root"/usr/lib/x86_64-linux-gnu/engines-3 "$root"/usr/lib/x86_64-linux-gnu/ossl-modules \
        "$root"/usr/lib/x86_64-linux-gnu/nodejs "$root"/usr/lib/nodejs "$root"/usr/lib/node_modules
}

# Runs the agent's warm-up and self-test with the guest's own node, chrooted
# into the tree (node reads absolute paths such as /usr/share/nodejs), with
# the exact flags and an anonymous mailbox: a broken agent, a missing file
# or a flag this V8 does not know fails here in seconds rather than after
# minutes of emulated boot.
language_finish() {
    local root=$1 chroot
    chroot=("$(command -v chroot)") || die "chroot is missing"
    [ "$(id -u)" -eq 0 ] || chroot=("$(command -v unshare)" --user --map-root-user "${chroot[0]}")
    log "self-test of the agent with the guest's node"
    # shellcheck disable=SC2086
    (cd / && env -i PATH=/usr/bin HOME=/root LANG=C.UTF-8 "${chroot[@]}" "$root" \
        /usr/bin/node $NODE_AGENT_FLAGS /usr/lib/kvmfork/agent.js --selftest >&2) ||
        die "the Node agent failed its self-test against the guest's node"
    rm -f "$root"/tmp/kvmfork-*
}
