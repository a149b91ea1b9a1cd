//! End-to-end tests of the fork engine on the real template (Linux + CPython +
//! numpy). Needs /dev/kvm and a built template (tests/run.sh builds it).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::real_template::*;
use kvmfork::api::ExecFailure;

const T: Duration = Duration::from_secs(60);

#[test]
fn python_and_numpy_give_correct_output() {
    let mut p = pool();
    let r = p.exec(&py("print(1 + 1)", T));
    assert_eq!(
        (out(&r), r.exit_code, r.failure.clone()),
        ("2\n".into(), 0, None),
        "stderr: {}",
        err(&r)
    );
    let r = p.exec(&py("print(sum(range(10**6)))", T));
    assert_eq!(out(&r), "499999500000\n");
    let r = p.exec(&py("import numpy as np\nprint(np.arange(10).mean())\nprint(int(np.ones((50, 50)).dot(np.ones(50)).sum()))", T));
    assert_eq!(out(&r), "4.5\n2500\n", "stderr: {}", err(&r));
    let r = p.exec(&py(
        "import sys\nprint('to stderr', file=sys.stderr)\nprint('x')",
        T,
    ));
    assert_eq!((out(&r), err(&r)), ("x\n".into(), "to stderr\n".into()));
}

#[test]
fn exceptions_and_exit_codes_follow_python_c() {
    let mut p = pool();
    let r = p.exec(&py("def f():\n    raise ValueError('boom')\nf()", T));
    assert_eq!(r.exit_code, 1);
    assert!(
        err(&r).contains("Traceback (most recent call last)")
            && err(&r).contains("ValueError: boom"),
        "{}",
        err(&r)
    );
    let r = p.exec(&py("import sys\nprint('before')\nsys.exit(3)", T));
    assert_eq!((r.exit_code, out(&r)), (3, "before\n".into()));
    let r = p.exec(&py("raise SystemExit('bye')", T));
    assert_eq!((r.exit_code, err(&r)), (1, "bye\n".into()));
    let r = p.exec(&py("import sys; sys.exit(None)", T));
    assert_eq!(r.exit_code, 0);
    let r = p.exec(&py("def broken(:\n    pass", T));
    assert_eq!(r.exit_code, 1);
    assert!(err(&r).contains("SyntaxError"), "{}", err(&r));
}

#[test]
fn infinite_loop_times_out_and_next_exec_works() {
    let mut p = pool();
    let started = Instant::now();
    let r = p.exec(&py("while True: pass", Duration::from_secs(2)));
    let took = started.elapsed();
    assert_eq!(r.failure, Some(ExecFailure::Timeout));
    assert!(
        took < Duration::from_secs(10),
        "timeout of 2 s returned after {took:?}"
    );
    let r = p.exec(&py("print('alive')", T));
    assert_eq!(out(&r), "alive\n");
}

#[test]
fn secrets_do_not_leak_between_sandboxes() {
    let mut a = pool();
    let mut b = pool();
    let write = "SECRET = 's3cr3t'\nopen('/tmp/secret', 'w').write(SECRET)\nimport builtins; builtins.LEAK = SECRET\nprint('written')";
    let check =
        "import os, builtins\nprint(os.path.exists('/tmp/secret'), hasattr(builtins, 'LEAK'))";
    let r = a.exec(&py(write, T));
    assert_eq!(out(&r), "written\n", "stderr: {}", err(&r));
    // A concurrent sandbox (another VM) and the next user of the same pooled VM see nothing.
    let r = b.exec(&py(check, T));
    assert_eq!(out(&r), "False False\n");
    let r = a.exec(&py(check, T));
    assert_eq!(
        out(&r),
        "False False\n",
        "the pooled VM kept the previous user's data"
    );
}

#[test]
fn forks_get_distinct_randomness() {
    let mut p = pool();
    let mut seen = HashSet::new();
    for i in 0..1000 {
        let r = p.exec(&py("import os; print(os.urandom(16).hex())", T));
        assert_eq!(r.exit_code, 0, "fork {i}: {}", err(&r));
        assert!(
            seen.insert(out(&r)),
            "fork {i} repeated an os.urandom value"
        );
    }
    let mut user = HashSet::new();
    for _ in 0..50 {
        let r = p.exec(&py("import random, numpy\nprint(random.random(), numpy.random.rand(), numpy.random.default_rng().random())", T));
        assert!(
            user.insert(out(&r)),
            "user-space generators repeated across forks: {}",
            out(&r)
        );
    }
}

#[test]
fn oversized_output_is_truncated_and_flagged() {
    let mut p = pool();
    let r = p.exec(&py("print('x' * 3_000_000)", T));
    assert!(r.stdout_truncated);
    assert!(r.stdout.len() <= 1 << 20);
    assert_eq!(r.failure, None);
}

