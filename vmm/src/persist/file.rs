//! The snapshot container: a header, a table of checksummed sections, the sections.
//!
//! ```text
//! 0      magic "RRRSNAP\0", format version (u32 LE), section count (u32 LE)
//! 16     section table: kind u32, reserved u32, offset u64, length u64, crc32 u32, reserved u32
//! ..     crc32 of everything above (u32 LE)
//! ..     sections; the memory section starts on a page boundary so it can be mapped
//! ```
//!
//! Every byte of the header and of every small section is checked before anything is used.
//! The memory section's checksum covers only the pages that hold data (zero pages are holes),
//! and is checked by [`crate::persist::memory`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"RRRSNAP\0";
/// Bumped whenever the layout or any state struct changes; older and newer files are refused.
/// v2: the random port's PRNG state joined the devices.
pub const FORMAT_VERSION: u32 = 3;
const ENTRY_LEN: usize = 32;
const MAX_SECTIONS: u32 = 16;
pub const PAGE: u64 = 4096;

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionKind {
    /// What the snapshot was taken of ([`super::SnapshotIdentity`]), postcard.
    Identity = 1,
    /// vCPU, devices, clock and counters ([`super::MachineState`]), postcard.
    Machine = 2,
    /// Guest RAM from physical 0, page aligned, zero pages as holes.
    Memory = 3,
    /// What the guest printed on its console up to the snapshot (the boot log).
    Console = 4,
    /// Where the memory section's data pages are, postcard.
    MemoryExtents = 5,
    /// The CRC of each data page ([`super::memory::PageCrcs`]), postcard.
    MemoryPages = 6,
}

impl SectionKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => SectionKind::Identity,
            2 => SectionKind::Machine,
            3 => SectionKind::Memory,
            4 => SectionKind::Console,
            5 => SectionKind::MemoryExtents,
            6 => SectionKind::MemoryPages,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an rrr snapshot (it does not start with the snapshot magic)")]
    NotASnapshot { path: PathBuf },
    #[error("{path} is a snapshot of format version {found}, this rrr reads version {FORMAT_VERSION}; take the snapshot again with this rrr (`rrr snapshot`)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated: {what} ends at byte {end}, the file has {len} bytes; take the snapshot again")]
    Truncated {
        path: PathBuf,
        what: String,
        end: u64,
        len: u64,
    },
    #[error("{path} is corrupt: {what}; take the snapshot again")]
    Corrupt { path: PathBuf, what: String },
}

/// Writes a snapshot file section by section; the file appears under its final name only when
/// it is complete (see [`SnapshotWriter::finish`]).
pub struct SnapshotWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    sections: Vec<Section>,
    pos: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn header_len(sections: usize) -> u64 {
    16 + (sections * ENTRY_LEN) as u64 + 4
}

