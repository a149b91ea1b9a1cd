#!/usr/bin/env python3
"""Helpers for guest/rootfs/build.sh that are clearer in Python than in shell.

  resolve   parse `apt-get -s install` output into "name version arch" lines
  check-elf fail if an ELF file in the tree needs a library the tree lacks
  pack      write the tree as a deterministic newc cpio (plus /dev/console)
  extract   unpack such a cpio into a directory (device nodes skipped)
  manifest  write manifest.json
"""

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64")
# Nodes the kernel needs before devtmpfs is mounted: init's stdio.
EXTRA_NODES = (("dev/console", stat.S_IFCHR | 0o600, 5, 1),)


def resolve(args):
    """`Inst name (version release [arch])` lines -> sorted `name version arch`."""
    packages = []
    for line in sys.stdin:
        words = line.split()
        if len(words) < 4 or words[0] != "Inst":
            continue
        if words[2].startswith("["):  # "Inst name [old] (new ...)": an upgrade
            words.pop(2)
        name, version = words[1], words[2].lstrip("(")
        arch = next((w[1:-2] for w in words if w.startswith("[") and w.endswith("])")), None)
        if arch is None:
            sys.exit(f"resolve: no architecture in: {line.strip()}")
        packages.append(f"{name} {version} {arch}")
    if not packages:
        sys.exit("resolve: apt-get selected no packages")
    print("\n".join(sorted(packages)))


def _is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _dynamic_entries(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    needed, runpaths = [], []
    for line in out.splitlines():
        if "(NEEDED)" in line:
            needed.append(line.split("[", 1)[1].rstrip("]"))
        elif "(RUNPATH)" in line or "(RPATH)" in line:
            runpaths.extend(line.split("[", 1)[1].rstrip("]").split(":"))
    return needed, runpaths


def _exists_in_tree(root, guest_path):
    """Follow symlinks inside the tree (absolute targets are guest paths)."""
    for _ in range(40):
        host_path = os.path.join(root, guest_path.lstrip("/"))
        if os.path.islink(host_path):
            target = os.readlink(host_path)
            guest_path = target if target.startswith("/") else os.path.join(os.path.dirname(guest_path), target)
            guest_path = os.path.normpath(guest_path)
            continue
        return os.path.exists(host_path)
    return False


def check_elf(args):
    root = args.root
    missing = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path) or not _is_elf(path):
                continue
            guest_dir = "/" + os.path.relpath(dirpath, root)
            needed, runpaths = _dynamic_entries(path)
            search = [p.replace("$ORIGIN", guest_dir) for p in runpaths] + ["/" + d for d in LIBRARY_DIRS]
            for lib in needed:
                if not any(_exists_in_tree(root, os.path.join(d, lib)) for d in search):
                    missing.append(f"{os.path.relpath(path, root)} needs {lib}")
    if missing:
        sys.exit("check-elf: unresolved libraries:\n  " + "\n  ".join(missing))


def _newc_header(ino, mode, nlink, size, rdev_major, rdev_minor, name_size, mtime):
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev_major, rdev_minor, name_size, 0)
    return NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)


def _pad4(out, length):
    out.write(b"\0" * (-length % 4))


def _write_entry(out, ino, name, mode, nlink, data=b"", rdev=(0, 0), mtime=0):
    encoded = name.encode() + b"\0"
    header = _newc_header(ino, mode, nlink, len(data), rdev[0], rdev[1], len(encoded), mtime)
    out.write(header + encoded)
    _pad4(out, len(header) + len(encoded))
    out.write(data)
    _pad4(out, len(data))


def _walk_sorted(root):
    """Every path under root, parents before children, byte-wise sorted."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            entries.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(entries, key=os.fsencode)


def pack(args):
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    ino = 0
    names = set()
    with open(args.output, "wb") as out:
        for rel in _walk_sorted(args.root):
            path = os.path.join(args.root, rel)
            st = os.lstat(path)
            ino += 1
            names.add(rel)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                _write_entry(out, ino, rel, stat.S_IFDIR | perm, 2, mtime=mtime)
            elif stat.S_ISLNK(st.st_mode):
                _write_entry(out, ino, rel, stat.S_IFLNK | 0o777, 1, os.readlink(path).encode(), mtime=mtime)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    _write_entry(out, ino, rel, stat.S_IFREG | perm, 1, f.read(), mtime=mtime)
            else:
                sys.exit(f"pack: unsupported file type: {rel}")
        for rel, mode, major, minor in EXTRA_NODES:
            if rel in names:
                continue
            if os.path.dirname(rel) not in names:
                sys.exit(f"pack: {os.path.dirname(rel)} missing for {rel}")
            ino += 1
            _write_entry(out, ino, rel, mode, 1, rdev=(major, minor), mtime=mtime)
        _write_entry(out, 0, TRAILER, 0, 1)


def extract(args):
    """Unpack a newc archive written by pack (files, dirs, symlinks)."""
    with open(args.archive, "rb") as f:
        data = f.read()
    pos = 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            sys.exit(f"extract: bad magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + name_size - 1].decode()
        body = name_start + name_size + (-(110 + name_size) % 4)
        content = data[body:body + size]
        pos = body + size + (-size % 4)
        if name == TRAILER:
            return
        target = os.path.join(args.directory, name)
        if stat.S_ISDIR(mode):
            os.makedirs(target, exist_ok=True)
            os.chmod(target, stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            os.symlink(content.decode(), target)
        elif stat.S_ISREG(mode):
            with open(target, "wb") as out:
                out.write(content)
            os.chmod(target, stat.S_IMODE(mode))


def manifest(args):
    packages = []
    for line in open(args.packages):
        name, version, arch = line.split()
        packages.append({"name": name, "version": version, "arch": arch,
                         "installed": name not in set(args.skipped.split())})
    file_count = sum(len(d) + len(f) for _, d, f in os.walk(args.root))
    with open(args.agent, "rb") as f:
        agent_sha256 = hashlib.sha256(f.read()).hexdigest()
    document = {
        "language": args.language,
        "key": args.key,
        "initramfs": "initramfs.cpio",
        "size_bytes": os.path.getsize(args.archive),
        "file_count": file_count,
        "build_seconds": args.seconds,
        "agent_sha256": agent_sha256,
        "packages": packages,
        "build_packages": [dict(zip(("name", "version", "arch"), l.split())) for l in open(args.build_packages)],
    }
    with open(args.output, "w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("resolve").set_defaults(func=resolve)
    p = sub.add_parser("check-elf")
    p.add_argument("root")
    p.set_defaults(func=check_elf)
    p = sub.add_parser("pack")
    p.add_argument("root")
    p.add_argument("output")
    p.set_defaults(func=pack)
    p = sub.add_parser("extract")
    p.add_argument("archive")
    p.add_argument("directory")
    p.set_defaults(func=extract)
    p = sub.add_parser("manifest")
    for name in ("root", "archive", "packages", "build_packages", "agent", "language", "key", "output"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, required=True)
    p.add_argument("--skipped", default="")
    p.add_argument("--seconds", type=int, required=True)
    p.set_defaults(func=manifest)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
