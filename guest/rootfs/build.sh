#!/usr/bin/env bash
# Builds the kvmfork guest initramfs: Debian packages (dependency closure, no
# recommends) + the kvmfork guest agent as /init, pruned, precompiled and
# packed as a deterministic uncompressed newc cpio.
#
# usage: guest/rootfs/build.sh [--language python]
#
# Output: ${KVMFORK_CACHE_DIR:-$HOME/.cache/kvmfork}/rootfs/<key>/{initramfs.cpio,manifest.json}
# where <key> hashes this recipe, the agent sources, contract.h and the
# resolved package versions. Progress goes to stderr; the only stdout line
# is the output directory. A second run with unchanged inputs is instant.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=$(dirname "$HERE")
AGENT_DIR=$GUEST_DIR/agent
CACHE_DIR=${KVMFORK_CACHE_DIR:-$HOME/.cache/kvmfork}
TOOL=$HERE/rootfs_tool.py
LANGUAGE=python
# Guest-wide packages, whatever the language.
COMMON_PACKAGES="busybox-static"

log() { printf '[rootfs %4ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --language) LANGUAGE=${2:?--language needs a value}; shift 2 ;;
        --language=*) LANGUAGE=${1#*=}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
RECIPE=$HERE/languages/$LANGUAGE.sh
[ -f "$RECIPE" ] || die "no recipe for language '$LANGUAGE' (have: $(cd "$HERE/languages" && ls -- *.sh | sed "s/\.sh$//" | tr "\n" " "))"
# shellcheck source=languages/python.sh
. "$RECIPE"

ensure_prerequisites() {
    local missing=() cmd
    for cmd in apt-get dpkg-deb gcc python3 readelf sha256sum; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing tools (${missing[*]}) and not root to install them"
    log "installing build prerequisites for: ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        gcc libc6-dev python3 binutils coreutils >&2
}

# Resolves the closure against an empty dpkg status, so the result does not
# depend on what the build machine has installed.
resolve_packages() {
    local out=$1 status attempt
    status=$(mktemp)
    for attempt in 1 2; do
        if apt-get -s -o Dir::State::status="$status" -o APT::Install-Recommends=false \
            -o APT::Install-Suggests=false install $COMMON_PACKAGES $LANGUAGE_PACKAGES \
            2>"$out.err" | python3 "$TOOL" resolve >"$out" 2>>"$out.err"; then
            rm -f "$status" "$out.err"
            return
        fi
        [ "$attempt" -eq 1 ] || break
        log "package resolution failed; refreshing the apt lists"
        apt-get update -qq >&2 || true
    done
    rm -f "$status"
    cat "$out.err" >&2
    die "cannot resolve the package closure"
}

# Changes whenever apt's package lists or the requested packages change.
resolution_fingerprint() {
    {
        echo "$COMMON_PACKAGES $LANGUAGE_PACKAGES"
        declare -f language_build_packages
        find /var/lib/apt/lists -maxdepth 1 -type f -name '*Packages*' -printf '%f %s %T@\n' | LC_ALL=C sort
    } | sha256sum | cut -c1-24
}

deb_file() { # name version arch -> file name apt-get download uses
    echo "${1}_${2//:/%3a}_${3}.deb"
}

download_packages() { # list files of "name version arch" / "name=version"
    local debs=$CACHE_DIR/debs wanted=() name version arch
    mkdir -p "$debs"
    while read -r name version arch; do
        [ -f "$debs/$(deb_file "$name" "$version" "$arch")" ] || wanted+=("$name=$version")
    done < <(cat "$@")
    [ ${#wanted[@]} -eq 0 ] && return
    log "downloading ${#wanted[@]} packages"
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${wanted[@]}" >&2) ||
        die "apt-get download failed"
}

is_skipped() {
    case " $(echo $LANGUAGE_SKIPPED_PACKAGES) " in *" $1 "*) return 0 ;; esac
    return 1
}

# Debian bookworm systems are merged-/usr; dpkg-deb -x does not do that.
merge_usr() {
    local root=$1 dir
    for dir in bin sbin lib lib64; do
        if [ -d "$root/$dir" ] && [ ! -L "$root/$dir" ]; then
            mkdir -p "$root/usr/$dir"
            cp -a "$root/$dir/." "$root/usr/$dir/"
            rm -rf "${root:?}/$dir"
        fi
        [ -e "$root/usr/$dir" ] && ln -sfn "usr/$dir" "$root/$dir"
    done
    return 0
}

common_prune() {
    local root=$1
    rm -rf "$root"/usr/share "$root"/usr/include "$root"/usr/libexec \
        "$root"/var "$root"/usr/lib/systemd "$root"/usr/lib/x86_64-linux-gnu/gconv \
        "$root"/usr/lib/locale "$root"/etc/init.d "$root"/etc/cron.daily "$root"/usr/lib/binfmt.d \
        "$root"/usr/lib/x86_64-linux-gnu/libmvec.so.1
    find "$root/usr/lib" \( -name '*.a' -o -name pkgconfig \) -prune -exec rm -rf {} +
    [ ! -d "$root/usr/sbin" ] || find "$root/usr/sbin" -mindepth 1 -delete
}

common_fixup() {
    local root=$1 applet
    mkdir -p "$root"/{dev,proc,sys,tmp,run,root,etc}
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$root/etc/nsswitch.conf"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
    # busybox as the guest's tools (sh for subprocess, ls, cat...).
    for applet in $("$root/usr/bin/busybox" --list); do
        [ -e "$root/usr/bin/$applet" ] || [ -L "$root/usr/bin/$applet" ] ||
            ln -s busybox "$root/usr/bin/$applet"
    done
}

build_agent() {
    local root=$1 dev=$2 libdir=$1/usr/lib/x86_64-linux-gnu
    # shellcheck disable=SC2046
    # NDEBUG: Python's header asserts would embed the (temporary) build path.
    gcc -O2 -g0 -DNDEBUG -ffile-prefix-map="$work"=/build -Wall -Wextra -Werror -std=gnu11 \
        -I"$GUEST_DIR" $(language_agent_cflags "$dev") \
        -o "$root/init" "$AGENT_DIR"/*.c \
        -L"$libdir" $(language_agent_libs) -Wl,-rpath-link,"$libdir" -Wl,--build-id=none ||
        die "agent build failed"
    strip "$root/init"
}

cache_key() {
    local packages=$1 build_packages=$2
    (
        cd "$GUEST_DIR"
        echo "language $LANGUAGE"
        for f in rootfs/build.sh rootfs/rootfs_tool.py $(ls rootfs/languages/"$LANGUAGE"[._]*) contract.h \
            $(cd "$GUEST_DIR" && ls agent/*.c agent/*.h agent/kvmfork_runner.py | LC_ALL=C sort); do
            echo "== $f"
            cat "$f"
        done
        echo "== packages"
        cat "$packages" "$build_packages"
    ) | sha256sum | cut -c1-24
}

work=
main() {
    ensure_prerequisites
    mkdir -p "$CACHE_DIR/rootfs"
    work=$(mktemp -d "$CACHE_DIR/rootfs/.build-XXXXXX")
    trap '[ -z "$work" ] || rm -rf "$work"' EXIT

    # Resolving takes apt seconds; reuse it while the apt lists are unchanged.
    local resolved
    resolved=$CACHE_DIR/rootfs/resolved/$(resolution_fingerprint)
    if [ -f "$resolved/packages" ] && [ -f "$resolved/build-packages" ]; then
        cp "$resolved/packages" "$resolved/build-packages" "$work/"
    else
        log "resolving the package closure of: $COMMON_PACKAGES $LANGUAGE_PACKAGES"
        resolve_packages "$work/packages"
        language_build_packages "$work/packages" | while IFS== read -r name version; do
            apt-cache show "$name=$version" >/dev/null 2>&1 || die "$name=$version is not available"
            echo "$name $version $(dpkg --print-architecture)"
        done >"$work/build-packages"
        resolved=$CACHE_DIR/rootfs/resolved/$(resolution_fingerprint)
        mkdir -p "$resolved"
        cp "$work/packages" "$work/build-packages" "$resolved/"
    fi

    local key out
    key=$(cache_key "$work/packages" "$work/build-packages")
    out=$CACHE_DIR/rootfs/$key
    if [ -f "$out/initramfs.cpio" ] && [ -f "$out/manifest.json" ]; then
        log "up to date"
        echo "$out"
        return
    fi
    log "building $out ($(wc -l <"$work/packages") packages)"
    download_packages "$work/packages" "$work/build-packages"

    local root=$work/root dev=$work/dev name version arch skipped=""
    mkdir -p "$root" "$dev"
    log "extracting"
    while read -r name version arch; do
        if is_skipped "$name"; then
            skipped="$skipped $name"
            continue
        fi
        dpkg-deb -x "$CACHE_DIR/debs/$(deb_file "$name" "$version" "$arch")" "$root"
    done <"$work/packages"
    while read -r name version arch; do
        dpkg-deb -x "$CACHE_DIR/debs/$(deb_file "$name" "$version" "$arch")" "$dev"
    done <"$work/build-packages"
    merge_usr "$root"

    log "building the agent"
    build_agent "$root" "$dev"
    log "pruning"
    common_prune "$root"
    language_prune "$root"
    common_fixup "$root"
    language_fixup "$root"
    language_finish "$root"
    python3 "$TOOL" check-elf "$root" || die "library check failed"

    log "packing"
    mkdir -p "$work/out"
    python3 "$TOOL" pack "$root" "$work/out/initramfs.cpio"
    python3 "$TOOL" manifest --root "$root" --archive "$work/out/initramfs.cpio" \
        --packages "$work/packages" --build-packages "$work/build-packages" \
        --agent "$root/init" --language "$LANGUAGE" --key "$key" --skipped "$skipped" \
        --seconds "$SECONDS" --output "$work/out/manifest.json"
    # Atomic publish; if a concurrent build won the race, keep its result.
    if ! mv -T "$work/out" "$out" 2>/dev/null; then
        [ -f "$out/initramfs.cpio" ] || die "cannot publish $out"
    fi
    log "done: $(du -m "$out/initramfs.cpio" | cut -f1) MiB, $(grep -o '"file_count": [0-9]*' "$out/manifest.json")"
    echo "$out"
}

main
