//! A small synchronous, read-only qcow2 (v2 and v3) reader for the base disk image.
//!
//! Why not the `qcow2-rs` crate: it is async (tokio / io_uring) and pulls tokio, tokio-uring,
//! clap and env_logger into the VMM; its synchronous I/O engine panics (`unwrap`) when the file
//! cannot be opened; and its device type is built for concurrent read-write use with refcount
//! updates. The VMM only ever reads the base image, on the vCPU thread, so a reader of the L1/L2
//! mapping is all it needs and is small enough to check against `qemu-img` output in tests.
//!
//! Supported: any cluster size qemu allows, unallocated clusters (read as zeros), zero clusters,
//! internal snapshots (ignored; the active L1 table is read), the "dirty" bit (refcounts are
//! never used). Refused with an error naming the feature: backing files, encryption,
//! compressed clusters, external data files, extended L2 entries, images marked corrupt, and
//! unknown incompatible features.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::sniff;
use super::{check_range, DiskBackend, DiskError};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;
/// qemu's own limits on cluster_bits.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// qemu refuses L1 tables larger than 32 MiB; so do we, so a hostile header cannot make us
/// allocate gigabytes.
const MAX_L1_BYTES: u64 = 32 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Bits 9..=55 of L1 and L2 entries hold a host file offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1 << 0;

/// A qcow2 image opened read-only.
pub struct Qcow2Image {
    path: PathBuf,
    file: File,
    file_len: u64,
    size: u64,
    cluster_bits: u32,
    l1: Vec<u64>,
    /// L2 tables loaded so far, keyed by their offset in the file (an image whose L1 entries
    /// all point at one table holds it once), least recently used evicted past
    /// [`L2_CACHE_BYTES`].
    l2_cache: L2Cache,
}

/// How much memory loaded L2 tables may take: 32 MiB maps 256 GiB of disk at the default 64 KiB
/// clusters, and bounds what a hostile image can make us hold.
const L2_CACHE_BYTES: usize = 32 << 20;

#[derive(Default)]
struct L2Cache {
    tables: HashMap<u64, (u64, Vec<u64>)>,
    clock: u64,
    bytes: usize,
}

impl L2Cache {
    fn get(&mut self, offset: u64) -> Option<&[u64]> {
        self.clock += 1;
        let clock = self.clock;
        self.tables.get_mut(&offset).map(|(used, table)| {
            *used = clock;
            &table[..]
        })
    }

    fn insert(&mut self, offset: u64, table: Vec<u64>) {
        let size = table.len() * 8;
        while self.bytes + size > L2_CACHE_BYTES && !self.tables.is_empty() {
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(offset, _)| *offset)
                .expect("not empty");
            if let Some((_, evicted)) = self.tables.remove(&oldest) {
                self.bytes -= evicted.len() * 8;
            }
        }
        self.clock += 1;
        self.bytes += size;
        self.tables.insert(offset, (self.clock, table));
    }
}

/// Where the bytes of one guest cluster come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Zero,
    Data(u64),
}

