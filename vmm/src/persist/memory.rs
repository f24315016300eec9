//! Guest RAM in a snapshot: written sparsely (a zero page is a hole in the file), restored by
//! mapping the file `MAP_PRIVATE`, so a restore reads only the pages the guest touches and
//! its writes never reach the file.
//!
//! The checksum covers the data pages only, as (page index, page bytes) in order, so that
//! checking it reads exactly what was written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::file::PAGE;

/// Pages gathered into one write, to keep the number of syscalls low.
const RUN_PAGES: usize = 256;

/// A run of data pages: guest physical start and length in bytes, both page multiples.
pub type Extent = (u64, u64);

/// Every non-zero page of guest RAM, as (page number, CRC32 of its bytes), by page number.
/// A snapshot keeps it, so a run on a copy-on-write mapping of the snapshot can hash its final
/// state by reading only the pages it wrote.
pub type PageCrcs = Vec<(u64, u32)>;

/// What [`write_sparse`] wrote.
pub struct SparseImage {
    /// Bytes of guest RAM the section covers, holes included.
    pub len: u64,
    pub crc32: u32,
    /// Where the data pages are; everything else reads as zero. Kept in the snapshot so that
    /// reading it back never depends on the filesystem reporting holes (9p does not).
    pub extents: Vec<Extent>,
    pub pages: PageCrcs,
}

/// Writes every non-zero page of `mem` at `offset + guest address`; holes stay holes.
pub fn write_sparse(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
) -> std::io::Result<SparseImage> {
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0;
    let mut extents: Vec<Extent> = Vec::new();
    let mut pages = PageCrcs::new();
    for region in mem.iter() {
        let base = region.start_addr().0;
        let len = region.len() as usize;
        // SAFETY: the region maps `len` bytes for as long as `mem` lives; the vCPU is not
        // running (snapshots are taken between exits), so nothing writes them meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut run_start: Option<usize> = None;
        let mut flush = |from: usize, to: usize| -> std::io::Result<()> {
            let start = base + from as u64;
            match extents.last_mut() {
                Some((s, l)) if *s + *l == start => *l += (to - from) as u64,
                _ => extents.push((start, (to - from) as u64)),
            }
            file.write_all_at(&bytes[from..to], offset + start)
        };
        for (index, page) in bytes.chunks(PAGE as usize).enumerate() {
            let at = index * PAGE as usize;
            if page.iter().all(|&b| b == 0) {
                if let Some(start) = run_start.take() {
                    flush(start, at)?;
                }
                continue;
            }
            let number = base / PAGE + index as u64;
            hasher.update(&number.to_le_bytes());
            hasher.update(page);
            pages.push((number, crc32fast::hash(page)));
            match run_start {
                Some(start) if (at - start) / PAGE as usize >= RUN_PAGES => {
                    flush(start, at)?;
                    run_start = Some(at);
                }
                Some(_) => {}
                None => run_start = Some(at),
            }
        }
        if let Some(start) = run_start {
            flush(start, len)?;
        }
        total = total.max(base + len as u64);
    }
    // The file must be long enough to map the whole RAM, holes included.
    file.set_len(offset + total)?;
    Ok(SparseImage {
        len: total,
        crc32: hasher.finalize(),
        extents,
        pages,
    })
}

/// Checks that `extents` lie inside `len` bytes and are ordered, page aligned, disjoint:
/// they come from a file, so they are checked before anything is read by them.
pub fn check_extents(extents: &[Extent], len: u64) -> Result<(), String> {
    let mut end = 0;
    for &(start, size) in extents {
        let stop = start.checked_add(size).ok_or("an extent overflows")?;
        if start % PAGE != 0 || size % PAGE != 0 || start < end || stop > len {
            return Err(format!(
                "extent {start:#x}+{size:#x} is unaligned, out of order or past {len:#x}"
            ));
        }
        end = stop;
    }
    Ok(())
}

