//! Reading guest virtual memory by walking the guest's own page tables.
//!
//! Used for fault reports (the instruction bytes at RIP). Every table address comes from the
//! guest, so each one is checked against guest RAM and every step can fail with a reason.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{EFER_LMA, X86_CR0_PG, X86_CR4_PAE};

const CR4_LA57: u64 = 1 << 12;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits 12..52 of a table entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("{gva:#x} is not canonical")]
    NotCanonical { gva: u64 },
    #[error("the level-{level} entry for {gva:#x} is not present (entry {entry:#x})")]
    NotPresent { gva: u64, level: u8, entry: u64 },
    #[error("the level-{level} table for {gva:#x} at {table:#x} is outside guest RAM")]
    TableOutsideRam { gva: u64, level: u8, table: u64 },
    #[error("{gva:#x} maps to {gpa:#x}, outside guest RAM")]
    OutsideRam { gva: u64, gpa: u64 },
    #[error(
        "paging mode not supported by the reader (CR0 {cr0:#x}, CR4 {cr4:#x}, EFER {efer:#x})"
    )]
    UnsupportedMode { cr0: u64, cr4: u64, efer: u64 },
}

/// The control registers that decide how addresses translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingMode {
    /// The vCPU's paging mode, from its special registers.
    pub fn of(sregs: &kvm_sregs) -> Self {
        PagingMode {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        }
    }

    /// The virtual address of the instruction at CS:RIP: outside long mode CS has a base; in
    /// long mode it is ignored.
    pub fn code_address(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
        if sregs.efer & EFER_LMA != 0 {
            regs.rip
        } else {
            sregs.cs.base.wrapping_add(regs.rip)
        }
    }

    /// Translates a virtual address to a guest-physical one.
    pub fn translate(&self, mem: &GuestMemoryMmap, gva: u64) -> Result<u64, WalkError> {
        if self.cr0 & X86_CR0_PG == 0 {
            return Ok(gva);
        }
        if self.efer & EFER_LMA == 0 || self.cr4 & X86_CR4_PAE == 0 {
            return Err(WalkError::UnsupportedMode {
                cr0: self.cr0,
                cr4: self.cr4,
                efer: self.efer,
            });
        }
        let levels: u8 = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let va_bits = 12 + 9 * u32::from(levels);
        let sign = (gva as i64) << (64 - va_bits) >> (64 - va_bits);
        if sign as u64 != gva {
            return Err(WalkError::NotCanonical { gva });
        }
        let mut table = self.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let index = (gva >> shift) & 0x1ff;
            let entry_addr = table + index * 8;
            let entry: u64 = mem
                .read_obj(GuestAddress(entry_addr))
                .map_err(|_| WalkError::TableOutsideRam { gva, level, table })?;
            if entry & PRESENT == 0 {
                return Err(WalkError::NotPresent { gva, level, entry });
            }
            // A set PS bit at level 3 (1 GiB) or level 2 (2 MiB) ends the walk.
            if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
                let page_mask = (1u64 << shift) - 1;
                return Ok((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
            }
            table = entry & ADDR_MASK;
        }
        Ok(table | (gva & 0xfff))
    }

    /// Reads `len` bytes at a virtual address, page by page. Returns what could be read before
    /// the first failure together with that failure.
    pub fn read_virt(
        &self,
        mem: &GuestMemoryMmap,
        gva: u64,
        len: usize,
    ) -> (Vec<u8>, Option<WalkError>) {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let va = gva.wrapping_add(out.len() as u64);
            let gpa = match self.translate(mem, va) {
                Ok(gpa) => gpa,
                Err(e) => return (out, Some(e)),
            };
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let mut chunk = vec![0u8; in_page.min(len - out.len())];
            if mem.read_slice(&mut chunk, GuestAddress(gpa)).is_err() {
                return (out, Some(WalkError::OutsideRam { gva: va, gpa }));
            }
            out.extend_from_slice(&chunk);
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CR0_PG_PE: u64 = X86_CR0_PG | crate::arch::x86_64::regs::X86_CR0_PE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, addr: u64, value: u64) {
        mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// PML4 at 0x1000; maps the kernel half (0xffffffff80000000) with a 2 MiB page onto
    /// 0x200000 and 0x400000 with 4 KiB pages onto 0x5000.
    fn tables(mem: &GuestMemoryMmap) -> PagingMode {
        put(mem, 0x1000 + 511 * 8, 0x2000 | 3); // PML4[511] -> PDPT
        put(mem, 0x2000 + 510 * 8, 0x3000 | 3); // PDPT[510] -> PD
        put(mem, 0x3000, 0x20_0000 | 0x83); // PD[0]: 2 MiB page
        put(mem, 0x3000 + 2 * 8, 0x4000 | 3); // PD[2] -> PT
        put(mem, 0x4000, 0x5000 | 3); // PT[0]: 4 KiB page
        put(mem, 0x4000 + 8, 0x7f_f000_0000 | 3); // PT[1]: outside RAM
        PagingMode {
            cr0: CR0_PG_PE,
            cr3: 0x1000,
            cr4: X86_CR4_PAE,
            efer: EFER_LMA | crate::arch::x86_64::regs::EFER_LME,
        }
    }

    #[test]
    fn walks_large_and_small_pages() {
        let m = mem();
        let mode = tables(&m);
        assert_eq!(mode.translate(&m, 0xffff_ffff_8000_1234), Ok(0x20_1234));
        assert_eq!(mode.translate(&m, 0xffff_ffff_8040_0010), Ok(0x5010));
        m.write_slice(b"\x0f\x0b", GuestAddress(0x5ffe)).unwrap();
        let (bytes, err) = mode.read_virt(&m, 0xffff_ffff_8040_0ffe, 4);
        assert_eq!(bytes, b"\x0f\x0b");
        assert!(matches!(err, Some(WalkError::OutsideRam { .. })), "{err:?}");
    }

    #[test]
    fn reports_why_a_walk_failed() {
        let m = mem();
        let mode = tables(&m);
        assert!(matches!(
            mode.translate(&m, 0x1000),
            Err(WalkError::NotPresent { level: 4, .. })
        ));
        assert!(matches!(
            mode.translate(&m, 0x8000_0000_0000),
            Err(WalkError::NotCanonical { .. })
        ));
        let wild = PagingMode {
            cr3: 0x7f_0000_0000,
            ..mode
        };
        assert!(matches!(
            wild.translate(&m, 0xffff_ffff_8000_0000),
            Err(WalkError::TableOutsideRam { level: 4, .. })
        ));
        let flat = PagingMode { cr0: 1, ..mode };
        assert_eq!(flat.translate(&m, 0x1234), Ok(0x1234));
    }
}