#[test]
fn hostile_programs_end_in_clear_results_and_the_engine_keeps_serving() {
    let mut p = pool();
    // Fork bomb: stopped by the timeout (or the guest dies); never the host.
    let r = p.exec(&py(
        "import os\nwhile True:\n    os.fork()",
        Duration::from_secs(3),
    ));
    assert!(
        r.failure.is_some() || r.exit_code != 0,
        "fork bomb gave a normal result"
    );
    assert_eq!(out(&p.exec(&py("print('ok')", T))), "ok\n");
    // Memory exhaustion: Python's MemoryError, or the dirty-page cap.
    let r = p.exec(&py("x = bytearray(2 * 1024**3)", Duration::from_secs(20)));
    assert!(
        r.failure == Some(ExecFailure::MemoryLimit) || err(&r).contains("MemoryError"),
        "memory exhaustion: {:?} {}",
        r.failure,
        err(&r)
    );
    assert_eq!(out(&p.exec(&py("print('ok')", T))), "ok\n");
    // os._exit in the agent (PID 1) panics the guest kernel: a crash result.
    let r = p.exec(&py("import os; os._exit(7)", Duration::from_secs(30)));
    assert!(
        r.failure.is_some() || r.exit_code == 7,
        "os._exit: {:?} exit {}",
        r.failure,
        r.exit_code
    );
    assert_eq!(out(&p.exec(&py("print('ok')", T))), "ok\n");
}

#[test]
fn execs_that_enter_the_guest_kernel_leave_a_reusable_vm() {
    // New mappings change guest page tables; the pooled reset must not leave
    // KVM's shadow copies of them behind.
    let mut p = pool();
    for code in [
        "import mmap\nm = mmap.mmap(-1, 1 << 20)\nm[0:3] = b'abc'\nprint(bytes(m[0:3]))",
        "import uuid; print(len(str(uuid.uuid4())))",
        "import os; print(os.getpid())",
        "import time; time.sleep(0.05); print('slept')",
    ] {
        let r = p.exec(&py(code, T));
        assert_eq!(r.failure, None, "{code}: {}", err(&r));
        let r = p.exec(&py("print('after')", T));
        assert_eq!(
            (out(&r), r.failure.clone()),
            ("after\n".into(), None),
            "exec after {code:?}: {}",
            err(&r)
        );
    }
    assert_eq!(
        p.stats().fresh_vm_forks,
        0,
        "the pooled VM should have been reused throughout"
    );
}

/// The guest-kernel crash paths a tenant can take on purpose, each of which
/// makes the VMM report the guest console's tail: rebooting the kernel
/// (`reboot(2)`, two console lines) and panicking it (libc's `_exit` from
/// PID 1 — the runner intercepts only `os._exit` — gives "Attempted to
/// kill init!" and `panic=-1` resets the VM). Neither may show an earlier
/// request's console output, and the pool must go on serving.
#[test]
fn console_output_does_not_reach_the_next_user() {
    let mut p = pool();
    let crashes = [
        (
            "reboot",
            "import ctypes, os\nos.write(1, b'TENANT-B-OWN\\n')\nctypes.CDLL(None).reboot(0x01234567)",
        ),
        (
            "panic",
            "import ctypes, os\nos.write(1, b'TENANT-B-OWN\\n')\nctypes.CDLL(None)._exit(9)",
        ),
    ];
    for (name, crash) in crashes {
        // Written to fd 1 directly, i.e. the guest console.
        let r = p.exec(&py(
            "import os; os.write(1, b'TENANT-A-SECRET\\n'); print('a')",
            T,
        ));
        assert_eq!(out(&r), "a\n", "{name}: {}", err(&r));
        let r = p.exec(&py(crash, Duration::from_secs(60)));
        let Some(ExecFailure::GuestCrashed(message)) = &r.failure else {
            panic!(
                "{name}: expected guest_crashed, got {:?} {}",
                r.failure,
                err(&r)
            );
        };
        eprintln!("{name}: {message}");
        assert!(
            message.contains("guest requested a reset"),
            "{name}: the guest kernel did not go down: {message}"
        );
        if name == "panic" {
            // The kernel's own panic path (its stack trace is the tail).
            assert!(
                message.contains(" panic+") && message.contains("do_exit"),
                "{name}: not a kernel panic: {message}"
            );
        }
        if name == "reboot" {
            // Short enough that the tail shows the request's own console
            // lines: an earlier request's would be there too if they leaked.
            assert!(message.contains("TENANT-B-OWN"), "{name}: {message}");
            assert!(message.contains("reboot"), "{name}: {message}");
        }
        assert!(
            !message.contains("TENANT-A-SECRET"),
            "{name}: previous user's console output leaked: {message}"
        );
        assert_eq!(out(&p.exec(&py("print('after')", T))), "after\n", "{name}");
    }
}
