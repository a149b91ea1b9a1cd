//! Pooled VMs do not accumulate one tenant's footprint for the next: the
//! reset after a tenant gives back what it wrote in long runs, a VM that
//! still holds more than the recycle threshold is destroyed at the worker's
//! idle tick (not reused), and the memory limit counts what the current
//! tenant wrote since its reset, not what the VM holds from earlier tenants.
//! On the real Python template; needs /dev/kvm and the built template.

mod common;

use std::time::Duration;

use common::real_template::{out, py, python_template};
use kvmfork::engine::pool::{Pool, PoolConfig};

/// Writes 12 MiB of guest memory: every other page of a 24 MiB buffer.
const HEAVY: &str = "b = bytearray(24 << 20)\nb[::8192] = bytes([1]) * 3072\nprint(len(b))";

fn pool(recycle_dirty_bytes: u64) -> Pool {
    Pool::new(
        python_template(),
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            recycle_dirty_bytes,
            ..Default::default()
        },
    )
    .expect("pool on the real template")
}

/// Runs `code` on the pool, lets the worker's idle tick pass, and returns
/// what the pooled VM holds apart from the template once reset for the next
/// tenant (None when the pool kept no VM).
fn run_then_held_bytes(pool: &mut Pool, code: &str) -> Option<u64> {
    let r = pool.exec(&py(code, Duration::from_secs(120)));
    assert!(
        r.failure.is_none() && r.exit_code == 0,
        "{code:?}: {:?}",
        r.failure
    );
    pool.housekeep(Duration::ZERO);
    if pool.stats().pooled_vms == 0 {
        return None;
    }
    let (sb, pooled) = pool.acquire().unwrap();
    assert!(pooled);
    let held = sb.dirty_bytes();
    assert!(
        sb.tenant_dirty_bytes() < 64 << 10,
        "a reset VM's next tenant starts at zero: {}",
        sb.tenant_dirty_bytes()
    );
    pool.release(sb);
    Some(held)
}

#[test]
fn a_heavy_tenant_leaves_the_vm_holding_what_a_light_one_does() {
    let mut pool = pool(u64::MAX);
    let light = run_then_held_bytes(&mut pool, "print(1)").unwrap();
    let heavy = run_then_held_bytes(&mut pool, HEAVY).unwrap();
    let after = run_then_held_bytes(&mut pool, "print(2)").unwrap();
    // The 12 MiB were written in long physical runs: the reset mapped the
    // template back over them instead of keeping private copies.
    assert!(
        heavy < light + (1 << 20) && after < light + (1 << 20),
        "held after print(1) {light}, after 12 MiB {heavy}, then {after}"
    );
    assert_eq!(pool.stats().destroyed_vms, 0);
}

#[test]
fn a_vm_over_the_recycle_threshold_is_replaced_at_the_idle_tick() {
    // Below what any Python run leaves (~1 MiB of scattered pages).
    let mut pool = pool(256 << 10);
    assert_eq!(run_then_held_bytes(&mut pool, "print(1)"), None);
    let s = pool.stats();
    assert_eq!(s.destroyed_vms, 1, "the VM went at the tick: {s:?}");
    let fresh_before = s.fresh_vm_forks;
    let r = pool.exec(&py("print('b' in dir())", Duration::from_secs(30)));
    assert_eq!(out(&r), "False\n");
    assert_eq!(pool.stats().fresh_vm_forks, fresh_before + 1);
    // With the default threshold the same VM is kept.
    let mut pool = pool_default();
    assert!(run_then_held_bytes(&mut pool, HEAVY).is_some());
    assert_eq!(pool.stats().destroyed_vms, 0);
}

fn pool_default() -> Pool {
    pool(PoolConfig::default().recycle_dirty_bytes)
}
