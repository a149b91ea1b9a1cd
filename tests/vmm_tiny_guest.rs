//! Fork engine and VMM tests on a tiny hand-made guest (no kernel): restore,
//! exec through the mailbox, copy-back reset, limits and hostile guests.
//! These need /dev/kvm and fail loudly without it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tiny_guest::*;
use kvmfork::api::{CancelToken, ExecFailure, ExecRequest, Language};
use kvmfork::engine::pool::{Pool, PoolConfig};
use kvmfork::engine::sandbox::{Limits, Sandbox};
use kvmfork::vmm::kick::ThreadTimer;

fn req(code: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        language: Language::Python,
        timeout,
        cancel: CancelToken::new(),
    }
}

#[test]
fn fresh_fork_runs_a_request_and_leaves_the_template_untouched() {
    let t = tiny_template();
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    let mut sb = Sandbox::fork_fresh(&kvm, &t, false).unwrap();
    let r = sb.exec(
        &t,
        &req("A", Duration::from_secs(10)),
        &Limits::default(),
        &timer,
    );
    assert_eq!(r.failure, None);
    assert_eq!(r.stdout, vec![b'A', 1]);
    assert_eq!(r.exit_code, b'A' as i32);
    // The fork's write went to its private copy only.
    assert_eq!(sb.ram().read_u64(COUNTER_GPA).unwrap(), 1);
    assert_eq!(t.source.read_u64(COUNTER_GPA).unwrap(), 0);
}

#[test]
fn concurrent_forks_are_isolated() {
    let t = tiny_template();
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    let mut a = Sandbox::fork_fresh(&kvm, &t, false).unwrap();
    let mut b = Sandbox::fork_fresh(&kvm, &t, false).unwrap();
    for _ in 0..3 {
        a.exec(
            &t,
            &req("A", Duration::from_secs(10)),
            &Limits::default(),
            &timer,
        );
    }
    let rb = b.exec(
        &t,
        &req("B", Duration::from_secs(10)),
        &Limits::default(),
        &timer,
    );
    assert_eq!(rb.stdout, vec![b'B', 1], "b must not see a's counter");
    assert_eq!(a.ram().read_u64(COUNTER_GPA).unwrap(), 3);
}

#[test]
fn reset_undoes_memory_and_register_changes() {
    let t = tiny_template();
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    let mut sb = Sandbox::fork_fresh(&kvm, &t, true).unwrap();
    let r = sb.exec(
        &t,
        &req("A", Duration::from_secs(10)),
        &Limits::default(),
        &timer,
    );
    assert_eq!(r.stdout, vec![b'A', 1]);
    assert_eq!(sb.vcpu().fd().get_regs().unwrap().r15, 0x1234);
    let copied = sb.reset(&t).unwrap().pages;
    assert!(
        copied >= 2,
        "counter page and mailbox pages must be copied back, got {copied}"
    );
    // Every register and every page is the template's again. (Registers may
    // travel in kvm_run's sync area: let KVM apply them without running.)
    sb.vcpu_mut().complete_pending_io().unwrap();
    let regs = sb.vcpu().fd().get_regs().unwrap();
    assert_eq!(regs.r15, t.state.vcpu.regs.r15);
    assert_eq!(regs.rip, t.state.vcpu.regs.rip);
    assert_eq!(sb.ram().read_u64(COUNTER_GPA).unwrap(), 0);
    let mut fork_page = vec![0u8; 8192];
    let mut tmpl_page = vec![0u8; 8192];
    sb.ram()
        .read(kvmfork::contract::MAILBOX_GPA, &mut fork_page)
        .unwrap();
    t.source
        .read(kvmfork::contract::MAILBOX_GPA, &mut tmpl_page)
        .unwrap();
    assert_eq!(
        fork_page, tmpl_page,
        "mailbox pages written by the host must be restored too"
    );
    // And it runs again from the start.
    let r = sb.exec(
        &t,
        &req("B", Duration::from_secs(10)),
        &Limits::default(),
        &timer,
    );
    assert_eq!(r.stdout, vec![b'B', 1]);
}

#[test]
fn pool_reuses_reset_sandboxes() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(
        t,
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..20 {
        let r = pool.exec(&req("Q", Duration::from_secs(10)));
        assert_eq!(
            r.stdout,
            vec![b'Q', 1],
            "round {i}: state leaked between users of one pooled VM"
        );
    }
    let s = pool.stats();
    assert_eq!(s.forks, 20);
    assert_eq!(s.fresh_vm_forks, 0, "all forks should come from the pool");
}

#[test]
fn hostile_length_is_refused_and_the_sandbox_is_not_reused() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(
        t,
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..Default::default()
        },
    )
    .unwrap();
    let r = pool.exec(&req("X", Duration::from_secs(10)));
    assert!(
        matches!(r.failure, Some(ExecFailure::BadResponse(_))),
        "{:?}",
        r.failure
    );
    assert_eq!(pool.stats().destroyed_vms, 1);
    let r = pool.exec(&req("A", Duration::from_secs(10)));
    assert_eq!(r.stdout, vec![b'A', 1]);
}

