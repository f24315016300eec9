//! Where things live in guest physical memory on our x86-64 board.
//!
//! The low addresses follow Firecracker's layout for the 64-bit boot protocol: nothing below
//! 1 MiB is used by firmware because there is none, so the boot structures sit in the first
//! pages and the kernel loads at the physical address its ELF asks for (16 MiB by default).

/// The boot GDT (four descriptors) and, right after it, an empty IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The initial stack grows down from here; Linux switches to its own stack at once.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The zero page (`struct boot_params`); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables: one PML4, one PDPT, and one page directory per GiB mapped.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// How much of the address space the boot page tables map with 2 MiB pages: all of RAM and
/// the 32-bit hole, so whatever the kernel touches before it builds its own tables is mapped.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line; Linux copies at most `CMDLINE_MAX_SIZE` bytes of it.
pub const CMDLINE_START: u64 = 0x20000;
/// x86's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The `setup_data` list (the boot RNG seed), after the command line. Linux reserves the first
/// MiB and every `setup_data` node before it allocates memory, so nothing overwrites it first.
pub const SETUP_DATA_START: u64 = 0x21000;
/// Start of the Extended BIOS Data Area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of RAM above the legacy VGA/BIOS hole.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: RAM stops here, devices live above it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, one `MMIO_DEVICE_SIZE` window each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Smallest guest RAM we accept: a kernel at 16 MiB plus room to run.
pub const MIN_MEM_BYTES: u64 = 64 << 20;
/// Largest guest RAM: one region below the MMIO hole.
pub const MAX_MEM_BYTES: u64 = MMIO_HOLE_START;
/// Guest page size.
pub const PAGE_SIZE: u64 = 0x1000;
