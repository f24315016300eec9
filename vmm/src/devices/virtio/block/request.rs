//! One virtio-blk request: checking a descriptor chain from the (untrusted) guest and carrying
//! it out against the disk.
//!
//! Every address and length comes from the guest. Nothing here indexes guest memory directly:
//! all accesses go through vm-memory, whose errors become an IOERR status for that request.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use super::{SECTOR_SIZE, SERIAL};
use crate::devices::virtio::disk::{DiskBackend, DiskError};

/// The request header (`struct virtio_blk_outhdr`): type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// Bounce buffer size for moving data between the disk and guest memory.
pub(super) const CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("empty descriptor chain (head index outside the descriptor table?)")]
    EmptyChain,
    #[error("descriptor chain cut short: a loop, a next index outside the table, or an unreadable descriptor")]
    TruncatedChain,
    #[error("descriptor chain longer than {0} descriptors")]
    ChainTooLong(usize),
    #[error("last descriptor is not a writable status byte in guest memory")]
    BadStatus,
    #[error("no request header before the status descriptor")]
    NoHeader,
    #[error("request header is not a readable {HEADER_LEN}-byte buffer in guest memory")]
    BadHeader,
    #[error("data descriptor {index} is {found}, request type {kind} needs the other direction")]
    WrongDirection {
        index: usize,
        kind: u32,
        found: &'static str,
    },
    #[error("data length {0:#x} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("sector {sector} + {len:#x} bytes is past the end of the {capacity:#x}-byte disk")]
    PastEnd {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory at {addr:#x}: {source}")]
    Memory { addr: u64, source: GuestMemoryError },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl RequestError {
    /// The status byte to answer with, or `None` when the chain has nowhere to put one.
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::EmptyChain
            | RequestError::TruncatedChain
            | RequestError::ChainTooLong(_)
            | RequestError::BadStatus => None,
            RequestError::Unsupported(_) => Some(VIRTIO_BLK_S_UNSUPP as u8),
            _ => Some(VIRTIO_BLK_S_IOERR as u8),
        }
    }
}

/// Where the status byte of a chain goes and what the chain carries.
pub struct Chain {
    descriptors: Vec<Descriptor>,
    status: GuestAddress,
}

impl Chain {
    /// Takes the chain apart, checking only what is needed to answer it: that it ends and that
    /// its last descriptor is a writable byte in guest memory.
    pub fn parse(
        descriptors: impl Iterator<Item = Descriptor>,
        max: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<Chain, RequestError> {
        let mut descriptors: Vec<Descriptor> = descriptors.take(max + 1).collect();
        if descriptors.len() > max {
            return Err(RequestError::ChainTooLong(max));
        }
        let last = descriptors.pop().ok_or(RequestError::EmptyChain)?;
        // virtio-queue ends the iteration quietly on a loop (its TTL runs out) or an unreadable
        // next descriptor; the only trace left is a last descriptor that still says "next".
        if last.has_next() {
            return Err(RequestError::TruncatedChain);
        }
        // The status is the last byte of the chain.
        let status = last
            .len()
            .checked_sub(1)
            .filter(|_| last.is_write_only())
            .and_then(|back| last.addr().checked_add(u64::from(back)))
            .filter(|addr| mem.address_in_range(*addr))
            .ok_or(RequestError::BadStatus)?;
        Ok(Chain {
            descriptors,
            status,
        })
    }

    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// Carries out the request. Returns the number of bytes written into guest memory before
    /// the status byte, and the error that ended the request, if any. A chain's buffers can
    /// add up past 4 GiB (each descriptor may be almost 4 GiB long), so the count is kept in 64
    /// bits and the caller saturates it to the used ring's 32.
    pub fn execute(
        &self,
        disk: &mut dyn DiskBackend,
        capacity: u64,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
    ) -> (u64, Result<(), RequestError>) {
        let mut written = 0u64;
        let result = self.execute_inner(disk, capacity, mem, scratch, &mut written);
        (written, result)
    }

    fn execute_inner(
        &self,
        disk: &mut dyn DiskBackend,
        capacity: u64,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
        written: &mut u64,
    ) -> Result<(), RequestError> {
        let (header, data) = self
            .descriptors
            .split_first()
            .ok_or(RequestError::NoHeader)?;
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(RequestError::BadHeader);
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| RequestError::BadHeader)?;
        let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));

        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = check_data(data, kind, true, sector, capacity, mem)?;
                let mut pos = offset;
                for d in data {
                    *written += u64::from(copy_to_guest(mem, d, scratch, |buf| {
                        disk.read_at(pos, buf)?;
                        pos += buf.len() as u64;
                        Ok(())
                    })?);
                }
                Ok(())
            }
            VIRTIO_BLK_T_OUT => {
                if disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                let mut pos = check_data(data, kind, false, sector, capacity, mem)?;
                for d in data {
                    copy_from_guest(mem, d, scratch, |buf| {
                        disk.write_at(pos, buf)?;
                        pos += buf.len() as u64;
                        Ok(())
                    })?;
                }
                Ok(())
            }
            VIRTIO_BLK_T_FLUSH => Ok(disk.flush()?),
            VIRTIO_BLK_T_GET_ID => {
                check_buffers(data, kind, true, mem)?;
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..SERIAL.len()].copy_from_slice(SERIAL);
                // Shorter buffers get a truncated ID, like a 20-byte one gets no NUL.
                let mut rest = &id[..];
                for d in data {
                    let n = rest.len().min(d.len() as usize);
                    crate::vstate::memory::note_host_write(d.addr().0, n);
                    mem.write_slice(&rest[..n], d.addr())
                        .map_err(|source| memory_error(d.addr(), source))?;
                    *written += n as u64;
                    rest = &rest[n..];
                }
                Ok(())
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }
}