/// Reads guest RAM (`len` bytes from guest physical 0) from the snapshot file into fresh
/// anonymous memory, one read per extent (holes stay the zero pages they are), and returns it
/// with the checksum of what it read and the CRC of each non-zero page. Where the file sits on a 9p or network share, this is
/// much faster than faulting pages in one by one. `extents` must have passed
/// [`check_extents`].
pub fn read_extents(
    file: &File,
    offset: u64,
    len: u64,
    extents: &[Extent],
) -> std::io::Result<(GuestMemoryMmap, u32, PageCrcs)> {
    let mem = crate::vstate::memory::create_guest_memory(len)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| std::io::Error::other("guest memory has no region"))?;
    if region.start_addr().0 != 0 || (region.len()) < len {
        return Err(std::io::Error::other(
            "guest memory is not one region from 0",
        ));
    }
    // SAFETY: the region maps at least `len` bytes, nothing else uses this new memory yet, and
    // the slice does not outlive `mem`'s borrow here.
    let ram = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len as usize) };
    let mut hasher = crc32fast::Hasher::new();
    let mut pages = PageCrcs::new();
    for &(start, size) in extents {
        let bytes = &mut ram[start as usize..(start + size) as usize];
        file.read_exact_at(bytes, offset + start)?;
        for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let number = start / PAGE + i as u64;
                hasher.update(&number.to_le_bytes());
                hasher.update(page);
                pages.push((number, crc32fast::hash(page)));
            }
        }
    }
    Ok((mem, hasher.finalize(), pages))
}

/// Maps guest RAM (`len` bytes from guest physical 0) from the snapshot file, private and
/// copy-on-write: pages are read from the file when the guest first touches them.
pub fn map_private(file: &File, offset: u64, len: u64) -> Result<GuestMemoryMmap, String> {
    let file = file
        .try_clone()
        .map_err(|e| format!("cannot duplicate the file handle: {e}"))?;
    let region = MmapRegionBuilder::new(len as usize)
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| format!("mmap of {len:#x} bytes at file offset {offset:#x} failed: {e}"))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| "the guest memory region does not fit the address space".to_string())?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sparse_pages_round_trip_through_a_private_mapping() {
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        mem.write_slice(b"first page", GuestAddress(0x10)).unwrap();
        mem.write_slice(b"far away", GuestAddress((20 << 20) + 5))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("mem"))
            .unwrap();
        let image = write_sparse(&mem, &file, PAGE).unwrap();
        let (len, crc) = (image.len, image.crc32);
        assert_eq!(image.extents, vec![(0, PAGE), (20 << 20, PAGE)]);
        check_extents(&image.extents, len).unwrap();
        assert!(check_extents(&[(PAGE, PAGE), (0, PAGE)], len).is_err());
        assert!(check_extents(&[(len, PAGE)], len).is_err());
        assert_eq!(len, 64 << 20);
        let used = file.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(used.blocks() * 512 < 1 << 20, "zero pages must be holes");

        let restored = map_private(&file, PAGE, len).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0x10)).unwrap();
        assert_eq!(&buf, b"first page");
        restored
            .read_slice(&mut buf, GuestAddress((20 << 20) + 5))
            .unwrap();
        restored
            .write_slice(b"guest write", GuestAddress(0x10))
            .unwrap();
        restored
            .write_slice(b"new", GuestAddress(3 * PAGE))
            .unwrap();
        // Written pages are the private copies, read or untouched ones the file's.
        let region = restored.iter().next().unwrap();
        let written = crate::vstate::memory::written_pages_of_private_mapping(
            region.as_ptr(),
            (len / PAGE) as usize,
        )
        .unwrap();
        let listed: Vec<usize> = (0..written.len()).filter(|&p| written[p]).collect();
        assert_eq!(listed, vec![0, 3]);
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, PAGE + 0x10).unwrap();
        assert_eq!(
            &on_disk, b"first page",
            "private mapping must not write back"
        );

        assert_eq!(image.pages.len(), 2);
        assert_eq!(image.pages[1].0, (20 << 20) / PAGE);
        let (read, read_crc, read_pages) = read_extents(&file, PAGE, len, &image.extents).unwrap();
        assert_eq!(read_crc, crc);
        assert_eq!(read_pages, image.pages);
        let mut far = [0u8; 8];
        read.read_slice(&mut far, GuestAddress((20 << 20) + 5))
            .unwrap();
        assert_eq!(&far, b"far away");

        file.write_all_at(b"X", PAGE + (20 << 20) + 5).unwrap();
        assert_ne!(
            read_extents(&file, PAGE, len, &image.extents).unwrap().1,
            crc
        );
    }
}
