//! A layer: the pages of a live sandbox that differ from its template, copied
//! once into a memfd. A checkpoint is a layer plus machine state; a
//! fork maps the layer's runs `MAP_PRIVATE` over the template the way the
//! template itself is mapped, so every child of one checkpoint shares the
//! layer's pages and pays only for what it writes itself (the design of
//! wasmtime's CoW images and Firecracker's diff snapshots, one level up).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::vmm::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// Undirtied pages between two dirty runs that are copied into the layer
/// anyway to make one run of them: a fork maps the layer run by run, and each
/// `mmap` costs the same whatever its length (KVM's MMU notifier of every VM
/// in the process is called per mapping change), so a few template pages
/// stored twice buy many fewer mappings. Their contents are the template's
/// (they were not written), so a merged run is still exact. Measured on PVM
/// (`kvmfork bench sessions`, 1 MiB session): gap 16 → 73 runs, 5.9 MB
/// layer, idle fork 1.1 ms; 64 → 27 runs, 0.6 ms; 256 → 10 runs, 18.8 MB,
/// 0.3 ms; 1024 → 6 runs, 27 MB, 0.23 ms (the capture grows with the layer).
pub const RUN_GAP_PAGES: u64 = 256;

/// The same for a delta layer (pages written since a base capture). Those
/// are scattered (a Python run writes a few hundred pages across the heap),
/// and every capture copies its whole delta again, so gaps cost more: at
/// ~1 µs a copied page against ~30 µs a mapping, a gap of 32 pages is the
/// break-even.
pub const DELTA_RUN_GAP_PAGES: u64 = 32;

/// A range of guest pages stored contiguously in the layer file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First guest page number of the run.
    pub guest_page: u64,
    /// Pages in the run.
    pub pages: u64,
    /// Page offset of the run in the layer file.
    pub file_page: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("writing {bytes} bytes into the layer file failed: {source}")]
    Write {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("reading the layer file failed: {0}")]
    Read(std::io::Error),
}

/// An immutable set of guest pages. Its file's size is sealed; its contents
/// are not (a dropped layer's file is recycled, see [`RECYCLED`]), so a
/// sandbox that maps a layer holds it (`Checkpoint`) until its mappings of it
/// are gone.
pub struct Layer {
    file: Option<File>,
    runs: Vec<Run>,
    pages: u64,
}

/// Files of dropped layers, kept for the next capture: writing into a memfd
/// whose pages exist costs about a third of allocating them (~2.5 µs a page
/// on the PVM hosts). Bounded in bytes and count.
static RECYCLED: Mutex<Vec<File>> = Mutex::new(Vec::new());
const RECYCLED_MAX_BYTES: u64 = 512 << 20;
const RECYCLED_MAX_FILES: usize = 16;

fn file_len(f: &File) -> u64 {
    f.metadata().map(|m| m.len()).unwrap_or(0)
}

/// A recycled file of at least `bytes` (and not wastefully larger), or a new one.
fn layer_file(bytes: usize) -> Result<File, LayerError> {
    let want = bytes as u64;
    {
        let mut files = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = files
            .iter()
            .position(|f| (want..=want * 2 + (2 << 20)).contains(&file_len(f)))
        {
            return Ok(files.swap_remove(i));
        }
    }
    let file = GuestRam::create_memfd("kvmfork-layer", bytes)?;
    GuestRam::seal_size(&file)?;
    Ok(file)
}

impl Drop for Layer {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else { return };
        let mut files = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
        let held: u64 = files.iter().map(file_len).sum();
        if files.len() < RECYCLED_MAX_FILES && held + file_len(&file) <= RECYCLED_MAX_BYTES {
            files.push(file);
        }
    }
}

impl Layer {
    /// Copies the pages set in `dirty` (a bitmap of guest page numbers) out
    /// of `ram` into a new sealed memfd, merging runs across gaps of up to
    /// `gap` pages. The vCPU must be stopped.
    pub fn capture(ram: &GuestRam, dirty: &[u64], gap: u64) -> Result<Layer, LayerError> {
        let npages = (ram.size() / PAGE_SIZE) as u64;
        let mut runs = Vec::new();
        let mut file_page = 0;
        for (guest_page, pages) in runs_of(dirty, gap, npages) {
            runs.push(Run {
                guest_page,
                pages,
                file_page,
            });
            file_page += pages;
        }
        let bytes = (file_page as usize) * PAGE_SIZE;
        // Nothing maps a recycled file any more (see `Layer`), and the runs
        // below overwrite every page of it that this layer's runs name.
        let layer = Layer {
            file: Some(layer_file(bytes.max(PAGE_SIZE))?),
            runs,
            pages: file_page,
        };
        for r in &layer.runs {
            let len = (r.pages as usize) * PAGE_SIZE;
            let src = ram.slice(r.guest_page * PAGE_SIZE as u64, len)?;
            layer
                .file()
                .write_all_at(src, r.file_page * PAGE_SIZE as u64)
                .map_err(|source| LayerError::Write { bytes: len, source })?;
        }
        Ok(layer)
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("a live layer has its file")
    }

