//! The template's pre-faulted heap reserve (guest/agent/heap.c) keeps its
//! guarantees: what one tenant writes into it is gone for the next tenant of
//! the same pooled VM, a run that outgrows it still works and is still held
//! to the sandbox memory limit. On the real Python template; needs /dev/kvm
//! and the built template.

mod common;

use std::time::Duration;

use common::real_template::{err, out, pool_with_limits, py};
use kvmfork::api::ExecFailure;
use kvmfork::engine::pool::Pool;
use kvmfork::engine::sandbox::Limits;

fn pool(max_dirty_mib: usize) -> Pool {
    pool_with_limits(Limits {
        max_dirty_pages: max_dirty_mib * 256,
        ..Limits::default()
    })
}

fn run(pool: &mut Pool, code: &str) -> kvmfork::api::ExecResult {
    pool.exec(&py(code, Duration::from_secs(240)))
}

fn ok(pool: &mut Pool, code: &str) -> String {
    let r = run(pool, code);
    assert!(
        r.failure.is_none() && r.exit_code == 0,
        "{code:?}: {:?} {}",
        r.failure,
        err(&r)
    );
    out(&r)
}

/// `malloc` (not calloc: nothing zeroes it for us) 48 MiB, which the heap
/// serves from the pre-faulted reserve, and print the bytes that hold the
/// previous tenant's marker; then fill the block with the marker ourselves
/// and print the guest page faults that took: a few (a stack page, ctypes'
/// own), not one per page of the 12 288 written, which were mapped in the
/// template.
const SCRIBBLE: &str = "\
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 48 << 20
before = faults()
p = libc.malloc(n)
assert p
found = ctypes.string_at(p, n).count(b'\\xa5')
ctypes.memset(p, 0xA5, n)
print(found, faults() - before < 16)
libc.free(ctypes.c_void_p(p))
";

#[test]
fn a_pooled_vm_gives_the_next_tenant_a_reserve_without_the_last_ones_bytes() {
    let mut pool = pool(256);
    // The first tenant finds template memory: no marker bytes, and writing
    // 48 MiB took (almost) no guest page fault.
    assert_eq!(ok(&mut pool, SCRIBBLE).trim(), "0 True");
    let s = pool.stats();
    for round in 0..2 {
        // The same block again on the reused VM: the reset put the template's
        // (zero) pages back, not the 96 MiB of 0xA5 the last tenant wrote.
        assert_eq!(ok(&mut pool, SCRIBBLE).trim(), "0 True", "round {round}");
    }
    let after = pool.stats();
    assert_eq!(
        after.fresh_vm_forks, s.fresh_vm_forks,
        "the later tenants ran on the pooled VM: {after:?}"
    );
}

#[test]
fn a_run_beyond_the_reserve_works_and_the_memory_limit_still_holds() {
    // 280 MiB: more than the reserve (256 MiB + the heap's 8 MiB top pad),
    // less than the limit. The part beyond it takes guest page faults.
    let mut big = pool(400);
    let code = "import resource\n\
                faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n\
                before = faults()\n\
                b = bytearray(280 << 20)\n\
                b[::4096] = b'\\x01' * (len(b) // 4096)\n\
                print(sum(b[::4096]), faults() - before > 0)";
    assert_eq!(
        ok(&mut big, code).trim(),
        format!("{} True", 280 * 256),
        "the run wrote every page of 280 MiB, some beyond the reserve"
    );

    // Over the limit: the exec fails with MemoryLimit, and the VM serves
    // the next request.
    let mut capped = pool(64);
    let r = run(
        &mut capped,
        "b = bytearray(100 << 20)\nb[::4096] = b'\\x01' * (len(b) // 4096)\nprint('not reached')",
    );
    assert_eq!(r.failure, Some(ExecFailure::MemoryLimit), "{}", out(&r));
    assert_eq!(ok(&mut capped, "print(6 * 7)").trim(), "42");
}
