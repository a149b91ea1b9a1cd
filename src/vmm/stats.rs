//! KVM's binary statistics (KVM_GET_STATS_FD) for one vCPU: a file whose data
//! block is re-read with one pread, no vCPU ioctl. The fork engine uses the
//! counters to tell whether an exec ever left guest user mode.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("KVM_GET_STATS_FD failed: {0}")]
    GetStatsFd(std::io::Error),
    #[error("reading KVM stats: {0}")]
    Read(std::io::Error),
    #[error("malformed KVM stats header")]
    Malformed,
}

/// Named u64 counters of one vCPU.
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    /// (name, byte offset of the value inside the data block)
    counters: Vec<(String, u64)>,
    data_len: usize,
}

impl VcpuStats {
    pub fn open(vcpu: &kvm_ioctls::VcpuFd) -> Result<VcpuStats, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(StatsError::GetStatsFd(std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let word =
            |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap()) as u64;
        let (name_size, num_desc, desc_offset, data_offset) = (word(1), word(2), word(4), word(5));
        if num_desc > 4096 || name_size > 4096 {
            return Err(StatsError::Malformed);
        }
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; (desc_size * num_desc) as usize];
        file.read_exact_at(&mut descs, desc_offset)
            .map_err(StatsError::Read)?;
        let mut counters = Vec::new();
        let mut data_len = 0usize;
        for d in descs.chunks_exact(desc_size as usize) {
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u32::from_le_bytes(d[8..12].try_into().unwrap()) as u64;
            let name_bytes = &d[16..];
            let end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            data_len = data_len.max(offset as usize + size * 8);
            if size == 1 {
                counters.push((name, offset));
            }
        }
        Ok(VcpuStats {
            file,
            data_offset,
            counters,
            data_len,
        })
    }

    /// Reads every counter once (one pread).
    pub fn sample(&self) -> Result<StatsSample, StatsError> {
        let mut data = vec![0u8; self.data_len];
        self.file
            .read_exact_at(&mut data, self.data_offset)
            .map_err(StatsError::Read)?;
        Ok(StatsSample { data })
    }

    /// The value of `name` in `sample` (None if this KVM has no such counter).
    pub fn get(&self, sample: &StatsSample, name: &str) -> Option<u64> {
        let &(_, off) = self.counters.iter().find(|(n, _)| n == name)?;
        let off = off as usize;
        Some(u64::from_le_bytes(
            sample.data[off..off + 8].try_into().unwrap(),
        ))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.counters.iter().map(|(n, _)| n.as_str())
    }
}

/// One read of the data block.
pub struct StatsSample {
    data: Vec<u8>,
}