#[test]
fn infinite_loop_times_out_and_the_next_exec_works() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(
        t,
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..Default::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let r = pool.exec(&req("L", Duration::from_millis(300)));
    assert_eq!(r.failure, Some(ExecFailure::Timeout));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "timeout took {:?}",
        started.elapsed()
    );
    let r = pool.exec(&req("A", Duration::from_secs(10)));
    assert_eq!(r.stdout, vec![b'A', 1]);
    assert_eq!(pool.stats().timeouts, 1);
}

#[test]
fn cancellation_stops_a_running_guest() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(
        t,
        PoolConfig {
            max_idle: 1,
            prewarm: 0,
            warm: 0,
            limits: Limits::default(),
            ..Default::default()
        },
    )
    .unwrap();
    let rq = req("L", Duration::from_secs(60));
    let cancel = rq.cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        cancel.cancel();
    });
    let r = pool.exec(&rq);
    canceller.join().unwrap();
    assert_eq!(r.failure, Some(ExecFailure::Cancelled));
}

#[test]
fn guest_crash_is_reported_and_the_engine_keeps_serving() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(
        t,
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..Default::default()
        },
    )
    .unwrap();
    let r = pool.exec(&req("C", Duration::from_secs(10)));
    assert!(
        matches!(
            r.failure,
            Some(ExecFailure::GuestCrashed(_)) | Some(ExecFailure::Timeout)
        ),
        "{:?}",
        r.failure
    );
    let r = pool.exec(&req("A", Duration::from_secs(10)));
    assert_eq!(r.stdout, vec![b'A', 1]);
}

#[test]
fn oversized_code_is_rejected_before_running() {
    let t = Arc::new(tiny_template());
    let mut pool = Pool::new(t, PoolConfig::default()).unwrap();
    let big = "A".repeat(kvmfork::engine::mailbox::CODE_MAX + 1);
    let r = pool.exec(&req(&big, Duration::from_secs(10)));
    assert!(matches!(r.failure, Some(ExecFailure::Rejected(_))));
}

#[test]
fn snapshot_roundtrips_through_the_file_format() {
    let t = tiny_template();
    let dir = std::env::temp_dir().join(format!("kvmfork-tiny-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = kvmfork::vmm::memory::GuestRam::map(
        &t.memfd,
        RAM_SIZE,
        kvmfork::vmm::memory::Sharing::ReadOnly,
    )
    .unwrap();
    let mem = kvmfork::vmm::snapshot::write_memory(&dir.join("memory.bin"), &source).unwrap();
    assert!(
        mem.allocated_size < mem.apparent_size / 4,
        "memory file must be sparse: {mem:?}"
    );
    let mut meta = tiny_meta(&t.state);
    meta.memory = mem;
    kvmfork::vmm::snapshot::write_state(&dir.join("state.snap"), &meta, &t.state).unwrap();
    let loaded = kvmfork::template::Template::load(&dir).unwrap();
    assert_eq!(loaded.state.vcpu.regs.rip, t.state.vcpu.regs.rip);
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    let mut sb = Sandbox::fork_fresh(&kvm, &loaded, false).unwrap();
    let r = sb.exec(
        &loaded,
        &req("Z", Duration::from_secs(10)),
        &Limits::default(),
        &timer,
    );
    assert_eq!(r.stdout, vec![b'Z', 1]);
    // A corrupted memory file is refused.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    f.write_all_at(&[0xAB], CODE_GPA + 3).unwrap();
    let err = kvmfork::template::Template::load(&dir)
        .err()
        .expect("corrupted memory must be refused");
    assert!(err.to_string().contains("corrupted"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn both_reset_rules_run_on_either_host() {
    // The host seam is injectable: the PVM rule (exit counters prove a
    // user-mode-only exec: registers-and-FPU reset, no slot cycle) and the
    // hardware rule (every exec counts as kernel-entering: full reset, slot
    // cycled) are both exercised here whatever this host is. The tiny
    // agent never leaves ring 3 and takes no fault or interrupt, so the
    // counters call its execs user-mode-only on either host.
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    for counters_trusted in [true, false] {
        let mut t = tiny_template();
        t.caps.counters_see_kernel_entry = counters_trusted;
        let mut sb = Sandbox::fork_fresh(&kvm, &t, true).unwrap();
        for i in 1..=3u8 {
            let r = sb.exec(
                &t,
                &req("A", Duration::from_secs(10)),
                &Limits::default(),
                &timer,
            );
            assert_eq!(r.failure, None);
            assert_eq!(
                r.stdout,
                vec![b'A', 1],
                "exec {i}: counter reset to the template's"
            );
            assert_eq!(
                sb.kernel_entered(),
                !counters_trusted,
                "counters trusted = {counters_trusted}"
            );
            assert_eq!(sb.needs_slot_cycle(), !counters_trusted);
            sb.reset(&t).unwrap();
            assert_eq!(sb.ram().read_u64(COUNTER_GPA).unwrap(), 0);
        }
    }
}
