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
