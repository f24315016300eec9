//! Snapshots: the whole VM at the guest agent's READY, saved once per kernel and restored in
//! milliseconds.
//!
//! Every component has a plain serde state struct and a `save`/`restore` pair (Firecracker's
//! `Persist` pattern): the vCPU ([`crate::vstate::vcpu_state`]), each legacy device
//! ([`crate::builder::LegacyState`]), each virtio transport with its queues and its disk
//! overlay ([`crate::devices::virtio::mmio::MmioTransportState`]), and the run loop's clock and
//! counters ([`crate::run_loop::RunState`]). Host handles (files, writers, threads, `Instant`s)
//! never live in a state struct: a restore builds the board with the same steps as a boot and
//! pours the saved state into it.
//!
//! The file ([`file`]) is versioned, every section is checksummed, and it names what it was
//! taken of ([`SnapshotIdentity`]): restoring into anything different is refused with the
//! difference spelled out.

pub mod file;
pub mod memory;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::builder::{LegacyState, Vmm};
use crate::description::VmDescription;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::run_loop::RunState;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use file::{FileError, SectionKind, SnapshotFile, SnapshotWriter};

/// What a snapshot was taken of. Two snapshots with equal identities are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIdentity {
    /// The rrr version that wrote it: state structs may change between versions.
    pub rrr_version: String,
    /// SHA-256 of the kernel's `vmlinux`.
    pub kernel_sha256: String,
    /// SHA-256 of the root filesystem's base image.
    pub rootfs_sha256: String,
    /// The CPU model, the command line, the memory size and the rest of what the guest saw.
    pub description: VmDescription,
}

impl SnapshotIdentity {
    /// What differs between a snapshot's identity and what a restore asks for, in words;
    /// `None` if they match. The description is compared by [`crate::builder::restore_vm`],
    /// which knows the CPU model only once KVM is open.
    pub fn difference(&self, wanted: &ExpectedIdentity) -> Option<String> {
        if self.rrr_version != wanted.rrr_version {
            return Some(format!(
                "it was written by rrr {}, this is rrr {}",
                self.rrr_version, wanted.rrr_version
            ));
        }
        if self.kernel_sha256 != wanted.kernel_sha256 {
            return Some(format!(
                "it was taken of another kernel (vmlinux sha256 {}, this one is {})",
                short(&self.kernel_sha256),
                short(&wanted.kernel_sha256)
            ));
        }
        if self.rootfs_sha256 != wanted.rootfs_sha256 {
            return Some(format!(
                "it was taken with another root filesystem (sha256 {}, this one is {})",
                short(&self.rootfs_sha256),
                short(&wanted.rootfs_sha256)
            ));
        }
        if self.description.mem_bytes != wanted.mem_bytes {
            return Some(format!(
                "it has {} MiB of guest memory, {} MiB were asked for",
                self.description.mem_bytes >> 20,
                wanted.mem_bytes >> 20
            ));
        }
        None
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// What a restore expects a snapshot to be of, known before any VM exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedIdentity {
    pub rrr_version: String,
    pub kernel_sha256: String,
    pub rootfs_sha256: String,
    pub mem_bytes: u64,
}

/// Everything but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpu: VcpuState,
    pub devices: LegacyState,
    pub virtio: Vec<MmioTransportState>,
    pub run: RunState,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("saving the vCPU failed: {0}")]
    Vcpu(#[from] VcpuStateError),
    #[error("{path}: the {section:?} section does not decode ({source}); take the snapshot again")]
    Decode {
        path: PathBuf,
        section: SectionKind,
        source: postcard::Error,
    },
    #[error("encoding the {section:?} section failed: {source}")]
    Encode {
        section: SectionKind,
        source: postcard::Error,
    },
    #[error("{path} does not fit this run: {why}")]
    Mismatch { path: PathBuf, why: String },
    #[error("{path}: the guest memory section is corrupt (its checksum does not match); take the snapshot again")]
    MemoryChecksum { path: PathBuf },
    #[error("{path}: the guest memory section holds {found:#x} bytes, the snapshot's VM has {expected:#x}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: reading the guest memory section failed: {source}")]
    MemoryIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: mapping the guest memory failed: {why}")]
    Map { path: PathBuf, why: String },
}

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct SavedSnapshot {
    pub path: PathBuf,
    /// The file's apparent size (guest RAM included, holes and all).
    pub file_bytes: u64,
    /// Bytes the file really occupies on disk.
    pub disk_bytes: u64,
    pub took: Duration,
}

fn encode<T: Serialize>(section: SectionKind, value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(value).map_err(|source| SnapshotError::Encode { section, source })
}

