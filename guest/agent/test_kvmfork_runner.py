"""Unit tests for kvmfork_runner: `python -c` semantics and session mode.

Run with the guest's Python version: `python3.11 -m unittest guest/agent/test_kvmfork_runner.py`
(or `python3 -m unittest discover -s guest/agent -p 'test_*.py'`)
(numpy-dependent cases are skipped by unittest only when numpy is absent on
the host; the rootfs build runs every warm-up snippet against the guest's
own numpy regardless).
"""

import os
import re
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvmfork_runner  # noqa: E402

SEED = bytes(range(64))
SESSION = kvmfork_runner.REQ_FLAG_SESSION
RESEED = kvmfork_runner.REQ_FLAG_RESEED
CONTRACT_H = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "contract.h")


def run(code):
    """A stateless run, flagged as the host flags one."""
    out, err, status, result = kvmfork_runner.run(code.encode(), SEED, RESEED)
    assert result is None, result
    return out.decode(), err.decode(), status


def session(code, flags=0, seed=SEED):
    """A session run: (stdout, stderr, status, result)."""
    out, err, status, result = kvmfork_runner.run(code.encode(), seed, SESSION | flags)
    return out.decode(), err.decode(), status, result


def new_session():
    """Forget the session namespace, as a fresh VM from the template has none."""
    kvmfork_runner._SESSION_MAIN = None


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
        a = kvmfork_runner.run(code.encode(), SEED, RESEED)
        b = kvmfork_runner.run(code.encode(), SEED, RESEED)
        c = kvmfork_runner.run(code.encode(), bytes(64), RESEED)
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_stateless_runs_reseed_even_without_the_flag(self):
        code = "import random\nprint(random.random())"
        first = kvmfork_runner.run(code.encode(), SEED, RESEED)
        self.assertEqual(kvmfork_runner.run(code.encode(), SEED, 0), first)
        self.assertNotEqual(kvmfork_runner.run(code.encode(), bytes(64), 0), first)

    def test_session_runs_reseed_only_with_the_flag(self):
        new_session()
        code = "import random\nrandom.random()"
        first = session(code, RESEED)
        # Same seed, no flag: the stream goes on instead of starting over.
        self.assertNotEqual(session(code), first)
        self.assertEqual(session(code, RESEED), first)

    def test_session_seed_survives_into_the_next_run(self):
        new_session()
        self.assertEqual(session("import random\nrandom.seed(1)", RESEED), ("", "", 0, None))
        import random
        want = repr(random.Random(1).random())
        # Another fork seed, but no RESEED: the session's own seed decides.
        self.assertEqual(session("random.random()", seed=bytes(64)), ("", "", 0, want))

    def test_reseeded_session_runs_follow_the_fork_seed(self):
        new_session()
        session("import random")
        a = session("random.random()", RESEED, SEED)
        b = session("random.random()", RESEED, bytes(64))
        self.assertEqual(session("random.random()", RESEED, SEED), a)
        self.assertNotEqual(a, b)

    @unittest.skipUnless("numpy" in sys.modules or __import__("importlib").util.find_spec("numpy"),
                         "numpy not installed on this host")
    def test_seed_decides_numpy_stream(self):
        import numpy  # noqa: F401  (the runner reseeds numpy only once it is loaded)
        code = "import numpy\nprint(numpy.random.rand())"
        a = kvmfork_runner.run(code.encode(), SEED)
        self.assertEqual(a, kvmfork_runner.run(code.encode(), SEED))
        self.assertNotEqual(a, kvmfork_runner.run(code.encode(), bytes(64)))


class Contract(unittest.TestCase):
    def test_flags_match_contract_h(self):
        with open(CONTRACT_H) as f:
            defines = dict(re.findall(r"^#define (KVMFORK_\w+) (\w+)", f.read(), re.M))
        self.assertEqual(kvmfork_runner.REQ_FLAG_SESSION, int(defines["KVMFORK_REQ_FLAG_SESSION"], 0))
        self.assertEqual(kvmfork_runner.REQ_FLAG_RESEED, int(defines["KVMFORK_REQ_FLAG_RESEED"], 0))
        self.assertEqual(kvmfork_runner.REQ_FLAGS_KNOWN,
                         kvmfork_runner.REQ_FLAG_SESSION | kvmfork_runner.REQ_FLAG_RESEED)


