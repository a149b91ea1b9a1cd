//! Guest-physical memory layout for booting Linux (x86_64, 64-bit boot
//! protocol, as Firecracker does it). The mailbox and doorbell addresses live
//! in `guest/contract.h` (see `crate::contract`).

use crate::contract;

/// GDT with null, 64-bit code, data and TSS descriptors.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack for the first kernel instructions.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables covering the first 1 GiB with 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA: the low RAM region ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel image and everything loaded must start above this address.
pub const HIMEM_START: u64 = 0x100000;

pub const MAILBOX_GPA: u64 = contract::MAILBOX_GPA;
pub const MAILBOX_SIZE: u64 = contract::MAILBOX_SIZE;
pub const DOORBELL_GPA: u64 = contract::DOORBELL_GPA;

/// Smallest guest RAM the layout supports (mailbox must be inside RAM).
pub const MIN_RAM: u64 = MAILBOX_GPA + MAILBOX_SIZE + (64 << 20);

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The e820 map for `ram_size` bytes of guest RAM: low RAM, a hole for the
/// BIOS area, high RAM with the mailbox carved out as reserved.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, EBDA_START, E820_RAM),
        (HIMEM_START, MAILBOX_GPA - HIMEM_START, E820_RAM),
        (MAILBOX_GPA, MAILBOX_SIZE, E820_RESERVED),
        (
            MAILBOX_GPA + MAILBOX_SIZE,
            ram_size - MAILBOX_GPA - MAILBOX_SIZE,
            E820_RAM,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_without_overlap_and_reserves_mailbox() {
        let ram = 512u64 << 20;
        let map = e820_map(ram);
        let mut last_end = 0;
        for &(start, len, _) in &map {
            assert!(start >= last_end, "overlap at {start:#x}");
            last_end = start + len;
        }
        assert_eq!(last_end, ram);
        assert!(map
            .iter()
            .any(|&(s, l, t)| s == MAILBOX_GPA && l == MAILBOX_SIZE && t == E820_RESERVED));
        assert!(DOORBELL_GPA >= ram, "doorbell must be outside RAM");
    }
}
