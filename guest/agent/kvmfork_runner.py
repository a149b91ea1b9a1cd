"""Exec semantics of the kvmfork guest agent (`python -c` compatible).

The C agent (PID 1) loads this file once at boot, before the snapshot, and
calls `run(code, seed, flags)` for every request. Everything here runs on the
fork's hot path, so it must stay in user mode: no file, clock or random
syscalls, and only objects and code that the warm-up already touched.

Two modes, chosen per request by the request's flags word:
  - stateless (no REQ_FLAG_SESSION): exactly `python -c`, a fresh `__main__`
    per run, atexit callbacks and non-daemon threads at the end;
  - session (REQ_FLAG_SESSION): one `__main__` shared by every session run of
    this VM (globals, imports and heap persist), and, IPython-style, the value
    of a final expression statement is returned as its repr() and kept as `_`.
"""

import ast
import builtins
import io
import os
import random
import sys
import traceback
import types

# Exit statuses a parent process would see from `python -c` (8-bit wrap).
_EXIT_STATUS_MASK = 0xFF
_MT_KEY_WORDS = 624
_MT_KEY_BYTES = _MT_KEY_WORDS * 4
_C_LONG_MIN = -(2**63)
_C_LONG_MAX = 2**63 - 1

# Request flags, as in guest/contract.h (the C agent checks at boot that
# these equal its KVMFORK_REQ_FLAG_* values).
REQ_FLAG_SESSION = 1
REQ_FLAG_RESEED = 2
REQ_FLAGS_KNOWN = REQ_FLAG_SESSION | REQ_FLAG_RESEED


class _CaptureBuffer(io.BytesIO):
    """In-memory byte sink for sys.stdout/sys.stderr.

    close() is a no-op so user code that closes sys.stdout cannot destroy
    output that was already written.
    """

    def close(self):
        pass


class _HardExit(BaseException):
    """Raised in place of os._exit(): exiting PID 1 would panic the guest."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def _hard_exit(status):
    raise _HardExit(status)


def _no_interrupts(enabled):
    """Stand-in for the C agent's interrupt gate (outside the guest)."""


# The C agent replaces this with its own gate: True lets the host's
# interrupt raise KeyboardInterrupt (only while user code runs), False
# closes the gate again and drops an interrupt that arrived too late.
set_interruptible = _no_interrupts


def _text_stream(buffer):
    return io.TextIOWrapper(
        buffer,
        encoding="utf-8",
        errors="backslashreplace",
        newline="\n",
        write_through=True,
    )


_EMPTY_STDIN = None


def _empty_stdin():
    """A read-only empty stdin, reused while intact: building one per request
    dirties ~17 more pages in every fork."""
    global _EMPTY_STDIN
    if _EMPTY_STDIN is None or _EMPTY_STDIN.closed:
        _EMPTY_STDIN = io.TextIOWrapper(io.BufferedReader(io.BytesIO()), encoding="utf-8")
    return _EMPTY_STDIN


def _exit_status(code, stderr):
    """CPython's rules for SystemExit.code, as seen by a parent process."""
    if code is None:
        return 0
    if isinstance(code, int):
        # CPython converts with PyLong_AsLong (-1 on overflow), then exit()
        # truncates to 8 bits.
        status = code if _C_LONG_MIN <= code <= _C_LONG_MAX else -1
        return status & _EXIT_STATUS_MASK
    try:
        print(code, file=stderr)
    except Exception:
        pass
    return 1


def _print_exception(exc, stderr):
    """Print like CPython's top level: traceback without the runner's frame."""
    tb = exc.__traceback__
    # The outermost entries are the runner's own frames (the exec call);
    # `python -c` would start at <string>. compile() errors have no user
    # frames at all.
    while tb is not None and tb.tb_frame.f_code in _RUNNER_CODES:
        tb = tb.tb_next
    exc.__traceback__ = tb
    hook = sys.excepthook
    try:
        if hook is sys.__excepthook__:
            traceback.print_exception(type(exc), exc, tb, file=stderr)
        else:
            hook(type(exc), exc, tb)
    except BaseException as hook_error:
        # Last resort, as CPython does when the hook itself fails.
        try:
            stderr.write(f"Error in sys.excepthook: {hook_error!r}\n")
            stderr.write(f"Original exception was: {exc!r}\n")
        except Exception:
            pass