impl Qcow2Image {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        // Read-only by construction: there is no code path that could write the base image.
        let file = File::open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut head = vec![0u8; sniff::SNIFF_LEN.min(file_len as usize)];
        read_exact_at(&file, path, &mut head, 0)?;
        if head.get(..4) != Some(MAGIC) {
            return Err(DiskError::NotQcow2 {
                path: path.to_owned(),
                looks_like: sniff::describe(&head),
            });
        }
        let header = Header::parse(path, &head)?;
        header.check_supported(path)?;

        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(path, format!("L1 table of {l1_bytes} bytes")));
        }
        let cluster_size = 1u64 << header.cluster_bits;
        let l2_entries = cluster_size / 8;
        // Every cluster of the virtual disk needs an L1 slot, or reads past the table would be
        // silently zero where qemu sees data.
        let needed = header.size.div_ceil(cluster_size * l2_entries);
        if u64::from(header.l1_size) < needed {
            return Err(corrupt(
                path,
                format!(
                    "L1 table has {} entries but the {}-byte disk needs {needed}",
                    header.l1_size, header.size
                ),
            ));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        read_table(
            &file,
            path,
            file_len,
            "L1 table",
            header.l1_table_offset,
            &mut raw,
        )?;
        let l1 = raw
            .chunks_exact(8)
            .map(|e| u64::from_be_bytes(e.try_into().expect("chunks of 8")))
            .collect();

        tracing::debug!(
            path = %path.display(),
            version = header.version,
            size = header.size,
            cluster_size,
            "opened qcow2 base image"
        );
        Ok(Qcow2Image {
            path: path.to_owned(),
            file,
            file_len,
            size: header.size,
            cluster_bits: header.cluster_bits,
            l1,
            l2_cache: L2Cache::default(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn map(&mut self, guest_offset: u64) -> Result<Mapping, DiskError> {
        let l2_entries = self.cluster_size() / 8;
        let cluster = guest_offset >> self.cluster_bits;
        let l1_index = (cluster / l2_entries) as usize;
        let l2_index = (cluster % l2_entries) as usize;
        let l1_entry = *self.l1.get(l1_index).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("offset {guest_offset:#x} is past the L1 table"),
            )
        })?;
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Mapping::Zero);
        }
        let entry = match self.l2_cache.get(l2_offset) {
            Some(table) => table[l2_index],
            None => {
                let table = self.load_l2(l2_offset)?;
                let entry = table[l2_index];
                self.l2_cache.insert(l2_offset, table);
                entry
            }
        };
        if entry & L2_COMPRESSED != 0 {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: format!("compressed cluster at disk offset {guest_offset:#x}"),
            });
        }
        let data = entry & OFFSET_MASK;
        if entry & L2_ZERO != 0 || data == 0 {
            return Ok(Mapping::Zero);
        }
        if data & (self.cluster_size() - 1) != 0 {
            return Err(corrupt(
                &self.path,
                format!("data cluster offset {data:#x} is not cluster-aligned"),
            ));
        }
        Ok(Mapping::Data(data))
    }

    fn load_l2(&self, offset: u64) -> Result<Vec<u64>, DiskError> {
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(corrupt(
                &self.path,
                format!("L2 table offset {offset:#x} is not cluster-aligned"),
            ));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        read_table(
            &self.file,
            &self.path,
            self.file_len,
            "L2 table",
            offset,
            &mut raw,
        )?;
        Ok(raw
            .chunks_exact(8)
            .map(|e| u64::from_be_bytes(e.try_into().expect("chunks of 8")))
            .collect())
    }
}

impl DiskBackend for Qcow2Image {
    fn capacity_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size)?;
        let cluster_size = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cluster_size - 1);
            let n = ((cluster_size - in_cluster) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            match self.map(pos)? {
                Mapping::Zero => chunk.fill(0),
                Mapping::Data(host) => read_data(&self.file, &self.path, chunk, host + in_cluster)?,
            }
            done += n;
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

struct Header {
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    incompatible_features: u64,
}

impl Header {
    fn parse(path: &Path, head: &[u8]) -> Result<Self, DiskError> {
        let short = |len| DiskError::Truncated {
            path: path.to_owned(),
            what: "qcow2 header",
            offset: 0,
            len,
            file_len: head.len() as u64,
        };
        let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().expect("4 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(head[o..o + 8].try_into().expect("8 bytes"));
        if head.len() < V2_HEADER_LEN {
            return Err(short(V2_HEADER_LEN as u64));
        }
        let version = be32(4);
        let incompatible_features = match version {
            2 => 0,
            3 if head.len() < V3_HEADER_LEN => return Err(short(V3_HEADER_LEN as u64)),
            3 => be64(72),
            v => {
                return Err(DiskError::Unsupported {
                    path: path.to_owned(),
                    what: format!("qcow2 version {v} (only 2 and 3 are supported)"),
                })
            }
        };
        Ok(Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits: be32(20),
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            incompatible_features,
        })
    }

    fn check_supported(&self, path: &Path) -> Result<(), DiskError> {
        let unsupported = |what: String| {
            Err(DiskError::Unsupported {
                path: path.to_owned(),
                what,
            })
        };
        if self.backing_file_offset != 0 {
            return unsupported(format!(
                "backing file ({} bytes of name at offset {:#x}); flatten it with `qemu-img convert -O qcow2`",
                self.backing_file_size, self.backing_file_offset
            ));
        }
        if self.crypt_method != 0 {
            return unsupported(format!("encryption (method {})", self.crypt_method));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(corrupt(path, format!("cluster_bits {}", self.cluster_bits)));
        }
        let f = self.incompatible_features;
        if f & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(path, "the image is marked corrupt".into()));
        }
        let named = [
            (INCOMPAT_DATA_FILE, "external data file"),
            (INCOMPAT_COMPRESSION, "non-zlib compression type"),
            (INCOMPAT_EXTL2, "extended L2 entries (subclusters)"),
        ];
        for (bit, name) in named {
            if f & bit != 0 {
                return unsupported(name.into());
            }
        }
        let unknown = f & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE);
        let unknown = unknown & !(INCOMPAT_COMPRESSION | INCOMPAT_EXTL2);
        if unknown != 0 {
            return unsupported(format!("unknown incompatible feature bits {unknown:#x}"));
        }
        Ok(())
    }
}

