//! The vCPU state at the kernel's 64-bit entry point: long mode with identity-mapped paging,
//! a flat GDT, RSI pointing at the zero page (the "64-bit boot protocol" of
//! Documentation/arch/x86/boot.rst).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, IDENTITY_MAPPED_GIB, PDE_START,
    PDPTE_START, PML4_START, ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the boot {what} into guest memory at {addr:#x} failed: {source}")]
    WriteMemory {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM_{ioctl} on the vCPU failed: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MSRS set {set} of {wanted} boot MSRs; the first refused is {first:#x}")]
    Msrs {
        set: usize,
        wanted: usize,
        first: u32,
    },
    #[error("building the MSR list failed: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NE: u64 = 1 << 5;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot GDT: null, 64-bit code, data, TSS. Selectors are index * 8.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

/// Packs a descriptor from its flags (access byte in bits 0..8, flags nibble in 12..16),
/// base and limit, in the layout the CPU expects.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The hidden part of a segment register, as KVM wants it, from a GDT entry.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages: the last byte is limit * 4096 + 4095.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes identity-mapping page tables for the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB
/// pages and returns the value for CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write(mem, "PML4", PML4_START, PDPTE_START | PRESENT_RW)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        write(mem, "PDPT", PDPTE_START + gib * 8, pd | PRESENT_RW)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            write(
                mem,
                "page directory",
                pd + i * 8,
                phys | PRESENT_RW | PAGE_SIZE_2M,
            )?;
        }
    }
    Ok(PML4_START)
}

/// Long mode, paging on, flat segments from the boot GDT.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|source| RegsError::Ioctl {
        ioctl: "GET_SREGS",
        source,
    })?;
    for (i, entry) in GDT.iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_gdt(GDT[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.cr3 = write_page_tables(mem)?;
    sregs.cr4 |= X86_CR4_PAE;
    // Set CR0 whole rather than OR-ing into the reset value: that one has CD and NW set, and
    // with caches disabled a nested-paging guest (the carrier) barely runs.
    sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|source| RegsError::Ioctl {
        ioctl: "SET_SREGS",
        source,
    })
}

/// RIP at the kernel's 64-bit entry, RSI at the zero page, interrupts off.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| RegsError::Ioctl {
        ioctl: "SET_REGS",
        source,
    })
}

/// The x87 and SSE control words as after FNINIT / reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Ioctl {
        ioctl: "SET_FPU",
        source,
    })
}

/// A TSC that starts at zero on every run (its rate is still the host's) and fast strings on.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: 0,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| RegsError::Ioctl {
        ioctl: "SET_MSRS",
        source,
    })?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
            first: entries[set].index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment_from_gdt(GDT[1], 1);
        assert_eq!((code.l, code.db, code.g, code.present), (1, 0, 1, 1));
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(code.type_, 0xb, "execute/read, accessed");
        let data = segment_from_gdt(GDT[2], 2);
        assert_eq!((data.l, data.db, data.s, data.type_), (0, 1, 1, 0x3));
        let tss = segment_from_gdt(GDT[3], 3);
        assert_eq!((tss.s, tss.type_, tss.selector), (0, 0xb, 24));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gibs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        // The last 2 MiB page of the third GiB maps itself.
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x2000 + 511 * 8))
            .unwrap();
        assert_eq!(pde, ((2 << 30) | (511 << 21)) | 0x83);
    }
}
