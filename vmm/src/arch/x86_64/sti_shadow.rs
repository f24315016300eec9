//! Where an interrupt window really opens after `sti`.
//!
//! `sti` enables interrupts only after the next instruction (the interrupt shadow), so a
//! window exit requested while interrupts were off belongs after that instruction. Inside the
//! carrier, a host-timed exit that lands in the shadow can lose it: the window then opens one
//! instruction early, on the shadowed instruction itself. Seen on 2026-11-30: at the same exit
//! count, a recording injected the serial interrupt after `sti; call __sanitizer_cov_trace_pc`
//! and a replay before the call. Nothing the replay checks changed, but the interrupted RIP is
//! mixed into random.c's interrupt entropy pool, so the final state hashes differed (the
//! "final-hash flake" of issue 9). The run loop steps over the shadowed instruction when a
//! window opens right behind an `sti`, so both runs inject at the same instruction.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::walk::PagingMode;

const STI: u8 = 0xfb;
const HLT: u8 = 0xf4;

/// What the instruction at RIP is, when the byte before it is `sti`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shadowed {
    /// The window opened where it should: not right behind an `sti`.
    No,
    /// A `hlt` in the shadow (`sti; hlt`, the idle loop): it is to be taken as the `hlt` exit it
    /// would have been.
    Halt,
    /// Any other instruction: to be stepped over before the interrupt goes in.
    Instruction,
}

/// Whether RIP sits right behind an `sti`, from the guest's own page tables. A byte that
/// cannot be read counts as no `sti`: the window is then taken as it came.
pub fn shadowed(regs: &kvm_regs, sregs: &kvm_sregs, mem: &GuestMemoryMmap) -> Shadowed {
    let rip = PagingMode::code_address(regs, sregs);
    let (bytes, _) = PagingMode::of(sregs).read_virt(mem, rip.wrapping_sub(1), 2);
    match bytes.as_slice() {
        [STI, HLT] => Shadowed::Halt,
        [STI, _] => Shadowed::Instruction,
        _ => Shadowed::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn at(code: &[u8], rip: u64) -> Shadowed {
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        // Paging off: addresses are physical.
        let sregs = kvm_sregs::default();
        let regs = kvm_regs {
            rip,
            ..Default::default()
        };
        shadowed(&regs, &sregs, &mem)
    }

    #[test]
    fn a_window_right_behind_sti_is_in_its_shadow() {
        // sti; call rel32; pop rax
        let code = [0xfb, 0xe8, 0x5e, 0x2f, 0xda, 0xff, 0x58];
        assert_eq!(at(&code, 0x1001), Shadowed::Instruction);
        // After the call: where the window belongs.
        assert_eq!(at(&code, 0x1006), Shadowed::No);
        // sti; hlt
        assert_eq!(at(&[0x90, 0xfb, 0xf4], 0x1002), Shadowed::Halt);
        // popf opens a window with no shadow.
        assert_eq!(at(&[0x9d, 0x90], 0x1001), Shadowed::No);
    }
}
