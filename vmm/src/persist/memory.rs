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

/// Writes every non-zero page of `mem` at `offset + guest address` and returns the section's
/// length and checksum. `file` must be positioned nowhere in particular; holes stay holes.
pub fn write_sparse(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
) -> std::io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0;
    for region in mem.iter() {
        let base = region.start_addr().0;
        let len = region.len() as usize;
        // SAFETY: the region maps `len` bytes for as long as `mem` lives; the vCPU is not
        // running (snapshots are taken between exits), so nothing writes them meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut run_start: Option<usize> = None;
        let flush = |from: usize, to: usize| -> std::io::Result<()> {
            file.write_all_at(&bytes[from..to], offset + base + from as u64)
        };
        for (index, page) in bytes.chunks(PAGE as usize).enumerate() {
            let at = index * PAGE as usize;
            if page.iter().all(|&b| b == 0) {
                if let Some(start) = run_start.take() {
                    flush(start, at)?;
                }
                continue;
            }
            hasher.update(&(base / PAGE + index as u64).to_le_bytes());
            hasher.update(page);
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
    Ok((total, hasher.finalize()))
}

/// Recomputes the checksum of [`write_sparse`] from the file, reading only its data extents
/// (`SEEK_DATA`/`SEEK_HOLE`), and returns it.
pub fn checksum_sparse(file: &File, offset: u64, len: u64) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut hasher = crc32fast::Hasher::new();
    let mut pos = offset;
    let mut page = vec![0u8; PAGE as usize * RUN_PAGES];
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(err);
        }
        let data = (data as u64).max(pos);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        // Extents are page-granular on every filesystem we write to; round to be safe.
        let mut at = (data - offset) / PAGE * PAGE + offset;
        while at < hole {
            let n = ((hole - at).div_ceil(PAGE) * PAGE).min(page.len() as u64) as usize;
            let n = n.min((end - at) as usize);
            file.read_exact_at(&mut page[..n], at)?;
            for (i, chunk) in page[..n].chunks(PAGE as usize).enumerate() {
                if chunk.iter().all(|&b| b == 0) {
                    continue;
                }
                hasher.update(&((at - offset) / PAGE + i as u64).to_le_bytes());
                hasher.update(chunk);
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(hasher.finalize())
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
        let (len, crc) = write_sparse(&mem, &file, PAGE).unwrap();
        assert_eq!(len, 64 << 20);
        let used = file.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(used.blocks() * 512 < 1 << 20, "zero pages must be holes");
        assert_eq!(checksum_sparse(&file, PAGE, len).unwrap(), crc);

        let restored = map_private(&file, PAGE, len).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0x10)).unwrap();
        assert_eq!(&buf, b"first page");
        restored
            .write_slice(b"guest write", GuestAddress(0x10))
            .unwrap();
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, PAGE + 0x10).unwrap();
        assert_eq!(
            &on_disk, b"first page",
            "private mapping must not write back"
        );

        file.write_all_at(b"X", PAGE + (20 << 20) + 5).unwrap();
        assert_ne!(checksum_sparse(&file, PAGE, len).unwrap(), crc);
    }
}