def _reseed(seed):
    """Give this fork its own user-space RNG streams (no syscalls)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        # A full MT19937 key (624 words) drawn from the seed's second half,
        # installed with set_state: numpy.random.seed(array) would run
        # ufuncs and dirty ~75 more pages per fork.
        random.seed(int.from_bytes(seed[32:], "little"))
        key = memoryview(random.randbytes(_MT_KEY_BYTES)).cast("I")
        numpy.random.set_state(("MT19937", key, _MT_KEY_WORDS, 0, 0.0))
    random.seed(int.from_bytes(seed[:32], "little"))


def _fresh_main():
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __builtins__=builtins,
        __loader__=_MAIN_LOADER,
        __spec__=None,
        __package__=None,
        __annotations__={},
    )
    return main


def _join_user_threads():
    """`python -c` waits for non-daemon threads before exiting."""
    threading = sys.modules.get("threading")
    if threading is None:
        return
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()


def _run_atexit(stderr):
    """`python -c` runs atexit callbacks; their errors go to stderr."""
    try:
        _atexit._run_exitfuncs()
    except BaseException as exc:
        _print_exception(exc, stderr)


def _drain(stream, buffer):
    try:
        stream.flush()
    except Exception:
        pass
    return buffer.getvalue()


_SESSION_MAIN = None


def _session_main():
    """The session's `__main__`, created by the first session run."""
    global _SESSION_MAIN
    if _SESSION_MAIN is None:
        _SESSION_MAIN = _fresh_main()
    return _SESSION_MAIN


