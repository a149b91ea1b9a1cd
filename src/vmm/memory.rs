//! Guest RAM: one host mapping per VM, 2 MiB aligned, backed by a memfd or a
//! snapshot file.
//!
//! The template VM maps its memfd `MAP_SHARED` (its writes *are* the template);
//! forks map the template `MAP_PRIVATE | MAP_NORESERVE`, so their writes are
//! copy-on-write and never reach the file or another fork. vm-memory's
//! `MmapRegion::from_file` would map shared, so regions are built here from our
//! own raw mapping and handed to vm-memory only as a view (for linux-loader).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub const PAGE_SIZE: usize = 4096;
const HUGE_PAGE_SIZE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    MemfdCreate(std::io::Error),
    #[error("sizing guest memory file to {1} bytes failed: {0}")]
    Truncate(std::io::Error, u64),
    #[error("reserving {1} bytes of address space failed: {0}")]
    Reserve(std::io::Error, usize),
    #[error("mapping guest memory ({1} bytes) failed: {0}")]
    Map(std::io::Error, usize),
    #[error("memory file is {file} bytes, smaller than guest RAM ({ram} bytes): refusing (would SIGBUS)")]
    FileTooSmall { file: u64, ram: u64 },
    #[error("building the vm-memory view failed: {0}")]
    View(String),
    #[error("guest range {addr:#x}+{len:#x} is outside guest RAM ({size:#x} bytes)")]
    OutOfRange { addr: u64, len: usize, size: usize },
    #[error("sealing memfd failed: {0}")]
    Seal(std::io::Error),
}

/// How a guest RAM mapping relates to its backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Writes go to the file (template boot).
    Shared,
    /// Writes are copy-on-write and private to this mapping (forks).
    Private,
    /// Read-only view of a sealed template (the source of copy-back resets).
    ReadOnly,
}

/// A 2 MiB-aligned host mapping of guest RAM starting at guest address 0.
pub struct GuestRam {
    base: NonNull<u8>,
    size: usize,
    sharing: Sharing,
}

