//! A readable snapshot of the vCPU when a run ends in a fault: registers, control registers and
//! the instruction bytes at RIP (read through the guest's page tables).

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::walk::{PagingMode, WalkError};

/// How many instruction bytes a report shows: the longest x86 instruction.
pub const CODE_BYTES: usize = 15;

/// The vCPU state at a fault.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    pub regs: kvm_regs,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_selector: u16,
    /// The bytes at CS:RIP, as far as they could be read.
    pub code: Vec<u8>,
    /// Why reading stopped short, if it did.
    pub code_error: Option<WalkError>,
}

impl CpuSnapshot {
    pub fn capture(regs: kvm_regs, sregs: &kvm_sregs, mem: &GuestMemoryMmap) -> Self {
        let rip = PagingMode::code_address(&regs, sregs);
        let (code, code_error) = PagingMode::of(sregs).read_virt(mem, rip, CODE_BYTES);
        CpuSnapshot {
            regs,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs_selector: sregs.cs.selector,
            code,
            code_error,
        }
    }
}

impl fmt::Display for CpuSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        writeln!(
            f,
            "  RIP {:#018x}  CS {:#06x}  RFLAGS {:#010x}  (CPL {})",
            r.rip,
            self.cs_selector,
            r.rflags,
            self.cs_selector & 3
        )?;
        let gprs = [
            ("RAX", r.rax),
            ("RBX", r.rbx),
            ("RCX", r.rcx),
            ("RDX", r.rdx),
            ("RSI", r.rsi),
            ("RDI", r.rdi),
            ("RBP", r.rbp),
            ("RSP", r.rsp),
            ("R8", r.r8),
            ("R9", r.r9),
            ("R10", r.r10),
            ("R11", r.r11),
            ("R12", r.r12),
            ("R13", r.r13),
            ("R14", r.r14),
            ("R15", r.r15),
        ];
        for row in gprs.chunks(4) {
            write!(f, " ")?;
            for (name, value) in row {
                write!(f, " {name:>3} {value:#018x}")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  CR0 {:#x}  CR2 {:#x}  CR3 {:#x}  CR4 {:#x}  EFER {:#x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )?;
        write!(f, "  code at RIP:")?;
        if self.code.is_empty() {
            write!(f, " (none)")?;
        }
        for byte in &self.code {
            write!(f, " {byte:02x}")?;
        }
        if let Some(err) = &self.code_error {
            write!(f, " (stopped: {err})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reads_code_at_rip_and_formats_every_register() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0xcc, 0x90, 0xf4], GuestAddress(0x8000))
            .unwrap();
        let regs = kvm_regs {
            rip: 0x8000,
            r15: 0x1515,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr0: 0x11,
            ..Default::default()
        };
        let snap = CpuSnapshot::capture(regs, &sregs, &mem);
        assert_eq!(&snap.code[..3], &[0xcc, 0x90, 0xf4]);
        assert_eq!(snap.code.len(), CODE_BYTES);
        let text = snap.to_string();
        assert!(text.contains("code at RIP: cc 90 f4"), "{text}");
        assert!(text.contains("R15 0x0000000000001515"), "{text}");
        assert!(text.contains("CR0 0x11"), "{text}");
    }
}
