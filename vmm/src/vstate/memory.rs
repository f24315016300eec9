//! Guest RAM: one anonymous mapping from guest physical 0 up to the end of RAM, below the
//! 32-bit MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MAX_MEM_BYTES, MIN_MEM_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{asked} MiB of guest memory asked; rrr needs at least {} MiB", MIN_MEM_BYTES >> 20)]
    TooSmall { asked: u64 },
    #[error("{asked} MiB of guest memory asked; rrr maps RAM only below the 32-bit MMIO hole, so at most {} MiB", MAX_MEM_BYTES >> 20)]
    TooLarge { asked: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `bytes` of guest RAM starting at guest physical address 0.
pub fn create_guest_memory(bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = bytes >> 20;
    if bytes < MIN_MEM_BYTES {
        return Err(MemoryError::TooSmall { asked: mib });
    }
    if bytes > MAX_MEM_BYTES {
        return Err(MemoryError::TooLarge { asked: mib });
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| MemoryError::Mmap { mib, source })
}

/// Where guest RAM came from, which decides how the run's final state can be hashed.
#[derive(Debug, Clone, Default)]
pub enum MemoryOrigin {
    /// Anonymous memory: a boot, or a snapshot read whole. Nothing tells written pages apart.
    #[default]
    Anonymous,
    /// A snapshot mapped copy-on-write ([`crate::persist::memory::map_private`]): a page anyone
    /// wrote since (the guest, KVM, a device) is an anonymous copy, and every other page still
    /// holds the snapshot's bytes, whose CRCs these are.
    SnapshotMapping(std::sync::Arc<crate::persist::memory::PageCrcs>),
}

/// Which pages of a private file mapping of `pages` pages at `start` were written since it was
/// mapped, from `/proc/self/pagemap`: a written page is present and anonymous (its
/// copy-on-write copy), or swapped out. Exact whoever wrote it, unlike KVM's dirty log, which
/// misses the VMM's own writes.
pub fn written_pages_of_private_mapping(
    start: *const u8,
    pages: usize,
) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, (start as u64 / 4096) * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|entry| {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            entry & SWAPPED != 0 || (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0)
        })
        .collect())
}

/// Pages of guest RAM the VMM itself wrote (a virtio device's data, status byte and used
/// ring), which KVM's dirty log never sees: the in-memory checkpoints of reverse execution
/// need them. Off unless a checkpointing replay turns it on. A process holds one VM, so one
/// log for the process (the devices would otherwise need a handle each).
static HOST_WRITES: std::sync::Mutex<Option<std::collections::BTreeSet<u64>>> =
    std::sync::Mutex::new(None);

/// Starts (or stops) logging the VMM's own writes to guest RAM.
pub fn track_host_writes(on: bool) {
    let mut log = HOST_WRITES.lock().unwrap_or_else(|e| e.into_inner());
    *log = on.then(Default::default);
}

/// The VMM wrote `len` bytes of guest RAM at `gpa`.
pub fn note_host_write(gpa: u64, len: usize) {
    if len == 0 {
        return;
    }
    let mut log = HOST_WRITES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pages) = log.as_mut() {
        pages.extend((gpa >> 12)..=((gpa + len as u64 - 1) >> 12));
    }
}

/// The pages written by the VMM since the last call (guest page numbers).
pub fn take_host_writes() -> Vec<u64> {
    let mut log = HOST_WRITES.lock().unwrap_or_else(|e| e.into_inner());
    log.as_mut()
        .map(|pages| std::mem::take(pages).into_iter().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooSmall { asked: 1 })
        ));
        let err = create_guest_memory(4 << 30).unwrap_err();
        assert!(err.to_string().contains("at most 3072 MiB"), "{err}");
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