/// Saves the VM, stopped at READY by [`crate::run_loop::run_until`], to `path` (written under
/// a temporary name and renamed when complete).
pub fn save(
    vmm: &mut Vmm,
    run: &RunState,
    identity: &SnapshotIdentity,
    boot_console: &[u8],
    path: &Path,
) -> Result<SavedSnapshot, SnapshotError> {
    let started = Instant::now();
    let machine = MachineState {
        vcpu: vmm.vcpu.save_state(&vmm.kvm)?,
        devices: vmm.devices.save(),
        virtio: vmm.mmio.save(),
        run: run.clone(),
    };
    let mut writer = SnapshotWriter::create(path)?;
    writer.add(
        SectionKind::Identity,
        &encode(SectionKind::Identity, identity)?,
    )?;
    writer.add(
        SectionKind::Machine,
        &encode(SectionKind::Machine, &machine)?,
    )?;
    let mem = &vmm.mem;
    writer.add(SectionKind::Console, boot_console)?;
    writer.add_with(SectionKind::Memory, |file, offset| {
        memory::write_sparse(mem, file, offset)
    })?;
    let path = writer.finish()?;
    let meta = std::fs::metadata(&path).map_err(|source| FileError::Io {
        path: path.clone(),
        source,
    })?;
    use std::os::unix::fs::MetadataExt;
    Ok(SavedSnapshot {
        file_bytes: meta.len(),
        disk_bytes: meta.blocks() * 512,
        path,
        took: started.elapsed(),
    })
}

/// A snapshot read and checked, ready to be restored with [`crate::builder::restore_vm`].
pub struct LoadedSnapshot {
    pub path: PathBuf,
    pub identity: SnapshotIdentity,
    pub machine: MachineState,
    pub mem: GuestMemoryMmap,
    /// The console output up to the snapshot.
    pub boot_console: Vec<u8>,
}

/// How much of the memory section [`load`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// Checksum every data page before anything runs (reads all of them once).
    Full,
    /// Check the size only; pages are read as the guest touches them.
    SizeOnly,
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    section: SectionKind,
    bytes: &[u8],
) -> Result<T, SnapshotError> {
    postcard::from_bytes(bytes).map_err(|source| SnapshotError::Decode {
        path: path.to_owned(),
        section,
        source,
    })
}

/// Opens a snapshot, checks its header, sections and identity, and maps its memory.
pub fn load(
    path: &Path,
    wanted: &ExpectedIdentity,
    check: MemoryCheck,
) -> Result<LoadedSnapshot, SnapshotError> {
    let mut file = SnapshotFile::open(path)?;
    let identity: SnapshotIdentity = decode(
        path,
        SectionKind::Identity,
        &file.read_section(SectionKind::Identity)?,
    )?;
    if let Some(why) = identity.difference(wanted) {
        return Err(SnapshotError::Mismatch {
            path: path.to_owned(),
            why,
        });
    }
    let machine: MachineState = decode(
        path,
        SectionKind::Machine,
        &file.read_section(SectionKind::Machine)?,
    )?;
    let boot_console = file.read_section(SectionKind::Console)?;
    let mem_section = file.section(SectionKind::Memory)?;
    if mem_section.len != identity.description.mem_bytes {
        return Err(SnapshotError::MemorySize {
            path: path.to_owned(),
            found: mem_section.len,
            expected: identity.description.mem_bytes,
        });
    }
    if check == MemoryCheck::Full {
        let crc = memory::checksum_sparse(&file.file, mem_section.offset, mem_section.len)
            .map_err(|source| SnapshotError::MemoryIo {
                path: path.to_owned(),
                source,
            })?;
        if crc != mem_section.crc32 {
            return Err(SnapshotError::MemoryChecksum {
                path: path.to_owned(),
            });
        }
    }
    let mem =
        memory::map_private(&file.file, mem_section.offset, mem_section.len).map_err(|why| {
            SnapshotError::Map {
                path: path.to_owned(),
                why,
            }
        })?;
    Ok(LoadedSnapshot {
        path: path.to_owned(),
        identity,
        machine,
        mem,
        boot_console,
    })
}

/// Serde for byte arrays longer than serde's built-in 32 (e.g. the CMOS RAM).
pub mod byte_array {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let bytes: Vec<u8> = serde_bytes_compat::deserialize(d)?;
        bytes.try_into().map_err(|v: Vec<u8>| {
            serde::de::Error::invalid_length(v.len(), &"a fixed-size byte array")
        })
    }

    mod serde_bytes_compat {
        use serde::de::{Deserializer, SeqAccess, Visitor};

        struct BytesVisitor;

        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            d.deserialize_byte_buf(BytesVisitor)
        }
    }
}
