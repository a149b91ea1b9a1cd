//! kvmfork: copy-on-write KVM sandboxes for running untrusted code.

pub mod api;
pub mod bench;
pub mod bench_sessions;
pub mod engine;
pub mod mcp;
pub mod privileges;
pub mod seccomp;
pub mod server;
pub mod settings;
pub mod template;
pub mod vmm;

/// The guest<->host contract, generated from `guest/contract.h`.
#[allow(dead_code)]
pub mod contract {
    include!(concat!(env!("OUT_DIR"), "/contract.rs"));
}