class SessionNamespace(unittest.TestCase):
    def setUp(self):
        new_session()

    def test_state_persists_between_runs(self):
        self.assertEqual(session("x = 1\nimport json\ndef f(n):\n    return n + x"), ("", "", 0, None))
        self.assertEqual(session("x += 1; x"), ("", "", 0, "2"))
        self.assertEqual(session("print(f(1), json.dumps([x]))"), ("3 [2]\n", "", 0, None))

    def test_is_main(self):
        out, err, status, result = session("import sys, pickle\ndef g():\n    pass\n"
                                           "(__name__, sys.modules['__main__'] is sys.modules[__name__], "
                                           "pickle.loads(pickle.dumps(g)) is g)")
        self.assertEqual((out, err, status, result), ("", "", 0, "('__main__', True, True)"))
        self.assertIsNot(sys.modules["__main__"], kvmfork_runner._SESSION_MAIN)

    def test_stateless_runs_do_not_share_it(self):
        session("shared = 1")
        self.assertEqual(run("print('shared' in globals())\nalone = 1"), ("False\n", "", 0))
        self.assertEqual(session("'shared' in globals(), 'alone' in globals()"), ("", "", 0, "(True, False)"))

    def test_exception_keeps_earlier_statements(self):
        code = "a = 1\nb = a + 1\n1/0\nc = 3"
        out, err, status, result = session(code)
        self.assertEqual((out, err, status, result), python_c(code) + (None,))
        self.assertEqual(session("a, b, 'c' in globals()"), ("", "", 0, "(1, 2, False)"))

    def test_keyboard_interrupt_keeps_the_session(self):
        out, err, status, result = session("k = 1\nraise KeyboardInterrupt")
        self.assertEqual((out, status, result), ("", 1, None))
        self.assertTrue(err.startswith("Traceback (most recent call last):\n"), err)
        self.assertTrue(err.endswith("KeyboardInterrupt\n"), err)
        self.assertEqual(session("k"), ("", "", 0, "1"))

    def test_real_interrupt_of_a_busy_loop(self):
        # What the C agent's interrupt handler does (PyErr_SetInterruptEx),
        # from another thread while the session run spins.
        import _thread
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        try:
            out, err, status, result = session("spins = 0\nwhile True:\n    spins += 1")
        finally:
            timer.cancel()
        self.assertEqual((out, status, result), ("", 1, None))
        self.assertTrue(err.endswith("in <module>\nKeyboardInterrupt\n"), err)
        self.assertEqual(session("spins > 0"), ("", "", 0, "True"))

    def test_system_exit_keeps_the_session(self):
        self.assertEqual(session("import sys\nv = 1\nsys.exit(4)"), ("", "", 4, None))
        self.assertEqual(session("import sys\nsys.exit('bye')"), ("", "bye\n", 1, None))
        self.assertEqual(session("import os\nv += 1\nos._exit(5)"), ("", "", 5, None))
        self.assertEqual(session("v"), ("", "", 0, "2"))
        self.assertIs(os._exit, kvmfork_runner.os._exit)

    def test_no_atexit_per_session_run(self):
        try:
            self.assertEqual(session("import atexit\nf = atexit.register(print, 'at exit')"), ("", "", 0, None))
            self.assertEqual(session("print('next')"), ("next\n", "", 0, None))
        finally:
            self.assertEqual(session("atexit.unregister(print)"), ("", "", 0, None))

    def test_threads_are_not_joined(self):
        self.assertEqual(session("import threading\ngo = threading.Event()\n"
                                 "t = threading.Thread(target=go.wait)\nt.start()"), ("", "", 0, None))
        self.assertEqual(session("t.is_alive()"), ("", "", 0, "True"))
        self.assertEqual(session("go.set(); t.join(); t.is_alive()"), ("", "", 0, "False"))

    def test_template_holds_no_session(self):
        session("warm = 1")
        self.assertIsNotNone(kvmfork_runner._SESSION_MAIN)
        import gc
        kvmfork_runner.prepare_template()
        gc.unfreeze()
        self.assertIsNone(kvmfork_runner._SESSION_MAIN)
        self.assertEqual(session("'warm' in globals()"), ("", "", 0, "False"))


