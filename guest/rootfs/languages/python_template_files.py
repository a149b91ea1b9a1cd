"""Boot the agent's Python side on the build host, inside the guest tree.

Run by languages/python.sh with the guest's own interpreter and libraries
(the tree's dynamic loader, PYTHONHOME pointing into the tree). It imports
what the agent imports, runs every warm-up snippet through kvmfork_runner.run
and checks the results (a broken runner fails the build, not a 5-minute
guest boot), then prints, one per line, the guest paths of the source files
the template loaded: those are the ones worth precompiling.

usage: python3.11 -S python_template_files.py <root>
"""

import os
import site
import sys

root = os.path.abspath(sys.argv[1])
site.main()  # as the agent does (config.site_import = 1)
sys.path.insert(0, os.path.join(root, "usr/lib/kvmfork"))
import kvmfork_runner  # noqa: E402

for name in kvmfork_runner.TEMPLATE_MODULES:
    __import__(name)

failures = []
for index, entry in enumerate(kvmfork_runner.WARMUP):
    # (code, stdout, status) is a stateless run; else (..., flags, result).
    code, expected_out, expected_status = entry[:3]
    flags, expected_result = entry[3:] if len(entry) == 5 else (kvmfork_runner.REQ_FLAG_RESEED, None)
    out, err, status, result = kvmfork_runner.run(code.encode(), bytes(64), flags)
    if out.decode("utf-8", "replace") != expected_out or status != expected_status or result != expected_result:
        failures.append(f"warm-up snippet {index} {code[:60]!r}: exit {status} (want {expected_status}), "
                        f"result {result!r:.80} (want {expected_result!r:.80}), "
                        f"stdout {out[:120]!r}, stderr {err[-300:]!r}")
if failures:
    sys.exit("runner warm-up check failed:\n  " + "\n  ".join(failures))

files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py") and path.startswith(root + "/"):
        files.add(path[len(root):])
print("\n".join(sorted(files)))
