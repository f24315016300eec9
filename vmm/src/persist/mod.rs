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
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::builder::{LegacyState, Vmm};
use crate::description::VmDescription;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::run_loop::RunState;
use crate::vstate::memory::MemoryOrigin;
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
    let (extents, pages) = writer.add_with(SectionKind::Memory, |file, offset| {
        let image = memory::write_sparse(mem, file, offset)?;
        Ok((image.len, image.crc32, (image.extents, image.pages)))
    })?;
    writer.add(
        SectionKind::MemoryExtents,
        &encode(SectionKind::MemoryExtents, &extents)?,
    )?;
    writer.add(
        SectionKind::MemoryPages,
        &encode(SectionKind::MemoryPages, &pages)?,
    )?;
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
    pub origin: MemoryOrigin,
    /// The console output up to the snapshot.
    pub boot_console: Vec<u8>,
}

/// How [`load`] brings guest RAM back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// Read every data page into fresh memory before anything runs, checking the section's
    /// checksum on the way (one large read per extent, from the extent list the snapshot
    /// keeps: fastest where the file is on a 9p or network share, as inside the carrier).
    Full,
    /// Map the file `MAP_PRIVATE` after checking its size only: pages are read as the guest
    /// touches them (fastest on a local disk).
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
    let extents: Vec<memory::Extent> = decode(
        path,
        SectionKind::MemoryExtents,
        &file.read_section(SectionKind::MemoryExtents)?,
    )?;
    memory::check_extents(&extents, mem_section.len).map_err(|why| SnapshotError::Map {
        path: path.to_owned(),
        why,
    })?;
    let pages: memory::PageCrcs = decode(
        path,
        SectionKind::MemoryPages,
        &file.read_section(SectionKind::MemoryPages)?,
    )?;
    let (mem, origin) = match check {
        MemoryCheck::Full => {
            let (mem, crc, read_pages) =
                memory::read_extents(&file.file, mem_section.offset, mem_section.len, &extents)
                    .map_err(|source| SnapshotError::MemoryIo {
                        path: path.to_owned(),
                        source,
                    })?;
            if crc != mem_section.crc32 || read_pages != pages {
                return Err(SnapshotError::MemoryChecksum {
                    path: path.to_owned(),
                });
            }
            (mem, MemoryOrigin::Anonymous)
        }
        MemoryCheck::SizeOnly => {
            let mem = memory::map_private(&file.file, mem_section.offset, mem_section.len)
                .map_err(|why| SnapshotError::Map {
                    path: path.to_owned(),
                    why,
                })?;
            (mem, MemoryOrigin::SnapshotMapping(Arc::new(pages)))
        }
    };
    Ok(LoadedSnapshot {
        path: path.to_owned(),
        identity,
        machine,
        mem,
        origin,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::CpuidEntry;

    fn identity() -> SnapshotIdentity {
        SnapshotIdentity {
            rrr_version: "0.1.0".into(),
            kernel_sha256: "aa".repeat(32),
            rootfs_sha256: "bb".repeat(32),
            description: VmDescription {
                cpuid: vec![CpuidEntry {
                    function: 0,
                    index: 0,
                    flags: 0,
                    eax: 0x10,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                }],
                cmdline: "console=ttyS0".into(),
                mem_bytes: 64 << 20,
                quantum_ns: 2000,
                epoch_unix_secs: 0,
                kvm: "test".into(),
                kernel_entry: 0x100_0000,
                initrd_size: None,
            },
        }
    }

    fn expected() -> ExpectedIdentity {
        let id = identity();
        ExpectedIdentity {
            rrr_version: id.rrr_version,
            kernel_sha256: id.kernel_sha256,
            rootfs_sha256: id.rootfs_sha256,
            mem_bytes: id.description.mem_bytes,
        }
    }

    /// A snapshot file as `save` lays it out, with a machine section that does not decode
    /// (building a real `MachineState` needs a vCPU): every check before that one is real.
    fn write(dir: &Path, id: &SnapshotIdentity) -> PathBuf {
        let path = dir.join("s.rrrsnap");
        let mut w = SnapshotWriter::create(&path).unwrap();
        w.add(SectionKind::Identity, &postcard::to_stdvec(id).unwrap())
            .unwrap();
        w.add(SectionKind::Machine, b"\xff").unwrap();
        w.add(SectionKind::Console, b"boot log").unwrap();
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let extents = w
            .add_with(SectionKind::Memory, |file, offset| {
                let image = memory::write_sparse(&mem, file, offset)?;
                Ok((image.len, image.crc32, image.extents))
            })
            .unwrap();
        w.add(
            SectionKind::MemoryExtents,
            &postcard::to_stdvec(&extents).unwrap(),
        )
        .unwrap();
        w.finish().unwrap()
    }

    fn load_err(path: &Path, wanted: &ExpectedIdentity) -> String {
        match load(path, wanted, MemoryCheck::Full) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_snapshot_of_something_else_is_refused_with_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &identity());
        let mut other_kernel = expected();
        other_kernel.kernel_sha256 = "cc".repeat(32);
        let err = load_err(&path, &other_kernel);
        assert!(
            err.contains("another kernel") && err.contains("aaaaaaaaaaaa"),
            "{err}"
        );
        let mut other_version = expected();
        other_version.rrr_version = "9.9.9".into();
        assert!(load_err(&path, &other_version).contains("rrr 0.1.0"));
        let mut other_mem = expected();
        other_mem.mem_bytes = 128 << 20;
        assert!(load_err(&path, &other_mem).contains("64 MiB"));
        let mut other_rootfs = expected();
        other_rootfs.rootfs_sha256 = "dd".repeat(32);
        assert!(load_err(&path, &other_rootfs).contains("another root filesystem"));
        // Everything matching, the next check runs: the machine section must decode.
        let err = load_err(&path, &expected());
        assert!(err.contains("Machine section does not decode"), "{err}");
    }

    #[test]
    fn truncated_corrupt_foreign_and_future_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &identity());
        let good = std::fs::read(&path).unwrap();
        let other = dir.path().join("bad.rrrsnap");

        std::fs::write(&other, &good[..good.len() / 2]).unwrap();
        let err = load_err(&other, &expected());
        assert!(
            err.contains("truncated") && err.contains("bad.rrrsnap"),
            "{err}"
        );

        std::fs::write(&other, b"").unwrap();
        assert!(load_err(&other, &expected()).contains("not an rrr snapshot"));

        std::fs::write(&other, b"QFI\xfb qcow2, not a snapshot").unwrap();
        assert!(load_err(&other, &expected()).contains("not an rrr snapshot"));

        let mut future = good.clone();
        future[8..12].copy_from_slice(&(file::FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&other, &future).unwrap();
        let future_version = format!("format version {}", file::FORMAT_VERSION + 1);
        assert!(load_err(&other, &expected()).contains(&future_version));

        let mut flipped = good.clone();
        flipped[600] ^= 0x55;
        std::fs::write(&other, &flipped).unwrap();
        assert!(load_err(&other, &expected()).contains("checksum does not match"));

        let err = load_err(&dir.path().join("missing.rrrsnap"), &expected());
        assert!(
            err.contains("missing.rrrsnap") && err.contains("No such file"),
            "{err}"
        );
    }
}