/// Checks that every data buffer goes the right way and lies in guest memory, before any of
/// it is touched: a bad request must not leave half its data on the disk.
fn check_buffers(
    data: &[Descriptor],
    kind: u32,
    to_guest: bool,
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    for (i, d) in data.iter().enumerate() {
        if d.is_write_only() != to_guest {
            return Err(RequestError::WrongDirection {
                index: i + 1,
                kind,
                found: if to_guest { "read-only" } else { "write-only" },
            });
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::Memory {
                addr: d.addr().0,
                source: GuestMemoryError::InvalidGuestAddress(d.addr()),
            });
        }
    }
    Ok(())
}

/// Checks the data descriptors of a read or write and returns its byte offset on the disk.
fn check_data(
    data: &[Descriptor],
    kind: u32,
    to_guest: bool,
    sector: u64,
    capacity: u64,
    mem: &GuestMemoryMmap,
) -> Result<u64, RequestError> {
    check_buffers(data, kind, to_guest, mem)?;
    let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(len));
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or(RequestError::PastEnd {
            sector,
            len,
            capacity,
        })
}

fn memory_error(addr: GuestAddress, source: GuestMemoryError) -> RequestError {
    RequestError::Memory {
        addr: addr.0,
        source,
    }
}

/// Fills the guest buffer `d` chunk by chunk from `fill`; returns the bytes written.
fn copy_to_guest(
    mem: &GuestMemoryMmap,
    d: &Descriptor,
    scratch: &mut [u8],
    mut fill: impl FnMut(&mut [u8]) -> Result<(), RequestError>,
) -> Result<u32, RequestError> {
    let mut done = 0u32;
    while done < d.len() {
        let n = scratch.len().min((d.len() - done) as usize);
        let addr = chunk_addr(d, done)?;
        fill(&mut scratch[..n])?;
        crate::vstate::memory::note_host_write(addr.0, n);
        mem.write_slice(&scratch[..n], addr)
            .map_err(|source| memory_error(addr, source))?;
        done += n as u32;
    }
    Ok(done)
}

/// Hands the guest buffer `d` to `drain` chunk by chunk.
fn copy_from_guest(
    mem: &GuestMemoryMmap,
    d: &Descriptor,
    scratch: &mut [u8],
    mut drain: impl FnMut(&[u8]) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut done = 0u32;
    while done < d.len() {
        let n = scratch.len().min((d.len() - done) as usize);
        let addr = chunk_addr(d, done)?;
        mem.read_slice(&mut scratch[..n], addr)
            .map_err(|source| memory_error(addr, source))?;
        drain(&scratch[..n])?;
        done += n as u32;
    }
    Ok(())
}

fn chunk_addr(d: &Descriptor, done: u32) -> Result<GuestAddress, RequestError> {
    d.addr()
        .checked_add(u64::from(done))
        .ok_or_else(|| memory_error(d.addr(), GuestMemoryError::GuestAddressOverflow))
}
