//! The recording file: header, writer and reader in one place (rr's trace stream).
//!
//! Layout: `MAGIC` (8 bytes), the format version (u32 LE), then frames appended as the run goes:
//! `len: u32 LE | crc32(payload): u32 LE | payload` where the payload is one postcard-encoded
//! [`Record`]. The first frame is always the [`Header`]; a clean close appends [`Record::End`],
//! so a recording without one is incomplete (Ctrl-C, a kill, a full disk). Every frame is
//! written with one `write` call as soon as it exists, so a killed recorder loses at most the
//! frame it was writing; the reader stops at the last whole frame and says how much was left.
//!
//! A recording is input: every length is checked against the bytes present and a bound before
//! anything is allocated, and every frame's checksum before it is decoded.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::persist::SnapshotIdentity;

pub const MAGIC: [u8; 8] = *b"RRRREC\r\n";
/// Bumped whenever a record's layout changes; other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
const PREAMBLE_LEN: usize = MAGIC.len() + 4;
const FRAME_HEADER_LEN: usize = 8;
/// Larger than any record we write (the header carries the stimulus binary, at most the
/// stimulus disk's size); anything bigger is damage, not data.
pub const MAX_RECORD_BYTES: u32 = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    // The I/O error is part of the message, not a `source`: anyhow's `{:#}` would print it twice.
    #[error("cannot read the recording {path}: {io}")]
    Read { path: PathBuf, io: std::io::Error },
    #[error("cannot write the recording {path}: {io}")]
    Write { path: PathBuf, io: std::io::Error },
    #[error("not an rrr recording (no rrr recording magic at the start)")]
    NotARecording,
    #[error("recording format version {found}, this rrr reads version {FORMAT_VERSION} only")]
    Version { found: u32 },
    #[error("the recording ends before its header is complete ({len} bytes): nothing to replay")]
    NoHeader { len: usize },
    #[error("the recording is damaged: frame at byte {offset}: {what}")]
    Corrupt { offset: usize, what: String },
    #[error(
        "a record of {len} bytes is beyond the largest a recording holds ({MAX_RECORD_BYTES})"
    )]
    TooLarge { len: usize },
    #[error("cannot encode a record: {0}")]
    Encode(postcard::Error),
}

/// The run configuration a replay must use again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub time_limit_secs: u32,
    /// Host seconds after which the recording VM would have been stopped.
    pub host_timeout_secs: u64,
    pub mem_mib: u64,
    pub append: Option<String>,
    /// A checkpoint is written every this many exits.
    pub checkpoint_interval: u64,
    /// The boot entropy seed the snapshot was taken with (part of the machine).
    pub seed: u64,
    /// Basic blocks per progress exit the guest was built for.
    pub progress_interval: u64,
}

/// The first record: what the recording starts from and what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The rrr that recorded (its VMM's timeline must be the replaying one's).
    pub rrr_version: String,
    /// What the snapshot at READY was taken of.
    pub snapshot: SnapshotIdentity,
    /// The snapshot file the recording started from (its name is the machine's cache key).
    pub snapshot_path: String,
    /// Where the kernel (`vmlinux`) and the base rootfs were when recorded; a replay checks
    /// their hashes against `snapshot`.
    pub kernel_path: String,
    pub rootfs_path: String,
    pub config: RunConfig,
    /// Where the guest stood at READY: the replay's restore must stand there too.
    pub start_exits: u64,
    pub start_time_ns: u64,
    /// The stimulus's file name and its compiled binary (a replay needs nothing else).
    pub stimulus_name: String,
    pub stimulus: Vec<u8>,
}

/// How a landmark was decided while recording (for statistics; replay does not need it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LandmarkKind {
    Spinning,
    Runaway,
}

/// The vCPU registers a landmark must be found again by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegState {
    /// rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags.
    pub gprs: [u64; 18],
    pub cr3: u64,
    pub cs: u16,
}

