//! The in-memory copy-on-write overlay that takes every guest write.
//!
//! Blocks are kept in a `BTreeMap` so that [`Overlay::dirty_blocks`] walks them in disk order:
//! a snapshot of the overlay is then byte-for-byte the same for the same guest writes.

use std::collections::BTreeMap;

use super::{check_range, DiskBackend, DiskError};

/// Granularity of the overlay: a guest write of one sector copies up one block.
pub const OVERLAY_BLOCK_SIZE: u64 = 4096;

pub struct Overlay {
    base: Box<dyn DiskBackend>,
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl Overlay {
    /// `base` is only ever read.
    pub fn new(base: Box<dyn DiskBackend>) -> Self {
        Overlay {
            base,
            blocks: BTreeMap::new(),
        }
    }

    /// A read-only qcow2 base image with an empty overlay on top.
    pub fn open_qcow2(path: &std::path::Path) -> Result<Self, DiskError> {
        Ok(Overlay::new(Box::new(super::Qcow2Image::open(path)?)))
    }

    /// Every block the guest has written, as (disk byte offset, contents), in disk order. The
    /// last block is shorter when the capacity is not a multiple of the block size.
    pub fn dirty_blocks(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.blocks
            .iter()
            .map(|(index, data)| (index * OVERLAY_BLOCK_SIZE, &data[..]))
    }

    /// Restores one block saved by [`Overlay::dirty_blocks`].
    pub fn insert_block(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let capacity = self.capacity_bytes();
        let expected = OVERLAY_BLOCK_SIZE.min(capacity.saturating_sub(offset)) as usize;
        if offset % OVERLAY_BLOCK_SIZE != 0 || data.len() != expected {
            return Err(DiskError::OutOfRange {
                offset,
                len: data.len() as u64,
                capacity,
            });
        }
        check_range(offset, data.len(), capacity)?;
        self.blocks.insert(
            offset / OVERLAY_BLOCK_SIZE,
            data.to_vec().into_boxed_slice(),
        );
        Ok(())
    }

    fn block_len(&self, index: u64) -> usize {
        let start = index * OVERLAY_BLOCK_SIZE;
        OVERLAY_BLOCK_SIZE.min(self.base.capacity_bytes() - start) as usize
    }

    /// The overlay's copy of block `index`, copied up from the base on first write.
    fn block_mut(&mut self, index: u64) -> Result<&mut [u8], DiskError> {
        if !self.blocks.contains_key(&index) {
            let mut data = vec![0u8; self.block_len(index)].into_boxed_slice();
            self.base.read_at(index * OVERLAY_BLOCK_SIZE, &mut data)?;
            self.blocks.insert(index, data);
        }
        Ok(self.blocks.get_mut(&index).expect("inserted above"))
    }
}

/// Splits `[offset, offset + len)` into (block index, offset in block, position in buffer, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let at = offset + pos as u64;
        let in_block = (at % OVERLAY_BLOCK_SIZE) as usize;
        let n = (OVERLAY_BLOCK_SIZE as usize - in_block).min(len - pos);
        let piece = (at / OVERLAY_BLOCK_SIZE, in_block, pos, n);
        pos += n;
        Some(piece)
    })
}

impl DiskBackend for Overlay {
    fn capacity_bytes(&self) -> u64 {
        self.base.capacity_bytes()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.capacity_bytes())?;
        for (index, in_block, pos, n) in pieces(offset, buf.len()) {
            let out = &mut buf[pos..pos + n];
            match self.blocks.get(&index) {
                Some(block) => out.copy_from_slice(&block[in_block..in_block + n]),
                None => self.base.read_at(offset + pos as u64, out)?,
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.capacity_bytes())?;
        for (index, in_block, pos, n) in pieces(offset, buf.len()) {
            self.block_mut(index)?[in_block..in_block + n].copy_from_slice(&buf[pos..pos + n]);
        }
        Ok(())
    }

    /// Nothing to persist: the overlay lives in memory until a snapshot saves it.
    fn save_state(&self) -> super::DiskState {
        super::DiskState::Overlay {
            blocks: self
                .dirty_blocks()
                .map(|(offset, data)| (offset, data.to_vec()))
                .collect(),
        }
    }

    fn restore_state(&mut self, state: &super::DiskState) -> Result<(), DiskError> {
        let super::DiskState::Overlay { blocks } = state else {
            return Err(DiskError::StateMismatch {
                what: "no overlay was saved for a disk that has one",
            });
        };
        self.blocks.clear();
        for (offset, data) in blocks {
            self.insert_block(*offset, data)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::disk::test_images::{fingerprint, make_qcow2, pattern};

    #[test]
    fn writes_stay_in_memory_and_reads_prefer_them() {
        let len = (1 << 20) + 1536; // capacity not a multiple of the block size
        let image = make_qcow2(pattern(len), &[]);
        let before = fingerprint(&image.qcow2);
        let mut disk = Overlay::open_qcow2(&image.qcow2).unwrap();
        let mut expected = image.raw.clone();

        // Unaligned writes across block boundaries, and one into the short last block.
        let writes: [(u64, usize, u8); 3] = [
            (4000, 200, 0x11),
            (8192, 4096, 0x22),
            (len as u64 - 700, 700, 0x33),
        ];
        for (offset, n, byte) in writes {
            disk.write_at(offset, &vec![byte; n]).unwrap();
            expected[offset as usize..offset as usize + n].fill(byte);
        }
        let mut got = vec![0u8; len];
        disk.read_at(0, &mut got).unwrap();
        assert!(got == expected);

        let dirty: Vec<(u64, usize)> = disk.dirty_blocks().map(|(o, d)| (o, d.len())).collect();
        assert_eq!(
            dirty,
            vec![(0, 4096), (4096, 4096), (8192, 4096), (1 << 20, 1536)]
        );
        assert!(disk.write_at(len as u64 - 1, &[0, 0]).is_err());
        assert_eq!(fingerprint(&image.qcow2), before, "base image was modified");
    }

    #[test]
    fn saved_blocks_restore_into_a_fresh_overlay() {
        let image = make_qcow2(pattern(64 << 10), &[]);
        let mut disk = Overlay::open_qcow2(&image.qcow2).unwrap();
        disk.write_at(5000, b"hello").unwrap();
        let saved: Vec<(u64, Vec<u8>)> =
            disk.dirty_blocks().map(|(o, d)| (o, d.to_vec())).collect();

        let mut restored = Overlay::open_qcow2(&image.qcow2).unwrap();
        for (offset, data) in &saved {
            restored.insert_block(*offset, data).unwrap();
        }
        let mut buf = [0u8; 5];
        restored.read_at(5000, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(restored.insert_block(100, &[0; 4096]).is_err());
        assert!(restored.insert_block(0, &[0; 10]).is_err());
    }
}
