"""Pack the pure-Python stdlib into /usr/lib/python311.zip (deflated).

Run by languages/python.sh with the guest's own interpreter, so bytecode has
the guest's magic number. Why: the initramfs is copied byte by byte by the
emulated guest kernel at boot, so its size and entry count dominate the
template's boot time on PVM hosts; inflating a module at import is
user-mode work. The zip holds every stdlib source (tracebacks read them
through zipimport's get_source) plus unchecked-hash bytecode for the
modules the template imports. python311.zip is a standard sys.path entry.

usage: python3.11 -S python_stdlib_zip.py <root> <template-files-list>
Deletes the packed files from <root>/usr/lib/python3.11 (lib-dynload stays).
"""

import importlib.util
import os
import shutil
import sys
import zipfile

STDLIB = "/usr/lib/python3.11"
ARCHIVE = "/usr/lib/python311.zip"
KEEP = {"lib-dynload"}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)

root = os.path.abspath(sys.argv[1])
with open(sys.argv[2]) as f:
    template_files = {line.strip() for line in f if line.strip()}

stdlib_dir = root + STDLIB
members = []
for dirpath, dirnames, filenames in os.walk(stdlib_dir):
    rel_dir = os.path.relpath(dirpath, stdlib_dir)
    if rel_dir == ".":
        dirnames[:] = [d for d in dirnames if d not in KEEP]
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    for name in filenames:
        members.append(os.path.normpath(os.path.join(rel_dir, name)))


def pyc_bytes(source, guest_path):
    code = compile(source, ARCHIVE + "/" + guest_path, "exec", dont_inherit=True)
    source_hash = importlib.util.source_hash(source)
    return bytes(importlib._bootstrap_external._code_to_hash_pyc(code, source_hash, checked=False))


def add(archive, name, data):
    info = zipfile.ZipInfo(name, FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data, compresslevel=9)


compiled = 0
with zipfile.ZipFile(root + ARCHIVE, "w") as archive:
    for name in sorted(members):
        path = os.path.join(stdlib_dir, name)
        while os.path.islink(path):  # e.g. sitecustomize.py -> /etc/python3.11/...
            target = os.readlink(path)
            path = root + target if target.startswith("/") else os.path.join(os.path.dirname(path), target)
        with open(path, "rb") as f:
            data = f.read()
        add(archive, name, data)
        if name.endswith(".py") and STDLIB + "/" + name in template_files:
            # zipimport's layout: module.pyc beside module.py.
            add(archive, name + "c", pyc_bytes(data, name))
            compiled += 1

for entry in os.listdir(stdlib_dir):
    if entry in KEEP:
        continue
    path = os.path.join(stdlib_dir, entry)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
print(f"{len(members)} files, {compiled} precompiled, {os.path.getsize(root + ARCHIVE)} bytes")