class FinalExpression(unittest.TestCase):
    def setUp(self):
        new_session()

    def test_name_alone(self):
        session("x = 'text'")
        self.assertEqual(session("x"), ("", "", 0, "'text'"))

    def test_none_is_no_result(self):
        self.assertEqual(session("None"), ("", "", 0, None))
        self.assertEqual(session("print('p')"), ("p\n", "", 0, None))

    def test_statement_last_is_no_result(self):
        self.assertEqual(session("y = 5"), ("", "", 0, None))
        self.assertEqual(session("y\nz = y"), ("", "", 0, None))
        self.assertEqual(session("for i in range(3):\n    i"), ("", "", 0, None))
        self.assertEqual(session(""), ("", "", 0, None))

    def test_multi_line_expression(self):
        self.assertEqual(session("base = 10\n(base +\n 1,\n [i for i in\n  range(2)])"), ("", "", 0, "(11, [0, 1])"))

    def test_output_before_the_result(self):
        self.assertEqual(session("print('before')\n2 ** 10"), ("before\n", "", 0, "1024"))

    def test_underscore_holds_the_last_value(self):
        session("[1, 2]")
        self.assertEqual(session("_ + [3]"), ("", "", 0, "[1, 2, 3]"))
        session("None")
        self.assertEqual(session("_"), ("", "", 0, "[1, 2, 3]"))

    def test_repr_not_str(self):
        self.assertEqual(session("'a\\nb'"), ("", "", 0, "'a\\nb'"))

    def test_syntax_error_matches_python_c(self):
        for code in ("x = (", "1 +", "  indented", "def f(:\n    pass"):
            with self.subTest(code=code):
                self.assertEqual(session(code), python_c(code) + (None,))

    def test_error_in_final_expression_matches_python_c(self):
        for code in ("1/0", "x = 1\nundefined_name", "def f():\n    raise ValueError('v')\nf()"):
            with self.subTest(code=code):
                self.assertEqual(session(code), python_c(code) + (None,))

    def test_failing_repr_is_an_error(self):
        out, err, status, result = session("class R:\n    def __repr__(self):\n        raise ValueError('no')\nR()")
        self.assertEqual((out, status, result), ("", 1, None))
        self.assertTrue(err.endswith("ValueError: no\n"), err)

    def test_await_is_a_syntax_error(self):
        out, err, status, result = session("await f()")
        self.assertEqual((out, status, result), ("", 1, None))
        self.assertIn("SyntaxError", err)

    def test_stateless_runs_report_no_result(self):
        self.assertEqual(kvmfork_runner.run(b"1 + 1", SEED, RESEED), (b"", b"", 0, None))


class InterruptGate(unittest.TestCase):
    class Gate:
        def __init__(self):
            self.state = False
            self.calls = []

        def __call__(self, enabled):
            self.state = enabled
            self.calls.append(enabled)

    def setUp(self):
        new_session()
        self.gate = self.Gate()
        kvmfork_runner.set_interruptible = self.gate

    def tearDown(self):
        kvmfork_runner.set_interruptible = kvmfork_runner._no_interrupts

    def test_open_only_while_user_code_runs(self):
        code = "import kvmfork_runner\nprint(kvmfork_runner.set_interruptible.state)"
        for flags in (RESEED, SESSION):
            with self.subTest(flags=flags):
                self.gate.calls.clear()
                out, _, status, _ = kvmfork_runner.run(code.encode(), SEED, flags)
                self.assertEqual((out, status), (b"True\n", 0))
                self.assertEqual(self.gate.calls, [True, False])

    def test_closed_after_errors_and_exits(self):
        for code in ("1/0", "import sys; sys.exit(2)", "import os; os._exit(3)", "raise KeyboardInterrupt"):
            with self.subTest(code=code):
                self.gate.calls.clear()
                kvmfork_runner.run(code.encode(), SEED, SESSION)
                self.assertEqual(self.gate.calls, [True, False])

    def test_never_opened_for_a_syntax_error(self):
        kvmfork_runner.run(b"x = (", SEED, SESSION)
        kvmfork_runner.run(b"x = (", SEED, RESEED)
        self.assertEqual(self.gate.calls, [])


if __name__ == "__main__":
    unittest.main()
