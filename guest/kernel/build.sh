#!/usr/bin/env bash
# Build kvmfork's guest kernel from Debian's linux-source-6.1, cached by hash.
#
#   bash guest/kernel/build.sh        # prints the output directory on stdout
#
# Output: ${KVMFORK_CACHE_DIR:-$HOME/.cache/kvmfork}/kernel/<key>/ holding vmlinux
# (uncompressed ELF with the PVH note), System.map, .config and build.log.
# <key> is the sha256 of the linux-source package version, config.fragment,
# the patches and this script, so any change to them builds a new kernel and
# an unchanged tree returns at once. Progress goes to stderr; stdout carries
# only the output path (last line).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$script_dir/config.fragment
patch_dir=$script_dir/patches
source_pkg=linux-source-6.1
source_tarball=/usr/src/$source_pkg.tar.xz
cache_root=${KVMFORK_CACHE_DIR:-$HOME/.cache/kvmfork}/kernel

started=$SECONDS
progress() { printf '[guest-kernel %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { progress "ERROR: $*"; exit 1; }

log=/dev/null
report_failure() {
    progress "build failed; work tree and log kept in $1 (last lines of the log follow)"
    tail -n 40 "$log" >&2 || true
}

# Install the build dependencies only when something is missing, so a
# prepared machine never touches apt.
ensure_dependencies() {
    local missing=()
    local tool
    for tool in make gcc ld bc bison flex cpio xz patch readelf perl; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [[ -f /usr/include/libelf.h ]] || missing+=(libelf.h)
    [[ -f $source_tarball ]] || missing+=("$source_tarball")
    ((${#missing[@]} == 0)) && return 0

    progress "missing: ${missing[*]}; installing build dependencies with apt-get"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q >&2 || die "apt-get update failed"
    "${sudo[@]}" apt-get install -y -q "$source_pkg" bc bison flex libelf-dev build-essential \
        cpio xz-utils patch binutils perl >&2 || die "apt-get install failed"
    [[ -f $source_tarball ]] || die "$source_tarball still missing after installing $source_pkg"
}

patches() {
    # The series in order of its NNNN- prefixes.
    [[ -d $patch_dir ]] || return 0
    find "$patch_dir" -maxdepth 1 -type f -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort
}

cache_key() {
    local version
    version=$(dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null) ||
        die "cannot read the version of package $source_pkg"
    {
        printf 'source %s %s\n' "$source_pkg" "$version"
        printf 'file config.fragment\n'
        cat "$fragment"
        local patch
        while IFS= read -r patch; do
            printf 'file patches/%s\n' "$(basename "$patch")"
            cat "$patch"
        done < <(patches)
        printf 'file build.sh\n'
        cat "$script_dir/build.sh"
    } | sha256sum | cut -d' ' -f1
}

# Every line of the fragment must have survived Kconfig: "CONFIG_X=v" must be
# in .config verbatim and "# CONFIG_X is not set" must not be set at all.
verify_config() {
    local config=$1 line name failed=0
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            if ! grep -qxF -- "$line" "$config"; then
                progress "config: wanted '$line', got '$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$config" || echo absent)'"
                failed=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            name=${BASH_REMATCH[1]}
            if grep -q -- "^$name=" "$config"; then
                progress "config: wanted $name off, got '$(grep -- "^$name=" "$config")'"
                failed=1
            fi
        fi
    done < "$fragment"
    ((failed == 0)) || die "config.fragment options were dropped or changed by Kconfig (see above)"
}

main() {
    [[ -f $fragment ]] || die "missing $fragment"
    ensure_dependencies

    local key out
    key=$(cache_key)
    out=$cache_root/$key
    if [[ -f $out/vmlinux ]]; then
        progress "cached: $out"
        printf '%s\n' "$out"
        return 0
    fi

    mkdir -p "$cache_root"
    # One kernel build at a time (it uses every core anyway): a concurrent
    # run waits here, then usually finds its entry built.
    exec 9>"$cache_root/.lock"
    if ! flock -n 9; then
        progress "waiting for another kernel build to finish"
        flock 9
    fi
    if [[ -f $out/vmlinux ]]; then
        progress "cached (built by a concurrent run): $out"
        printf '%s\n' "$out"
        return 0
    fi
    # We hold the lock, so every temp dir left here is from a dead run (or
    # a finished one still being deleted in the background: harmless).
    rm -rf "$cache_root"/.tmp-* "$cache_root"/.trash-* 2>/dev/null || true

    local tmp=$cache_root/.tmp-$key
    local src=$tmp/src staging=$tmp/out
    mkdir -p "$src" "$staging"
    log=$staging/build.log
    : > "$log"
    # On any failure show the end of the log; the work tree stays for
    # inspection until the next build removes it.
    trap 'report_failure "$tmp"' EXIT

    progress "key $key"
    progress "extracting $source_tarball"
    tar -xJf "$source_tarball" -C "$src" --strip-components=1 >>"$log" 2>&1 ||
        die "extracting $source_tarball failed (log: $log)"

    local patch count=0
    while IFS= read -r patch; do
        progress "applying patches/$(basename "$patch")"
        patch -d "$src" -p1 --forward --batch --fuzz=0 < "$patch" >>"$log" 2>&1 ||
            die "patch $(basename "$patch") does not apply (log: $log)"
        count=$((count + 1))
    done < <(patches)
    progress "applied $count patches"

    # Reproducible version string: no user, host or time of this machine.
    export KBUILD_BUILD_USER=kvmfork KBUILD_BUILD_HOST=kvmfork
    export KBUILD_BUILD_TIMESTAMP="kvmfork ${key:0:16}"

    progress "configuring: tinyconfig + config.fragment"
    make -C "$src" tinyconfig >>"$log" 2>&1 || die "make tinyconfig failed (log: $log)"
    (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$fragment") >>"$log" 2>&1 ||
        die "merging config.fragment failed (log: $log)"
    make -C "$src" olddefconfig >>"$log" 2>&1 || die "make olddefconfig failed (log: $log)"
    verify_config "$src/.config"

    local jobs
    jobs=$(nproc)
    progress "compiling vmlinux with -j$jobs (a few minutes)"
    make -C "$src" -j"$jobs" vmlinux >>"$log" 2>&1 || die "make vmlinux failed (log: $log)"

    # The PVH entry point is an ELF note of owner "Xen", type 18
    # (XEN_ELFNOTE_PHYS32_ENTRY); VMMs that boot via PVH look for it.
    readelf --notes "$src/vmlinux" | grep -Eq 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*(0x00000012|PHYS32_ENTRY)' ||
        die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"

    cp "$src/vmlinux" "$src/System.map" "$src/.config" "$staging/"
    progress "vmlinux: $(stat -c %s "$staging/vmlinux") bytes, $(grep -c . "$src/.config") config lines"

    trap - EXIT
    mv -T "$staging" "$out"
    # Deleting the ~1.5 GB work tree takes a while: do it in the background,
    # detached from our stdout so "$(build.sh)" callers need not wait.
    local trash=$cache_root/.trash-$key-$$
    mv -T "$tmp" "$trash"
    # (fd 9 closed: the lock must not outlive this script).
    nohup rm -rf "$trash" >/dev/null 2>&1 9>&- &
    progress "done: $out"
    printf '%s\n' "$out"
}

main "$@"
