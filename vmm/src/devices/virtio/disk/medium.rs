//! A read-only disk of fixed capacity whose contents are inserted while the VM runs: the
//! stimulus disk. It reads as zeros until the VMM inserts a medium (at READY, after a
//! snapshot would be taken), so a snapshot holds nothing of any stimulus and its size, which
//! the guest saw at boot, never changes.

use std::sync::{Arc, Mutex};

use super::{check_range, DiskBackend, DiskError};

/// The host's handle to insert a medium into a [`Medium`] disk already on the board.
#[derive(Clone, Default)]
pub struct MediumSlot(Arc<Mutex<Option<Arc<[u8]>>>>);

impl MediumSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `contents` in the drive; bytes past their end read as zeros.
    pub fn insert(&self, contents: Vec<u8>) {
        *crate::bus::lock(&self.0) = Some(contents.into());
    }
}

/// The drive: a fixed capacity and whatever medium its slot holds.
pub struct Medium {
    capacity: u64,
    slot: MediumSlot,
}

impl Medium {
    pub fn new(capacity: u64, slot: MediumSlot) -> Self {
        Medium { capacity, slot }
    }
}

impl DiskBackend for Medium {
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.capacity)?;
        buf.fill(0);
        if let Some(contents) = crate::bus::lock(&self.slot.0).as_ref() {
            if let Some(available) = contents.get(offset as usize..) {
                let n = available.len().min(buf.len());
                buf[..n].copy_from_slice(&available[..n]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_until_a_medium_is_inserted() {
        let slot = MediumSlot::new();
        let mut disk = Medium::new(1 << 20, slot.clone());
        let mut buf = [0xaau8; 8];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 8]);
        slot.insert(b"RRRSTIM1 and more".to_vec());
        disk.read_at(4, &mut buf).unwrap();
        assert_eq!(&buf, b"TIM1 and");
        disk.read_at(13, &mut buf).unwrap();
        assert_eq!(&buf, b"more\0\0\0\0");
        assert!(disk.read_at((1 << 20) - 4, &mut buf).is_err());
        assert!(matches!(disk.write_at(0, b"x"), Err(DiskError::ReadOnly)));
    }
}
