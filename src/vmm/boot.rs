//! Booting a Linux kernel from its uncompressed ELF (`vmlinux`) with the
//! 64-bit boot protocol: the kernel is entered at `startup_64` in long mode
//! with identity-mapped page tables and `boot_params` in RSI (Firecracker's way;
//! no real-mode or 32-bit code has to be emulated on PVM hosts).

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::GuestAddress;

use super::layout::*;
use super::memory::GuestRam;
use super::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening kernel {0}: {1}")]
    OpenKernel(String, std::io::Error),
    #[error("loading kernel ELF: {0}")]
    LoadKernel(linux_loader::loader::Error),
    #[error("reading initrd {0}: {1}")]
    ReadInitrd(String, std::io::Error),
    #[error(
        "initrd of {size} bytes does not fit in guest RAM above the mailbox ({ram} bytes of RAM)"
    )]
    InitrdTooLarge { size: u64, ram: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    #[error("guest RAM of {0} bytes is below the minimum the layout needs")]
    RamTooSmall(u64),
    #[error("writing boot structures to guest memory: {0}")]
    Memory(#[from] super::memory::MemoryError),
    #[error("vm-memory view: {0}")]
    View(String),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(String),
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(kvm_ioctls::Error),
}

/// Where the kernel was put and where to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub initrd_addr: u64,
    pub initrd_size: u64,
}

/// Loads `vmlinux` and the initrd into `ram` and writes boot_params and the
/// command line.
pub fn load_linux(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, BootError> {
    let ram_size = ram.size() as u64;
    if ram_size < MIN_RAM {
        return Err(BootError::RamTooSmall(ram_size));
    }
    let mut image =
        File::open(kernel).map_err(|e| BootError::OpenKernel(kernel.display().to_string(), e))?;
    let view = ram
        .vm_memory_view()
        .map_err(|e| BootError::View(e.to_string()))?;
    let loaded = Elf::load(&view, None, &mut image, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;

    let (initrd_addr, initrd_size) = match initrd {
        Some(path) => {
            let data = std::fs::read(path)
                .map_err(|e| BootError::ReadInitrd(path.display().to_string(), e))?;
            let size = data.len() as u64;
            let top = ram_size;
            let addr = top.checked_sub(size).map(|a| a & !(PAGE as u64 - 1));
            match addr {
                Some(addr) if addr >= MAILBOX_GPA + MAILBOX_SIZE => {
                    ram.write(addr, &data)?;
                    (addr, size)
                }
                _ => {
                    return Err(BootError::InitrdTooLarge {
                        size,
                        ram: ram_size,
                    })
                }
            }
        }
        None => (0, 0),
    };

    let bytes = cmdline.as_bytes();
    if bytes.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(bytes.len()));
    }
    ram.write(CMDLINE_ADDR, bytes)?;
    ram.write(CMDLINE_ADDR + bytes.len() as u64, &[0])?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff; // "other" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.ramdisk_image = initrd_addr as u32;
    params.hdr.ramdisk_size = initrd_size as u32;
    let e820 = e820_map(ram_size);
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    ram.write(ZERO_PAGE_ADDR, pod_bytes(&params))?;

    write_page_tables(ram)?;
    write_gdt(ram)?;
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0,
        initrd_addr,
        initrd_size,
    })
}

const PAGE: usize = 4096;

fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data bindgen struct; viewing its bytes is sound.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Identity-maps the first 1 GiB with 2 MiB pages (enough for the kernel's
/// early boot, which builds its own tables).
fn write_page_tables(ram: &GuestRam) -> Result<(), BootError> {
    ram.write_u64(PML4_ADDR, PDPT_ADDR | 0x03)?;
    ram.write_u64(PDPT_ADDR, PD_ADDR | 0x03)?;
    for i in 0..512u64 {
        ram.write_u64(PD_ADDR + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 0 { 1 } else { 0 },
    }
}

fn write_gdt(ram: &GuestRam) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        ram.write_u64(GDT_ADDR + (i as u64) * 8, *e)?;
    }
    ram.write_u64(IDT_ADDR, 0)?;
    Ok(())
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Puts the vCPU at the kernel's 64-bit entry: long mode, flat segments,
/// boot_params in RSI, boot MSRs, sane FPU, LAPIC LINT0/LINT1 wired.
pub fn setup_boot_vcpu(vcpu: &Vcpu, entry: u64) -> Result<(), BootError> {
    let fd = vcpu.fd();
    let mut sregs = fd.get_sregs().map_err(BootError::GetSregs)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(BootError::SetSregs)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(BootError::SetRegs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(BootError::SetFpu)?;

    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(0x174, 0),             // IA32_SYSENTER_CS
        msr(0x175, 0),             // IA32_SYSENTER_ESP
        msr(0x176, 0),             // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),       // STAR
        msr(0xc000_0083, 0),       // CSTAR
        msr(0xc000_0102, 0),       // KERNEL_GS_BASE
        msr(0xc000_0084, 0),       // SYSCALL_MASK
        msr(0xc000_0082, 0),       // LSTAR
        msr(0x10, 0),              // TSC
        msr(0x1a0, 1),             // MISC_ENABLE: fast strings
        msr(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| BootError::SetMsrs(format!("{e:?}")))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(|e| BootError::SetMsrs(e.to_string()))?;
    if n != entries.len() {
        return Err(BootError::SetMsrs(format!(
            "stopped at MSR {:#x}",
            entries[n].index
        )));
    }

    // LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS would leave them.
    let mut lapic = fd.get_lapic().map_err(BootError::GetLapic)?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let b = &lapic.regs[off..off + 4];
        let mut v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        v = (v & !0x700) | (mode << 8);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *byte as _;
        }
    }
    fd.set_lapic(&lapic).map_err(BootError::SetLapic)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_long_mode_flat() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.l, cs.present, cs.selector, cs.limit),
            (1, 1, 8, 0xffff_ffff)
        );
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.db, ds.type_, ds.selector), (1, 3, 16));
        assert_eq!(segment_from_gdt(GDT[0], 0).unusable, 1);
    }
}