// SAFETY: the mapping is plain memory owned by this struct; concurrent access
// is coordinated by its owner (one vCPU thread at a time).
unsafe impl Send for GuestRam {}
// SAFETY: see above; shared references only hand out raw pointers / copies.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Creates an anonymous memfd of `size` bytes for a template VM.
    pub fn create_memfd(name: &str, size: usize) -> Result<File, MemoryError> {
        let cname = std::ffi::CString::new(name).expect("memfd name has no NUL");
        // SAFETY: valid NUL-terminated name; flags are constants.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(MemoryError::MemfdCreate(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|e| MemoryError::Truncate(e, size as u64))?;
        Ok(file)
    }

    /// Seals a template memfd against any further change of size or content.
    pub fn seal(file: &File) -> Result<(), MemoryError> {
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a valid fd with constant arguments.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if r < 0 {
            return Err(MemoryError::Seal(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Seals a memfd's size (not its contents): mappings of it can never
    /// SIGBUS by the file shrinking.
    pub fn seal_size(file: &File) -> Result<(), MemoryError> {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a valid fd with constant arguments.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if r < 0 {
            return Err(MemoryError::Seal(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Maps `size` bytes of `file` at a 2 MiB-aligned host address.
    pub fn map(file: &File, size: usize, sharing: Sharing) -> Result<GuestRam, MemoryError> {
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file_len < size as u64 {
            return Err(MemoryError::FileTooSmall {
                file: file_len,
                ram: size as u64,
            });
        }
        let reserve = size + HUGE_PAGE_SIZE;
        // SAFETY: anonymous PROT_NONE reservation; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(MemoryError::Reserve(
                std::io::Error::last_os_error(),
                reserve,
            ));
        }
        let start = raw as usize;
        let aligned = (start + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1);
        let flags = match sharing {
            Sharing::Shared | Sharing::ReadOnly => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        } | libc::MAP_FIXED;
        let prot = match sharing {
            Sharing::ReadOnly => libc::PROT_READ,
            _ => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: MAP_FIXED over a range inside our own reservation.
        let mapped = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                size,
                prot,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            // SAFETY: unmapping our own reservation.
            unsafe { libc::munmap(raw, reserve) };
            return Err(MemoryError::Map(err, size));
        }
        // Give back the unaligned head and tail of the reservation.
        let head = aligned - start;
        let tail = reserve - head - size;
        // SAFETY: both ranges belong to our reservation and are outside the guest mapping.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail);
            }
        }
        // Transparent hugepages where the host allows it (a hint, so failure is
        // fine) — for the template's own RAM only: a fork's copy-on-write of a
        // 4 KiB guest write must not turn into a 2 MiB copy.
        if sharing != Sharing::Private || crate::settings::var_os("THP_FORKS").is_some() {
            // SAFETY: advising our own mapping.
            unsafe { libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
        }
        Ok(GuestRam {
            base: NonNull::new(aligned as *mut u8).expect("mmap never returns null on success"),
            size,
            sharing,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    pub fn host_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Copies whole pages `pages` from `source` (same size) into this mapping:
    /// the copy-back reset of a pooled sandbox. Keeps every mapping in place,
    /// so the guest's next touch of those pages costs no new fault.
    pub fn copy_pages_from(&self, source: &GuestRam, pages: impl Iterator<Item = u64>) -> usize {
        assert_eq!(self.size, source.size);
        let npages = (self.size / PAGE_SIZE) as u64;
        let mut n = 0;
        for p in pages {
            if p >= npages {
                continue;
            }
            let off = (p as usize) * PAGE_SIZE;
            // SAFETY: `p` is a page index inside both mappings of equal size.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    source.as_ptr().add(off),
                    self.as_ptr().add(off),
                    PAGE_SIZE,
                )
            };
            n += 1;
        }
        n
    }

    fn check(&self, addr: u64, len: usize) -> Result<usize, MemoryError> {
        let end = addr.checked_add(len as u64);
        match end {
            Some(end) if end <= self.size as u64 => Ok(addr as usize),
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Guest RAM at `addr` as a byte slice (bounds-checked). The caller must
    /// not let the vCPU run while the slice is alive (guest writes would race).
    pub fn slice(&self, addr: u64, len: usize) -> Result<&[u8], MemoryError> {
        let off = self.check(addr, len)?;
        // SAFETY: range checked against the mapping, which lives as long as
        // `self`; the vCPU is stopped (caller's contract).
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) })
    }

    /// Like [`GuestRam::slice`], writable (not on a read-only view).
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, addr: u64, len: usize) -> Result<&mut [u8], MemoryError> {
        assert!(
            self.sharing != Sharing::ReadOnly,
            "write to a read-only template view"
        );
        let off = self.check(addr, len)?;
        // SAFETY: as `slice`; the host is this mapping's only writer while
        // the vCPU is stopped, and callers hold no other slice of the range.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) })
    }

    /// Replaces guest pages `first_page..first_page + pages` of this private
    /// mapping with a private (copy-on-write) mapping of `file` from page
    /// `file_page` on. Pages written there before are dropped. KVM follows
    /// through its MMU notifier; a shadow MMU still needs its guest page
    /// table copies dropped by the caller.
    pub fn map_over(
        &self,
        first_page: u64,
        pages: u64,
        file: &File,
        file_page: u64,
    ) -> Result<(), MemoryError> {
        assert_eq!(
            self.sharing,
            Sharing::Private,
            "map_over needs a private mapping"
        );
        let len = (pages as usize) * PAGE_SIZE;
        let off = self.check(first_page * PAGE_SIZE as u64, len)?;
        // SAFETY: MAP_FIXED over a range inside this mapping (checked above),
        // which only this struct owns; no Rust reference into the range lives
        // across this call (the vCPU is stopped and slices are short-lived).
        let mapped = unsafe {
            libc::mmap(
                self.as_ptr().add(off) as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                file.as_raw_fd(),
                (file_page as usize * PAGE_SIZE) as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(MemoryError::Map(std::io::Error::last_os_error(), len));
        }
        Ok(())
    }

    /// Copies `data` into guest RAM at `addr` (bounds-checked).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        assert!(
            self.sharing != Sharing::ReadOnly,
            "write to a read-only template view"
        );
        let off = self.check(addr, data.len())?;
        // SAFETY: range checked against the mapping size above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// Copies guest RAM at `addr` into `buf` (bounds-checked).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, buf.len())?;
        // SAFETY: range checked against the mapping size above.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A vm-memory view of this mapping (used by linux-loader). The view does
    /// not own the mapping and must not outlive `self`.
    pub fn vm_memory_view(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = match self.sharing {
            Sharing::Shared | Sharing::ReadOnly => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        };
        // SAFETY: the pointer and size describe our live mapping; the region is
        // not owned (build_raw never unmaps), and callers keep `self` alive.
        let region = unsafe { MmapRegion::build_raw(self.as_ptr(), self.size, prot, flags) }
            .map_err(|e| MemoryError::View(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::View("region overflows".into()))?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::View(e.to_string()))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_mapping_is_copy_on_write_and_aligned() {
        let file = GuestRam::create_memfd("t", 4 << 20).unwrap();
        let shared = GuestRam::map(&file, 4 << 20, Sharing::Shared).unwrap();
        assert_eq!(shared.host_addr() % HUGE_PAGE_SIZE as u64, 0);
        shared.write_u64(0x1000, 0xdead_beef).unwrap();
        let private = GuestRam::map(&file, 4 << 20, Sharing::Private).unwrap();
        assert_eq!(private.read_u64(0x1000).unwrap(), 0xdead_beef);
        private.write_u64(0x1000, 7).unwrap();
        assert_eq!(
            shared.read_u64(0x1000).unwrap(),
            0xdead_beef,
            "fork write leaked into template"
        );
        assert_eq!(private.read_u64(0x1000).unwrap(), 7);
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let file = GuestRam::create_memfd("t", 1 << 20).unwrap();
        let ram = GuestRam::map(&file, 1 << 20, Sharing::Private).unwrap();
        assert!(ram.write(0xff_fff0, &[0u8; 32]).is_err());
        assert!(ram.read(u64::MAX - 2, &mut [0u8; 8]).is_err());
    }

    #[test]
    fn short_file_is_refused() {
        let file = GuestRam::create_memfd("t", 1 << 20).unwrap();
        assert!(matches!(
            GuestRam::map(&file, 2 << 20, Sharing::Private),
            Err(MemoryError::FileTooSmall { .. })
        ));
    }
}
