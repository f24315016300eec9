//! The zero page (`struct boot_params`), its e820 map, the command line and the initrd.

use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_MEMORY_START, MMIO_HOLE_END, MMIO_HOLE_START,
    PAGE_SIZE, SETUP_DATA_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id, as boot.rst asks of loaders without an assigned one.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;
/// `setup_data` type of a boot-loader RNG seed (`arch/x86/include/uapi/asm/setup_data.h`).
const SETUP_RNG_SEED: u32 = 9;
/// `struct setup_data`'s header: `u64 next; u32 type; u32 len;`, then the payload.
const SETUP_DATA_HEADER_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the kernel command line is {len} bytes; Linux takes at most {} (including the final NUL)", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot read initrd {}: {source}", path.display())]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {} is {size} bytes but only {room} bytes of RAM are free above the kernel (which ends at {kernel_end:#x}); give the VM more memory (--mem) or use a smaller initrd", path.display())]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        room: u64,
        kernel_end: u64,
    },
    #[error("writing the {what} into guest memory at {addr:#x} failed: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// An address range in the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map Linux sees: conventional RAM below the EBDA, RAM from 1 MiB to the end of
/// guest memory, and the 32-bit hole reserved for devices.
pub fn e820_map(ram_end: u64) -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: HIGH_MEMORY_START,
            size: ram_end.min(MMIO_HOLE_START) - HIGH_MEMORY_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MMIO_HOLE_START,
            size: MMIO_HOLE_END - MMIO_HOLE_START,
            kind: E820_RESERVED,
        },
    ]
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The initrd goes at the top of RAM, page aligned, and must not reach down into the kernel.
pub fn place_initrd(
    path: &Path,
    size: u64,
    kernel_end: u64,
    ram_end: u64,
) -> Result<InitrdPlacement, BootParamsError> {
    let floor = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let room = ram_end.saturating_sub(floor);
    if size > room {
        return Err(BootParamsError::InitrdTooBig {
            path: path.to_owned(),
            size,
            room,
            kernel_end,
        });
    }
    let addr = (ram_end - size) & !(PAGE_SIZE - 1);
    Ok(InitrdPlacement { addr, size })
}

/// Reads the initrd into guest memory at the top of RAM.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    ram_end: u64,
) -> Result<InitrdPlacement, BootParamsError> {
    let read_err = |source| BootParamsError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    let placement = place_initrd(path, size, kernel_end, ram_end)?;
    let bytes = std::fs::read(path).map_err(read_err)?;
    if bytes.len() as u64 != size {
        return Err(read_err(std::io::Error::other(
            "the file changed size while being read",
        )));
    }
    mem.write_slice(&bytes, GuestAddress(placement.addr))
        .map_err(|source| BootParamsError::Write {
            what: "initrd",
            addr: placement.addr,
            source,
        })?;
    Ok(placement)
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootParamsError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootParamsError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(BootParamsError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootParamsError::Write {
            what: "command line",
            addr: CMDLINE_START,
            source,
        })
}

/// Fills and writes the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    ram_end: u64,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        // Both live below the 4 GiB hole, so the 32-bit fields hold them whole.
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(ram_end);
    debug_assert!(map.len() <= E820_MAX_ENTRIES_ZEROPAGE);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootParamsError::Write {
            what: "zero page",
            addr: ZERO_PAGE_START,
            source,
        })
}

/// Hands the kernel `seed` as boot-loader entropy: a `SETUP_RNG_SEED` node at
/// [`SETUP_DATA_START`], linked from the zero page (written before, by [`write_boot_params`]).
///
/// Linux 6.12 mixes it into its input pool in `setup_arch()` and, with
/// `random.trust_bootloader` on (the default), credits it: 32 bytes are the 256 bits its crng
/// needs to be ready, so `getrandom()` in early user space does not wait in the jitter-entropy
/// loop (a timer spin). The kernel wipes the node after reading it.
pub fn write_rng_seed(mem: &GuestMemoryMmap, seed: &[u8]) -> Result<(), BootParamsError> {
    let write = |what, addr, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootParamsError::Write { what, addr, source })
    };
    let mut node = Vec::with_capacity(SETUP_DATA_HEADER_LEN + seed.len());
    node.extend_from_slice(&0u64.to_le_bytes());
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    node.extend_from_slice(seed);
    write("RNG seed", SETUP_DATA_START, &node)?;
    let mut params: boot_params =
        mem.read_obj(GuestAddress(ZERO_PAGE_START))
            .map_err(|source| BootParamsError::Write {
                what: "zero page",
                addr: ZERO_PAGE_START,
                source,
            })?;
    params.hdr.setup_data = SETUP_DATA_START;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootParamsError::Write {
            what: "zero page",
            addr: ZERO_PAGE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_low_ram_high_ram_and_the_hole() {
        let map = e820_map(256 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].addr, 1 << 20);
        assert_eq!(map[1].addr + map[1].size, 256 << 20);
        assert_eq!(map[2].kind, E820_RESERVED);
    }

    #[test]
    fn initrd_goes_to_the_top_and_must_fit() {
        let p = Path::new("initrd");
        let placed = place_initrd(p, 0x1801, 32 << 20, 64 << 20).unwrap();
        assert_eq!(placed.addr, (64 << 20) - 0x2000);
        assert_eq!(placed.addr % PAGE_SIZE, 0);
        assert!(placed.addr + placed.size <= 64 << 20);
        let err = place_initrd(p, 33 << 20, 32 << 20, 64 << 20).unwrap_err();
        assert!(matches!(err, BootParamsError::InitrdTooBig { .. }));
        assert!(err.to_string().contains("--mem"), "{err}");
    }

    #[test]
    fn zero_page_points_at_cmdline_and_initrd() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let initrd = InitrdPlacement {
            addr: 0x3000_0000,
            size: 0x1234,
        };
        write_boot_params(&mem, 13, Some(initrd), 1 << 30).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1234);
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }

    #[test]
    fn the_rng_seed_is_a_setup_data_node_linked_from_the_zero_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_params(&mem, 0, None, 1 << 30).unwrap();
        let seed: Vec<u8> = (1..=32).collect();
        write_rng_seed(&mem, &seed).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.setup_data }, SETUP_DATA_START);
        // Writing the seed kept the rest of the zero page.
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(params.e820_entries, 3);
        let mut node = [0u8; SETUP_DATA_HEADER_LEN + 32];
        mem.read_slice(&mut node, GuestAddress(SETUP_DATA_START))
            .unwrap();
        assert_eq!(&node[..8], &[0; 8], "the list ends here");
        assert_eq!(u32::from_le_bytes(node[8..12].try_into().unwrap()), 9);
        assert_eq!(u32::from_le_bytes(node[12..16].try_into().unwrap()), 32);
        assert_eq!(&node[16..], &seed[..]);
        // Nothing else the boot writes lies there.
        assert!(SETUP_DATA_START >= CMDLINE_START + CMDLINE_MAX_SIZE as u64);
        assert!(SETUP_DATA_START + node.len() as u64 <= EBDA_START);
    }
}