impl RegState {
    pub fn rip(&self) -> u64 {
        self.gprs[16]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Landmark {
    /// Synchronous exits before it (it happened between this exit and the next).
    pub exits: u64,
    pub kind: LandmarkKind,
    pub regs: RegState,
    /// Hash of the pages the guest wrote since the previous landmark or the start.
    pub dirty_hash: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub exits: u64,
    pub time_ns: u64,
    pub rip: u64,
    pub regs_hash: u64,
    /// The registers themselves: a mismatch names the registers that differ.
    pub regs: RegState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// How the VM ended, in words (`powered off`, `fault: ...`).
    pub vm_end: String,
    pub exits: u64,
    pub time_ns: u64,
    /// Registers and the memory the guest wrote during the run.
    pub state_hash: u64,
    /// SHA-256 of the console bytes printed after READY.
    pub console_sha256: String,
    /// The verdict lines the recording printed (what a replay must print too).
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Header(Box<Header>),
    /// Console bytes handed to the UART at this exit count and virtual time.
    Input {
        exits: u64,
        time_ns: u64,
        bytes: Vec<u8>,
    },
    Landmark(Box<Landmark>),
    Checkpoint(Checkpoint),
    End(Box<End>),
}

impl Record {
    /// A short name, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Header(_) => "header",
            Record::Input { .. } => "console input",
            Record::Landmark(_) => "landmark",
            Record::Checkpoint(_) => "checkpoint",
            Record::End(_) => "end",
        }
    }
}

/// Appends records to a recording file, one `write` per record.
pub struct RecordingWriter {
    file: File,
    path: PathBuf,
    bytes: u64,
    records: u64,
}

impl RecordingWriter {
    /// Creates (or truncates) `path` and writes the preamble and the header.
    pub fn create(path: &Path, header: Header) -> Result<Self, LogError> {
        let write_err = |io| LogError::Write {
            path: path.to_owned(),
            io,
        };
        let mut file = File::create(path).map_err(write_err)?;
        let mut preamble = MAGIC.to_vec();
        preamble.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.write_all(&preamble).map_err(write_err)?;
        let mut writer = RecordingWriter {
            file,
            path: path.to_owned(),
            bytes: preamble.len() as u64,
            records: 0,
        };
        writer.append(&Record::Header(Box::new(header)))?;
        Ok(writer)
    }

