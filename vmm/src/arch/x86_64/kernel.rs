//! Loading the guest kernel: an uncompressed x86-64 `vmlinux` ELF, entered in long mode.
//!
//! `linux-loader` copies the segments; this module first checks that the file really is a
//! 64-bit x86 kernel whose entry lies inside what gets loaded, because the loader itself accepts
//! any little-endian ELF and a wrong file would otherwise only show up as a guest crash.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::HIGH_MEMORY_START;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// "HdrS" at offset 0x202 marks a bzImage's setup header.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read kernel {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is a bzImage; rrr boots the uncompressed `vmlinux` ELF from the kernel build directory", path.display())]
    BzImage { path: PathBuf },
    #[error("{} is not an ELF file; pass the uncompressed `vmlinux` from the kernel build directory", path.display())]
    NotElf { path: PathBuf },
    #[error("{} is not a 64-bit little-endian x86-64 ELF ({what}); rrr needs an x86_64 `vmlinux`", path.display())]
    WrongArch { path: PathBuf, what: String },
    #[error("{} has its entry point {entry:#x} outside every loadable segment, so it has no 64-bit entry rrr can jump to", path.display())]
    NoEntry { path: PathBuf, entry: u64 },
    #[error("{} does not fit in guest memory: it ends at {end:#x} but RAM ends at {ram_end:#x}; give the VM more memory", path.display())]
    TooBig {
        path: PathBuf,
        end: u64,
        ram_end: u64,
    },
    #[error("loading {} into guest memory failed: {source}", path.display())]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
}

/// Where the kernel went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Physical address of `startup_64`.
    pub entry: u64,
    /// First byte after the highest loaded segment (including its bss).
    pub end: u64,
}

struct ElfInfo {
    entry: u64,
    /// (physical start, size in memory) of every PT_LOAD segment.
    loads: Vec<(u64, u64)>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the ELF header and program headers without trusting any of their numbers.
fn inspect(path: &Path, file: &mut File) -> Result<ElfInfo, KernelError> {
    let read_err = |source| KernelError::Read {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(0x210);
    file.by_ref()
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    if head.len() < 4 || &head[..4] != ELF_MAGIC {
        if head.len() >= BZIMAGE_MAGIC_OFFSET + 4
            && &head[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == b"HdrS"
        {
            return Err(KernelError::BzImage {
                path: path.to_owned(),
            });
        }
        return Err(KernelError::NotElf {
            path: path.to_owned(),
        });
    }
    let wrong = |what: String| KernelError::WrongArch {
        path: path.to_owned(),
        what,
    };
    if head.len() < 64 {
        return Err(wrong("truncated ELF header".into()));
    }
    if head[4] != ELFCLASS64 {
        return Err(wrong(format!("ELF class {}", head[4])));
    }
    if head[5] != ELFDATA2LSB {
        return Err(wrong("big-endian".into()));
    }
    let machine = u16_at(&head, 18);
    if machine != EM_X86_64 {
        return Err(wrong(format!("machine {machine}")));
    }
    let entry = u64_at(&head, 24);
    let phoff = u64_at(&head, 32);
    let phentsize = u16_at(&head, 54) as usize;
    let phnum = u16_at(&head, 56) as usize;
    if phentsize != 56 {
        return Err(wrong(format!("program header size {phentsize}")));
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).map_err(read_err)?;
    file.read_exact(&mut phdrs).map_err(read_err)?;
    let loads = phdrs
        .chunks_exact(phentsize)
        .filter(|ph| u32_at(ph, 0) == PT_LOAD)
        .map(|ph| (u64_at(ph, 24), u64_at(ph, 40)))
        .collect();
    Ok(ElfInfo { entry, loads })
}

/// Checks that `path` is a kernel this loader can boot, without loading it: callers use it to
/// fail before starting anything expensive (the carrier, a rootfs build).
pub fn check_kernel(path: &Path) -> Result<(), KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::Open {
        path: path.to_owned(),
        source,
    })?;
    inspect(path, &mut file).map(drop)
}

/// Loads the kernel ELF at the physical addresses it was linked for.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram_end: u64,
) -> Result<LoadedKernel, KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::Open {
        path: path.to_owned(),
        source,
    })?;
    let info = inspect(path, &mut file)?;
    let entry_loaded = info
        .loads
        .iter()
        .any(|&(start, size)| info.entry >= start && info.entry - start < size);
    if !entry_loaded || info.entry < HIGH_MEMORY_START {
        return Err(KernelError::NoEntry {
            path: path.to_owned(),
            entry: info.entry,
        });
    }
    let end = info
        .loads
        .iter()
        .map(|&(start, size)| start.saturating_add(size))
        .max()
        .unwrap_or(0);
    if end > ram_end {
        return Err(KernelError::TooBig {
            path: path.to_owned(),
            end,
            ram_end,
        });
    }
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(
        |source| KernelError::Load {
            path: path.to_owned(),
            source,
        },
    )?;
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        end: result.kernel_end.max(end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A minimal ELF64 with one PT_LOAD of `payload` at `paddr` and the given entry.
    fn elf(class: u8, machine: u16, paddr: u64, entry: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = class;
        b[5] = ELFDATA2LSB;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut b[64..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(payload.len() as u64 + 0x1000).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn loads_segments_and_reports_entry() {
        let f = file(&elf(
            ELFCLASS64,
            EM_X86_64,
            0x20_0000,
            0x20_0004,
            b"\x90\x90\x90\x90\xf4",
        ));
        let m = mem();
        let k = load_kernel(&m, f.path(), 4 << 20).unwrap();
        assert_eq!(k.entry, 0x20_0004);
        assert_eq!(k.end, 0x20_0000 + 5 + 0x1000);
        let mut code = [0u8; 5];
        vm_memory::Bytes::read_slice(&m, &mut code, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&code, b"\x90\x90\x90\x90\xf4");
    }

    #[test]
    fn refuses_wrong_files() {
        let m = mem();
        let not_elf = file(b"#!/bin/sh\necho hello\n");
        assert!(matches!(
            load_kernel(&m, not_elf.path(), 4 << 20),
            Err(KernelError::NotElf { .. })
        ));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = file(&bz);
        assert!(matches!(
            load_kernel(&m, bz.path(), 4 << 20),
            Err(KernelError::BzImage { .. })
        ));
        let arm = file(&elf(ELFCLASS64, 183, 0x20_0000, 0x20_0000, b"x"));
        let err = load_kernel(&m, arm.path(), 4 << 20).unwrap_err();
        assert!(err.to_string().contains("machine 183"), "{err}");
        let elf32 = file(&elf(1, EM_X86_64, 0x20_0000, 0x20_0000, b"x"));
        assert!(matches!(
            load_kernel(&m, elf32.path(), 4 << 20),
            Err(KernelError::WrongArch { .. })
        ));
        let no_entry = file(&elf(ELFCLASS64, EM_X86_64, 0x20_0000, 0x90_0000, b"x"));
        assert!(matches!(
            load_kernel(&m, no_entry.path(), 4 << 20),
            Err(KernelError::NoEntry { .. })
        ));
        let big = file(&elf(ELFCLASS64, EM_X86_64, 0x3f_f000, 0x3f_f000, b"x"));
        assert!(matches!(
            load_kernel(&m, big.path(), 4 << 20),
            Err(KernelError::TooBig { .. })
        ));
        let missing = Path::new("/nonexistent/vmlinux");
        assert!(matches!(
            load_kernel(&m, missing, 4 << 20),
            Err(KernelError::Open { .. })
        ));
    }
}
