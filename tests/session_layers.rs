//! Checkpoint layers on the real Python template, at the engine level: forks
//! map a session's layer copy-on-write, forks of forks stack their own pages
//! on top, and a VM that held a session's layer is reset to the exact
//! template before anyone else's stateless run gets it. Needs /dev/kvm and
//! the built template (tests/run.sh builds it); fails loudly without them.

mod common;

use std::time::Duration;

use common::real_template::{out, py, python_template};
use kvmfork::engine::pool::{Pool, PoolConfig};
use kvmfork::engine::sandbox::{Limits, Sandbox};

fn pool(max_idle: usize) -> Pool {
    Pool::new(
        python_template(),
        PoolConfig {
            max_idle,
            prewarm: 1,
            warm: 0,
            ..Default::default()
        },
    )
    .expect("pool on the real template")
}

fn run(pool: &mut Pool, sb: &mut Sandbox, code: &str) -> String {
    let r = pool.run_session(
        sb,
        &py(code, Duration::from_secs(30)),
        false,
        &Limits::default(),
    );
    assert!(
        r.failure.is_none() && r.exit_code == 0,
        "{code:?} failed: {:?} exit {} stderr {}",
        r.failure,
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    r.result.unwrap_or_default()
}

#[test]
fn forks_of_forks_see_every_layer_and_nobody_sees_a_childs_writes() {
    let mut pool = pool(4);
    let mut parent = pool.open_session().unwrap();
    run(
        &mut pool,
        &mut parent,
        "import numpy as np\na = np.arange(1 << 20)\nopen('/tmp/parent-file', 'w').write('p')",
    );
    let cp = pool.checkpoint(&mut parent).unwrap();
    assert!(
        cp.dirty_bytes() >= 8 << 20,
        "layer holds the 8 MiB array: {}",
        cp.dirty_bytes()
    );

    let mut child = pool.sandbox_from(&cp).unwrap();
    assert_eq!(run(&mut pool, &mut child, "int(a[-1])"), "1048575");
    run(
        &mut pool,
        &mut child,
        "a[0] = -1\nb = 2\nopen('/tmp/child-file', 'w').write('c')",
    );
    let cp2 = pool.checkpoint(&mut child).unwrap();
    let mut grandchild = pool.sandbox_from(&cp2).unwrap();
    assert_eq!(
        run(
            &mut pool,
            &mut grandchild,
            "import os\n(int(a[0]), b, int(a[-1]), os.path.exists('/tmp/parent-file'), open('/tmp/child-file').read())"
        ),
        "(-1, 2, 1048575, True, 'c')"
    );
    // A sibling of the child from the first checkpoint, and the parent: untouched.
    let mut sibling = pool.sandbox_from(&cp).unwrap();
    for sb in [&mut sibling, &mut parent] {
        assert_eq!(
            run(
                &mut pool,
                sb,
                "import os\n(int(a[0]), 'b' in globals(), os.path.exists('/tmp/child-file'))"
            ),
            "(0, False, False)"
        );
    }
    // The grandchild's layer outlives the child that made it.
    pool.release(child);
    pool.housekeep(Duration::from_secs(5));
    let mut again = pool.sandbox_from(&cp2).unwrap();
    assert_eq!(run(&mut pool, &mut again, "int(a[0]), b"), "(-1, 2)");
    for sb in [grandchild, sibling, parent, again] {
        pool.release(sb);
    }
}

#[test]
fn a_vm_that_held_a_session_layer_is_reset_to_the_exact_template() {
    let mut pool = pool(6);
    let mut parent = pool.open_session().unwrap();
    run(
        &mut pool,
        &mut parent,
        "import numpy as np\nsecret = np.full(1 << 22, 42, dtype=np.uint8)\nopen('/tmp/session-secret', 'w').write('s')",
    );
    let cp = pool.checkpoint(&mut parent).unwrap();
    let mut children: Vec<Sandbox> = (0..3).map(|_| pool.sandbox_from(&cp).unwrap()).collect();
    // One child runs (its own pages over the layer), the others stay idle.
    run(&mut pool, &mut children[0], "secret[:] = 43");
    pool.release(parent);
    for c in children {
        pool.release(c);
    }
    // Half of the reuses come straight from the pool (reset at acquire), the
    // other half after an idle tick reset them in the background.
    for round in 0..8 {
        if round % 2 == 1 {
            pool.housekeep(Duration::from_secs(5));
        }
        let r = pool.exec(&py(
            "import os\nprint('secret' in globals(), os.path.exists('/tmp/session-secret'))",
            Duration::from_secs(30),
        ));
        assert!(r.failure.is_none(), "round {round}: {:?}", r.failure);
        assert_eq!(out(&r).trim(), "False False", "round {round}");
    }
    // And a session opened on a reused VM starts from the template too.
    let mut fresh = pool.open_session().unwrap();
    assert_eq!(run(&mut pool, &mut fresh, "'secret' in globals()"), "False");
    pool.release(fresh);
}

#[test]
fn incremental_checkpoints_fork_and_restore_to_their_own_states() {
    let mut pool = pool(4);
    let mut s = pool.open_session().unwrap();
    run(
        &mut pool,
        &mut s,
        "import numpy as np\nbig = np.full(4 << 20, 3, dtype=np.uint8)\nstep = 'a'\nopen('/tmp/step', 'w').write('a')",
    );
    let a = pool.checkpoint(&mut s).unwrap();
    run(
        &mut pool,
        &mut s,
        "step = 'b'\nbig[:10] = 9\nopen('/tmp/step', 'w').write('b')",
    );
    let b = pool.checkpoint(&mut s).unwrap();
    // B was captured from A's image: it copied only what changed since A.
    assert!(
        b.captured_bytes() < a.captured_bytes() / 2,
        "incremental capture copied {} bytes, the full one {}",
        b.captured_bytes(),
        a.captured_bytes()
    );
    assert!(b.dirty_bytes() >= 4 << 20, "B holds the array too");
    // The server's idle tick compacts the idle session's checkpoint into one
    // layer: the same state in fewer mappings, and B still restores in place.
    assert!(s.compact(0).unwrap(), "B has a delta to compact");
    let flat = pool.checkpoint(&mut s).unwrap();
    assert!(
        flat.runs() < b.runs(),
        "{} runs vs {}",
        flat.runs(),
        b.runs()
    );
    let mut child_flat = pool.sandbox_from(&flat).unwrap();
    let state = "(step, int(big[0]), int(big[-1]), open('/tmp/step').read())";

    // Forks of either see exactly their checkpoint's state.
    let mut child_b = pool.sandbox_from(&b).unwrap();
    assert_eq!(run(&mut pool, &mut child_b, state), "('b', 9, 3, 'b')");
    assert_eq!(run(&mut pool, &mut child_flat, state), "('b', 9, 3, 'b')");
    pool.release(child_flat);
    let mut child_a = pool.sandbox_from(&a).unwrap();
    assert_eq!(run(&mut pool, &mut child_a, state), "('a', 3, 3, 'a')");

    // In place: change everything, restore B (the image: pages copied back).
    run(
        &mut pool,
        &mut s,
        "step = 'c'\nbig[:] = 1\nextra = list(range(100000))\nopen('/tmp/step', 'w').write('c')",
    );
    pool.restore(&mut s, &b).unwrap();
    assert_eq!(run(&mut pool, &mut s, state), "('b', 9, 3, 'b')");
    assert_eq!(run(&mut pool, &mut s, "'extra' in dir()"), "False");
    // A user-mode-only run, then B again.
    run(&mut pool, &mut s, "step = 'd'");
    pool.restore(&mut s, &b).unwrap();
    assert_eq!(run(&mut pool, &mut s, "step"), "'b'");
    // An older checkpoint (not the image), then a capture on top of it.
    pool.restore(&mut s, &a).unwrap();
    assert_eq!(run(&mut pool, &mut s, state), "('a', 3, 3, 'a')");
    run(&mut pool, &mut s, "step = 'e'");
    let e = pool.checkpoint(&mut s).unwrap();
    run(&mut pool, &mut s, "step = 'f'\nbig[5] = 5");
    pool.restore(&mut s, &e).unwrap();
    assert_eq!(
        run(
            &mut pool,
            &mut s,
            "(step, int(big[5]), open('/tmp/step').read())"
        ),
        "('e', 3, 'a')"
    );
    // The children were not disturbed by any of it.
    assert_eq!(run(&mut pool, &mut child_b, state), "('b', 9, 3, 'b')");
    assert_eq!(run(&mut pool, &mut child_a, state), "('a', 3, 3, 'a')");
    for sb in [child_a, child_b, s] {
        pool.release(sb);
    }
    // And a stateless run on any of those VMs sees the bare template.
    for _ in 0..3 {
        let r = pool.exec(&py("print('big' in dir())", Duration::from_secs(30)));
        assert_eq!(out(&r), "False\n");
    }
}
