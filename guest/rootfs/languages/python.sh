# Language recipe: CPython 3.11 + numpy (Debian bookworm packages).
# Sourced by ../build.sh, which calls the language_* functions below.
# A new language is a new file defining the same variables and functions.

# Packages whose dependency closure (no recommends) forms the guest.
LANGUAGE_PACKAGES="python3.11 libpython3.11 python3-numpy"

# In the closure but never extracted: their files are only used by package
# management, by numpy.distutils, or by the extension modules pruned below
# (ssl/_hashlib: no network in the guest, hashlib falls back to CPython's
# built-in md5/sha*/blake2). check-elf proves nothing left needs them.
LANGUAGE_SKIPPED_PACKAGES="libssl3 python3-pkg-resources dpkg tar libacl1 libselinux1 libpcre2-8-0 libmd0 libzstd1
  readline-common libreadline8 libncursesw6 libtinfo6 libdb5.3
  libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3
  libkrb5support0 libcom-err2 libkeyutils1"

# Build-only packages (headers for the agent), pinned to the guest's version.
# $1: the resolved "name version arch" list.
language_build_packages() {
    local version
    version=$(awk '$1 == "libpython3.11" { print $2 }' "$1")
    [ -n "$version" ] || die "libpython3.11 is not in the resolved package list"
    echo "libpython3.11-dev=$version"
}

# Compiler flags for the agent. $1: the extracted build-package tree.
language_agent_cflags() {
    echo "-I$1/usr/include/python3.11 -I$1/usr/include"
}

language_agent_libs() {
    echo "-l:libpython3.11.so.1.0"
}

# What Debian's maintainer scripts would have set up, and what matters here.
language_fixup() {
    local root=$1 multiarch=$1/usr/lib/x86_64-linux-gnu
    # libblas3/liblapack3 register these through update-alternatives.
    ln -sfn blas/libblas.so.3 "$multiarch/libblas.so.3"
    ln -sfn lapack/liblapack.so.3 "$multiarch/liblapack.so.3"
    ln -sfn python3.11 "$root/usr/bin/python3"
    install -D -m 0644 "$AGENT_DIR/kvmfork_runner.py" "$root/usr/lib/kvmfork/kvmfork_runner.py"
}

language_prune() {
    local root=$1 stdlib=$1/usr/lib/python3.11 numpy=$1/usr/lib/python3/dist-packages/numpy
    # Development, GUI, packaging and test parts of the stdlib.
    rm -rf "$stdlib"/{test,idlelib,tkinter,turtledemo,turtle.py,ensurepip,lib2to3,distutils} \
        "$stdlib"/{venv,pydoc_data,__phello__,config-3.11-x86_64-linux-gnu,curses} \
        "$stdlib"/dist-packages
    # Extension modules for tests, terminals and legacy databases.
    rm -f "$stdlib"/lib-dynload/{_test,_ctypes_test,_xxtestfuzz,xxlimited,_curses,readline,_dbm,nis,ossaudiodev,_ssl,_hashlib}*.so
    rm -rf "$root"/usr/lib/valgrind
    # numpy: tests, C headers/static libs, build tooling, SIMD test module, stubs.
    find "$numpy" -depth -type d -name tests -exec rm -rf {} +
    rm -rf "$numpy"/{core/include,core/lib,distutils,f2py,_pyinstaller,doc,random/_examples}
    rm -f "$numpy"/core/_simd.*.so
    find "$numpy" -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.h' -o -name '*.c' \) -delete
    # Every command but the interpreter (re-pointed at the agent below).
    find "$root/usr/bin" -mindepth 1 \( -name 'python3*' -o -name busybox \) -prune -o -exec rm -f {} +
}

# Bytecode and stdlib packing, with the guest's own interpreter (Debian's
# python3.11 binary run through the tree's dynamic loader, before it is
# replaced): python_template_files.py lists the modules the template
# imports (and checks every warm-up snippet); only those are precompiled,
# because every MB of initramfs costs seconds of emulated copying at boot
# while compiling a module some fork imports later is user-mode work. The
# stdlib goes into a deflated python311.zip (sources kept for tracebacks).
# Finally python3.11 points at the agent, which shares libpython instead of
# carrying a second, statically linked 7 MB copy.
language_finish() {
    local root=$1 lib=$1/usr/lib/x86_64-linux-gnu list=$1.template-files
    local python=("$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$root/usr/bin/python3.11" -S)
    PYTHONHOME=$root/usr "${python[@]}" "$HERE/languages/python_template_files.py" "$root" >"$list" ||
        die "the runner failed its warm-up check against the guest's Python"
    log "precompiling $(wc -l <"$list") modules the template imports; zipping the stdlib"
    grep -v '^/usr/lib/python3.11/' "$list" | sed "s|^|$root|" |
        PYTHONHOME=$root/usr "${python[@]}" -m compileall -q \
            --invalidation-mode unchecked-hash -s "$root" -p / -i - >&2 || die "compileall failed"
    PYTHONHOME=$root/usr "${python[@]}" "$HERE/languages/python_stdlib_zip.py" "$root" "$list" >&2 ||
        die "packing the stdlib failed"
    rm -f "$list"
    ln -sfn /init "$root/usr/bin/python3.11"
}