    pub fn append(&mut self, record: &Record) -> Result<(), LogError> {
        let frame = encode_frame(record)?;
        self.file.write_all(&frame).map_err(|io| LogError::Write {
            path: self.path.clone(),
            io,
        })?;
        self.bytes += frame.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Makes the records written so far durable (at the end of a recording).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(|io| LogError::Write {
            path: self.path.clone(),
            io,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One frame, as written.
pub fn encode_frame(record: &Record) -> Result<Vec<u8>, LogError> {
    let payload = postcard::to_stdvec(record).map_err(LogError::Encode)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_RECORD_BYTES)
        .ok_or(LogError::TooLarge { len: payload.len() })?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// What follows the last whole record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The recording ends with its end record and nothing after it.
    Complete,
    /// No end record: the recorder stopped early (killed, Ctrl-C, a write error). `partial`
    /// bytes of a frame being written were left after the last whole record.
    Incomplete { partial: usize },
}

/// A recording read back: the header and the records after it, up to the last whole one.
#[derive(Debug, Clone)]
pub struct Recording {
    pub header: Header,
    /// Every record after the header, in order (the end record included, if any).
    pub records: Vec<Record>,
    pub tail: Tail,
    pub file_bytes: usize,
}

impl Recording {
    pub fn read(path: &Path) -> Result<Self, LogError> {
        let bytes = std::fs::read(path).map_err(|io| LogError::Read {
            path: path.to_owned(),
            io,
        })?;
        Self::parse(&bytes)
    }

    /// Parses a whole recording. A frame cut short at the end of the data is an incomplete
    /// tail, not an error; a frame that is all there but fails its checksum or does not decode
    /// is damage, and so is anything after an end record.
    pub fn parse(bytes: &[u8]) -> Result<Self, LogError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            if MAGIC.starts_with(bytes) {
                return Err(LogError::NoHeader { len: bytes.len() });
            }
            return Err(LogError::NotARecording);
        }
        let Some(version) = bytes.get(MAGIC.len()..PREAMBLE_LEN) else {
            return Err(LogError::NoHeader { len: bytes.len() });
        };
        let version = u32::from_le_bytes(version.try_into().expect("four bytes"));
        if version != FORMAT_VERSION {
            return Err(LogError::Version { found: version });
        }
        let mut offset = PREAMBLE_LEN;
        let mut header = None;
        let mut records = Vec::new();
        let mut ended = false;
        loop {
            let rest = &bytes[offset..];
            if rest.is_empty() {
                break;
            }
            let corrupt = |what: String| LogError::Corrupt { offset, what };
            if ended {
                return Err(corrupt(format!(
                    "{} bytes after the end record",
                    rest.len()
                )));
            }
            let Some(frame_header) = rest.get(..FRAME_HEADER_LEN) else {
                break;
            };
            let len = u32::from_le_bytes(frame_header[..4].try_into().expect("four bytes"));
            let crc = u32::from_le_bytes(frame_header[4..].try_into().expect("four bytes"));
            if len > MAX_RECORD_BYTES {
                return Err(corrupt(format!(
                    "length {len} is beyond the largest record ({MAX_RECORD_BYTES})"
                )));
            }
            let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len as usize) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                return Err(corrupt("checksum mismatch".into()));
            }
            let record: Record = postcard::from_bytes(payload)
                .map_err(|e| corrupt(format!("undecodable record: {e}")))?;
            match (record, header.is_none()) {
                (Record::Header(h), true) => header = Some(*h),
                (other, true) => {
                    return Err(corrupt(format!(
                        "the first record is a {}, not the header",
                        other.kind()
                    )))
                }
                (Record::Header(_), false) => {
                    return Err(corrupt("a second header".into()));
                }
                (other, false) => {
                    ended = matches!(other, Record::End(_));
                    records.push(other);
                }
            }
            offset += FRAME_HEADER_LEN + len as usize;
        }
        let Some(header) = header else {
            return Err(LogError::NoHeader { len: bytes.len() });
        };
        let tail = if ended {
            Tail::Complete
        } else {
            Tail::Incomplete {
                partial: bytes.len() - offset,
            }
        };
        Ok(Recording {
            header,
            records,
            tail,
            file_bytes: bytes.len(),
        })
    }

    pub fn end(&self) -> Option<&End> {
        match self.records.last() {
            Some(Record::End(end)) => Some(end),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::VmDescription;

    fn header() -> Header {
        Header {
            rrr_version: "0.1.0".into(),
            snapshot: SnapshotIdentity {
                rrr_version: "0.1.0".into(),
                kernel_sha256: "ab".repeat(32),
                rootfs_sha256: "cd".repeat(32),
                description: VmDescription {
                    cpuid: Vec::new(),
                    cmdline: "console=ttyS0".into(),
                    mem_bytes: 512 << 20,
                    quantum_ns: 1000,
                    epoch_unix_secs: 0,
                    kvm: "test".into(),
                    kernel_entry: 0x100_0000,
                    initrd_size: None,
                },
            },
            snapshot_path: "/cache/snapshots/x.rrrsnap".into(),
            kernel_path: "/cache/kernels/k/vmlinux".into(),
            rootfs_path: "/cache/rootfs/base.qcow2".into(),
            config: RunConfig {
                time_limit_secs: 30,
                host_timeout_secs: 270,
                mem_mib: 512,
                append: Some("panic_on_warn=1".into()),
                checkpoint_interval: 256,
                seed: 0,
                progress_interval: 65536,
            },
            start_exits: 17000,
            start_time_ns: 123_456,
            stimulus_name: "hello.c".into(),
            stimulus: (0..=255u8).cycle().take(3000).collect(),
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Checkpoint(Checkpoint {
                exits: 17256,
                time_ns: 9,
                rip: 0xffff_ffff_8100_0000,
                regs_hash: 42,
                regs: RegState {
                    gprs: [3; 18],
                    cr3: 0x2000,
                    cs: 0x33,
                },
            }),
            Record::Input {
                exits: 17300,
                time_ns: 10,
                bytes: b"hello\n".to_vec(),
            },
            Record::Landmark(Box::new(Landmark {
                exits: 17301,
                kind: LandmarkKind::Spinning,
                regs: RegState {
                    gprs: [7; 18],
                    cr3: 0x1000,
                    cs: 0x10,
                },
                dirty_hash: 99,
            })),
            Record::End(Box::new(End {
                vm_end: "powered off".into(),
                exits: 17400,
                time_ns: 11,
                state_hash: 5,
                console_sha256: "00".repeat(32),
                verdict: "rrr: stimulus exited with status 0".into(),
            })),
        ]
    }

    fn write(dir: &Path) -> (PathBuf, Vec<u64>) {
        let path = dir.join("rec");
        let mut writer = RecordingWriter::create(&path, header()).unwrap();
        // File offsets at which each whole record ends (the header first).
        let mut ends = vec![writer.bytes()];
        for record in records() {
            writer.append(&record).unwrap();
            ends.push(writer.bytes());
        }
        writer.sync().unwrap();
        assert_eq!(writer.records(), 5);
        (path, ends)
    }

    #[test]
    fn a_recording_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = write(dir.path());
        let recording = Recording::read(&path).unwrap();
        assert_eq!(recording.header, header());
        assert_eq!(recording.records, records());
        assert_eq!(recording.tail, Tail::Complete);
        assert_eq!(recording.file_bytes as u64, *ends.last().unwrap());
        assert_eq!(recording.end().unwrap().exits, 17400);
    }

    #[test]
    fn every_truncation_keeps_the_whole_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = write(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            let result = Recording::parse(&bytes[..cut]);
            if (cut as u64) < ends[0] {
                assert!(
                    matches!(result, Err(LogError::NoHeader { .. })),
                    "cut at {cut}: {result:?}"
                );
                continue;
            }
            let recording = result.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let whole = ends[1..].iter().filter(|&&end| end <= cut as u64).count();
            assert_eq!(recording.records, records()[..whole], "cut at {cut}");
            let last_end = if whole == 0 { ends[0] } else { ends[whole] };
            assert_eq!(
                recording.tail,
                Tail::Incomplete {
                    partial: cut - last_end as usize
                },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            match Recording::parse(&damaged) {
                // A flipped length byte can make the last frame look cut short; it must never
                // read back as the same complete recording.
                Ok(rec) => assert!(
                    rec.tail != Tail::Complete || rec.records != records(),
                    "flip at {at} went unnoticed"
                ),
                Err(
                    LogError::NotARecording
                    | LogError::Version { .. }
                    | LogError::Corrupt { .. }
                    | LogError::NoHeader { .. },
                ) => {}
                Err(other) => panic!("flip at {at}: unexpected {other}"),
            }
        }
    }

    #[test]
    fn foreign_files_and_versions_are_named() {
        assert!(matches!(
            Recording::parse(b"\x7fELF\x02\x01\x01\0\0\0\0\0"),
            Err(LogError::NotARecording)
        ));
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            Recording::parse(&other),
            Err(LogError::Version { found: 2 })
        ));
    }

    #[test]
    fn a_huge_length_is_damage_not_an_allocation() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Recording::parse(&bytes),
            Err(LogError::Corrupt { offset: 12, .. })
        ));
    }

    #[test]
    fn records_after_the_end_are_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(encode_frame(&records()[0]).unwrap());
        assert!(matches!(
            Recording::parse(&bytes),
            Err(LogError::Corrupt { .. })
        ));
    }
}
