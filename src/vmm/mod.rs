//! The virtual machine monitor: each module owns one thing (Firecracker's
//! layout): memory, vm, vcpu, boot, cpuid, devices, kick, snapshot;
//! `host` is the one place that says what this host's KVM can do.

pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod host;
pub mod kick;
pub mod layout;
pub mod memory;
pub mod msr_filter;
pub mod snapshot;
pub mod stats;
pub mod vcpu;
pub mod vm;
