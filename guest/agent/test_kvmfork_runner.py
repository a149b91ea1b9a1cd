"""Unit tests for kvmfork_runner's `python -c` semantics.

Run with the guest's Python version: `python3.11 -m unittest guest/agent/test_kvmfork_runner.py`
(numpy-dependent cases are skipped by unittest only when numpy is absent on
the host; the rootfs build runs every warm-up snippet against the guest's
own numpy regardless).
"""

import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvmfork_runner  # noqa: E402

SEED = bytes(range(64))


def run(code):
    out, err, status = kvmfork_runner.run(code.encode(), SEED)
    return out.decode(), err.decode(), status


def python_c(code):
    """The reference: a real `python -c` with the same interpreter."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout, proc.stderr, proc.returncode


class ExitStatus(unittest.TestCase):
    def test_matches_python_c(self):
        for code in ("pass", "import sys; sys.exit()", "import sys; sys.exit(None)",
                     "import sys; sys.exit(3)", "import sys; sys.exit(256 + 7)",
                     "import sys; sys.exit(-1)", "import sys; sys.exit(True)",
                     "import sys; sys.exit('bye')", "import sys; sys.exit(2**70)",
                     "exit(4)", "raise SystemExit(5)"):
            with self.subTest(code=code):
                self.assertEqual(run(code), python_c(code))

    def test_os_exit_keeps_output_and_status(self):
        out, err, status = run("print('a'); import os; os._exit(9)")
        self.assertEqual((out, status), ("a\n", 9))
        self.assertIs(os._exit, kvmfork_runner.os._exit)  # restored for the host process


class Errors(unittest.TestCase):
    def test_tracebacks_match_python_c(self):
        for code in ("1/0", "x = 1\ndef f():\n    return x / 0\nf()", "undefined",
                     "x = (", "  indented", "raise KeyError('k') from ValueError('v')",
                     "try:\n    1/0\nexcept Exception:\n    raise RuntimeError('r')"):
            with self.subTest(code=code):
                self.assertEqual(run(code), python_c(code))

    def test_recursion_error(self):
        # The runner's own frame counts against the recursion limit, so the
        # "[Previous line repeated N more times]" count is one lower than
        # python -c's; everything else matches.
        out, err, status = run("def r(n):\n    return r(n + 1)\nr(0)")
        self.assertEqual((out, status), ("", 1))
        self.assertTrue(err.startswith('Traceback (most recent call last):\n  File "<string>", line 3, in <module>\n'))
        self.assertTrue(err.endswith("RecursionError: maximum recursion depth exceeded\n"))

    def test_custom_excepthook_is_used(self):
        out, err, status = run("import sys\nsys.excepthook = lambda t, v, tb: print('hooked', t.__name__)\n1/0")
        self.assertEqual((out, err, status), ("hooked ZeroDivisionError\n", "", 1))
        self.assertIs(sys.excepthook, sys.__excepthook__)


class Output(unittest.TestCase):
    def test_streams(self):
        code = ("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.stdout.buffer.write(b'raw\\n')\n"
                "sys.stdout.write('\\udcff\\n')")
        out, err, status = run(code)
        self.assertEqual((out, err, status), ("out\nraw\n\\udcff\n", "err\n", 0))

    def test_closing_stdout_keeps_output(self):
        self.assertEqual(run("import sys\nprint('kept')\nsys.stdout.close()"), ("kept\n", "", 0))

    def test_stdin_is_empty(self):
        self.assertEqual(run("import sys\nprint(repr(sys.stdin.read()))"), ("''\n", "", 0))

    def test_host_streams_restored(self):
        before = (sys.stdin, sys.stdout, sys.stderr, sys.modules["__main__"])
        run("import sys\nsys.stdout = None")
        self.assertEqual(before, (sys.stdin, sys.stdout, sys.stderr, sys.modules["__main__"]))

    def test_atexit_runs_in_capture(self):
        self.assertEqual(run("import atexit\natexit.register(print, 'bye')"), ("bye\n", "", 0))


class Namespace(unittest.TestCase):
    def test_fresh_main_per_run(self):
        run("leak = 1")
        self.assertEqual(run("print('leak' in globals(), __name__)"), ("False __main__\n", "", 0))

    def test_pickle_of_main_functions(self):
        out, _, status = run("import pickle\ndef f():\n    pass\nprint(pickle.loads(pickle.dumps(f)) is f)")
        self.assertEqual((out, status), ("True\n", 0))

    def test_future_flags_do_not_leak(self):
        self.assertEqual(run("def f(x: undefined_name): pass\nprint('ok')")[2], 1)


class Reseeding(unittest.TestCase):
    def test_seed_decides_random_stream(self):
        code = "import random\nprint(random.random())"
        a = kvmfork_runner.run(code.encode(), SEED)
        b = kvmfork_runner.run(code.encode(), SEED)
        c = kvmfork_runner.run(code.encode(), bytes(64))
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    @unittest.skipUnless("numpy" in sys.modules or __import__("importlib").util.find_spec("numpy"),
                         "numpy not installed on this host")
    def test_seed_decides_numpy_stream(self):
        import numpy  # noqa: F401  (the runner reseeds numpy only once it is loaded)
        code = "import numpy\nprint(numpy.random.rand())"
        a = kvmfork_runner.run(code.encode(), SEED)
        self.assertEqual(a, kvmfork_runner.run(code.encode(), SEED))
        self.assertNotEqual(a, kvmfork_runner.run(code.encode(), bytes(64)))


if __name__ == "__main__":
    unittest.main()
