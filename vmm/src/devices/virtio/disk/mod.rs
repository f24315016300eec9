//! Disk backends for virtio-blk: a read-only qcow2 base image under an in-memory copy-on-write
//! overlay.
//!
//! The base image is never written: everything the guest writes lands in the overlay, which the
//! snapshot code saves. That keeps a recording's disk state inside the recording and lets any
//! number of runs share one base image.

mod medium;
mod overlay;
mod qcow2;
mod sniff;
#[cfg(test)]
pub(crate) mod test_images;

use std::path::{Path, PathBuf};

pub use medium::{Medium, MediumSlot};
pub use overlay::{Overlay, OVERLAY_BLOCK_SIZE};
pub use qcow2::Qcow2Image;

/// Storage behind a block device, addressed in bytes.
pub trait DiskBackend: Send {
    fn capacity_bytes(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;
    fn flush(&mut self) -> Result<(), DiskError>;
    /// A read-only backend is offered to the guest with VIRTIO_BLK_F_RO.
    fn read_only(&self) -> bool {
        false
    }
    /// What the guest changed on this disk, for a snapshot. The base contents are not part of
    /// it: they are identified by the snapshot's identity instead.
    fn save_state(&self) -> DiskState {
        DiskState::Unchanged
    }
    /// Puts back what [`DiskBackend::save_state`] returned, on a backend opened on the same
    /// base.
    fn restore_state(&mut self, state: &DiskState) -> Result<(), DiskError> {
        match state {
            DiskState::Unchanged => Ok(()),
            DiskState::Overlay { .. } => Err(DiskError::StateMismatch {
                what: "a copy-on-write overlay was saved for a disk that has none",
            }),
        }
    }
}

/// A disk's guest-written state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskState {
    /// Nothing the guest can change (a read-only medium).
    Unchanged,
    /// The overlay's blocks, as (disk byte offset, contents), in disk order.
    Overlay { blocks: Vec<(u64, Vec<u8>)> },
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a qcow2 image: it looks like {looks_like}")]
    NotQcow2 { path: PathBuf, looks_like: String },
    #[error("{path}: unsupported qcow2 image: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: corrupt qcow2 image: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: {what} at file offset {offset:#x} (+{len:#x}) runs past the end of the file ({file_len:#x} bytes)")]
    Truncated {
        path: PathBuf,
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("I/O error on {path} at file offset {offset:#x}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("access at {offset:#x}+{len:#x} is outside the {capacity:#x}-byte disk")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("the saved disk state does not fit this disk: {what}")]
    StateMismatch { what: &'static str },
}

/// Opens `path` as a read-only qcow2 base image under a fresh, empty in-memory overlay.
pub fn open_qcow2_overlay(path: &Path) -> Result<Box<dyn DiskBackend>, DiskError> {
    Ok(Box::new(Overlay::open_qcow2(path)?))
}

/// Refuses accesses that do not fit in `capacity`, without overflowing on hostile offsets.
pub(crate) fn check_range(offset: u64, len: usize, capacity: u64) -> Result<(), DiskError> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(DiskError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}