    /// Bytes of guest memory the layer holds.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    /// Where guest page `page` is in the layer: its file page and how many
    /// pages of the same run follow from it (itself included).
    pub fn locate(&self, page: u64) -> Option<(u64, u64)> {
        let i = self
            .runs
            .partition_point(|r| r.guest_page + r.pages <= page);
        let r = self.runs.get(i)?;
        (r.guest_page <= page).then(|| {
            let into = page - r.guest_page;
            (r.file_page + into, r.pages - into)
        })
    }

    /// The first guest page after `page` where a run of the layer starts.
    pub fn next_run_after(&self, page: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.guest_page <= page);
        self.runs.get(i).map(|r| r.guest_page)
    }

    /// Copies `pages` pages from file page `file_page` on into guest RAM at
    /// guest page `guest_page` (one run's stretch, see [`Layer::locate`]).
    pub fn read_into(
        &self,
        file_page: u64,
        guest_page: u64,
        pages: u64,
        ram: &GuestRam,
    ) -> Result<(), LayerError> {
        let len = (pages as usize) * PAGE_SIZE;
        let dst = ram.slice_mut(guest_page * PAGE_SIZE as u64, len)?;
        self.file()
            .read_exact_at(dst, file_page * PAGE_SIZE as u64)
            .map_err(LayerError::Read)
    }

    /// Sets the bit of every guest page the layer holds in `bitmap`.
    pub fn mark_pages(&self, bitmap: &mut Vec<u64>) {
        for r in &self.runs {
            let last = r.guest_page + r.pages;
            if bitmap.len() < last.div_ceil(64) as usize {
                bitmap.resize(last.div_ceil(64) as usize, 0);
            }
            for p in r.guest_page..last {
                bitmap[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    /// Copies run `r` into `ram` (the fallback where mapping it is refused,
    /// e.g. at the host's `vm.max_map_count`).
    pub fn copy_run_into(&self, r: &Run, ram: &GuestRam) -> Result<(), LayerError> {
        let len = (r.pages as usize) * PAGE_SIZE;
        let dst = ram.slice_mut(r.guest_page * PAGE_SIZE as u64, len)?;
        self.file()
            .read_exact_at(dst, r.file_page * PAGE_SIZE as u64)
            .map_err(LayerError::Read)
    }
}

/// Runs `(first, count)` of set bits in `bitmap` below `limit`, merging runs
/// separated by at most `gap` clear bits.
pub fn runs_of(bitmap: &[u64], gap: u64, limit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (wi, &word) in bitmap.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let bit = (wi as u64) * 64 + u64::from(w.trailing_zeros());
            w &= w - 1;
            if bit >= limit {
                return out;
            }
            match out.last_mut() {
                Some((first, count)) if bit <= *first + *count + gap => *count = bit - *first + 1,
                _ => out.push((bit, 1)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_with_runs(runs: &[(u64, u64)]) -> Layer {
        let mut file_page = 0;
        let runs = runs
            .iter()
            .map(|&(guest_page, pages)| {
                let r = Run {
                    guest_page,
                    pages,
                    file_page,
                };
                file_page += pages;
                r
            })
            .collect();
        Layer {
            file: None,
            runs,
            pages: file_page,
        }
    }

    #[test]
    fn locate_finds_the_file_page_and_the_rest_of_its_run() {
        let l = layer_with_runs(&[(10, 5), (100, 2)]);
        assert_eq!(l.locate(9), None);
        assert_eq!(l.locate(10), Some((0, 5)));
        assert_eq!(l.locate(13), Some((3, 2)));
        assert_eq!(l.locate(15), None);
        assert_eq!(l.locate(101), Some((6, 1)));
        assert_eq!(l.locate(102), None);
        assert_eq!(l.next_run_after(0), Some(10));
        assert_eq!(l.next_run_after(10), Some(100));
        assert_eq!(l.next_run_after(100), None);
        let mut b = Vec::new();
        l.mark_pages(&mut b);
        assert_eq!(runs_of(&b, 0, 1 << 20), vec![(10, 5), (100, 2)]);
    }

    fn bitmap(bits: &[u64]) -> Vec<u64> {
        let mut b = vec![0u64; 16];
        for &x in bits {
            b[(x / 64) as usize] |= 1 << (x % 64);
        }
        b
    }

    #[test]
    fn runs_are_contiguous_ranges() {
        let b = bitmap(&[0, 1, 2, 10, 63, 64, 65, 200]);
        assert_eq!(
            runs_of(&b, 0, 256),
            vec![(0, 3), (10, 1), (63, 3), (200, 1)]
        );
    }

    #[test]
    fn small_gaps_merge() {
        let b = bitmap(&[0, 1, 5, 40, 41]);
        assert_eq!(runs_of(&b, 3, 256), vec![(0, 6), (40, 2)]);
        assert_eq!(runs_of(&b, 100, 256), vec![(0, 42)]);
    }

    #[test]
    fn bits_past_the_limit_are_ignored() {
        let b = bitmap(&[3, 100, 150]);
        assert_eq!(runs_of(&b, 0, 101), vec![(3, 1), (100, 1)]);
        assert_eq!(runs_of(&[], 0, 10), vec![]);
    }

    #[test]
    fn a_layer_holds_exactly_the_dirty_pages_and_maps_back() {
        let size = 4 << 20;
        let template = GuestRam::create_memfd("layer-test-template", size).unwrap();
        let src = GuestRam::map(&template, size, crate::vmm::memory::Sharing::Private).unwrap();
        src.write(0, &[1u8; 4096]).unwrap();
        src.write(7 * 4096, &[7u8; 4096]).unwrap();
        src.write(500 * 4096 + 3, b"xyz").unwrap();
        let dirty = bitmap(&[0, 7, 500]);
        let layer = Layer::capture(&src, &dirty, RUN_GAP_PAGES).unwrap();
        // 0..=7 merge over the gap; 500 stands alone.
        assert_eq!(layer.runs().len(), 2);
        assert_eq!(layer.bytes(), 9 * 4096);

        let child = GuestRam::map(&template, size, crate::vmm::memory::Sharing::Private).unwrap();
        for r in layer.runs() {
            child
                .map_over(r.guest_page, r.pages, layer.file(), r.file_page)
                .unwrap();
        }
        let mut page = [0u8; 4096];
        child.read(7 * 4096, &mut page).unwrap();
        assert_eq!(page, [7u8; 4096]);
        child.read(500 * 4096, &mut page).unwrap();
        assert_eq!(&page[..6], b"\0\0\0xyz");
        child.read(3 * 4096, &mut page).unwrap();
        assert_eq!(page, [0u8; 4096]);
        // A child's writes stay its own: neither the layer nor a sibling sees them.
        child.write(7 * 4096, &[9u8; 16]).unwrap();
        let sibling = GuestRam::map(&template, size, crate::vmm::memory::Sharing::Private).unwrap();
        layer.copy_run_into(&layer.runs()[0], &sibling).unwrap();
        sibling.read(7 * 4096, &mut page).unwrap();
        assert_eq!(page, [7u8; 4096]);
        // Mapping the template back over a run restores the template's pages.
        child.map_over(0, 8, &template, 0).unwrap();
        child.read(7 * 4096, &mut page).unwrap();
        assert_eq!(page, [0u8; 4096]);
    }

    #[test]
    fn a_recycled_file_holds_only_the_new_layers_pages() {
        let size = 4 << 20;
        let template = GuestRam::create_memfd("layer-test-template", size).unwrap();
        let ram = GuestRam::map(&template, size, crate::vmm::memory::Sharing::Private).unwrap();
        for p in 0..64u64 {
            ram.write(p * 4096, &[0xEE; 4096]).unwrap();
        }
        let all: Vec<u64> = (0..64).collect();
        drop(Layer::capture(&ram, &bitmap(&all), RUN_GAP_PAGES).unwrap());
        // A smaller layer may land in that file: its runs read its own pages.
        ram.write(3 * 4096, &[0x11; 4096]).unwrap();
        let small = Layer::capture(&ram, &bitmap(&[3]), RUN_GAP_PAGES).unwrap();
        let child = GuestRam::map(&template, size, crate::vmm::memory::Sharing::Private).unwrap();
        for r in small.runs() {
            child
                .map_over(r.guest_page, r.pages, small.file(), r.file_page)
                .unwrap();
        }
        let mut page = [0u8; 4096];
        child.read(3 * 4096, &mut page).unwrap();
        assert_eq!(page, [0x11; 4096]);
        child.read(4 * 4096, &mut page).unwrap();
        assert_eq!(
            page, [0u8; 4096],
            "pages outside the layer are the template's"
        );
    }
}
