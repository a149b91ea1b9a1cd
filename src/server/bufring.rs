//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): buffers the kernel
//! picks from for multishot receives. Each buffer is handed back right after
//! its data is copied out.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

pub struct BufRing {
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    tail: u16,
    buf_size: usize,
    bufs: Box<[u8]>,
    group: u16,
}

// SAFETY: BufRing exclusively owns its mapping and buffers; moving it to the
// shard thread that uses it moves that ownership.
unsafe impl Send for BufRing {}

impl BufRing {
    /// `entries` must be a power of two (kernel requirement).
    pub fn new(entries: u16, buf_size: usize, group: u16) -> io::Result<Self> {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping with no address hint; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = NonNull::new(ptr.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(BufRing {
            ring,
            ring_bytes,
            entries,
            tail: 0,
            buf_size,
            bufs: vec![0u8; usize::from(entries) * buf_size].into_boxed_slice(),
            group,
        })
    }

    /// Registers the ring with `uring` and provides every buffer.
    pub fn register(&mut self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: the mapping lives as long as self, and the shard loop drops
        // the IoUring (unregistering) before this BufRing.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.entries,
                self.group,
                0,
            )?;
        }
        for bid in 0..self.entries {
            self.push(bid);
        }
        self.publish();
        Ok(())
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// The first `len` bytes the kernel wrote into buffer `bid`.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.bufs[start..start + len.min(self.buf_size)]
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        let addr = self.bufs[usize::from(bid) * self.buf_size..].as_ptr() as u64;
        // SAFETY: index < entries, inside the mapping; only addr/len/bid are
        // written, never the tail field that entry 0 shares.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lies in entry 0 of our live mapping; the
        // kernel reads it concurrently, hence the atomic release store that
        // orders the entry writes before it.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes) };
    }
}