impl SnapshotWriter {
    /// Sections are written after a header area large enough for `MAX_SECTIONS` entries.
    pub fn create(path: &Path) -> Result<Self, FileError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        Ok(SnapshotWriter {
            path: path.to_owned(),
            tmp,
            file,
            sections: Vec::new(),
            pos: header_len(MAX_SECTIONS as usize),
        })
    }

    /// Appends a section whose bytes are all in memory.
    pub fn add(&mut self, kind: SectionKind, bytes: &[u8]) -> Result<(), FileError> {
        let offset = self.pos;
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(bytes))
            .map_err(io(&self.tmp))?;
        self.pos += bytes.len() as u64;
        self.sections.push(Section {
            kind,
            offset,
            len: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        });
        Ok(())
    }

    /// Appends a section written by `write`, which gets the file and the (page-aligned) offset
    /// to write at and returns the section's length and checksum, and whatever else it wants.
    pub fn add_with<T>(
        &mut self,
        kind: SectionKind,
        write: impl FnOnce(&mut File, u64) -> std::io::Result<(u64, u32, T)>,
    ) -> Result<T, FileError> {
        let offset = self.pos.div_ceil(PAGE) * PAGE;
        let (len, crc32, extra) = write(&mut self.file, offset).map_err(io(&self.tmp))?;
        self.pos = offset + len;
        self.sections.push(Section {
            kind,
            offset,
            len,
            crc32,
        });
        Ok(extra)
    }

    /// Writes the header, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf, FileError> {
        let mut header = Vec::with_capacity(header_len(self.sections.len()) as usize);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        for s in &self.sections {
            header.extend_from_slice(&(s.kind as u32).to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&s.offset.to_le_bytes());
            header.extend_from_slice(&s.len.to_le_bytes());
            header.extend_from_slice(&s.crc32.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = crc32fast::hash(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.tmp.clone();
        self.file
            .set_len(self.pos)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(&header))
            .and_then(|_| self.file.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        Ok(self.path.clone())
    }
}

impl Drop for SnapshotWriter {
    /// An unfinished snapshot (an error, Ctrl-C) never stays behind under any name.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// An opened, header-checked snapshot file.
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub sections: Vec<Section>,
}

impl SnapshotFile {
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let truncated = |what: &str, end: u64| FileError::Truncated {
            path: path.to_owned(),
            what: what.to_owned(),
            end,
            len,
        };
        let corrupt = |what: String| FileError::Corrupt {
            path: path.to_owned(),
            what,
        };
        let mut fixed = [0u8; 16];
        if len < 8 {
            return Err(FileError::NotASnapshot {
                path: path.to_owned(),
            });
        }
        if len < 16 {
            return Err(truncated("the header", 16));
        }
        file.read_exact(&mut fixed).map_err(io(path))?;
        if fixed[..8] != MAGIC {
            return Err(FileError::NotASnapshot {
                path: path.to_owned(),
            });
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(FileError::Version {
                path: path.to_owned(),
                found: version,
            });
        }
        let count = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
        if count > MAX_SECTIONS {
            return Err(corrupt(format!(
                "the header claims {count} sections (at most {MAX_SECTIONS})"
            )));
        }
        let header_end = header_len(count as usize);
        if len < header_end {
            return Err(truncated("the section table", header_end));
        }
        let mut rest = vec![0u8; (header_end - 16) as usize];
        file.read_exact(&mut rest).map_err(io(path))?;
        let (table, crc_bytes) = rest.split_at(rest.len() - 4);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&fixed);
        hasher.update(table);
        let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        if hasher.finalize() != stored {
            return Err(corrupt("the header checksum does not match".into()));
        }
        let mut sections = Vec::new();
        for entry in table.chunks_exact(ENTRY_LEN) {
            let u32_at = |o: usize| u32::from_le_bytes(entry[o..o + 4].try_into().expect("4"));
            let u64_at = |o: usize| u64::from_le_bytes(entry[o..o + 8].try_into().expect("8"));
            let raw_kind = u32_at(0);
            let kind = SectionKind::from_u32(raw_kind)
                .ok_or_else(|| corrupt(format!("unknown section kind {raw_kind}")))?;
            let section = Section {
                kind,
                offset: u64_at(8),
                len: u64_at(16),
                crc32: u32_at(24),
            };
            let end = section
                .offset
                .checked_add(section.len)
                .ok_or_else(|| corrupt(format!("{kind:?} section range overflows")))?;
            if end > len {
                return Err(truncated(&format!("the {kind:?} section"), end));
            }
            sections.push(section);
        }
        Ok(SnapshotFile {
            path: path.to_owned(),
            file,
            len,
            sections,
        })
    }

    pub fn section(&self, kind: SectionKind) -> Result<Section, FileError> {
        self.sections
            .iter()
            .find(|s| s.kind == kind)
            .copied()
            .ok_or_else(|| FileError::Corrupt {
                path: self.path.clone(),
                what: format!("it has no {kind:?} section"),
            })
    }

    /// Reads a small section whole and checks its checksum.
    pub fn read_section(&mut self, kind: SectionKind) -> Result<Vec<u8>, FileError> {
        let section = self.section(kind)?;
        let mut bytes = vec![0u8; section.len as usize];
        self.file
            .seek(SeekFrom::Start(section.offset))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(io(&self.path))?;
        if crc32fast::hash(&bytes) != section.crc32 {
            return Err(FileError::Corrupt {
                path: self.path.clone(),
                what: format!("the {kind:?} section's checksum does not match"),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(dir: &Path) -> PathBuf {
        let path = dir.join("s.rrrsnap");
        let mut w = SnapshotWriter::create(&path).unwrap();
        w.add(SectionKind::Identity, b"identity").unwrap();
        w.add(SectionKind::Machine, b"machine state").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn sections_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let mut f = SnapshotFile::open(&path).unwrap();
        assert_eq!(
            f.read_section(SectionKind::Machine).unwrap(),
            b"machine state"
        );
        assert!(matches!(
            f.read_section(SectionKind::Memory),
            Err(FileError::Corrupt { .. })
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn bad_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let good = std::fs::read(&path).unwrap();

        let other = dir.path().join("other");
        std::fs::write(&other, b"\x7fELF not a snapshot at all").unwrap();
        assert!(matches!(
            SnapshotFile::open(&other),
            Err(FileError::NotASnapshot { .. })
        ));

        let mut future = good.clone();
        future[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&other, &future).unwrap();
        let err = SnapshotFile::open(&other).unwrap_err();
        assert!(matches!(err, FileError::Version { found, .. } if found == FORMAT_VERSION + 1));

        std::fs::write(&other, &good[..good.len() - 3]).unwrap();
        let err = SnapshotFile::open(&other).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&other, &flipped).unwrap();
        let mut f = SnapshotFile::open(&other).unwrap();
        let err = f.read_section(SectionKind::Machine).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut header = good.clone();
        header[20] ^= 0x40;
        std::fs::write(&other, &header).unwrap();
        let err = SnapshotFile::open(&other).err().unwrap();
        assert!(err.to_string().contains("header checksum"), "{err}");
    }
}

#[cfg(test)]
mod full_disk_tests {
    use super::*;

    /// A snapshot that does not fit the disk is an error naming the file, and leaves nothing
    /// behind: not the final name, not the temporary one. Needs root (it mounts a tiny tmpfs).
    #[test]
    fn a_full_disk_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("cannot run mount");
        assert!(
            mount.success(),
            "this test mounts a 256 KiB tmpfs to fill it and needs root; run the suite as root"
        );
        let path = dir.path().join("big.rrrsnap");
        let result = (|| {
            let mut w = SnapshotWriter::create(&path)?;
            w.add(SectionKind::Identity, b"id")?;
            w.add(SectionKind::Machine, &vec![7u8; 1 << 20])?;
            w.finish()
        })();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        let err = result.expect_err("1 MiB fitted in a 256 KiB filesystem");
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    }
}