fn corrupt(path: &Path, what: String) -> DiskError {
    DiskError::Corrupt {
        path: path.to_owned(),
        what,
    }
}

/// Metadata must lie entirely inside the file: a table cut short means a truncated image.
fn read_table(
    file: &File,
    path: &Path,
    file_len: u64,
    what: &'static str,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), DiskError> {
    let len = buf.len() as u64;
    if !matches!(offset.checked_add(len), Some(end) if end <= file_len) {
        return Err(DiskError::Truncated {
            path: path.to_owned(),
            what,
            offset,
            len,
            file_len,
        });
    }
    read_exact_at(file, path, buf, offset)
}

/// Data clusters may end past EOF (qemu reads the missing tail as zeros), so do the same.
fn read_data(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(DiskError::Io {
                    path: path.to_owned(),
                    offset: offset + done as u64,
                    source,
                })
            }
        }
    }
    Ok(())
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| DiskError::Io {
            path: path.to_owned(),
            offset,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::disk::test_images::{make_qcow2, pattern, qemu_img};

    /// Reads the whole disk back in odd-sized pieces that straddle cluster boundaries.
    fn assert_reads_back(options: &[&str], len: usize) {
        let image = make_qcow2(pattern(len), options);
        let mut disk = Qcow2Image::open(&image.qcow2).unwrap();
        assert_eq!(disk.capacity_bytes(), len as u64);
        let mut got = vec![0xaau8; len];
        let mut pos = 0;
        for step in [1usize, 511, 4096, 65_537, 300_000].iter().cycle() {
            if pos == len {
                break;
            }
            let n = (*step).min(len - pos);
            disk.read_at(pos as u64, &mut got[pos..pos + n]).unwrap();
            pos += n;
        }
        assert!(got == image.raw, "qcow2 {options:?} read back differs");
    }

    #[test]
    fn reads_qemu_img_v3_default_clusters() {
        assert_reads_back(&[], (3 << 20) + 12_288);
    }

    #[test]
    fn reads_qemu_img_small_clusters_and_many_l2_tables() {
        assert_reads_back(&["-o", "cluster_size=512"], 1 << 20);
    }

    #[test]
    fn reads_qemu_img_v2_big_clusters() {
        assert_reads_back(&["-o", "compat=0.10,cluster_size=2M"], 5 << 20);
    }

    #[test]
    fn refuses_out_of_range_and_writes() {
        let image = make_qcow2(pattern(1 << 20), &[]);
        let mut disk = Qcow2Image::open(&image.qcow2).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(
            disk.read_at((1 << 20) - 1, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(u64::MAX, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(disk.write_at(0, &buf), Err(DiskError::ReadOnly)));
        assert!(disk.read_only());
    }

    #[test]
    fn missing_file_and_wrong_format_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.qcow2");
        let err = Qcow2Image::open(&missing).err().unwrap();
        assert!(matches!(err, DiskError::Open { .. }), "{err}");

        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0\0\0\0\0").unwrap();
        let err = Qcow2Image::open(&elf).err().unwrap();
        assert!(err.to_string().contains("an ELF executable"), "{err}");
    }

    #[test]
    fn raw_ext4_image_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("rootfs.ext4");
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", raw.to_str().unwrap(), "1M"])
            .output();
        match status {
            Ok(out) if out.status.success() => {}
            // e2fsprogs is part of the dev setup, but the reader does not depend on it.
            _ => return,
        }
        let err = Qcow2Image::open(&raw).err().unwrap();
        assert!(
            matches!(&err, DiskError::NotQcow2 { looks_like, .. } if looks_like.contains("ext2/3/4")),
            "{err}"
        );
    }

    #[test]
    fn refuses_backing_files() {
        let image = make_qcow2(pattern(1 << 20), &[]);
        let top = image.dir.path().join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            image.qcow2.to_str().unwrap(),
            top.to_str().unwrap(),
        ]);
        let err = Qcow2Image::open(&top).err().unwrap();
        assert!(
            matches!(&err, DiskError::Unsupported { what, .. } if what.contains("backing file")),
            "{err}"
        );
    }

    #[test]
    fn refuses_compressed_clusters_on_read() {
        let image = make_qcow2(pattern(1 << 20), &["-c"]);
        let mut disk = Qcow2Image::open(&image.qcow2).unwrap();
        let mut buf = [0u8; 512];
        let err = disk.read_at(0, &mut buf).err().unwrap();
        assert!(
            matches!(&err, DiskError::Unsupported { what, .. } if what.contains("compressed")),
            "{err}"
        );
    }

    /// Rewrites bytes of the header of a valid image, then opens it.
    fn open_patched(offset: usize, bytes: &[u8]) -> DiskError {
        let image = make_qcow2(pattern(1 << 20), &[]);
        let mut file = std::fs::read(&image.qcow2).unwrap();
        file[offset..offset + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&image.qcow2, &file).unwrap();
        Qcow2Image::open(&image.qcow2).err().unwrap()
    }

    #[test]
    fn refuses_encryption_unknown_features_and_truncated_tables() {
        let err = open_patched(32, &1u32.to_be_bytes());
        assert!(err.to_string().contains("encryption"), "{err}");

        let err = open_patched(72, &(1u64 << 40).to_be_bytes());
        assert!(
            err.to_string()
                .contains("unknown incompatible feature bits 0x10000000000"),
            "{err}"
        );

        let err = open_patched(72, &INCOMPAT_CORRUPT.to_be_bytes());
        assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");

        let err = open_patched(40, &(1u64 << 40).to_be_bytes());
        assert!(
            matches!(
                err,
                DiskError::Truncated {
                    what: "L1 table",
                    ..
                }
            ),
            "{err}"
        );

        let err = open_patched(4, &4u32.to_be_bytes());
        assert!(err.to_string().contains("qcow2 version 4"), "{err}");
    }

    #[test]
    fn refuses_an_l1_table_too_small_for_the_disk() {
        // Claim a disk far larger than the L1 table can map.
        let err = open_patched(24, &(1u64 << 50).to_be_bytes());
        assert!(err.to_string().contains("L1 table has"), "{err}");
    }
}

#[cfg(test)]
mod l2_cache_tests {
    use super::*;

    #[test]
    fn the_l2_cache_holds_a_shared_table_once_and_stays_bounded() {
        let mut cache = L2Cache::default();
        let table = || vec![0u64; 8192]; // 64 KiB, one table at the default cluster size
        cache.insert(0x30000, table());
        // L1 entries aliasing one table find it by its file offset.
        assert!(cache.get(0x30000).is_some());
        assert_eq!(cache.bytes, 8192 * 8);
        for i in 0..10_000u64 {
            cache.insert(0x100000 + i * 0x10000, table());
            assert!(cache.bytes <= L2_CACHE_BYTES);
        }
        assert_eq!(cache.tables.len(), L2_CACHE_BYTES / (8192 * 8));
        assert!(cache.get(0x30000).is_none(), "the oldest table was evicted");
    }
}
