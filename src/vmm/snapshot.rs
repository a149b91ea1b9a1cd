//! The template snapshot on disk.
//!
//! `state.snap`: magic, format version, a list of tagged sections (raw KVM
//! structs whose sizes must match this build exactly, plus JSON metadata) and a
//! CRC32 trailer over everything before it. `memory.bin`: guest RAM as a sparse
//! file — all-zero pages are holes — with its own checksum in the metadata.
//! Loading refuses a truncated, corrupted or incompatible snapshot with an
//! error naming what is wrong.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::memory::{GuestRam, PAGE_SIZE};
use super::vcpu::VcpuState;
use super::vm::VmState;

pub const MAGIC: &[u8; 8] = b"KVMFKSNP";
pub const FORMAT_VERSION: u32 = 1;
/// Refuse absurd inputs before allocating for them.
const MAX_STATE_FILE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a kvmfork snapshot (bad magic)")]
    BadMagic(String),
    #[error("{path} has snapshot format version {found}; this kvmfork reads version {FORMAT_VERSION}: rebuild the template")]
    Version { path: String, found: u32 },
    #[error("{0} is truncated ({1})")]
    Truncated(String, &'static str),
    #[error("{path} is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("snapshot is incompatible with this host or build: {0}")]
    Incompatible(String),
    #[error("snapshot metadata: {0}")]
    Meta(String),
    #[error("snapshot memory: {0}")]
    Memory(#[from] super::memory::MemoryError),
}

/// What `kvmfork template inspect` prints, stored in the `META` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub language: String,
    pub kvmfork_version: String,
    pub host_kind: super::cpuid::HostKind,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub ram_size: u64,
    pub cmdline: String,
    pub kernel: ArtifactInfo,
    pub rootfs: ArtifactInfo,
    pub packages: Vec<String>,
    pub boot_to_ready_seconds: f64,
    pub built_at_unix: u64,
    pub snapshot_rip: u64,
    pub snapshot_cpl: u8,
    pub memory: MemoryInfo,
    pub xsave_size: usize,
    /// The template VM ran with KVM's virtual PMU off (hardware hosts); its
    /// forks must too, or their MSR state would not match. Absent in
    /// templates made before the switch existed: off.
    #[serde(default)]
    pub pmu_disabled: bool,
    /// The template VM booted behind the default-deny MSR filter; its forks
    /// get it too (a guest kernel that booted without it may use MSRs the
    /// filter denies).
    #[serde(default)]
    pub msr_filtered: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArtifactInfo {
    pub path: String,
    pub cache_key: String,
    pub size: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub file: String,
    pub apparent_size: u64,
    pub allocated_size: u64,
    pub nonzero_pages: u64,
    pub crc32: u32,
}

/// Everything needed to resume the template's vCPU and devices.
pub struct MachineState {
    pub vcpu: VcpuState,
    pub vm: VmState,
    pub serial: SerialState,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Meta = 1,
    Regs,
    Sregs,
    Xsave,
    Xcrs,
    DebugRegs,
    Lapic,
    MpState,
    Events,
    Cpuid,
    Msrs,
    PicMaster,
    PicSlave,
    Ioapic,
    Pit,
    Clock,
    Serial,
}

fn pod_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data KVM struct; viewing its bytes is sound.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn pod_slice_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: as above, for a slice of POD structs.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn pod_from<T>(name: &str, bytes: &[u8]) -> Result<T, SnapshotError> {
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(SnapshotError::Incompatible(format!(
            "section {name} has {} bytes, this build expects {}",
            bytes.len(),
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the length matches exactly and KVM structs accept any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

fn pod_vec_from<T: Copy>(name: &str, bytes: &[u8]) -> Result<Vec<T>, SnapshotError> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(SnapshotError::Incompatible(format!(
            "section {name} is not a whole number of entries"
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        // SAFETY: each chunk is exactly one T; KVM structs accept any bit pattern.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const T) })
        .collect())
}

fn serial_bytes(s: &SerialState) -> Vec<u8> {
    let mut v = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    v.extend_from_slice(&s.in_buffer);
    v
}

fn serial_from(bytes: &[u8]) -> Result<SerialState, SnapshotError> {
    if bytes.len() < 9 {
        return Err(SnapshotError::Incompatible(
            "serial section too short".into(),
        ));
    }
    Ok(SerialState {
        baud_divisor_low: bytes[0],
        baud_divisor_high: bytes[1],
        interrupt_enable: bytes[2],
        interrupt_identification: bytes[3],
        line_control: bytes[4],
        line_status: bytes[5],
        modem_control: bytes[6],
        modem_status: bytes[7],
        scratch: bytes[8],
        in_buffer: bytes[9..].to_vec(),
    })
}

/// Serialises metadata and machine state into the `state.snap` byte format.
pub fn encode_state(meta: &TemplateMeta, m: &MachineState) -> Vec<u8> {
    let meta_json = serde_json::to_vec(meta).expect("metadata serialises");
    let serial = serial_bytes(&m.serial);
    let mut sections: Vec<(Tag, &[u8])> = vec![
        (Tag::Meta, &meta_json),
        (Tag::Regs, pod_bytes(&m.vcpu.regs)),
        (Tag::Sregs, pod_bytes(&m.vcpu.sregs)),
        (Tag::Xsave, pod_bytes(&m.vcpu.xsave)),
        (Tag::DebugRegs, pod_bytes(&m.vcpu.debugregs)),
        (Tag::Lapic, pod_bytes(&m.vcpu.lapic)),
        (Tag::MpState, pod_bytes(&m.vcpu.mp_state)),
        (Tag::Events, pod_bytes(&m.vcpu.events)),
        (Tag::Cpuid, pod_slice_bytes(&m.vcpu.cpuid)),
        (Tag::Msrs, pod_slice_bytes(&m.vcpu.msrs)),
        (Tag::PicMaster, pod_bytes(&m.vm.pic_master)),
        (Tag::PicSlave, pod_bytes(&m.vm.pic_slave)),
        (Tag::Ioapic, pod_bytes(&m.vm.ioapic)),
        (Tag::Pit, pod_bytes(&m.vm.pit)),
        (Tag::Clock, pod_bytes(&m.vm.clock)),
        (Tag::Serial, &serial),
    ];
    if let Some(x) = &m.vcpu.xcrs {
        sections.push((Tag::Xcrs, pod_bytes(x)));
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (tag, bytes) in sections {
        out.extend_from_slice(&(tag as u32).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and validates `state.snap` bytes. `path` names the file in errors.
pub fn decode_state(
    path: &str,
    data: &[u8],
) -> Result<(TemplateMeta, MachineState), SnapshotError> {
    if data.len() < 8 || &data[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.into()));
    }
    if data.len() < 20 {
        return Err(SnapshotError::Truncated(path.into(), "header"));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.into(),
            found: version,
        });
    }
    let (body, trailer) = data.split_at(data.len() - 4);
    let expected = u32::from_le_bytes(trailer.try_into().unwrap());
    let found = crc32fast::hash(body);
    if found != expected {
        return Err(SnapshotError::Checksum {
            path: path.into(),
            found,
            expected,
        });
    }
    let count = u32::from_le_bytes(body[12..16].try_into().unwrap());
    let mut pos = 16usize;
    let mut sections: Vec<(u32, &[u8])> = Vec::new();
    for _ in 0..count {
        if pos + 8 > body.len() {
            return Err(SnapshotError::Truncated(path.into(), "section header"));
        }
        let tag = u32::from_le_bytes(body[pos..pos + 4].try_into().unwrap());
        let len = u32::from_le_bytes(body[pos + 4..pos + 8].try_into().unwrap()) as usize;
        pos += 8;
        if pos + len > body.len() {
            return Err(SnapshotError::Truncated(path.into(), "section body"));
        }
        sections.push((tag, &body[pos..pos + len]));
        pos += len;
    }
    let get = |tag: Tag| -> Result<&[u8], SnapshotError> {
        sections
            .iter()
            .find(|(t, _)| *t == tag as u32)
            .map(|(_, b)| *b)
            .ok_or_else(|| SnapshotError::Incompatible(format!("section {tag:?} is missing")))
    };
    let meta: TemplateMeta =
        serde_json::from_slice(get(Tag::Meta)?).map_err(|e| SnapshotError::Meta(e.to_string()))?;
    let xcrs = match get(Tag::Xcrs) {
        Ok(b) => Some(pod_from::<kvm_xcrs>("xcrs", b)?),
        Err(_) => None,
    };
    let vcpu = VcpuState {
        cpuid: pod_vec_from::<kvm_cpuid_entry2>("cpuid", get(Tag::Cpuid)?)?,
        mp_state: pod_from::<kvm_mp_state>("mp_state", get(Tag::MpState)?)?,
        regs: pod_from::<kvm_regs>("regs", get(Tag::Regs)?)?,
        sregs: pod_from::<kvm_sregs>("sregs", get(Tag::Sregs)?)?,
        xsave: pod_from::<kvm_xsave>("xsave", get(Tag::Xsave)?)?,
        xcrs,
        debugregs: pod_from::<kvm_debugregs>("debugregs", get(Tag::DebugRegs)?)?,
        lapic: pod_from::<kvm_lapic_state>("lapic", get(Tag::Lapic)?)?,
        msrs: pod_vec_from::<kvm_msr_entry>("msrs", get(Tag::Msrs)?)?,
        events: pod_from::<kvm_vcpu_events>("vcpu_events", get(Tag::Events)?)?,
    };
    let vm = VmState {
        pic_master: pod_from::<kvm_irqchip>("pic_master", get(Tag::PicMaster)?)?,
        pic_slave: pod_from::<kvm_irqchip>("pic_slave", get(Tag::PicSlave)?)?,
        ioapic: pod_from::<kvm_irqchip>("ioapic", get(Tag::Ioapic)?)?,
        pit: pod_from::<kvm_pit_state2>("pit", get(Tag::Pit)?)?,
        clock: pod_from::<kvm_clock_data>("clock", get(Tag::Clock)?)?,
    };
    let serial = serial_from(get(Tag::Serial)?)?;
    Ok((meta, MachineState { vcpu, vm, serial }))
}

pub fn write_state(
    path: &Path,
    meta: &TemplateMeta,
    m: &MachineState,
) -> Result<(), SnapshotError> {
    let bytes = encode_state(meta, m);
    let tmp = path.with_extension("tmp");
    let io = |e| SnapshotError::Io(tmp.display().to_string(), e);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| SnapshotError::Io(path.display().to_string(), e))
}

pub fn read_state(path: &Path) -> Result<(TemplateMeta, MachineState), SnapshotError> {
    let name = path.display().to_string();
    let io = |e| SnapshotError::Io(name.clone(), e);
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > MAX_STATE_FILE {
        return Err(SnapshotError::Incompatible(format!(
            "{name} is {len} bytes; too large for a state file"
        )));
    }
    let mut data = Vec::with_capacity(len as usize);
    f.read_to_end(&mut data).map_err(io)?;
    decode_state(&name, &data)
}

fn is_zero(page: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: reinterpreting bytes as u64 words; align_to handles alignment.
        unsafe { page.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

/// Writes guest RAM as a sparse file: all-zero pages become holes. Returns
/// the memory info (checksum over the non-zero pages in address order).
pub fn write_memory(path: &Path, ram: &GuestRam) -> Result<MemoryInfo, SnapshotError> {
    let name = path.display().to_string();
    let io = |e| SnapshotError::Io(name.clone(), e);
    let f = File::create(path).map_err(io)?;
    f.set_len(ram.size() as u64).map_err(io)?;
    let mut crc = crc32fast::Hasher::new();
    let mut nonzero = 0u64;
    // SAFETY: the slice covers exactly the live guest mapping, read-only here
    // while the template vCPU is stopped.
    let mem = unsafe { std::slice::from_raw_parts(ram.as_ptr(), ram.size()) };
    for (i, page) in mem.chunks(PAGE_SIZE).enumerate() {
        if is_zero(page) {
            continue;
        }
        nonzero += 1;
        crc.update(&(i as u64).to_le_bytes());
        crc.update(page);
        f.write_all_at(page, (i * PAGE_SIZE) as u64).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    let allocated = allocated_bytes(path);
    Ok(MemoryInfo {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        apparent_size: ram.size() as u64,
        allocated_size: allocated,
        nonzero_pages: nonzero,
        crc32: crc.finalize(),
    })
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Loads `memory.bin` into a fresh sealed memfd (forks map it privately),
/// verifying size and checksum on the way.
pub fn load_memory(path: &Path, info: &MemoryInfo) -> Result<File, SnapshotError> {
    let name = path.display().to_string();
    let io = |e| SnapshotError::Io(name.clone(), e);
    let f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len != info.apparent_size {
        return Err(SnapshotError::Truncated(
            name,
            "memory file size differs from the metadata",
        ));
    }
    let memfd = GuestRam::create_memfd("kvmfork-template", len as usize)?;
    let mut crc = crc32fast::Hasher::new();
    let mut nonzero = 0u64;
    let mut buf = vec![0u8; 2 << 20];
    let mut offset = 0u64;
    while offset < len {
        // Skip holes quickly: jump to the next data region.
        // SAFETY: lseek on a valid fd.
        let data = unsafe {
            libc::lseek(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                offset as i64,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            break; // no more data: the rest is a hole
        }
        offset = (data as u64) & !(PAGE_SIZE as u64 - 1);
        let n = ((len - offset) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], offset).map_err(io)?;
        for (i, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
            if is_zero(page) {
                continue;
            }
            let page_index = offset / PAGE_SIZE as u64 + i as u64;
            nonzero += 1;
            crc.update(&page_index.to_le_bytes());
            crc.update(page);
            memfd
                .write_all_at(page, page_index * PAGE_SIZE as u64)
                .map_err(|e| SnapshotError::Io("template memfd".into(), e))?;
        }
        offset += n as u64;
    }
    let found = crc.finalize();
    if found != info.crc32 || nonzero != info.nonzero_pages {
        return Err(SnapshotError::Checksum {
            path: name,
            found,
            expected: info.crc32,
        });
    }
    Ok(memfd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::cpuid::HostKind;

    fn sample() -> (TemplateMeta, MachineState) {
        let regs = kvm_regs {
            rip: 0x4242,
            ..Default::default()
        };
        let vcpu = VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            regs,
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: None,
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
        };
        let vm = VmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        };
        let none = ArtifactInfo {
            path: String::new(),
            cache_key: String::new(),
            size: 0,
        };
        let meta = TemplateMeta {
            language: "python".into(),
            kvmfork_version: "0".into(),
            host_kind: HostKind::Pvm,
            cpu_vendor: "v".into(),
            cpu_model: "m".into(),
            ram_size: 1 << 20,
            cmdline: String::new(),
            kernel: none.clone(),
            rootfs: none,
            packages: vec![],
            boot_to_ready_seconds: 1.0,
            built_at_unix: 0,
            snapshot_rip: 0x4242,
            snapshot_cpl: 3,
            memory: MemoryInfo::default(),
            xsave_size: 0,
            pmu_disabled: false,
            msr_filtered: false,
        };
        (
            meta,
            MachineState {
                vcpu,
                vm,
                serial: SerialState::default(),
            },
        )
    }

    fn reseal(bytes: &mut [u8]) {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn state_roundtrips() {
        let (meta, m) = sample();
        let bytes = encode_state(&meta, &m);
        let (meta2, m2) = decode_state("s", &bytes).unwrap();
        assert_eq!(meta2.snapshot_rip, 0x4242);
        assert_eq!(m2.vcpu.regs.rip, 0x4242);
        assert_eq!(m2.vcpu.msrs[0].data, 99);
        assert_eq!(m2.vcpu.cpuid[0].eax, 7);
        assert!(m2.vcpu.xcrs.is_none());
    }

    #[test]
    fn corrupt_truncated_and_foreign_snapshots_are_refused() {
        let (meta, m) = sample();
        let good = encode_state(&meta, &m);
        let mut flipped = good.clone();
        flipped[100] ^= 0xff;
        assert!(matches!(
            decode_state("s", &flipped),
            Err(SnapshotError::Checksum { .. })
        ));
        for cut in [0, 7, 15, 19, good.len() / 2, good.len() - 1] {
            assert!(
                decode_state("s", &good[..cut]).is_err(),
                "truncated at {cut} was accepted"
            );
        }
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_state("s", &magic),
            Err(SnapshotError::BadMagic(_))
        ));
        let mut version = good.clone();
        version[8..12].copy_from_slice(&99u32.to_le_bytes());
        reseal(&mut version);
        assert!(matches!(
            decode_state("s", &version),
            Err(SnapshotError::Version { found: 99, .. })
        ));
        // A section of the wrong size (as from another KVM header version).
        let mut wrong = good.clone();
        let meta_len = u32::from_le_bytes(wrong[20..24].try_into().unwrap()) as usize;
        let regs_len_at = 24 + meta_len + 4;
        let regs_len = u32::from_le_bytes(wrong[regs_len_at..regs_len_at + 4].try_into().unwrap());
        assert_eq!(regs_len as usize, std::mem::size_of::<kvm_regs>());
        wrong.remove(regs_len_at + 4);
        wrong[regs_len_at..regs_len_at + 4].copy_from_slice(&(regs_len - 1).to_le_bytes());
        reseal(&mut wrong);
        let err = decode_state("s", &wrong)
            .err()
            .expect("wrong section size accepted");
        assert!(matches!(err, SnapshotError::Incompatible(_)), "{err}");
    }
}