def _split_final_expression(source):
    """Compile a session run: (statements, final expression or None).

    If the last top-level statement is an expression, it is compiled apart
    (mode "eval") so its value can be reported; line numbers stay those of
    the source, so tracebacks match an unsplit run.
    """
    tree = compile(source, "<string>", "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
    final = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        final = compile(ast.Expression(tree.body.pop().value), "<string>", "eval", dont_inherit=True)
    return compile(tree, "<string>", "exec", dont_inherit=True), final


def run(code, seed, flags):
    """Run `code` (UTF-8 bytes) like `python -c`, or as a session step.

    `seed` is the fork's 64 bytes of host randomness, `flags` the request's
    REQ_FLAG_* word. Returns (stdout bytes, stderr bytes, exit status,
    result), result being the repr() of a session run's final expression
    (None when there is none, its value is None, or the run failed).
    """
    session = bool(flags & REQ_FLAG_SESSION)
    # The host sets RESEED on every stateless run; a stateless run without it
    # (an older host sends no flags) is reseeded all the same, so no fork is
    # ever left on the template's streams. A session run only when flagged.
    if flags & REQ_FLAG_RESEED or not session:
        _reseed(seed)
    out_buffer = _CaptureBuffer()
    err_buffer = _CaptureBuffer()
    stdout = _text_stream(out_buffer)
    stderr = _text_stream(err_buffer)
    stdin = _empty_stdin()
    main = _session_main() if session else _fresh_main()
    saved = (sys.stdin, sys.stdout, sys.stderr, sys.modules.get("__main__"), os._exit,
             sys.excepthook, sys.unraisablehook, sys.displayhook)
    sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    sys.modules["__main__"] = main
    os._exit = _hard_exit
    status = 0
    result = None
    try:
        try:
            # argv is decoded this way by `python -c` in UTF-8 mode.
            source = code.decode("utf-8", "surrogateescape")
            if session:
                body, final = _split_final_expression(source)
            else:
                body, final = compile(source, "<string>", "exec", dont_inherit=True), None
            # User code runs (and only it) with the host's interrupt enabled.
            # Inline, not in a helper: every runner frame counts against the
            # user's recursion limit.
            set_interruptible(True)
            try:
                exec(body, main.__dict__)
                value = None if final is None else eval(final, main.__dict__)
            finally:
                set_interruptible(False)
            if value is not None:
                result = repr(value)
                main.__dict__["_"] = value
        except SystemExit as exc:
            status = _exit_status(exc.code, sys.stderr)
        except _HardExit as exc:
            status = _exit_status(exc.status, sys.stderr)
        except BaseException as exc:
            _print_exception(exc, sys.stderr)
            status = 1
            result = None
        if not session:
            # A session keeps its threads and atexit callbacks: the
            # "interpreter" does not exit between session runs.
            try:
                _join_user_threads()
                _run_atexit(sys.stderr)
            except BaseException as exc:
                _print_exception(exc, stderr)
    finally:
        (sys.stdin, sys.stdout, sys.stderr, previous_main, os._exit,
         sys.excepthook, sys.unraisablehook, sys.displayhook) = saved
        if previous_main is not None:
            sys.modules["__main__"] = previous_main
    return _drain(stdout, out_buffer), _drain(stderr, err_buffer), status, result


def prepare_template():
    """Called once after warm-up, right before the snapshot."""
    import gc

    global _SESSION_MAIN
    # The warm-up's session belongs to the template, not to any user: every
    # VM starts its session with a fresh namespace.
    _SESSION_MAIN = None
    # Callbacks registered while importing the template's modules belong to
    # the template, not to the user's program.
    _atexit._clear()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        # numpy would madvise(MADV_HUGEPAGE) every large allocation: a
        # syscall on the hot path for no gain in a short-lived fork.
        numpy.core.multiarray._set_madvise_hugepage(False)
    gc.collect()
    gc.freeze()


import atexit as _atexit  # noqa: E402  (kept private: users may reassign `atexit`)

_MAIN_LOADER = sys.modules["__main__"].__dict__.get("__loader__")
_RUNNER_CODES = frozenset((run.__code__, _split_final_expression.__code__))
sys.argv[:] = ["-c"]

# Imported into the template so user code finds them already loaded.
TEMPLATE_MODULES = (
    "numpy",
    "array", "base64", "bisect", "collections", "copy", "csv", "dataclasses",
    "datetime", "decimal", "enum", "fractions", "functools", "hashlib",
    "heapq", "itertools", "json", "math", "operator", "pprint", "re",
    "statistics", "string", "struct", "textwrap", "time", "typing",
)

# Run through the exact request path during warm-up so the code and data they
# touch are faulted in before the snapshot. Expected (stdout, exit status)
# make a broken template fail loudly at boot instead of in every fork.
# Entries are (code, stdout, exit status) for a stateless run (flags
# REQ_FLAG_RESEED, as the host sends them, no result), or
# (code, stdout, exit status, flags, result) with the expected result text.
_SESSION = REQ_FLAG_SESSION
WARMUP = (
    ("print('hello', 1 + 1)", "hello 2\n", 0),
    ("x = [i * i for i in range(1000)]\nprint(sum(x), len(x), max(x))", "332833500 1000 998001\n", 0),
    ("print(sum(range(10**6)))", "499999500000\n", 0),
    ("print(f'{3.14159:.2f} {42:>5} {255:#x} {1e10:e} {\"s\"!r}', '%d-%s' % (7, 'x'), '{}'.format([1, (2,), {3: 4}]))",
     "3.14    42 0xff 1.000000e+10 's' 7-x [1, (2,), {3: 4}]\n", 0),
    ("1/0", "", 1),
    ("def f():\n    raise ValueError('bad')\ntry:\n    f()\nexcept ValueError as e:\n    raise KeyError('k') from e", "", 1),
    ("undefined_name", "", 1),
    ("x = (", "", 1),
    ("import sys\nsys.exit(3)", "", 3),
    ("import sys\nsys.exit('message')", "", 1),
    ("import sys\nsys.exit()", "", 0),
    ("exit(0)", "", 0),
    ("import sys\nprint('out'); print('err', file=sys.stderr); sys.stdout.buffer.write(b'raw\\n')", "out\nraw\n", 0),
    ("import numpy as np\na = np.arange(10)\nprint(a.mean(), a.sum(), a.std().round(3))", "4.5 45 2.872\n", 0),
    ("import numpy as np\nrng = np.random.default_rng(1)\nm = rng.random((64, 64))\n"
     "print(np.allclose(np.linalg.inv(m) @ m, np.eye(64)), (m @ m.T).shape, np.linalg.det(np.eye(3)))",
     "True (64, 64) 1.0\n", 0),
    ("import numpy as np\na = np.linspace(0, 1, 100001)\nb = np.sin(a) ** 2 + np.cos(a) ** 2\n"
     "print(bool(np.all(np.isclose(b, 1))), np.sort(a[::-1])[:3], a.reshape(-1)[a > 0.99999].size)",
     "True [0.e+00 1.e-05 2.e-05] 1\n", 0),
    ("import numpy as np\nprint(np.arange(12).reshape(3, 4).T)\nprint(np.array([1.5, 2.25]), np.zeros(2, dtype=int))\n"
     "print(repr(np.float64(0.1)), np.fft.fft(np.ones(4)).real, np.random.rand(3).shape)",
     "[[ 0  4  8]\n [ 1  5  9]\n [ 2  6 10]\n [ 3  7 11]]\n[1.5  2.25] [0 0]\n0.1 [4. 0. 0. 0.] (3,)\n", 0),
    ("import json\nd = json.loads(json.dumps({'a': [1, 2.5, None, True], 'b': 'ü'}))\nprint(d, json.dumps(d, indent=1, sort_keys=True)[:5])",
     "{'a': [1, 2.5, None, True], 'b': 'ü'} {\n \"a\n", 0),
    ("import re\nprint(re.findall(r'\\d+', 'a1b22c333'), re.sub(r'(\\w)(\\w*)', lambda m: m[1].upper() + m[2], 'ab cd'))",
     "['1', '22', '333'] Ab Cd\n", 0),
    ("import math\nprint(math.sqrt(2) ** 2 == 2, math.factorial(20), round(math.pi, 5), math.gcd(12, 18))",
     "False 2432902008176640000 3.14159 6\n", 0),
    ("import random\nr = random.Random(5)\nprint(r.randint(1, 100), r.choice('abc'), len(r.sample(range(100), 10)));"
     "x = list(range(10)); random.shuffle(x); print(sorted(x) == list(range(10)), 0 <= random.random() < 1)",
     "80 b 10\nTrue True\n", 0),
    ("from collections import Counter, defaultdict, deque, namedtuple, OrderedDict\nP = namedtuple('P', 'x y')\n"
     "d = defaultdict(list); d['k'].append(1)\nq = deque([1, 2, 3], maxlen=2)\n"
     "print(Counter('abracadabra').most_common(2), dict(d), list(q), P(1, 2), OrderedDict(a=1))",
     "[('a', 5), ('b', 2)] {'k': [1]} [2, 3] P(x=1, y=2) OrderedDict([('a', 1)])\n", 0),
    ("import datetime as dt\nd = dt.date(2024, 2, 28) + dt.timedelta(days=2)\n"
     "print(d.isoformat(), d.strftime('%A %d %B %Y'), dt.datetime(2020, 1, 1, 12, 30).isoformat())",
     "2024-03-01 Friday 01 March 2024 2020-01-01T12:30:00\n", 0),
    ("import itertools, functools, operator\nprint(list(itertools.permutations('abc', 2))[:3], functools.reduce(operator.mul, range(1, 6)),"
     " list(itertools.accumulate([1, 2, 3])), list(itertools.chain([1], (2,))))",
     "[('a', 'b'), ('a', 'c'), ('b', 'a')] 120 [1, 3, 6] [1, 2]\n", 0),
    ("from dataclasses import dataclass, field\nfrom typing import List\n@dataclass\nclass C:\n    x: int\n    y: List[int] = field(default_factory=list)\n"
     "class D(C):\n    def total(self):\n        return self.x + sum(self.y)\nprint(C(1), D(1, [2, 3]).total())",
     "C(x=1, y=[]) 6\n", 0),
    ("from decimal import Decimal\nfrom fractions import Fraction\nimport statistics\n"
     "print(Decimal('0.1') + Decimal('0.2'), Fraction(1, 3) * 3, statistics.mean([1, 2, 3, 4]), statistics.median([3, 1, 2]))",
     "0.3 1 2.5 2\n", 0),
    ("import hashlib, base64, struct, textwrap, string\nprint(hashlib.sha256(b'x').hexdigest()[:8], base64.b64encode(b'hi').decode(),"
     " struct.pack('<I', 1).hex(), textwrap.shorten('a b c d e f', 7), string.ascii_lowercase[:3])",
     "2d711642 aGk= 01000000 a [...] abc\n", 0),
    ("s = 'Hello, World'\nprint(s.upper(), s.split(', '), s[::-1], s.replace('l', 'L'), ' '.join(sorted(s.lower().split(', '))),"
     " 'x'.center(5, '*'), s.encode().decode('ascii'), str(b'\\xff'))",
     "HELLO, WORLD ['Hello', 'World'] dlroW ,olleH HeLLo, WorLd hello world **x** Hello, World b'\\xff'\n", 0),
    ("class E(Exception):\n    pass\ntry:\n    raise E('x')\nexcept E as e:\n    print(type(e).__name__, e.args)\n"
     "d = {i: str(i) for i in range(100)}\nprint(len(d), {1, 2} | {3}, sorted(d.items(), key=lambda kv: -kv[0])[0])",
     "E ('x',)\n100 {1, 2, 3} (99, '99')\n", 0),
    ("import sys\nsys.stdout.write('x' * 2_000_000)\nprint('y' * 100_000, file=sys.stderr)", "x" * 2_000_000, 0),
    ("import os\nprint('before'); os._exit(4)", "before\n", 4),
    ("import atexit\natexit.register(print, 'at exit')", "at exit\n", 0),
    ("def r(n):\n    return 0 if n == 0 else 1 + r(n - 1)\nprint(r(900))", "900\n", 0),
    ("def r(n):\n    return r(n + 1)\nr(0)", "", 1),
    ("print(input())", "", 1),
    # Session mode, in order: one namespace across runs, final expressions,
    # errors and exits that keep the namespace, no reseed without the flag.
    ("x = 1", "", 0, _SESSION | REQ_FLAG_RESEED, None),
    ("x += 1; x", "", 0, _SESSION, "2"),
    ("import random\nrandom.seed(1)", "", 0, _SESSION, None),
    ("random.random()", "", 0, _SESSION, repr(random.Random(1).random())),
    ("y = [x]\n1/0", "", 1, _SESSION, None),
    ("print(x, y)\nx", "2 [2]\n", 0, _SESSION, "2"),
    ("def f(n):\n    return n * x\n[f(i) for i in range(3)]", "", 0, _SESSION, "[0, 2, 4]"),
    ("_[-1] + len(_)", "", 0, _SESSION, "7"),
    ("import numpy as np\na = np.arange(6).reshape(2, 3)\na.sum(axis=0)", "", 0, _SESSION, "array([3, 5, 7])"),
    ("x = (", "", 1, _SESSION, None),
    ("import sys\nx = 3\nsys.exit(5)", "", 5, _SESSION, None),
    ("import os\nos._exit(6)", "", 6, _SESSION, None),
    ("print(x)\nNone", "3\n", 0, _SESSION, None),
    ("(x,\n 'é' * 2)", "", 0, _SESSION, "(3, 'éé')"),
    ("class R:\n    def __repr__(self):\n        raise ValueError('no repr')\nR()", "", 1, _SESSION, None),
    ("print('x' in globals(), 'y' in globals())", "False False\n", 0),
)
